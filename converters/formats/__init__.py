"""Reading and writing checkpoint files as flat dicts of numpy arrays, safely.

No pickle code ever runs: `.npz` members must be plain numeric arrays, and torch files are unpickled by
a loader that builds nothing but tensors and containers (torch_pickle.py). Declared sizes are checked
against the file before anything is allocated (mapped.py). Writes are atomic and durable (durable.py): a
failed or killed conversion leaves no partial output and never damages an existing one.
"""
import os
from typing import Dict

import numpy as np

from ..errors import ConversionError
from .mapped import detach, release  # noqa: F401  (re-exported: the readers' arrays are views to release)

TORCH_EXTS = ('.pth', '.pt', '.bin')


def file_format(path: str) -> str:
    """'npz', 'torch', 'safetensors', 'msgpack' (transformers' Flax files) or 'orbax' (a directory), from the
    path alone."""
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
    if ext == '.msgpack':
        return 'msgpack'
    if ext == '':
        return 'orbax'  # a directory to be written
    raise ConversionError(f'{path}: unknown checkpoint extension {ext!r} '
                          f'(expected .npz, .pth/.pt/.bin, .safetensors, .msgpack or a directory for orbax)')


def output_format(path: str) -> str:
    """`file_format` of a path to write: transformers' Flax msgpack files are read, never written."""
    fmt = file_format(path)
    if fmt == 'msgpack':
        raise ConversionError(f'{path}: .msgpack (transformers\' former Flax checkpoints) is read, not written; '
                              f'write .npz, .safetensors, .pth or an orbax directory')
    return fmt


# ---------------------------------------------------------------- dispatch by format
# Readers return read-only arrays that are views of a memory map of the file where the format allows
# (see mapped.py): sizes are checked against the file before anything is allocated. Every writer goes
# through `atomic_output` (durable.py): temporary beside the target, fsynced, renamed. Arrays are written
# one at a time and released as they go, so a conversion's memory stays near the size of what it has
# produced rather than source plus output.

def read_file(path: str) -> Dict[str, np.ndarray]:
    """Any supported file -> its flat dict of arrays, keys as stored."""
    return {'npz': read_npz, 'torch': read_torch, 'safetensors': read_safetensors, 'msgpack': read_msgpack,
            'orbax': read_orbax}[file_format(path)](str(path))


# The readers and writers, one module per format (imported here: none of them imports jax or torch until used).
from .hf_flax import read_msgpack  # noqa: E402
from .npz import read_npz, write_npz  # noqa: E402
from .orbax import read_orbax, write_orbax  # noqa: E402
from .safetensors import read_safetensors, write_safetensors  # noqa: E402
from .torch import read_torch, write_torch  # noqa: E402
