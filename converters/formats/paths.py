"""Paths that may be URLs: a local path, or any URL `etils.epath` opens (`gs://bucket/run` on a TPU pod).

A local path keeps its os.path behaviour: made absolute, and written atomically and durably through
`durable.atomic_output` (a temporary, fsync, rename). A URL is never handed to os.path, which would take
`gs://b/run` for a local folder named `gs:`; it goes through `etils.epath` (gcsfs for gs://, s3fs for s3://,
...). There a file is written in one piece with no temporary and no rename: an object store publishes an
object whole when its upload completes (a reader sees the old object or the new one), and its "rename" is
a copy and a delete. `move` of a folder on a URL is therefore a copy of each file and a delete.
"""
import os
from typing import List


def is_url(p) -> bool:
    """True for `scheme://...` (gs://, s3://, hf://, ...)."""
    return '://' in os.fspath(p)


def epath(p):
    """`etils.epath.Path` of a local path or a URL."""
    from etils import epath as ep
    return ep.Path(p)


def resolve(p) -> str:
    """A URL as given (without trailing slashes), a local path made absolute."""
    p = os.fspath(p)
    return p.rstrip('/') if is_url(p) else os.path.abspath(p)


def join(root, *names) -> str:
    """os.path.join for a local root; epath's join for a URL (`gs://b/run` + `x` -> `gs://b/run/x`)."""
    if is_url(root):
        return os.fspath(epath(root).joinpath(*names))
    return os.path.join(root, *names)


def dirname(p) -> str:
    return os.fspath(epath(p).parent) if is_url(p) else os.path.dirname(p)


def basename(p) -> str:
    return epath(p).name if is_url(p) else os.path.basename(p)


def isdir(p) -> bool:
    return epath(p).is_dir() if is_url(p) else os.path.isdir(p)


def isfile(p) -> bool:
    return epath(p).is_file() if is_url(p) else os.path.isfile(p)


def exists(p) -> bool:
    return epath(p).exists() if is_url(p) else os.path.exists(p)


def listdir(p) -> List[str]:
    """Names in a folder ([] when it is not one)."""
    if is_url(p):
        d = epath(p)
        return [c.name for c in d.iterdir()] if d.is_dir() else []
    return os.listdir(p) if os.path.isdir(p) else []


def makedirs(p) -> None:
    if is_url(p):
        epath(p).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(p, exist_ok=True)


def read_text(p) -> str:
    if is_url(p):
        return epath(p).read_text()
    with open(p) as f:
        return f.read()


def write_text(p, text: str) -> None:
    """Replace file `p` with `text` whole: locally atomic and durable (the old file or the new one, after a
    crash too), on a URL one upload (see the module docstring)."""
    if is_url(p):
        epath(p).write_text(text)
        return
    from .durable import atomic_output
    with atomic_output(p, force=True) as tmp, open(tmp, 'w') as f:
        f.write(text)


def write_bytes(p, data: bytes) -> None:
    if is_url(p):
        epath(p).write_bytes(data)
        return
    from .durable import atomic_output
    with atomic_output(p, force=True) as tmp, open(tmp, 'wb') as f:
        f.write(data)


def move(src, dst) -> None:
    """Rename a file or folder: os.replace locally (atomic); on a URL each file copied, then the source
    deleted (object stores have no folder rename)."""
    if not is_url(src):
        os.replace(src, dst)
        return
    s, d = epath(src), epath(dst)
    if not s.is_dir():
        s.rename(d)
        return
    for f in files(s):
        rel = os.fspath(f)[len(os.fspath(s)):].lstrip('/')
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        f.copy(d / rel, overwrite=True)
    s.rmtree()


def files(p):
    """Every file under folder `p` (epath.Paths, recursively; epath refuses `**` globs on object stores, and
    its walk gives a URL's folders without their scheme)."""
    for c in epath(p).iterdir():
        if c.is_dir():
            yield from files(c)
        else:
            yield c
