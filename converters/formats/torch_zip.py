"""Writing `torch.save`'s zip format without torch: a state_dict of numpy arrays -> a `.pth` that
`torch.load(weights_only=True)` and timm's `load_state_dict(strict=True)` read as torch.save's own file.

The archive (stored, not compressed; every record's data starts on a 64-byte boundary, padded with an
'FB' extra field in its local header, as torch's writer does; zip64 for records of 2 GiB or more):
- `archive/data.pkl`: pickle protocol 2 of a plain dict {key: tensor}, each tensor written as torch pickles it,
  `torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, collections.OrderedDict())` with the
  persistent id `('storage', torch.<Type>Storage, '<n>', 'cpu', numel)`; dtypes without a typed storage
  (float8_e4m3fn, float8_e5m2, uint16/32/64) as `_rebuild_tensor_v3(...)`, the persistent id naming
  `torch.storage.UntypedStorage` with numel in bytes and the dtype (`torch.<name>`) as a last argument.
  The memo (BINPUT/BINGET) is used where Python's pickler would, so these bytes equal torch.save's for the
  same dict (tested), strides are row-major (a size-0 dim counts as 1, as torch's contiguous strides);
- `archive/data/<n>`: storage n, the array's bytes in little-endian order, storages numbered from 0 in key order;
- `archive/.format_version` (`1`), `archive/.storage_alignment` (`64`), `archive/byteorder` (`little`),
  `archive/version` (`3`), `archive/.data/serialization_id` (40 digits; here a digest of data.pkl, so the
  same state gives the same file), in torch's order.
"""
import hashlib
import io
import struct
import zipfile
from typing import Dict, Optional

import ml_dtypes
import numpy as np

from ..errors import ConversionError

ALIGN = 64
_TYPED = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
          np.dtype(np.float16): 'HalfStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
          np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage', np.dtype(np.int16): 'ShortStorage',
          np.dtype(np.int8): 'CharStorage', np.dtype(np.uint8): 'ByteStorage', np.dtype(np.bool_): 'BoolStorage',
          np.dtype(np.complex64): 'ComplexFloatStorage', np.dtype(np.complex128): 'ComplexDoubleStorage'}
_UNTYPED = {np.dtype(ml_dtypes.float8_e4m3fn): 'float8_e4m3fn', np.dtype(ml_dtypes.float8_e5m2): 'float8_e5m2',
            np.dtype(np.uint16): 'uint16', np.dtype(np.uint32): 'uint32', np.dtype(np.uint64): 'uint64'}


class _Pickle:
    """Protocol-2 opcodes for this one structure, memoised as pickle.Pickler memoises the objects torch passes
    it: globals and the shared strings 'storage' and 'cpu' once, every other str and non-empty tuple anew."""

    def __init__(self):
        self.out = io.BytesIO()
        self.memo: Dict[object, int] = {}
        self.next = 0
        self.out.write(b'\x80\x02')

    def _put(self):
        i, self.next = self.next, self.next + 1
        self.out.write(b'q' + bytes([i]) if i < 256 else b'r' + struct.pack('<I', i))
        return i

    def _get(self, i):
        self.out.write(b'h' + bytes([i]) if i < 256 else b'j' + struct.pack('<I', i))

    def shared(self, key, write):
        """A memoised object: written (and BINPUT) the first time, BINGET after."""
        if key in self.memo:
            self._get(self.memo[key])
        else:
            write()
            self.memo[key] = self._put()

    def glob(self, module, name):
        self.shared(('global', module, name), lambda: self.out.write(f'c{module}\n{name}\n'.encode()))

    def str(self, s):
        self.str_raw(s)
        self._put()

    def shared_str(self, s):
        self.shared(('str', s), lambda: self.str_raw(s))

    def str_raw(self, s):
        b = s.encode('utf-8')
        self.out.write(b'X' + struct.pack('<I', len(b)) + b)

    def int(self, v):
        v = int(v)
        if 0 <= v <= 0xff:
            self.out.write(b'K' + bytes([v]))
        elif 0 <= v <= 0xffff:
            self.out.write(b'M' + struct.pack('<H', v))
        elif -0x80000000 <= v <= 0x7fffffff:
            self.out.write(b'J' + struct.pack('<i', v))
        else:
            n = (v.bit_length() + 8) // 8
            self.out.write(b'\x8a' + bytes([n]) + v.to_bytes(n, 'little', signed=True))

    def ints(self, values):
        """A tuple of ints as pickle writes a fresh one: () unmemoised, 1-3 items TUPLE1-3, more MARK...TUPLE."""
        if not values:
            self.out.write(b')')
            return
        if len(values) > 3:
            self.out.write(b'(')
        for v in values:
            self.int(v)
        self.out.write({1: b'\x85', 2: b'\x86', 3: b'\x87'}.get(len(values), b't'))
        self._put()

    def tensor(self, storage_key: str, a: np.ndarray):
        untyped = a.dtype in _UNTYPED
        self.glob('torch._utils', '_rebuild_tensor_v3' if untyped else '_rebuild_tensor_v2')
        self.out.write(b'((')   # the args tuple, then the persistent id tuple
        self.shared_str('storage')
        if untyped:
            self.glob('torch.storage', 'UntypedStorage')
        else:
            self.glob('torch', _TYPED[a.dtype])
        self.str(storage_key)
        self.shared_str('cpu')
        self.int(a.nbytes if untyped else a.size)
        self.out.write(b't')
        self._put()
        self.out.write(b'Q')                 # BINPERSID
        self.int(0)                          # storage offset
        self.ints(a.shape)
        self.ints(_strides(a.shape))
        self.out.write(b'\x89')              # requires_grad=False
        self.glob('collections', 'OrderedDict')
        self.out.write(b')R')                # OrderedDict(): no backward hooks
        self._put()
        if untyped:
            self.glob('torch', _UNTYPED[a.dtype])
        self.out.write(b't')
        self._put()
        self.out.write(b'R')
        self._put()


