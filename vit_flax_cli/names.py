"""The registered model names for `vit-flax list`, without importing the models (registering them imports
flax and jax: ~2 s here, against ~0.08 s for the whole command without them).

`model_names.txt` beside this module holds the names `vit_flax.list_models()` returns, one a line, after a
header line `# sources <sha256>`: the digest of the files that decide the registry (vit_flax/__init__.py,
vit_flax/registry.py and every .py file under vit_flax/models/, read as bytes in sorted path order). A list
is used only while that digest matches the installed sources; a stale one (a model added, the file not
regenerated) is ignored and the registry itself is imported, so `vit-flax list` is never wrong, only slower.
tests/test_lean.py checks that the list is current and equals the registry. Regenerate it with
`make names` (`python -m vit_flax_cli.names`) after changing the registry or the model files.
"""
import difflib
import fnmatch
import functools
import hashlib
import importlib.util
import os
from typing import List, Optional

LIST = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'model_names.txt')


def _package_dir() -> str:
    spec = importlib.util.find_spec('vit_flax')   # finds the package without running its __init__
    return spec.submodule_search_locations[0]


def sources_digest() -> str:
    """sha256 over the files that decide which names are registered (see the module docstring)."""
    root = _package_dir()
    paths = [os.path.join(root, '__init__.py'), os.path.join(root, 'registry.py')]
    for folder, dirs, files in os.walk(os.path.join(root, 'models')):
        dirs[:] = [d for d in dirs if d != '__pycache__']
        paths += [os.path.join(folder, f) for f in files if f.endswith('.py')]
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: os.path.relpath(p, root)):
        h.update(os.path.relpath(p, root).replace(os.sep, '/').encode() + b'\0')
        with open(p, 'rb') as f:
            h.update(f.read())
        h.update(b'\0')
    return h.hexdigest()


def read_list(path: str = LIST) -> Optional[List[str]]:
    """The stored names when the list is current for the installed sources, else None."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    if not lines or lines[0] != f'# sources {sources_digest()}':
        return None
    return [n for n in lines[1:] if n and not n.startswith('#')]


@functools.lru_cache(maxsize=1)
def registered() -> List[str]:
    """Every registered name, sorted: from model_names.txt when current, else from the registry."""
    names = read_list()
    if names is None:
        import vit_flax
        names = vit_flax.list_models()
    return sorted(names)


def list_models(pattern: str = '*') -> List[str]:
    """As `vit_flax.list_models(pattern)`: the names matching a shell-style pattern, sorted."""
    return [n for n in registered() if fnmatch.fnmatchcase(n, pattern)]


def similar_models(name: str, n: int = 5) -> List[str]:
    """As `vit_flax.registry.similar_models`: the closest names by difflib's ratio, best first."""
    return difflib.get_close_matches(name, registered(), n=n, cutoff=0.6)


def timm_names() -> frozenset:
    """timm's model names, read from vit_flax/timm_models.txt (as `vit_flax.registry.timm_names`)."""
    with open(os.path.join(_package_dir(), 'timm_models.txt')) as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith('#'))


def write_list(path: str = LIST) -> int:
    """Write model_names.txt from the registry itself; returns the number of names."""
    import vit_flax
    names = vit_flax.list_models()
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        f.write(f'# sources {sources_digest()}\n' + ''.join(n + '\n' for n in names))
    os.replace(tmp, path)
    return len(names)


if __name__ == '__main__':
    print(f'{LIST}: {write_list()} names')
