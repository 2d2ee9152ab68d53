"""Session settings (set before any test imports jax or torch) and fixtures; the shared helpers are in helpers.py.

Without torch (`make test-lean`, VIT_FLAX_LEAN=1): a test file whose module-level imports reach torch, timm,
torchvision or vit_pytorch (directly or through the test modules it imports, helpers.py and the like) is not
collected, and a test whose own body imports one (or calls a helper of TORCH_HELPERS) is skipped. With torch,
all of these carry the `torch` marker (`-m 'not torch'` selects what the lean run runs). The lean run ends by
saying what it ran and what it left out, and fails unless torch stayed absent and every file of LEAN_FILES
ran with at least one test passed.
"""
import ast
import functools
import importlib.util
import os
import sys
import tempfile

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
# XLA's optimisation passes off for the tests and the processes they start (as the training tests' runs had it
# already): compiling is most of a test's cost here (a file of model tests: 86 s -> 73 s), and every comparison
# is between programs compiled the same way or against another library's numbers at a stated tolerance. The files
# of OPTIMIZED look at what XLA makes of a program (its dots, its memory), or compare with torch bit for bit, and
# compile with the passes on.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# (and the two files that hold our arithmetic to torch's bit for bit: the EMA update, the erasing fill); a test
# elsewhere that needs them carries the `xla_passes` marker.
OPTIMIZED = ('tests/xla/', 'tests/test_hlo_breakdown.py', 'tests/models/test_splash.py',
             'tests/training/test_recipe_ema.py', 'tests/training/test_augment_pipeline.py')

import jax
import pytest

# XLA:CPU's older (elemental IR) emitters instead of its fusion emitters, for the tests and the processes they
# start (they inherit os.environ; tests/helpers.py's xla_flags keeps it where a test sets its own XLA_FLAGS).
# With the passes off they compile 2-3x faster (a depth-1 ViT's AdamW step 8 -> 2.4 s, a tiny Swin's 12 -> 3-4.5 s
# here) and run what they compiled up to ~20% slower: a gain where a program is compiled once and run a few times,
# as in most tests. Every comparison is between programs compiled alike or with torch at a stated tolerance; the
# bit-for-bit ones with torch (EMA, erasing) pass with them too. Read when the backend starts, not at `import jax`.
# jaxlib 0.10 only: the flag is gone by 0.12 (the lean and TPU venvs), and XLA aborts on a flag it does not know.
if (0, 10) <= jax.__version_info__[:2] < (0, 11) and \
        'xla_cpu_use_fusion_emitters' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_use_fusion_emitters=false').strip()

TORCH_PACKAGES = ('torch', 'timm', 'torchvision', 'vit_pytorch')
HAVE_TORCH = importlib.util.find_spec('torch') is not None
LEAN = os.environ.get('VIT_FLAX_LEAN') == '1'
if LEAN and HAVE_TORCH:
    pytest.exit('VIT_FLAX_LEAN=1 (make test-lean) but torch is installed in this venv', returncode=1)

jax.config.update('jax_default_matmul_precision', 'highest')
if HAVE_TORCH:
    import torch
    # the cores shared among pytest-xdist's workers (`make test` runs two)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))))

# The suite builds the same few models over and over (a new module instance is a new function to jax.jit,
# compiled again): a persistent compilation cache for this run turns every repeat into a lookup (~10 s -> ~2 s
# for a small ViT here). The test processes only, pytest-xdist's workers sharing one (named by the run's id;
# the controller removes it at the end). Subprocesses (killed writers, two-process training, the CLI's own
# process) compile for themselves, so no process is killed half-way through writing an entry; a worker that
# reads an entry the other is still writing is warned by jax and compiles instead (filtered in pyproject.toml).
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# The run's id: the controller (or a run without workers) draws it and its workers inherit it (they start after
# this file is imported), so that the controller removes what the workers made (xdist's own run id is the
# workers' only: named by it, every `make test` left its cache behind in the temp folder).
if os.environ.get('PYTEST_XDIST_WORKER'):
    _run = os.environ.get('VIT_FLAX_TEST_RUN') or os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'pid{os.getpid()}'
