"""MLP-Mixer, ResMLP and gMLP in Flax linen: timm's `mlp_mixer` module (`MlpMixer` with its three block types),
numerically matching timm, and Google's vit_jax `models_mixer.MlpMixer` for Mixer.

One model, as in timm: a patchifying stem, `num_blocks` blocks of one of three kinds, a final norm, the mean
over the tokens, a Linear head. Blocks (`block_layer`):
- 'mixer' (MLP-Mixer, Tolstikhin et al. 2021): x + token_mixing(norm(x)^T)^T, then x + channel_mixing(norm(x));
  MLP widths `mlp_ratio` = (tokens, channels) x embed_dim. `mlp_layer='glu'` is timm's GluMlp (gMixer): the
  first Linear's output split in halves, first * act(second) (timm's `gate_last=True`), the second Linear
  reading half the width.
- 'resmlp' (ResMLP, Touvron et al. 2021): Affine norms (x * alpha + beta), one Linear over the tokens, LayerScale
  (`init_values`) on both branches, a channel MLP of `mlp_ratio` x embed_dim.
- 'gmlp' (gMLP, Liu et al. 2021): x + Dense_1(SGU(act(Dense_0(norm(x))))) where the spatial gating unit splits
  the hidden width in halves u, v and returns u * (token_mixing(LayerNorm(v)^T))^T; the SGU's LayerNorm has
  eps 1e-5 (timm's nn.LayerNorm default), every other LayerNorm `norm_eps` (1e-6).
Stochastic depth uses `drop_path_rate` in every block (timm's MlpMixer: no linear rule).

Parameter tree. Mixer's is Google's (vit_jax `models_mixer`), so that its released `.npz` files are this model's
own state: `stem/{kernel, bias}` (timm `stem.proj`; with `stem_norm`, `stem_layer_norm` or `stem_affine`: timm
`stem.norm`), `MixerBlock_{i}/{LayerNorm_0, token_mixing/{Dense_0, Dense_1},
LayerNorm_1, channel_mixing/{Dense_0, Dense_1}}` (timm `blocks.{i}.{norm1, mlp_tokens.fc1/fc2, norm2,
mlp_channels.fc1/fc2}`), `pre_head_layer_norm` (timm `norm`), `head`. ResMLP and gMLP, which have no JAX
original, are named in the same style (class names numbered as Flax numbers them, the mixing MLPs named by
what they mix, timm's LayerScale as ViT's `LayerScale_{0,1}/scale`):
`ResBlock_{i}/{Affine_0/{alpha, beta}, token_mixing/{kernel, bias}, LayerScale_0/scale, Affine_1,
channel_mixing/{Dense_0, Dense_1}, LayerScale_1/scale}` (timm `blocks.{i}.{norm1, linear_tokens, ls1, norm2,
mlp_channels.fc1/fc2, ls2}`), `pre_head_affine/{alpha, beta}` (timm `norm`, alpha/beta (1, 1, D) there, (D,) here);
`SpatialGatingBlock_{i}/{LayerNorm_0, channel_mixing/{Dense_0, SpatialGatingUnit_0/{LayerNorm_0, token_mixing},
Dense_1}}` (timm `blocks.{i}.{norm, mlp_channels.{fc1, gate.norm, gate.proj, fc2}}`). `norm_layer='affine'`
turns the blocks' and the final LayerNorms into Affines (`LayerNorm_k` -> `Affine_k`, `pre_head_affine`; the
gate's LayerNorm stays, as in timm), `'layernorm'` ResMLP's Affines into LayerNorms.

Numerics: timm's GELU is exact (erf), vit_jax's Mixer the tanh form (flax's `nn.gelu` default): `act_layer`
'gelu' (timm, the default) or 'gelu_tanh' (vit_jax). The stem is VALID (timm's PatchEmbed); vit_jax's Mixer stem
pads 'SAME', which differs only for an image size that is not a multiple of the patch (the token MLPs fix the
size either way). The token MLPs are sized for the grid of `img_size`: a Mixer takes no other input size.

Initialisation as timm's `_init_weights`: Linear xavier-uniform (MLP biases N(0, 1e-6), others 0), the stem
lecun-normal, the head zeros, the SGU's token Linear N(0, 1e-6) with bias 1, Affine 1 / 0, LayerScale
`init_values`.

Intermediates (apply with `mutable=['intermediates']`): `embed` (B, N, D) (timm's `stem`), `block_{i}` (timm's
`blocks.{i}`), `encoded` (timm's `norm`).
"""
import math
from typing import Any, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from ..errors import ModelConfigError
from ..ops.activations import gelu_fn
from ..registry import register
from .layers import DropPath, LayerNorm, LayerScale, PatchConv, dense, remat_block, to_tuple

Dtype = Any

