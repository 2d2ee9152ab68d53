"""ViT with relative position biases and no absolute position table: timm 1.0.31's `vision_transformer_relpos`
(`VisionTransformerRelPos`) in Flax, numerically matching timm.

A plain pre-norm ViT (patch embedding, optional class token, blocks, final norm, pooling, head) whose attention
logits get a relative position bias per head instead of an absolute position table being added to the tokens:
  'mlp'      (timm `RelPosMlp`, mode 'cr', the default and every registration): a two-layer ReLU MLP
             (2 -> rel_pos_dim (128) -> heads) of the log-spaced offsets sign(d) ln(1 + |d|) between patches,
             evaluated on the (2H-1, 2W-1) table of offsets and gathered per patch pair;
  'mlp_swin' (mode 'swin', Swin V2's continuous position bias): offsets scaled by 8 / (window - 1), then
             sign(d) log2(1 + |d|) / 3; the MLP's second Linear has no bias; the bias is 16 sigmoid(.);
  'bias'     (timm `RelPosBias`, Swin V1 / BEiT): a learned table of (2H-1)(2W-1) rows per head (+ 3 with a class
             token: cls->patch, patch->cls, cls->cls, BEiT's order), gathered per patch pair.
The MLP biases leave the class token's row and column zero. `shared_rel_pos`: one bias module for all blocks
(timm `shared_rel_pos`), else one per block. Blocks (`block_fn`): 'block' (timm `RelPosBlock`: x + ls1 *
attn(norm1 x), x + ls2 * mlp(norm2 x), LayerScale when `init_values`) or 'res_post' (timm `ResPostRelPosBlock`,
the `_rpn` names: x + norm1(attn x), x + norm2(mlp x), the norms' weights starting at `init_values`).
Pooling: 'avg' (mean of the patch tokens, after `norm` or, with `fc_norm`, followed by `fc_norm`), 'token' (the
class token), '' (every token). There is no SwiGLU, RoPE or absolute table in this module.

Parameter tree (timm's module names, Flax's leaf names; Dense kernels (in, out)):
  patch_embed/{kernel (p, p, C, D), bias}     cls_token (1, 1, D)
  shared_rel_pos/{mlp/{Dense_0, Dense_1} | relative_position_bias_table (L, heads)}      (shared_rel_pos)
  blocks_{i}/{norm1, attn/{qkv/{kernel (D, 3D), bias?}, q_norm, k_norm,
              rel_pos/{mlp/{Dense_0, Dense_1} | relative_position_bias_table}, proj}, ls1/scale, norm2,
              mlp/{Dense_0, Dense_1}, ls2/scale}
  norm/ (or fc_norm/), head/
timm: `patch_embed.proj`, `cls_token`, `shared_rel_pos.{mlp.fc1, mlp.fc2 | relative_position_bias_table}`,
`blocks.{i}.{norm1, attn.{qkv, q_norm, k_norm, rel_pos.*, proj}, ls1.gamma, norm2, mlp.fc1/fc2, ls2.gamma}`,
`norm`, `fc_norm`, `head`; the index and log-coordinate buffers are not persistent (derived from the grid).

Numerics: the bias is built in float32 (MLP and gather) and added to the float32 logits; q is scaled by
Dh^-0.5 before the product, as timm's unfused path (its fused SDPA computes the same); GELU is exact (erf).
The relative position module is sized for the patch grid of `img_size` (timm's `fixed_input_size`): the model
takes only that input size (create it with another `img_size` for another size; an 'mlp' model's weights fit
any grid, a 'bias' table only its own). Training: timm's RelPosMlp drops 12.5% of its hidden units (dropout
after the ReLU, active with train=True); drop path rates rise linearly to `drop_path_rate`.

Initialisation as timm's (`init_weights_vit_timm`): Linear kernels truncated-normal 0.02, biases 0, the class
token N(0, 1e-6), the bias table truncated-normal 0.02, LayerScale `init_values`, 'res_post' norms' weights
`init_values`, the head 0 (timm: trunc-normal; zero is the fine-tuning start this library's ViTs use).

Intermediates (apply with `mutable=['intermediates']`): `embed` (B, N, D) (timm's `patch_embed`), `block_{i}`
(timm's `blocks.{i}`), `encoded` (timm's `norm`).
"""
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl, dot_product_attention
from ..registry import register
from .eva import relative_position_index
from .layers import (DropPath, LayerNorm, LayerScale, MlpBlock, PatchConv, PatchGrid, ProjectionParams, active_dropout,
                     dense, drop_path_rates, fused_projection, merge_heads, remat_block, split_heads, to_tuple)
from .swinv2 import relative_coords_table