else:
    import uuid
    _run = os.environ['VIT_FLAX_TEST_RUN'] = uuid.uuid4().hex
# what a test file makes once for the whole run, shared by the workers (made_once below)
SHARED = os.path.join(tempfile.gettempdir(), f'vit-flax-tests-shared-{_run}')
JAX_CACHE = None
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    JAX_CACHE = os.path.join(tempfile.gettempdir(), f'vit-flax-tests-jax-cache-{_run}')
    os.makedirs(JAX_CACHE, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', JAX_CACHE)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config):
    if not os.environ.get('PYTEST_XDIST_WORKER'):   # the controller, or a run without workers
        import shutil
        for d in (JAX_CACHE, SHARED):
            if d:
                shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope='session')
def made_once():
    """made_once(name, make) -> (folder, what make returned): `make(folder)` run once per `make test` run, by
    whichever pytest-xdist worker asks first (the other waits for it, on a file lock), for what several test
    files build the same way (test_train.py's and test_train_faults.py's reference run: one training process,
    not one per worker). `make` returns a str (a process's output, say), kept beside the folder. A `make` that
    fails leaves nothing made: the next to ask tries again."""
    import fcntl
    import pathlib
    import shutil

    def once(name, make):
        folder = pathlib.Path(SHARED) / name
        done = folder.with_name(name + '.made')
        os.makedirs(SHARED, exist_ok=True)
        with open(folder.with_name(name + '.lock'), 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir()
                out = make(folder)
                done.write_text(out if isinstance(out, str) else '')
        return folder, done.read_text()
    return once


# Disk: the suite writes ~6 GB of checkpoints (real ViT-S/B weights in every format), and a full disk fails the
# run (CI did, at 328 s). A passed test's tmp_path goes at its teardown (pyproject.toml's
# tmp_path_retention_policy); a test file's own folders (tmp_path_factory.mktemp in its module fixtures) go when the
# file is done unless one of its tests failed, so the peak is one file's, not the run's. The XLA caches stay:
# test_train_faults.py reuses test_train.py's on the same worker.
_FAILED_MODULES = set()


@pytest.fixture(autouse=True, scope='module')
def _module_folders_removed_when_done(request, tmp_path_factory):
    import shutil
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    yield
    if request.node.nodeid in _FAILED_MODULES:
        return
    for name in set(os.listdir(base)) - before:
        if not name.startswith('xla_cache'):
            shutil.rmtree(base / name, ignore_errors=True)


@pytest.fixture(autouse=True, scope='module')
def _xla_passes_as_the_file_needs(request):
    """The files of OPTIMIZED compile with XLA's passes on (and so do the processes they start)."""
    rel = os.path.relpath(str(request.path), os.path.dirname(TESTS_DIR)).replace(os.sep, '/')
    if not rel.startswith(OPTIMIZED):
        yield
        return
    yield from _passes_on()


@pytest.fixture(autouse=True)
def _xla_passes_as_the_test_needs(request):
    """A test marked `xla_passes` compiles with XLA's passes on (it looks at the optimised program)."""
    if request.node.get_closest_marker('xla_passes') is None:
        yield
        return
    yield from _passes_on()


def _passes_on():
    before = os.environ.get('JAX_DISABLE_MOST_OPTIMIZATIONS')
    os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '0'
    jax.config.update('jax_disable_most_optimizations', False)
    yield
    jax.config.update('jax_disable_most_optimizations', before == '1')
    if before is None:
        os.environ.pop('JAX_DISABLE_MOST_OPTIMIZATIONS')
    else:
        os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = before


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


# The files that run training and CLI processes (the longest, ~2-4 min each here) start first, so that pytest-xdist's
# workers do not end on one of them while the other waits: `--dist loadfile --no-loadscope-reorder` (the Makefile's)
# hands out files in collection order; without the flag pytest-xdist >= 3.5 sorts files by their number of tests,
# which leaves the one-test training files (20-40 s each) for last. The order inside each group is kept
# (test_train.py before test_train_faults.py, whose fixtures it reuses).
HEAVY_FIRST = ('tests/training/', 'tests/durability/')


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(HEAVY_FIRST))
    for item in items:
        fn = getattr(item, 'function', None)
        if _module_needs_torch(str(item.path)) or (fn is not None and _body_needs_torch(fn)):
            item.add_marker(pytest.mark.torch)
        if not HAVE_TORCH and item.get_closest_marker('torch'):
            item.add_marker(pytest.mark.skip(reason='needs torch (the [torch] extra)'))


