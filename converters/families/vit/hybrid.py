"""The ResNet stem of R+ViT hybrids: Google's tree (vit_jax `models_resnet`) <-> timm's `patch_embed.backbone`
(a `ResNetV2`, or for the root block alone a bare `conv`/`norm` pair); GroupNorm maps like LayerNorm. timm's
other hybrid stems (ResNet-D, MobileCLIP's MCI) <-> the ViT's `backbone` sub-module (vit_flax.models.stems):
BatchNorm's weight, bias and running statistics are its params."""
import re
from typing import List, Optional, Tuple

import numpy as np

from vit_flax.models.resnet import ROOT_WIDTH

from ...rules import CONV, Rule, Transform, norm_rules, rule


# ---------------------------------------------------------------- the ResNet stem of hybrids

TORCH_PREFIX = 'patch_embed.backbone'


def _conv_norm(flax_conv: str, flax_gn: str, torch_conv: str, torch_norm: str) -> List[Rule]:
    return [rule(f'{flax_conv}/kernel', f'{torch_conv}.weight', CONV)] + norm_rules(flax_gn, torch_norm)


def resnet_rules(layers) -> List[Rule]:
    root = f'{TORCH_PREFIX}.stem' if layers else TORCH_PREFIX
    rules = _conv_norm('conv_root', 'gn_root', f'{root}.conv', f'{root}.norm')
    for i, units in enumerate(layers):
        for j in range(units):
            f, t = f'block{i + 1}/unit{j + 1}', f'{TORCH_PREFIX}.stages.{i}.blocks.{j}'
            for r in (1, 2, 3):
                rules += _conv_norm(f'{f}/conv{r}', f'{f}/gn{r}', f'{t}.conv{r}', f'{t}.norm{r}')
            if j == 0:
                rules += _conv_norm(f'{f}/conv_proj', f'{f}/gn_proj', f'{t}.downsample.conv', f'{t}.downsample.norm')
    return rules


def _layers(keys, pattern: str, first: int) -> Tuple[int, ...]:
    """Units per stage, from the keys matching `pattern` (groups: stage, unit); stages numbered from `first`."""
    rx = re.compile(pattern)
    units = {}
    for k in keys:
        m = rx.match(k)
        if m:
            units.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if sorted(units) != list(range(first, first + len(units))):
        raise ValueError(f'ResNet stages numbered {sorted(units)}, expected {first}, {first + 1}, ...')
    return tuple(len(units[s]) for s in sorted(units))


def _check_root(kernel_out: int) -> None:
    if kernel_out != ROOT_WIDTH:
        raise ValueError(f'a ResNet root of {kernel_out} channels (width factor {kernel_out / ROOT_WIDTH:g}) is not '
                         f'supported: Google\'s and timm\'s hybrids have {ROOT_WIDTH}')


def resnet_from_flax(flat) -> Tuple[Optional[Tuple[int, ...]], Optional[int]]:
    """(units per stage, input channels) of a Flax tree's stem, or (None, None) without one."""
    if 'conv_root/kernel' not in flat:
        return None, None
    kernel = flat['conv_root/kernel']
    _check_root(kernel.shape[-1])
    return _layers(flat, r'^block(\d+)/unit(\d+)/conv1/kernel$', 1), kernel.shape[-2]


def resnet_from_torch(state) -> Tuple[Optional[Tuple[int, ...]], Optional[int]]:
    """The same, read off a timm state_dict."""
    for key in (f'{TORCH_PREFIX}.stem.conv.weight', f'{TORCH_PREFIX}.conv.weight'):
        if key in state:
            _check_root(state[key].shape[0])
            return _layers(state, rf'^{re.escape(TORCH_PREFIX)}\.stages\.(\d+)\.blocks\.(\d+)\.conv1\.weight$', 0), \
                state[key].shape[1]
    return None, None


def resnet_label(layers) -> str:
    """'R50', 'R26', ... as Google names its hybrids (1 root conv + 3 per unit + the ViT's embedding)."""
    return f'R{2 + 3 * sum(layers)}' if layers else 'R'


def timm_backbone(layers, in_chans: int):
    """timm's own backbone for these layers (what its hybrid model functions build)."""
    from timm.models.vision_transformer_hybrid import _resnetv2
    return _resnetv2(tuple(layers), in_chans=in_chans)


# ---------------------------------------------------------------- timm's ResNet-D and MobileCLIP's MCI stems

