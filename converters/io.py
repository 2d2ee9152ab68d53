"""Reading and writing checkpoint files as flat dicts of numpy arrays, safely.

No pickle code ever runs: `.npz` members must be plain numeric arrays, and torch files are unpickled by
a loader that builds nothing but tensors and containers (torchfile.py). Declared sizes are checked
against the file before anything is allocated (mapped.py). Writes are atomic and durable (durable.py): a
failed or killed conversion leaves no partial output and never damages an existing one.
"""
import io as stdio
import json
import logging
import os
import pickle
import re
import struct
import warnings
import zipfile
from contextlib import contextmanager, redirect_stderr
from typing import Dict

import ml_dtypes
import numpy as np

from . import mapped, torchfile
from .durable import atomic_output, is_orbax_dir
from .errors import ConversionError, first_line

TORCH_EXTS = ('.pth', '.pt', '.bin')


def file_format(path: str) -> str:
    """'npz', 'torch', 'safetensors' or 'orbax' (a directory), from the path alone."""
    p = str(path).rstrip('/')
    if os.path.isdir(p):
        return 'orbax'
    ext = os.path.splitext(p)[1].lower()
    if ext == '.npz':
        return 'npz'
    if ext in TORCH_EXTS:
        return 'torch'
    if ext == '.safetensors':
        return 'safetensors'
    if ext == '':
        return 'orbax'  # a directory to be written
    raise ConversionError(f'{path}: unknown checkpoint extension {ext!r} '
                          f'(expected .npz, .pth/.pt/.bin, .safetensors or a directory for orbax)')


# ---------------------------------------------------------------- reading
# Readers return read-only arrays that are views of a memory map of the file where the format allows
# (see mapped.py): sizes are checked against the file before anything is allocated.

release, detach = mapped.release, mapped.detach


def read_npz(path: str) -> Dict[str, np.ndarray]:
    return mapped.read_npz(str(path))


def _unwrap_state(obj, path):
    if isinstance(obj, dict):
        for key in ('model', 'state_dict', 'model_state', 'module'):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state(obj[key], path)
        return obj
    if isinstance(obj, torchfile.Opaque):
        raise ConversionError(f'{path}: holds a pickled {obj.qualname} object, not a state_dict (its code was '
                              f'not run); save model.state_dict() instead')
    raise ConversionError(f'{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}')


_LEGACY_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]   # how torch's old format begins


def read_torch(path: str) -> Dict[str, np.ndarray]:
    path = str(path)
    mf = mapped.MappedFile(path)
    head = mf.bytes(0, min(mf.size, len(_LEGACY_MAGIC)))
    if head.startswith(b'PK'):
        obj, refused = torchfile.load(path, mf)
    elif head == _LEGACY_MAGIC:
        obj, refused = torchfile.load_legacy(path, mf)
    else:
        raise ConversionError(f'{path}: not a torch checkpoint (neither torch.save\'s zip archive nor its legacy format)')
    state = _unwrap_state(obj, path)
    out = {}
    for k, v in state.items():
        if not isinstance(v, np.ndarray):
            continue  # e.g. a saved epoch counter or config beside the weights
        if not isinstance(k, str):
            raise ConversionError(f'{path}: state_dict key {k!r} is not a string')
        out[k.removeprefix('module.')] = v
    if not out:
        skipped = f' (refused to load pickled {", ".join(sorted(refused)[:3])}: their code did not run)' if refused else ''
        raise ConversionError(f'{path}: holds no tensors{skipped}')
    return out


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    return mapped.read_safetensors(str(path))


# What orbax and tensorstore raise on a missing or corrupt file (found by fuzzing, tests/test_fuzz.py).
ORBAX_FAILURES = (ValueError, OSError, KeyError, TypeError, RuntimeError, AttributeError, IndexError)


@contextmanager
def _quiet_orbax():
    """Orbax and tensorstore report a failure several times over: absl and asyncio log records with
    tracebacks, and tracebacks printed from their threads. What went wrong reaches us as the exception
    raised, so all of that is held back while they run (it would break one-line errors)."""
    loggers = [logging.getLogger(n) for n in ('absl', 'asyncio')]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        with redirect_stderr(stdio.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def read_orbax(path: str) -> Dict[str, np.ndarray]:
    with _quiet_orbax():
        return _read_orbax(path)


def _read_orbax(path: str) -> Dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f'{path}: no such orbax checkpoint directory')
    if not is_orbax_dir(path):
        raise ConversionError(f'{path}: a directory, but not an orbax checkpoint (no _METADATA)')
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(path)
        meta = getattr(getattr(meta, 'item_metadata', None), 'tree', None) or meta
    except ORBAX_FAILURES as e:
        raise ConversionError(f'{path}: not a readable orbax checkpoint ({type(e).__name__}: {first_line(e)})') from None
    # tensorstore allocates what the metadata declares (chunks may be compressed or absent): check it first
    leaves = [m for m in jax.tree_util.tree_leaves(meta) if hasattr(m, 'shape') and hasattr(m, 'dtype')]
    declared = sum(mapped.nbytes(tuple(m.shape), np.dtype(m.dtype)) for m in leaves)
    if declared > mapped.machine_memory():
        raise ConversionError(f'{path}: the metadata declares {declared:,} bytes of arrays, more than this '
                              f'machine\'s memory')
    try:
        # Restore as host numpy: a checkpoint saved sharded over 8 devices must read on a machine with one.
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = ckptr.restore(path, restore_args=args)
    except ORBAX_FAILURES as e:
        raise ConversionError(f'{path}: not a readable orbax checkpoint ({type(e).__name__}: {first_line(e)})') from None
    if isinstance(tree, dict) and 'params' in tree and isinstance(tree['params'], dict):
        tree = tree['params']
    return {k: np.asarray(v) for k, v in flatten_dict(tree, sep='/').items()}


