"""One line naming a checkpoint's family and layout, for `vit-flax inspect`.

Examples: "Google ViT (released)", "R50+ViT hybrid (released)", "big_vision ViT (sincos2d positions)",
"big_vision SigLIP image tower (scanned, bf16)", "timm R26+ViT hybrid", "Swin (microsoft)". A SigLIP tower
is recognised by its file (a two-tower big_vision file's `params/img/`), not by the timm name that fits it.
"""
import ml_dtypes

from . import google
from .resnet_map import resnet_label


def _architecture(model) -> str:
    if model.resnet is not None:
        return f'{resnet_label(model.resnet)}+ViT hybrid'
    return 'DeiT' if model.distilled else 'ViT'


def describe(ck) -> str:
    if ck.family.name != 'vit':
        return f'{ck.family.name.capitalize()} ({ck.layout})'
    model = ck.model
    arch = _architecture(model)
    notes = []
    if ck.format == 'npz':
        prefix = google.detect_prefix(ck.raw, ck.path)
        if prefix == 'params/img/':  # the image tower of a two-tower (LiT / SigLIP) file
            siglip = model.global_pool == 'map' and not model.has_class_token
            source = 'big_vision SigLIP image tower' if siglip else 'big_vision image tower (two-tower file)'
        elif ck.layout == 'big_vision':
            source = f'big_vision {arch}'
        else:
            source = arch if model.resnet is not None else f'Google {arch}'
            notes.append(ck.layout)
        if prefix == 'opt/target/':
            notes.append('opt/target/ prefix')
        if any(k.startswith(f'{prefix}Transformer/encoderblock/') for k in ck.raw):
            notes.append('scanned')
    elif ck.format in ('torch', 'safetensors'):
        source = f'{ck.layout} {arch}'
    else:
        source = f'Flax {arch}'
    if any(v.dtype == ml_dtypes.bfloat16 for v in ck.raw.values()):
        notes.append('bf16')
    if model.posemb == 'sincos2d':
        notes.append('sincos2d positions')
    return source + (f' ({", ".join(notes)})' if notes else '')
