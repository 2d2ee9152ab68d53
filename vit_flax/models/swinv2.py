"""Swin Transformer V2 in Flax linen, numerically matching timm's `SwinTransformerV2` (and Microsoft's
`models/swin_transformer_v2.py`, which timm's follows).

Parameter tree (timm's module names, flax leaf names):
`patch_embed/{proj, norm}`, `layers_{i}/downsample/{reduction, norm}` (i > 0; the reduction (4C -> 2C, no bias)
comes first, then LayerNorm(2C): V1 normalises first),
`layers_{i}/blocks_{j}/{attn/{logit_scale, q_bias, v_bias, qkv, cpb_mlp/{Dense_0, Dense_1}, proj}, norm1, mlp/{Dense_0,
Dense_1}, norm2}`, `norm`, `head` (timm `head.fc`). `logit_scale` is (heads, 1, 1) as in timm; `qkv` has no bias
of its own: q and v biases are separate parameters and the key bias is zero (timm's non-persistent `k_bias`,
Microsoft's `zeros_like`). `cpb_mlp` is Linear(2, 512) + ReLU + Linear(512, heads, no bias).

The math (per block, post-norm): `x = x + drop_path(norm1(attn(x)))`, `x = x + drop_path(norm2(mlp(x)))`.
Attention is scaled cosine attention, `normalize(q) @ normalize(k)^T * exp(min(logit_scale, log(1/0.01)))` with no
head_dim scaling, plus the continuous position bias `16 * sigmoid(cpb_mlp(table))[index]` and the -100 shift mask.
The coordinate table is a constant: per axis `arange(-(W-1), W) / (P-1)` (P the stage's pretrained window when > 0,
else the window itself), times 8, then `sign(x) * log2(|x| + 1) / log2(8)`. A window change therefore needs no
table resampling: the MLP is evaluated on the new table (Microsoft's fine-tuning 8 -> 16, 12 -> 24).

Under `dtype=bfloat16` the projections, the attention products and the MLP run in bf16, but the cosine
normalisation (q, k, their norms, the logit scale) and the bias MLP stay in float32, as the bias needs (16 *
sigmoid amplifies error). In autocast's order: the qkv projection is rounded to bf16 once (timm's bf16 linear
output under torch.autocast) and its heads moved in bf16, then q and k are normalised in float32 from those
values, the logit scale folded into q, and rounded again for the product; the logits stay float32 (timm's are
the bf16 product times the scale). Float32 keeps its own path (the float32 projection sliced and normalised).

Two paths, chosen by `attn_impl` (`fast_path`): 'autodiff' is the plain reference (the formula, JAX's
derivatives); every other value takes the fast path, which evaluates the same forward formula: `cosine_qk`
(q and k normalised with a written-out derivative) and, in the forward (inference), `fusion_boundary` after the MLP
(XLA:CPU otherwise fuses the post-norm block's second half into one YNNPACK fusion fed with full-size constant
arrays). What each gave: benchmarks/README.md.

Window geometry is V1's (vit_flax.models.swin, whose helpers this module imports): windows and shifts fixed per
stage from the configured `img_size` (a stage no larger than its window uses the whole stage, unshifted), masks and
padding built for the actual input, per-stage windows allowed.
"""
import math
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl, dot_product_attention
from ..registry import register
from .layers import (DropPath, LayerNorm, MlpBlock, ProjectionParams, active_dropout, dense, drop_path_rates,
                     fused_projection, merge_heads, remat_block, split_heads, to_tuple)
from .swin import (SIZES, PatchEmbed, PatchMerging, SwinGrid, attend_in_windows, relative_position_index,
                   swin_features, swin_head)

Dtype = Any
Pair = Tuple[int, int]

_trunc02 = nn.initializers.truncated_normal(stddev=0.02)
LOGIT_SCALE_MAX = math.log(1.0 / 0.01)
CPB_HIDDEN = 512


