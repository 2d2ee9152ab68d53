"""The ResNet stem of R+ViT hybrids: Google's tree (vit_jax `models_resnet`) <-> timm's `patch_embed.backbone`
(a `ResNetV2`, or for the root block alone a bare `conv`/`norm` pair); GroupNorm maps like LayerNorm."""
import re
from typing import List, Optional, Tuple

from vit_flax.models.resnet import ROOT_WIDTH

from ...rules import CONV, Rule, norm_rules, rule


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