Dtype = Any
_trunc02 = nn.initializers.truncated_normal(stddev=0.02)
REL_POS_TYPES = ('mlp', 'mlp_swin', 'bias')
REL_POS_MLP_DROP = 0.125   # timm's RelPosMlp: Mlp(drop=(0.125, 0.)), dropout after the ReLU
SWIN_BIAS_GAIN = 16.0


def bias_table_size(window, prefix_tokens: int) -> int:
    """Rows of the learned table ('bias'): (2H-1)(2W-1), + 3 with a class token."""
    return (2 * window[0] - 1) * (2 * window[1] - 1) + 3 * prefix_tokens


def patch_index(window) -> np.ndarray:
    """(N, N) int32 index of each patch pair's offset into the row-major (2H-1, 2W-1) offset table (timm
    `gen_relative_position_index` without a class token)."""
    return relative_position_index(tuple(window))[1:, 1:]


def log_coords(window, mode: str) -> np.ndarray:
    """(2H-1, 2W-1, 2) float32 offsets the MLP reads: 'cr' sign(d) ln(1 + |d|); 'swin' Swin V2's table."""
    if mode == 'swin':
        return relative_coords_table(tuple(window))
    h = np.arange(-(window[0] - 1), window[0], dtype=np.float32)
    w = np.arange(-(window[1] - 1), window[1], dtype=np.float32)
    t = np.stack(np.meshgrid(h, w, indexing='ij'), axis=-1)
    return (np.sign(t) * np.log1p(np.abs(t))).astype(np.float32)


class RelMlp(nn.Module):
    """timm's `Mlp(2, hidden, heads, act_layer=ReLU, drop=(0.125, 0.))` inside RelPosMlp: Dense_0, ReLU, dropout,
    Dense_1 (no bias in Swin V2's mode), float32."""
    hidden: int
    out: int
    out_bias: bool = True

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        h = dense(self.hidden, jnp.float32, name='Dense_0', kernel_init=_trunc02)(x)
        h = nn.Dropout(rate=REL_POS_MLP_DROP)(nn.relu(h), deterministic=deterministic)
        return dense(self.out, jnp.float32, name='Dense_1', kernel_init=_trunc02, use_bias=self.out_bias)(h)


class RelPosMlpBias(nn.Module):
    """timm's `RelPosMlp` (mode 'cr' or 'swin'): (heads, N+p, N+p) float32 bias; params `mlp/{Dense_0, Dense_1}`."""
    window: Tuple[int, int]
    num_heads: int
    hidden_dim: int = 128
    mode: str = 'cr'
    prefix_tokens: int = 0

    @nn.compact
    def __call__(self, deterministic: bool = True):
        coords = jnp.asarray(log_coords(self.window, self.mode))
        table = RelMlp(self.hidden_dim, self.num_heads, self.mode != 'swin', name='mlp')(coords, deterministic)
        n = self.window[0] * self.window[1]
        bias = table.reshape(-1, self.num_heads)[patch_index(self.window).reshape(-1)]
        bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)
        if self.mode == 'swin':
            bias = SWIN_BIAS_GAIN * nn.sigmoid(bias)
        p = self.prefix_tokens
        return jnp.pad(bias, ((0, 0), (p, 0), (p, 0))) if p else bias


class RelPosTableBias(nn.Module):
    """timm's `RelPosBias`: `relative_position_bias_table` (L, heads) gathered to (heads, N+p, N+p) float32."""
    window: Tuple[int, int]
    num_heads: int
    prefix_tokens: int = 0

    @nn.compact
    def __call__(self, deterministic: bool = True):
        table = self.param('relative_position_bias_table', _trunc02,
                           (bias_table_size(self.window, self.prefix_tokens), self.num_heads))
        idx = relative_position_index(tuple(self.window)) if self.prefix_tokens else patch_index(self.window)
        return jnp.asarray(table, jnp.float32)[idx].transpose(2, 0, 1)


def rel_pos_module(kind: str, window, num_heads: int, hidden: Optional[int], prefix: int, name: str):
    """The bias module of `kind` ('mlp', 'mlp_swin', 'bias') for a patch grid `window`, named `name`."""
    if kind == 'bias':
        return RelPosTableBias(tuple(window), num_heads, prefix, name=name)
    return RelPosMlpBias(tuple(window), num_heads, hidden or 128, 'swin' if kind == 'mlp_swin' else 'cr', prefix,
                         name=name)


