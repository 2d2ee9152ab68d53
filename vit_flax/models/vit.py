"""Vision Transformer (ViT) and DeiT in Flax linen, with Google's parameter tree.

The tree is the one Google's linen code builds (`embedding`, `cls`, `Transformer/posembed_input/
pos_embedding`, `Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
MlpBlock_0}`, `Transformer/encoder_norm`, `pre_logits`, `head`), so a Google checkpoint is this model's
own state. DeiT's distillation token and head add `dist` and `head_dist`; `embed_norm=True` (timm's
`embed_norm_layer`, torch `patch_embed.norm`; no Google model has one) adds `embedding_norm`.

R+ViT hybrids (`resnet=...`) put vit_jax's ResNet stem (`conv_root`, `gn_root`, `block{i}/unit{j}/...`, see
resnet.py) at the same top level, before `embedding`. timm's other hybrids, which Google has no tree for, hold
their stem as the `backbone` sub-module (stems.py): timm's ResNet-D (`resnet_d=...`, `vit_*_resnet{26,50}d*`)
and MobileCLIP's MCI stem (`mci_stem=True`, `vit_base_mci_224`, whose last stem conv is `embedding`).
`posemb='sincos2d'` replaces the learned table by
big_vision's fixed one (posemb.py): no `pos_embedding` param, positions added to the patch tokens only.

`attn_impl` (default 'auto') selects the attention implementation (ops/attention.py): 'manual_grad' (the
formula with hand-written derivatives, CPU's 'auto'; 'autodiff' whenever attention dropout is active in training),
'autodiff' (the formula, JAX's derivatives), 'xla', 'cudnn' (GPU), 'pallas' or 'splash' (TPU); the old names 'reference',
'fused' and 'plain' are accepted with a DeprecationWarning. Same parameters.

Intermediates: apply with `mutable=['intermediates']` to get the embedded tokens (`Transformer/embed`),
every block's output (`Transformer/block_{i}`) and the normed tokens (`Transformer/encoded`).

Registered here: timm's ViT and DeiT names, the 1-D ViTs, and timm's names for Google's other ViT
checkpoint families, the R+ViT hybrids and the SigLIP / SigLIP 2 image towers.
"""
import math
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl, dot_product_attention
from ..ops.resize import resize_grid
from ..registry import register
from .layers import (DropPath, LayerScale, MlpBlock, PatchConv, ProjectionParams, active_dropout, dense,
                     dense_general, drop_path_rates, fused_projection, remat_block, split_heads, to_tuple)
from .layers import norm_layer as make_norm
from .posemb import sincos2d
from .resnet import ResNetStem, stem_output_size, stem_stride
from .stems import MCIStem, ResNetD, mci_output_size, resnet_d_output_size, resnet_d_stride

Dtype = Any


