"""LayerNorm over the last axis with its backward written out: the fast path beside flax's `nn.LayerNorm`.

`layer_norm(x, scale, bias, eps)` computes exactly flax's formula (float32 statistics, fast variance: mean and
mean of squares; y = (x - mean) * (rsqrt(var + eps) * scale) + bias), so its values are flax's bit for bit. Only
the derivative differs in form, not in value: a custom VJP that saves x and the per-row mean and rstd (no
full-size intermediate) and takes the two per-row sums of the backward, sum_d(g * scale) and
sum_d(g * scale * xhat), as matrix-vector products with `scale`.

Why (XLA:CPU, jaxlib 0.10.2): in JAX's derivative of flax's formula those sums are reductions of g times the
scale broadcast to the activation's shape; XLA:CPU gives the multiply and the reduction to one YNNPACK fusion,
which takes only full-size operands, so the scale is materialised at the activation's size for every norm
(ViT-S/16's bf16 step at batch 16: 52 broadcasts, 243 MB; Swin V2-T's at batch 8: 5% of the op time). Written
as dots, there is none. The bf16 ViT-S/16 step 1.03x, Swin V2-T's 1.03x (benchmarks/README.md).

A custom VJP has no forward mode (jax.jvp): `models.layers.LayerNorm` takes this path only for a low-precision
compute dtype (as attention's bf16 kernel, itself a custom VJP) and flax's own LayerNorm otherwise, so float32
models keep jax.jvp and Hessian-vector products. And only in a program for XLA:CPU (`attention.lowering_backend`,
which a deviceless TPU compile sets): compiled for a v5e (ViT-B/16, bf16 AdamW, 256 per chip, remat) it kept 0.81
GiB more temporaries than JAX's derivative (7.42 against 6.61 GiB), whose broadcasts TPU fusions do not write.
`ENABLED = False` turns the fast path off everywhere.
"""
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

ENABLED = True


def _stats(x):
    """flax's `_compute_stats` with `use_fast_variance`: mean and max(0, mean(x^2) - mean^2) over the last axis."""
    mean = jnp.mean(x, -1, keepdims=True)
    return mean, jnp.maximum(0.0, jnp.mean(x * x, -1, keepdims=True) - mean * mean)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """x (..., D) float32, scale and bias (D,) float32 -> (..., D) float32: flax's LayerNorm values."""
    return _forward(x, scale, bias, eps)[0]


def _forward(x, scale, bias, eps):
    mean, var = _stats(x)
    rstd = lax.rsqrt(var + eps)
    return (x - mean) * (rstd * scale) + bias, (x, mean, rstd, scale)


def _row_dot(a, scale):
    """sum_d a[..., d] * scale[d] as a matrix-vector product: no broadcast scale."""
    return jnp.einsum('...d,d->...', a, scale)


def _backward(eps, res, g):
    x, mean, rstd, scale = res
    xhat = (x - mean) * rstd
    gx = g * xhat
    rows = tuple(range(x.ndim - 1))
    d = x.shape[-1]
    m1 = _row_dot(g, scale)[..., None] / d
    m2 = _row_dot(gx, scale)[..., None] / d
    dx = rstd * (g * scale - m1 - xhat * m2)
    return dx, jnp.sum(gx, rows), jnp.sum(g, rows)


layer_norm.defvjp(_forward, _backward)
