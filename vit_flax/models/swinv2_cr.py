"""Swin Transformer V2 "CR" (Christoph Reich's re-implementation, timm's `swin_transformer_v2_cr` module) in Flax
linen, numerically matching timm's `SwinTransformerV2Cr`.

A separate architecture from Microsoft's V2 (vit_flax.models.swinv2) with its own keys; what differs:
- attention: a fused `qkv` with a full bias (a key bias too), `logit_scale` of shape (heads,) (not (heads, 1, 1)),
  scaled cosine attention `normalize(q) @ normalize(k)^T * exp(min(logit_scale, log(100)))`, no head_dim scaling;
- position bias: the "meta" MLP `meta_mlp` (Linear(2, 384) + ReLU + Dropout(0.125) + Linear(384, heads), both with
  bias) evaluated on every pair of window positions (N^2 rows, as timm does: the dropout draws per pair and the
  MACs are timm's), on `sign(d) * ln(1 + |d|)` of the raw offsets d (no normalisation by the window, no
  16 * sigmoid): a window change needs no table resampling;
- patch merging: LayerNorm(4C) first, then the reduction (V1's order; Microsoft's V2 reduces first);
- no final `norm`: the last block of the last stage carries a third LayerNorm `norm3` on the main branch (and so
  does the last block of every stage with `extra_norm_stage`, and every `extra_norm_period`-th block: 6 for
  huge/giant), applied after the MLP residual;
- the window of every stage is `grid // window_ratio` (8) unless `window_size` is given, clamped per stage as
  V1's/V2's; `drop_path_rate` defaults to 0.

Parameter tree (timm's module names, flax leaf names): `patch_embed/{proj, norm}`,
`stages_{i}/downsample/{norm, reduction}` (i > 0), `stages_{i}/blocks_{j}/{attn/{qkv, logit_scale,
meta_mlp/{Dense_0, Dense_1}, proj}, norm1, mlp/{Dense_0, Dense_1}, norm2, norm3 (where present)}`, `head`
(timm `head.fc`). timm runs its stages on NCHW tensors and its blocks on NHWC ones: the same arithmetic, NHWC here.

Post-norm block (res-post-norm): `x = x + drop_path(norm1(attn(x)))`, `x = x + drop_path(norm2(mlp(x)))`, then
`norm3(x)` where present; norm1/norm2 scales start at `init_values` (0, timm's default; None: 1).

Under `dtype=bfloat16` the projections, the attention products and the MLP run in bf16; the cosine normalisation,
the logit scale and the position-bias MLP stay float32 (as the Swin V2 module).

Intermediates (`mutable=['intermediates']`): `embed` (B, H/4, W/4, C), `stage_{i}` (timm's `stages.{i}`, NHWC)
and `encoded` (= the last stage's output, already normed by its last `norm3`).
"""
import math
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl, dot_product_attention
from ..registry import register
from .layers import (DropPath, LayerNorm, MlpBlock, ProjectionParams, active_dropout, dense, drop_path_rates,
                     fused_projection, merge_heads, remat_block, to_tuple)
from .swin import PatchEmbed, PatchMerging, SwinGrid, attend_in_windows, stage_window_shift, stage_window_sizes
from .swinv2 import LOGIT_SCALE_MAX, l2_normalize, mlp_output

Dtype = Any
Pair = Tuple[int, int]

_trunc02 = nn.initializers.truncated_normal(stddev=0.02)
META_HIDDEN = 384       # timm's meta_hidden_dim (fixed for every size)
META_DROP = 0.125       # timm's meta_mlp dropout after the ReLU (training only)


def relative_coordinates_log(window: Pair) -> np.ndarray:
    """(Wh*Ww * Wh*Ww, 2) float32: for every pair (i, j) of window positions (row i*N + j), the offset
    c_i - c_j (row, column) as `sign(d) * ln(1 + |d|)`, timm's `relative_coordinates_log` buffer."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh, dtype=np.float32), np.arange(ww, dtype=np.float32),
                                  indexing='ij')).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).reshape(-1, 2).astype(np.float32)
    return (np.sign(rel) * np.log(np.float32(1.0) + np.abs(rel))).astype(np.float32)


class MetaMlp(nn.Module):
    """timm's `meta_mlp` (Mlp(2, 384, heads, ReLU, drop=(0.125, 0))), always float32."""
    num_heads: int
    hidden: int = META_HIDDEN
    drop_rate: float = META_DROP

    @nn.compact
    def __call__(self, coords, deterministic: bool = True):
        h = nn.relu(dense(self.hidden, jnp.float32, name='Dense_0', kernel_init=_trunc02)(coords))
        h = nn.Dropout(rate=self.drop_rate)(h, deterministic=deterministic)
        return dense(self.num_heads, jnp.float32, name='Dense_1', kernel_init=_trunc02)(h)