class MultiHeadDotProductAttention(nn.Module):
    """Attention with Google's `query/key/value/out` DenseGeneral params ((D,H,Dh) kernels).

    `x` attends over `inputs_kv`; `inputs_kv=None` is self-attention, whose q, k, v projections run as one
    matmul (their kernels are concatenated at trace time; the parameter tree stays Google's); with
    `inputs_kv` given (the MAP head's probe), k and v run as one. Logits and softmax run in float32
    whatever the compute dtype, as timm's do under autocast; `attn_impl` as in the module docstring.

    timm's options: `qk_norm` normalises q and k per head (`query_norm`, `key_norm`, over Dh) before the
    scaling; `scale_norm` normalises the merged heads before `out` (`out_norm`, timm `attn.norm`);
    `out_bias=False` is timm's `proj_bias=False`. Norms are `norm` ('layernorm' | 'rmsnorm') with `norm_eps`.

    `diff=True` is timm's DiffAttention (Differential Transformer, arXiv 2410.05258): the same query/key/value/out
    kernels, each head's q and k split into halves (q1 | q2 along Dh: timm's 2H sub-heads of Dh/2, in its order),
    softmax(q1 k1^T) v - lambda softmax(q2 k2^T) v with the scale (Dh/2)^-0.5 and v of the full Dh, then
    `sub_norm` (an RMSNorm over Dh, eps 1e-5, shared by the heads) times (1 - lambda_init). lambda =
    exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init (params `lambda_q1`, `lambda_k1`,
    `lambda_q2`, `lambda_k2`, each (Dh/2,)); `lambda_init` (0.8 - 0.6 exp(-0.3 * block index), timm's) and
    `lambda_scale` (1 - lambda_init) are call arguments: Python floats, or float32 scalars under nn.scan.
    """
    num_heads: int
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    kernel_init: Any = nn.initializers.xavier_uniform()
    attn_impl: str = 'auto'
    qk_norm: bool = False
    scale_norm: bool = False
    out_bias: bool = True
    norm: str = 'layernorm'
    norm_eps: float = 1e-6
    diff: bool = False

    @nn.compact
    def __call__(self, x, inputs_kv=None, deterministic: bool = True, lambda_init=None, lambda_scale=None,
                 mask=None):
        dim, heads = x.shape[-1], self.num_heads
        if dim % heads:
            raise ModelConfigError(f'embed dim {dim} is not divisible by {heads} heads')
        head_dim = dim // heads
        if self.diff and (head_dim % 2 or inputs_kv is not None or lambda_init is None):
            raise ModelConfigError(f'differential attention is self-attention with an even head dim (got {head_dim}) '
                                   f'and a lambda_init')
        qk_dim = head_dim // 2 if self.diff else head_dim   # the width q and k are scaled and normed over
        kv = x if inputs_kv is None else inputs_kv
        q_p, k_p, v_p = (ProjectionParams(features=(heads, head_dim), use_bias=self.qkv_bias,
                                          kernel_init=self.kernel_init, name=n)(t.shape[-1])
                         for n, t in (('query', x), ('key', kv), ('value', kv)))
        scale = self.qk_scale if self.qk_scale is not None else qk_dim ** -0.5
        # with qk_norm the scaling follows the norms: the projections stay float32 until then
        split_dtype, q_scale = (jnp.float32, None) if self.qk_norm else (self.dtype, scale)
        if inputs_kv is None:
            q, k, v = split_heads(fused_projection(x, [q_p, k_p, v_p], self.dtype), 3, heads, split_dtype, q_scale)
        else:
            (q,) = split_heads(fused_projection(x, [q_p], self.dtype), 1, heads, split_dtype, q_scale)
            k, v = split_heads(fused_projection(kv, [k_p, v_p], self.dtype), 2, heads, split_dtype)
        if self.qk_norm:   # per (sub-)head: over Dh, or Dh/2 for differential attention
            sub = lambda t: t.reshape(t.shape[:-1] + (head_dim // qk_dim, qk_dim))
            q = make_norm(self.norm, self.norm_eps, jnp.float32, name='query_norm')(sub(q)).reshape(q.shape) * scale
            k = make_norm(self.norm, self.norm_eps, jnp.float32, name='key_norm')(sub(k)).reshape(k.shape)
            q, k, v = (t.astype(self.dtype) for t in (q, k, v))
        drop = nn.Dropout(rate=self.attn_drop_rate)
        if self.diff:
            lam = [self.param(n, nn.initializers.normal(stddev=0.1), (qk_dim,), jnp.float32)
                   for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')]
            lam = jnp.exp(jnp.sum(lam[0] * lam[1])) - jnp.exp(jnp.sum(lam[2] * lam[3])) + lambda_init
            a1, a2 = (dot_product_attention(q[..., s], k[..., s], v, mask=mask, impl=self.attn_impl,
                                            dropout=active_dropout(drop, deterministic))
                      for s in (slice(0, qk_dim), slice(qk_dim, None)))
            out = a1 - lam.astype(a1.dtype) * a2
            out = (nn.RMSNorm(epsilon=1e-5, dtype=self.dtype, name='sub_norm')(out) * lambda_scale).astype(self.dtype)
        else:
            out = dot_product_attention(q, k, v, mask=mask, impl=self.attn_impl,
                                        dropout=active_dropout(drop, deterministic))
        out = out.transpose(0, 2, 1, 3)   # (B, N, H, Dh)
        if self.scale_norm:
            b, n = out.shape[:2]
            out = make_norm(self.norm, self.norm_eps, self.dtype, name='out_norm')(
                out.reshape(b, n, dim)).reshape(b, n, heads, head_dim)
        return dense_general(dim, (-2, -1), self.dtype, name='out', kernel_init=self.kernel_init,
                             use_bias=self.out_bias)(out)


class AddPositionEmbs(nn.Module):
    """Learned position embedding, param `pos_embedding` (1, L - skip, D): over all L tokens (Google's, timm's
    default), or over the tokens after the first `skip` (timm's `no_embed_class`: prefix tokens get none).

    `grid` (timm's `dynamic_img_size`): the table is for this patch grid, and an input whose patch grid
    `tokens_grid` differs gets the table resized to it, patch rows only (torch's antialiased bicubic, as timm's
    `resample_abs_pos_embed`); `prefix` rows of the table (not `skip`ped ones) are kept as they are."""
    skip: int = 0
    grid: Optional[Tuple[int, int]] = None
    prefix: int = 0

    @nn.compact
    def __call__(self, x, tokens_grid=None):
        rows = x.shape[1] - self.skip if self.grid is None else self.prefix + self.grid[0] * self.grid[1]
        pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (1, rows, x.shape[2]))
        if self.grid is not None and tuple(tokens_grid) != tuple(self.grid):
            table = resize_grid(pos[:, self.prefix:].reshape((1,) + tuple(self.grid) + (-1,)), tokens_grid)
            pos = jnp.concatenate([pos[:, :self.prefix], table.reshape(1, -1, pos.shape[-1])], axis=1)
        if not self.skip:
            return x + pos.astype(x.dtype)
        return jnp.concatenate([x[:, :self.skip], x[:, self.skip:] + pos.astype(x.dtype)], axis=1)


class Encoder1DBlock(nn.Module):
    """A transformer block; children `LayerNorm_0`, `MultiHeadDotProductAttention_0`, `LayerNorm_1`,
    `MlpBlock_0` (Google's), and with `init_values` the LayerScales `LayerScale_0`, `LayerScale_1` (timm
    `ls1`, `ls2`).

    `block_fn='block'` (timm Block): pre-norm, x + ls1(attn(LN(x))), then x + ls2(mlp(LN(x))).
    `block_fn='res_post'` (timm ResPostBlock): x + LN(attn(x)), then x + LN(mlp(x)); its norms start at
    `init_values` and it has no LayerScale.
    `block_fn='parallel_things'` (timm ParallelThingsBlock, "three things"): x + sum_i ls_i(attn_i(LN_i(x))), then
    x + sum_i ls_(2+i)(mlp_i(LN_(2+i)(x))) over two branches: children numbered on: LayerNorm_{0..3},
    MultiHeadDotProductAttention_{0,1}, MlpBlock_{0,1}, LayerScale_{0..3}.
    `block_fn='parallel_scaling'` (timm ParallelScalingBlock, ViT-22B): y = LN(x), x + ls(attn(y) + mlp(y)); the
    MLP's first layer always has a bias (timm's in_proj bias or its `mlp_bias`). Each branch has drop path.
    `attn_layer='diff'` makes every attention differential (MultiHeadDotProductAttention's `diff`, timm's
    `attn_layer='diff'`); with 'parallel_scaling' it is timm's DiffParallelScalingBlock, whose one output
    projection over [attention, MLP] has one bias: attention's `out/bias`, the MLP's `Dense_1` has none.
    `lambda_init`, `lambda_scale`: the differential attention's call arguments (this block's index sets them).
    """
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    gelu: str = 'exact'
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'
    norm: str = 'layernorm'
    init_values: Optional[float] = None
    proj_bias: bool = True
    qk_norm: bool = False
    scale_attn_norm: bool = False
    scale_mlp_norm: bool = False
    mlp_layer: str = 'mlp'
    block_fn: str = 'block'
    attn_layer: str = 'attn'

    @nn.compact
    def __call__(self, x, deterministic: bool = True, drop_path_rate=None, lambda_init=None, lambda_scale=None,
                 mask=None):
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        if self.attn_layer not in ('attn', 'diff'):
            raise ModelConfigError(f"attn_layer must be 'attn' or 'diff', got {self.attn_layer!r}")
        diff = self.attn_layer == 'diff'
        if diff and self.block_fn not in ('block', 'parallel_scaling'):
            raise ModelConfigError(f"attn_layer='diff' needs block_fn 'block' or 'parallel_scaling', got {self.block_fn!r}")
        if self.block_fn not in ('block', 'res_post', 'parallel_things', 'parallel_scaling'):
            raise ModelConfigError(f"block_fn must be 'block', 'res_post', 'parallel_things' or 'parallel_scaling', "
                                   f"got {self.block_fn!r}")
        post = self.block_fn == 'res_post'
        norm_init = nn.initializers.constant(self.init_values) if post and self.init_values is not None \
            else nn.initializers.ones
        norm = lambda name: make_norm(self.norm, self.norm_eps, self.dtype, name=name, scale_init=norm_init)
        scale = (lambda name, y: LayerScale(self.init_values, name=name)(y)) if self.init_values and not post \
            else (lambda name, y: y)
        drop_path = lambda y: DropPath()(y, rate=rate, deterministic=deterministic)
        attn = lambda i, y: MultiHeadDotProductAttention(
            num_heads=self.num_heads, qkv_bias=self.qkv_bias, qk_scale=self.qk_scale,
            attn_drop_rate=self.attn_drop_rate, dtype=self.dtype, attn_impl=self.attn_impl, qk_norm=self.qk_norm,
            scale_norm=self.scale_attn_norm, out_bias=self.proj_bias, norm=self.norm, norm_eps=self.norm_eps,
            diff=diff, name=f'MultiHeadDotProductAttention_{i}')(y, deterministic=deterministic,
                                                                 lambda_init=lambda_init, lambda_scale=lambda_scale,
                                                                 mask=mask)
        mlp = lambda i, y, in_bias=self.proj_bias, out_bias=None: MlpBlock(
            mlp_dim=self.mlp_dim, drop_rate=self.proj_drop_rate, gelu=self.gelu, dtype=self.dtype,
            kind=self.mlp_layer, use_bias=self.proj_bias, in_bias=in_bias, out_bias=out_bias,
            norm=self.norm if self.scale_mlp_norm else None, norm_eps=self.norm_eps, name=f'MlpBlock_{i}')(y, deterministic)
        proj_drop = lambda y: nn.Dropout(rate=self.proj_drop_rate)(y, deterministic=deterministic)
        if self.block_fn == 'parallel_scaling':   # one norm, attention and MLP side by side, one LayerScale
            y = norm('LayerNorm_0')(x)
            return x + drop_path(scale('LayerScale_0', attn(0, y) + mlp(0, y, in_bias=True,
                                                                    out_bias=False if diff else None)))
        if self.block_fn == 'parallel_things':    # two attentions side by side, then two MLPs
            n = 2
            x = x + sum(drop_path(scale(f'LayerScale_{i}', proj_drop(attn(i, norm(f'LayerNorm_{i}')(x)))))
                        for i in range(n))
            return x + sum(drop_path(scale(f'LayerScale_{n + i}', mlp(i, norm(f'LayerNorm_{n + i}')(x))))
                           for i in range(n))
        y = x if post else norm('LayerNorm_0')(x)
        y = proj_drop(attn(0, y))
        y = norm('LayerNorm_0')(y) if post else scale('LayerScale_0', y)
        x = x + drop_path(y)
        y = x if post else norm('LayerNorm_1')(x)
        y = mlp(0, y)
        y = norm('LayerNorm_1')(y) if post else scale('LayerScale_1', y)
        return x + drop_path(y)


class ScanStep(Encoder1DBlock):
    """One step of nn.scan over the blocks: carry in, (carry, the block's output when `collect`) out."""
    collect: bool = False

    def __call__(self, x, deterministic: bool = True, drop_path_rate=None, lambda_init=None, lambda_scale=None):
        x = super().__call__(x, deterministic, drop_path_rate, lambda_init, lambda_scale)
        return x, (x if self.collect else None)


# The block options an Encoder passes on to every block, unchanged (Encoder1DBlock's fields of the same names).
BLOCK_OPTIONS = ('num_heads', 'mlp_dim', 'qkv_bias', 'qk_scale', 'attn_drop_rate', 'gelu', 'norm_eps', 'dtype',
                 'attn_impl', 'norm', 'init_values', 'proj_bias', 'qk_norm', 'scale_attn_norm', 'scale_mlp_norm',
                 'mlp_layer', 'block_fn', 'attn_layer')


class Encoder(nn.Module):
    """Position embedding, the blocks and the final norm: Google's `Transformer` sub-tree.

    `pos_skip` leading tokens get no position (timm's `no_embed_class`); `pre_norm` normalises the embedded
    tokens before the blocks (`pre_norm`, timm `norm_pre`); `final_norm=False` leaves out `encoder_norm`.
    `scan=True` runs the blocks with nn.scan (one block compiled, not `depth`): the params are then
    big_vision's scanned layout, `encoderblock/...` with a leading depth axis.
    """
    depth: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    drop_rate: float = 0.0        # on the embedded tokens, and each block's proj_drop_rate
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    gelu: str = 'exact'
    norm_eps: float = 1e-6
    remat: bool = False
    dtype: Dtype = jnp.float32
    learned_posemb: bool = True   # False: the caller added fixed positions already
    scan: bool = False
    remat_policy: Optional[str] = None
    attn_impl: str = 'auto'
    norm: str = 'layernorm'
    init_values: Optional[float] = None
    proj_bias: bool = True
    qk_norm: bool = False
    scale_attn_norm: bool = False
    scale_mlp_norm: bool = False
    mlp_layer: str = 'mlp'
    block_fn: str = 'block'
    attn_layer: str = 'attn'
    pos_skip: int = 0
    pre_norm: bool = False
    final_norm: bool = True
    pos_grid: Optional[Tuple[int, int]] = None   # dynamic_img_size: the grid the table is for (AddPositionEmbs)
    pos_prefix: int = 0

    @nn.compact
    def __call__(self, x, deterministic: bool = True, grid=None):
        if self.learned_posemb:
            x = AddPositionEmbs(skip=self.pos_skip, grid=self.pos_grid, prefix=self.pos_prefix,
                                name='posembed_input')(x, grid)
        x = nn.Dropout(rate=self.drop_rate)(x, deterministic=deterministic)
        self.sow('intermediates', 'embed', x)
        if self.pre_norm:  # float32 out: the residual stream's dtype
            x = make_norm(self.norm, self.norm_eps, jnp.promote_types(self.dtype, jnp.float32), name='pre_norm')(x)
        kw = {k: getattr(self, k) for k in BLOCK_OPTIONS}
        kw['proj_drop_rate'] = self.drop_rate
        rates = drop_path_rates(self.drop_path_rate, self.depth)
        # differential attention's lambda_init per block index, and 1 - lambda_init (Python floats, as timm's)
        lambdas = [0.8 - 0.6 * math.exp(-0.3 * i) for i in range(self.depth)]
        lambdas = [(lam, 1 - lam) for lam in lambdas] if self.attn_layer == 'diff' else [(None, None)] * self.depth
        if self.scan:
            collect = self.is_mutable_collection('intermediates')
            per_block = (jnp.asarray(rates, jnp.float32),) if self.drop_path_rate or self.attn_layer == 'diff' else ()
            if self.attn_layer == 'diff':
                per_block += tuple(jnp.asarray(np.array(col, np.float64), jnp.float32) for col in zip(*lambdas))
            blocks = nn.scan(remat_block(ScanStep, self.remat, self.remat_policy, scanned=True),
                             variable_axes={'params': 0}, split_rngs={'params': True, 'dropout': True},
                             in_axes=(nn.broadcast,) + (0,) * len(per_block), length=self.depth)
            x, outs = blocks(collect=collect, name='encoderblock', **kw)(x, deterministic, *per_block)
            for i in range(self.depth if collect else 0):
                self.sow('intermediates', f'block_{i}', outs[i])
        else:
            block_cls = remat_block(Encoder1DBlock, self.remat, self.remat_policy)
            for i, rate in enumerate(rates):
                x = block_cls(drop_path_rate=rate, name=f'encoderblock_{i}', **kw)(x, deterministic, None, *lambdas[i])
                self.sow('intermediates', f'block_{i}', x)
        if self.final_norm:
            x = make_norm(self.norm, self.norm_eps, self.dtype, name='encoder_norm')(x)
        self.sow('intermediates', 'encoded', x)
        return x


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision; timm's AttentionPoolLatent): a learned probe attends over the
    tokens, then x + MLP(LN(x))."""
    num_heads: int
    mlp_dim: int
    gelu: str = 'exact'
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'
    norm: str = 'layernorm'

    @nn.compact
    def __call__(self, x, deterministic: bool = True, mask=None):
        probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
        probe = jnp.tile(probe.astype(x.dtype), (x.shape[0], 1, 1))
        x = MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, attn_impl=self.attn_impl,
                                         name='MultiHeadDotProductAttention_0')(probe, inputs_kv=x,
                                                                                deterministic=deterministic, mask=mask)
        y = make_norm(self.norm, self.norm_eps, self.dtype, name='LayerNorm_0')(x)
        x = x + MlpBlock(mlp_dim=self.mlp_dim, gelu=self.gelu, dtype=self.dtype, name='MlpBlock_0')(y, deterministic)
        return x[:, 0]


class VisionTransformer(nn.Module):
    """ViT / DeiT. Input NHWC images (or (B, L, C) signals with `spatial_dims=1`); output logits.

    `num_classes=0` returns pooled features. DeiT distilled (`distilled=True`) returns the mean of the
    class and distillation heads in eval and the pair `(logits, dist_logits)` when `train=True`.

    timm's options, each with timm's meaning and default: `act_layer`, `norm_layer` (+ `norm_eps`),
    `init_values` (LayerScale), `reg_tokens`, `no_embed_class`, `class_token`, `pre_norm`, `final_norm`,
    `fc_norm`, `global_pool` ('token', 'avg', 'avgmax', 'max' over the patch tokens, 'token_avg' (the class
    token beside the mean of the patch tokens, 2 * embed_dim wide: transformers' Dinov2ForImageClassification
    head; not timm's), 'map' (attention pooling
    over the patch tokens), '' (every token to the head); 'gap' is big_vision's name for 'avg' with the final
    norm before the pooling, i.e. timm's `global_pool='avg', fc_norm=False`), `qkv_bias`, `proj_bias`,
    `qk_norm`, `scale_attn_norm`, `scale_mlp_norm`, `mlp_layer`, `block_fn`, `attn_layer`. Prefix tokens in order: cls,
    dist, registers. The tree grows by `reg`, `pool_norm` (timm `fc_norm`), `Transformer/pre_norm`, and per block
    `LayerScale_{0,1}/scale`, `MultiHeadDotProductAttention_0/{query_norm, key_norm, out_norm}`,
    `MlpBlock_0/{Dense_gate, norm}`; options that remove parts remove their params.
    """
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    patch_size: Union[int, Sequence[int]] = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_dim: Optional[int] = None
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    representation_size: Optional[int] = None
    global_pool: Literal['token', 'avg', 'gap', 'avgmax', 'max', 'map', 'token_avg', ''] = 'token'
    class_token: Optional[bool] = None
    distilled: bool = False
    embed_norm: bool = False  # LayerNorm on the patch tokens, as the seeds' 1-D ViT passes norm_layer to its PatchEmbed
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    gelu: Literal['exact', 'tanh'] = 'exact'
    norm_eps: float = 1e-6
    spatial_dims: int = 2
    remat: bool = False
    dtype: Dtype = jnp.float32
    resnet: Optional[Tuple[int, ...]] = None   # hybrid: units per ResNet stage, () = root block only
    resnet_numerics: Literal['timm', 'google'] = 'timm'   # see resnet.py
    posemb: Literal['learn', 'sincos2d'] = 'learn'        # sincos2d: big_vision's fixed table
    scan_blocks: bool = False                  # nn.scan over the blocks (big_vision's scanned tree)
    remat_policy: Optional[str] = None         # jax.checkpoint_policies name used with remat (None: save nothing)
    attn_impl: AttnImpl = 'auto'    # the attention kernel (module docstring)
    # ---- timm's VisionTransformer options, under timm's names (see the class docstring)
    act_layer: Optional[Literal['gelu', 'gelu_tanh', 'quick_gelu', 'silu']] = None   # None: as `gelu` says
    norm_layer: Literal['layernorm', 'rmsnorm'] = 'layernorm'   # every norm, with `norm_eps`
    init_values: Optional[float] = None        # LayerScale (LayerScale_0/1 in each block) starting at this
    reg_tokens: int = 0                        # register tokens `reg` (1, R, D), after cls (and dist)
    no_embed_class: bool = False               # positions for the patches only (DeiT III, FlexiViT, registers)
    pre_norm: bool = False                     # Transformer/pre_norm before the blocks, no patch-embedding bias
    final_norm: bool = True                    # False: neither encoder_norm nor fc_norm
    fc_norm: Optional[bool] = None             # norm after pooling instead of before; None: for avg/avgmax/max
    proj_bias: bool = True                     # biases of attention's `out` and of the MLP
    qk_norm: bool = False
    scale_attn_norm: bool = False
    scale_mlp_norm: bool = False
    mlp_layer: Literal['mlp', 'swiglu', 'swiglu_packed'] = 'mlp'
    block_fn: Literal['block', 'res_post', 'parallel_things', 'parallel_scaling'] = 'block'
    attn_layer: Literal['attn', 'diff'] = 'attn'   # 'diff': differential attention (timm DiffAttention)
    dynamic_img_size: bool = False             # any input size: the position table resized in the forward
    # ---- timm's other hybrids (stems.py), the stem as the `backbone` sub-module before `embedding`
    resnet_d: Optional[Tuple[int, ...]] = None  # timm's ResNet-D: units per stage ((2,2,2,2) 26d, (3,4,6,3) 50d)
    mci_stem: bool = False                     # MobileCLIP's MCI stem (embed_dim / 4 wide, stride 8)

    # -- derived configuration (plain properties so they work on unbound modules too) --
    @property
    def patch_size_tuple(self):
        return to_tuple(self.patch_size, self.spatial_dims)

    @property
    def has_stem(self) -> bool:
        """A convolutional stem before the patch embedding (a hybrid)."""
        return self.resnet is not None or self.resnet_d is not None or self.mci_stem

    @property
    def grid_size(self):
        img = to_tuple(self.img_size, self.spatial_dims)
        if self.resnet is not None:
            img = tuple(stem_output_size(i, self.resnet) for i in img)
        elif self.resnet_d is not None:
            img = tuple(resnet_d_output_size(i, self.resnet_d) for i in img)
        elif self.mci_stem:
            img = tuple(mci_output_size(i) for i in img)
        return tuple(i // p for i, p in zip(img, self.patch_size_tuple))

    @property
    def token_stride(self):
        """Input pixels per token along each axis: the patch, times the stem's stride in a hybrid."""
        s = stem_stride(self.resnet) if self.resnet is not None else resnet_d_stride(self.resnet_d) \
            if self.resnet_d is not None else 8 if self.mci_stem else 1
        return tuple(p * s for p in self.patch_size_tuple)

    @property
    def has_class_token(self) -> bool:
        return self.global_pool in ('token', 'token_avg') or self.distilled if self.class_token is None \
            else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.has_class_token) + int(self.distilled) + int(self.reg_tokens)

    @property
    def activation(self) -> str:
        """The MLP activation: `act_layer` when given, else `gelu` ('exact' is timm's 'gelu')."""
        return self.act_layer or self.gelu

    @property
    def pool_type(self) -> str:
        """`global_pool` in timm's words: big_vision's 'gap' is 'avg'."""
        return 'avg' if self.global_pool == 'gap' else self.global_pool

    @property
    def use_fc_norm(self) -> bool:
        """The final norm after pooling (`fc_norm`) rather than on the tokens (`encoder_norm`), as timm decides."""
        if self.fc_norm is not None:
            return bool(self.fc_norm)
        return self.global_pool in ('avg', 'avgmax', 'max')

    @property
    def mlp_hidden(self) -> int:
        return int(self.mlp_dim or int(self.embed_dim * self.mlp_ratio))

    @property
    def input_shape(self):
        return to_tuple(self.img_size, self.spatial_dims) + (self.in_chans,)

    def setup(self):
        if self.global_pool not in ('token', 'avg', 'gap', 'avgmax', 'max', 'map', 'token_avg', ''):
            raise ModelConfigError(f"global_pool must be one of 'token', 'avg', 'avgmax', 'max', 'map', 'token_avg', '' "
                                   f"(or 'gap'), got {self.global_pool!r}")
        if self.global_pool in ('token', 'token_avg') and not self.has_class_token:
            raise ModelConfigError(f"global_pool={self.global_pool!r} reads the class token: it needs class_token=True")
        if self.distilled and self.global_pool != 'token':
            raise ModelConfigError('a distilled model reads the class and distillation tokens: global_pool must be token')
        if self.posemb not in ('learn', 'sincos2d'):
            raise ModelConfigError(f"posemb must be 'learn' or 'sincos2d', got {self.posemb!r}")
        if (self.has_stem or self.posemb == 'sincos2d') and self.spatial_dims != 2:
            raise ModelConfigError('a convolutional stem and sincos2d positions need 2-D images')
        if (self.resnet is not None) + (self.resnet_d is not None) + bool(self.mci_stem) > 1:
            raise ModelConfigError('one stem at most: resnet, resnet_d or mci_stem')
        if self.resnet_d is not None and not (1 <= len(self.resnet_d) <= 4 and all(u >= 1 for u in self.resnet_d)):
            raise ModelConfigError(f'resnet_d takes 1 to 4 stages of at least one unit, got {self.resnet_d}')
        if self.mci_stem and self.embed_dim % 4:
            raise ModelConfigError(f'the MCI stem is embed_dim / 4 wide: embed_dim {self.embed_dim} is not a multiple of 4')
        check_impl(self.attn_impl)
        patch = self.patch_size_tuple
        if not self.has_stem and not all(self.grid_size):
            raise ModelConfigError(f'img_size {self.img_size} is smaller than the patch {self.patch_size}: '
                                   f'no patch fits')
        mlp_dim = self.mlp_hidden
        if self.resnet is not None:
            self.stem = ResNetStem(layers=tuple(self.resnet), numerics=self.resnet_numerics, dtype=self.dtype)
            nn.share_scope(self, self.stem)   # Google's tree: conv_root, gn_root, block1... at the top level
        elif self.resnet_d is not None:
            self.backbone = ResNetD(layers=tuple(self.resnet_d), dtype=self.dtype)
        elif self.mci_stem:
            self.backbone = MCIStem(width=self.embed_dim // 4, dtype=self.dtype)
        self.embedding = PatchConv(features=self.embed_dim, patch_size=patch, dtype=self.dtype,
                                   use_bias=not self.pre_norm)
        if self.embed_norm:  # float32 output: the residual stream's dtype (see forward_features)
            self.embedding_norm = make_norm(self.norm_layer, self.norm_eps, jnp.promote_types(self.dtype, jnp.float32))
        if self.has_class_token:
            self.cls = self.param('cls', nn.initializers.zeros, (1, 1, self.embed_dim))
        if self.distilled:
            self.dist = self.param('dist', nn.initializers.zeros, (1, 1, self.embed_dim))
        if self.reg_tokens:
            self.reg = self.param('reg', nn.initializers.normal(stddev=1e-6), (1, self.reg_tokens, self.embed_dim))
        self.Transformer = Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=mlp_dim,
                                   qkv_bias=self.qkv_bias, qk_scale=self.qk_scale, drop_rate=self.drop_rate,
                                   attn_drop_rate=self.attn_drop_rate, drop_path_rate=self.drop_path_rate,
                                   gelu=self.activation, norm_eps=self.norm_eps, remat=self.remat, dtype=self.dtype,
                                   learned_posemb=self.posemb == 'learn', scan=self.scan_blocks,
                                   remat_policy=self.remat_policy, attn_impl=self.attn_impl, norm=self.norm_layer,
                                   init_values=self.init_values, proj_bias=self.proj_bias, qk_norm=self.qk_norm,
                                   scale_attn_norm=self.scale_attn_norm, scale_mlp_norm=self.scale_mlp_norm,
                                   mlp_layer=self.mlp_layer, block_fn=self.block_fn, attn_layer=self.attn_layer,
                                   pos_skip=self.num_prefix_tokens if self.no_embed_class else 0,
                                   pre_norm=self.pre_norm, final_norm=self.final_norm and not self.use_fc_norm,
                                   pos_grid=tuple(self.grid_size) if self.dynamic_img_size else None,
                                   pos_prefix=0 if self.no_embed_class else self.num_prefix_tokens)
        if self.global_pool == 'map':
            self.MAPHead_0 = MAPHead(num_heads=self.num_heads, mlp_dim=mlp_dim, gelu=self.activation,
                                     norm_eps=self.norm_eps, dtype=self.dtype, attn_impl=self.attn_impl,
                                     norm=self.norm_layer)
        if self.final_norm and self.use_fc_norm:
            self.pool_norm = make_norm(self.norm_layer, self.norm_eps, self.dtype)   # timm's fc_norm
        if self.representation_size:
            self.pre_logits = dense(self.representation_size, self.dtype)
        self.head_dropout = nn.Dropout(rate=self.drop_rate)
        if self.num_classes > 0:
            self.head = dense(self.num_classes, self.dtype, kernel_init=nn.initializers.zeros)
            if self.distilled:
                self.head_dist = dense(self.num_classes, self.dtype, kernel_init=nn.initializers.zeros)

    def forward_features(self, x, train: bool = False):
        """Images -> normed tokens (B, prefix + patches, D)."""
        expected = self.input_shape
        if self.dynamic_img_size:
            if self.has_stem or self.spatial_dims != 2 or self.posemb != 'learn':
                raise ModelConfigError('dynamic_img_size needs a 2-D ViT with learned positions and no stem')
            if x.ndim != 4 or x.shape[-1] != self.in_chans or any(s < p for s, p in zip(x.shape[1:3], self.patch_size_tuple)):
                raise ModelConfigError(f'input shape {tuple(x.shape[1:])}: this model takes (H, W, {self.in_chans}) '
                                       f'images of at least one patch {self.patch_size_tuple}')
        elif tuple(x.shape[1:]) != expected:
            raise ModelConfigError(f'input shape {tuple(x.shape[1:])} does not match the model\'s {expected} '
                                   f'(set img_size/in_chans when creating the model)')
        x = x.astype(self.dtype)
        if self.resnet is not None:
            x = self.stem(x)
        elif self.has_stem:
            x = self.backbone(x)
        x = self.embedding(x)
        tokens_grid = x.shape[1:-1]
        # The residual stream stays float32 under a bf16 compute dtype (as timm's under autocast, where the
        # float32 position embedding promotes it): only matmul operands and branch activations are rounded.
        x = x.reshape(x.shape[0], -1, x.shape[-1]).astype(jnp.promote_types(self.dtype, jnp.float32))
        if self.embed_norm:
            x = self.embedding_norm(x)
        if self.posemb == 'sincos2d':  # as big_vision: before the class token, which gets no position
            x = x + jnp.asarray(sincos2d(*self.grid_size, self.embed_dim), x.dtype)
        prefix = []
        if self.has_class_token:
            prefix.append(self.cls)
        if self.distilled:
            prefix.append(self.dist)
        if self.reg_tokens:
            prefix.append(self.reg)
        if prefix:
            tokens = jnp.concatenate(prefix, axis=1).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(tokens, (x.shape[0],) + tokens.shape[1:]), x], axis=1)
        return self.Transformer(x, deterministic=not train, grid=tokens_grid)

    def pool(self, x, train: bool = False):
        """Normed tokens -> pooled features, as timm's `pool`: the class token, a reduction over the patch
        tokens (prefix tokens left out), the MAP head over the patch tokens, or every token ('')."""
        if self.distilled:
            return x[:, 0], x[:, 1]
        kind = self.pool_type
        if kind == 'token':
            return x[:, 0]
        if kind == '':
            return x
        patches = x[:, self.num_prefix_tokens:]
        if kind == 'avg':
            return patches.mean(axis=1)
        if kind == 'token_avg':   # transformers' Dinov2(WithRegisters)ForImageClassification: registers left out
            return jnp.concatenate([x[:, 0], patches.mean(axis=1)], axis=-1)
        if kind == 'max':
            return patches.max(axis=1)
        if kind == 'avgmax':
            return 0.5 * (patches.max(axis=1) + patches.mean(axis=1))
        return self.MAPHead_0(patches, deterministic=not train)

    def forward_head(self, x, train: bool = False, pre_logits: bool = False):
        """Normed tokens -> logits (or pooled features with `pre_logits=True` or `num_classes=0`)."""
        pooled = self.pool(x, train)
        if self.distilled:
            x, x_dist = pooled
            if pre_logits or self.num_classes == 0:
                return (x + x_dist) / 2
            x = self.head(self.head_dropout(x, deterministic=not train))
            x_dist = self.head_dist(self.head_dropout(x_dist, deterministic=not train))
            return (x, x_dist) if train else (x + x_dist) / 2
        x = pooled
        if self.final_norm and self.use_fc_norm:
            x = self.pool_norm(x)
        if self.representation_size:
            x = jnp.tanh(self.pre_logits(x))
        if pre_logits or self.num_classes == 0:
            return x
        return self.head(self.head_dropout(x, deterministic=not train))

    def __call__(self, x, train: bool = False):
        return self.forward_head(self.forward_features(x, train), train)


