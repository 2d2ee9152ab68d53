"""Atomic, durable outputs: a checkpoint on disk is always the old one, whole, or the new one, whole.

A write goes to `.vit-flax-XXXXXXXX/<name>` in the target's own folder (same filesystem, so the final
rename is atomic). When the writer is done, every file and folder it made is fsynced, the result is
renamed over the target (a folder is swapped in with `renameat2(RENAME_EXCHANGE)`, so an existing
checkpoint folder stays whole until that instant), and the target's folder is fsynced so the rename
itself survives a power cut. An existing output is replaced only with `force`.

A writer killed half-way (SIGKILL, power loss) leaves its `.vit-flax-*` folder behind. The writer holds
an exclusive `flock` on that folder while it works; the next write into the same folder removes every
`.vit-flax-*` folder whose lock it can take, i.e. whose writer is gone, and leaves alone those of writers
still running.
"""
import ctypes
import errno
import os
import shutil
import tempfile
import time
from contextlib import contextmanager

from ..errors import ConversionError

try:
    import fcntl
except ImportError:   # not POSIX: no locks, and no cleaning of others' temporaries
    fcntl = None

PREFIX = '.vit-flax-'
_RENAME_EXCHANGE = 2


def fsync_tree(path: str) -> None:
    """fsync a file, or every file and folder under a folder (folders after their contents)."""
    if os.path.isdir(path):
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                _fsync(os.path.join(root, name), os.O_RDONLY)
            _fsync(root, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    else:
        _fsync(path, os.O_RDONLY)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):   # a folder on a filesystem that cannot sync one
            raise
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2); False when the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _lock(fd: int, blocking: bool) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def clean_stale(parent: str) -> list:
    """Remove the `.vit-flax-*` folders in `parent` left by writers that no longer run. Returns their paths."""
    removed = []
    if fcntl is None:
        return removed
    try:
        names = [n for n in os.listdir(parent) if n.startswith(PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
        except OSError:
            continue   # gone meanwhile, or not a folder: not ours
        try:
            if _lock(fd, blocking=False):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        finally:
            os.close(fd)
    return removed


def _locked_tempdir(parent: str):
    """(path, fd) of a fresh temporary folder in `parent`, locked by this process."""
    for _ in range(10):
        path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
        _lock(fd, blocking=True)
        try:   # a cleaner may have taken it in the instant before the lock: then start again
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return path, fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EEXIST, 'cannot create a temporary folder', parent)


def is_orbax_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ('_CHECKPOINT_METADATA', '_METADATA'))


# What a timm model folder written by us (or by timm's save_for_hf) holds: such a folder may be replaced.
MODEL_FOLDER_FILES = frozenset({'config.json', 'model.safetensors', 'pytorch_model.bin', 'class_indices.json',
                                'README.md'})


def is_replaceable_model_folder(path: str) -> bool:
    """A folder holding config.json and nothing but the files a model folder is written with
    (MODEL_FOLDER_FILES): one `--force` may replace as a whole."""
    try:
        names = set(os.listdir(path))
    except OSError:
        return False
    return 'config.json' in names and names <= MODEL_FOLDER_FILES


@contextmanager
def atomic_output(path: str, force: bool):
    """Yields a temporary path beside `path`; when the block succeeds, that becomes `path` atomically.

    Refuses to replace an existing output without `force`, and never replaces a folder that is not an
    orbax checkpoint (a `--force` typo must not delete a folder of other files). On any failure the
    temporary is removed and an existing `path` is untouched.
    """
    path = os.path.abspath(str(path).rstrip('/'))
    if os.path.lexists(path):
        if not force:
            raise ConversionError(f'{path}: exists; pass --force to replace it')
        if os.path.isdir(path) and not is_orbax_dir(path) and not is_replaceable_model_folder(path):
            raise ConversionError(f'{path}: is a directory that is not an orbax checkpoint or a model folder; '
                                  f'refusing to replace it')
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ConversionError(f'{path}: parent directory does not exist')
    try:
        clean_stale(parent)
        tmpdir, fd = _locked_tempdir(parent)
    except OSError as e:
        raise ConversionError(f'{path}: cannot write ({e.strerror or e})') from None
    tmp = os.path.join(tmpdir, os.path.basename(path))
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise OSError(errno.ENOENT, 'the writer produced nothing', tmp)
        fsync_tree(tmp)
        if os.path.isdir(tmp) and os.path.lexists(path):
            # a folder cannot be renamed over another: swap them in one step, the old one lands in tmpdir
            if not _exchange(tmp, path):   # no such call here: a short window with nothing at `path`
                os.replace(path, os.path.join(tmpdir, 'old'))
                os.replace(tmp, path)
        else:
            os.replace(tmp, path)
        _fsync(parent, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    except OSError as e:
        raise ConversionError(f'{path}: cannot write ({e.strerror or e})') from None
    finally:
        _remove(tmpdir)
        os.close(fd)


def _remove(path: str, patience: float = 2.0) -> None:
    """rmtree that outlasts a library thread still writing into the folder (orbax's, after a failed save).
    What it cannot remove in time is stale once our lock goes, and the next write removes it."""
    deadline = time.monotonic() + patience
    while True:
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.lexists(path) or time.monotonic() > deadline:
            return
        time.sleep(0.05)