class RelPosAttention(nn.Module):
    """timm's `RelPosAttention`: fused qkv (bias optional), per-head q/k LayerNorms (`qk_norm`), a relative
    position bias (its own `rel_pos`, or the shared one passed in), softmax, proj."""
    num_heads: int
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6
    rel_pos: Optional[dict] = None     # dict(kind, window, hidden, prefix): this attention's own bias module
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, shared_bias=None, deterministic: bool = True):
        b, n, dim = x.shape
        if dim % self.num_heads:
            raise ModelConfigError(f'embed_dim {dim} is not a multiple of num_heads {self.num_heads}')
        hd = dim // self.num_heads
        kernel, bias = ProjectionParams(features=(3 * dim,), use_bias=self.qkv_bias, kernel_init=_trunc02,
                                        name='qkv')(dim)
        y = fused_projection(x, [(kernel, bias)], self.dtype)
        if self.qk_norm:
            q, k, v = split_heads(y, 3, self.num_heads, jnp.float32)
            q = LayerNorm(epsilon=self.norm_eps, dtype=jnp.float32, name='q_norm')(q)
            k = LayerNorm(epsilon=self.norm_eps, dtype=jnp.float32, name='k_norm')(k)
            q = (q * jnp.float32(hd ** -0.5)).astype(self.dtype)
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        else:
            q, k, v = split_heads(y, 3, self.num_heads, self.dtype, scale=hd ** -0.5)
        attn_bias = shared_bias
        if self.rel_pos is not None:
            r = self.rel_pos
            attn_bias = rel_pos_module(r['kind'], r['window'], self.num_heads, r['hidden'], r['prefix'],
                                       'rel_pos')(deterministic)
        drop = nn.Dropout(rate=self.attn_drop_rate)
        out = dot_product_attention(q, k, v, bias=None if attn_bias is None else attn_bias[None],
                                    impl=self.attn_impl, dropout=active_dropout(drop, deterministic))
        out = dense(dim, self.dtype, name='proj', kernel_init=_trunc02)(merge_heads(out))
        return nn.Dropout(rate=self.proj_drop_rate)(out, deterministic=deterministic)


class RelPosBlock(nn.Module):
    """timm's `RelPosBlock` ('block') and `ResPostRelPosBlock` ('res_post'); see the module docstring."""
    num_heads: int
    mlp_dim: int
    block_fn: str = 'block'
    qkv_bias: bool = False
    qk_norm: bool = False
    init_values: Optional[float] = 1e-6
    norm_eps: float = 1e-6
    rel_pos: Optional[dict] = None
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, shared_bias=None, deterministic: bool = True):
        post = self.block_fn == 'res_post'
        scale_init = nn.initializers.constant(self.init_values) if post and self.init_values is not None \
            else nn.initializers.ones
        norm = lambda name: LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, scale_init=scale_init, name=name)
        drop_path = lambda y: DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)
        attn = RelPosAttention(num_heads=self.num_heads, qkv_bias=self.qkv_bias, qk_norm=self.qk_norm,
                               norm_eps=self.norm_eps, rel_pos=self.rel_pos, attn_drop_rate=self.attn_drop_rate,
                               proj_drop_rate=self.proj_drop_rate, dtype=self.dtype, attn_impl=self.attn_impl,
                               name='attn')
        mlp = MlpBlock(mlp_dim=self.mlp_dim, drop_rate=self.proj_drop_rate, dtype=self.dtype, kernel_init=_trunc02,
                       bias_init=nn.initializers.zeros, name='mlp')
        if post:
            x = x + drop_path(norm('norm1')(attn(x, shared_bias, deterministic)))
            return x + drop_path(norm('norm2')(mlp(x, deterministic)))
        y = attn(norm('norm1')(x), shared_bias, deterministic)
        if self.init_values:
            y = LayerScale(self.init_values, name='ls1')(y)
        x = x + drop_path(y)
        y = mlp(norm('norm2')(x), deterministic)
        if self.init_values:
            y = LayerScale(self.init_values, name='ls2')(y)
        return x + drop_path(y)


