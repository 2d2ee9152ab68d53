"""Swin Transformer (V1) in Flax linen, numerically matching timm's `SwinTransformer`.

Parameter tree (timm's module names, flax leaf names):
`patch_embed/{proj, norm}`, `layers_{i}/downsample/{norm, reduction}` (i > 0: timm puts the patch merging
at the start of the next stage, Microsoft's release at the end of the previous one),
`layers_{i}/blocks_{j}/{norm1, attn/{relative_position_bias_table, qkv, proj}, norm2, mlp/{Dense_0, Dense_1}}`,
`norm`, `head` (timm `head.fc`). The relative position index and the shifted-window masks are not
parameters: they are recomputed as constants at trace time.

Window geometry follows timm exactly:
- each stage's window and shift are fixed from the configured `img_size` (as timm does at construction):
  a stage whose resolution is <= the window attends over the whole (clamped) window with no shift,
  unless `always_partition`;
- inputs of another size are accepted (like timm with `strict_img_size=False`): the feature map is padded
  right/bottom to a multiple of the window after the cyclic shift, and the -100 mask is built for the
  padded size of the actual input, with timm's region slices;
- images whose size is not a multiple of the patch are zero-padded right/bottom (timm's
  `dynamic_img_pad`, Microsoft's detection code); patch merging pads odd sizes the same way.

`attn_impl` (default 'auto') selects the attention implementation (ops/attention.py): 'manual_grad' (the
formula with hand-written derivatives, CPU's 'auto'; 'autodiff' whenever attention dropout is active in training),
'autodiff' (the formula, JAX's derivatives), 'xla', 'cudnn' (GPU), 'pallas' or 'splash' (TPU); the old names 'reference',
'fused' and 'plain' are accepted with a DeprecationWarning. The relative position bias and
the shift mask go to every implementation as its additive bias. Same parameters.

Intermediates: apply with `mutable=['intermediates']` to get the patch embedding `embed` (B, H/4, W/4, C),
each stage's output `stage_{i}` (= timm's `layers.{i}`, NHWC) and the normed map `encoded` (timm's `norm`).
(Flax forbids sowing under a name a submodule already uses, hence not `patch_embed`/`layers_{i}`/`norm`.)
"""
import math
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl, dot_product_attention
from ..registry import register
from .layers import (DropPath, LayerNorm, MlpBlock, PatchConv, ProjectionParams, active_dropout, dense, drop_path_rates,
                     fused_projection, merge_heads, remat_block, split_heads, to_tuple)

Dtype = Any
Pair = Tuple[int, int]

_trunc02 = nn.initializers.truncated_normal(stddev=0.02)