def _vit(name, **cfg):
    register(name, VisionTransformer, **cfg)


_SIZES = dict(
    tiny=dict(embed_dim=192, depth=12, num_heads=3),
    small=dict(embed_dim=384, depth=12, num_heads=6),
    base=dict(embed_dim=768, depth=12, num_heads=12),
    large=dict(embed_dim=1024, depth=24, num_heads=16),
    huge=dict(embed_dim=1280, depth=32, num_heads=16),
)

# timm builds these without a head by default: their default weights (in21k originals, DINO) have none.
_HEADLESS = {'vit_huge_patch14_224': 0, 'vit_large_patch32_224': 0, 'vit_small_patch8_224': 0}

# The (size, patch, resolution) triples timm registers for the original ViT.
for _size, _patch, _res in [
        ('tiny', 16, 224), ('tiny', 16, 384),
        ('small', 32, 224), ('small', 32, 384), ('small', 16, 224), ('small', 16, 384), ('small', 8, 224),
        ('base', 32, 224), ('base', 32, 384), ('base', 16, 224), ('base', 16, 384), ('base', 8, 224),
        ('large', 32, 224), ('large', 32, 384), ('large', 16, 224), ('large', 16, 384), ('large', 14, 224),
        ('huge', 14, 224)]:
    _name = f'vit_{_size}_patch{_patch}_{_res}'
    _vit(_name, img_size=_res, patch_size=_patch, num_classes=_HEADLESS.get(_name, 1000), **_SIZES[_size])

