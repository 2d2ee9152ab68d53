"""The project's one restricted unpickler: a pickle is walked before it is loaded, and loaded with an allow-list.

Used for torch.save's data.pkl (torch_pickle.py, which adds tensor rebuilding and inert stand-ins for the
globals it does not know) and for the CIFAR python batches (vit_train.data, through `load_plain`).

1. `prescan(data)` walks the stream opcode by opcode with `pickletools.genops`, which executes nothing and
   allocates no more than the opcode arguments present in the stream: a truncated or malformed stream is
   refused here, and so is a memo index (PUT/GET and their binary forms) larger than the number of opcodes
   read so far plus a little: the C unpickler grows its memo table to the index it is given before it checks
   anything, so a 4-byte `LONG_BINPUT 139143180` in a file of a few KB would allocate ~1.1 GB of pointers
   (a 4-byte index up to 32 GB). A memo index can only legitimately refer to an earlier PUT, so it is at most
   the opcode count.
2. `RestrictedUnpickler.find_class` hands out only the callables named in its `allowed` table
   ({'module.name': object}); any other global goes to `refuse(module, name)`, which raises (a subclass may
   return an inert stand-in instead). Nothing named in a pickle is imported.
3. `load(data, unpickler)` runs both and turns every way a damaged stream fails into `Malformed`
   (a ConversionError; the caller names the file).

`load_plain(data)` reads plain data: dicts, lists, tuples, bytes, str, numbers, and numpy arrays of plain
numeric dtypes (rebuilt from their raw bytes after checking shape x itemsize == len(bytes); object arrays and
every other class are refused).
"""
import io
import math
import pickle
import pickletools
from typing import Callable, Dict

import numpy as np

from ..errors import ConversionError, first_line

_MEMO_OPS = {'PUT', 'BINPUT', 'LONG_BINPUT', 'GET', 'BINGET', 'LONG_BINGET'}
MEMO_SLACK = 16


class Malformed(ConversionError):
    """A stream that is not a readable pickle; the message is the reason (the caller adds the file)."""


class Refused(ConversionError):
    """A pickle that names a global outside the allow-list."""


def prescan(data: bytes) -> None:
    """Walk the pickle without executing it; ValueError for a malformed stream or an absurd memo index."""
    n = 0
    for op, arg, _ in pickletools.genops(data):
        n += 1
        if op.name in _MEMO_OPS and (type(arg) is not int or arg > n + MEMO_SLACK):
            raise ValueError(f'memo index {arg!r} at opcode {n}')
        if op.name == 'PROTO' and arg > pickle.HIGHEST_PROTOCOL:
            raise ValueError(f'unsupported pickle protocol {arg}')


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler over bytes whose globals come from `allowed` only; others go to `refuse`."""
    allowed: Dict[str, object] = {}

    def __init__(self, data: bytes, encoding: str = 'ASCII'):
        super().__init__(io.BytesIO(data), encoding=encoding)

    def find_class(self, module, name):
        full = f'{module}.{name}'
        if full in self.allowed:
            return self.allowed[full]
        return self.refuse(module, name)

    def refuse(self, module: str, name: str):
        raise Refused(f'refused to load {module}.{name} (only containers, bytes, str, numbers and plain numeric '
                      f'arrays are read)')


_LOAD_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError, RecursionError, MemoryError, UnicodeDecodeError)


def load(data: bytes, unpickler: Callable[[bytes], pickle.Unpickler]):
    """prescan(data), then unpickler(data).load(). ConversionErrors raised while loading (refusals, a
    subclass' checks) pass through; every other failure becomes Malformed(reason)."""
    try:
        prescan(data)
        return unpickler(data).load()
    except ConversionError:
        raise
    except _LOAD_ERRORS as e:
        raise Malformed(first_line(e)) from None


# ---------------------------------------------------------------- plain data with numeric numpy arrays

_NUMERIC = {'b1', 'u1', 'u2', 'u4', 'u8', 'i1', 'i2', 'i4', 'i8', 'f2', 'f4', 'f8'}


class _DType:
    """Stand-in for numpy.dtype during unpickling: only plain numeric dtypes are accepted."""

    def __init__(self, name, align=False, copy=True):
        name = name.decode() if isinstance(name, bytes) else str(name)
        if name not in _NUMERIC:
            raise Refused(f'refused dtype {name[:40]!r} (only plain numeric arrays are read)')
        self.name, self.order = name, '|'

    def __setstate__(self, state):
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else '|'
        self.order = order.decode() if isinstance(order, bytes) else order

    def dtype(self):
        return np.dtype(self.name).newbyteorder('>' if self.order == '>' else '<')


class _Array:
    """Stand-in for numpy.ndarray: rebuilt from (version, shape, dtype, fortran, raw bytes) only, after
    checking that the shape's element count times the itemsize is the number of bytes present."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], _DType)
                and isinstance(state[1], tuple)):
            raise Refused('refused: malformed array state')
        _, shape, dtype, fortran, raw = state
        raw = raw.encode('latin1') if isinstance(raw, str) else raw
        if not isinstance(raw, (bytes, bytearray)) or not all(type(s) is int and s >= 0 for s in shape):
            raise Refused('refused: array data is not raw bytes')
        dt = dtype.dtype()
        if len(raw) != math.prod(shape) * dt.itemsize:
            raise Malformed(f'array of shape {tuple(shape)} {dt} does not match its {len(raw)} bytes')
        self.array = np.frombuffer(raw, dt).reshape(shape, order='F' if fortran else 'C').astype(dt.newbyteorder('='))


def _reconstruct(cls, shape, typecode):
    if cls is not _Array:
        raise Refused('refused: _reconstruct of something other than an ndarray')
    return _Array()


def _frombuffer(buf, dtype, shape, order):
    if not isinstance(dtype, _DType) or not isinstance(shape, tuple):
        raise Refused('refused: malformed array')
    a = _Array()
    a.__setstate__((1, shape, dtype, order == 'F', bytes(buf)))
    return a


def latin1(text, encoding='latin1'):
    """_codecs.encode as protocol-2 pickles of Python 3 bytes use it: latin1 text to bytes, nothing else."""
    if not isinstance(text, str) or encoding not in ('latin1', 'latin-1'):
        raise Refused('refused: _codecs.encode other than latin1 text')
    return text.encode('latin1')


class PlainUnpickler(RestrictedUnpickler):
    allowed = {
        'numpy.core.multiarray._reconstruct': _reconstruct,
        'numpy._core.multiarray._reconstruct': _reconstruct,
        'numpy.core.numeric._frombuffer': _frombuffer,
        'numpy._core.numeric._frombuffer': _frombuffer,
        'numpy.ndarray': _Array,
        'numpy.dtype': _DType,
        '_codecs.encode': latin1,
    }


def _unwrap(obj):
    if isinstance(obj, _Array):
        return obj.array
    if isinstance(obj, _DType):
        return obj.dtype()
    if isinstance(obj, dict):
        return {_unwrap(k): _unwrap(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(v) for v in obj)
    return obj


def load_plain(data: bytes, encoding: str = 'bytes'):
    """Plain data from a pickle (see the module docstring); `encoding='bytes'` reads Python 2's pickles (the
    CIFAR batches) with their str as bytes. Raises Refused or Malformed (ConversionErrors without the file)."""
    try:
        return _unwrap(load(data, lambda d: PlainUnpickler(d, encoding=encoding)))
    except RecursionError as e:   # _unwrap of a deeply nested list
        raise Malformed(first_line(e)) from None
