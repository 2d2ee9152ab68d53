"""Building blocks shared by the model families: MLP, drop path, the activation and the matmul policy."""
from functools import partial
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


def gelu_fn(kind: str) -> Callable:
    # timm and PyTorch use the exact erf form; Google's vit_jax/big_vision use flax's default tanh form.
    if kind == 'exact':
        return partial(nn.gelu, approximate=False)
    if kind == 'tanh':
        return partial(nn.gelu, approximate=True)
    raise ValueError(f"gelu must be 'exact' or 'tanh', got {kind!r}")


def f32_accumulating_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """dot_general that accumulates in float32 and rounds the result back to the operand dtype.

    With bf16 operands this is what lets XLA pick the fast bf16 x bf16 -> f32 kernels (AMX on CPU,
    tensor cores on GPU) instead of a bf16-accumulating path that is both slower and less accurate.
    """
    out = lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                          preferred_element_type=jnp.float32)
    return out.astype(jnp.result_type(lhs, rhs))


def dense(features, dtype, name=None, **kw) -> nn.Dense:
    return nn.Dense(features, dtype=dtype, dot_general=f32_accumulating_dot_general, name=name, **kw)


def dense_general(features, axis, dtype, name=None, **kw) -> nn.DenseGeneral:
    return nn.DenseGeneral(features, axis=axis, dtype=dtype, dot_general=f32_accumulating_dot_general,
                           name=name, **kw)


class MlpBlock(nn.Module):
    """Dense -> GELU -> dropout -> Dense -> dropout; params `Dense_0`, `Dense_1` as in Google's trees."""
    mlp_dim: int
    out_dim: Optional[int] = None
    dropout_rate: float = 0.0
    gelu: str = 'exact'
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.normal(stddev=1e-6)

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        out_dim = self.out_dim or x.shape[-1]
        x = dense(self.mlp_dim, self.dtype, name='Dense_0', kernel_init=self.kernel_init,
                  bias_init=self.bias_init)(x)
        x = gelu_fn(self.gelu)(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out_dim, self.dtype, name='Dense_1', kernel_init=self.kernel_init,
                  bias_init=self.bias_init)(x)
        return nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, scaling survivors by 1/keep."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def drop_path_rates(rate: float, depth: int):
    """Linearly increasing from 0 to `rate` over `depth` blocks, as timm and DeiT do."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def to_tuple(v, n: int):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
