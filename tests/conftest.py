"""Session settings (set before any test imports jax or torch) and fixtures; the shared helpers are in helpers.py."""
import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax
import pytest
import torch

jax.config.update('jax_default_matmul_precision', 'highest')

# The suite builds the same few models over and over (a new module instance is a new function to jax.jit,
# compiled again): a persistent compilation cache, private to this run, turns every repeat into a lookup
# (~10 s -> ~2 s for a small ViT here). In this process only: subprocesses (killed writers, two-process
# training, the CLI's own process) keep compiling for themselves, so no entry is ever read half-written.
if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    import atexit
    import shutil
    import tempfile
    _cache = tempfile.mkdtemp(prefix='vit-flax-tests-jax-cache-')
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    jax.config.update('jax_compilation_cache_dir', _cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