# ---------------------------------------------------------------- which tests need torch

TESTS = os.path.dirname(os.path.abspath(__file__))
# what the lean run must have run, a test passed in each: models, conversions, training, predict, the CLI
LEAN_FILES = ('tests/test_lean.py', 'tests/test_import_layering.py')
_passed_files = set()


def _imports(tree_body):
    """Top-level module names imported by these statements (`import a.b` -> 'a.b', `from a import b` -> 'a', 'a.b')."""
    names = []
    for node in tree_body:
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names += [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    return names


@functools.lru_cache(maxsize=None)
def _module_needs_torch(path: str) -> bool:
    """Whether a test module's module-level imports reach a torch package, through tests/ modules too."""
    try:
        with open(path) as f:
            body = ast.parse(f.read()).body
    except (OSError, SyntaxError):
        return False
    for name in _imports(body):
        if name.partition('.')[0] in TORCH_PACKAGES:
            return True
        rel = name.replace('.', os.sep) + '.py'
        for base in (os.path.dirname(path), TESTS):   # tests/ is on sys.path, and the file's own folder
            local = os.path.join(base, rel)
            if os.path.isfile(local) and local != path and _module_needs_torch(local):
                return True
    return False


# helpers.py's functions that import torch themselves
TORCH_HELPERS = ('perturb_timm', 'timm_model', 'run_timm', 'state_np', 'hf_vit', 'run_hf', 'flax_vit_tree', 'write_hf_flax')


@functools.lru_cache(maxsize=None)
def _body_needs_torch(fn) -> bool:
    """Whether a test function's body imports a torch package or calls a helper that does."""
    import inspect
    import textwrap
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    nodes = list(ast.walk(tree))
    return any(n.partition('.')[0] in TORCH_PACKAGES for n in _imports(nodes)) or \
        any(isinstance(n, ast.Name) and n.id in TORCH_HELPERS for n in nodes)


def pytest_ignore_collect(collection_path, config):
    path = str(collection_path)
    if not HAVE_TORCH and path.endswith('.py') and os.path.basename(path).startswith('test_') \
            and _module_needs_torch(path):
        return True
    return None


def pytest_runtest_logreport(report):
    path = report.nodeid.split('::')[0]
    if report.failed:   # (its folders are kept: _module_folders_removed_when_done)
        _FAILED_MODULES.add(path)
    elif report.when == 'call' and report.passed:
        _passed_files.add(path)


def pytest_sessionfinish(session, exitstatus):
    """Without torch, the controller (or the one process) says what ran, and fails a lean run that missed."""
    if HAVE_TORCH or hasattr(session.config, 'workerinput'):
        return
    tr = session.config.pluginmanager.get_plugin('terminalreporter')
    root = os.path.dirname(TESTS)
    left_out = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(TESTS) for f in files
                      if f.startswith('test_') and f.endswith('.py') and _module_needs_torch(os.path.join(d, f)))
    ran = sorted(_passed_files)
    say = tr.write_line if tr else print
    say(f'lean run (no torch): tests passed in {len(ran)} files: {", ".join(ran)}')
    say(f'left out (their modules import torch/timm): {len(left_out)} files: {", ".join(left_out)}')
    missing = [f for f in LEAN_FILES if f not in _passed_files]
    if LEAN and (missing or 'torch' in sys.modules):
        say('LEAN RUN FAILED: ' + (f'no test passed in {", ".join(missing)}' if missing else 'torch was imported'))
        session.exitstatus = 1