class WindowMultiHeadAttention(nn.Module):
    """Scaled cosine attention inside windows with the meta-MLP position bias and an optional shift mask."""
    num_heads: int
    window_size: Pair
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True):
        bw, n, dim = x.shape
        heads = self.num_heads
        if dim % heads:
            raise ModelConfigError(f'width {dim} is not divisible by {heads} heads')
        head_dim = dim // heads
        qkv = ProjectionParams(features=(3 * dim,), use_bias=True, kernel_init=_trunc02, name='qkv')(dim)
        logit_scale = self.param('logit_scale', lambda _, s: jnp.full(s, math.log(10.0), jnp.float32), (heads,))
        y = fused_projection(x, [qkv], self.dtype)   # float32, not yet rounded
        q, k, v = y.reshape(bw, n, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
        scale = jnp.exp(jnp.minimum(logit_scale.astype(jnp.float32), LOGIT_SCALE_MAX)).reshape(heads, 1, 1)
        q = (l2_normalize(q) * scale).astype(self.dtype)      # the logit scale folded into q
        k = l2_normalize(k).astype(self.dtype)
        v = v.astype(self.dtype)

        coords = jnp.asarray(relative_coordinates_log(self.window_size))
        pos = MetaMlp(heads, name='meta_mlp')(coords, deterministic)            # (N*N, heads)
        pos = pos.T.reshape(heads, n, n)
        if mask is not None:   # windows of one image are consecutive: (B, nW, heads, n, .) against (nW, n, n)
            nw = mask.shape[0]
            pos = pos[None] + jnp.asarray(mask)[:, None]
            q, k, v = (t.reshape(-1, nw, heads, n, head_dim) for t in (q, k, v))
        drop = nn.Dropout(rate=self.attn_drop_rate)
        out = dot_product_attention(q, k, v, pos, impl=self.attn_impl, dropout=active_dropout(drop, deterministic))
        out = merge_heads(out.reshape(bw, heads, n, head_dim))
        out = dense(dim, self.dtype, name='proj', kernel_init=_trunc02)(out)
        return nn.Dropout(rate=self.proj_drop_rate)(out, deterministic=deterministic)


class SwinTransformerV2CrBlock(nn.Module):
    """Residual post-norm block (module docstring); `window_size`/`shift_size` are the block's resolved values."""
    num_heads: int
    window_size: Pair
    shift_size: Pair = (0, 0)
    mlp_ratio: float = 4.0
    init_values: Optional[float] = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    extra_norm: bool = False
    gelu: str = 'exact'
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        attn = WindowMultiHeadAttention(num_heads=self.num_heads, window_size=self.window_size,
                                        proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                                        dtype=self.dtype, attn_impl=self.attn_impl, name='attn')
        y = attend_in_windows(x, self.window_size, self.shift_size, lambda w, m: attn(w, m, deterministic))
        init = nn.initializers.ones if self.init_values is None else nn.initializers.constant(self.init_values)
        norm = lambda name, scale_init=init: LayerNorm(epsilon=self.norm_eps, dtype=self.dtype,
                                                          scale_init=scale_init, name=name)
        x = x + DropPath()(norm('norm1')(y), rate=self.drop_path_rate, deterministic=deterministic)
        y = MlpBlock(mlp_dim=int(x.shape[-1] * self.mlp_ratio), drop_rate=self.proj_drop_rate, gelu=self.gelu,
                     dtype=self.dtype, kernel_init=_trunc02, bias_init=nn.initializers.zeros,
                     name='mlp')(x, deterministic)
        y = mlp_output(y, self.dtype, self.attn_impl, deterministic)   # XLA:CPU's post-norm fusion: swinv2
        x = x + DropPath()(norm('norm2')(y), rate=self.drop_path_rate, deterministic=deterministic)
        return norm('norm3', nn.initializers.ones)(x) if self.extra_norm else x


def extra_norm_blocks(depth: int, period: int, at_end: bool) -> Tuple[bool, ...]:
    """Which blocks of a stage carry `norm3`: every `period`-th (1-based) and, with `at_end`, the last."""
    return tuple(bool(period and (j + 1) % period == 0) or (at_end and j + 1 == depth) for j in range(depth))


class SwinTransformerV2CrStage(nn.Module):
    """timm's `SwinTransformerV2CrStage`: patch merging (norm, then reduction) first unless stage 0, then blocks."""
    out_dim: int
    depth: int
    num_heads: int
    window_size: Pair
    shift_size: Pair
    has_downsample: bool
    drop_path_rates: Sequence[float]
    extra_norms: Sequence[bool]
    mlp_ratio: float = 4.0
    init_values: Optional[float] = 0.0
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
            self.downsample = PatchMerging(out_dim=self.out_dim, norm_eps=self.norm_eps, dtype=self.dtype)
        block_cls = remat_block(SwinTransformerV2CrBlock, self.remat, self.remat_policy)
        self.blocks = [
            block_cls(num_heads=self.num_heads, window_size=self.window_size,
                      shift_size=self.shift_size if j % 2 else (0, 0), mlp_ratio=self.mlp_ratio,
                      init_values=self.init_values, proj_drop_rate=self.proj_drop_rate,
                      attn_drop_rate=self.attn_drop_rate, drop_path_rate=self.drop_path_rates[j],
                      extra_norm=self.extra_norms[j], gelu=self.gelu, norm_eps=self.norm_eps, dtype=self.dtype,
                      attn_impl=self.attn_impl)
            for j in range(self.depth)]

    def __call__(self, x, deterministic: bool = True):
        if self.has_downsample:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, deterministic)
        return x


