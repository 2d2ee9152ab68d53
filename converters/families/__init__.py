"""The model families the converters know, one module each (see `base.Family` for what a family supplies).

A new family is one module defining a `Family` subclass, one line in `FAMILIES` below (or
`register_family(...)` from outside), its model file in `vit_flax/models/` and its tests.
"""
from typing import List, Optional

from ..errors import ConversionError
from .base import Family
from . import beit, cait, eva, mixer, naflex, relpos, swin, swinv2, swinv2_cr, vit, vit_pytorch

# mixer, beit and eva before vit: Facebook's ResMLP files hold `patch_embed.proj` and `blocks.*`, which vit would
# claim; beit's and eva's detection is strict (keys no timm ViT has; BEiT's tables with `blocks.`, not Swin's
# `layers.`), the ViT family's takes any timm ViT-like file (a CaiT's too: cait's, strict, goes first), Swin's any
# relative_position_bias_table; relpos (strict: `blocks.0.attn.rel_pos.` / `shared_rel_pos.`) before all of those,
# whose detection would take its files; naflex (strict: `embeds.proj.weight`, a 2-D embedding kernel) before vit;
# Swin V2 CR (`stages.*`) after Swin V2 (which needs `layers.*`)
FAMILIES: List[Family] = [mixer.FAMILY, relpos.FAMILY, cait.FAMILY, beit.FAMILY, eva.FAMILY, naflex.FAMILY, vit.FAMILY,
                          swin.FAMILY, swinv2.FAMILY, swinv2_cr.FAMILY, vit_pytorch.FAMILY]


def register_family(family: Family) -> None:
    FAMILIES.append(family)


def family_of(model) -> Family:
    """The family of a Flax module instance."""
    for fam in FAMILIES:
        if isinstance(model, fam.module_cls):
            return fam
    raise TypeError(f'no converter family for {type(model).__name__}')


def flax_family(flat) -> Optional[Family]:
    """The family of a flat Flax tree, or None."""
    return next((fam for fam in FAMILIES if fam.detect_flax(flat)), None)


def torch_family(state, path: str, prefer: Optional[type] = None) -> Family:
    """The family of a torch state_dict in any layout a family reads; a one-line error otherwise. `prefer` (the
    module class of a model the caller named) wins where its family can read the keys (`Family.can_read`): a file
    whose keys two families share (RoPE leaves no key: PE's timm files are a pre-norm ViT's) is read as named."""
    if prefer is not None:
        fam = next((f for f in FAMILIES if f.module_cls is prefer), None)
        if fam is not None and (fam.can_read(state) or fam.detect_layout(state) != fam.torch_layout):
            return fam
    for fam in FAMILIES:
        if fam.detect_torch(state) or fam.detect_layout(state) != fam.torch_layout:
            return fam
    raise ConversionError(f'{path}: not a ViT/DeiT/Swin/Swin V2/vit-pytorch/Eva/BEiT/MLP-Mixer/ViT-RelPos '
                          f'state_dict (first keys: {", ".join(list(state)[:3])})')


__all__ = ['FAMILIES', 'Family', 'family_of', 'flax_family', 'register_family', 'torch_family']