for _size, _res in [('tiny', 224), ('small', 224), ('base', 224), ('base', 384)]:
    _vit(f'deit_{_size}_patch16_{_res}', img_size=_res, patch_size=16, **_SIZES[_size])
    _vit(f'deit_{_size}_distilled_patch16_{_res}', img_size=_res, patch_size=16, distilled=True, **_SIZES[_size])

# 1-D ViT for signals: (B, L, C) input, patches of `patch_size` samples (a strided Conv1d), normed as the
# seeds' 1-D ViT does (it passes its norm_layer to the patch embedding).
for _size in ('tiny', 'small', 'base'):
    _vit(f'vit1d_{_size}_patch16_1024', spatial_dims=1, img_size=1024, patch_size=16, in_chans=1, embed_norm=True,
         **_SIZES[_size])

# timm's names for Google's other ViT checkpoint families, each with timm's own configuration
# (`vision_transformer_hybrid.py`, `vision_transformer.py`), `num_classes` included: timm builds a model with
# its default pretrained tag's head, so the SigLIP towers and `vit_base_r50_s16_224` (in21k, no head) are headless.
# ---- R+ViT hybrids (vit_jax R50+ViT-B_16, AugReg R_Ti_16, R26_S_32, R50_L_32): ResNet stem, then patches.
_HYBRIDS = [  # (name, size, ResNet units per stage, patch on the stem's output, num_classes)
    ('vit_tiny_r_s16_p8_224', 'tiny', (), 8, 1000),
    ('vit_tiny_r_s16_p8_384', 'tiny', (), 8, 1000),
    ('vit_small_r26_s32_224', 'small', (2, 2, 2, 2), 1, 1000),
    ('vit_small_r26_s32_384', 'small', (2, 2, 2, 2), 1, 1000),
    ('vit_base_r26_s32_224', 'base', (2, 2, 2, 2), 1, 1000),
    ('vit_base_r50_s16_224', 'base', (3, 4, 9), 1, 0),
    ('vit_base_r50_s16_384', 'base', (3, 4, 9), 1, 1000),
    ('vit_large_r50_s32_224', 'large', (3, 4, 6, 3), 1, 1000),
    ('vit_large_r50_s32_384', 'large', (3, 4, 6, 3), 1, 1000),
]
for _name, _size, _layers, _patch, _classes in _HYBRIDS:
    _vit(_name, img_size=int(_name[-3:]), patch_size=_patch, resnet=_layers, num_classes=_classes, **_SIZES[_size])