_xavier = nn.initializers.xavier_uniform()
_mlp_bias = nn.initializers.normal(stddev=1e-6)
SGU_NORM_EPS = 1e-5   # timm's SpatialGatingUnit builds nn.LayerNorm with torch's default eps


class Affine(nn.Module):
    """ResMLP's 'norm': x * alpha + beta, per channel (timm `Affine`, alpha/beta (1, 1, D) there)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        alpha = self.param('alpha', nn.initializers.ones, (d,))
        beta = self.param('beta', nn.initializers.zeros, (d,))
        return (x * alpha.astype(self.dtype) + beta.astype(self.dtype)).astype(self.dtype)


def make_norm(kind: str, eps: float, dtype, index: int, prefix: str = ''):
    """`LayerNorm_{index}` or `Affine_{index}` (named as Flax numbers them), or `prefix` + its kind's suffix."""
    if kind == 'affine':
        return Affine(dtype=dtype, name=f'{prefix}affine' if prefix else f'Affine_{index}')
    return LayerNorm(epsilon=eps, dtype=dtype, name=f'{prefix}layer_norm' if prefix else f'LayerNorm_{index}')


class MixerMlp(nn.Module):
    """timm's Mlp ('mlp': Dense_0, act, dropout, Dense_1, dropout) or GluMlp ('glu': Dense_0's output split in
    halves a, b -> a * act(b), Dense_1 reading half the width)."""
    hidden: int
    kind: str = 'mlp'
    act: str = 'gelu'
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        out = x.shape[-1]
        h = dense(self.hidden, self.dtype, name='Dense_0', kernel_init=_xavier, bias_init=_mlp_bias)(x)
        if self.kind == 'glu':
            a, b = jnp.split(h, 2, axis=-1)
            h = a * gelu_fn(self.act)(b)
        else:
            h = gelu_fn(self.act)(h)
        h = nn.Dropout(rate=self.drop_rate)(h, deterministic=deterministic)
        h = dense(out, self.dtype, name='Dense_1', kernel_init=_xavier, bias_init=_mlp_bias)(h)
        return nn.Dropout(rate=self.drop_rate)(h, deterministic=deterministic)


def _tokens(fn, x):
    """`fn` applied over the token axis: (B, N, C) -> (B, C, N) -> fn -> back."""
    return jnp.swapaxes(fn(jnp.swapaxes(x, 1, 2)), 1, 2)


class MixerBlock(nn.Module):
    """MLP-Mixer's block (Google's names): token mixing then channel mixing, pre-norm, residual."""
    tokens_dim: int
    channels_dim: int
    mlp_layer: str = 'mlp'
    act: str = 'gelu'
    norm_layer: str = 'layernorm'
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: float = 1e-4   # unused (ResMLP's)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        mlp = lambda hidden, name: MixerMlp(hidden, self.mlp_layer, self.act, self.drop_rate, self.dtype, name=name)
        y = make_norm(self.norm_layer, self.norm_eps, self.dtype, 0)(x)
        y = _tokens(lambda t: mlp(self.tokens_dim, 'token_mixing')(t, deterministic), y)
        x = x + DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)
        y = make_norm(self.norm_layer, self.norm_eps, self.dtype, 1)(x)
        y = mlp(self.channels_dim, 'channel_mixing')(y, deterministic)
        return x + DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)


class ResBlock(nn.Module):
    """ResMLP's block: x + ls1 * token_mixing(affine(x)^T)^T, then x + ls2 * channel_mixing(affine(x))."""
    tokens_dim: int      # unused: ResMLP's token Linear is N -> N
    channels_dim: int
    mlp_layer: str = 'mlp'
    act: str = 'gelu'
    norm_layer: str = 'affine'
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: float = 1e-4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        n = x.shape[1]
        y = make_norm(self.norm_layer, self.norm_eps, self.dtype, 0)(x)
        y = _tokens(dense(n, self.dtype, name='token_mixing', kernel_init=_xavier), y)
        y = LayerScale(self.init_values, name='LayerScale_0')(y).astype(self.dtype)
        x = x + DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)
        y = make_norm(self.norm_layer, self.norm_eps, self.dtype, 1)(x)
        y = MixerMlp(self.channels_dim, self.mlp_layer, self.act, self.drop_rate, self.dtype,
                     name='channel_mixing')(y, deterministic)
        y = LayerScale(self.init_values, name='LayerScale_1')(y).astype(self.dtype)
        return x + DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)


