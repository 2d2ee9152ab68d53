"""Convolutional patch-embedding backbones of timm's hybrid ViTs that Google has no tree for: timm's ResNet-D
(`resnet26d`, `resnet50d` as `features_only` backbones) and MobileCLIP's MCI stem (timm's `ConvStem` of
`vit_base_mci_224`). NHWC in and out; the ViT holds either as its `backbone` sub-module.

BatchNorm is frozen (detectron2's FrozenBatchNorm2d): `scale`, `bias` and the running `mean`, `var` are all
params, the statistics under stop_gradient, and every call computes timm's eval-mode BatchNorm2d,
x * (scale / sqrt(var + 1e-5)) + (bias - mean * scale / sqrt(var + 1e-5)) (torch's own inference formula). A
model trained here keeps the statistics it was given (timm in train mode would use the batch's).

ResNet-D tree (timm's module names, `.` as `_`): `stem_conv0` (3x3/2, 32), `stem_bn0`, `stem_conv1` (3x3, 32),
`stem_bn1`, `stem_conv2` (3x3, 64), `bn1`, then per stage i and unit j `layer{i+1}_block{j}/{conv1, bn1, conv2,
bn2, conv3, bn3}` (a bottleneck with the stride on the 3x3 conv) and on a stage's first unit
`down_conv`/`down_bn` after a 2x2 average pool (ceil mode, padding not counted: timm's `avg_down`). Convolutions
are bias-free with torch's symmetric padding (k // 2 each side), the root max-pool 3x3/2 pads 1.

MCI tree: `conv0` (4x4/4, embed_dim / 4 channels), `bn0`, GELU, `conv1` (2x2/2), `bn1`, GELU; timm's third
conv (2x2/2 with bias, to embed_dim) is the ViT's own patch embedding (`embedding`, patch 2 on this output).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..ops.activations import gelu_fn
from .layers import PatchConv

Dtype = Any
BN_EPS = 1e-5


class FrozenBatchNorm(nn.Module):
    """BatchNorm2d in eval mode over the last axis; params `scale`, `bias`, `mean`, `var` (module docstring)."""
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param('scale', nn.initializers.ones, (c,))
        bias = self.param('bias', nn.initializers.zeros, (c,))
        mean = jax.lax.stop_gradient(self.param('mean', nn.initializers.zeros, (c,)))
        var = jax.lax.stop_gradient(self.param('var', nn.initializers.ones, (c,)))
        alpha = scale * jax.lax.rsqrt(var + BN_EPS)
        return (x.astype(jnp.float32) * alpha + (bias - mean * alpha)).astype(self.dtype)


def _conv(features, kernel, stride, dtype, name):
    pad = kernel // 2
    return nn.Conv(features=features, kernel_size=(kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name)


def avg_pool_ceil(x):
    """torch's AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False) on NHWC: an odd side's last window
    averages what it covers."""
    h, w = x.shape[1:3]
    pad = ((0, 0), (0, h % 2), (0, w % 2), (0, 0))
    window = lambda t: jax.lax.reduce_window(t, 0., jax.lax.add, (1, 2, 2, 1), (1, 2, 2, 1), pad)
    count = window(jnp.ones((1, h, w, 1), x.dtype))
    return window(x) / count


class BottleneckD(nn.Module):
    """timm's resnet Bottleneck (`planes` inside, 4 * planes out) with `avg_down` on the projected shortcut."""
    planes: int
    stride: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        out = self.planes * 4
        bn = lambda name: FrozenBatchNorm(dtype=self.dtype, name=name)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != out:
            s = avg_pool_ceil(x) if self.stride != 1 else x
            shortcut = bn('down_bn')(_conv(out, 1, 1, self.dtype, 'down_conv')(s))
        y = nn.relu(bn('bn1')(_conv(self.planes, 1, 1, self.dtype, 'conv1')(x)))
        y = nn.relu(bn('bn2')(_conv(self.planes, 3, self.stride, self.dtype, 'conv2')(y)))
        y = bn('bn3')(_conv(out, 1, 1, self.dtype, 'conv3')(y))
        return nn.relu(y + shortcut)


class ResNetD(nn.Module):
    """timm's ResNet-D (deep stem of width 32, avg_down) up to the last of `layers` stages: (2, 2, 2, 2)
    resnet26d, (3, 4, 6, 3) resnet50d, (3, 4, 6) resnet50d to stage 3 (stride 16). Output 256 * 2**(n-1)
    channels at stride 4 * 2**(n-1)."""
    layers: Sequence[int]
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        bn = lambda name: FrozenBatchNorm(dtype=self.dtype, name=name)
        x = nn.relu(bn('stem_bn0')(_conv(32, 3, 2, self.dtype, 'stem_conv0')(x)))
        x = nn.relu(bn('stem_bn1')(_conv(32, 3, 1, self.dtype, 'stem_conv1')(x)))
        x = nn.relu(bn('bn1')(_conv(64, 3, 1, self.dtype, 'stem_conv2')(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, units in enumerate(self.layers):
            for j in range(units):
                x = BottleneckD(planes=64 * 2 ** i, stride=2 if i and not j else 1, dtype=self.dtype,
                                name=f'layer{i + 1}_block{j}')(x)
        return x


class MCIStem(nn.Module):
    """MobileCLIP's MCI stem before its last conv: two patchifying convs (4x4/4, 2x2/2) to `width` channels,
    each with BatchNorm and exact GELU; stride 8."""
    width: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        gelu = gelu_fn('exact')
        for i, patch in enumerate((4, 2)):
            x = PatchConv(features=self.width, patch_size=(patch, patch), dtype=self.dtype, use_bias=False,
                          name=f'conv{i}')(x)
            x = gelu(FrozenBatchNorm(dtype=self.dtype, name=f'bn{i}')(x))
        return x


def resnet_d_stride(layers: Sequence[int]) -> int:
    return 4 * 2 ** (len(layers) - 1)


def resnet_d_output_size(size: int, layers: Sequence[int]) -> int:
    """Every stride-2 step (conv k3 p1, max-pool k3 p1, the ceil-mode average pool) gives ceil(size / 2)."""
    for _ in range(resnet_d_stride(layers).bit_length() - 1):
        size = -(-size // 2)
    return size


def mci_output_size(size: int) -> int:
    return size // 4 // 2
