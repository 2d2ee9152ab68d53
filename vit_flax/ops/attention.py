"""softmax(q k^T + bias) v: the fused path with hand-written derivatives, beside its plain reference.

- `reference_attention`: jax.nn.softmax over the float32 logits and `matmul` for both products,
  differentiated by JAX's autodiff; the only path that applies attention dropout.
- the fused path (`_attention_f32` for float32, `_attention` for low precision): the same forward formula
  with the derivatives written out. Autodiff of softmax makes XLA:CPU materialise the broadcast normaliser
  and run extra passes over the N x N array; these keep the probabilities as the one saved N x N array.
  Float32 gets a JVP (forward mode, jax.jvp and Hessian-vector products keep working; reverse mode is its
  transpose); low precision gets a VJP, as `matmul`'s own low-precision path does.

What selects between them is the models' field `attn_impl`, passed here as `impl`: 'reference' runs the
reference always; 'fused' (the default) runs the fused path, except when attention dropout is active
(training with a nonzero attention dropout rate: the caller passes `dropout`), where it falls back to
the reference, which it then equals in the forward pass.
"""
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from ..errors import ModelConfigError
from .matmul import matmul

ATTN_IMPLS = ('fused', 'reference')


def check_impl(impl: str) -> str:
    if impl not in ATTN_IMPLS:
        raise ModelConfigError(f"attn_impl must be 'fused' or 'reference', got {impl!r}")
    return impl


def dot_product_attention(q, k, v, bias=None, impl: str = 'fused', dropout: Optional[Callable] = None):
    """softmax(q k^T + bias) v over (..., N, Dh) arrays, q already scaled.

    Logits, bias and softmax in float32 (as timm under autocast: its attention kernel keeps the softmax
    in float32); both matmuls through `matmul`. Returns (..., N, Dh) in v's dtype. `dropout` (applied to
    the attention weights) is given only when it can drop something; `impl` as in the module docstring.
    """
    if check_impl(impl) == 'fused' and dropout is None:
        exact = jnp.finfo(jnp.result_type(q, k, v)).bits >= 32
        return (_attention_f32 if exact else _attention)(q, k, v, bias)
    return reference_attention(q, k, v, bias, dropout)


def reference_attention(q, k, v, bias=None, dropout: Optional[Callable] = None):
    """The plain formula, differentiated by JAX; `dropout` (or None) on the attention weights."""
    weights = jax.nn.softmax(_attention_logits(q, k, bias), axis=-1)
    return matmul('...qk,...kd->...qd', (weights if dropout is None else dropout(weights)).astype(v.dtype), v)


def _attention_logits(q, k, bias):
    logits = matmul('...qd,...kd->...qk', q, k, out_dtype=jnp.float32)
    return logits if bias is None else logits + bias


def _attention_probs(q, k, bias):
    logits = _attention_logits(q, k, bias)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)  # jax.nn.softmax's formula


@jax.custom_jvp
def _attention_f32(q, k, v, bias):
    return matmul('...qk,...kd->...qd', _attention_probs(q, k, bias), v)


@_attention_f32.defjvp
def _attention_f32_jvp(primals, tangents):
    (q, k, v, bias), (dq, dk, dv, dbias) = primals, tangents
    p = _attention_probs(q, k, bias)
    ds = matmul('...qd,...kd->...qk', dq, k) + matmul('...qd,...kd->...qk', q, dk)
    if bias is not None:
        ds = ds + dbias
    dp = p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))
    return (matmul('...qk,...kd->...qd', p, v),
            matmul('...qk,...kd->...qd', dp, v) + matmul('...qk,...kd->...qd', p, dv))


@jax.custom_vjp
def _attention(q, k, v, bias):
    return _attention_fwd(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
    p = _attention_probs(q, k, bias)
    return matmul('...qk,...kd->...qd', p.astype(v.dtype), v), (q, k, v, p, bias)


def _attention_bwd(res, do):
    """What autodiff would give for the forward above, `matmul`'s low-precision VJP included (each
    cotangent rounded to its operand's dtype before the product, accumulated in float32)."""
    q, k, v, p, bias = res
    pc, do = p.astype(v.dtype), do.astype(v.dtype)
    dv = matmul('...qk,...qd->...kd', pc, do, out_dtype=v.dtype)
    dp = matmul('...qd,...kd->...qk', do, v, out_dtype=pc.dtype).astype(jnp.float32)
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
    dsc = ds.astype(q.dtype)
    dq = matmul('...qk,...kd->...qd', dsc, k, out_dtype=q.dtype)
    dk = matmul('...qk,...qd->...kd', dsc, q, out_dtype=k.dtype)
    return dq, dk, dv, None if bias is None else _sum_to_shape(ds, bias.shape).astype(bias.dtype)


def _sum_to_shape(x, shape):
    """x summed over the axes that broadcasting `shape` to x.shape added or stretched."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


_attention.defvjp(_attention_fwd, _attention_bwd)
