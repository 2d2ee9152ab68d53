"""Session settings (set before any test imports jax or torch) and fixtures; the shared helpers are in helpers.py."""
import os
import tempfile

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax
import pytest
import torch

jax.config.update('jax_default_matmul_precision', 'highest')
# the cores shared among pytest-xdist's workers (`make test` runs two)
torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))))

# The suite builds the same few models over and over (a new module instance is a new function to jax.jit,
# compiled again): a persistent compilation cache for this run turns every repeat into a lookup (~10 s -> ~2 s
# for a small ViT here). The test processes only, pytest-xdist's workers sharing one (named by the run's id;
# the controller removes it at the end). Subprocesses (killed writers, two-process training, the CLI's own
# process) compile for themselves, so no process is killed half-way through writing an entry; a worker that
# reads an entry the other is still writing is warned by jax and compiles instead (filtered in pyproject.toml).
JAX_CACHE = None
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    _run = os.environ.get('PYTEST_XDIST_TESTRUNUID') or f'pid{os.getpid()}'
    JAX_CACHE = os.path.join(tempfile.gettempdir(), f'vit-flax-tests-jax-cache-{_run}')
    os.makedirs(JAX_CACHE, exist_ok=True)
    jax.config.update('jax_compilation_cache_dir', JAX_CACHE)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def pytest_unconfigure(config):
    if JAX_CACHE and not os.environ.get('PYTEST_XDIST_WORKER'):   # the controller, or a run without workers
        import shutil
        shutil.rmtree(JAX_CACHE, ignore_errors=True)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


# The files that run training and CLI processes (the longest, ~2-4 min each here) start first, so that pytest-xdist's
# workers do not end on one of them while the other waits: `--dist loadfile` hands out files in collection
# order. The order inside each group is kept (test_train.py before test_train_faults.py, whose fixtures it reuses).
HEAVY_FIRST = ('tests/training/', 'tests/durability/')


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(HEAVY_FIRST))
