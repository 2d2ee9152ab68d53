"""Building blocks shared by the model families: MLP, drop path, attention, the activation and the matmul policy."""
import functools
import math
import os
from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any


@jax.custom_jvp
def gelu_exact(x):
    """x * Phi(x) in PyTorch's form, 0.5 x (1 + erf(x / sqrt 2)), computed in at least float32.

    jax.nn.gelu(approximate=False) goes through erfc, whose derivative XLA:CPU lowers to a long
    select chain; this form with its derivative written out is cheaper in the backward pass and is the
    formula timm/PyTorch evaluate (in float32 for bf16 inputs too).
    """
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return (xf * 0.5 * (1.0 + lax.erf(xf * (1 / math.sqrt(2))))).astype(x.dtype)


@gelu_exact.defjvp
def _gelu_exact_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    cdf = 0.5 * (1.0 + lax.erf(xf * (1 / math.sqrt(2))))
    pdf = jnp.exp(-0.5 * xf * xf) * (1 / math.sqrt(2 * math.pi))
    return (xf * cdf).astype(x.dtype), (t.astype(xf.dtype) * (cdf + xf * pdf)).astype(t.dtype)


# Under jax.checkpoint the derivative factor is recomputed in the backward pass, fused with the cotangent
# product, from the saved pre-activation: without it the forward pass runs a second erf pass over the MLP's
# widest activation to store that factor (ViT-S training step: 19 -> 13 ms of GELU per block on XLA:CPU).
gelu_exact_recomputed = jax.checkpoint(gelu_exact)


def gelu_fn(kind: str) -> Callable:
    # timm and PyTorch use the exact erf form; Google's vit_jax/big_vision use flax's default tanh form.
    if kind == 'exact':
        return gelu_exact_recomputed
    if kind == 'tanh':
        return partial(nn.gelu, approximate=True)
    raise ValueError(f"gelu must be 'exact' or 'tanh', got {kind!r}")


# ---------------------------------------------------------------- the matmul policy
#
# Every matmul of the models goes through `matmul`: float32 operands take XLA's plain dot; low-precision
# (bf16) operands accumulate in float32 and round once. Where the hardware has bf16 dot instructions
# (GPU, TPU, x86 with AMX or AVX512_BF16, ARM with BF16) the operands stay bf16 in the forward AND the
# backward pass (a custom VJP rounds the cotangent to bf16, as autocast's backward does, so no matmul
# falls back to a mixed f32 x bf16 dot). On a CPU without them (AVX2 only) XLA's bf16 GEMM converts
# tile by tile and runs slower than its float32 GEMM, so the operands are widened to float32 first: the
# same products and the same float32 accumulation, on the faster kernel.
_BF16_CPU_FLAGS = {'avx512_bf16', 'amx_bf16', 'bf16'}  # x86 (AVX512_BF16, AMX) and aarch64 (FEAT_BF16)
BF16_MATMUL_ENV = 'VIT_FLAX_BF16_MATMUL'


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> Optional[bool]:
    try:
        with open('/proc/cpuinfo') as f:
            lines = [l for l in f if l.startswith(('flags', 'Features'))]
    except OSError:
        return None
    return bool(lines) and bool(_BF16_CPU_FLAGS & set(lines[0].split(':', 1)[-1].split()))


def native_bf16_matmul() -> bool:
    """Whether bf16 matmuls keep bf16 operands on the default backend (see the note above).

    Override with the environment variable VIT_FLAX_BF16_MATMUL=native|float32 (read at trace time).
    """
    forced = os.environ.get(BF16_MATMUL_ENV, '').lower()
    if forced in ('native', 'float32'):
        return forced == 'native'
    if forced:
        raise ValueError(f'{BF16_MATMUL_ENV} must be native or float32, got {forced!r}')
    return jax.default_backend() != 'cpu' or _cpu_has_bf16() is not False


@partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _low_precision_einsum(spec, a, b, out_dtype, widen):
    if widen:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


def _low_precision_einsum_fwd(spec, a, b, out_dtype, widen):
    return _low_precision_einsum(spec, a, b, out_dtype, widen), (a, b)


