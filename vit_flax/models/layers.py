"""Building blocks shared by the model families: dense layers and projections (computed by
`ops.matmul`), the patch convolution, the MLP, drop path, remat helpers and small config helpers.

Dropout rates use timm's spellings everywhere: `drop_rate` (the MLP's own dropout, timm `Mlp(drop=)`),
`proj_drop_rate` (after attention's output projection and in a block's MLP), `attn_drop_rate` (on the
attention weights), `drop_path_rate` (stochastic depth), in that order.
"""
import contextvars
import functools
import math
from functools import partial
from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import ModelConfigError
from ..ops import layernorm as _layernorm
from ..ops.activations import gelu_fn
from ..ops.attention import lowering_backend
from ..ops.matmul import matmul

Dtype = Any


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
    query) multiplied by `scale` before the rounding. Both forms below give the same values.

    A low-precision `dtype` rounds the whole projection once (the query's columns scaled first) and moves the
    heads in that dtype, then splits: the backward is one concatenation and one transpose of the bf16
    cotangents. Split per part in float32 instead (float32's own path), XLA:CPU builds the projection's
    cotangent by padding each part to the full width in float32 and adding, twice (ViT-S/16's bf16 step:
    ~0.1 GB a block). Lowered for a TPU (or a GPU) inside a remat block, the per-part split is taken: the
    rounded-once form kept 0.18 GiB more temporaries per block in ViT-B/16's remat step (v5e, 256 per chip, a
    depth-2 model); without remat it is the other way round under memory pressure (0.6 GiB less for the
    rounded-once form at 640 per chip, depth 2), and the full-depth step's largest batch per v5e chip fell from
    200 to under 168 with the per-part split (docs/XLA.md)."""
    if jnp.finfo(dtype).bits >= 32:
        return _split_per_part(y, parts, num_heads, dtype, scale)
    once = partial(_split_rounded_once, parts=parts, num_heads=num_heads, dtype=dtype, scale=scale)
    if not _IN_REMAT.get():
        return once(y)
    return jax.lax.platform_dependent(
        y, cpu=once, default=partial(_split_per_part, parts=parts, num_heads=num_heads, dtype=dtype, scale=scale))


def _split_per_part(y, parts, num_heads, dtype, scale):
    b, n, _ = y.shape
    y = y.reshape(b, n, parts, num_heads, -1).transpose(2, 0, 3, 1, 4)
    out = [y[i] for i in range(parts)]
    if scale is not None:
        out[0] = out[0] * scale
    return [t.astype(dtype) for t in out]


def _split_rounded_once(y, parts, num_heads, dtype, scale):
    b, n, _ = y.shape
    if scale is not None:
        width = y.shape[-1] // parts
        y = y * jnp.concatenate([jnp.full((width,), scale, y.dtype), jnp.ones((y.shape[-1] - width,), y.dtype)])
    y = y.astype(dtype).reshape(b, n, parts, num_heads, -1).transpose(2, 0, 3, 1, 4)
    return [jnp.squeeze(t, 0) for t in jnp.split(y, parts, axis=0)]


def merge_heads(x):
    """(B, H, N, Dh) -> (B, N, H*Dh)."""
    b, h, n, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def active_dropout(drop: nn.Module, deterministic: bool) -> Optional[Callable]:
    """`drop` (an nn.Dropout) as a callable when it can drop something (training, nonzero rate), else None:
    `dot_product_attention`'s `dropout` argument."""
    return None if deterministic or drop.rate == 0 else partial(drop, deterministic=False)


class PatchConv(nn.Module):
    """A patchifying convolution (kernel = stride = patch, VALID) with nn.Conv's params (`kernel` HWIO,
    `bias`, same init), computed as one matmul over the flattened patches: XLA:CPU runs that faster than
    the strided convolution, in the forward and the backward pass. Works for 1-D and 2-D inputs."""
    features: int
    patch_size: Sequence[int]
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    use_bias: bool = True   # False: no `bias` (timm's pre_norm models, CLIP's conv1)

    @nn.compact
    def __call__(self, x):
        patch, c = tuple(self.patch_size), x.shape[-1]
        kernel = self.param('kernel', self.kernel_init, patch + (c, self.features))
        bias = self.param('bias', self.bias_init, (self.features,)) if self.use_bias else None
        b, n = x.shape[0], len(patch)
        grid = tuple(s // p for s, p in zip(x.shape[1:-1], patch))
        x = x[(slice(None),) + tuple(slice(0, g * p) for g, p in zip(grid, patch))]  # VALID drops the rest
        x = x.reshape((b,) + sum(((g, p) for g, p in zip(grid, patch)), ()) + (c,))
        x = x.transpose((0,) + tuple(range(1, 2 * n, 2)) + tuple(range(2, 2 * n + 1, 2)) + (2 * n + 1,))
        x = x.reshape(b * math.prod(grid), -1).astype(self.dtype)
        y = matmul('mk,kd->md', x, kernel.reshape(-1, self.features).astype(self.dtype))
        y = y if bias is None else y + bias.astype(self.dtype)
        return y.reshape((b,) + grid + (self.features,))


def dense(features, dtype, name=None, **kw) -> Dense:
    return Dense(features=features, dtype=dtype, name=name, **kw)


def dense_general(features, axis, dtype, name=None, **kw) -> Dense:
    """A Dense over the trailing input axes `axis` (e.g. (-2, -1): heads and head dim)."""
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    if sorted(axis) != list(range(-len(axis), 0)):
        raise ValueError(f'dense_general contracts trailing axes only, got {axis}')
    return Dense(features=features, dtype=dtype, name=name, in_axes=len(axis), **kw)


class LayerNorm(nn.LayerNorm):
    """flax's nn.LayerNorm (the same params, names, values), computed by `ops.layernorm.layer_norm` when the
    compute `dtype` is low precision, the program is for XLA:CPU and the norm is the plain one (last axis, scale
    and bias, no mask, local statistics): the same values bit for bit, a backward without the activation-sized
    broadcast of `scale` that XLA:CPU otherwise writes for every norm. Float32 (and any other configuration or
    platform) runs flax's own code, which keeps forward-mode derivatives."""

    @nn.compact
    def __call__(self, x, *, mask=None):
        last = lambda a: (a,) if isinstance(a, int) else tuple(a)   # noqa: E731
        plain = (mask is None and self.use_scale and self.use_bias and self.use_fast_variance
                 and self.force_float32_reductions and self.axis_name is None
                 and last(self.reduction_axes) in ((-1,), (x.ndim - 1,))
                 and last(self.feature_axes) in ((-1,), (x.ndim - 1,)))
        if not (_layernorm.ENABLED and plain and self.dtype is not None and lowering_backend() == 'cpu'
                and jnp.issubdtype(self.dtype, jnp.floating) and jnp.finfo(self.dtype).bits < 32):
            return super().__call__(x, mask=mask)
        d = x.shape[-1]
        scale = self.param('scale', self.scale_init, (d,), self.param_dtype)
        bias = self.param('bias', self.bias_init, (d,), self.param_dtype)
        f32 = jnp.promote_types(x.dtype, jnp.float32)
        y = _layernorm.layer_norm(x.astype(f32), scale.astype(f32), bias.astype(f32), self.epsilon)
        return y.astype(self.dtype)


def norm_layer(kind: str, eps: float, dtype, name: Optional[str] = None, scale_init=nn.initializers.ones):
    """timm's `norm_layer`: 'layernorm' (`LayerNorm`, flax's params: `scale`, `bias`) or 'rmsnorm' (nn.RMSNorm:
    `scale` only, x * rsqrt(mean(x^2) + eps) * scale, as timm's RmsNorm), statistics in float32."""
    if kind == 'layernorm':
        return LayerNorm(epsilon=eps, dtype=dtype, name=name, scale_init=scale_init)
    if kind == 'rmsnorm':
        return nn.RMSNorm(epsilon=eps, dtype=dtype, name=name, scale_init=scale_init)
    raise ModelConfigError(f"norm_layer must be 'layernorm' or 'rmsnorm', got {kind!r}")


class LayerScale(nn.Module):
    """timm's LayerScale (CaiT, DeiT III, DINOv2): x * scale, one learned factor per channel, `scale` (D,)
    initialised to `init_values`. A bf16 branch times the float32 scale is float32, as under autocast."""
    init_values: float = 1e-5

    @nn.compact
    def __call__(self, x):
        scale = self.param('scale', lambda _, shape: jnp.full(shape, self.init_values, jnp.float32), (x.shape[-1],))
        return x * scale


class MlpBlock(nn.Module):
    """The transformer MLP; params `Dense_0`, `Dense_1` as in Google's trees.

    `kind`: 'mlp' (Dense_0 -> act -> dropout -> Dense_1 -> dropout: timm Mlp), 'swiglu_packed' (timm
    SwiGLUPacked / GluMlp with the gate first: Dense_0 is (D, mlp_dim), act(first half) * second half, Dense_1
    reads mlp_dim / 2), 'swiglu' (timm SwiGLU: act(Dense_gate(x)) * Dense_0(x), both (D, mlp_dim)). `norm`
    ('layernorm' | 'rmsnorm', timm's `scale_mlp_norm`) normalises the hidden activation before Dense_1 (`norm`).
    `use_bias=False` (timm `proj_bias=False`) drops every bias. `gelu` names the activation (ops.activations).
    """
    mlp_dim: int
    out_dim: Optional[int] = None
    drop_rate: float = 0.0
    gelu: str = 'exact'
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.xavier_uniform()
    bias_init: Callable = nn.initializers.normal(stddev=1e-6)
    kind: str = 'mlp'
    use_bias: bool = True
    in_bias: Optional[bool] = None   # the first layer's bias when it differs from `use_bias`
    out_bias: Optional[bool] = None  # the second layer's, likewise
    norm: Optional[str] = None
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        out_dim = self.out_dim or x.shape[-1]
        fc = partial(dense, dtype=self.dtype, kernel_init=self.kernel_init, bias_init=self.bias_init,
                     use_bias=self.use_bias)
        act = gelu_fn(self.gelu)
        in_bias = self.use_bias if self.in_bias is None else self.in_bias
        h = fc(self.mlp_dim, name='Dense_0', use_bias=in_bias)(x)
        if self.kind == 'swiglu_packed':
            if self.mlp_dim % 2:
                raise ModelConfigError(f'a packed SwiGLU needs an even hidden width, got mlp_dim {self.mlp_dim}')
            a, b = jnp.split(h, 2, axis=-1)
            h = act(a) * b
        elif self.kind == 'swiglu':
            h = act(fc(self.mlp_dim, name='Dense_gate')(x)) * h
        elif self.kind == 'mlp':
            h = act(h)
        else:
            raise ModelConfigError(f"mlp_layer must be 'mlp', 'swiglu' or 'swiglu_packed', got {self.kind!r}")
        h = nn.Dropout(rate=self.drop_rate)(h, deterministic=deterministic)
        if self.norm:
            h = norm_layer(self.norm, self.norm_eps, self.dtype, name='norm')(h)
        h = fc(out_dim, name='Dense_1', use_bias=self.use_bias if self.out_bias is None else self.out_bias)(h)
        return nn.Dropout(rate=self.drop_rate)(h, deterministic=deterministic)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, scaling survivors by 1/keep.

    One calling convention, `DropPath()(x, rate=..., deterministic=...)`: the rate is a call argument
    (a Python float, or a traced per-block rate under nn.scan), never a field."""

    @nn.compact
    def __call__(self, x, rate, deterministic: bool = True):
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
        raise ModelConfigError(f'unknown remat_policy {name!r}; choose one of {", ".join(choices)}')
    return policy


# True while a remat block is traced (remat_block): what a layer inside may do differently when its forward is
# recomputed in the backward pass (split_heads)
_IN_REMAT = contextvars.ContextVar('vit_flax_in_remat', default=False)


def remat_block(cls, remat: bool, policy: Optional[str] = None, scanned: bool = False):
    """`cls` under nn.remat when asked (its `deterministic` argument static); prevent_cse is only needed
    outside a scan (jax.checkpoint's own advice). The block's call is traced with `_IN_REMAT` set; the
    subclass keeps `cls`'s name, so the parameter tree is the same."""
    if not remat:
        return cls
    call = cls.__call__

    @functools.wraps(call)
    def traced_in_remat(self, *args, **kwargs):
        token = _IN_REMAT.set(True)
        try:
            return call(self, *args, **kwargs)
        finally:
            _IN_REMAT.reset(token)
    marked = type(cls.__name__, (cls,), {'__call__': traced_in_remat, '__module__': cls.__module__,
                                         '__qualname__': cls.__qualname__})
    return nn.remat(marked, static_argnums=(2,), prevent_cse=not scanned, policy=checkpoint_policy(policy))


def drop_path_rates(rate: float, depth: int):
    """Linearly increasing from 0 to `rate` over `depth` blocks, as timm and DeiT do."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def to_tuple(v, n: int):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class PatchGrid:
    """The 2-D patch geometry a model with `img_size`, `patch_size` and `in_chans` fields derives (a mixin of
    plain properties, so they work on unbound modules too): the patch as a pair, the token grid, the NHWC input
    shape without the batch."""

    @property
    def patch_size_tuple(self):
        return to_tuple(self.patch_size, 2)

    @property
    def grid_size(self):
        return tuple(i // p for i, p in zip(to_tuple(self.img_size, 2), self.patch_size_tuple))

    @property
    def input_shape(self):
        return to_tuple(self.img_size, 2) + (self.in_chans,)