def relative_coords_table(window: Pair, pretrained_window: Pair = (0, 0)) -> np.ndarray:
    """(2Wh-1, 2Ww-1, 2) float32 log-spaced coordinates the bias MLP reads (Microsoft's `relative_coords_table`
    without its leading 1), normalised by the pretrained window when it is > 0, else by the window
    (`max(., 1)` as timm, so that a window of 1 gives zeros, not 0/0)."""
    wh, ww = window
    h = np.arange(-(wh - 1), wh, dtype=np.float32)
    w = np.arange(-(ww - 1), ww, dtype=np.float32)
    table = np.stack(np.meshgrid(h, w, indexing='ij'), axis=-1)
    norm = pretrained_window if pretrained_window[0] > 0 else window
    table = table / np.array([max(norm[0] - 1, 1), max(norm[1] - 1, 1)], np.float32)
    table = table * np.float32(8)
    return (np.sign(table) * np.log2(np.abs(table) + np.float32(1.0)) / np.float32(np.log2(8))).astype(np.float32)


def l2_normalize(x, eps: float = 1e-12):
    """torch's F.normalize: x / max(||x||, eps) over the last axis."""
    return x / jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), eps)


def fast_path(attn_impl: str) -> bool:
    """Whether the block takes its fast path (`cosine_qk`, `fusion_boundary`): every `attn_impl` but 'autodiff',
    which runs the plain reference (the same forward values, JAX's derivatives, no fusion hint)."""
    return check_impl(attn_impl) != 'autodiff'


def fusion_boundary(y):
    """y as float32 with the same values, through a `reduce_precision` to y's own format (a no-op on these
    values, which XLA neither proves nor removes): a fusion boundary for XLA:CPU. Without it XLA:CPU's YNNPACK
    fusion takes a post-norm block's whole second half (norm1, the residual, fc1, GELU, fc2, norm2, the residual)
    as one fusion and materialises every scalar constant inside it (GELU's 0.5, 1/sqrt 2, 1) as full-size
    float32 operands: in Swin V2-T's forward at batch 8, 229 MB written and ~450 MB read, in bf16 and in float32
    alike. With it, fc1, GELU, fc2 and each LayerNorm are fusions of their own, as in pre-norm blocks (Swin V1,
    ViT). Lowered for any other platform it is only the widening."""
    f = jnp.finfo(y.dtype)

    def cpu(v):
        return jax.lax.reduce_precision(v.astype(jnp.float32), exponent_bits=f.nexp, mantissa_bits=f.nmant)

    # Only XLA:CPU needs the hint: other backends (and a deviceless TPU compile on this host) get the plain
    # widening, chosen per lowering platform, so their fusions stay as their compilers make them.
    return jax.lax.platform_dependent(y, cpu=cpu, default=lambda v: v.astype(jnp.float32))


def mlp_output(y, dtype, attn_impl, deterministic: bool):
    """A post-norm block's MLP output `y` as its norm2 takes it: through `fusion_boundary` in the forward
    (inference) on the fast path, else as it is (Swin V2's and Swin V2 CR's blocks)."""
    if deterministic and fast_path(attn_impl):
        return fusion_boundary(y)
    return y


def cosine_qk_reference(q, k, scale):
    """(normalize(q) * scale, normalize(k)) computed in float32 from q, k (..., H, N, Dh) and rounded back to their
    dtype; `scale` (H, 1, 1) float32. Differentiated by JAX: the reference of `cosine_qk`."""
    qn = l2_normalize(q.astype(jnp.float32)) * scale
    return qn.astype(q.dtype), l2_normalize(k.astype(jnp.float32)).astype(k.dtype)


@jax.custom_vjp
def cosine_qk(q, k, scale):
    """`cosine_qk_reference` with its derivative written out: the backward reads q, k (low precision) and the
    cotangents and recomputes the norms, one pass each in float32 (for y = x / max(|x|, eps):
    dx = (g - y <g, y>) / max(|x|, eps), the projection term absent where |x| <= eps), where autodiff of the
    formula saves and re-reads float32 intermediates of the size of q and k."""
    return cosine_qk_reference(q, k, scale)


def _cosine_qk_fwd(q, k, scale):
    return cosine_qk_reference(q, k, scale), (q, k, scale)


