"""PyTorch checkpoints (`torch.save`'s zip format) read without torch and without running their pickle.

The pickle in `data.pkl` is read by the project's one restricted unpickler (restricted_pickle.py): first
walked opcode by opcode (`pickletools`, which executes nothing) to refuse malformed streams and memo indices
that would make the C unpickler allocate gigabytes; then loaded by an unpickler whose `find_class` hands out
only our own tensor-rebuilding functions and plain containers. Every other global (a class of the training script, `os.system`, ...) becomes an inert
stand-in that records its name and runs nothing, so a training checkpoint holding an `argparse.Namespace`
or a yacs config beside its weights still yields the weights, and code hidden in a pickle never runs.
Tensors become read-only numpy views of the mapped file, each checked against its storage's bytes.
Files in torch's legacy (pre-1.6, non-zip) format are handed to `torch.load(weights_only=True)` (without torch:
a one-line refusal naming the `[torch]` extra).
"""
import pickle
import pickletools
import struct
from collections import OrderedDict
from typing import Dict

import ml_dtypes
import numpy as np

from ..errors import ConversionError, first_line
from .mapped import MappedFile, MapReader, ZipArchive, check_shape
from .restricted_pickle import Malformed, RestrictedUnpickler, latin1
from . import restricted_pickle

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
    'ComplexFloatStorage': np.complex64, 'ComplexDoubleStorage': np.complex128, 'UntypedStorage': np.uint8}
_TORCH_DTYPES = {
    'float32': np.float32, 'float': np.float32, 'float64': np.float64, 'double': np.float64,
    'float16': np.float16, 'half': np.float16, 'bfloat16': ml_dtypes.bfloat16, 'int64': np.int64,
    'long': np.int64, 'int32': np.int32, 'int': np.int32, 'int16': np.int16, 'short': np.int16,
    'int8': np.int8, 'uint8': np.uint8, 'uint16': np.uint16, 'uint32': np.uint32, 'uint64': np.uint64,
    'bool': np.bool_, 'complex64': np.complex64, 'cfloat': np.complex64, 'complex128': np.complex128,
    'cdouble': np.complex128, 'float8_e4m3fn': ml_dtypes.float8_e4m3fn, 'float8_e5m2': ml_dtypes.float8_e5m2}
_MAX_REFUSED = 1000


class _Named:
    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f'torch.{self.name}'


class _StorageType(_Named):
    """What `torch.FloatStorage` (etc.) stands for in a persistent id: an element type."""


class _DType(_Named):
    """What `torch.float32` (etc.) stands for (the dtype argument of `_rebuild_tensor_v3`)."""


class _Storage:
    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key = array, key


class Opaque:
    """An inert stand-in for an object the pickle asked to construct: it accepts anything and runs nothing."""
    qualname = '?'

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f'<{self.qualname} (not loaded)>'


def _opaque(qualname: str):
    return type('Opaque', (Opaque,), {'qualname': qualname})


def _int(v, what: str) -> int:
    if type(v) is not int or v < 0:
        raise ConversionError(f'{what} is {v!r}, not a non-negative integer')
    return v


