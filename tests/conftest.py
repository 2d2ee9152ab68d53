"""Session settings (set before any test imports jax or torch) and fixtures; the shared helpers are in helpers.py."""
import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax
import pytest
import torch

jax.config.update('jax_default_matmul_precision', 'highest')
torch.set_num_threads(max(1, os.cpu_count() or 1))


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
