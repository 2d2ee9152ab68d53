"""Hugging Face transformers checkpoints (a folder of config.json + weights), read and written.

A transformers folder holds `config.json` (`model_type`, sizes, `layer_norm_eps`, `hidden_act`, `id2label`,
...) and `model.safetensors`, `pytorch_model.bin` (read weights-only: no pickle code runs) or a sharded
`model.safetensors.index.json` / `pytorch_model.bin.index.json` (`weight_map`: key -> shard file).

Reading: config.json alone decides the architecture (`arch_from_config`), mapped to the registered timm-named
model sharing its core fields, with overrides for what differs (ViT's `layer_norm_eps` 1e-12 is no timm
default); the key table below (one per model_type and class, run both ways by `converters.rules`, whose
"flax" side holds timm's keys here and whose "torch" side holds transformers') gives timm's state_dict, and the
family's own rule table gives the Flax tree. Writing runs the same tables the other way.

Trees (Hub spelling: what `save_pretrained` writes by default and every Hub checkpoint holds; transformers 5's
own spelling, `save_original_format=False`, differs in the block names only, noted as "5.x"):

- vit / deit (prefix `vit.` / `deit.` in the *ForImageClassification classes, none in ViTModel/DeiTModel):
  `embeddings.{cls_token, distillation_token (deit), position_embeddings, patch_embeddings.projection}`,
  `encoder.layer.i.{layernorm_before, attention.attention.{query,key,value}, attention.output.dense,
  layernorm_after, intermediate.dense, output.dense}` (5.x: `layers.i.{layernorm_before,
  attention.{q,k,v,o}_proj, layernorm_after, mlp.fc1, mlp.fc2}`), `layernorm`, `pooler.dense` (ViTModel,
  DeiTModel: tanh(dense(token 0)) = our `pre_logits` with `representation_size` = hidden_size), `classifier`
  (token 0), DeiT WithTeacher `cls_classifier` + `distillation_classifier` (logits their mean = our
  `distilled=True`). DeiT's distillation token in the one-head classes is a register token of ours
  (`reg_tokens=1`, positions over every token, as timm's `no_embed_class=False`).
- dinov2 / dinov2_with_registers (no prefix in Dinov2Model): `embeddings.{cls_token, mask_token (1, D),
  register_tokens, position_embeddings, patch_embeddings.projection}`, `encoder.layer.i.{norm1,
  attention.attention.{query,key,value} (5.x: attention.{q,k,v,o}_proj), attention.output.dense,
  layer_scale1.lambda1, norm2, mlp.fc1/fc2 | mlp.weights_in/weights_out (SwiGLU; 5.x: mlp.gate_proj, up_proj =
  the halves of weights_in, down_proj), layer_scale2.lambda1}`,
  `layernorm`. `mask_token` serves masked training only: dropped on read (said), written as zeros (its init).
  With registers, transformers adds positions to [cls, patches] before inserting the registers: the class
  row is folded into the token (cls + pos[0]) as timm does, and written back as a zero row.
- siglip_vision_model / siglip (`vision_model.`): `embeddings.{patch_embedding (Conv2d), position_embedding.
  weight (N, D)}`, `encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2}`,
  `post_layernorm`, `head.{probe, attention.in_proj_weight/bias (rows q, k, v), attention.out_proj, layernorm,
  mlp}` = timm's `attn_pool.{latent, q | kv, proj, norm, mlp}`. A full SiglipModel: its vision half.
- clip_vision_model / clip (`vision_model.`): `embeddings.{class_embedding (D), patch_embedding (no bias),
  position_embedding.weight (N+1, D)}`, `pre_layrnorm` (sic), the blocks as SigLIP's, `post_layernorm`,
  `visual_projection` (E, D, no bias; WithProjection and a full CLIPModel) = timm's `head` with a zero bias.
- swin (prefix `swin.` in SwinForImageClassification): `embeddings.{patch_embeddings.projection, norm}`,
  `encoder.layers.i.blocks.j.{layernorm_before, attention.self.{query,key,value, relative_position_bias_table}
  (5.x: attention.{q,k,v,o}_proj, attention.relative_position_bias.relative_position_bias_table),
  attention.output.dense, layernorm_after, intermediate.dense | 5.x mlp.fc1, output.dense | 5.x mlp.fc2}`,
  `encoder.layers.i.downsample.{reduction, norm}` at the end of stage i (timm: the start of stage i+1),
  `layernorm`, `classifier`; `relative_position_index` buffers (older files) ignored.
- swinv2 (`swinv2.`): `swinv2_table` (keys only: no vit-flax Swin V2 model yet).

Numerics: transformers' "gelu" is exact, "gelu_pytorch_tanh"/"gelu_new" the tanh form, "quick_gelu"
x*sigmoid(1.702x); ViT/DeiT's layer_norm_eps defaults to 1e-12, DINOv2/SigLIP 1e-6, CLIP/Swin 1e-5: every one
is built into the model as the config says.
"""
import functools
import json
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .errors import ConversionError
from .formats.timm_folder import load_json
from .rules import Rule, Transform, rule

CONFIG = 'config.json'
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin')
INDEX_FILES = ('model.safetensors.index.json', 'pytorch_model.bin.index.json')
VIT_TYPES = ('vit', 'deit', 'dinov2', 'dinov2_with_registers', 'siglip_vision_model', 'siglip',
             'clip_vision_model', 'clip')
MODEL_TYPES = VIT_TYPES + ('swin',)
# buffers some files hold, derived from the config
IGNORE = ('relative_position_index', 'position_ids', 'embeddings.mask_token')
SPELLINGS = ('hub', 'internal')

Log = Callable[[str], None]


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


# ---------------------------------------------------------------- transforms (timm side first)

def _split(n: int, name: str) -> Transform:
    """One timm array (fused along axis 0) <-> `n` equal transformers arrays (q, k, v)."""
    return Transform(name, lambda a: list(np.split(a[0], n, axis=0)), lambda a: [np.concatenate(a, axis=0)])