def _unit_vjp(x, g, eps: float = 1e-12):
    """(y, dx) for y = x / max(|x|, eps) over the last axis, x and g float32."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    den = jnp.maximum(norm, eps)
    y = x / den
    inner = jnp.where(norm > eps, jnp.sum(g * y, axis=-1, keepdims=True), 0.0)
    return y, (g - y * inner) / den


def _cosine_qk_bwd(res, cts):
    q, k, scale = res
    dqn, dkn = (c.astype(jnp.float32) for c in cts)
    yq, dq = _unit_vjp(q.astype(jnp.float32), dqn * scale)
    _, dk = _unit_vjp(k.astype(jnp.float32), dkn)
    lead = dqn.ndim - scale.ndim
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(scale.shape) if d == 1)
    dscale = jnp.sum(dqn * yq, axis=axes, keepdims=True).reshape(scale.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dscale.astype(scale.dtype)


cosine_qk.defvjp(_cosine_qk_fwd, _cosine_qk_bwd)


class CpbMlp(nn.Module):
    """The continuous position bias MLP (timm `cpb_mlp.0`, `cpb_mlp.2`), always float32."""
    num_heads: int

    @nn.compact
    def __call__(self, coords):
        h = dense(CPB_HIDDEN, jnp.float32, name='Dense_0', kernel_init=_trunc02)(coords)
        return dense(self.num_heads, jnp.float32, name='Dense_1', use_bias=False, kernel_init=_trunc02)(nn.relu(h))


class WindowAttentionV2(nn.Module):
    """Scaled cosine attention inside windows with the continuous relative position bias and an optional mask."""
    num_heads: int
    window_size: Pair
    pretrained_window_size: Pair = (0, 0)
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True):
        bw, n, dim = x.shape
        heads = self.num_heads
        head_dim = dim // heads
        logit_scale = self.param('logit_scale', lambda _, s: jnp.full(s, math.log(10.0), jnp.float32), (heads, 1, 1))
        kernel, _ = ProjectionParams(features=(3 * dim,), use_bias=False, kernel_init=_trunc02, name='qkv')(dim)
        bias = None
        if self.qkv_bias:
            q_bias = self.param('q_bias', nn.initializers.zeros, (dim,))
            v_bias = self.param('v_bias', nn.initializers.zeros, (dim,))
            bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias])
        y = fused_projection(x, [(kernel, bias)], self.dtype)   # float32, not yet rounded
        scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), LOGIT_SCALE_MAX))
        if jnp.finfo(self.dtype).bits < 32:
            # autocast's order: the projection rounded once (timm's bf16 linear output), the heads moved in bf16,
            # then normalised in float32 (module docstring)
            q, k, v = split_heads(y, 3, heads, self.dtype)
            q, k = (cosine_qk if fast_path(self.attn_impl) else cosine_qk_reference)(q, k, scale)
        else:
            q, k, v = y.reshape(bw, n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            q = (l2_normalize(q) * scale).astype(self.dtype)      # the logit scale folded into q, as a "scaled q"
            k = l2_normalize(k).astype(self.dtype)
            v = v.astype(self.dtype)

        coords = jnp.asarray(relative_coords_table(self.window_size, self.pretrained_window_size))
        table = CpbMlp(heads, name='cpb_mlp')(coords.reshape(-1, 2))
        index = relative_position_index(self.window_size).reshape(-1)
        pos = jnp.take(table, index, axis=0).reshape(n, n, heads).transpose(2, 0, 1)
        pos = 16.0 * nn.sigmoid(pos)
        if mask is not None:   # windows of one image are consecutive: (B, nW, heads, n, .) against (nW, n, n)
            nw = mask.shape[0]
            pos = pos[None] + jnp.asarray(mask)[:, None]
            q, k, v = (t.reshape(-1, nw, heads, n, head_dim) for t in (q, k, v))
        drop = nn.Dropout(rate=self.attn_drop_rate)
        out = dot_product_attention(q, k, v, pos, impl=self.attn_impl, dropout=active_dropout(drop, deterministic))
        out = merge_heads(out.reshape(bw, heads, n, head_dim))
        out = dense(dim, self.dtype, name='proj', kernel_init=_trunc02)(out)
        return nn.Dropout(rate=self.proj_drop_rate)(out, deterministic=deterministic)


class SwinTransformerV2Block(nn.Module):
    """Residual post-norm block: x + norm1(attn(x)), then x + norm2(mlp(x)), drop path on each branch.

    `window_size`/`shift_size` are the block's resolved values (clamped to the configured stage resolution).
    timm and Microsoft initialise norm1/norm2 to zeros (`_init_respostnorm`): so does this block."""
    num_heads: int
    window_size: Pair
    shift_size: Pair = (0, 0)
    pretrained_window_size: Pair = (0, 0)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    gelu: str = 'exact'
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        attn = WindowAttentionV2(num_heads=self.num_heads, window_size=self.window_size,
                                 pretrained_window_size=self.pretrained_window_size, qkv_bias=self.qkv_bias,
                                 proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                                 dtype=self.dtype, attn_impl=self.attn_impl, name='attn')
        y = attend_in_windows(x, self.window_size, self.shift_size, lambda w, m: attn(w, m, deterministic))
        zeros = nn.initializers.zeros
        norm = lambda name: LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, scale_init=zeros, name=name)
        x = x + DropPath()(norm('norm1')(y), rate=self.drop_path_rate, deterministic=deterministic)
        y = MlpBlock(mlp_dim=int(x.shape[-1] * self.mlp_ratio), drop_rate=self.proj_drop_rate, gelu=self.gelu,
                     dtype=self.dtype, kernel_init=_trunc02, bias_init=nn.initializers.zeros,
                     name='mlp')(x, deterministic)
        y = mlp_output(y, self.dtype, self.attn_impl, deterministic)
        return x + DropPath()(norm('norm2')(y), rate=self.drop_path_rate, deterministic=deterministic)


class SwinTransformerV2Stage(nn.Module):
    """timm's `SwinTransformerV2Stage`: optional patch merging (reduce, then norm) first, then the blocks."""
    out_dim: int
    depth: int
    num_heads: int
    window_size: Pair
    shift_size: Pair
    pretrained_window_size: Pair
    has_downsample: bool
    drop_path_rates: Sequence[float]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    gelu: str = 'exact'
    norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None
    attn_impl: str = 'auto'

    def setup(self):
        if self.has_downsample:
            self.downsample = PatchMerging(out_dim=self.out_dim, norm_eps=self.norm_eps, dtype=self.dtype,
                                           reduce_first=True)
        block_cls = remat_block(SwinTransformerV2Block, self.remat, self.remat_policy)
        self.blocks = [
            block_cls(num_heads=self.num_heads, window_size=self.window_size,
                      shift_size=self.shift_size if j % 2 else (0, 0),
                      pretrained_window_size=self.pretrained_window_size, mlp_ratio=self.mlp_ratio,
                      qkv_bias=self.qkv_bias, proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                      drop_path_rate=self.drop_path_rates[j], gelu=self.gelu, norm_eps=self.norm_eps,
                      dtype=self.dtype, attn_impl=self.attn_impl)
            for j in range(self.depth)]

    def __call__(self, x, deterministic: bool = True):
        if self.has_downsample:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, deterministic)
        return x


