"""PyTorch files (`.pth`/`.pt`/`.bin`): torch.save's zip archive or its legacy format, read without torch and
without running pickled code (torch_pickle.py builds nothing but tensors and containers; the legacy format
needs torch); written with torch.save where torch is installed, else by torch_zip.py (no torch).

A checkpoint wrapping its state_dict (`{'model': ...}`, `state_dict`, `model_state`, `module`) is unwrapped,
and DataParallel's `module.` prefix dropped.
"""
import pickle
import warnings
from typing import Dict

import ml_dtypes
import numpy as np

from . import mapped, torch_pickle, torch_zip
from ..errors import ConversionError, first_line
from ..optional import available
from .durable import atomic_output
from .mapped import release


def _unwrap_state(obj, path):
    if isinstance(obj, dict):
        for key in ('model', 'state_dict', 'model_state', 'module'):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state(obj[key], path)
        return obj
    if isinstance(obj, torch_pickle.Opaque):
        raise ConversionError(f'{path}: holds a pickled {obj.qualname} object, not a state_dict (its code was '
                              f'not run); save model.state_dict() instead')
    raise ConversionError(f'{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}')


_LEGACY_MAGIC = pickle.dumps(0x1950a86a20f9469cfc6c, protocol=2)[:-1]   # how torch's old format begins


def read_torch(path: str) -> Dict[str, np.ndarray]:
    path = str(path)
    mf = mapped.MappedFile(path)
    head = mf.bytes(0, min(mf.size, len(_LEGACY_MAGIC)))
    if head.startswith(b'PK'):
        obj, refused = torch_pickle.load(path, mf)
    elif head == _LEGACY_MAGIC:
        obj, refused = torch_pickle.load_legacy(path, mf)
    else:
        raise ConversionError(f'{path}: not a torch checkpoint: ' + (mapped.what_else(mf) or (
            f'binary data that is neither torch.save\'s zip archive nor its legacy format (it begins with bytes '
            f'{head[:8].hex(" ")})')))
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


def write_torch(state: Dict[str, np.ndarray], path: str, force: bool = False, wrap: str = None,
                use_torch: bool = None) -> None:
    """A `.pth` of `state` (`{wrap: state}` when wrap is given), atomically. With torch installed
    (use_torch=None) torch.save writes it; without torch (or use_torch=False) torch_zip.write_zip writes
    the same archive (its data.pkl and records equal torch.save's; torch.load(weights_only=True) and timm
    read it)."""
    if use_torch is None:
        use_torch = available('torch')
    if not use_torch:
        with atomic_output(path, force) as tmp, open(tmp, 'wb') as f:
            torch_zip.write_zip(state, f, wrap)
        return
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
