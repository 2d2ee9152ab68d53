"""Hugging Face transformers folders as files: config.json and the weights, read and written.

A transformers folder holds `config.json` (`model_type`, sizes, `layer_norm_eps`, `hidden_act`, `id2label`,
...) and `model.safetensors`, `pytorch_model.bin` (read weights-only: no pickle code runs) or a sharded
`model.safetensors.index.json` / `pytorch_model.bin.index.json` (`weight_map`: key -> shard file). This module
knows the files, the model types read and which class a file's keys are; what config.json means for a model
is converters/hf_transformers.py, the key tables the families' `transformers` layouts.
"""
import json
import os
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import ConversionError
from .timm_folder import load_json

CONFIG = 'config.json'
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
INDEX_FILES = ('model.safetensors.index.json', 'pytorch_model.bin.index.json')
VIT_TYPES = ('vit', 'deit', 'dinov2', 'dinov2_with_registers', 'siglip_vision_model', 'siglip',
             'clip_vision_model', 'clip')
MODEL_TYPES = VIT_TYPES + ('swin', 'swinv2', 'dinov3_vit', 'beit', 'siglip2_vision_model', 'siglip2')


def is_transformers_folder(path: str) -> bool:
    """A folder whose config.json names a transformers `model_type` (a timm folder names an `architecture`)."""
    cfg_path = os.path.join(str(path), CONFIG)
    if not (os.path.isdir(str(path)) and os.path.isfile(cfg_path)):
        return False
    try:
        cfg = load_json(cfg_path)
    except ConversionError:
        return False
    return isinstance(cfg, dict) and 'model_type' in cfg and 'architecture' not in cfg


def read_config(folder: str) -> Tuple[str, dict]:
    """(its path, config.json) of a transformers folder: a JSON object."""
    cfg_path = os.path.join(folder, CONFIG)
    cfg = load_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ConversionError(f'{cfg_path}: a JSON {type(cfg).__name__}, not an object')
    return cfg_path, cfg


def vision_config(cfg: dict, where: str) -> Tuple[str, dict]:
    """(model_type, the vision tower's config): a full CLIPModel / SiglipModel keeps it in `vision_config`."""
    mt = cfg.get('model_type')
    if mt not in MODEL_TYPES:
        raise ConversionError(f'{where}: model_type {mt!r} is not a vision model vit-flax reads '
                              f'({", ".join(MODEL_TYPES)})')
    if mt in ('clip', 'siglip', 'siglip2'):
        vc = cfg.get('vision_config')
        if not isinstance(vc, dict):
            raise ConversionError(f'{where}: model_type {mt} without a vision_config object')
        return mt, vc
    return mt, cfg


def config_value(cfg: dict, key: str, default, where: str, kind=(int,)):
    """config.json's `key` (`default` when absent): a positive int, or with kind (float,) a positive number."""
    v = cfg.get(key, default)
    if kind == (int,) and (type(v) is not int or v < 1) or kind == (float,) and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6):
        raise ConversionError(f'{where}: {key}={v!r} is not a valid value')
    return v


def config_size(cfg, key, default, where):
    """`image_size` / `patch_size`: an int, or [h, w] (transformers takes either)."""
    v = cfg.get(key, default)
    if isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 1 for x in v):
        return v[0] if v[0] == v[1] else tuple(v)
    return config_value(cfg, key, default, where)


def config_int_list(cfg, key, default, where):
    """A list of positive ints (Swin's `depths`, `num_heads`), as a tuple."""
    v = cfg.get(key, default)
    if not isinstance(v, list) or not v or any(type(x) is not int or x < 1 for x in v):
        raise ConversionError(f'{where}: {key}={v!r} is not a list of positive integers')
    return tuple(v)


def read_weights(folder: str) -> Tuple[Dict[str, np.ndarray], str, str]:
    """(arrays, format, the file read) of a transformers folder: one weight file or a sharded index."""
    from . import file_format, read_file
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return read_file(path), file_format(path), path
    for name in INDEX_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            index = load_json(path)
            wm = index.get('weight_map') if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
                raise ConversionError(f'{path}: weight_map is not an object of key -> shard file')
            state = {}
            for shard in sorted(set(wm.values())):
                sp = os.path.join(folder, shard)
                if os.path.basename(shard) != shard or not os.path.isfile(sp):
                    raise ConversionError(f'{path}: weight_map names shard {shard!r}, which is not in {folder}')
                arrays = read_file(sp)
                for k, v in wm.items():
                    if v == shard:
                        if k not in arrays:
                            raise ConversionError(f'{sp}: no key {k!r}, which {os.path.basename(path)} places there')
                        state[k] = arrays[k]
            return state, file_format(os.path.join(folder, sorted(set(wm.values()))[0])), path
    raise ConversionError(f'{folder}: no weights in the transformers folder (looked for '
                          f'{", ".join(WEIGHT_FILES + INDEX_FILES)})')


