"""EVA / EVA-02, DINOv3, Perception Encoder, RoPE-ViT, LingBot and Sapiens2 ViTs: timm 1.0.31's `Eva` in Flax.

One module, `Eva`, covers every registration of timm's `eva.py` (its options under timm's meaning; a field that
means what a `VisionTransformer` field means has that field's name: `reg_tokens` is timm's `num_reg_tokens`,
`pre_norm` its `use_pre_transformer_norm`, `fc_norm` its `use_fc_norm`, `scale_attn_norm` / `scale_mlp_norm` its
`scale_attn_inner` / `scale_mlp`, `block_fn='res_post'` its `use_post_norm`, `mlp_layer` what `swiglu_mlp`,
`scale_mlp` and `swiglu_align_to` select).

Parameter tree (timm's module names, Flax's leaf names):
  patch_embed/{kernel (p, p, C, D), bias}     cls_token (1, 1, D)   reg_token (1, R, D)   pos_embed (1, L, D)
  rope_freqs (2, depth, heads, Dh/2)           (rope_type='mixed': timm `rope.freqs`)
  norm_pre/{scale, bias}
  blocks_{i}/norm1, attn/{qkv/kernel, q_bias, v_bias | qkv/{kernel, bias} | q_proj, k_proj, v_proj},
             attn/{q_norm, k_norm, norm, proj}, gamma_1, norm2, mlp/{Dense_0, Dense_gate, norm, Dense_1}, gamma_2
  norm/, attn_pool/ (ViT's MAPHead: probe, MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0), fc_norm/, head/
Dense kernels are (in, out); `qkv/kernel` is (D, 3 D) with q | k | v columns.

Attention (`attn_type`): 'eva' (timm `EvaAttention`): q and v biases, no k bias; 'rope' (timm `AttentionRope`):
full q, k, v biases, and grouped-query attention through `num_kv_heads` (unfused only; k, v heads repeated after
the rotation). Token order [cls?, registers, patches]; the prefix tokens skip the rotation. `mlp_layer`:
'mlp' (fc1, GELU, [norm], fc2), 'swiglu' (timm SwiGLU: SiLU(fc1_g) * fc1_x, [norm], fc2; hidden rounded up to
`swiglu_align_to`), 'swiglu_packed' (timm GluMlp: one fc1 of twice the hidden width, the first half the gate).

Numerics: q, k, v come out of their projection in float32; q/k norms, the rotation (ops/rope.py) and the
attention scale run in float32 and round once to the compute dtype; the residual stream stays float32 under
bf16 (as timm's under autocast). `dynamic_img_size`: any input of at least one patch, the absolute table resized
(torch's antialiased bicubic) and the RoPE table built for the input's grid. `patch_drop_rate`: in training,
each image keeps a random int(N (1 - rate)) of its patch tokens (prefix tokens always), with their rotations.
"""
import math
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from ..ops import rope as rope_ops
from ..ops.attention import AttnImpl, check_impl, dot_product_attention
from ..ops.resize import resize_grid
from ..registry import register
from .layers import PatchGrid
from .layers import (DropPath, MlpBlock, PatchConv, ProjectionParams, active_dropout, dense, drop_path_rates,
                     fused_projection, merge_heads, remat_block, to_tuple)
from .layers import norm_layer as make_norm
from .vit import MAPHead

Dtype = Any


def relative_table_size(window) -> int:
    """Rows of BEiT's relative position bias table: (2 Wh - 1)(2 Ww - 1) + 3 (cls->patch, patch->cls, cls->cls)."""
    wh, ww = window
    return (2 * wh - 1) * (2 * ww - 1) + 3