def _low_precision_einsum_bwd(spec, out_dtype, widen, res, ct):
    # The cotangent is rounded to the operands' dtype (as autocast's backward does) and each gradient is a
    # product of two low-precision operands accumulated in float32, whichever kernel runs it.
    a, b = res
    (sa, sb), so = spec.split('->')[0].split(','), spec.split('->')[1]
    ct = ct.astype(a.dtype)
    return (_low_precision_einsum(f'{so},{sb}->{sa}', ct, b, a.dtype, widen),
            _low_precision_einsum(f'{sa},{so}->{sb}', a, ct, b.dtype, widen))


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def matmul(spec: str, a, b, out_dtype=None):
    """`jnp.einsum(spec, a, b)` accumulated in float32, returned in `out_dtype` (default: the operands').

    `spec` names every index of an operand in the other operand or in the output (no traces or sums
    over one operand), so that its gradients are einsums of the same kind.
    """
    dtype = jnp.result_type(a, b)
    out_dtype = dtype if out_dtype is None else out_dtype
    if jnp.finfo(dtype).bits >= 32:
        return jnp.einsum(spec, a, b, preferred_element_type=dtype).astype(out_dtype)
    return _low_precision_einsum(spec, a.astype(dtype), b.astype(dtype), out_dtype, not native_bf16_matmul())


def _dense_params(mdl: nn.Module, in_shape, features, use_bias: bool, kernel_init, bias_init):
    """`kernel` (*in_shape, *features) and `bias` (*features) created exactly as nn.Dense/nn.DenseGeneral
    create them (names, shapes, initialisation of the flattened (in, out) matrix)."""
    in_shape, features = tuple(in_shape), tuple(features)
    n_in, n_out = math.prod(in_shape), math.prod(features)
    kernel = mdl.param('kernel', lambda rng, shape: kernel_init(rng, (n_in, n_out)).reshape(shape), in_shape + features)
    bias = mdl.param('bias', lambda rng, shape: bias_init(rng, (n_out,)).reshape(shape), features) if use_bias else None
    return kernel, bias


class Dense(nn.Module):
    """nn.Dense (or nn.DenseGeneral over the last `in_axes` input axes) with the same params, computed by
    `matmul`: float32 accumulation, the bias added in float32, one rounding to `dtype`."""
    features: Union[int, Sequence[int]]
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    in_axes: int = 1

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        in_shape = x.shape[x.ndim - self.in_axes:]
        kernel, bias = _dense_params(self, in_shape, features, self.use_bias, self.kernel_init, self.bias_init)
        y = fused_projection(x.reshape(x.shape[:x.ndim - self.in_axes] + (-1,)), [(kernel, bias)], self.dtype)
        return y.astype(self.dtype).reshape(y.shape[:-1] + features)


class ProjectionParams(nn.Module):
    """The params of a `Dense` over the last input axis, returned rather than applied, so that attention
    can fuse several projections into one matmul at trace time."""
    features: Sequence[int]
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, in_dim: int):
        return _dense_params(self, (in_dim,), self.features, self.use_bias, self.kernel_init, self.bias_init)


def fused_projection(x, params, dtype):
    """x (..., D) through the projections `params` [(kernel (D, ...), bias or None), ...] at once.

    Returns float32 (..., sum of the projections' widths), accumulated in float32 and not yet rounded to
    `dtype`, so that the caller can fold scaling and layout changes into the one rounding.
    """
    lead, d = x.shape[:-1], x.shape[-1]
    kernel = jnp.concatenate([k.reshape(d, -1) for k, _ in params], axis=1) if len(params) > 1 \
        else params[0][0].reshape(d, -1)
    y = matmul('md,de->me', x.reshape(-1, d).astype(dtype), kernel.astype(dtype), out_dtype=jnp.float32)
    if params[0][1] is not None:
        y = y + jnp.concatenate([b.reshape(-1) for _, b in params])
    return y.reshape(lead + (-1,))


def split_heads(y, parts: int, num_heads: int, dtype, scale: Optional[float] = None):
    """(B, N, parts*H*Dh) float32 projections -> `parts` arrays (B, H, N, Dh) in `dtype`; the first (the
    query) multiplied by `scale` before the rounding."""
    b, n, _ = y.shape
    y = y.reshape(b, n, parts, num_heads, -1).transpose(2, 0, 3, 1, 4)
    out = [y[i] for i in range(parts)]
    if scale is not None:
        out[0] = out[0] * scale
    return [t.astype(dtype) for t in out]