class SpatialGatingUnit(nn.Module):
    """gMLP's gate: (u, v) halves of the width; u * token_mixing(LayerNorm(v)^T)^T (timm's init: the token
    Linear N(0, 1e-6) with bias 1, so that it starts as u * 1). Its norm is always a LayerNorm of eps 1e-5."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n = x.shape[1]
        u, v = jnp.split(x, 2, axis=-1)
        v = LayerNorm(epsilon=SGU_NORM_EPS, dtype=self.dtype, name='LayerNorm_0')(v)
        v = _tokens(dense(n, self.dtype, name='token_mixing', kernel_init=nn.initializers.normal(stddev=1e-6),
                          bias_init=nn.initializers.ones), v)
        return u * v


class GatedMlp(nn.Module):
    """timm's GatedMlp with the spatial gating unit: Dense_0, act, dropout, gate, Dense_1 (half width), dropout."""
    hidden: int
    act: str = 'gelu'
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        out = x.shape[-1]
        h = dense(self.hidden, self.dtype, name='Dense_0', kernel_init=_xavier, bias_init=_mlp_bias)(x)
        h = nn.Dropout(rate=self.drop_rate)(gelu_fn(self.act)(h), deterministic=deterministic)
        h = SpatialGatingUnit(dtype=self.dtype, name='SpatialGatingUnit_0')(h)
        h = dense(out, self.dtype, name='Dense_1', kernel_init=_xavier, bias_init=_mlp_bias)(h)
        return nn.Dropout(rate=self.drop_rate)(h, deterministic=deterministic)


class SpatialGatingBlock(nn.Module):
    """gMLP's block: x + channel_mixing(norm(x)), the channel MLP gated across tokens."""
    tokens_dim: int      # unused: the gate's token Linear is N -> N
    channels_dim: int
    mlp_layer: str = 'gated'
    act: str = 'gelu'
    norm_layer: str = 'layernorm'
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    init_values: float = 1e-4   # unused (ResMLP's)
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        y = make_norm(self.norm_layer, self.norm_eps, self.dtype, 0)(x)
        y = GatedMlp(self.channels_dim, self.act, self.drop_rate, self.dtype, name='channel_mixing')(y, deterministic)
        return x + DropPath()(y, rate=self.drop_path_rate, deterministic=deterministic)


BLOCKS = {'mixer': MixerBlock, 'resmlp': ResBlock, 'gmlp': SpatialGatingBlock}
# the channel MLPs each block takes (timm: Mlp / GluMlp in Mixer and ResMLP blocks, GatedMlp in gMLP's)
MLP_LAYERS = {'mixer': ('mlp', 'glu'), 'resmlp': ('mlp', 'glu'), 'gmlp': ('gated',)}