class SwinTransformerV2(SwinGrid, nn.Module):
    """Swin Transformer V2. Input NHWC images; output logits (pooled features with `num_classes=0`).

    `pretrained_window_sizes`: per stage, the window the weights were pretrained with (0: the window itself);
    it only changes the constant coordinate table. Intermediates as V1: `embed`, `stage_{i}`, `encoded`."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 256
    patch_size: Union[int, Sequence[int]] = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: Union[int, Sequence[int]] = 8   # one for every stage, an (h, w) pair, or one per stage
    pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0)
    always_partition: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0        # before the head (timm's drop_rate)
    proj_drop_rate: float = 0.0   # after attention's proj and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1   # timm's and Microsoft's default; only acts with train=True
    gelu: Literal['exact', 'tanh'] = 'exact'
    norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None
    attn_impl: AttnImpl = 'auto'  # the attention kernel (ops/attention.py)

    def stage_pretrained_windows(self) -> Tuple[Pair, ...]:
        if len(self.pretrained_window_sizes) != self.num_layers:
            raise ModelConfigError(f'{self.num_layers} stages but {len(self.pretrained_window_sizes)} '
                                   f'pretrained_window_sizes entries')
        return tuple(to_tuple(p, 2) for p in self.pretrained_window_sizes)

    def setup(self):
        if len(self.num_heads) != self.num_layers:
            raise ModelConfigError(f'{len(self.depths)} stages but {len(self.num_heads)} num_heads entries')
        check_impl(self.attn_impl)
        self.patch_embed = PatchEmbed(patch_size=to_tuple(self.patch_size, 2), embed_dim=self.embed_dim,
                                      norm_eps=self.norm_eps, dtype=self.dtype)
        dpr = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages, start = [], 0
        for i, ((window, shift), pretrained, depth) in enumerate(zip(self.stage_windows(),
                                                                      self.stage_pretrained_windows(), self.depths)):
            stages.append(SwinTransformerV2Stage(
                out_dim=int(self.embed_dim * 2 ** i), depth=depth, num_heads=self.num_heads[i], window_size=window,
                shift_size=shift, pretrained_window_size=pretrained, has_downsample=i > 0,
                drop_path_rates=tuple(dpr[start:start + depth]), mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias,
                proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate, gelu=self.gelu,
                norm_eps=self.norm_eps, remat=self.remat, dtype=self.dtype, remat_policy=self.remat_policy,
                attn_impl=self.attn_impl))
            start += depth
        self.layers = stages
        self.norm = LayerNorm(epsilon=self.norm_eps, dtype=self.dtype)
        self.head_dropout = nn.Dropout(rate=self.drop_rate)
        if self.num_classes > 0:
            self.head = dense(self.num_classes, self.dtype, kernel_init=_trunc02)

    def forward_features(self, x, train: bool = False):
        """Images (B, H, W, C) -> normed feature map (B, H/32, W/32, num_features), like timm's."""
        return swin_features(self, x, train)

    def forward_head(self, x, train: bool = False, pre_logits: bool = False):
        """Feature map -> global average pool -> head (pooled features with `pre_logits` or `num_classes=0`)."""
        return swin_head(self, x, train, pre_logits)

    def __call__(self, x, train: bool = False):
        return self.forward_head(self.forward_features(x, train), train)