def _rebuild(storage, offset, size, stride, dtype=None) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise ConversionError(f'a tensor refers to {type(storage).__name__}, not a storage')
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)) or len(size) != len(stride):
        raise ConversionError(f'tensor of storage {storage.key!r}: size {size!r} and stride {stride!r} do not match')
    where = f'tensor of storage {storage.key!r}'
    offset = _int(offset, f'{where}: offset')
    size = check_shape(tuple(size), where)
    stride = tuple(_int(s, f'{where}: stride') for s in stride)
    array = storage.array
    if dtype is not None and dtype != array.dtype:
        if array.dtype != np.uint8:
            raise ConversionError(f'{where}: dtype {dtype} does not match its {array.dtype} storage')
        if array.size % dtype.itemsize:
            raise ConversionError(f'{where}: {array.size} bytes do not hold whole {dtype} elements')
        array = array.view(dtype)
    if 0 in size:
        return np.zeros(size, array.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= array.size:
        raise ConversionError(f'{where}: shape {size} with strides {stride} at offset {offset} reaches element '
                              f'{last}, past the storage\'s {array.size}')
    return np.lib.stride_tricks.as_strided(array[offset:], size, [s * array.itemsize for s in stride],
                                           writeable=False)


def _rebuild_v1(storage, offset, size, stride):
    return _rebuild(storage, offset, size, stride)


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _rebuild(storage, offset, size, stride)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, _DType):
        raise ConversionError(f'a tensor declares dtype {dtype!r}')
    return _rebuild(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func in (_rebuild_v1, _rebuild_v2, _rebuild_v3, _rebuild_parameter) and isinstance(args, tuple):
        return func(*args)
    return _opaque('tensor subclass')()


_SAFE = {
    'collections.OrderedDict': OrderedDict,
    'torch._utils._rebuild_tensor': _rebuild_v1,
    'torch._utils._rebuild_tensor_v2': _rebuild_v2,
    'torch._utils._rebuild_tensor_v3': _rebuild_v3,
    'torch._utils._rebuild_parameter': _rebuild_parameter,
    'torch._utils._rebuild_parameter_with_state': _rebuild_parameter,
    'torch._tensor._rebuild_from_type_v2': _rebuild_from_type_v2,
    'torch.Size': tuple,
    'builtins.set': set,
    'builtins.frozenset': frozenset,
    '_codecs.encode': latin1,   # protocol 2 pickles bytes as _codecs.encode(str, 'latin1')
}


class _Unpickler(RestrictedUnpickler):
    """The restricted unpickler with tensor rebuilding; an unknown global becomes an inert stand-in."""
    allowed = _SAFE

    def __init__(self, data: bytes, storage_bytes, big_endian: bool):
        super().__init__(data)
        self.storage_bytes = storage_bytes
        self.big_endian = big_endian
        self.storages: Dict[str, _Storage] = {}
        self.refused: Dict[str, type] = {}

    def refuse(self, module, name):
        full = f'{module}.{name}'
        if (module == 'torch' and name in _STORAGE_DTYPES) or full == 'torch.storage.UntypedStorage':
            # torch.save names UntypedStorage by its defining module (dtypes with no typed storage: float8, uint16)
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == 'torch' and name in _TORCH_DTYPES:
            return _DType(name, _TORCH_DTYPES[name])
        if full not in self.refused:
            if len(self.refused) >= _MAX_REFUSED:   # each stand-in is a class: bound what a pickle can make
                raise ConversionError(f'refers to more than {_MAX_REFUSED} kinds of non-tensor objects')
            self.refused[full] = _opaque(full)
        return self.refused[full]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ('storage', b'storage')):
            raise ConversionError(f'unknown persistent id {str(pid)[:80]}')
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise ConversionError(f'malformed storage reference {str(pid)[:80]}')
        numel = _int(numel, f'storage {key!r}: element count')
        dtype = stype.dtype.newbyteorder('>') if self.big_endian else stype.dtype
        if key in self.storages:
            st = self.storages[key]
            if st.array.dtype != dtype or st.array.size != numel:
                raise ConversionError(f'storage {key!r} is declared twice with different types or sizes')
            return st
        data = self.storage_bytes(key)
        if data.size != numel * dtype.itemsize:
            raise ConversionError(f'storage {key!r} declares {numel} {stype.dtype} elements '
                                  f'({numel * dtype.itemsize} bytes), its record holds {data.size}')
        st = self.storages[key] = _Storage(data.view(dtype) if data.size else np.zeros(0, dtype), key)
        return st


def load(path: str, mf: MappedFile):
    """The unpickled object of a zip-format torch file: tensors are numpy views of `mf`.

    Returns (object, names of the globals that were not loaded).
    """
    z = ZipArchive(mf, 'torch file')
    pkl = [n for n in z.members if n.endswith('/data.pkl') and n.count('/') == 1]
    if len(pkl) != 1:
        found = 'no' if not pkl else 'several'
        raise ConversionError(f'{path}: a zip archive, but {found} data.pkl record: not a torch.save file')
    prefix = pkl[0][:-len('data.pkl')]
    order = z.members.get(prefix + 'byteorder')
    big = order is not None and bytes(z.data(order)) == b'big'

    def storage_bytes(key):
        m = z.members.get(f'{prefix}data/{key}')
        if m is None:
            raise ConversionError(f'storage {key!r} has no record data/{key}')
        return z.data(m)

    data = bytes(z.data(z.members[pkl[0]]))
    u = _Unpickler(data, storage_bytes, big)
    try:
        obj = restricted_pickle.load(data, lambda _: u)
    except Malformed as e:
        raise ConversionError(f'{path}: malformed pickle in data.pkl ({e})') from None
    except ConversionError as e:
        raise ConversionError(f'{path}: {e}') from None
    return obj, u.refused


