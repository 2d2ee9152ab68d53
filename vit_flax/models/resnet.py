"""The ResNet stem of Google's R+ViT hybrids (vit_jax `models_resnet`), with Google's parameter names.

Tree (it shares the ViT's top level, as in vit_jax): `conv_root`, `gn_root`, then per stage i and unit j
`block{i}/unit{j}/{conv1,gn1,conv2,gn2,conv3,gn3}`, plus `conv_proj`/`gn_proj` on a stage's first unit.
Convolutions are weight-standardised and bias-free, GroupNorm has 32 groups, every convolution and the
root max-pool pad 'SAME' (TensorFlow's padding: the extra row/column goes at the end). The bottleneck
unit is not pre-activated: conv -> GN -> ReLU twice, conv -> GN, + shortcut, ReLU.

`layers` are the units per stage: (3, 4, 9) R50 (stride 16), (3, 4, 6, 3) R50 (stride 32), (2, 2, 2, 2)
R26, () the root block alone (R+ViT-Ti). Stage i has 64 * 2**i bottleneck channels and 4x as many out.

Two numerics, ~3e-5 apart (relative, on the logits of a perturbed R50+ViT-B/16 at 384):
- 'timm' (default): timm's `StdConv2dSame(eps=1e-8)`, (w - mean) / sqrt(var + 1e-8); GroupNorm eps 1e-5.
- 'google': vit_jax's `StdConv`, (w - mean) / (std + 1e-5); flax's GroupNorm eps 1e-6.
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
from ..errors import ModelConfigError

Dtype = Any
GROUP_NORM_EPS = {'timm': 1e-5, 'google': 1e-6}   # per numerics
ROOT_WIDTH = 64


def standardize(kernel, numerics: str):
    """Zero mean, unit variance per output channel, over the (kh, kw, in) axes of an HWIO kernel."""
    axes = tuple(range(kernel.ndim - 1))
    centred = kernel - kernel.mean(axis=axes)
    if numerics == 'google':
        return centred / (jnp.std(kernel, axis=axes) + 1e-5)
    return centred / jnp.sqrt(jnp.mean(jnp.square(centred), axis=axes) + 1e-8)


class StdConv(nn.Conv):
    """Bias-free 'SAME' convolution whose kernel is standardised before use (the param stays raw)."""
    numerics: str = 'timm'

    def param(self, name, init_fn, *args, **kw):
        p = super().param(name, init_fn, *args, **kw)
        return standardize(p, self.numerics) if name == 'kernel' else p


def _conv(features, kernel, strides, numerics, dtype, name):
    return StdConv(features=features, kernel_size=kernel, strides=strides, padding='SAME', use_bias=False,
                   numerics=numerics, dtype=dtype, name=name)


def _group_norm(numerics, dtype, name, **kw):
    # two-pass variance (as torch's GroupNorm), not flax's default E[x^2] - E[x]^2
    return nn.GroupNorm(num_groups=32, epsilon=GROUP_NORM_EPS[numerics], dtype=dtype, use_fast_variance=False,
                        name=name, **kw)


class ResidualUnit(nn.Module):
    """Bottleneck unit: `features` channels inside, 4 * features out; projects the shortcut when needed."""
    features: int
    strides: Tuple[int, int] = (1, 1)
    numerics: str = 'timm'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        conv = lambda f, k, s, name: _conv(f, k, s, self.numerics, self.dtype, name)
        gn = lambda name, **kw: _group_norm(self.numerics, self.dtype, name, **kw)
        out = self.features * 4
        residual = x
        if x.shape[-1] != out or tuple(self.strides) != (1, 1):
            residual = gn('gn_proj')(conv(out, (1, 1), self.strides, 'conv_proj')(x))
        y = nn.relu(gn('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
        y = nn.relu(gn('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
        y = gn('gn3', scale_init=nn.initializers.zeros)(conv(out, (1, 1), (1, 1), 'conv3')(y))
        return nn.relu(residual + y)


class ResNetStage(nn.Module):
    """`units` residual units; the first one strides and projects."""
    units: int
    features: int
    first_stride: Tuple[int, int]
    numerics: str = 'timm'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.units):
            x = ResidualUnit(features=self.features, strides=self.first_stride if j == 0 else (1, 1),
                             numerics=self.numerics, dtype=self.dtype, name=f'unit{j + 1}')(x)
        return x


class ResNetStem(nn.Module):
    """Root block (7x7/2 conv, GN, ReLU, 3x3/2 max-pool) and the bottleneck stages; NHWC in and out."""
    layers: Sequence[int]
    numerics: str = 'timm'
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.numerics not in GROUP_NORM_EPS:
            raise ModelConfigError(f"resnet_numerics must be 'timm' or 'google', got {self.numerics!r}")
        x = _conv(ROOT_WIDTH, (7, 7), (2, 2), self.numerics, self.dtype, 'conv_root')(x)
        x = nn.relu(_group_norm(self.numerics, self.dtype, 'gn_root')(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
        for i, units in enumerate(self.layers):
            x = ResNetStage(units=units, features=ROOT_WIDTH * 2 ** i, first_stride=(1, 1) if i == 0 else (2, 2),
                            numerics=self.numerics, dtype=self.dtype, name=f'block{i + 1}')(x)
        return x


def stem_stride(layers: Sequence[int]) -> int:
    """Input pixels per output pixel: 4 for the root block, x2 for every stage after the first."""
    return 4 * 2 ** max(len(layers) - 1, 0)


def stem_output_size(size: int, layers: Sequence[int]) -> int:
    """Output side for an input side: every stride-2 step pads 'SAME', so it rounds up."""
    for _ in range(stem_stride(layers).bit_length() - 1):
        size = -(-size // 2)
    return size