_FINE_TUNED = (12, 12, 12, 6)   # the 12toN models' pretrained windows (stage 4 was 6x6 at 192)

# timm's twelve `swinv2_*` names with the defaults of their (only or first) pretrained tag: input size, classes
# (the 192-pixel in22k models have 21841), window and pretrained windows.
for _name, _size, _window, _res, _classes, _pretrained in [
        ('swinv2_tiny_window8_256', 'tiny', 8, 256, 1000, None),
        ('swinv2_tiny_window16_256', 'tiny', 16, 256, 1000, None),
        ('swinv2_small_window8_256', 'small', 8, 256, 1000, None),
        ('swinv2_small_window16_256', 'small', 16, 256, 1000, None),
        ('swinv2_base_window8_256', 'base', 8, 256, 1000, None),
        ('swinv2_base_window16_256', 'base', 16, 256, 1000, None),
        ('swinv2_base_window12_192', 'base', 12, 192, 21841, None),
        ('swinv2_base_window12to16_192to256', 'base', 16, 256, 1000, _FINE_TUNED),
        ('swinv2_base_window12to24_192to384', 'base', 24, 384, 1000, _FINE_TUNED),
        ('swinv2_large_window12_192', 'large', 12, 192, 21841, None),
        ('swinv2_large_window12to16_192to256', 'large', 16, 256, 1000, _FINE_TUNED),
        ('swinv2_large_window12to24_192to384', 'large', 24, 384, 1000, _FINE_TUNED)]:
    register(_name, SwinTransformerV2, img_size=_res, patch_size=4, window_size=_window, num_classes=_classes,
             pretrained_window_sizes=_pretrained or (0, 0, 0, 0), **SIZES[_size])
