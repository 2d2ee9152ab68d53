"""CaiT (Class-Attention in Image Transformers, Touvron et al. 2021) in Flax linen: timm's `cait` module (`Cait`),
numerically matching timm (and Facebook's deit `cait_models.py`, whose keys timm's are).

The model, as timm's: a patch embedding (a VALID conv, kernel = stride = patch), a learned position table over the
patch tokens only (no class row), `depth` self-attention blocks over the patch tokens with talking-heads attention
and LayerScale, then `depth_token_only` class-attention blocks in which the class token alone is updated (its query
attends over [class token, patch tokens]; the patch tokens stay as they are), the final norm over [class token,
patch tokens], the class token (or the mean of the patch tokens: `global_pool='avg'`) to a Linear head.

- Talking-heads attention (Shazeer et al. 2020; timm `TalkingHeadAttn`): logits q k^T * Dh^-0.5, mixed across heads
  by a Linear over the head axis (`pre_softmax`, timm `proj_l`, with bias) before the softmax and by another
  (`post_softmax`, timm `proj_w`) after it, then attention dropout and the weighted sum of v.
- Class attention (timm `ClassAttn`): q from the class token, k and v from [class token, patch tokens] (separate
  Linears, timm `q`, `k`, `v`), softmax(q k^T * Dh^-0.5) v, `out`.
- Each block: x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)) (LayerScale: one learned factor per channel,
  started at `init_values`); a class block applies norm1 to [class token, patch tokens] and updates the class token.
  LayerNorms have eps `norm_eps` (1e-6); the GELU is exact (erf); `qkv_bias` (True) for both attentions.
- Stochastic depth: `drop_path_rate` in every self-attention block alike (timm's CaiT: no linear rule); the class
  blocks get no drop path and no projection/attention dropout (timm builds them with the defaults, 0).
Logits and softmax run in float32 whatever the compute dtype `dtype` (params float32).

Parameter tree (Google's ViT style, names distinct from the ViT and Eva trees so that detection can tell them apart):
`patch_embed/{kernel (HWIO), bias}` (timm `patch_embed.proj`), `pos_embedding` (1, N, D) (timm `pos_embed`), `cls`
(1, 1, D) (timm `cls_token`), `encoderblock_{i}/{LayerNorm_0, TalkingHeadsAttention_0/{query, key, value (kernels
(D, H, Dh), biases (H, Dh)), out (kernel (H, Dh, D)), pre_softmax, post_softmax (kernel (H, H), bias (H,))},
LayerScale_0/scale, LayerNorm_1, MlpBlock_0/{Dense_0, Dense_1}, LayerScale_1/scale}` (timm `blocks.{i}.{norm1,
attn.{qkv, proj, proj_l, proj_w}, gamma_1, norm2, mlp.fc1/fc2, gamma_2}`), `classblock_{j}/{LayerNorm_0,
ClassAttention_0/{query, key, value, out}, LayerScale_0/scale, LayerNorm_1, MlpBlock_0, LayerScale_1/scale}` (timm
`blocks_token_only.{j}.{norm1, attn.{q, k, v, proj}, gamma_1, norm2, mlp, gamma_2}`), `encoder_norm` (timm `norm`),
`head`.

Initialisation as timm's `_init_weights`: every Linear truncated-normal(0.02) with zero bias, LayerNorms 1 / 0, the
position table and class token truncated-normal(0.02), LayerScale `init_values`; the patch kernel lecun-normal.

Intermediates (apply with `mutable=['intermediates']`): `embed` (B, N, D) (timm `patch_embed`, before positions),
`block_{i}` (timm `blocks.{i}`), `class_block_{j}` (B, 1, D) (timm `blocks_token_only.{j}`), `encoded` (B, 1 + N, D)
(timm `norm`).
"""
from typing import Any, Literal, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..errors import ModelConfigError
from ..registry import register
from .layers import (DropPath, LayerNorm, LayerScale, MlpBlock, PatchConv, PatchGrid, ProjectionParams, dense,
                     dense_general, fused_projection, remat_block, split_heads)

Dtype = Any

_trunc = nn.initializers.truncated_normal(stddev=0.02)


class HeadsMix(nn.Module):
    """A Linear across the heads of (B, H, Nq, Nk) attention logits or weights (timm `proj_l` / `proj_w`, applied
    to the heads axis moved last): out[g] = sum_h in[h] kernel[h, g] + bias[g], in float32."""

    @nn.compact
    def __call__(self, x):
        h = x.shape[1]
        kernel = self.param('kernel', _trunc, (h, h))
        bias = self.param('bias', nn.initializers.zeros, (h,))
        y = jnp.einsum('bhqk,hg->bgqk', x, kernel.astype(jnp.float32))
        return y + bias.astype(jnp.float32)[None, :, None, None]