QKV = _split(3, 'qkv')
GATE_UP = _split(2, 'gate_up')   # timm's SwiGLUPacked fc1 (silu'd half first) <-> transformers 5's gate_proj, up_proj
# timm's attn_pool q (D rows) and kv (2D rows) <-> nn.MultiheadAttention's in_proj (rows q, k, v)
Q_KV = Transform('q_kv', lambda a: [np.concatenate(a, axis=0)],
                 lambda a: [a[0][:a[0].shape[0] // 3], a[0][a[0].shape[0] // 3:]])
ROWS = Transform('rows', lambda a: [a[0][0]], lambda a: [a[0][None]])            # (1, N, D) <-> (N, D)
VECTOR = Transform('vector', lambda a: [a[0].reshape(-1)], lambda a: [a[0].reshape(1, 1, -1)])  # (1,1,D) <-> (D,)


def _fold_to_hf(a):
    cls, pe = a
    return [cls, np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)]


# Dinov2WithRegisters: (cls_token, pos_embed over patches) <-> (cls_token, position_embeddings over [cls, patches])
# (in float32, one rounding to the file's dtype: a bfloat16 file's folded token is rounded once, as timm's is)
FOLD = Transform('fold_class_position', _fold_to_hf,
                 lambda a: [(a[0].astype(np.float32) + a[1][:, :1].astype(np.float32)).astype(a[1].dtype),
                            a[1][:, 1:]])


def _projection_to_hf(a):
    w, b = a
    if np.any(b != 0):
        raise ValueError('visual_projection has no bias, this head has a nonzero one')
    return [w]


# CLIP's visual_projection (E, D) <-> timm's head (weight (E, D), a zero bias)
PROJECTION = Transform('projection', _projection_to_hf, lambda a: [a[0], np.zeros(a[0].shape[0], a[0].dtype)])


def _linear(timm: str, hf: str, bias: bool = True) -> List[Rule]:
    return [rule(f'{timm}.weight', f'{hf}.weight')] + ([rule(f'{timm}.bias', f'{hf}.bias')] if bias else [])


def _qkv(timm: str, hf: List[str], bias: bool) -> List[Rule]:
    rules = [rule(f'{timm}.weight', tuple(f'{k}.weight' for k in hf), QKV)]
    return rules + ([rule(f'{timm}.bias', tuple(f'{k}.bias' for k in hf), QKV)] if bias else [])


# ---------------------------------------------------------------- the key tables

# ViT-like blocks: timm name -> transformers name under the block, per (model kind, spelling)
_VIT_BLOCK = {
    'hub': dict(layer='encoder.layer.{i}.', norm1='layernorm_before', norm2='layernorm_after',
                qkv=('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
                proj='attention.output.dense', fc1='intermediate.dense', fc2='output.dense'),
    'internal': dict(layer='layers.{i}.', norm1='layernorm_before', norm2='layernorm_after',
                     qkv=('attention.q_proj', 'attention.k_proj', 'attention.v_proj'), proj='attention.o_proj',
                     fc1='mlp.fc1', fc2='mlp.fc2'),
}
_DINO_BLOCK = {
    'hub': dict(layer='encoder.layer.{i}.', norm1='norm1', norm2='norm2',
                qkv=('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
                proj='attention.output.dense', fc1='mlp.fc1', fc2='mlp.fc2'),
    'internal': dict(layer='encoder.layer.{i}.', norm1='norm1', norm2='norm2',
                     qkv=('attention.q_proj', 'attention.k_proj', 'attention.v_proj'), proj='attention.o_proj',
                     fc1='mlp.fc1', fc2='mlp.fc2'),
}
_CLIP_BLOCK = dict(layer='encoder.layers.{i}.', norm1='layer_norm1', norm2='layer_norm2',
                   qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), proj='self_attn.out_proj',
                   fc1='mlp.fc1', fc2='mlp.fc2')
_SWIN_BLOCK = {
    'hub': dict(norm1='layernorm_before', norm2='layernorm_after',
                qkv=('attention.self.query', 'attention.self.key', 'attention.self.value'),
                table='attention.self.relative_position_bias_table', proj='attention.output.dense',
                fc1='intermediate.dense', fc2='output.dense'),
    'internal': dict(norm1='layernorm_before', norm2='layernorm_after',
                     qkv=('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
                     table='attention.relative_position_bias.relative_position_bias_table', proj='attention.o_proj',
                     fc1='mlp.fc1', fc2='mlp.fc2'),
}

# the class each (model_type, head) is written as, and the prefix of its backbone's keys
PREFIX = {'ViTModel': '', 'ViTForImageClassification': 'vit.', 'DeiTModel': '', 'DeiTForImageClassification': 'deit.',
          'DeiTForImageClassificationWithTeacher': 'deit.', 'Dinov2Model': '', 'Dinov2WithRegistersModel': '',
          'SiglipVisionModel': 'vision_model.', 'SiglipModel': 'vision_model.', 'CLIPVisionModel': 'vision_model.',
          'CLIPVisionModelWithProjection': 'vision_model.', 'CLIPModel': 'vision_model.', 'SwinModel': '',
          'SwinForImageClassification': 'swin.', 'Swinv2Model': '', 'Swinv2ForImageClassification': 'swinv2.'}


def vit_table(model, cls: str, spelling: str, prefix: Optional[str] = None) -> List[Rule]:
    """timm ViT keys <-> transformers keys of class `cls` for a `VisionTransformer` instance `model`; `prefix`:
    the backbone's (transformers 5 saves CLIPVisionModel and SiglipVisionModel without `vision_model.`)."""
    p = PREFIX[cls] if prefix is None else prefix
    kind = _kind(cls)
    clip_like = kind in ('clip', 'siglip')
    block = _CLIP_BLOCK if clip_like else (_DINO_BLOCK if kind == 'dinov2' else _VIT_BLOCK)[spelling]
    e = f'{p}embeddings.'
    rules = []
    if clip_like:
        rules += [rule('patch_embed.proj.weight', f'{e}patch_embedding.weight')]
        if not model.pre_norm:
            rules += [rule('patch_embed.proj.bias', f'{e}patch_embedding.bias')]
        rules += [rule('pos_embed', f'{e}position_embedding.weight', ROWS)]
        if model.has_class_token:
            rules += [rule('cls_token', f'{e}class_embedding', VECTOR)]
        if model.pre_norm:
            rules += _linear('norm_pre', f'{p}pre_layrnorm')
    else:
        rules += _linear('patch_embed.proj', f'{e}patch_embeddings.projection')
        if model.reg_tokens and kind == 'dinov2':
            rules += [rule(('cls_token', 'pos_embed'), (f'{e}cls_token', f'{e}position_embeddings'), FOLD),
                      rule('reg_token', f'{e}register_tokens')]
        else:
            rules += [rule('cls_token', f'{e}cls_token'), rule('pos_embed', f'{e}position_embeddings')]
        if model.distilled:
            rules += [rule('dist_token', f'{e}distillation_token')]
        elif model.reg_tokens and kind == 'deit':
            rules += [rule('reg_token', f'{e}distillation_token')]
    swiglu = model.mlp_layer == 'swiglu_packed'
    for i in range(model.depth):
        t, h = f'blocks.{i}.', p + block['layer'].format(i=i)
        rules += _linear(f'{t}norm1', h + block['norm1'])
        rules += _qkv(f'{t}attn.qkv', [h + k for k in block['qkv']], model.qkv_bias)
        rules += _linear(f'{t}attn.proj', h + block['proj'])
        rules += _linear(f'{t}norm2', h + block['norm2'])
        if swiglu and spelling == 'internal':   # 5.x: weights_in as gate_proj + up_proj, weights_out as down_proj
            rules += [rule(f'{t}mlp.fc1.{w}', (f'{h}mlp.gate_proj.{w}', f'{h}mlp.up_proj.{w}'), GATE_UP)
                      for w in ('weight', 'bias')] + _linear(f'{t}mlp.fc2', f'{h}mlp.down_proj')
        else:
            rules += _linear(f'{t}mlp.fc1', h + ('mlp.weights_in' if swiglu else block['fc1']))
            rules += _linear(f'{t}mlp.fc2', h + ('mlp.weights_out' if swiglu else block['fc2']))
        if model.init_values:
            rules += [rule(f'{t}ls1.gamma', f'{h}layer_scale1.lambda1'), rule(f'{t}ls2.gamma', f'{h}layer_scale2.lambda1')]
    rules += _linear('norm', p + ('post_layernorm' if clip_like else 'layernorm'))
    if model.global_pool == 'map':
        hd = f'{p}head.'
        rules += [rule('attn_pool.latent', f'{hd}probe'),
                  rule(('attn_pool.q.weight', 'attn_pool.kv.weight'), f'{hd}attention.in_proj_weight', Q_KV),
                  rule(('attn_pool.q.bias', 'attn_pool.kv.bias'), f'{hd}attention.in_proj_bias', Q_KV)]
        rules += _linear('attn_pool.proj', f'{hd}attention.out_proj') + _linear('attn_pool.norm', f'{hd}layernorm')
        rules += _linear('attn_pool.mlp.fc1', f'{hd}mlp.fc1') + _linear('attn_pool.mlp.fc2', f'{hd}mlp.fc2')
    if model.representation_size:
        rules += _linear('pre_logits.fc', f'{p}pooler.dense')
    if model.num_classes > 0:
        if kind == 'clip':
            rules += [rule(('head.weight', 'head.bias'), 'visual_projection.weight', PROJECTION)]
        elif model.distilled:
            rules += _linear('head', 'cls_classifier') + _linear('head_dist', 'distillation_classifier')
        else:
            rules += _linear('head', 'classifier')
    return rules


def swin_table(model, cls: str, spelling: str, prefix: Optional[str] = None) -> List[Rule]:
    """timm Swin keys <-> transformers keys of class `cls` for a `SwinTransformer` instance `model`."""
    p, b = PREFIX[cls] if prefix is None else prefix, _SWIN_BLOCK[spelling]
    rules = _linear('patch_embed.proj', f'{p}embeddings.patch_embeddings.projection')
    rules += _linear('patch_embed.norm', f'{p}embeddings.norm')
    for i, depth in enumerate(model.depths):
        s = f'{p}encoder.layers.{i}.'
        for j in range(depth):
            t, h = f'layers.{i}.blocks.{j}.', f'{s}blocks.{j}.'
            rules += _linear(f'{t}norm1', h + b['norm1'])
            rules += _qkv(f'{t}attn.qkv', [h + k for k in b['qkv']], model.qkv_bias)
            rules += [rule(f'{t}attn.relative_position_bias_table', h + b['table'])]
            rules += _linear(f'{t}attn.proj', h + b['proj'])
            rules += _linear(f'{t}norm2', h + b['norm2'])
            rules += _linear(f'{t}mlp.fc1', h + b['fc1']) + _linear(f'{t}mlp.fc2', h + b['fc2'])
        if i + 1 < len(model.depths):   # merging: the end of stage i here, the start of stage i+1 in timm
            rules += _linear(f'layers.{i + 1}.downsample.reduction', f'{s}downsample.reduction', bias=False)
            rules += _linear(f'layers.{i + 1}.downsample.norm', f'{s}downsample.norm')
    rules += _linear('norm', f'{p}layernorm')
    if model.num_classes > 0:
        rules += _linear('head.fc', 'classifier')
    return rules


def swinv2_table(model, cls: str, spelling: str = 'hub', prefix: Optional[str] = None) -> List[Rule]:
    """timm Swin V2 keys (`swin_transformer_v2.py`) <-> transformers' Swinv2Model / Swinv2ForImageClassification
    (`swinv2.`), for a model with `depths` and `num_classes` (both spellings are the same keys in 5.x).

    Per block: `attention.self.{query (weight, bias), key (weight only), value (weight, bias)}` = timm's
    `attn.qkv.weight` (rows q, k, v) with `attn.q_bias`, `attn.v_bias` (timm's k bias is a zero buffer);
    `attention.self.logit_scale` (H, 1, 1), `continuous_position_bias_mlp.{0 (w, b), 2 (w)}` = `attn.cpb_mlp`;
    `layernorm_before/after` are V2's post-norms, timm's `norm1/norm2`; merging as V1's (transformers: the end of
    stage i, reduction then norm; timm: the start of stage i+1). No vit-flax Swin V2 model reads it yet (the
    Swin V2 family is being built): this table is checked against timm and transformers directly."""
    del spelling
    p = PREFIX[cls] if prefix is None else prefix
    rules = _linear('patch_embed.proj', f'{p}embeddings.patch_embeddings.projection')
    rules += _linear('patch_embed.norm', f'{p}embeddings.norm')
    for i, depth in enumerate(model.depths):
        s = f'{p}encoder.layers.{i}.'
        for j in range(depth):
            t, h = f'layers.{i}.blocks.{j}.', f'{s}blocks.{j}.attention.'
            b = f'{s}blocks.{j}.'
            rules += [rule(f'{t}attn.qkv.weight', tuple(f'{h}self.{n}.weight' for n in ('query', 'key', 'value')), QKV),
                      rule(f'{t}attn.q_bias', f'{h}self.query.bias'), rule(f'{t}attn.v_bias', f'{h}self.value.bias'),
                      rule(f'{t}attn.logit_scale', f'{h}self.logit_scale'),
                      rule(f'{t}attn.cpb_mlp.2.weight', f'{h}self.continuous_position_bias_mlp.2.weight')]
            rules += _linear(f'{t}attn.cpb_mlp.0', f'{h}self.continuous_position_bias_mlp.0')
            rules += _linear(f'{t}attn.proj', f'{h}output.dense')
            rules += _linear(f'{t}norm1', f'{b}layernorm_before') + _linear(f'{t}norm2', f'{b}layernorm_after')
            rules += _linear(f'{t}mlp.fc1', f'{b}intermediate.dense') + _linear(f'{t}mlp.fc2', f'{b}output.dense')
        if i + 1 < len(model.depths):
            rules += _linear(f'layers.{i + 1}.downsample.reduction', f'{s}downsample.reduction', bias=False)
            rules += _linear(f'layers.{i + 1}.downsample.norm', f'{s}downsample.norm')
    rules += _linear('norm', f'{p}layernorm')
    if model.num_classes > 0:
        rules += _linear('head.fc', 'classifier')
    return rules


def table(model, cls: str, spelling: str, prefix: Optional[str] = None) -> List[Rule]:
    """The key table of `cls` for `model` in `spelling` ('hub' or 'internal')."""
    fn = {'swin': swin_table, 'swinv2': swinv2_table}.get(_kind(cls), vit_table)
    return fn(model, cls, spelling, prefix)


def prefix_of(cls: str, state) -> str:
    """The backbone prefix `state` uses: the class's, or none where transformers 5 saved a CLIPVisionModel or
    SiglipVisionModel (its `vision_model.` removed; the Hub's files and what we write keep it)."""
    p = PREFIX[cls]
    if cls in ('CLIPVisionModel', 'SiglipVisionModel') and not any(k.startswith(p) for k in state):
        return ''
    return p


def _kind(cls: str) -> str:
    for k, names in (('vit', ('ViT',)), ('deit', ('DeiT',)), ('dinov2', ('Dinov2',)), ('siglip', ('Siglip',)),
                     ('clip', ('CLIP',)), ('swinv2', ('Swinv2',)), ('swin', ('Swin',))):
        if cls.startswith(names):
            return k
    raise ConversionError(f'no transformers class {cls!r}')


# ---------------------------------------------------------------- config.json <-> model fields

_ACT = {'gelu': 'exact', 'gelu_pytorch_tanh': 'tanh', 'gelu_new': 'tanh', 'quick_gelu': 'quick_gelu',
        'silu': 'silu', 'swish': 'silu'}
_ACT_OUT = {'exact': 'gelu', 'tanh': 'gelu_pytorch_tanh', 'quick_gelu': 'quick_gelu', 'silu': 'silu'}


def _get(cfg: dict, key: str, default, where: str, kind=(int,)):
    v = cfg.get(key, default)
    if kind == (int,) and (type(v) is not int or v < 1) or kind == (float,) and (
            isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1e6):
        raise ConversionError(f'{where}: {key}={v!r} is not a valid value')
    return v


def _size(cfg, key, default, where):
    """`image_size` / `patch_size`: an int, or [h, w] (transformers takes either)."""
    v = cfg.get(key, default)
    if isinstance(v, list) and len(v) == 2 and all(type(x) is int and x >= 1 for x in v):
        return v[0] if v[0] == v[1] else tuple(v)
    return _get(cfg, key, default, where)


def _int_list(cfg, key, default, where):
    v = cfg.get(key, default)
    if not isinstance(v, list) or not v or any(type(x) is not int or x < 1 for x in v):
        raise ConversionError(f'{where}: {key}={v!r} is not a list of positive integers')
    return tuple(v)


def _act(cfg, where):
    act = cfg.get('hidden_act', 'gelu')
    if not isinstance(act, str) or act not in _ACT:
        raise ConversionError(f'{where}: hidden_act={act!r} is not one vit-flax builds ({", ".join(_ACT)})')
    return _ACT[act]


def vision_config(cfg: dict, where: str) -> Tuple[str, dict]:
    """(model_type, the vision tower's config): a full CLIPModel / SiglipModel keeps it in `vision_config`."""
    mt = cfg.get('model_type')
    if mt not in MODEL_TYPES:
        raise ConversionError(f'{where}: model_type {mt!r} is not a vision model vit-flax reads '
                              f'({", ".join(MODEL_TYPES)})')
    if mt in ('clip', 'siglip'):
        vc = cfg.get('vision_config')
        if not isinstance(vc, dict):
            raise ConversionError(f'{where}: model_type {mt} without a vision_config object')
        return mt, vc
    return mt, cfg


def arch_from_config(mt: str, cfg: dict, cls: str, where: str, num_classes: int) -> dict:
    """vit-flax fields of the model config.json describes, for class `cls` (its head of `num_classes`)."""
    g = lambda k, d, kind=(int,): _get(cfg, k, d, where, kind)   # noqa: E731
    if mt == 'swin':
        depths = _int_list(cfg, 'depths', [2, 2, 6, 2], where)
        heads = _int_list(cfg, 'num_heads', [3, 6, 12, 24], where)
        if cfg.get('use_absolute_embeddings'):
            raise ConversionError(f'{where}: use_absolute_embeddings=true: vit-flax\'s Swin has no absolute positions')
        act = _act(cfg, where)
        if act not in ('exact', 'tanh'):
            raise ConversionError(f'{where}: hidden_act={cfg.get("hidden_act")!r}: vit-flax\'s Swin has GELU only')
        return dict(embed_dim=g('embed_dim', 96), depths=depths, num_heads=heads, window_size=g('window_size', 7),
                    mlp_ratio=float(g('mlp_ratio', 4.0, (float,))), qkv_bias=bool(cfg.get('qkv_bias', True)),
                    patch_size=_size(cfg, 'patch_size', 4, where), img_size=_size(cfg, 'image_size', 224, where),
                    in_chans=g('num_channels', 3),
                    norm_eps=float(g('layer_norm_eps', 1e-5, (float,))), gelu=act, num_classes=num_classes,
                    always_partition=False)
    dim = g('hidden_size', 768)
    defaults = {'vit': 1e-12, 'deit': 1e-12, 'dinov2': 1e-6, 'dinov2_with_registers': 1e-6,
                'siglip_vision_model': 1e-6, 'siglip': 1e-6, 'clip_vision_model': 1e-5, 'clip': 1e-5}
    out = dict(embed_dim=dim, depth=g('num_hidden_layers', 12), num_heads=g('num_attention_heads', 12),
               img_size=_size(cfg, 'image_size', 224, where), patch_size=_size(cfg, 'patch_size', 16, where),
               in_chans=g('num_channels', 3),
               norm_eps=float(g('layer_norm_eps', defaults[mt], (float,))), num_classes=num_classes,
               class_token=True, global_pool='token', distilled=False, reg_tokens=0, no_embed_class=False,
               pre_norm=False, init_values=None, representation_size=None, qkv_bias=True, mlp_layer='mlp')
    act = _act(cfg, where)
    out.update(gelu=act, act_layer=None) if act in ('exact', 'tanh') else out.update(act_layer=act, gelu='exact')
    kind = _kind(cls)
    if kind in ('vit', 'deit'):
        out.update(mlp_dim=g('intermediate_size', 3072), qkv_bias=bool(cfg.get('qkv_bias', True)))
        if cls in ('ViTModel', 'DeiTModel'):
            if cfg.get('pooler_act', 'tanh') != 'tanh':
                raise ConversionError(f'{where}: pooler_act={cfg["pooler_act"]!r}: vit-flax\'s pre_logits is tanh')
            out['representation_size'] = g('pooler_output_size', dim)
        if cls == 'DeiTForImageClassificationWithTeacher':
            out['distilled'] = True
        elif kind == 'deit':
            out['reg_tokens'] = 1
    elif kind == 'dinov2':
        ratio = float(g('mlp_ratio', 4, (float,)))
        hidden = int(dim * ratio)
        if cfg.get('use_swiglu_ffn'):
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
            out.update(mlp_dim=2 * hidden, mlp_layer='swiglu_packed', act_layer='silu', gelu='exact')
        else:
            out['mlp_dim'] = hidden
        out.update(qkv_bias=bool(cfg.get('qkv_bias', True)), init_values=float(g('layerscale_value', 1.0, (float,))))
        if mt == 'dinov2_with_registers':
            r = cfg.get('num_register_tokens', 4)
            if type(r) is not int or r < 0:
                raise ConversionError(f'{where}: num_register_tokens={r!r} is not a valid value')
            out.update(reg_tokens=r, no_embed_class=r > 0)
    elif kind == 'siglip':
        out.update(mlp_dim=g('intermediate_size', 3072), class_token=False,
                   global_pool='map' if cfg.get('vision_use_head', True) else 'gap')
    else:   # clip
        out.update(mlp_dim=g('intermediate_size', 3072), pre_norm=True)
    return out


def _fields_equal(model, k, v) -> bool:
    from vit_flax.models.layers import to_tuple
    if k == 'mlp_dim':
        return model.mlp_hidden == v
    if k in ('patch_size', 'img_size', 'window_size'):
        return tuple(to_tuple(getattr(model, k), 2)) == tuple(to_tuple(v, 2))
    if k == 'class_token':
        return model.has_class_token == v
    if k in ('act_layer', 'gelu') and hasattr(model, 'activation'):
        return True   # compared as one: `activation`
    if k == 'global_pool':
        return model.pool_type == {'gap': 'avg'}.get(v, v) and model.use_fc_norm == (v == 'avg')
    if k == 'init_values':
        return bool(model.init_values) == bool(v)   # its value only seeds training; the weights hold LayerScale
    if k in ('depths', 'num_heads') and isinstance(v, tuple):
        return tuple(getattr(model, k)) == v
    return getattr(model, k) == v


def _activation(want: dict):
    return want.get('act_layer') or want.get('gelu')


def _diff(model, want: dict) -> dict:
    """The overrides that make `model` the one `want` describes."""
    kw = {k: v for k, v in want.items() if k not in ('gelu', 'act_layer') and not _fields_equal(model, k, v)}
    if 'global_pool' in kw:
        kw['fc_norm'] = None
    if 'init_values' in kw and not want['init_values']:
        kw['init_values'] = None
    if hasattr(model, 'activation') and model.activation != _activation(want):
        if model.act_layer != want['act_layer']:
            kw['act_layer'] = want['act_layer']
        if model.gelu != want['gelu']:
            kw['gelu'] = want['gelu']
    elif not hasattr(model, 'activation') and 'gelu' in want and model.gelu != want['gelu']:
        kw['gelu'] = want['gelu']
    if 'mlp_dim' in kw and hasattr(model, 'mlp_ratio') and not hasattr(model, 'mlp_hidden'):
        kw.pop('mlp_dim')
    return kw


_CORE = {'vit': ('embed_dim', 'depth', 'num_heads', 'patch_size', 'mlp_dim'),
         'swin': ('embed_dim', 'depths', 'num_heads', 'patch_size', 'window_size', 'mlp_ratio')}
_NAME_HINT = {'vit': 'vit_', 'deit': 'deit_', 'dinov2': 'dinov2', 'siglip': 'siglip', 'clip': 'clip', 'swin': 'swin_'}
_DEFAULT = {'vit': 'vit_base_patch16_224', 'deit': 'deit_base_patch16_224', 'dinov2': 'vit_base_patch14_dinov2',
            'siglip': 'vit_base_patch16_siglip_224', 'clip': 'vit_base_patch16_clip_224',
            'swin': 'swin_tiny_patch4_window7_224'}


@functools.lru_cache(maxsize=None)
def _registered(cls, count: int = 0) -> Tuple[tuple, ...]:
    """(name, model) of every registered name building `cls` (modules are frozen: built once per registry
    size `count`, so a name registered later is seen)."""
    import vit_flax
    from vit_flax.registry import list_models, model_config
    return tuple((n, vit_flax.create_model(n)) for n in list_models() if model_config(n)[0] is cls)


def match_name(want: dict, kind: str, model_name: Optional[str], where: str, arch: Optional[dict] = None):
    """(registered name, model): the registered model sharing `want`'s core fields with the fewest other
    fields differing (ties: the name of the same kind first, then alphabetical), the rest as overrides; with
    none sharing the core, the closest name of the kind re-shaped by every field."""
    import vit_flax
    from vit_flax.registry import list_models, model_config, split_tag
    from vit_flax.models.swin import SwinTransformer
    from vit_flax.models.vit import VisionTransformer
    cls = SwinTransformer if kind == 'swin' else VisionTransformer
    core = _CORE['swin' if kind == 'swin' else 'vit']
    if model_name:
        name = split_tag(model_name)[0]
        if model_config(name)[0] is not cls:
            raise ConversionError(f'{where}: holds a {kind} checkpoint, but {name} is a {model_config(name)[0].__name__}')
        base = vit_flax.create_model(name, **(arch or {}))
        for k in core:   # a name pins the architecture: config.json must describe the same one
            if not _fields_equal(base, k, want[k]):
                mine = base.mlp_hidden if k == 'mlp_dim' else getattr(base, k)
                raise ConversionError(f'{where}: the config gives {k}={want[k]}, but {name} has {k}={mine}')
        return name, base.clone(**_diff(base, want))
    best = None
    for name, m in _registered(cls, len(list_models())):
        if not all(_fields_equal(m, k, want[k]) for k in core):
            continue
        key = (len(_diff(m, want)), _NAME_HINT[kind] not in name, name)
        if best is None or key < best[0]:
            best = (key, name, m)
    if best is None:   # an architecture no name has: the closest name of its kind, re-shaped by every field
        named = [(n, m) for n, m in _registered(cls, len(list_models())) if _NAME_HINT[kind] in n]
        name, base = min(named, key=lambda nm: (len(_diff(nm[1], want)), nm[0]))
        return name, base.clone(**_diff(base, want))
    _, name, m = best
    return name, m.clone(**_diff(m, want))


# ---------------------------------------------------------------- reading

def read_weights(folder: str) -> Tuple[Dict[str, np.ndarray], str, str]:
    """(arrays, format, the file read) of a transformers folder: one weight file or a sharded index."""
    from . import formats
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return formats.read_file(path), formats.file_format(path), path
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
                arrays = formats.read_file(sp)
                for k, v in wm.items():
                    if v == shard:
                        if k not in arrays:
                            raise ConversionError(f'{sp}: no key {k!r}, which {os.path.basename(path)} places there')
                        state[k] = arrays[k]
            return state, formats.file_format(os.path.join(folder, sorted(set(wm.values()))[0])), path
    raise ConversionError(f'{folder}: no weights in the transformers folder (looked for '
                          f'{", ".join(WEIGHT_FILES + INDEX_FILES)})')


def _class_of(mt: str, state, cfg_path: str) -> str:
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
        if any(k.startswith('dinov2.') or k.startswith('dinov2_with_registers.') for k in state) or has('classifier.weight'):
            raise ConversionError(f'{cfg_path}: Dinov2ForImageClassification\'s classifier reads [class token, mean of '
                                  f'the patches]: no vit-flax model holds it; save its Dinov2Model (.dinov2)')
        return 'Dinov2Model' if mt == 'dinov2' else 'Dinov2WithRegistersModel'
    if mt in ('siglip', 'siglip_vision_model'):
        return 'SiglipModel' if any(k.startswith('text_model.') for k in state) else 'SiglipVisionModel'
    if mt in ('clip', 'clip_vision_model'):
        if any(k.startswith('text_model.') for k in state):
            return 'CLIPModel'
        return 'CLIPVisionModelWithProjection' if has('visual_projection.weight') else 'CLIPVisionModel'
    return 'SwinForImageClassification' if any(k.startswith('swin.') for k in state) else 'SwinModel'


def _head_size(cls: str, state, cfg: dict, vcfg: dict, cfg_path: str) -> int:
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


def _labels(cfg: dict, n: int) -> Optional[List[str]]:
    labels = cfg.get('id2label')
    if not n or not isinstance(labels, dict):
        return None
    try:
        pairs = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        return None
    return [pairs.get(i, f'LABEL_{i}') for i in range(n)]


# what a config field is called in config.json, for the vit-flax fields read off the weights
_HF_FIELD = {'embed_dim': 'hidden_size', 'depth': 'num_hidden_layers', 'mlp_dim': 'intermediate_size',
             'patch_size': 'patch_size', 'in_chans': 'num_channels', 'num_patches': 'image_size',
             'depths': 'depths', 'num_heads': 'num_heads', 'window_size': 'window_size', 'mlp_ratio': 'mlp_ratio',
             'reg_tokens': 'num_register_tokens', 'qkv_bias': 'qkv_bias', 'num_classes': 'id2label',
             'stage_windows': 'window_size'}


def _check_shapes(family, timm_state, model, mt, cfg_path):
    """config.json against the weights' shapes (what the family reads off the timm state_dict)."""
    import math
    from vit_flax.models.layers import to_tuple
    got = family.config_from_torch(timm_state)
    if mt == 'swin':   # (a ViT's heads are not in its shapes: a wrong num_attention_heads cannot be seen)
        expect = dict(embed_dim=model.embed_dim, depths=tuple(model.depths), num_heads=tuple(model.num_heads),
                      in_chans=model.in_chans, qkv_bias=model.qkv_bias, patch_size=to_tuple(model.patch_size, 2),
                      mlp_ratio=model.mlp_ratio, stage_windows=tuple(w[0] for w, _ in model.stage_windows()))
    else:
        expect = dict(embed_dim=model.embed_dim, depth=model.depth, mlp_dim=model.mlp_hidden,
                      patch_size=to_tuple(model.patch_size, 2), in_chans=model.in_chans,
                      num_patches=int(math.prod(model.grid_size)), reg_tokens=model.reg_tokens,
                      qkv_bias=model.qkv_bias)
    for k, v in expect.items():
        if k in got and got[k] is not None and got[k] != v:
            field = _HF_FIELD[k]
            if 'mlp' in k and mt.startswith('dinov2'):
                field = 'mlp_ratio'
            if k == 'stage_windows':
                field = 'window_size'
            raise ConversionError(f'{cfg_path}: {field} gives {k}={v}, but the weights have {k}={got[k]}')


def read_folder(folder: str, model_name: Optional[str] = None, arch: Optional[dict] = None) -> dict:
    """A transformers folder decoded: {raw (the file's arrays), format, weights (the file read), family, name
    (registered), model, flat (the Flax tree), notes (what config.json decided, for stderr), class_names, cls
    (the transformers class its keys are), spelling ('hub' | 'internal')}. `model_name` pins the registered
    base, `arch` overrides fields (as `pipeline.match_model`)."""
    import vit_flax
    from . import rules
    from .families import family_of
    folder = os.path.abspath(folder)
    cfg_path = os.path.join(folder, CONFIG)
    cfg = load_json(cfg_path)
    if not isinstance(cfg, dict):
        raise ConversionError(f'{cfg_path}: a JSON {type(cfg).__name__}, not an object')
    mt, vcfg = vision_config(cfg, cfg_path)
    raw, fmt, weights = read_weights(folder)
    cls = _class_of(mt, raw, cfg_path)
    n = _head_size(cls, raw, cfg, vcfg, cfg_path)
    kind = _kind(cls)
    want = arch_from_config(mt, vcfg, cls, cfg_path, n)
    want.update(arch or {})
    hf_depth = _hf_blocks(raw, prefix_of(cls, raw))
    if kind != 'swin' and hf_depth != want['depth']:
        raise ConversionError(f'{cfg_path}: num_hidden_layers={want["depth"]}, but the weights hold {hf_depth} blocks')
    if kind == 'swin' and hf_depth != len(want['depths']):
        raise ConversionError(f'{cfg_path}: depths={list(want["depths"])} has {len(want["depths"])} stages, but the '
                              f'weights hold {hf_depth}')
    name, model = match_name(want, kind, model_name, cfg_path, arch)
    family = family_of(model)
    notes = []
    over = _diff(vit_flax.create_model(name, **((arch or {}) if model_name else {})), want)
    notes.append(f'{cfg_path}: model_type {mt} ({cls}) is {name}' +
                 (f' with {", ".join(f"{k}={v!r}" for k, v in over.items())}' if over else ''))
    prefix = prefix_of(cls, raw)
    dropped = [k for k in raw if not k.startswith(prefix) and not _is_head_key(k, cls)]
    state = {k: v for k, v in raw.items() if k not in dropped}
    if dropped:
        notes.append(f'{cfg_path}: {len(dropped)} arrays outside the vision tower ignored '
                     f'({", ".join(sorted({k.split(".")[0] for k in dropped})[:4])})')
    if any(k.endswith('embeddings.mask_token') for k in state):
        notes.append('embeddings.mask_token dropped (used only by masked-image training; written back as zeros)')
    timm_state, spelling, err = None, None, None
    for sp in SPELLINGS:
        try:
            timm_state = rules.torch_to_flax(state, table(model, cls, sp, prefix), ignore=IGNORE)
            spelling = sp
            break
        except ConversionError as e:
            err = err or e
    if timm_state is None:
        flipped = model.clone(qkv_bias=not model.qkv_bias)
        for sp in SPELLINGS:   # the keys fit once q/k/v biases are (not) there: config.json's qkv_bias is wrong
            try:
                rules.torch_to_flax(state, table(flipped, cls, sp, prefix), ignore=IGNORE)
            except ConversionError:
                continue
            raise ConversionError(f'{cfg_path}: qkv_bias={str(model.qkv_bias).lower()}, but the weights '
                                  f'{"lack" if model.qkv_bias else "hold"} query/key/value biases')
        raise ConversionError(f'{weights}: {err}')
    try:
        _check_shapes(family, timm_state, model, mt, cfg_path)
        flat = rules.torch_to_flax(timm_state, family.rules(model), ignore=family.ignore_torch)
    except (KeyError, IndexError, ValueError) as e:
        raise ConversionError(f'{weights}: malformed checkpoint ({e})') from None
    except ConversionError as e:
        if str(e).startswith(cfg_path):
            raise
        raise ConversionError(f'{weights}: {e}') from None
    flat = family.unstore(flat, model)
    return dict(raw=raw, format=fmt, weights=weights, family=family, name=name, model=model, flat=flat,
                notes=notes, class_names=_labels(cfg, n) if 'CLIP' not in cls else None, cls=cls, spelling=spelling)


def _is_head_key(k: str, cls: str) -> bool:
    return k.startswith(('classifier.', 'cls_classifier.', 'distillation_classifier.')) or (
        k == 'visual_projection.weight' and 'CLIP' in cls)


def _hf_blocks(state, prefix: str) -> int:
    """Blocks (ViTs) or stages (Swin) the backbone's keys hold."""
    import re
    rx = re.compile(r'^(?:encoder\.layers?|layers)\.(\d+)\.')
    return len({m.group(1) for k in state if k.startswith(prefix) for m in [rx.match(k[len(prefix):])] if m})


# ---------------------------------------------------------------- writing

def target_class(model) -> str:
    """The transformers class that holds `model` (its head, tokens and norms decide); `check_holds` then
    refuses what the class cannot hold."""
    if not hasattr(model, 'depths') and not hasattr(model, 'pre_norm'):   # vit-pytorch's ViT, MLP-Mixer: no class
        raise ConversionError(f'transformers has no class for a {type(model).__name__}; write .pth, .safetensors '
                              f'or .npz instead')
    if hasattr(model, 'depths'):
        return 'SwinForImageClassification' if model.num_classes else 'SwinModel'
    if model.pre_norm:
        return 'CLIPVisionModelWithProjection' if model.num_classes else 'CLIPVisionModel'
    if not model.has_class_token or model.pool_type == 'map':
        return 'SiglipVisionModel'
    if model.init_values and not model.num_classes and not model.distilled:   # with a head: ViT's, refused
        return 'Dinov2WithRegistersModel' if model.reg_tokens else 'Dinov2Model'
    if model.distilled:
        return 'DeiTForImageClassificationWithTeacher'
    base = 'DeiT' if model.reg_tokens == 1 and not model.no_embed_class else 'ViT'
    if model.representation_size and not model.num_classes:
        return f'{base}Model'
    return f'{base}ForImageClassification'   # num_labels 0: an identity classifier (the pooled features)


_MODEL_TYPE = {'vit': 'vit', 'deit': 'deit', 'siglip': 'siglip_vision_model', 'clip': 'clip_vision_model',
               'swin': 'swin'}


def config_for(model, cls: str, class_names=None) -> dict:
    """config.json of class `cls` for `model` (keys both transformers 4.4x and 5.x read)."""
    from vit_flax.models.layers import to_tuple
    kind = _kind(cls)
    if kind == 'swin':
        patch, img = to_tuple(model.patch_size, 2), to_tuple(model.img_size, 2)
        win = to_tuple(model.window_size, 2)
        if patch[0] != patch[1] or img[0] != img[1] or win[0] != win[1]:
            raise ConversionError(f'transformers\' {cls} takes square images, patches and windows; this model has '
                                  f'img_size={model.img_size}, patch_size={model.patch_size}, window={model.window_size}')
        cfg = dict(model_type='swin', embed_dim=model.embed_dim, depths=list(model.depths),
                   num_heads=list(model.num_heads), window_size=win[0], mlp_ratio=float(model.mlp_ratio),
                   qkv_bias=model.qkv_bias, patch_size=patch[0], image_size=img[0], num_channels=model.in_chans,
                   layer_norm_eps=model.norm_eps, hidden_act=_ACT_OUT[model.gelu], use_absolute_embeddings=False,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.1,
                   num_layers=len(model.depths), hidden_size=int(model.embed_dim * 2 ** (len(model.depths) - 1)))
    else:
        patch, img = to_tuple(model.patch_size, 2), to_tuple(model.img_size, 2)
        if patch[0] != patch[1] or img[0] != img[1]:
            raise ConversionError(f'transformers\' {cls} takes square images and patches; this model has '
                                  f'img_size={model.img_size}, patch_size={model.patch_size}')
        act = model.activation
        if act not in _ACT_OUT:
            raise ConversionError(f'transformers\' {cls} cannot hold activation {act!r}')
        mt = 'dinov2_with_registers' if cls == 'Dinov2WithRegistersModel' else 'dinov2' if kind == 'dinov2' \
            else _MODEL_TYPE[kind]
        cfg = dict(model_type=mt, hidden_size=model.embed_dim, num_hidden_layers=model.depth,
                   num_attention_heads=model.num_heads, image_size=img[0], patch_size=patch[0],
                   num_channels=model.in_chans, layer_norm_eps=model.norm_eps, hidden_act=_ACT_OUT[act],
                   attention_dropout=0.0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        if kind == 'dinov2':
            swiglu = model.mlp_layer == 'swiglu_packed'
            ratio = model.mlp_hidden / model.embed_dim if not swiglu else _swiglu_ratio(model)
            ratio = int(ratio) if float(ratio).is_integer() else ratio   # transformers 5 types it int
            cfg.update(mlp_ratio=ratio, use_swiglu_ffn=swiglu, qkv_bias=model.qkv_bias,
                       layerscale_value=float(model.init_values), use_mask_token=True)
            if swiglu:
                cfg['hidden_act'] = 'gelu'   # unused by the SwiGLU FFN (SiLU inside)
            if mt == 'dinov2_with_registers':
                cfg['num_register_tokens'] = model.reg_tokens
        else:
            cfg['intermediate_size'] = model.mlp_hidden
            if kind in ('vit', 'deit'):
                cfg.update(qkv_bias=model.qkv_bias, pooler_act='tanh', pooler_output_size=model.embed_dim)
                if model.representation_size:
                    cfg['pooler_output_size'] = model.representation_size
            if kind == 'siglip':
                cfg['vision_use_head'] = model.pool_type == 'map'
            if kind == 'clip':
                cfg['projection_dim'] = model.num_classes or 512
    cfg['architectures'] = [cls]
    n = model.num_classes if kind != 'clip' else 0
    names = list(class_names or [])[:n]
    names += [f'LABEL_{i}' for i in range(len(names), n)]
    cfg['id2label'] = {str(i): s for i, s in enumerate(names)}
    cfg['label2id'] = {s: i for i, s in enumerate(names)}
    cfg['num_labels'] = n
    cfg['torch_dtype'] = cfg['dtype'] = 'float32'
    return cfg


def _swiglu_ratio(model) -> float:
    """An mlp_ratio that transformers' Dinov2SwiGLUFFN turns into this model's hidden width (half of fc1's)."""
    hidden = model.mlp_hidden // 2
    exact = hidden * 3 / 2 / model.embed_dim
    for r in (model.mlp_ratio, round(exact), exact):   # an integer where one fits: transformers 5 types it int
        h = int(model.embed_dim * r)
        if (int(h * 2 / 3) + 7) // 8 * 8 == hidden:
            return r
    raise ConversionError(f'transformers\' Dinov2 SwiGLU cannot hold a hidden width of {hidden}')


# the model's fields that a transformers class must reproduce, with what to call each in a refusal
_HELD = {'VisionTransformer': [
    ('embed_dim', 'the width'), ('depth', 'the depth'), ('num_heads', 'the heads'), ('mlp_hidden', 'the MLP width'),
    ('patch_size_tuple', 'the patch'), ('in_chans', 'the input channels'), ('qkv_bias', 'qkv_bias'),
    ('qk_scale', 'a custom attention scale'), ('representation_size', 'a pre_logits layer'),
    ('pool_type', 'this pooling'), ('has_class_token', 'the class token'), ('distilled', 'a distillation head'),
    ('embed_norm', 'a patch-embedding norm'), ('activation', 'this activation'), ('norm_eps', 'this norm eps'),
    ('spatial_dims', '1-D patches'), ('resnet', 'a ResNet stem'), ('posemb', 'fixed sincos2d positions'),
    ('norm_layer', 'RmsNorm'), ('init_values', 'LayerScale'), ('reg_tokens', 'register tokens'),
    ('no_embed_class', 'positions for the patches only'), ('pre_norm', 'a pre-norm'), ('final_norm', 'no final norm'),
    ('use_fc_norm', 'a norm after pooling (fc_norm)'), ('proj_bias', 'no projection biases'),
    ('qk_norm', 'q/k norms'), ('scale_attn_norm', 'an attention scale norm'), ('scale_mlp_norm', 'an MLP norm'),
    ('mlp_layer', 'this MLP'), ('block_fn', 'this block'), ('num_classes', 'a classifier head'),
    ('dynamic_img_size', 'dynamic image sizes')],
    'SwinTransformer': [('embed_dim', 'the width'), ('depths', 'the depths'), ('num_heads', 'the heads'),
                        ('window_size', 'the window'), ('mlp_ratio', 'the MLP ratio'), ('qkv_bias', 'qkv_bias'),
                        ('qk_scale', 'a custom attention scale'), ('in_chans', 'the input channels'),
                        ('norm_eps', 'this norm eps'), ('gelu', 'this GELU'), ('num_classes', 'a classifier head'),
                        ('always_partition', 'always_partition')]}


def _value(model, k):
    v = getattr(model, k)
    if k == 'init_values':
        return bool(v)
    if k == 'window_size' and not isinstance(v, (tuple, list)):
        return (v, v)
    return tuple(v) if isinstance(v, list) else v


def check_holds(model, cls: str, cfg: dict) -> None:
    """Refuse (one line naming it) what `cls` built from `cfg` would not compute as `model` does: the config
    read back as on `read_folder` must give the same model."""
    mt, vcfg = vision_config(cfg, 'config.json')
    n = model.num_classes if 'CLIP' not in cls else (model.num_classes if cls.endswith('Projection') else 0)
    want = arch_from_config(mt, vcfg, cls, 'config.json', n)
    import vit_flax
    base = vit_flax.create_model(_DEFAULT[_kind(cls)])   # what the config leaves unsaid: the kind's plain model
    back = base.clone(**_diff(base, want))
    if 'CLIP' in cls and not cls.endswith('Projection') and model.num_classes:
        raise ConversionError(f'transformers\' {cls} cannot hold a head ({model.num_classes} outputs)')
    for k, label in _HELD[type(model).__name__]:
        if _value(back, k) != _value(model, k):
            raise ConversionError(f'transformers\' {cls} cannot hold {label} ({k}={_value(model, k)!r}; it would '
                                  f'be {_value(back, k)!r})')


def hf_state(timm_state: Dict[str, np.ndarray], model, cls: str) -> Dict[str, np.ndarray]:
    """timm's state_dict -> transformers' (Hub spelling) for class `cls`, with what transformers holds beside."""
    from . import rules
    if 'CLIP' in cls and model.num_classes and np.any(np.asarray(timm_state['head.bias']) != 0):
        raise ConversionError(f'transformers\' {cls} cannot hold a head bias (visual_projection has none); '
                              f'this head\'s bias is nonzero')
    state = rules.flax_to_torch(timm_state, table(model, cls, 'hub'))
    if _kind(cls) == 'dinov2':
        state['embeddings.mask_token'] = np.zeros((1, model.embed_dim), state['embeddings.cls_token'].dtype)
    return state


def write_folder(timm_state, model, path: str, class_names=None, force: bool = False, log: Log = print) -> str:
    """config.json + model.safetensors (Hub spelling) that transformers' class for `model` loads with
    `from_pretrained(path)` and no missing, unexpected or mismatched keys. Returns the class written."""
    from .formats.durable import atomic_output
    from .formats.safetensors import write_safetensors
    cls = target_class(model)
    cfg = config_for(model, cls, class_names)
    check_holds(model, cls, cfg)
    state = hf_state(timm_state, model, cls)
    dtypes = {str(np.asarray(v).dtype) for v in state.values()}
    cfg['torch_dtype'] = cfg['dtype'] = next(iter(dtypes)) if len(dtypes) == 1 else 'float32'   # --dtype bfloat16
    with atomic_output(path, force) as tmp:
        os.mkdir(tmp)
        write_safetensors(state, os.path.join(tmp, WEIGHT_FILES[0]))
        with open(os.path.join(tmp, CONFIG), 'w') as f:
            json.dump(cfg, f, indent=2)
    log(f'transformers: {cls} (model_type {cfg["model_type"]}), {len(state)} arrays in the Hub\'s key spelling')
    return cls


__all__ = ['is_transformers_folder', 'read_folder', 'write_folder', 'table', 'target_class',
           'config_for', 'arch_from_config']