# ---- timm's own hybrids (`vision_transformer_hybrid.py`, untrained in timm): a ResNet-D `features_only`
# backbone (resnet26d / resnet50d to stage 4, resnet50d to stage 3 for s16), then a 1x1 patch projection.
for _name, _layers, _cfg in [
        ('vit_small_resnet26d_224', (2, 2, 2, 2), dict(embed_dim=768, depth=8, num_heads=8, mlp_ratio=3)),
        ('vit_small_resnet50d_s16_224', (3, 4, 6), dict(embed_dim=768, depth=8, num_heads=8, mlp_ratio=3)),
        ('vit_base_resnet26d_224', (2, 2, 2, 2), _SIZES['base']),
        ('vit_base_resnet50d_224', (3, 4, 6, 3), _SIZES['base'])]:
    _vit(_name, img_size=224, patch_size=1, resnet_d=_layers, num_classes=1000, **_cfg)
# MobileCLIP's image encoder (MCI, `vit_base_mci_224`): the MCI stem (stride 8), timm's last stem conv as a 2x2
# patch embedding, positions for the patches only; the default (apple_mclip) weights end in a 512-wide projection.
_vit('vit_base_mci_224', img_size=224, patch_size=2, mci_stem=True, no_embed_class=True, num_classes=512,
     **_SIZES['base'])