def _nothing(*args, **kwargs):
    return None


class _LegacyScan(_Unpickler):
    """The main pickle of a legacy file, walked for its storages' declared sizes only: tensors are not built,
    storages are not allocated (persistent ids are recorded, rebuilds return None)."""
    allowed = {**_SAFE, **{k: _nothing for k in _SAFE if k.startswith('torch._')}}

    def __init__(self, data: bytes):
        RestrictedUnpickler.__init__(self, data)
        self.refused: Dict[str, type] = {}
        self.declared: Dict[object, int] = {}

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ('storage', b'storage'):
            _, stype, key, _location, numel, _view = pid
            if not isinstance(stype, _StorageType) or not isinstance(key, (str, bytes)):
                raise ConversionError(f'malformed storage reference {str(pid)[:80]}')
            numel = _int(numel, f'storage {key!r}: element count')
            self.declared[key] = max(self.declared.get(key, 0), numel * stype.dtype.itemsize)
            return None
        if isinstance(pid, tuple) and pid and pid[0] in ('module', b'module'):
            return None
        raise ConversionError(f'unknown persistent id {str(pid)[:80]}')


def check_legacy_sizes(path: str, mf: MappedFile) -> int:
    """Refuse a legacy file whose storages declare more bytes than follow its pickles. torch's legacy loader
    allocates each storage at the size its pickle declares before it reads the data (a 19 KB file declaring
    2e9 floats has it ask for 8 GB). The file is: 3 small pickles (magic number, protocol version, system
    info), the main pickle, the storage keys' pickle, then each storage's 8-byte count and bytes.
    Returns the bytes declared."""
    r = MapReader(mf)
    try:
        for _ in range(3):
            for _ in pickletools.genops(r):   # leaves r just after the pickle's STOP
                pass
        start = r.tell()
        for _ in pickletools.genops(r):
            pass
        data = mf.bytes(start, r.tell() - start)
        scan = _LegacyScan(data)
        restricted_pickle.load(data, lambda _: scan)
        for _ in pickletools.genops(r):   # the storage keys
            pass
    except (Malformed, ValueError) as e:
        raise ConversionError(f'{path}: not a readable torch file (legacy format: {first_line(e)})') from None
    except ConversionError as e:
        raise ConversionError(f'{path}: {e}') from None
    declared, left = sum(scan.declared.values()), mf.size - r.tell()
    if declared > left:
        raise ConversionError(f'{path}: its pickle declares {declared:,} bytes of storages, the file holds '
                              f'{left:,} after it (corrupt or truncated legacy torch file)')
    return declared


def load_legacy(path: str, mf: MappedFile):
    """torch's legacy format, through torch's own weights-only loader (eager: tensors are copied), after
    `check_legacy_sizes`.

    torch reads it through a MapReader: its unpickler trusts declared string lengths, and a real file's
    `read(n)` would allocate whatever a damaged length says before finding the file shorter.
    """
    import warnings
    from ..optional import require
    torch = require('torch', f"{path}: torch's legacy (pre-1.6, non-zip) format")   # without it, nothing to check for
    check_legacy_sizes(path, mf)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            obj = torch.load(MapReader(mf), map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' in str(e).lower():
            raise ConversionError(f'{path}: holds pickled objects other than tensors and plain containers; '
                                  f'refused (weights-only loading of a legacy-format file)') from None
        raise ConversionError(f'{path}: not a readable torch file ({first_line(e)})') from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, AttributeError,
            AssertionError, struct.error) as e:   # what torch's legacy loader raises on a damaged file
        raise ConversionError(f'{path}: cannot load as a weights-only torch file: {first_line(e)}') from None

    def to_numpy(v):
        if isinstance(v, torch.Tensor):
            if v.dtype == torch.bfloat16:
                return v.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            return v.detach().cpu().numpy()
        if isinstance(v, dict):
            return {k: to_numpy(x) for k, x in v.items()}
        return v
    try:
        return to_numpy(obj), set()
    except (TypeError, RuntimeError) as e:
        raise ConversionError(f'{path}: a tensor cannot be read: {first_line(e)}') from None
