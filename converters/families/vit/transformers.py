"""The ViT family's `transformers` layout: timm's ViT keys <-> the keys of each Hugging Face transformers class
holding a `VisionTransformer`, one table run both ways by `converters.rules` (its "flax" side holds timm's keys
here, its "torch" side transformers'). config.json and the folder: converters/hf_transformers.py.

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
- dinov2 / dinov2_with_registers (no prefix in Dinov2Model, `dinov2.` / `dinov2_with_registers.` in the
  *ForImageClassification classes, whose `classifier` (2D in) reads [class token, mean of the patch tokens]
  after `layernorm`: our `global_pool='token_avg'`): `embeddings.{cls_token, mask_token (1, D),
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

A new class is one line in CLASSES (its kind and backbone prefix) and its rows in `table`.
"""
from typing import List

import numpy as np

from ...rules import Rule, Transform, qkv_rules, renamed_rules, rule, split_rows

# class -> (kind, the prefix of its backbone's keys)
CLASSES = {'ViTModel': ('vit', ''), 'ViTForImageClassification': ('vit', 'vit.'), 'DeiTModel': ('deit', ''),
           'DeiTForImageClassification': ('deit', 'deit.'), 'DeiTForImageClassificationWithTeacher': ('deit', 'deit.'),
           'Dinov2Model': ('dinov2', ''), 'Dinov2WithRegistersModel': ('dinov2', ''),
           'Dinov2ForImageClassification': ('dinov2', 'dinov2.'),
           'Dinov2WithRegistersForImageClassification': ('dinov2', 'dinov2_with_registers.'),
           'SiglipVisionModel': ('siglip', 'vision_model.'), 'SiglipModel': ('siglip', 'vision_model.'),
           'CLIPVisionModel': ('clip', 'vision_model.'), 'CLIPVisionModelWithProjection': ('clip', 'vision_model.'),
           'CLIPModel': ('clip', 'vision_model.')}

# ---------------------------------------------------------------- transforms (timm side first)

GATE_UP = split_rows(2, 'gate_up')   # timm's SwiGLUPacked fc1 (silu'd half first) <-> transformers 5's gate_proj, up_proj
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

# ---------------------------------------------------------------- the blocks

# timm name -> transformers name under the block, per (model kind, spelling)
_VIT_BLOCK = {
    'hub': dict(layer='encoder.layer.{i}.', norm1='layernorm_before', norm2='layernorm_after',
                qkv=('attention.attention.query', 'attention.attention.key', 'attention.attention.value'),
                proj='attention.output.dense', fc1='intermediate.dense', fc2='output.dense'),
    'internal': dict(layer='layers.{i}.', norm1='layernorm_before', norm2='layernorm_after',
                     qkv=('attention.q_proj', 'attention.k_proj', 'attention.v_proj'), proj='attention.o_proj',
                     fc1='mlp.fc1', fc2='mlp.fc2'),
}
# DINOv2's: ViT's attention, its own norms and MLP names, `encoder.layer.i.` in both spellings
_DINO_BLOCK = {sp: dict(b, layer='encoder.layer.{i}.', norm1='norm1', norm2='norm2', fc1='mlp.fc1', fc2='mlp.fc2')
               for sp, b in _VIT_BLOCK.items()}
_CLIP_BLOCK = dict(layer='encoder.layers.{i}.', norm1='layer_norm1', norm2='layer_norm2',
                   qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), proj='self_attn.out_proj',
                   fc1='mlp.fc1', fc2='mlp.fc2')


def table(model, cls: str, spelling: str, prefix: str) -> List[Rule]:
    """timm ViT keys <-> transformers keys of class `cls` for a `VisionTransformer` instance `model`; `prefix`:
    the backbone's (transformers 5 saves CLIPVisionModel and SiglipVisionModel without `vision_model.`)."""
    p, kind = prefix, CLASSES[cls][0]
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
            rules += renamed_rules('norm_pre', f'{p}pre_layrnorm')
    else:
        rules += renamed_rules('patch_embed.proj', f'{e}patch_embeddings.projection')
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
        rules += renamed_rules(f'{t}norm1', h + block['norm1'])
        rules += qkv_rules(f'{t}attn.qkv', [h + k for k in block['qkv']], model.qkv_bias)
        rules += renamed_rules(f'{t}attn.proj', h + block['proj'])
        rules += renamed_rules(f'{t}norm2', h + block['norm2'])
        if swiglu and spelling == 'internal':   # 5.x: weights_in as gate_proj + up_proj, weights_out as down_proj
            rules += [rule(f'{t}mlp.fc1.{w}', (f'{h}mlp.gate_proj.{w}', f'{h}mlp.up_proj.{w}'), GATE_UP)
                      for w in ('weight', 'bias')] + renamed_rules(f'{t}mlp.fc2', f'{h}mlp.down_proj')
        else:
            rules += renamed_rules(f'{t}mlp.fc1', h + ('mlp.weights_in' if swiglu else block['fc1']))
            rules += renamed_rules(f'{t}mlp.fc2', h + ('mlp.weights_out' if swiglu else block['fc2']))
        if model.init_values:
            rules += [rule(f'{t}ls1.gamma', f'{h}layer_scale1.lambda1'), rule(f'{t}ls2.gamma', f'{h}layer_scale2.lambda1')]
    rules += renamed_rules('norm', p + ('post_layernorm' if clip_like else 'layernorm'))
    if model.global_pool == 'map':
        hd = f'{p}head.'
        rules += [rule('attn_pool.latent', f'{hd}probe'),
                  rule(('attn_pool.q.weight', 'attn_pool.kv.weight'), f'{hd}attention.in_proj_weight', Q_KV),
                  rule(('attn_pool.q.bias', 'attn_pool.kv.bias'), f'{hd}attention.in_proj_bias', Q_KV)]
        rules += renamed_rules('attn_pool.proj', f'{hd}attention.out_proj') + renamed_rules('attn_pool.norm', f'{hd}layernorm')
        rules += renamed_rules('attn_pool.mlp.fc1', f'{hd}mlp.fc1') + renamed_rules('attn_pool.mlp.fc2', f'{hd}mlp.fc2')
    if model.representation_size:
        rules += renamed_rules('pre_logits.fc', f'{p}pooler.dense')
    if model.num_classes > 0:
        if kind == 'clip':
            rules += [rule(('head.weight', 'head.bias'), 'visual_projection.weight', PROJECTION)]
        elif model.distilled:
            rules += renamed_rules('head', 'cls_classifier') + renamed_rules('head_dist', 'distillation_classifier')
        else:
            rules += renamed_rules('head', 'classifier')
    return rules