# ---- SigLIP / SigLIP 2 image towers: no class token, MAP head (or GAP on the `_gap` names), final norm,
# headless. big_vision itself always uses the tanh GELU; timm (and so these names) uses it only where listed.
_SIGLIP_SIZES = dict(
    base=dict(embed_dim=768, depth=12, num_heads=12),
    large=dict(embed_dim=1024, depth=24, num_heads=16),
    so400m=dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362),   # MLP 4304
    giantopt=dict(embed_dim=1536, depth=40, num_heads=16),
)
_SIGLIP = [  # (size, patch, resolutions with the MAP head, extra resolutions with GAP only, gelu)
    ('base', 32, (256,), (), 'tanh'),
    ('base', 16, (224, 256, 384, 512), (), 'exact'),
    ('large', 16, (256, 384), (), 'exact'),
    ('large', 16, (512,), (), 'tanh'),
    ('so400m', 14, (224, 378, 384), (448, 896), 'exact'),
    ('so400m', 16, (256, 384, 512), (), 'tanh'),
    ('giantopt', 16, (256, 384), (), 'tanh'),
]
for _size, _patch, _map_res, _gap_res, _gelu in _SIGLIP:
    for _pool, _tag, _res_list in (('map', '', _map_res), ('gap', '_gap', _map_res + _gap_res)):
        for _res in _res_list:
            _vit(f'vit_{_size}_patch{_patch}_siglip{_tag}_{_res}', img_size=_res, patch_size=_patch,
                 class_token=False, global_pool=_pool, gelu=_gelu, num_classes=0, **_SIGLIP_SIZES[_size])