def merge_heads(x):
    """(B, H, N, Dh) -> (B, N, H*Dh)."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def dot_product_attention(q, k, v, bias=None, dropout: Optional[Callable] = None):
    """softmax(q k^T + bias) v over (..., N, Dh) arrays, q already scaled.

    Logits, bias and softmax in float32 (as timm under autocast: its attention kernel keeps the softmax
    in float32); both matmuls through `matmul`. Returns (..., N, Dh) in v's dtype. `dropout` (on the
    attention weights) is None when it cannot drop anything (see `active_dropout`): then the derivatives
    are the hand-written ones below.
    """
    if dropout is None:
        exact = jnp.finfo(jnp.result_type(q, k, v)).bits >= 32
        return (_attention_f32 if exact else _attention)(q, k, v, bias)
    weights = jax.nn.softmax(_attention_logits(q, k, bias), axis=-1)
    return matmul('...qk,...kd->...qd', dropout(weights).astype(v.dtype), v)


def active_dropout(drop: nn.Module, deterministic: bool) -> Optional[Callable]:
    """`drop` (an nn.Dropout) as a callable when it can drop something, else None."""
    return None if deterministic or drop.rate == 0 else partial(drop, deterministic=False)


def _attention_logits(q, k, bias):
    logits = matmul('...qd,...kd->...qk', q, k, out_dtype=jnp.float32)
    return logits if bias is None else logits + bias


def _attention_probs(q, k, bias):
    logits = _attention_logits(q, k, bias)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)  # jax.nn.softmax's formula


# Hand-written derivatives: autodiff of softmax makes XLA:CPU materialise the broadcast normaliser and run
# extra passes over the N x N array; these keep the probabilities as the one saved N x N array. Float32
# gets a JVP (forward mode, jax.jvp and Hessian-vector products keep working; reverse mode is its
# transpose); low precision gets a VJP, as `matmul`'s own low-precision path does.
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


class PatchConv(nn.Module):
    """A patchifying convolution (kernel = stride = patch, VALID) with nn.Conv's params (`kernel` HWIO,
    `bias`, same init), computed as one matmul over the flattened patches: XLA:CPU runs that faster than
    the strided convolution, in the forward and the backward pass. Works for 1-D and 2-D inputs."""
    features: int
    patch_size: Sequence[int]
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        patch, c = tuple(self.patch_size), x.shape[-1]
        kernel = self.param('kernel', self.kernel_init, patch + (c, self.features))
        bias = self.param('bias', self.bias_init, (self.features,))
        b, n = x.shape[0], len(patch)
        grid = tuple(s // p for s, p in zip(x.shape[1:-1], patch))
        x = x[(slice(None),) + tuple(slice(0, g * p) for g, p in zip(grid, patch))]  # VALID drops the rest
        x = x.reshape((b,) + sum(((g, p) for g, p in zip(grid, patch)), ()) + (c,))
        x = x.transpose((0,) + tuple(range(1, 2 * n, 2)) + tuple(range(2, 2 * n + 1, 2)) + (2 * n + 1,))
        x = x.reshape(b * math.prod(grid), -1).astype(self.dtype)
        y = matmul('mk,kd->md', x, kernel.reshape(-1, self.features).astype(self.dtype))
        return (y + bias.astype(self.dtype)).reshape((b,) + grid + (self.features,))


def dense(features, dtype, name=None, **kw) -> Dense:
    return Dense(features, dtype, name=name, **kw)


def dense_general(features, axis, dtype, name=None, **kw) -> Dense:
    """A Dense over the trailing input axes `axis` (e.g. (-2, -1): heads and head dim)."""
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    if sorted(axis) != list(range(-len(axis), 0)):
        raise ValueError(f'dense_general contracts trailing axes only, got {axis}')
    return Dense(features, dtype, name=name, in_axes=len(axis), **kw)


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
    """Stochastic depth: drops the whole residual branch per sample, scaling survivors by 1/keep.

    `rate` at call time (a traced per-block rate under nn.scan) overrides the field."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True, rate=None):
        rate = self.rate if rate is None else rate
        if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng('dropout'), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros_like(x))


def checkpoint_policy(name: Optional[str]):
    """`jax.checkpoint_policies.<name>` (None: save nothing, recompute the whole block)."""
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if not callable(policy) or name.startswith('_'):
        choices = sorted(n for n in dir(jax.checkpoint_policies) if n.endswith('saveable'))
        raise ValueError(f'unknown remat_policy {name!r}; choose one of {", ".join(choices)}')
    return policy


def remat_block(cls, remat: bool, policy: Optional[str] = None, scanned: bool = False):
    """`cls` under nn.remat when asked (its `deterministic` argument static); prevent_cse is only needed
    outside a scan (jax.checkpoint's own advice)."""
    if not remat:
        return cls
    return nn.remat(cls, static_argnums=(2,), prevent_cse=not scanned, policy=checkpoint_policy(policy))


def drop_path_rates(rate: float, depth: int):
    """Linearly increasing from 0 to `rate` over `depth` blocks, as timm and DeiT do."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def to_tuple(v, n: int):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