def relative_position_index(window: Pair) -> np.ndarray:
    """(Wh*Ww, Wh*Ww) int64 index into the ((2Wh-1)*(2Ww-1), heads) bias table, as timm and Microsoft build it."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    return ((rel[..., 0] + wh - 1) * (2 * ww - 1) + (rel[..., 1] + ww - 1)).astype(np.int64)


def window_partition(x, window: Pair):
    """(B, H, W, C) -> (B * nW, Wh * Ww, C), windows in row-major order per image."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows, window: Pair, h: int, w: int):
    wh, ww = window
    c = windows.shape[-1]
    x = windows.reshape(-1, h // wh, w // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(padded: Pair, window: Pair, shift: Pair) -> np.ndarray:
    """(nW, N, N) float32 mask: -100 between tokens of different regions of the rolled map, else 0.

    Same slices as timm's `get_attn_mask` (and the official code), on the padded size, so a zero shift on
    one axis reproduces timm's behaviour too.
    """
    hp, wp = padded
    (wh, ww), (sh, sw) = window, shift
    img = np.zeros((1, hp, wp, 1), np.float32)
    cnt = 0
    for h0, h1 in ((0, -wh), (-wh, -sh), (-sh, None)):
        for w0, w1 in ((0, -ww), (-ww, -sw), (-sw, None)):
            img[:, h0:h1, w0:w1, :] = cnt
            cnt += 1
    win = img.reshape(1, hp // wh, wh, wp // ww, ww, 1).transpose(0, 1, 3, 2, 4, 5).reshape(-1, wh * ww)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, np.float32(-100.0), np.float32(0.0)).astype(np.float32)


def stage_window_shift(resolution: Pair, window: Pair, always_partition: bool) -> Tuple[Pair, Pair]:
    """timm's `_calc_window_shift` for a shifted block: (window, shift) per axis at a stage resolution."""
    shift = tuple(w // 2 for w in window)
    if always_partition:
        return tuple(window), shift
    window = tuple(r if r <= w else w for r, w in zip(resolution, window))
    shift = tuple(0 if r <= w else s for r, w, s in zip(resolution, window, shift))
    return window, shift


def stage_window_sizes(window_size, num_stages: int) -> Tuple[Pair, ...]:
    """One (h, w) window per stage, as timm's `resolve_stage_window_sizes`: an int or an (h, w) pair for every
    stage, or one int (or pair) per stage (Swin-S3: (7, 7, 14, 7)). A sequence of two ints is always one (h, w)."""
    if not isinstance(window_size, (tuple, list)) or (len(window_size) == 2 and
                                                       not isinstance(window_size[0], (tuple, list))):
        window_size = (window_size,) * num_stages
    if len(window_size) != num_stages:
        raise ModelConfigError(f'{num_stages} stages but {len(window_size)} window sizes {tuple(window_size)}')
    return tuple(to_tuple(w, 2) for w in window_size)


def attend_in_windows(x, window: Pair, shift: Pair, attend):
    """(B, H, W, C) -> (B, H, W, C): timm's shifted-window plumbing around `attend(windows, mask)`, where
    windows are (B * nW, Wh * Ww, C) and mask the (nW, N, N) -100 mask of the rolled, padded map (None
    without a shift). Rolls first and pads after (the padding always sits at the bottom/right of the rolled
    map), as timm does for V1 and V2 alike."""
    b, h, w, c = x.shape
    (wh, ww), (sh, sw) = window, shift
    has_shift = bool(sh or sw)
    if has_shift:
        x = jnp.roll(x, (-sh, -sw), axis=(1, 2))
    pad_h, pad_w = (wh - h % wh) % wh, (ww - w % ww) % ww
    if pad_h or pad_w:
        x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    hp, wp = h + pad_h, w + pad_w
    mask = shifted_window_mask((hp, wp), window, shift) if has_shift else None
    windows = attend(window_partition(x, window), mask)
    x = window_reverse(windows, window, hp, wp)[:, :h, :w, :]
    if has_shift:
        x = jnp.roll(x, (sh, sw), axis=(1, 2))
    return x


class WindowAttention(nn.Module):
    """Multi-head self attention inside windows, with the learned relative position bias and an optional mask.

    timm's order: q is scaled before q @ k^T, then bias and mask are added, then softmax (in float32).
    """
    num_heads: int
    window_size: Pair
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, mask=None, deterministic: bool = True):
        bw, n, dim = x.shape
        heads = self.num_heads
        head_dim = dim // heads
        wh, ww = self.window_size
        table = self.param('relative_position_bias_table', _trunc02, ((2 * wh - 1) * (2 * ww - 1), heads))
        qkv = ProjectionParams(features=(3 * dim,), use_bias=self.qkv_bias, kernel_init=_trunc02, name='qkv')(dim)
        scale = self.qk_scale if self.qk_scale is not None else head_dim ** -0.5
        q, k, v = split_heads(fused_projection(x, [qkv], self.dtype), 3, heads, self.dtype, scale)
        index = relative_position_index(self.window_size).reshape(-1)
        bias = jnp.take(table, index, axis=0).reshape(n, n, heads).transpose(2, 0, 1).astype(jnp.float32)
        if mask is not None:  # windows of one image are consecutive: (B, nW, heads, n, .) against (nW, n, n)
            nw = mask.shape[0]
            bias = bias[None] + jnp.asarray(mask)[:, None]
            q, k, v = (t.reshape(-1, nw, heads, n, head_dim) for t in (q, k, v))
        drop = nn.Dropout(rate=self.attn_drop_rate)
        out = dot_product_attention(q, k, v, bias, impl=self.attn_impl, dropout=active_dropout(drop, deterministic))
        out = dense(dim, self.dtype, name='proj', kernel_init=_trunc02)(merge_heads(out.reshape(bw, heads, n, head_dim)))
        return nn.Dropout(rate=self.proj_drop_rate)(out, deterministic=deterministic)


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: (shifted) window attention then MLP, each residual branch with drop path.

    `window_size`/`shift_size` are this block's resolved values (already clamped to the configured stage
    resolution); the padding and the mask follow the actual input.
    """
    num_heads: int
    window_size: Pair
    shift_size: Pair = (0, 0)
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    gelu: str = 'exact'
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    def _attn(self, x, deterministic):
        attn = WindowAttention(num_heads=self.num_heads, window_size=self.window_size, qkv_bias=self.qkv_bias,
                               qk_scale=self.qk_scale, proj_drop_rate=self.proj_drop_rate,
                               attn_drop_rate=self.attn_drop_rate, dtype=self.dtype, attn_impl=self.attn_impl,
                               name='attn')
        return attend_in_windows(x, self.window_size, self.shift_size, lambda w, m: attn(w, m, deterministic))

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        y = LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm1')(x)
        x = x + DropPath()(self._attn(y, deterministic), rate=self.drop_path_rate, deterministic=deterministic)
        y = LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm2')(x)
        y = MlpBlock(mlp_dim=int(x.shape[-1] * self.mlp_ratio), drop_rate=self.proj_drop_rate, gelu=self.gelu,
                     dtype=self.dtype, kernel_init=_trunc02, bias_init=nn.initializers.zeros,
                     name='mlp')(y, deterministic)
        return x + DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> 4C channels in the order (0,0), (1,0), (0,1), (1,1) (row offset fastest),
    LayerNorm(4C), bias-free Linear to `out_dim`. Odd sizes are zero-padded at the bottom/right."""
    out_dim: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    reduce_first: bool = False   # Swin V2: the reduction first, then LayerNorm(out_dim)

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
            h, w = h + h % 2, w + w % 2
        # (B, H/2, dh, W/2, dw, C) -> (B, H/2, W/2, dw, dh, C): dh varies fastest among the four slices
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
        norm = LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm')
        reduction = dense(self.out_dim, self.dtype, name='reduction', use_bias=False, kernel_init=_trunc02)
        return norm(reduction(x)) if self.reduce_first else reduction(norm(x))


class PatchEmbed(nn.Module):
    """Patchify (zero-padding the image right/bottom to a multiple of the patch), project, LayerNorm."""
    patch_size: Pair
    embed_dim: int
    norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        ph, pw = self.patch_size
        pad_h, pad_w = (ph - x.shape[1] % ph) % ph, (pw - x.shape[2] % pw) % pw
        if pad_h or pad_w:
            x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        x = PatchConv(features=self.embed_dim, patch_size=self.patch_size, dtype=self.dtype, name='proj')(x)
        return LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm')(x)


class SwinStage(nn.Module):
    """timm's `SwinTransformerStage`: optional patch merging first, then blocks alternating W-MSA / SW-MSA."""
    out_dim: int
    depth: int
    num_heads: int
    window_size: Pair
    shift_size: Pair
    has_downsample: bool
    drop_path_rates: Sequence[float]
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
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
        block_cls = remat_block(SwinTransformerBlock, self.remat, self.remat_policy)
        self.blocks = [
            block_cls(num_heads=self.num_heads, window_size=self.window_size,
                      shift_size=self.shift_size if j % 2 else (0, 0), mlp_ratio=self.mlp_ratio,
                      qkv_bias=self.qkv_bias, qk_scale=self.qk_scale, proj_drop_rate=self.proj_drop_rate,
                      attn_drop_rate=self.attn_drop_rate, drop_path_rate=self.drop_path_rates[j], gelu=self.gelu,
                      norm_eps=self.norm_eps, dtype=self.dtype, attn_impl=self.attn_impl)
            for j in range(self.depth)]

    def __call__(self, x, deterministic: bool = True):
        if self.has_downsample:
            x = self.downsample(x)
        for block in self.blocks:
            x = block(x, deterministic)
        return x


class SwinGrid:
    """The stage geometry every Swin (V1, V2, V2 CR) derives from its `img_size`, `patch_size`, `in_chans`,
    `embed_dim`, `depths`, `window_size` and `always_partition` fields (a mixin of plain properties, so they work
    on unbound modules too). Unlike `layers.PatchGrid` the token grid rounds up: Swin's patch embedding pads."""

    @property
    def input_shape(self):
        return to_tuple(self.img_size, 2) + (self.in_chans,)

    @property
    def num_layers(self) -> int:
        return len(self.depths)

    @property
    def num_features(self) -> int:
        return int(self.embed_dim * 2 ** (self.num_layers - 1))

    @property
    def grid_size(self) -> Pair:
        img, patch = to_tuple(self.img_size, 2), to_tuple(self.patch_size, 2)
        return tuple(math.ceil(i / p) for i, p in zip(img, patch))

    def stage_resolutions(self):
        """Block resolution of each stage at the configured img_size (ceil halving, as padded merging gives)."""
        res, out = self.grid_size, []
        for i in range(self.num_layers):
            if i > 0:
                res = tuple((r + 1) // 2 for r in res)
            out.append(res)
        return out

    def stage_windows(self):
        """(window, shift) of each stage's shifted blocks, fixed by the configured img_size as in timm."""
        windows = stage_window_sizes(self.window_size, self.num_layers)
        return [stage_window_shift(r, w, self.always_partition) for r, w in zip(self.stage_resolutions(), windows)]


def swin_features(model, x, train: bool):
    """Swin V1's and V2's `forward_features` (both models hold `patch_embed`, `layers`, `norm`): images
    (B, H, W, C) -> the normed feature map, sowing 'embed', 'stage_i' and 'encoded' intermediates."""
    if x.ndim != 4 or x.shape[-1] != model.in_chans:
        raise ModelConfigError(f'expected NHWC images with {model.in_chans} channels, got shape {tuple(x.shape)}')
    x = model.patch_embed(x.astype(model.dtype))
    model.sow('intermediates', 'embed', x)
    for i, stage in enumerate(model.layers):
        x = stage(x, not train)
        model.sow('intermediates', f'stage_{i}', x)
    x = model.norm(x)
    model.sow('intermediates', 'encoded', x)
    return x


def swin_head(model, x, train: bool, pre_logits: bool):
    """Swin V1's and V2's `forward_head`: global average pool, then dropout and `head` unless `pre_logits` or
    `num_classes=0`."""
    x = x.mean(axis=(1, 2))
    if pre_logits or model.num_classes == 0:
        return x
    return model.head(model.head_dropout(x, deterministic=not train))


class SwinTransformer(SwinGrid, nn.Module):
    """Swin Transformer V1. Input NHWC images; output logits (pooled features with `num_classes=0`)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    patch_size: Union[int, Sequence[int]] = 4
    in_chans: int = 3
    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: Union[int, Sequence[int]] = 7   # one for every stage, an (h, w) pair, or one per stage (S3)
    always_partition: bool = False
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: Optional[float] = None  # Microsoft's option; timm has none (its scale is head_dim ** -0.5)
    drop_rate: float = 0.0        # before the head (timm's drop_rate)
    proj_drop_rate: float = 0.0   # after attention's proj and in the MLP (Microsoft's drop_rate)
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1   # timm's and Microsoft's default; only acts with train=True
    gelu: Literal['exact', 'tanh'] = 'exact'
    norm_eps: float = 1e-5
    remat: bool = False
    dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None  # jax.checkpoint_policies name used with remat (None: save nothing)
    attn_impl: AttnImpl = 'auto'  # the attention kernel (module docstring)

    def setup(self):
        if len(self.num_heads) != self.num_layers:
            raise ModelConfigError(f'{len(self.depths)} stages but {len(self.num_heads)} num_heads entries')
        check_impl(self.attn_impl)
        self.patch_embed = PatchEmbed(patch_size=to_tuple(self.patch_size, 2), embed_dim=self.embed_dim,
                                      norm_eps=self.norm_eps, dtype=self.dtype)
        dpr = drop_path_rates(self.drop_path_rate, sum(self.depths))
        stages, start = [], 0
        for i, ((window, shift), depth) in enumerate(zip(self.stage_windows(), self.depths)):
            stages.append(SwinStage(
                out_dim=int(self.embed_dim * 2 ** i), depth=depth, num_heads=self.num_heads[i], window_size=window,
                shift_size=shift, has_downsample=i > 0, drop_path_rates=tuple(dpr[start:start + depth]),
                mlp_ratio=self.mlp_ratio, qkv_bias=self.qkv_bias, qk_scale=self.qk_scale,
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


SIZES = dict(  # timm's Swin sizes, V1 and V2 alike
    tiny=dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    small=dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    base=dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    large=dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
)

# timm's registered Swin V1 names; its 21841-class variants are the same names with num_classes=21841.
for _size, _window, _res in [('tiny', 7, 224), ('small', 7, 224), ('base', 7, 224), ('base', 12, 384),
                             ('large', 7, 224), ('large', 12, 384)]:
    register(f'swin_{_size}_patch4_window{_window}_{_res}', SwinTransformer, img_size=_res, patch_size=4,
             window_size=_window, **SIZES[_size])

# Swin-S3 (Chen et al., https://arxiv.org/abs/2111.14725): V1 with a window per stage, as timm registers them.
for _size, _depths, _windows in [('tiny', (2, 2, 6, 2), (7, 7, 14, 7)), ('small', (2, 2, 18, 2), (14, 14, 14, 7)),
                                 ('base', (2, 2, 30, 2), (7, 7, 14, 7))]:
    register(f'swin_s3_{_size}_224', SwinTransformer, img_size=224, patch_size=4, window_size=_windows,
             embed_dim=96, depths=_depths, num_heads=(3, 6, 12, 24))