class MlpMixer(nn.Module):
    """timm's `MlpMixer` (MLP-Mixer, gMixer, ResMLP, gMLP). Input NHWC images; output logits (the pooled
    features with `num_classes=0`, the normed tokens with `global_pool=''` and no head)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    in_chans: int = 3
    patch_size: Union[int, Sequence[int]] = 16
    num_blocks: int = 8
    embed_dim: int = 512
    mlp_ratio: Union[float, Tuple[float, float]] = (0.5, 4.0)   # (tokens, channels) or one for both
    block_layer: Literal['mixer', 'resmlp', 'gmlp'] = 'mixer'
    mlp_layer: Literal['mlp', 'glu', 'gated'] = 'mlp'   # timm's Mlp, GluMlp, GatedMlp (gMLP's)
    act_layer: Literal['gelu', 'gelu_tanh', 'silu'] = 'gelu'   # 'gelu_tanh' computes vit_jax's Mixer
    norm_layer: Literal['layernorm', 'affine'] = 'layernorm'   # ResMLP's 'affine'
    norm_eps: float = 1e-6
    init_values: float = 1e-4     # ResMLP's LayerScale start (timm: 1e-4 for 12 blocks, 1e-5 for 24, 1e-6 deeper)
    drop_rate: float = 0.0        # before the head
    proj_drop_rate: float = 0.0   # inside the MLPs
    drop_path_rate: float = 0.0   # every block alike; only acts with train=True
    global_pool: Literal['avg', ''] = 'avg'
    stem_norm: bool = False       # timm's option: a norm after the stem (`stem_layer_norm` / `stem_affine`)
    remat: bool = False
    dtype: Dtype = jnp.float32
    remat_policy: Optional[str] = None

    # -- derived configuration (plain properties so they work on unbound modules too) --
    @property
    def input_shape(self):
        return to_tuple(self.img_size, 2) + (self.in_chans,)

    @property
    def grid_size(self) -> Tuple[int, int]:
        return tuple(i // p for i, p in zip(to_tuple(self.img_size, 2), to_tuple(self.patch_size, 2)))

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    @property
    def num_features(self) -> int:
        return int(self.embed_dim)

    @property
    def mlp_dims(self) -> Tuple[int, int]:
        """(tokens, channels) hidden widths, as timm's `int(ratio * dim)`."""
        return tuple(int(r * self.embed_dim) for r in to_tuple(self.mlp_ratio, 2))

    @property
    def final_norm_name(self) -> str:
        return 'pre_head_affine' if self.norm_layer == 'affine' else 'pre_head_layer_norm'

    @property
    def stem_norm_name(self) -> str:
        return 'stem_affine' if self.norm_layer == 'affine' else 'stem_layer_norm'

    def check(self):
        if self.mlp_layer not in MLP_LAYERS[self.block_layer]:
            raise ModelConfigError(f"block_layer={self.block_layer!r} takes mlp_layer "
                                   f"{' or '.join(map(repr, MLP_LAYERS[self.block_layer]))}, got {self.mlp_layer!r}")
        if min(self.grid_size) < 1:
            raise ModelConfigError(f'img_size {self.img_size} is smaller than the patch {self.patch_size}')
        halves = {'glu': 'the GLU MLPs', 'gated': "gMLP's gate"}.get(self.mlp_layer)
        dims = self.mlp_dims if self.block_layer == 'mixer' else self.mlp_dims[1:]
        if halves and any(d % 2 for d in dims):
            raise ModelConfigError(f'{halves} split the hidden width in halves: mlp_ratio {self.mlp_ratio} x '
                                   f'embed_dim {self.embed_dim} gives {dims}')

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        self.check()
        if x.ndim != 4 or x.shape[-1] != self.in_chans:
            raise ModelConfigError(f'expected NHWC images with {self.in_chans} channels, got shape {tuple(x.shape)}')
        grid = tuple(s // p for s, p in zip(x.shape[1:3], to_tuple(self.patch_size, 2)))
        if grid != self.grid_size:
            raise ModelConfigError(f'{self.block_layer} token mixing is sized for a {self.grid_size} grid '
                                   f'(img_size {self.img_size}); got images of {tuple(x.shape[1:3])}')
        x = PatchConv(features=self.embed_dim, patch_size=to_tuple(self.patch_size, 2), dtype=self.dtype,
                      name='stem')(x.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, self.embed_dim)
        if self.stem_norm:
            x = make_norm(self.norm_layer, self.norm_eps, self.dtype, 0, prefix='stem_')(x)
        self.sow('intermediates', 'embed', x)
        cls = remat_block(BLOCKS[self.block_layer], self.remat, self.remat_policy)
        tokens_dim, channels_dim = self.mlp_dims
        for i in range(self.num_blocks):
            x = cls(tokens_dim, channels_dim, mlp_layer=self.mlp_layer, act=self.act_layer,
                    norm_layer=self.norm_layer, norm_eps=self.norm_eps, drop_rate=self.proj_drop_rate,
                    drop_path_rate=self.drop_path_rate, init_values=self.init_values, dtype=self.dtype,
                    name=f'{BLOCKS[self.block_layer].__name__}_{i}')(x, not train)
            self.sow('intermediates', f'block_{i}', x)
        x = make_norm(self.norm_layer, self.norm_eps, self.dtype, 0, prefix='pre_head_')(x)
        self.sow('intermediates', 'encoded', x)
        if self.global_pool == 'avg':
            x = x.mean(axis=1)
        x = nn.Dropout(rate=self.drop_rate)(x, deterministic=not train)
        if pre_logits or self.num_classes == 0:
            return x
        return dense(self.num_classes, self.dtype, name='head', kernel_init=nn.initializers.zeros)(x)


# timm's registrations (timm 1.0.31 `mlp_mixer`): 15 names, all 224 px, 1000 classes.
MIXER_SIZES = {'s': (512, 8), 'b': (768, 12), 'l': (1024, 24)}
for _size, (_dim, _blocks) in MIXER_SIZES.items():
    for _patch in (32, 16):
        register(f'mixer_{_size}{_patch}_224', MlpMixer, patch_size=_patch, num_blocks=_blocks, embed_dim=_dim)
for _blocks in (12, 24):
    register(f'gmixer_{_blocks}_224', MlpMixer, patch_size=16, num_blocks=_blocks, embed_dim=384,
             mlp_ratio=(1.0, 4.0), mlp_layer='glu', act_layer='silu')
for _name, _patch, _blocks, _dim, _init in [('resmlp_12', 16, 12, 384, 1e-4), ('resmlp_24', 16, 24, 384, 1e-5),
                                            ('resmlp_36', 16, 36, 384, 1e-6), ('resmlp_big_24', 8, 24, 768, 1e-6)]:
    register(f'{_name}_224', MlpMixer, patch_size=_patch, num_blocks=_blocks, embed_dim=_dim, mlp_ratio=4.0,
             block_layer='resmlp', norm_layer='affine', init_values=_init)
for _size, _dim in (('ti', 128), ('s', 256), ('b', 512)):
    register(f'gmlp_{_size}16_224', MlpMixer, patch_size=16, num_blocks=30, embed_dim=_dim, mlp_ratio=6.0,
             block_layer='gmlp', mlp_layer='gated')
