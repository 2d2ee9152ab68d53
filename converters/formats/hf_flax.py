"""transformers' former Flax checkpoints (`flax_model.msgpack`, `FlaxViTModel` / `FlaxViTForImageClassification`)
read into vit-flax's ViT tree.

transformers 5 removed its Flax models, but Hub repos (google/vit-*) still carry the files their `save_pretrained`
wrote: `flax.serialization.to_bytes(params)`, a msgpack of the nested params (arrays as msgpack extensions; no
pickle), read here with `flax.serialization.msgpack_restore`. The trees (`FlaxViTModel` has no `vit/` prefix,
`FlaxViTForImageClassification` is `{vit: ..., classifier}`; a leading `params/` is accepted too):

    embeddings/cls_token (1,1,D)                       -> cls
    embeddings/position_embeddings (1,N+1,D)           -> Transformer/posembed_input/pos_embedding
    embeddings/patch_embeddings/projection/kernel (p,p,C,D), bias  -> embedding/kernel, bias
    encoder/layer/{i}/layernorm_before, layernorm_after  -> Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_1
    encoder/layer/{i}/attention/attention/{query,key,value}/kernel (D, heads*hd), bias (heads*hd)
                                                       -> .../MultiHeadDotProductAttention_0/{query,key,value}
                                                          kernel (D, heads, hd), bias (heads, hd)
    encoder/layer/{i}/attention/output/dense/kernel (heads*hd, D)  -> .../MultiHeadDotProductAttention_0/out
                                                          kernel (heads, hd, D)
    encoder/layer/{i}/intermediate/dense, output/dense -> .../MlpBlock_0/Dense_0, Dense_1
    layernorm                                          -> Transformer/encoder_norm
    pooler/dense (FlaxViTModel: pooler_output = tanh(dense(token 0)))  -> pre_logits (representation_size = D,
                                                          num_classes 0: the model returns pooler_output)
    classifier (on token 0)                            -> head

Dense kernels are (in, out) in both trees: no transposes, only the head split. The architecture beyond the
shapes comes from the `config.json` beside the file (a ViTConfig): `num_attention_heads`, `layer_norm_eps`
(transformers' ViT default 1e-12, not timm's 1e-6, also when there is no config.json), `hidden_act` ('gelu' is
exact; 'gelu_new', 'gelu_pytorch_tanh', 'gelu_fast' the tanh form; 'quick_gelu'; 'silu'), `id2label`; what it
says is checked against the shapes (one line naming the file and field).
"""
import json
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from ..errors import ConversionError, first_line

MSGPACK = 'flax_model.msgpack'
CONFIG = 'config.json'
MAX_BYTES = 64 << 30
# transformers' hidden_act -> VisionTransformer.act_layer (ACT2FN's names for the same functions)
ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu_fast': 'gelu_tanh',
               'quick_gelu': 'quick_gelu', 'silu': 'silu', 'swish': 'silu'}
DEFAULT_EPS = 1e-12   # ViTConfig.layer_norm_eps
# the torch weight files a transformers folder may hold instead (read by the transformers reader, not here)
TORCH_WEIGHTS = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                 'pytorch_model.bin.index.json')

_TOP = {'embeddings/cls_token': 'cls',
        'embeddings/position_embeddings': 'Transformer/posembed_input/pos_embedding',
        'embeddings/patch_embeddings/projection/kernel': 'embedding/kernel',
        'embeddings/patch_embeddings/projection/bias': 'embedding/bias',
        'layernorm/scale': 'Transformer/encoder_norm/scale', 'layernorm/bias': 'Transformer/encoder_norm/bias',
        'pooler/dense/kernel': 'pre_logits/kernel', 'pooler/dense/bias': 'pre_logits/bias',
        'classifier/kernel': 'head/kernel', 'classifier/bias': 'head/bias'}
_BLOCK = {'layernorm_before': 'LayerNorm_0', 'layernorm_after': 'LayerNorm_1',
          'attention/attention/query': 'MultiHeadDotProductAttention_0/query',
          'attention/attention/key': 'MultiHeadDotProductAttention_0/key',
          'attention/attention/value': 'MultiHeadDotProductAttention_0/value',
          'attention/output/dense': 'MultiHeadDotProductAttention_0/out',
          'intermediate/dense': 'MlpBlock_0/Dense_0', 'output/dense': 'MlpBlock_0/Dense_1'}