def read_file(path: str) -> Dict[str, np.ndarray]:
    """Any supported file -> its flat dict of arrays, keys as stored."""
    return {'npz': read_npz, 'torch': read_torch, 'safetensors': read_safetensors,
            'orbax': read_orbax}[file_format(path)](str(path))


# ---------------------------------------------------------------- writing
# Every writer goes through `atomic_output` (durable.py): temporary beside the target, fsynced, renamed.
# Arrays are written one at a time and released as they go, so a conversion's memory stays near the
# size of what it has produced rather than source plus output.

def write_npz(arrays: Dict[str, np.ndarray], path: str, force: bool = False) -> None:
    """What `np.savez` writes (stored zip64 members `KEY.npy`), streamed array by array."""
    with atomic_output(path, force) as tmp, open(tmp, 'wb') as f:
        with zipfile.ZipFile(f, 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
            for k, v in arrays.items():
                with z.open(k + '.npy', 'w', force_zip64=True) as m:
                    np.lib.format.write_array(m, np.asarray(v, order='C'), allow_pickle=False)
                release(v)


_TORCH_VIEWS = {np.dtype(ml_dtypes.bfloat16): ('bfloat16', np.int16),
                np.dtype(ml_dtypes.float8_e4m3fn): ('float8_e4m3fn', np.uint8),
                np.dtype(ml_dtypes.float8_e5m2): ('float8_e5m2', np.uint8)}


def _numpy_to_torch(a):
    import torch
    a = np.require(a, requirements=['C', 'A'])   # torch wants aligned, contiguous memory
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder('='))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # read-only views of a mapped source: torch.save only reads them
        if a.dtype in _TORCH_VIEWS:
            name, as_int = _TORCH_VIEWS[a.dtype]
            return torch.from_numpy(a.view(as_int)).view(getattr(torch, name))
        return torch.from_numpy(a)


def write_torch(state: Dict[str, np.ndarray], path: str, force: bool = False, wrap: str = None) -> None:
    import torch
    tensors = {}
    for k, v in state.items():
        tensors[k] = _numpy_to_torch(v)
        release(v)
    with atomic_output(path, force) as tmp:
        try:
            torch.save({wrap: tensors} if wrap else tensors, tmp)
        except RuntimeError as e:   # how torch's C++ zip writer (inline_container.cc) reports a failed write
            if 'inline_container' not in str(e) and 'PytorchStreamWriter' not in str(e):
                raise
            raise OSError(f'torch.save failed: {first_line(e)}') from None


_SAFETENSORS_CODES = {v: k for k, v in mapped.SAFETENSORS_DTYPES.items()}


def write_safetensors(state: Dict[str, np.ndarray], path: str, force: bool = False) -> None:
    """The safetensors format, streamed (the library's writers first copy every tensor into one buffer)."""
    header, offset = {'__metadata__': {'format': 'pt'}}, 0
    names = sorted(state, key=lambda k: (-np.dtype(state[k].dtype).itemsize, k))   # keeps every tensor aligned
    for k in names:
        dtype = np.dtype(state[k].dtype).newbyteorder('=')
        if dtype not in _SAFETENSORS_CODES:
            raise ConversionError(f'{path}: tensor {k!r}: safetensors cannot hold dtype {dtype}')
        n = state[k].size * dtype.itemsize
        header[k] = {'dtype': _SAFETENSORS_CODES[dtype], 'shape': list(state[k].shape), 'data_offsets': [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)
    with atomic_output(path, force) as tmp, open(tmp, 'wb') as f:
        f.write(struct.pack('<Q', len(blob)) + blob)
        for k in names:
            a = state[k]
            if a.dtype.byteorder == '>' or (a.dtype.byteorder == '=' and not np.little_endian):
                a = a.astype(a.dtype.newbyteorder('<'))
            for chunk in mapped.iter_chunks(a):
                f.write(chunk)
            release(state[k])


def write_orbax(flat: Dict[str, np.ndarray], path: str, force: bool = False) -> None:
    import orbax.checkpoint as ocp
    from flax.traverse_util import unflatten_dict
    with atomic_output(path, force) as tmp:
        try:
            with _quiet_orbax():
                ocp.PyTreeCheckpointer().save(os.path.abspath(tmp), {'params': unflatten_dict(flat, sep='/')})
        except ValueError as e:   # tensorstore's failed writes: ValueError('OUT_OF_RANGE: Error writing ...')
            if not _TENSORSTORE_STATUS.match(str(e)):
                raise
            code = re.search(r"os_error_code='(\d+)'", str(e))
            raise (OSError(int(code.group(1)), os.strerror(int(code.group(1)))) if code else OSError(first_line(e))) \
                from None


_TENSORSTORE_STATUS = re.compile(r'^(OUT_OF_RANGE|RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNAVAILABLE|DATA_LOSS|'
                                 r'UNKNOWN|INTERNAL|FAILED_PRECONDITION|ABORTED|NOT_FOUND|ALREADY_EXISTS): ')