def _strides(shape):
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def state_pickle(state: Dict[str, np.ndarray], wrap: Optional[str] = None) -> bytes:
    """data.pkl for a dict of arrays (storage n is the n-th array), as torch.save pickles the same dict
    (`{wrap: dict}` when wrap is given: Microsoft's `{'model': state_dict}`)."""
    p = _Pickle()
    if wrap is not None:
        p.out.write(b'}')
        p._put()
        p.str(wrap)
    p.out.write(b'}')
    p._put()
    items = list(state.items())
    for start in range(0, len(items), 1000):   # the C pickler's batches: MARK .. SETITEMS, or one SETITEM alone
        batch = items[start:start + 1000]
        if len(items) > 1:
            p.out.write(b'(')
        for i, (k, a) in enumerate(batch, start):
            if not isinstance(k, str):
                raise ConversionError(f'state_dict key {k!r} is not a string')
            p.str(k)
            p.tensor(str(i), a)
        p.out.write(b'u' if len(items) > 1 else b's')
    if wrap is not None:
        p.out.write(b's')
    p.out.write(b'.')
    return p.out.getvalue()


def _check(k, a) -> np.ndarray:
    """The array as written: little-endian, C-contiguous; a dtype torch has no storage for is refused."""
    a = np.asarray(a)
    if a.dtype.byteorder == '>':
        a = a.astype(a.dtype.newbyteorder('<'))
    if a.dtype not in _TYPED and a.dtype not in _UNTYPED:
        raise ConversionError(f'{k}: dtype {a.dtype} has no torch equivalent')
    return a if a.flags.c_contiguous else a.copy(order='C')   # (np.ascontiguousarray makes a 0-d array 1-d)


def write_zip(state: Dict[str, np.ndarray], f, wrap: Optional[str] = None, archive: str = 'archive') -> None:
    """Write the .pth archive for `state` (`{wrap: state}` when wrap is given) to the open binary file `f`;
    arrays are written one at a time, straight from their memory."""
    arrays = {k: _check(k, v) for k, v in state.items()}
    pkl = state_pickle(arrays, wrap)
    with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
        def record(name, data: memoryview):
            name = f'{archive}/{name}'
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            zip64 = data.nbytes >= (1 << 31)
            start = f.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
            pad = -start % ALIGN
            info.extra = struct.pack('<HH', 0x4246, pad) + b'Z' * pad
            with z.open(info, 'w', force_zip64=zip64) as out:
                out.write(data)
        record('data.pkl', memoryview(pkl))
        record('.format_version', memoryview(b'1'))
        record('.storage_alignment', memoryview(str(ALIGN).encode()))
        record('byteorder', memoryview(b'little'))
        for i, a in enumerate(arrays.values()):
            record(f'data/{i}', memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b''))
        record('version', memoryview(b'3\n'))
        digest = int.from_bytes(hashlib.sha256(pkl).digest()[:16], 'big') % 10 ** 40
        record('.data/serialization_id', memoryview(f'{digest:040d}'.encode()))