def class_of(mt: str, state, cfg_path: str) -> str:
    """The transformers class whose keys `state` holds (its prefix and head decide)."""
    has = lambda k: k in state   # noqa: E731
    if mt in ('vit', 'deit'):
        p = 'vit.' if mt == 'vit' else 'deit.'
        base = 'ViT' if mt == 'vit' else 'DeiT'
        if has('cls_classifier.weight'):
            return 'DeiTForImageClassificationWithTeacher'
        if any(k.startswith(p) for k in state):
            return f'{base}ForImageClassification'
        return f'{base}Model'
    if mt in ('dinov2', 'dinov2_with_registers'):
        base = 'Dinov2' if mt == 'dinov2' else 'Dinov2WithRegisters'
        if any(k.startswith(mt + '.') for k in state) or has('classifier.weight'):
            return f'{base}ForImageClassification'   # its classifier reads [class token, mean of the patches]
        return f'{base}Model'
    if mt in ('siglip2', 'siglip2_vision_model'):
        return 'Siglip2Model' if any(k.startswith('text_model.') for k in state) else 'Siglip2VisionModel'
    if mt in ('siglip', 'siglip_vision_model'):
        return 'SiglipModel' if any(k.startswith('text_model.') for k in state) else 'SiglipVisionModel'
    if mt in ('clip', 'clip_vision_model'):
        if any(k.startswith('text_model.') for k in state):
            return 'CLIPModel'
        return 'CLIPVisionModelWithProjection' if has('visual_projection.weight') else 'CLIPVisionModel'
    if mt == 'dinov3_vit':
        return 'DINOv3ViTModel'
    if mt == 'beit':
        return 'BeitForImageClassification' if any(k.startswith('beit.') for k in state) else 'BeitModel'
    if mt == 'swinv2':
        return 'Swinv2ForImageClassification' if any(k.startswith('swinv2.') for k in state) else 'Swinv2Model'
    return 'SwinForImageClassification' if any(k.startswith('swin.') for k in state) else 'SwinModel'


def head_size(cls: str, state, cfg: dict, vcfg: dict, cfg_path: str) -> int:
    """Rows of the head class `cls` holds (0: none), checked against config.json's projection_dim / id2label."""
    key = {'CLIPVisionModelWithProjection': 'visual_projection.weight', 'CLIPModel': 'visual_projection.weight',
           'DeiTForImageClassificationWithTeacher': 'cls_classifier.weight'}.get(cls, 'classifier.weight')
    if cls.endswith('Model') and cls != 'CLIPModel' or key not in state:
        return 0
    n = int(state[key].shape[0])
    if 'CLIP' in cls:
        proj = cfg.get('projection_dim', vcfg.get('projection_dim'))
        if proj is not None and proj != n:
            raise ConversionError(f'{cfg_path}: projection_dim={proj}, but {key} has {n} rows')
        return n
    labels = cfg.get('id2label')
    if isinstance(labels, dict) and labels and len(labels) != n:
        raise ConversionError(f'{cfg_path}: id2label has {len(labels)} labels, but {key} has {n} rows')
    return n


def is_head_key(k: str, cls: str) -> bool:
    """A key of class `cls`'s head, outside its backbone's prefix."""
    return k.startswith(('classifier.', 'cls_classifier.', 'distillation_classifier.')) or (
        k == 'visual_projection.weight' and 'CLIP' in cls)


def labels(cfg: dict, n: int) -> Optional[List[str]]:
    """The `n` class names of config.json's id2label (LABEL_i where one is missing), or None."""
    id2label = cfg.get('id2label')
    if not n or not isinstance(id2label, dict):
        return None
    try:
        pairs = {int(k): str(v) for k, v in id2label.items()}
    except (TypeError, ValueError):
        return None
    return [pairs.get(i, f'LABEL_{i}') for i in range(n)]


def blocks_held(state, prefix: str) -> int:
    """Blocks (ViTs) or stages (Swin) the backbone's keys under `prefix` hold."""
    rx = re.compile(r'^(?:encoder\.layers?|layers|(?:model\.)?layer)\.(\d+)\.')   # the last: DINOv3ViTModel
    return len({m.group(1) for k in state if k.startswith(prefix) for m in [rx.match(k[len(prefix):])] if m})


def write(state: Dict[str, np.ndarray], cfg: dict, path: str, force: bool = False) -> None:
    """config.json + model.safetensors, atomically (nothing at `path` unless both are written)."""
    from .durable import atomic_output
    from .safetensors import write_safetensors
    with atomic_output(path, force) as tmp:
        os.mkdir(tmp)
        write_safetensors(state, os.path.join(tmp, WEIGHT_FILES[0]))
        with open(os.path.join(tmp, CONFIG), 'w') as f:
            json.dump(cfg, f, indent=2)
