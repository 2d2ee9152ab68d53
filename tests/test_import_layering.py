"""The project's layers, read from its imports: no module imports from a layer above its own.

Every import of every project .py file counts, at the top or inside a function (a lazy import is still a
dependency), relative ones resolved to absolute module names. tests/ and benchmarks/ stand outside the
layering. Change the tables below, not the checker, when the layout changes.
"""
import ast
import os
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# top-level package or module -> layer, lowest first: a module may import from its own layer and below
LAYERS = {
    'vit_flax': 0,        # the models
    'converters': 1,      # checkpoint formats and conversion
    'vit_train': 2,       # training
    'vit_flax_cli': 3,    # the `vit-flax` command
    'train_flax': 4,      # the training script
}

# (package, forbidden): nothing in `package` imports `forbidden` or a module under it
FORBIDDEN = [
    ('vit_flax', 'torch'),
    ('converters.formats', 'converters.families'),
    ('converters.formats', 'converters.pipeline'),
    ('converters.formats', 'vit_flax'),
    # a format knows its files, not what they mean for a model: transformers_folder reads config.json and
    # weights, hf_transformers maps them to models through the families' `transformers` layouts
    ('converters.formats', 'converters.hf_transformers'),
    ('converters.formats', 'converters.checkpoint'),
    ('converters.formats', 'converters.sources'),
    # the read path one way: families <- checkpoint (what a read gives) <- sources (the table) <- pipeline
    ('converters.families', 'converters.checkpoint'),
    ('converters.families', 'converters.sources'),
    ('converters.families', 'converters.pipeline'),
    ('converters.families', 'converters.hf_transformers'),
    ('converters.checkpoint', 'converters.sources'),
    ('converters.checkpoint', 'converters.pipeline'),
    ('converters.sources', 'converters.pipeline'),
]

# (package, allowed): exceptions to FORBIDDEN
ALLOWED = [
    ('converters.formats', 'vit_flax.registry'),
]


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + '.')


