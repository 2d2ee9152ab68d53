import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax
import numpy as np
import pytest
import torch

jax.config.update('jax_default_matmul_precision', 'highest')
torch.set_num_threads(max(1, os.cpu_count() or 1))


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def perturb_timm(model, seed=0, scale=0.02):
    """Move every weight away from its init: norms off 1, biases and heads off 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def timm_model(name, seed=0, **kw):
    import timm
    return perturb_timm(timm.create_model(name, pretrained=False, **kw), seed)


def state_np(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def images(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def run_timm(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(x_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def run_flax(model, params, x, **kw):
    return np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, **kw))(params, x))


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