def relative_position_index(window) -> np.ndarray:
    """(N + 1, N + 1) int32 index into the table (timm `gen_relative_position_index`): patches p, q (row-major)
    take (di + Wh - 1)(2 Ww - 1) + (dj + Ww - 1) for (di, dj) = p - q; row 0 (the class token's queries) L - 3,
    column 0 L - 2, [0, 0] L - 1, for L the table's rows."""
    wh, ww = window
    ii, jj = np.meshgrid(np.arange(wh), np.arange(ww), indexing='ij')
    coords = np.stack([ii.reshape(-1), jj.reshape(-1)])
    rel = coords[:, :, None] - coords[:, None, :]
    idx = (rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1
    size = relative_table_size(window)
    out = np.zeros((wh * ww + 1,) * 2, np.int32)
    out[1:, 1:] = idx
    out[0, :] = size - 3
    out[:, 0] = size - 2
    out[0, 0] = size - 1
    return out


def relative_bias(table, window):
    """(heads, N + 1, N + 1) float32 bias from a (L, heads) table."""
    idx = relative_position_index(tuple(window))
    return jnp.asarray(table, jnp.float32)[idx].transpose(2, 0, 1)


class EvaAttention(nn.Module):
    """timm's `EvaAttention` (attn_type='eva') and `AttentionRope` ('rope'); see the module docstring."""
    num_heads: int
    num_kv_heads: Optional[int] = None
    qkv_bias: bool = True
    qkv_fused: bool = True
    attn_type: str = 'eva'
    qk_norm: bool = False
    scale_norm: bool = False
    norm: str = 'layernorm'
    norm_eps: float = 1e-6
    rotate_half: bool = False
    num_prefix_tokens: int = 1
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'
    rel_pos_window: Optional[Tuple[int, int]] = None   # BEiT: this attention's own relative position bias table

    @nn.compact
    def __call__(self, x, rope=None, deterministic: bool = True, shared_bias=None):
        b, n, dim = x.shape
        heads = self.num_heads
        kv_heads = self.num_kv_heads or heads
        if dim % heads or heads % kv_heads:
            raise ModelConfigError(f'embed dim {dim}, {heads} heads, {kv_heads} kv heads: the heads must divide the '
                                   f'width and the kv heads the heads')
        hd = dim // heads
        full_bias = self.attn_type == 'rope' and self.qkv_bias
        if self.qkv_fused:
            if kv_heads != heads:
                raise ModelConfigError('grouped-query attention (num_kv_heads) needs qkv_fused=False')
            kernel, bias = ProjectionParams(features=(3 * dim,), use_bias=full_bias, name='qkv')(dim)
            if self.qkv_bias and not full_bias:
                qb = self.param('q_bias', nn.initializers.zeros, (dim,))
                vb = self.param('v_bias', nn.initializers.zeros, (dim,))
                bias = jnp.concatenate([qb, jnp.zeros_like(qb), vb])
            y = fused_projection(x, [(kernel, bias)], self.dtype)
        else:
            kv = kv_heads * hd
            q_p = ProjectionParams(features=(dim,), use_bias=self.qkv_bias, name='q_proj')(dim)
            k_p = ProjectionParams(features=(kv,), use_bias=full_bias, name='k_proj')(dim)
            v_p = ProjectionParams(features=(kv,), use_bias=self.qkv_bias, name='v_proj')(dim)
            parts = [q_p, k_p, v_p]
            if any(p[1] is not None for p in parts):
                parts = [(k_, b_ if b_ is not None else jnp.zeros((k_.shape[-1],), jnp.float32)) for k_, b_ in parts]
            y = fused_projection(x, parts, self.dtype)
        q = y[..., :dim].reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
        k = y[..., dim:dim + kv_heads * hd].reshape(b, n, kv_heads, hd).transpose(0, 2, 1, 3)
        v = y[..., dim + kv_heads * hd:].reshape(b, n, kv_heads, hd).transpose(0, 2, 1, 3)
        if self.qk_norm:
            q = make_norm(self.norm, self.norm_eps, jnp.float32, name='q_norm')(q)
            k = make_norm(self.norm, self.norm_eps, jnp.float32, name='k_norm')(k)
        if rope is not None:
            sin, cos = rope
            q = rope_ops.apply_rope(q, sin, cos, self.rotate_half, self.num_prefix_tokens)
            k = rope_ops.apply_rope(k, sin, cos, self.rotate_half, self.num_prefix_tokens)
        if kv_heads != heads:
            k, v = (jnp.repeat(t, heads // kv_heads, axis=1) for t in (k, v))
        q = (q * jnp.float32(hd ** -0.5)).astype(self.dtype)
        k, v = k.astype(self.dtype), v.astype(self.dtype)
        bias = shared_bias
        if self.rel_pos_window is not None:
            own = self.param('relative_position_bias_table', nn.initializers.zeros,
                             (relative_table_size(self.rel_pos_window), heads))
            own = relative_bias(own, tuple(self.rel_pos_window))
            bias = own if bias is None else own + bias
        drop = nn.Dropout(rate=self.attn_drop_rate)
        out = dot_product_attention(q, k, v, bias=None if bias is None else bias[None], impl=self.attn_impl,
                                    dropout=active_dropout(drop, deterministic))
        out = merge_heads(out)
        if self.scale_norm:
            out = make_norm(self.norm, self.norm_eps, self.dtype, name='norm')(out)
        out = dense(dim, self.dtype, name='proj')(out)
        return nn.Dropout(rate=self.proj_drop_rate)(out, deterministic=deterministic)


class EvaBlock(nn.Module):
    """timm's `EvaBlock` (`block_fn='block'`: x + g1 * attn(norm1 x), x + g2 * mlp(norm2 x)) and
    `EvaBlockPostNorm` ('res_post': x + norm1(attn x), x + norm2(mlp x), no LayerScale)."""
    num_heads: int
    mlp_dim: int
    num_kv_heads: Optional[int] = None
    qkv_bias: bool = True
    qkv_fused: bool = True
    attn_type: str = 'eva'
    qk_norm: bool = False
    scale_attn_norm: bool = False
    scale_mlp_norm: bool = False
    mlp_layer: str = 'mlp'
    norm: str = 'layernorm'
    norm_eps: float = 1e-6
    init_values: Optional[float] = None
    attn_only_layer_scale: bool = False
    block_fn: str = 'block'
    rotate_half: bool = False
    num_prefix_tokens: int = 1
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'
    rel_pos_window: Optional[Tuple[int, int]] = None

    @nn.compact
    def __call__(self, x, rope=None, deterministic: bool = True, shared_bias=None):
        norm = lambda name: make_norm(self.norm, self.norm_eps, self.dtype, name=name)
        drop_path = lambda y: DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)
        attn = EvaAttention(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, qkv_bias=self.qkv_bias,
                            qkv_fused=self.qkv_fused, attn_type=self.attn_type, qk_norm=self.qk_norm,
                            scale_norm=self.scale_attn_norm, norm=self.norm, norm_eps=self.norm_eps,
                            rotate_half=self.rotate_half, num_prefix_tokens=self.num_prefix_tokens,
                            attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate,
                            dtype=self.dtype, attn_impl=self.attn_impl, rel_pos_window=self.rel_pos_window,
                            name='attn')
        mlp = MlpBlock(mlp_dim=self.mlp_dim, drop_rate=self.proj_drop_rate,
                       gelu='silu' if self.mlp_layer != 'mlp' else 'exact', dtype=self.dtype, kind=self.mlp_layer,
                       norm=self.norm if self.scale_mlp_norm else None, norm_eps=self.norm_eps, name='mlp')
        if self.block_fn == 'res_post':
            x = x + drop_path(norm('norm1')(attn(x, rope, deterministic, shared_bias)))
            return x + drop_path(norm('norm2')(mlp(x, deterministic)))
        gamma = lambda name: self.param(name, lambda _, s: jnp.full(s, self.init_values, jnp.float32),
                                        (x.shape[-1],))
        y = attn(norm('norm1')(x), rope, deterministic, shared_bias)
        if self.init_values is not None:
            y = y * gamma('gamma_1')
        x = x + drop_path(y)
        y = mlp(norm('norm2')(x), deterministic)
        if self.init_values is not None and not self.attn_only_layer_scale:
            y = y * gamma('gamma_2')
        return x + drop_path(y)


class Eva(PatchGrid, nn.Module):
    """timm's `Eva` (module docstring). Input NHWC images; output logits (pooled features with
    `num_classes=0`; every token with `global_pool=''`)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    patch_size: Union[int, Sequence[int]] = 16
    in_chans: int = 3
    global_pool: Literal['', 'avg', 'avgmax', 'max', 'token', 'map'] = 'avg'
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    num_kv_heads: Optional[Union[int, Tuple[int, ...]]] = None   # GQA: one value, or one per block
    qkv_bias: bool = True
    qkv_fused: bool = True
    qk_norm: bool = False
    mlp_ratio: float = 4.0
    mlp_layer: Literal['mlp', 'swiglu', 'swiglu_packed'] = 'mlp'
    swiglu_align_to: int = 0
    scale_mlp_norm: bool = False            # timm scale_mlp
    scale_attn_norm: bool = False           # timm scale_attn_inner
    attn_type: Literal['eva', 'rope'] = 'eva'
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    patch_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_layer: Literal['layernorm', 'rmsnorm'] = 'layernorm'
    norm_eps: float = 1e-6
    init_values: Optional[float] = None
    attn_only_layer_scale: bool = False
    class_token: bool = True
    reg_tokens: int = 0                     # timm num_reg_tokens
    no_embed_class: bool = False
    use_abs_pos_emb: bool = True
    use_rot_pos_emb: bool = False
    rope_type: Literal['cat', 'mixed', 'dinov3'] = 'cat'
    rope_grid_offset: float = 0.0
    rope_grid_indexing: Literal['ij', 'xy'] = 'ij'
    rope_temperature: float = 10000.0
    rope_rotate_half: bool = False
    rope_shift_coords: Optional[float] = None     # training-only coordinate augmentations (DINOv3's)
    rope_jitter_coords: Optional[float] = None
    rope_rescale_coords: Optional[float] = None
    ref_feat_shape: Optional[Union[int, Tuple[int, int]]] = None
    block_fn: Literal['block', 'res_post'] = 'block'   # timm use_post_norm: 'res_post'
    pre_norm: bool = False                  # timm use_pre_transformer_norm (and no patch-embedding bias)
    use_post_transformer_norm: Optional[bool] = None   # None: when there is no fc_norm
    fc_norm: Optional[bool] = None          # timm use_fc_norm; None: for global_pool='avg'
    attn_pool_num_heads: Optional[int] = None
    attn_pool_mlp_ratio: Optional[float] = None
    dynamic_img_size: bool = False
    remat: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: AttnImpl = 'auto'

    # -- derived configuration
    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.reg_tokens)

    @property
    def num_features(self) -> int:
        return self.embed_dim

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == 'avg' if self.fc_norm is None else bool(self.fc_norm)

    @property
    def use_final_norm(self) -> bool:
        return (not self.use_fc_norm) if self.use_post_transformer_norm is None \
            else bool(self.use_post_transformer_norm)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.mlp_layer == 'swiglu_packed':
            return 2 * hidden
        if self.mlp_layer == 'swiglu' and self.swiglu_align_to:
            hidden += -hidden % self.swiglu_align_to
        return hidden

    def kv_heads(self, i: int) -> Optional[int]:
        if self.num_kv_heads is None or isinstance(self.num_kv_heads, int):
            return self.num_kv_heads
        return self.num_kv_heads[i]

    def check(self):
        if self.global_pool == 'token' and not self.class_token:
            raise ModelConfigError("global_pool='token' reads the class token: it needs class_token=True")
        if not all(self.grid_size):
            raise ModelConfigError(f'img_size {self.img_size} is smaller than the patch {self.patch_size}')
        if isinstance(self.num_kv_heads, (tuple, list)) and len(self.num_kv_heads) != self.depth:
            raise ModelConfigError(f'num_kv_heads has {len(self.num_kv_heads)} entries for {self.depth} blocks')
        if self.num_kv_heads is not None and self.attn_type != 'rope':
            raise ModelConfigError("grouped-query attention (num_kv_heads) needs attn_type='rope'")
        if self.block_fn == 'res_post' and (self.qk_norm or self.attn_only_layer_scale or self.num_kv_heads):
            raise ModelConfigError("block_fn='res_post' takes no qk_norm, num_kv_heads or attn_only_layer_scale")
        if self.use_rot_pos_emb:
            rope_ops.check_rope_type(self.rope_type, self.rope_rotate_half)
            if self.head_dim % 4:
                raise ModelConfigError(f'RoPE needs a head width that is a multiple of 4, got {self.head_dim}')
        check_impl(self.attn_impl)

    def rope_table(self, grid, train: bool, freqs=None):
        """(sin, cos) float32 for a patch grid: (N, Dh) for 'cat' and 'dinov3', (depth, 1, heads, N, Dh) per
        block for 'mixed' (block i takes [i]); None without RoPE. Training with a coordinate augmentation set
        draws it from the 'dropout' stream (one draw per forward, as timm)."""
        if not self.use_rot_pos_emb:
            return None
        grid, hd, half = tuple(int(g) for g in grid), self.head_dim, self.rope_rotate_half
        augment = train and any(v is not None for v in (self.rope_shift_coords, self.rope_jitter_coords,
                                                          self.rope_rescale_coords))
        if self.rope_type == 'mixed':
            coords = rope_ops.mixed_coords(grid, self.rope_grid_indexing)
            if augment:
                c = self._augment(jnp.stack([jnp.asarray(coords[0]), jnp.asarray(coords[1])], -1))
                coords = (c[:, 0], c[:, 1])
            ang = rope_ops.mixed_angles(freqs, grid, self.rope_grid_indexing, coords=coords)
            sin, cos = rope_ops.sin_cos(ang, False)
            return sin[:, None], cos[:, None]
        if self.rope_type == 'dinov3':
            ang = rope_ops.dinov3_angles(grid, hd, self.rope_temperature, self.rope_grid_offset,
                                         self.rope_grid_indexing)
            if augment:
                coords = self._augment(jnp.asarray(rope_ops.dinov3_coords(grid, self.rope_grid_offset,
                                                                          self.rope_grid_indexing)))
                ang = rope_ops.dinov3_angles_from(coords, jnp.asarray(rope_ops.dinov3_periods(
                    hd, self.rope_temperature)))
            return rope_ops.sin_cos(ang, half)
        ref = None if self.ref_feat_shape is None else to_tuple(self.ref_feat_shape, 2)
        ang = rope_ops.cat_angles(grid, hd, self.rope_temperature, self.rope_grid_offset, self.rope_grid_indexing,
                                  ref)
        return rope_ops.sin_cos(ang, half)

    def _augment(self, coords):
        """timm's `_apply_coord_augs` on (N, 2) coordinates: shift U(-s, s) per axis, jitter exp(U(-ln J, ln J))
        per axis, rescale one exp(U(-ln R, ln R)), in that order."""
        rng = self.make_rng('dropout')
        k1, k2, k3 = jax.random.split(rng, 3)
        if self.rope_shift_coords is not None:
            s = self.rope_shift_coords
            coords = coords + jax.random.uniform(k1, (1, 2), minval=-s, maxval=s)
        if self.rope_jitter_coords is not None:
            j = math.log(self.rope_jitter_coords)
            coords = coords * jnp.exp(jax.random.uniform(k2, (1, 2), minval=-j, maxval=j))
        if self.rope_rescale_coords is not None:
            r = math.log(self.rope_rescale_coords)
            coords = coords * jnp.exp(jax.random.uniform(k3, (1, 1), minval=-r, maxval=r))
        return coords

    def forward_features(self, x, train: bool = False):
        """Images -> tokens (B, prefix + patches, D) after the blocks and the final norm (if any)."""
        self.check()
        if self.dynamic_img_size:
            if x.ndim != 4 or x.shape[-1] != self.in_chans or any(
                    s < p for s, p in zip(x.shape[1:3], self.patch_size_tuple)):
                raise ModelConfigError(f'input shape {tuple(x.shape[1:])}: this model takes (H, W, {self.in_chans}) '
                                       f'images of at least one patch {self.patch_size_tuple}')
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ModelConfigError(f"input shape {tuple(x.shape[1:])} does not match the model's {self.input_shape} "
                                   f'(set img_size/in_chans when creating the model)')
        d, b = self.embed_dim, x.shape[0]
        x = PatchConv(features=d, patch_size=self.patch_size_tuple, dtype=self.dtype, use_bias=not self.pre_norm,
                      name='patch_embed')(x.astype(self.dtype))
        grid = tuple(x.shape[1:3])
        x = x.reshape(b, -1, d).astype(jnp.promote_types(self.dtype, jnp.float32))
        self.sow('intermediates', 'embed', x)
        prefix = []
        if self.class_token:
            prefix.append(self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, d)))
        if self.reg_tokens:
            prefix.append(self.param('reg_token', nn.initializers.normal(1e-6), (1, self.reg_tokens, d)))
        npt = self.num_prefix_tokens
        pos = None
        if self.use_abs_pos_emb:
            rows = (0 if self.no_embed_class else npt) + math.prod(self.grid_size)
            pos = self.param('pos_embed', nn.initializers.normal(0.02), (1, rows, d))
            if grid != self.grid_size:
                keep = 0 if self.no_embed_class else npt
                table = resize_grid(pos[:, keep:].reshape((1,) + self.grid_size + (d,)), grid)
                pos = jnp.concatenate([pos[:, :keep], table.reshape(1, -1, d)], axis=1)
        if self.no_embed_class and pos is not None:
            x = x + pos.astype(x.dtype)
        if prefix:
            tokens = jnp.concatenate(prefix, axis=1).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(tokens, (b,) + tokens.shape[1:]), x], axis=1)
        if not self.no_embed_class and pos is not None:
            x = x + pos.astype(x.dtype)
        x = nn.Dropout(rate=self.pos_drop_rate)(x, deterministic=not train)
        freqs = None
        if self.use_rot_pos_emb and self.rope_type == 'mixed':
            freqs = self.param('rope_freqs', lambda rng: rope_ops.init_mixed_freqs(
                rng, self.head_dim, self.depth, self.num_heads, self.rope_temperature))
        rope = self.rope_table(grid, train, freqs)
        if train and self.patch_drop_rate > 0:
            x, rope = self._patch_drop(x, rope)
        if self.pre_norm:
            x = make_norm(self.norm_layer, self.norm_eps, jnp.promote_types(self.dtype, jnp.float32),
                          name='norm_pre')(x)
        rates = drop_path_rates(self.drop_path_rate, self.depth)
        block_cls = remat_block(EvaBlock, self.remat)
        mixed = self.use_rot_pos_emb and self.rope_type == 'mixed'
        for i, rate in enumerate(rates):
            blk_rope = None if rope is None else ((rope[0][i], rope[1][i]) if mixed else rope)
            x = block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_hidden, num_kv_heads=self.kv_heads(i),
                          qkv_bias=self.qkv_bias, qkv_fused=self.qkv_fused, attn_type=self.attn_type,
                          qk_norm=self.qk_norm, scale_attn_norm=self.scale_attn_norm,
                          scale_mlp_norm=self.scale_mlp_norm, mlp_layer=self.mlp_layer, norm=self.norm_layer,
                          norm_eps=self.norm_eps, init_values=self.init_values,
                          attn_only_layer_scale=self.attn_only_layer_scale, block_fn=self.block_fn,
                          rotate_half=self.rope_rotate_half, num_prefix_tokens=npt,
                          proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                          drop_path_rate=rate, dtype=self.dtype, attn_impl=self.attn_impl,
                          name=f'blocks_{i}')(x, blk_rope, not train)
            self.sow('intermediates', f'block_{i}', x)
        if self.use_final_norm:
            x = make_norm(self.norm_layer, self.norm_eps, self.dtype, name='norm')(x)
        self.sow('intermediates', 'encoded', x)
        return x

    def _patch_drop(self, x, rope):
        """timm's PatchDropoutWithIndices: each image keeps a random max(1, int(N (1 - rate))) of its patch
        tokens (in random order, prefix tokens first), the rotation tables gathered alike."""
        npt = self.num_prefix_tokens
        b, n = x.shape[0], x.shape[1] - npt
        keep_n = max(1, int(n * (1. - self.patch_drop_rate)))
        keep = jnp.argsort(jax.random.normal(self.make_rng('dropout'), (b, n)), axis=-1)[:, :keep_n]
        patches = jnp.take_along_axis(x[:, npt:], keep[..., None], axis=1)
        x = jnp.concatenate([x[:, :npt], patches], axis=1)
        if rope is None:
            return x, None
        if self.rope_type == 'mixed':   # (depth, 1, heads, N, Dh) -> (depth, B, heads, keep, Dh)
            gather = lambda t: jnp.take_along_axis(
                jnp.broadcast_to(t, (t.shape[0], b) + t.shape[2:]), keep[None, :, None, :, None], axis=3)
        else:                           # (N, Dh) -> (B, 1, keep, Dh)
            gather = lambda t: jnp.asarray(t)[keep][:, None]
        return x, (gather(rope[0]), gather(rope[1]))

    def forward_head(self, x, train: bool = False, pre_logits: bool = False):
        """Tokens -> logits (or pooled features with `pre_logits=True` or `num_classes=0`)."""
        kind = self.global_pool
        if kind == 'map':   # timm's attn_pool reads every token, prefix included
            x = MAPHead(num_heads=self.attn_pool_num_heads or self.num_heads,
                        mlp_dim=int(self.embed_dim * (self.attn_pool_mlp_ratio or self.mlp_ratio)),
                        norm_eps=self.norm_eps, dtype=self.dtype, attn_impl=self.attn_impl, norm=self.norm_layer,
                        name='attn_pool')(x, deterministic=not train)
        elif kind == 'token':
            x = x[:, 0]
        elif kind:
            patches = x[:, self.num_prefix_tokens:]
            if kind == 'avg':
                x = patches.mean(axis=1)
            elif kind == 'max':
                x = patches.max(axis=1)
            else:
                x = 0.5 * (patches.max(axis=1) + patches.mean(axis=1))
        if self.use_fc_norm:
            x = make_norm(self.norm_layer, self.norm_eps, self.dtype, name='fc_norm')(x)
        x = nn.Dropout(rate=self.drop_rate)(x, deterministic=not train)
        if pre_logits or self.num_classes == 0:
            return x
        return dense(self.num_classes, self.dtype, name='head', kernel_init=nn.initializers.zeros)(x)

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        """Images -> logits; `pre_logits=True`: the pooled (and normed) features. forward_features and
        forward_head create their submodules inline, so they run inside this method (linen's one compact method)."""
        return self.forward_head(self.forward_features(x, train), train, pre_logits)


# ---------------------------------------------------------------- timm's registrations (timm/models/eva.py)

def _eva(name, num_classes, **cfg):
    register(name, Eva, num_classes=num_classes, **cfg)


_LN5 = dict(norm_eps=1e-5)
# EVA (giant): abs pos, no rope, fused qkv with q/v bias, GELU MLP 6144
_GIANT = dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=6144 / 1408)
for _res in (224, 336, 560):
    _eva(f'eva_giant_patch14_{_res}', 1000, img_size=_res, **_GIANT)
_eva('eva_giant_patch14_clip_224', 1024, global_pool='token', **_GIANT)

# EVA-02: abs pos + rope 'cat' on a 16x16 reference grid
_E02 = dict(patch_size=14, depth=12, mlp_ratio=4 * 2 / 3, use_rot_pos_emb=True, ref_feat_shape=(16, 16))
_E02_SMALL = dict(_E02, mlp_layer='swiglu_packed')
_E02_BIG = dict(_E02, qkv_fused=False, mlp_layer='swiglu', scale_mlp_norm=True)
for _size, _dim, _heads in (('tiny', 192, 3), ('small', 384, 6)):
    for _res, _cls in ((224, 0), (336, 1000)):
        _eva(f'eva02_{_size}_patch14_{_res}', _cls, img_size=_res, embed_dim=_dim, num_heads=_heads, **_E02_SMALL)
for _size, _dim, _depth, _heads in (('base', 768, 12, 12), ('large', 1024, 24, 16)):
    _cfg = dict(_E02_BIG, embed_dim=_dim, depth=_depth, num_heads=_heads)
    for _res, _cls in ((224, 0), (448, 1000)):
        _eva(f'eva02_{_size}_patch14_{_res}', _cls, img_size=_res, **_cfg)
_CLIP = dict(scale_attn_norm=True, global_pool='token')
_eva('eva02_base_patch16_clip_224', 512, img_size=224, **dict(_E02_BIG, patch_size=16, embed_dim=768, num_heads=12,
                                                                  **_CLIP))
for _res in (224, 336):
    _eva(f'eva02_large_patch14_clip_{_res}', 768, img_size=_res,
         **dict(_E02_BIG, embed_dim=1024, depth=24, num_heads=16, **_CLIP))
_eva('eva02_enormous_patch14_clip_224', 1024, patch_size=14, embed_dim=1792, depth=64, num_heads=16,
     mlp_ratio=15360 / 1792, block_fn='res_post', global_pool='token')

# timm's SBB RoPE ViTs: registers, no class token, no abs pos, rope 'cat', LayerScale, avg + fc_norm
_SBB = dict(img_size=256, patch_size=16, init_values=1e-5, class_token=False, use_rot_pos_emb=True,
            use_abs_pos_emb=False, ref_feat_shape=(16, 16))
_eva('vit_medium_patch16_rope_reg1_gap_256', 1000, embed_dim=512, depth=12, num_heads=8, reg_tokens=1, **_SBB)
_eva('vit_mediumd_patch16_rope_reg1_gap_256', 1000, embed_dim=512, depth=20, num_heads=8, reg_tokens=1,
     qkv_bias=False, **_SBB)
_eva('vit_betwixt_patch16_rope_reg4_gap_256', 1000, embed_dim=640, depth=12, num_heads=10, reg_tokens=4, **_SBB)
_eva('vit_base_patch16_rope_reg1_gap_256', 1000, embed_dim=768, depth=12, num_heads=12, reg_tokens=1, **_SBB)

# Perception Encoder (PE core / lang / spatial): rope attention, norm_pre, rope 'cat' offset 1 'xy'
_PE = dict(attn_type='rope', pre_norm=True, use_rot_pos_emb=True, rope_grid_offset=1.0, rope_grid_indexing='xy',
           **_LN5)
_PE_G = dict(_PE, patch_size=14, embed_dim=1536, depth=50, num_heads=16, mlp_ratio=8960 / 1536, class_token=False,
             rope_grid_offset=0.0, ref_feat_shape=(32, 32))
_PE_POOL = dict(global_pool='map', attn_pool_num_heads=8, attn_pool_mlp_ratio=4.0)
_PE_SIZES = dict(tiny=(16, 192, 12, 3), small=(16, 384, 12, 6), base=(16, 768, 12, 12), large=(14, 1024, 24, 16))
for _size, _res, _cls in (('tiny', 384, 512), ('small', 384, 512), ('base', 224, 1024), ('large', 336, 1024)):
    _p, _dim, _depth, _heads = _PE_SIZES[_size]
    _eva(f'vit_pe_core_{_size}_patch{_p}_{_res}', _cls, img_size=_res, patch_size=_p, embed_dim=_dim, depth=_depth,
         num_heads=_heads, ref_feat_shape=(_res // _p,) * 2, **_PE, **_PE_POOL)
_eva('vit_pe_core_gigantic_patch14_448', 1280, img_size=448, **_PE_G, **_PE_POOL)
_LANG = dict(global_pool='avg', use_post_transformer_norm=False, fc_norm=False)   # timm's default pool, no norms
_eva('vit_pe_lang_large_patch14_448', 0, img_size=448, patch_size=14, embed_dim=1024, depth=23, num_heads=16,
     ref_feat_shape=(32, 32), init_values=0.1, **_PE, **_LANG)
_eva('vit_pe_lang_gigantic_patch14_448', 0, img_size=448, init_values=0.1, **dict(_PE_G, depth=47), **_LANG)
for _size, _res in (('tiny', 512), ('small', 512), ('base', 512), ('large', 448)):
    _p, _dim, _depth, _heads = _PE_SIZES[_size]
    _eva(f'vit_pe_spatial_{_size}_patch{_p}_{_res}', 0, img_size=_res, patch_size=_p, embed_dim=_dim, depth=_depth,
         num_heads=_heads, ref_feat_shape=(32, 32), **_PE, **_LANG)
_eva('vit_pe_spatial_gigantic_patch14_448', 0, img_size=448, init_values=0.1, **_PE_G, **_LANG)

# Naver RoPE-ViT: rope attention, LayerScale, class token pooled; axial T=100 or mixed (learned) T=10; _ape adds
# patch-only abs positions
_NAVER_SIZES = dict(small=(384, 12, 6), base=(768, 12, 12), large=(1024, 24, 16))
for _size, (_dim, _depth, _heads) in _NAVER_SIZES.items():
    _base = dict(img_size=224, patch_size=16, embed_dim=_dim, depth=_depth, num_heads=_heads, attn_type='rope',
                 init_values=1e-5, global_pool='token', use_rot_pos_emb=True, rope_grid_indexing='xy')
    for _mixed in (False, True):
        _r = dict(rope_type='mixed', rope_temperature=10.0) if _mixed else dict(rope_temperature=100.0)
        _tag = '_mixed' if _mixed else ''
        _eva(f'vit_{_size}_patch16_rope{_tag}_224', 1000, use_abs_pos_emb=False, **_base, **_r)
        _eva(f'vit_{_size}_patch16_rope{_tag}_ape_224', 1000, no_embed_class=True, **_base, **_r)

# DINOv3 (and EUPE's tiny): 4 registers, rope 'dinov3' half layout, LayerScale 1e-5, LN eps 1e-5, dynamic size,
# timm's default avg pool after the final norm
_DINO = dict(img_size=256, patch_size=16, dynamic_img_size=True, init_values=1e-5, rope_type='dinov3',
             rope_temperature=100.0, rope_rotate_half=True, use_rot_pos_emb=True, use_abs_pos_emb=False,
             reg_tokens=4, fc_norm=False, **_LN5)
_DINO_SIZES = dict(tiny=(192, 12, 3, {}), small=(384, 12, 6, {}), base=(768, 12, 12, {}), large=(1024, 24, 16, {}),
                   small_plus=(384, 12, 6, dict(mlp_layer='swiglu', swiglu_align_to=8)),
                   huge_plus=(1280, 32, 20, dict(mlp_layer='swiglu', swiglu_align_to=8)),
                   **{'7b': (4096, 40, 32, dict(mlp_layer='swiglu', swiglu_align_to=64, mlp_ratio=2.0))})
for _size, (_dim, _depth, _heads, _extra) in _DINO_SIZES.items():
    _cfg = dict(_DINO, embed_dim=_dim, depth=_depth, num_heads=_heads, **_extra)
    if _size != 'tiny':
        _eva(f'vit_{_size}_patch16_dinov3', 0, qkv_bias=False, **_cfg)
    if _size != '7b':
        _eva(f'vit_{_size}_patch16_dinov3_qkvb', 0, **_cfg)

# LingBot (DINOv3-style, class token pooled, 512 px)
for _size, (_dim, _depth, _heads, _extra) in (
        ('small', (384, 12, 6, {})), ('base', (768, 12, 12, {})), ('large', (1024, 24, 16, {})),
        ('giant', (1536, 40, 24, dict(qkv_bias=False, mlp_layer='swiglu', swiglu_align_to=8, mlp_ratio=4 * 2 / 3)))):
    _eva(f'vit_{_size}_patch16_lingbot', 0, **dict(_DINO, img_size=512, embed_dim=_dim, depth=_depth, num_heads=_heads,
                                                  global_pool='token', **_extra))

# Sapiens2: rope attention with q/k norms (RMSNorm), GQA in the middle blocks, 8 registers, packed SwiGLU,
# attention-only LayerScale, 1024 x 768
_SAP = dict(img_size=(1024, 768), patch_size=16, dynamic_img_size=True, attn_type='rope', qkv_fused=False,
            qk_norm=True, global_pool='token', mlp_layer='swiglu_packed', init_values=1.0, attn_only_layer_scale=True,
            rope_type='dinov3', rope_temperature=100.0, rope_rotate_half=True, rope_rescale_coords=2.0,
            use_rot_pos_emb=True, use_abs_pos_emb=False, reg_tokens=8, fc_norm=False, norm_layer='rmsnorm')
for _size, _dim, _depth, _heads, _gqa in (('base', 768, 12, 12, 12), ('large', 1024, 24, 16, 8),
                                          ('huge', 1280, 32, 16, 8), ('giant', 1536, 40, 24, 12),
                                          ('5b', 2432, 56, 32, 16)):
    _kv = tuple(_heads if i < 8 or i >= _depth - 8 else _gqa for i in range(_depth))
    _eva(f'vit_{_size}_patch16_sapiens2', 0, embed_dim=_dim, depth=_depth, num_heads=_heads, num_kv_heads=_kv, **_SAP)