BACKBONE = 'backbone'   # the Flax sub-module of vit_flax.models.stems
# timm's BatchNorm2d <-> FrozenBatchNorm: weight, bias and the running statistics are all params. The step
# counter `num_batches_tracked` has no Flax value: read past, written as 0 (timm reads it only when training
# with momentum=None).
_BN_FIELDS = (('scale', 'weight'), ('bias', 'bias'), ('mean', 'running_mean'), ('var', 'running_var'))
_STEPS = Transform('num_batches_tracked', lambda arrays: [np.zeros((), np.int64)], lambda arrays: [])


def _bn(flax: str, torch: str) -> List[Rule]:
    return [rule(f'{flax}/{f}', f'{torch}.{t}') for f, t in _BN_FIELDS] + \
        [rule((), f'{torch}.num_batches_tracked', _STEPS)]


def resnet_d_rules(layers) -> List[Rule]:
    """timm's `resnet26d` / `resnet50d` (`features_only`, under `patch_embed.backbone`) <-> stems.ResNetD."""
    f, t = BACKBONE, TORCH_PREFIX
    rules = []
    for i, (conv, bn) in enumerate((('0', '1'), ('3', '4'), ('6', None))):
        rules.append(rule(f'{f}/stem_conv{i}/kernel', f'{t}.conv1.{conv}.weight', CONV))
        rules += _bn(f'{f}/stem_bn{i}', f'{t}.conv1.{bn}') if bn else _bn(f'{f}/bn1', f'{t}.bn1')
    for i, units in enumerate(layers):
        for j in range(units):
            fb, tb = f'{f}/layer{i + 1}_block{j}', f'{t}.layer{i + 1}.{j}'
            for r in (1, 2, 3):
                rules.append(rule(f'{fb}/conv{r}/kernel', f'{tb}.conv{r}.weight', CONV))
                rules += _bn(f'{fb}/bn{r}', f'{tb}.bn{r}')
            if j == 0:
                rules.append(rule(f'{fb}/down_conv/kernel', f'{tb}.downsample.1.weight', CONV))
                rules += _bn(f'{fb}/down_bn', f'{tb}.downsample.2')
    return rules


def mci_rules() -> List[Rule]:
    """timm's MobileCLIP `ConvStem` (`patch_embed.backbone.{0,1,2}`) <-> stems.MCIStem and the ViT's `embedding`
    (timm's third conv, with bias; timm's `patch_embed.proj` is an Identity)."""
    rules = []
    for i in (0, 1):
        rules.append(rule(f'{BACKBONE}/conv{i}/kernel', f'{TORCH_PREFIX}.{i}.conv.weight', CONV))
        rules += _bn(f'{BACKBONE}/bn{i}', f'{TORCH_PREFIX}.{i}.bn')
    return rules + [rule('embedding/kernel', f'{TORCH_PREFIX}.2.conv.weight', CONV),
                    rule('embedding/bias', f'{TORCH_PREFIX}.2.conv.bias')]


def stem_from_flax(flat) -> dict:
    """{'resnet_d': units per stage} or {'mci_stem': True} for a Flax tree with such a `backbone`, else {}."""
    if f'{BACKBONE}/stem_conv0/kernel' in flat:
        return {'resnet_d': _layers(flat, rf'^{BACKBONE}/layer(\d+)_block(\d+)/conv1/kernel$', 1)}
    return {'mci_stem': True} if f'{BACKBONE}/conv0/kernel' in flat else {}


def stem_from_torch(state) -> dict:
    """The same, read off a timm state_dict."""
    if f'{TORCH_PREFIX}.conv1.0.weight' in state:
        return {'resnet_d': _layers(state, rf'^{re.escape(TORCH_PREFIX)}\.layer(\d+)\.(\d+)\.conv1\.weight$', 1)}
    return {'mci_stem': True} if f'{TORCH_PREFIX}.0.conv.weight' in state else {}


def timm_resnet_d(layers, in_chans: int):
    """timm's own `features_only` ResNet-D for these stages (what its hybrid model functions build)."""
    from timm.models.resnet import ResNet, Bottleneck
    from timm.models._features import FeatureListNet
    full = tuple(layers) + (1,) * (4 - len(layers))
    net = ResNet(block=Bottleneck, layers=full, in_chans=in_chans, stem_width=32, stem_type='deep', avg_down=True)
    return FeatureListNet(net, out_indices=(len(layers),))
