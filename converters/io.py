"""Reading and writing checkpoint files as flat dicts of numpy arrays, safely.

No pickle code ever runs: `.npz` is read with `allow_pickle=False`, torch files with
`weights_only=True`. Writes go to a temporary file beside the target and are renamed into place, so a
failed conversion leaves no partial output.
"""
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from contextlib import contextmanager
from typing import Dict

import ml_dtypes
import numpy as np

from .errors import ConversionError

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

def _fix_npz_dtype(a: np.ndarray) -> np.ndarray:
    # numpy has no bfloat16: such arrays are saved as 2-byte void and come back that way.
    if a.dtype.kind == 'V' and a.dtype.itemsize == 2:
        return a.view(ml_dtypes.bfloat16)
    return a


def read_npz(path: str) -> Dict[str, np.ndarray]:
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ConversionError(f'{path}: a single .npy array, not an .npz archive of named arrays')
        with z:
            return {k: _fix_npz_dtype(z[k]) for k in z.files}
    except FileNotFoundError:
        raise ConversionError(f'{path}: no such file') from None
    except ValueError as e:  # object arrays need pickle: refused
        raise ConversionError(f'{path}: refused to read: {e}') from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ConversionError(f'{path}: not a readable .npz file ({e})') from None


def _unwrap_state(obj, path):
    if isinstance(obj, dict):
        for key in ('model', 'state_dict', 'model_state', 'module'):
            if key in obj and isinstance(obj[key], dict):
                return _unwrap_state(obj[key], path)
        return obj
    raise ConversionError(f'{path}: expected a state_dict (a dict of tensors), found {type(obj).__name__}')


def _torch_to_numpy(t):
    import torch
    if t.dtype == torch.bfloat16:
        return t.detach().cpu().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.detach().cpu().numpy()


def read_torch(path: str) -> Dict[str, np.ndarray]:
    import torch
    if not os.path.exists(path):
        raise ConversionError(f'{path}: no such file')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' not in str(e).lower():
            raise ConversionError(f'{path}: not a readable torch file ({str(e).splitlines()[0][:120]})') from None
        # torch's own message suggests weights_only=False; we never unpickle arbitrary objects.
        raise ConversionError(f'{path}: holds pickled objects other than tensors and plain containers; '
                              f'refused (weights-only loading)') from None
    except Exception as e:  # noqa: BLE001 - torch raises many types; all mean "not a readable state_dict"
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConversionError(f'{path}: cannot load as a weights-only torch file: {msg}') from None
    state = _unwrap_state(obj, path)
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            continue  # e.g. a saved epoch counter or config beside the weights
        if not isinstance(k, str):
            raise ConversionError(f'{path}: state_dict key {k!r} is not a string')
        try:
            out[k.removeprefix('module.')] = _torch_to_numpy(v)
        except (TypeError, RuntimeError) as e:
            raise ConversionError(f'{path}: tensor {k!r} ({v.dtype}, {v.layout}) cannot be read: '
                                  f'{str(e).splitlines()[0]}') from None
    if not out:
        raise ConversionError(f'{path}: holds no tensors')
    return out


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file
    if not os.path.exists(path):
        raise ConversionError(f'{path}: no such file')
    try:
        return dict(load_file(path))
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f'{path}: not a readable .safetensors file ({e})') from None


def is_orbax_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ('_CHECKPOINT_METADATA', '_METADATA'))


def read_orbax(path: str) -> Dict[str, np.ndarray]:
    import absl.logging
    import jax
    import orbax.checkpoint as ocp
    absl.logging.set_verbosity(absl.logging.ERROR)  # orbax logs warnings that would break one-line errors
    from flax.traverse_util import flatten_dict
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise ConversionError(f'{path}: no such orbax checkpoint directory')
    if not is_orbax_dir(path):
        raise ConversionError(f'{path}: a directory, but not an orbax checkpoint (no _METADATA)')
    try:
        ckptr = ocp.PyTreeCheckpointer()
        meta = ckptr.metadata(path)
        meta = getattr(getattr(meta, 'item_metadata', None), 'tree', None) or meta
        # Restore as host numpy: a checkpoint saved sharded over 8 devices must read on a machine with one.
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = ckptr.restore(path, restore_args=args)
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ''
        raise ConversionError(f'{path}: not a readable orbax checkpoint ({type(e).__name__}: {msg[:200]})') from None
    if isinstance(tree, dict) and 'params' in tree and isinstance(tree['params'], dict):
        tree = tree['params']
    return {k: np.asarray(v) for k, v in flatten_dict(tree, sep='/').items()}


def read_file(path: str) -> Dict[str, np.ndarray]:
    """Any supported file -> its flat dict of arrays, keys as stored."""
    return {'npz': read_npz, 'torch': read_torch, 'safetensors': read_safetensors,
            'orbax': read_orbax}[file_format(path)](str(path))


# ---------------------------------------------------------------- writing

@contextmanager
def atomic_output(path: str, force: bool):
    """Yields a temporary path beside `path`; on success moves it into place.

    Refuses to replace an existing output without `force`, and never replaces a directory that is not an
    orbax checkpoint (a `--force` typo must not delete a folder of other files).
    """
    path = os.path.abspath(str(path).rstrip('/'))
    if os.path.exists(path):
        if not force:
            raise ConversionError(f'{path}: exists; pass --force to replace it')
        if os.path.isdir(path) and not is_orbax_dir(path):
            raise ConversionError(f'{path}: is a directory that is not an orbax checkpoint; refusing to replace it')
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConversionError(f'{path}: parent directory does not exist')
    try:
        tmpdir = tempfile.mkdtemp(prefix='.vit-flax-', dir=parent)
    except OSError as e:
        raise ConversionError(f'{path}: cannot write ({e.strerror})') from None
    tmp = os.path.join(tmpdir, os.path.basename(path))
    try:
        yield tmp
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        os.replace(tmp, path)
    except OSError as e:
        raise ConversionError(f'{path}: cannot write ({e.strerror or e})') from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def write_npz(arrays: Dict[str, np.ndarray], path: str, force: bool = False) -> None:
    with atomic_output(path, force) as tmp:
        with open(tmp, 'wb') as f:
            np.savez(f, **arrays)


def write_torch(state: Dict[str, np.ndarray], path: str, force: bool = False, wrap: str = None) -> None:
    import torch
    tensors = {k: _numpy_to_torch(v) for k, v in state.items()}
    with atomic_output(path, force) as tmp:
        torch.save({wrap: tensors} if wrap else tensors, tmp)


def _numpy_to_torch(a):
    import torch
    a = np.ascontiguousarray(a)
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def write_safetensors(state: Dict[str, np.ndarray], path: str, force: bool = False) -> None:
    from safetensors.torch import save_file
    with atomic_output(path, force) as tmp:
        save_file({k: _numpy_to_torch(v) for k, v in state.items()}, tmp)


def write_orbax(flat: Dict[str, np.ndarray], path: str, force: bool = False) -> None:
    import orbax.checkpoint as ocp
    from flax.traverse_util import unflatten_dict
    with atomic_output(path, force) as tmp:
        ckptr = ocp.PyTreeCheckpointer()
        ckptr.save(os.path.abspath(tmp), {'params': unflatten_dict(flat, sep='/')})
