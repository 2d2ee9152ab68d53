"""Initial parameters from `--weights`, and the normalisation that goes with them.

The pixel normalisation follows the weights being fine-tuned:
- Google `.npz`: [-1, 1] (mean = std = 0.5), Google's convention.
- a bare PyTorch file (.pth/.safetensors) or a plain orbax tree records nothing: we use what timm's default
  pretrained weights of the family use: ViT 0.5/0.5 (the AugReg and original Google weights), DeiT and Swin
  ImageNet mean/std, and say so.
- a training workdir: the normalisation recorded in its metadata.
- a transformers folder (or hf-hub repo) with a preprocessor_config.json: its image_mean/image_std.
- no weights: 0.5/0.5, WZMIAOMIAO's choice. `--mean/--std` override all of these.
"""
from typing import Callable, Optional, Tuple

import vit_flax
from converters import pipeline
from converters.preprocess import HALF, family_default, hf_preprocessor_of   # predict uses the same defaults


def load(path: str, model_name: str, overrides: dict, resample: str, log: Callable[[str], None]):
    """(params as host numpy for create_model(model_name, **overrides), info, (mean, std, why)).

    Read by the converters' own load path (`converters.pipeline.load_into`: validated, NaN/Inf refused).
    `info` is {'path', 'format', 'normalization'} for the metadata. Every change made to the weights (head
    replaced, pre_logits dropped, position embedding resampled) is reported through `log`."""
    extra = {}
    if 'representation_size' in vit_flax.model_config(model_name)[0].__dataclass_fields__ \
            and 'representation_size' not in overrides:
        extra['representation_size'] = None  # WZMIAOMIAO's scripts delete pre_logits before fine-tuning
    params, ck = pipeline.load_into(path, model_name, resample=resample, log=log, **overrides, **extra)
    if ck.kind == 'training':
        cfg = ck.pretrained_cfg
        norm = (tuple(cfg['mean']), tuple(cfg['std']), f'recorded in {ck.path}')
        log(f'weights: {ck.path} (training checkpoint of {ck.model_name})')
        return params, dict(path=ck.path, format='training', normalization='checkpoint'), norm
    fmt = ck.format   # the weight file's (a folder's, an hf-hub snapshot's)
    hf = hf_preprocessor_of(ck)
    if hf is not None:
        norm, source = (tuple(hf[0]['mean']), tuple(hf[0]['std']), f'recorded in {hf[1]}'), 'preprocessor_config'
    elif fmt == 'npz':
        norm, source = HALF + ("Google's convention for .npz weights ([-1, 1])",), 'google'
    else:
        norm, source = family_default(model_name), 'family-default'
    target = vit_flax.create_model(model_name, **overrides, **extra)
    for k, what in (('norm_eps', 'LayerNorm eps'), ('activation', 'activation')):
        src, dst = getattr(ck.model, k, None), getattr(target, k, None)
        if src != dst:   # the function the weights were trained in differs from the one fine-tuned
            log(f'warning: {path}: the weights were trained with {what} {src}, {model_name} computes {dst}')
    log(f'weights: {path} ({fmt})')
    return params, dict(path=str(path), format=fmt, normalization=source), norm


def normalization(args, weights_norm: Optional[tuple]) -> Tuple[tuple, tuple, str]:
    mean, std, why = weights_norm or (HALF + ('no --weights: 0.5/0.5, WZMIAOMIAO\'s choice',))
    if args.mean or args.std:
        mean, std, why = tuple(args.mean or mean), tuple(args.std or std), '--mean/--std'
    return mean, std, why