class TalkingHeadsAttention(nn.Module):
    """timm's `TalkingHeadAttn`: q, k, v (one fused matmul, Google's `query/key/value` params), logits mixed across
    heads before (`pre_softmax`) and after (`post_softmax`) the softmax, `out`."""
    num_heads: int
    qkv_bias: bool = True
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dim, heads = x.shape[-1], self.num_heads
        head_dim = dim // heads
        params = [ProjectionParams(features=(heads, head_dim), use_bias=self.qkv_bias, kernel_init=_trunc,
                                   name=n)(dim) for n in ('query', 'key', 'value')]
        q, k, v = split_heads(fused_projection(x, params, self.dtype), 3, heads, self.dtype, head_dim ** -0.5)
        logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
        logits = HeadsMix(name='pre_softmax')(logits)
        weights = HeadsMix(name='post_softmax')(jax.nn.softmax(logits, axis=-1))
        weights = nn.Dropout(rate=self.attn_drop_rate)(weights, deterministic=deterministic)
        out = jnp.einsum('bhqk,bhkd->bqhd', weights.astype(self.dtype), v, preferred_element_type=jnp.float32)
        return dense_general(dim, (-2, -1), self.dtype, name='out', kernel_init=_trunc)(out.astype(self.dtype))


class ClassAttention(nn.Module):
    """timm's `ClassAttn`: the first token's query over every token's keys and values; (B, N, D) -> (B, 1, D)."""
    num_heads: int
    qkv_bias: bool = True
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dim, heads = x.shape[-1], self.num_heads
        head_dim = dim // heads
        q_p, k_p, v_p = (ProjectionParams(features=(heads, head_dim), use_bias=self.qkv_bias, kernel_init=_trunc,
                                          name=n)(dim) for n in ('query', 'key', 'value'))
        (q,) = split_heads(fused_projection(x[:, :1], [q_p], self.dtype), 1, heads, self.dtype, head_dim ** -0.5)
        k, v = split_heads(fused_projection(x, [k_p, v_p], self.dtype), 2, heads, self.dtype)
        logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
        weights = nn.Dropout(rate=self.attn_drop_rate)(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
        out = jnp.einsum('bhqk,bhkd->bqhd', weights.astype(self.dtype), v, preferred_element_type=jnp.float32)
        return dense_general(dim, (-2, -1), self.dtype, name='out', kernel_init=_trunc)(out.astype(self.dtype))


class CaitBlock(nn.Module):
    """timm's `LayerScaleBlock` (self-attention over the tokens) or, with `class_attention`, its
    `LayerScaleBlockClassAttn` (called as block(x, deterministic, cls): the class token updated from [cls, x]).
    `deterministic` is the second argument, as `remat_block` expects (static under nn.remat)."""
    num_heads: int
    mlp_dim: int
    class_attention: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    init_values: float = 1e-4
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True, cls=None):
        norm = lambda i: LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name=f'LayerNorm_{i}')
        drop_path = lambda y: DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)
        proj_drop = nn.Dropout(rate=self.proj_drop_rate)
        if self.class_attention:
            y = ClassAttention(self.num_heads, self.qkv_bias, self.attn_drop_rate, self.dtype,
                               name='ClassAttention_0')(norm(0)(jnp.concatenate([cls, x], axis=1)), deterministic)
            x = cls
        else:
            y = TalkingHeadsAttention(self.num_heads, self.qkv_bias, self.attn_drop_rate, self.dtype,
                                      name='TalkingHeadsAttention_0')(norm(0)(x), deterministic)
        y = proj_drop(y, deterministic=deterministic)
        x = x + drop_path(LayerScale(self.init_values, name='LayerScale_0')(y).astype(self.dtype))
        y = MlpBlock(mlp_dim=self.mlp_dim, drop_rate=self.proj_drop_rate, dtype=self.dtype, kernel_init=_trunc,
                     bias_init=nn.initializers.zeros, name='MlpBlock_0')(norm(1)(x), deterministic)
        return x + drop_path(LayerScale(self.init_values, name='LayerScale_1')(y).astype(self.dtype))


