"""Orbax checkpoint directories holding a params tree (`{'params': tree}` or the tree itself), read as host
numpy whatever the sharding they were saved with; sizes declared by the metadata are checked first."""
import io as stdio
import logging
import os
import re
from contextlib import contextmanager, redirect_stderr
from typing import Dict

import numpy as np

from . import mapped, paths
from ..errors import ConversionError, first_line
from .durable import atomic_output, is_orbax_dir


# What orbax and tensorstore raise on a missing or corrupt file (found by fuzzing, tests/durability/test_fuzz.py).
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


# zstd's largest ratio: a 128 KiB block of one repeated byte is an RLE block of 4 bytes (an all-zero float32
# array writes at ~18,000:1 with orbax's metadata around it)
MAX_RATIO = 32768


def directory_bytes(path: str) -> int:
    if paths.is_url(path):
        return sum(f.stat().length for f in paths.files(path))
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs
               if os.path.isfile(os.path.join(r, f)))


def read_orbax(path: str) -> Dict[str, np.ndarray]:
    with _quiet_orbax():
        return _read_orbax(path)


def _read_orbax(path: str) -> Dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict
    path = paths.resolve(path)
    if not paths.isdir(path):
        raise ConversionError(f'{path}: no such orbax checkpoint directory')
    if not (any(paths.exists(paths.join(path, f)) for f in ('_CHECKPOINT_METADATA', '_METADATA'))
            if paths.is_url(path) else is_orbax_dir(path)):
        raise ConversionError(f'{path}: a directory, but not an orbax checkpoint (no _METADATA)')
    ckptr = ocp.PyTreeCheckpointer()
    try:
        meta = ckptr.metadata(paths.epath(path))
        meta = getattr(getattr(meta, 'item_metadata', None), 'tree', None) or meta
    except ORBAX_FAILURES as e:
        raise ConversionError(f'{path}: not a readable orbax checkpoint ({type(e).__name__}: {first_line(e)})') from None
    # tensorstore allocates what the metadata declares (chunks may be compressed or absent): check it first,
    # against the machine and against the bytes on disk (zstd, orbax's codec, packs at most MAX_RATIO:1)
    leaves = [m for m in jax.tree_util.tree_leaves(meta) if hasattr(m, 'shape') and hasattr(m, 'dtype')]
    declared = sum(mapped.nbytes(tuple(m.shape), np.dtype(m.dtype)) for m in leaves)
    on_disk = directory_bytes(path)
    if declared > mapped.machine_memory():
        raise ConversionError(f'{path}: the metadata declares {declared:,} bytes of arrays, more than this '
                              f'machine\'s memory')
    if declared > MAX_RATIO * on_disk:
        raise ConversionError(f'{path}: the metadata declares {declared:,} bytes of arrays, more than its '
                              f'{on_disk:,} bytes on disk can hold ({MAX_RATIO}:1 at most; corrupt metadata?)')
    try:
        # Restore as host numpy: a checkpoint saved sharded over 8 devices must read on a machine with one.
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
        tree = ckptr.restore(paths.epath(path), restore_args=args)
    except ORBAX_FAILURES as e:
        raise ConversionError(f'{path}: not a readable orbax checkpoint ({type(e).__name__}: {first_line(e)})') from None
    if isinstance(tree, dict) and 'params' in tree and isinstance(tree['params'], dict):
        tree = tree['params']
    return {k: np.asarray(v) for k, v in flatten_dict(tree, sep='/').items()}



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
