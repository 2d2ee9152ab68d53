"""Initial parameters from `--weights`, and the normalisation that goes with them.

The pixel normalisation follows the weights being fine-tuned:
- Google `.npz`: [-1, 1] (mean = std = 0.5), Google's convention.
- a bare PyTorch file (.pth/.safetensors) or a plain orbax tree records nothing: we use what timm's default
  pretrained weights of the family use: ViT 0.5/0.5 (the AugReg and original Google weights), DeiT and Swin
  ImageNet mean/std, and say so.
- a training workdir: the normalisation recorded in its metadata.
- no weights: 0.5/0.5, the seeds' choice. `--mean/--std` override all of these.
"""
from typing import Callable, Optional, Tuple

from flax.traverse_util import unflatten_dict

import vit_flax
from converters import api, io, training_ckpt

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def family_default(model_name: str) -> Tuple[tuple, tuple, str]:
    if model_name.startswith(('deit', 'swin')):
        return IMAGENET + (f"timm's default for {model_name.split('_')[0]} weights (ImageNet mean/std)",)
    return HALF + ("timm's default for ViT weights (0.5/0.5, i.e. [-1, 1])",)


def load(path: str, model_name: str, overrides: dict, resample: str, log: Callable[[str], None]):
    """(params as host numpy for create_model(model_name, **overrides), info, (mean, std, why)).

    `info` is {'path', 'format', 'normalization'} for the metadata. Every change made to the weights (head
    replaced, pre_logits dropped, position embedding resampled) is reported through `log`."""
    if training_ckpt.is_training_checkpoint(path):
        ck = training_ckpt.select(path, 'best', log)
        src = training_ckpt.model_from_meta(ck.meta)
        target = vit_flax.create_model(model_name, **overrides)
        flat = api.adapt(ck.flat, src, target, resample=resample, log=log)
        api.validate(flat, target, path)
        cfg = ck.meta['pretrained_cfg']
        norm = (tuple(cfg['mean']), tuple(cfg['std']), f'recorded in {ck.path}')
        log(f'weights: {ck.path} (training checkpoint, {ck.meta["model"]}, epoch {ck.meta["epoch"]}, '
            f'val_acc {ck.meta["val_acc"]})')
        return unflatten_dict(flat, sep='/'), dict(path=ck.path, format='training', normalization='checkpoint'), norm
    extra = {}
    if 'representation_size' in vit_flax.model_config(model_name)[0].__dataclass_fields__ \
            and 'representation_size' not in overrides:
        extra['representation_size'] = None  # the seeds delete pre_logits before fine-tuning
    params = api.load_params(path, model_name, resample=resample, log=log, **overrides, **extra)
    fmt = io.file_format(path)
    if fmt == 'npz':
        norm, source = HALF + ("Google's convention for .npz weights ([-1, 1])",), 'google'
    else:
        norm, source = family_default(model_name), 'family-default'
    log(f'weights: {path} ({fmt})')
    return params, dict(path=str(path), format=fmt, normalization=source), norm


def normalization(args, weights_norm: Optional[tuple]) -> Tuple[tuple, tuple, str]:
    mean, std, why = weights_norm or (HALF + ('no --weights: 0.5/0.5, the seeds\' choice',))
    if args.mean or args.std:
        mean, std, why = tuple(args.mean or mean), tuple(args.std or std), '--mean/--std'
    return mean, std, why