class Cait(PatchGrid, nn.Module):
    """timm's `Cait`. Input NHWC images of `img_size` (the position table fixes the grid, as timm's
    `fixed_input_size`); output logits (the pooled features with `num_classes=0` or `pre_logits=True`; with
    `global_pool=''` the head applied to every normed token, as timm)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    in_chans: int = 3
    patch_size: Union[int, Sequence[int]] = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    init_values: float = 1e-4          # LayerScale's start (timm's names: 1e-5, S-36 and the M sizes 1e-6)
    depth_token_only: int = 2          # class-attention blocks
    mlp_ratio_token_only: float = 4.0
    global_pool: Literal['token', 'avg', ''] = 'token'
    drop_rate: float = 0.0             # before the head
    pos_drop_rate: float = 0.0         # after the position table
    proj_drop_rate: float = 0.0        # after attention's projection and in the MLPs (self-attention blocks)
    attn_drop_rate: float = 0.0        # on the attention weights (self-attention blocks)
    drop_path_rate: float = 0.0        # every self-attention block alike; only acts with train=True
    remat: bool = False
    remat_policy: Optional[str] = None
    dtype: Dtype = jnp.float32

    # -- derived configuration (plain properties so they work on unbound modules too) --
    @property
    def num_patches(self) -> int:
        g = self.grid_size
        return g[0] * g[1]

    @property
    def num_features(self) -> int:
        return int(self.embed_dim)

    @property
    def num_prefix_tokens(self) -> int:
        """Prefix tokens in the position table: none (the class token joins after the self-attention blocks)."""
        return 0

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def mlp_hidden_token_only(self) -> int:
        return int(self.embed_dim * self.mlp_ratio_token_only)

    def check(self):
        if self.embed_dim % self.num_heads:
            raise ModelConfigError(f'embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}')
        if min(self.grid_size) < 1:
            raise ModelConfigError(f'img_size {self.img_size} is smaller than the patch {self.patch_size}')

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        self.check()
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ModelConfigError(f'expected NHWC images with {self.in_chans} channels, got shape {tuple(x.shape)}')
        grid = tuple(s // p for s, p in zip(x.shape[1:3], self.patch_size_tuple))
        if grid != tuple(self.grid_size):
            raise ModelConfigError(f'CaiT\'s position table is sized for a {tuple(self.grid_size)} grid (img_size '
                                   f'{self.img_size}); got images of {tuple(x.shape[1:3])}')
        b, d = x.shape[0], self.embed_dim
        x = PatchConv(features=d, patch_size=self.patch_size_tuple, dtype=self.dtype,
                      name='patch_embed')(x.astype(self.dtype)).reshape(b, -1, d)
        self.sow('intermediates', 'embed', x)
        pos = self.param('pos_embedding', _trunc, (1, self.num_patches, d))
        x = (x + pos.astype(self.dtype)).astype(self.dtype)
        x = nn.Dropout(rate=self.pos_drop_rate)(x, deterministic=not train)
        block = remat_block(CaitBlock, self.remat, self.remat_policy)
        kw = dict(num_heads=self.num_heads, qkv_bias=self.qkv_bias, norm_eps=self.norm_eps,
                  init_values=self.init_values, dtype=self.dtype)
        for i in range(self.depth):
            x = block(mlp_dim=self.mlp_hidden, proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                      drop_path_rate=self.drop_path_rate, name=f'encoderblock_{i}', **kw)(x, not train)
            self.sow('intermediates', f'block_{i}', x)
        cls = jnp.broadcast_to(self.param('cls', _trunc, (1, 1, d)).astype(self.dtype), (b, 1, d))
        for j in range(self.depth_token_only):
            cls = CaitBlock(mlp_dim=self.mlp_hidden_token_only, class_attention=True, name=f'classblock_{j}',
                            **kw)(x, not train, cls)
            self.sow('intermediates', f'class_block_{j}', cls)
        x = LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name='encoder_norm')(jnp.concatenate([cls, x], 1))
        self.sow('intermediates', 'encoded', x)
        if self.global_pool == 'token':
            x = x[:, 0]
        elif self.global_pool == 'avg':
            x = x[:, 1:].mean(axis=1)
        x = nn.Dropout(rate=self.drop_rate)(x, deterministic=not train)
        if pre_logits or self.num_classes == 0:
            return x
        return dense(self.num_classes, self.dtype, name='head', kernel_init=_trunc)(x)


# timm's registrations (timm 1.0.31 `cait`): 10 names, 1000 classes, patch 16, input size from the name (timm's
# pretrained_cfg input_size: 224, 384 or 448).
CAIT_SIZES = {'xxs': (192, 4), 'xs': (288, 6), 's': (384, 8), 'm': (768, 16)}
for _size, _depth, _img, _init in (('xxs', 24, 224, 1e-5), ('xxs', 24, 384, 1e-5), ('xxs', 36, 224, 1e-5),
                                   ('xxs', 36, 384, 1e-5), ('xs', 24, 384, 1e-5), ('s', 24, 224, 1e-5),
                                   ('s', 24, 384, 1e-5), ('s', 36, 384, 1e-6), ('m', 36, 384, 1e-6),
                                   ('m', 48, 448, 1e-6)):
    register(f'cait_{_size}{_depth}_{_img}', Cait, img_size=_img, patch_size=16, embed_dim=CAIT_SIZES[_size][0],
             depth=_depth, num_heads=CAIT_SIZES[_size][1], init_values=_init)