_LAYER = re.compile(r'^encoder/layer/(\d+)/(.+)/(kernel|bias|scale)$')


@dataclass
class HFFlax:
    flat: Dict[str, np.ndarray]     # our ViT tree (blocks unrolled)
    arch: dict                      # fields the shapes cannot give (norm_eps, act_layer)
    img_size: Optional[object]      # config.json's image_size
    config_path: Optional[str]
    class_names: Optional[List[str]]
    notes: List[str] = field(default_factory=list)
    pretrained_cfg: Optional[dict] = None   # from preprocessor_config.json beside the file (preprocess.py)


def is_msgpack(path: str) -> bool:
    return str(path).lower().endswith('.msgpack')


def folder_msgpack(folder: str) -> Optional[str]:
    """`folder/flax_model.msgpack` when `folder` is a transformers folder (config.json with a model_type) whose
    only weights are Flax ones; None otherwise (its torch weights are the transformers reader's)."""
    path = os.path.join(folder, MSGPACK)
    if not os.path.isfile(path) or any(os.path.isfile(os.path.join(folder, f)) for f in TORCH_WEIGHTS):
        return None
    cfg = _config(os.path.join(folder, CONFIG))
    return path if isinstance(cfg, dict) and 'model_type' in cfg else None


def read_msgpack(path: str) -> Dict[str, np.ndarray]:
    """A Flax msgpack file -> {'/'-joined path: array}, as stored (no pickle: msgpack and flax's ndarray
    extension only)."""
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict
    try:
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            raise ConversionError(f'{path}: {size:,} bytes, too large for a checkpoint')
        with open(path, 'rb') as f:
            tree = msgpack_restore(f.read())
    except FileNotFoundError:
        raise ConversionError(f'{path}: no such file') from None
    except ConversionError:
        raise
    except OSError as e:
        raise ConversionError(f'{path}: cannot read ({first_line(e)})') from None
    except Exception as e:  # noqa: BLE001  (msgpack's and flax's own errors for damaged data)
        raise ConversionError(f'{path}: not a Flax msgpack file ({type(e).__name__}: {first_line(e)})') from None
    if not isinstance(tree, dict):
        raise ConversionError(f'{path}: a msgpack {type(tree).__name__}, not a tree of parameters')
    flat = {}
    for k, v in flatten_dict(tree, sep='/').items():
        if not isinstance(v, np.ndarray) or v.dtype.kind not in 'fc' and v.dtype.name != 'bfloat16':
            raise ConversionError(f'{path}: {k!r} is a {type(v).__name__}'
                                  f'{" of " + str(v.dtype) if isinstance(v, np.ndarray) else ""}, not a float array')
        flat[k] = v
    return flat


def _config(path: str):
    from .timm_folder import load_json
    return load_json(path) if os.path.isfile(path) else None


def _field(cfg: dict, key: str, default, kind, where: str):
    v = cfg.get(key, default)
    if kind is int and (type(v) is not int or v < 1) or kind is float and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1):
        raise ConversionError(f'{where}: {key} {v!r} is not a valid value')
    return v