def project_files(root: str):
    """(path relative to root, module name) of every .py file of the packages and modules in LAYERS (so not
    tests/ or benchmarks/), whichever of them exist."""
    for top in sorted(LAYERS):
        if os.path.isfile(os.path.join(root, top + '.py')):
            yield top + '.py', top
        for folder, dirs, files in os.walk(os.path.join(root, top)):
            dirs[:] = sorted(d for d in dirs if not d.startswith(('.', '__pycache__')))
            for f in sorted(files):
                if f.endswith('.py'):
                    rel = os.path.relpath(os.path.join(folder, f), root)
                    parts = rel[:-3].split(os.sep)
                    yield rel.replace(os.sep, '/'), '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def imports(path: str, module: str):
    """(line, imported module name) of every import in the file, at any depth; `from a import b` gives
    a.b (b may be a submodule: `from vit_flax import registry` is vit_flax.registry)."""
    is_package = os.path.basename(path) == '__init__.py'
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                package = module if is_package else module.rpartition('.')[0]
                parts = package.split('.') if package else []
                if node.level - 1 >= len(parts):   # beyond the top-level package: an ImportError, no layer
                    continue
                parts = parts[:len(parts) - (node.level - 1)]
                base = '.'.join(parts + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, base if alias.name == '*' else f'{base}.{alias.name}'


def violations(root: str):
    """One line per import against LAYERS or FORBIDDEN: 'file:line: module imports name (why)'."""
    found = []
    for rel, module in project_files(root):
        top = module.split('.')[0]
        for line, name in sorted(set(imports(os.path.join(root, rel), module))):
            target = name.split('.')[0]
            if target in LAYERS and LAYERS[target] > LAYERS[top]:
                found.append(f'{rel}:{line}: {module} imports {name} '
                             f'(layer {LAYERS[top]} {top} imports layer {LAYERS[target]} {target})')
            for package, forbidden in FORBIDDEN:
                if under(module, package) and under(name, forbidden) and not any(
                        under(module, p) and under(name, a) for p, a in ALLOWED):
                    found.append(f'{rel}:{line}: {module} imports {name} ({package} must not import {forbidden})')
    return found


def test_no_module_imports_from_a_higher_layer():
    found = violations(ROOT)
    assert not found, 'imports against the layering:\n' + '\n'.join(found)


def private_imports(root: str):
    """One line per import of a private name (`_x`) from another project module: what other modules use is
    public (a name without the underscore), so that a module's private helpers stay its own to change."""
    found = []
    for rel, module in project_files(root):
        for line, name in sorted(set(imports(os.path.join(root, rel), module))):
            owner, _, last = name.rpartition('.')
            if name.split('.')[0] in LAYERS and last.startswith('_') and not last.startswith('__') and owner != module:
                found.append(f'{rel}:{line}: {module} imports the private {name}')
    return found


def test_no_module_imports_another_modules_private_names(tmp_path):
    found = private_imports(ROOT)
    assert not found, 'private names used across modules:\n' + '\n'.join(found)
    write(tmp_path, {'converters/__init__.py': '', 'converters/a.py': 'def _x(): pass\n',
                     'converters/b.py': 'from .a import _x\nfrom . import a\n'})
    assert private_imports(str(tmp_path)) == ['converters/b.py:1: converters.b imports the private converters.a._x']


def test_every_packaged_module_has_a_layer():
    import tomllib
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        tool = tomllib.load(f)['tool']['setuptools']
    packaged = {p.split('.')[0] for p in tool.get('packages', [])} | set(tool.get('py-modules', []))
    assert packaged <= set(LAYERS), f'give these a layer in LAYERS: {sorted(packaged - set(LAYERS))}'
    folders = {os.path.relpath(folder, ROOT).replace(os.sep, '.') for top in LAYERS
               for folder, dirs, files in os.walk(os.path.join(ROOT, top)) if '__init__.py' in files}
    missing = folders - set(tool.get('packages', []))
    assert not missing, f'packages pyproject.toml does not install (add them to [tool.setuptools] packages): {missing}'


def write(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_checker_catches_planted_violations(tmp_path):
    write(tmp_path, {
        'vit_flax/__init__.py': '',
        'vit_flax/registry.py': '',
        'vit_flax/fine.py': 'import numpy\nfrom . import registry\n',
        'vit_flax/lazy.py': '''\
            import os


            def load():
                import torch
                from converters import rules
                return torch, rules
            ''',
        'converters/__init__.py': 'from .formats import npz\n',
        'converters/table.py': 'from vit_flax import registry\n',
        'converters/formats/__init__.py': '',
        'converters/formats/npz.py': 'from vit_flax.registry import create_model\nfrom vit_flax import registry\n',
        'converters/formats/bad.py': 'from .. import families\nfrom vit_flax import vit\nimport vit_train.data\n',
        'vit_train/__init__.py': 'import converters\nimport train_flax\n',
        'train_flax.py': 'import vit_train, converters, vit_flax\n',
        'tests/test_x.py': 'import train_flax\n',
        'benchmarks/b.py': 'import train_flax\n',
    })
    assert sorted(violations(str(tmp_path))) == [
        'converters/formats/bad.py:1: converters.formats.bad imports converters.families '
        '(converters.formats must not import converters.families)',
        'converters/formats/bad.py:2: converters.formats.bad imports vit_flax.vit '
        '(converters.formats must not import vit_flax)',
        'converters/formats/bad.py:3: converters.formats.bad imports vit_train.data '
        '(layer 1 converters imports layer 2 vit_train)',
        'vit_flax/lazy.py:5: vit_flax.lazy imports torch (vit_flax must not import torch)',
        'vit_flax/lazy.py:6: vit_flax.lazy imports converters.rules (layer 0 vit_flax imports layer 1 converters)',
        'vit_train/__init__.py:2: vit_train imports train_flax (layer 2 vit_train imports layer 4 train_flax)',
    ]