class VisionTransformerRelPos(PatchGrid, nn.Module):
    """timm's `VisionTransformerRelPos` (module docstring). Input NHWC images of `img_size`; output logits (the
    pooled features with `num_classes=0` or `pre_logits=True`, every token with `global_pool=''`)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    patch_size: Union[int, Sequence[int]] = 16
    in_chans: int = 3
    global_pool: Literal['', 'avg', 'token'] = 'avg'
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_norm: bool = False
    init_values: Optional[float] = 1e-6
    class_token: bool = False
    fc_norm: bool = False
    rel_pos_type: Literal['mlp', 'mlp_swin', 'bias'] = 'mlp'
    rel_pos_dim: Optional[int] = None       # the MLP's hidden width (timm: RelPosMlp's 128 when None)
    shared_rel_pos: bool = False
    block_fn: Literal['block', 'res_post'] = 'block'
    norm_eps: float = 1e-6
    drop_rate: float = 0.0                  # before the head
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: AttnImpl = 'auto'

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token)

    @property
    def num_features(self) -> int:
        return int(self.embed_dim)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def rel_pos_hidden(self) -> int:
        return self.rel_pos_dim or 128

    def check(self):
        if self.rel_pos_type not in REL_POS_TYPES:
            raise ModelConfigError(f'rel_pos_type must be one of {", ".join(REL_POS_TYPES)}, got {self.rel_pos_type!r}')
        if self.global_pool == 'token' and not self.class_token:
            raise ModelConfigError("global_pool='token' reads the class token: it needs class_token=True")
        if not all(self.grid_size):
            raise ModelConfigError(f'img_size {self.img_size} is smaller than the patch {self.patch_size}')
        if self.embed_dim % self.num_heads:
            raise ModelConfigError(f'embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}')
        check_impl(self.attn_impl)

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        self.check()
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ModelConfigError(f'input shape {tuple(x.shape[1:])} does not match the model\'s '
                                   f'{tuple(self.input_shape)}: its relative positions are sized for the '
                                   f'{self.grid_size} patch grid of img_size {self.img_size} (set img_size when '
                                   f'creating the model)')
        d, b = self.embed_dim, x.shape[0]
        x = PatchConv(features=d, patch_size=self.patch_size_tuple, dtype=self.dtype, kernel_init=_trunc02,
                      name='patch_embed')(x.astype(self.dtype))
        x = x.reshape(b, -1, d)
        self.sow('intermediates', 'embed', x)
        if self.class_token:
            cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d)).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        rel = dict(kind=self.rel_pos_type, window=tuple(self.grid_size), hidden=self.rel_pos_hidden,
                   prefix=self.num_prefix_tokens)
        shared = None
        if self.shared_rel_pos:
            shared = rel_pos_module(rel['kind'], rel['window'], self.num_heads, rel['hidden'], rel['prefix'],
                                    'shared_rel_pos')(not train)
        block_cls = remat_block(RelPosBlock, self.remat)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_hidden, block_fn=self.block_fn,
                          qkv_bias=self.qkv_bias, qk_norm=self.qk_norm, init_values=self.init_values,
                          norm_eps=self.norm_eps, rel_pos=None if self.shared_rel_pos else rel,
                          proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                          drop_path_rate=rate, dtype=self.dtype, attn_impl=self.attn_impl,
                          name=f'blocks_{i}')(x, shared, not train)
            self.sow('intermediates', f'block_{i}', x)
        if not self.fc_norm:
            x = LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='norm')(x)
        self.sow('intermediates', 'encoded', x)
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(axis=1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        if self.fc_norm:
            x = LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='fc_norm')(x)
        x = nn.Dropout(rate=self.drop_rate)(x, deterministic=not train)
        if pre_logits or self.num_classes == 0:
            return x
        return dense(self.num_classes, self.dtype, name='head', kernel_init=nn.initializers.zeros)(x)


# ---------------------------------------------------------------- timm's registrations (vision_transformer_relpos)
# 14 names; all 1000 classes, 224 px unless named otherwise, qkv_bias False but for the two `_plus` names.

def _relpos(name, **cfg):
    register(name, VisionTransformerRelPos, **cfg)


_S, _M, _B = (dict(embed_dim=384, num_heads=6), dict(embed_dim=512, num_heads=8), dict(embed_dim=768, num_heads=12))
_P16 = dict(patch_size=16, depth=12, qkv_bias=False)
_PLUS = dict(embed_dim=896, depth=12, num_heads=14)
_relpos('vit_relpos_base_patch32_plus_rpn_256', img_size=256, patch_size=32, block_fn='res_post', **_PLUS)
_relpos('vit_relpos_base_patch16_plus_240', img_size=240, patch_size=16, **_PLUS)
for _size, _dims in (('small', _S), ('medium', _M), ('base', _B)):
    _relpos(f'vit_relpos_{_size}_patch16_224', fc_norm=True, **_P16, **_dims)
    _relpos(f'vit_relpos_{_size}_patch16_rpn_224', block_fn='res_post', **_P16, **_dims)
for _size, _dims in (('small', _S), ('medium', _M)):
    _relpos(f'vit_srelpos_{_size}_patch16_224', rel_pos_dim=_dims['embed_dim'], shared_rel_pos=True, **_P16, **_dims)
_relpos('vit_relpos_medium_patch16_cls_224', rel_pos_dim=256, class_token=True, global_pool='token', **_P16, **_M)
_relpos('vit_relpos_base_patch16_cls_224', class_token=True, global_pool='token', **_P16, **_B)
_relpos('vit_relpos_base_patch16_clsgap_224', fc_norm=True, class_token=True, **_P16, **_B)
_relpos('test_vit_relpos', img_size=160, patch_size=16, embed_dim=96, depth=9, num_heads=3, mlp_ratio=2.0,
        qkv_bias=False, fc_norm=True)