def read_vit(path: str, raw: Optional[Dict[str, np.ndarray]] = None) -> HFFlax:
    """A FlaxViTModel / FlaxViTForImageClassification msgpack (`raw`: its `read_msgpack`; with the config.json
    beside it, if any) as our ViT tree; every key of the file used, every config.json size checked against the
    shapes."""
    raw = read_msgpack(path) if raw is None else raw
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), CONFIG)
    cfg = _config(cfg_path)
    notes = []
    if cfg is None:
        cfg_path, cfg = None, {}
        notes.append(f'{path}: no config.json beside it: transformers\' ViT defaults (layer_norm_eps 1e-12, '
                     f'exact GELU), heads = hidden size / 64')
    elif not isinstance(cfg, dict):
        raise ConversionError(f'{cfg_path}: a JSON {type(cfg).__name__}, not an object')
    where = cfg_path or path
    model_type = cfg.get('model_type', 'vit')
    if model_type != 'vit':
        raise ConversionError(f'{where}: model_type {model_type!r}: flax_model.msgpack is read for ViT '
                              f'(FlaxViTModel, FlaxViTForImageClassification) only')
    for prefix in ('params/', ''):
        keys = {k[len(prefix):]: v for k, v in raw.items() if k.startswith(prefix)}
        if len(keys) == len(raw):
            break
    body = 'vit/' if any(k.startswith('vit/') for k in keys) else ''
    tree = {(k[len(body):] if k.startswith(body) else k): v for k, v in keys.items()}
    kernel = tree.get('embeddings/patch_embeddings/projection/kernel')
    if kernel is None or kernel.ndim != 4:
        raise ConversionError(f'{path}: not a FlaxViTModel tree (no {body}embeddings/patch_embeddings/projection/'
                              f'kernel (p,p,C,D); first keys: {", ".join(list(raw)[:3])})')
    dim = int(kernel.shape[-1])
    heads = _field(cfg, 'num_attention_heads', max(1, dim // 64), int, where)
    if dim % heads:
        raise ConversionError(f'{where}: hidden_size {dim} (the weights\') is not divisible by '
                              f'num_attention_heads {heads}')
    flat = {}
    for k, v in tree.items():
        m = _LAYER.match(k)
        if k in _TOP:
            flat[_TOP[k]] = v
        elif m and m.group(2) in _BLOCK:
            i, part, leaf = m.groups()
            ours = f'Transformer/encoderblock_{int(i)}/{_BLOCK[part]}/{leaf}'
            if part.startswith('attention/attention/'):   # (D, heads*hd) -> (D, heads, hd); (heads*hd,) -> (heads, hd)
                v = v.reshape(v.shape[:-1] + (heads, -1)) if leaf == 'kernel' else v.reshape(heads, -1)
            elif part == 'attention/output/dense' and leaf == 'kernel':   # (heads*hd, D) -> (heads, hd, D)
                v = v.reshape((heads, -1) + v.shape[1:])
            flat[ours] = v
        else:
            raise ConversionError(f'{path}: unexpected key {body + k!r} for a FlaxViTModel tree')
    depth = len({m.group(1) for m in map(_LAYER.match, tree) if m})
    hidden = tree.get('encoder/layer/0/intermediate/dense/kernel')
    for key, got in (('hidden_size', dim), ('num_hidden_layers', depth), ('patch_size', int(kernel.shape[0])),
                     ('num_channels', int(kernel.shape[2])),
                     ('intermediate_size', None if hidden is None else int(hidden.shape[1]))):
        if key in cfg and got is not None and cfg[key] != got:
            raise ConversionError(f'{where}: {key} {cfg[key]!r}, but the weights of {path} have {key} {got}')
    if 'classifier/bias' in tree and 'id2label' in cfg and isinstance(cfg['id2label'], dict) \
            and len(cfg['id2label']) != tree['classifier/bias'].shape[0]:
        raise ConversionError(f'{where}: id2label has {len(cfg["id2label"])} labels, but the weights\' classifier '
                              f'has {tree["classifier/bias"].shape[0]}')
    act = cfg.get('hidden_act', 'gelu')
    if act not in ACTIVATIONS:
        raise ConversionError(f'{where}: hidden_act {act!r} is not one vit-flax computes '
                              f'({", ".join(ACTIVATIONS)})')
    if cfg.get('pooler_act', 'tanh') != 'tanh' and 'pooler/dense/kernel' in tree:
        raise ConversionError(f'{where}: pooler_act {cfg["pooler_act"]!r}: vit-flax\'s pre_logits is tanh')
    eps = _field(cfg, 'layer_norm_eps', DEFAULT_EPS, float, where)
    names = None
    if 'classifier/bias' in tree and isinstance(cfg.get('id2label'), dict):
        from .timm_folder import label_list
        names = label_list(cfg['id2label'], int(tree['classifier/bias'].shape[0]), where)
    act_layer = ACTIVATIONS[act]   # exact GELU as the registered ViTs spell it: no act_layer, gelu='exact'
    arch = dict(norm_eps=float(eps), act_layer=None if act_layer == 'gelu' else act_layer, gelu='exact')
    notes.append(f'{path}: transformers\' Flax{"ViTForImageClassification" if body else "ViTModel"} tree; '
                 f'layer_norm_eps {eps:g}, hidden_act {act}' + (', pooler read as pre_logits (tanh)'
                                                                if 'pooler/dense/kernel' in tree else ''))
    size = cfg.get('image_size')
    from ..preprocess import read_hf_preprocessor
    pcfg = read_hf_preprocessor(os.path.dirname(os.path.abspath(path)))
    return HFFlax(flat, arch, tuple(size) if isinstance(size, list) else size, cfg_path, names, notes, pcfg)