class SwinTransformerV2Cr(SwinGrid, nn.Module):
    """Swin Transformer V2 CR. Input NHWC images; output logits (pooled features with `num_classes=0`).

    `window_size` None: each stage's window is `grid // window_ratio` per axis (timm's default, ratio 8: 7 at 224,
    8 at 256, 12 at 384); else an int, an (h, w) pair, or one per stage, as timm's. Inputs of another size than
    `img_size` are accepted (timm's `strict_img_size=False`): windows stay those of `img_size`, masks and padding
    follow the input."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    patch_size: Union[int, Sequence[int]] = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: Optional[Union[int, Sequence[int]]] = None
    window_ratio: Union[int, Sequence[int]] = 8
    always_partition: bool = False
    mlp_ratio: float = 4.0
    init_values: Optional[float] = 0.0   # norm1/norm2 scales' start (timm's init_values; None: 1)
    extra_norm_period: int = 0           # norm3 on every N-th block of a stage (huge/giant: 6)
    extra_norm_stage: bool = False       # norm3 on the last block of every stage (the `_ns` names)
    drop_rate: float = 0.0        # before the head (timm's drop_rate)
    proj_drop_rate: float = 0.0   # after attention's proj and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0   # timm's default for this module
    gelu: Literal['exact', 'tanh'] = 'exact'
    norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None
    attn_impl: AttnImpl = 'auto'

    def stage_target_windows(self) -> Tuple[Pair, ...]:
        """Each stage's window before clamping: `window_size` (timm's `resolve_stage_window_sizes`), else
        `grid // window_ratio` per stage (timm's `window_sizes_from_ratio`, at least 1)."""
        if self.window_size is not None:
            return stage_window_sizes(self.window_size, self.num_layers)
        ratios = to_tuple(self.window_ratio, self.num_layers)
        if len(ratios) != self.num_layers or any(int(r) < 1 for r in ratios):
            raise ModelConfigError(f'window_ratio {self.window_ratio}: one positive divisor, or one per stage '
                                   f'({self.num_layers})')
        return tuple(tuple(max(1, g // int(r)) for g in self.grid_size) for r in ratios)

    def stage_windows(self):
        """(window, shift) of each stage's shifted blocks, fixed by the configured img_size as in timm."""
        return [stage_window_shift(r, w, self.always_partition)
                for r, w in zip(self.stage_resolutions(), self.stage_target_windows())]

    def setup(self):
        if len(self.num_heads) != self.num_layers:
            raise ModelConfigError(f'{len(self.depths)} stages but {len(self.num_heads)} num_heads entries')
        check_impl(self.attn_impl)
        self.patch_embed = PatchEmbed(patch_size=to_tuple(self.patch_size, 2), embed_dim=self.embed_dim,
                                      norm_eps=self.norm_eps, dtype=self.dtype)
        dpr = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages, start = [], 0
        for i, ((window, shift), depth) in enumerate(zip(self.stage_windows(), self.depths)):
            last = i + 1 == self.num_layers
            stages.append(SwinTransformerV2CrStage(
                out_dim=int(self.embed_dim * 2 ** i), depth=depth, num_heads=self.num_heads[i], window_size=window,
                shift_size=shift, has_downsample=i > 0, drop_path_rates=tuple(dpr[start:start + depth]),
                extra_norms=extra_norm_blocks(depth, self.extra_norm_period, self.extra_norm_stage or last),
                mlp_ratio=self.mlp_ratio, init_values=self.init_values, proj_drop_rate=self.proj_drop_rate,
                attn_drop_rate=self.attn_drop_rate, gelu=self.gelu, norm_eps=self.norm_eps, remat=self.remat,
                dtype=self.dtype, remat_policy=self.remat_policy, attn_impl=self.attn_impl))
            start += depth
        self.stages = stages
        self.head_dropout = nn.Dropout(rate=self.drop_rate)
        if self.num_classes > 0:
            self.head = dense(self.num_classes, self.dtype, kernel_init=_trunc02)

    def forward_features(self, x, train: bool = False):
        """Images (B, H, W, C) -> the last stage's (normed) map (B, H/32, W/32, num_features), timm's
        `forward_features` in NHWC."""
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ModelConfigError(f'expected NHWC images with {self.in_chans} channels, got shape {tuple(x.shape)}')
        x = self.patch_embed(x.astype(self.dtype))
        self.sow('intermediates', 'embed', x)
        for i, stage in enumerate(self.stages):
            x = stage(x, not train)
            self.sow('intermediates', f'stage_{i}', x)
        self.sow('intermediates', 'encoded', x)
        return x

    def forward_head(self, x, train: bool = False, pre_logits: bool = False):
        """Feature map -> global average pool -> dropout -> head (pooled features with `pre_logits` or
        `num_classes=0`)."""
        x = x.mean(axis=(1, 2))
        if pre_logits or self.num_classes == 0:
            return x
        return self.head(self.head_dropout(x, deterministic=not train))

    def __call__(self, x, train: bool = False):
        return self.forward_head(self.forward_features(x, train), train)


_CR_SIZES = dict(
    tiny=dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    small=dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    base=dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    large=dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    # timm's huge has different head counts at 384 and 224 ("head count not certain")
    huge_384=dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88), extra_norm_period=6),
    huge_224=dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(8, 16, 32, 64), extra_norm_period=6),
    giant=dict(embed_dim=512, depths=(2, 2, 42, 2), num_heads=(16, 32, 64, 128), extra_norm_period=6),
)

# timm's sixteen `swinv2_cr_*` names (window = grid // 8 at their input size; `_ns`: a norm ending every stage)
for _name, _size, _res, _ns in [
        ('swinv2_cr_tiny_384', 'tiny', 384, False), ('swinv2_cr_tiny_224', 'tiny', 224, False),
        ('swinv2_cr_tiny_ns_224', 'tiny', 224, True), ('swinv2_cr_small_384', 'small', 384, False),
        ('swinv2_cr_small_224', 'small', 224, False), ('swinv2_cr_small_ns_224', 'small', 224, True),
        ('swinv2_cr_small_ns_256', 'small', 256, True), ('swinv2_cr_base_384', 'base', 384, False),
        ('swinv2_cr_base_224', 'base', 224, False), ('swinv2_cr_base_ns_224', 'base', 224, True),
        ('swinv2_cr_large_384', 'large', 384, False), ('swinv2_cr_large_224', 'large', 224, False),
        ('swinv2_cr_huge_384', 'huge_384', 384, False), ('swinv2_cr_huge_224', 'huge_224', 224, False),
        ('swinv2_cr_giant_384', 'giant', 384, False), ('swinv2_cr_giant_224', 'giant', 224, False)]:
    register(_name, SwinTransformerV2Cr, img_size=_res, patch_size=4, extra_norm_stage=_ns, **_CR_SIZES[_size])
