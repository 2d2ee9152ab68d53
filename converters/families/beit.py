"""BEiT / BEiT v2 (timm's `Beit`, vit_flax/models/beit.py): the Flax tree <-> timm's state_dict, one rule table run
both ways (bit-exact). timm's keys equal microsoft/unilm's fine-tuned BEiT keys: `cls_token`, `pos_embed` (if
absolute), `patch_embed.proj`, `rel_pos_bias.relative_position_bias_table` (shared), `blocks.{i}.{gamma_1,
gamma_2, norm1, attn.{qkv.weight, q_bias, v_bias, relative_position_bias_table, proj}, norm2, mlp.fc1, mlp.fc2}`,
`norm` or `fc_norm`, `head`. unilm's persistent `relative_position_index` buffers are derived from the grid:
ignored on read (timm's filter drops them too)."""
import re
from typing import List

import numpy as np

from vit_flax.models.beit import Beit
from vit_flax.models.eva import relative_table_size
from vit_flax.models.layers import to_tuple

from ..errors import ConversionError
from ..rules import CONV, Rule, dense_rules, norm_rules, qkv_rules, renamed_rules, rule
from .base import Family
from .eva import torch_shapes_of_flax

_BLOCK = re.compile(r'^blocks\.(\d+)\.')


def unilm_to_timm(state) -> dict:
    """microsoft/unilm's BEiT files -> timm's keys: the persistent `relative_position_index` buffers dropped (the
    grid gives them); a pre-training file's `mask_token` and `lm_head` are refused (no classifier model holds them)."""
    extra = [k for k in state if k == 'mask_token' or k.startswith('lm_head.')]
    if extra:
        raise ConversionError(f'a BEiT pre-training file ({extra[0]}): its masked-image-modelling head has no place in '
                              'a classifier; drop mask_token and lm_head.* first')
    return {k: v for k, v in state.items() if not k.endswith('relative_position_index')}


def timm_to_unilm(state, model) -> dict:
    """timm's keys -> unilm's BEiT layout: each relative position table followed by its `relative_position_index`
    (int64 (N + 1, N + 1)), saved under {'model': ...} as unilm's fine-tuning saves it."""
    from vit_flax.models.eva import relative_position_index
    index = relative_position_index(model.grid_size).astype(np.int64)
    out = {}
    for k, v in state.items():
        out[k] = v
        if k.endswith('relative_position_bias_table'):
            out[k[:-len('relative_position_bias_table')] + 'relative_position_index'] = index
    return out


def transformers_beit_table(model, cls: str, spelling: str, prefix: str) -> List[Rule]:
    """timm's Beit keys (the rules' flax side) <-> transformers' `BeitModel` / `BeitForImageClassification` (prefix
    `beit.`), Hub spelling only (what `save_pretrained` writes and the Hub holds): `embeddings.{cls_token,
    position_embeddings, patch_embeddings.projection}`, `encoder.relative_position_bias.relative_position_bias_table`
    (shared), `encoder.layer.i.{layernorm_before, attention.attention.{query, key (no bias), value,
    relative_position_bias.relative_position_bias_table}, attention.output.dense, lambda_1, lambda_2,
    layernorm_after, intermediate.dense, output.dense}`, `layernorm` (class token pooled) or `pooler.layernorm`
    (use_mean_pooling: our fc_norm), `classifier`. `mask_token` (masked training only) is dropped on read."""
    if spelling != 'hub':
        raise ConversionError("transformers 5's own Beit key spelling is not read; save with the Hub's")
    e, p = f'{prefix}embeddings.', prefix
    rules = renamed_rules('patch_embed.proj', f'{e}patch_embeddings.projection') + [rule('cls_token', f'{e}cls_token')]
    if model.use_abs_pos_emb:
        rules.append(rule('pos_embed', f'{e}position_embeddings'))
    if model.use_shared_rel_pos_bias:
        rules.append(rule('rel_pos_bias.relative_position_bias_table',
                          f'{p}encoder.relative_position_bias.relative_position_bias_table'))
    for i in range(model.depth):
        t, h = f'blocks.{i}.', f'{p}encoder.layer.{i}.'
        a = f'{h}attention.attention.'
        rules += renamed_rules(f'{t}norm1', f'{h}layernorm_before')
        rules += qkv_rules(f'{t}attn.qkv', [f'{a}query', f'{a}key', f'{a}value'], False)
        if model.qkv_bias:
            rules += [rule(f'{t}attn.q_bias', f'{a}query.bias'), rule(f'{t}attn.v_bias', f'{a}value.bias')]
        if model.use_rel_pos_bias:
            rules.append(rule(f'{t}attn.relative_position_bias_table',
                              f'{a}relative_position_bias.relative_position_bias_table'))
        rules += renamed_rules(f'{t}attn.proj', f'{h}attention.output.dense')
        if model.init_values:
            rules += [rule(f'{t}gamma_1', f'{h}lambda_1'), rule(f'{t}gamma_2', f'{h}lambda_2')]
        rules += renamed_rules(f'{t}norm2', f'{h}layernorm_after')
        rules += renamed_rules(f'{t}mlp.fc1', f'{h}intermediate.dense')
        rules += renamed_rules(f'{t}mlp.fc2', f'{h}output.dense')
    if model.use_fc_norm:   # use_mean_pooling: the pooler's norm after the mean; else the final norm
        rules += renamed_rules('fc_norm', f'{p}pooler.layernorm')
    else:
        rules += renamed_rules('norm', f'{p}layernorm')
    if model.num_classes > 0:
        rules += renamed_rules('head', 'classifier')
    return rules


class BeitFamily(Family):
    name = 'beit'
    module_cls = Beit
    recorded_fields = ('num_heads', 'norm_eps', 'global_pool', 'fc_norm', 'img_size')
    ignore_torch = ('relative_position_index', 'attn.k_bias')
    layouts = {'unilm': (unilm_to_timm, timm_to_unilm)}
    layout_models = ('unilm',)
    torch_wrap = {'unilm': 'model'}
    pos_key = 'pos_embed'
    timm_default_pool = 'avg'
    # transformers' BEiT (config.json: converters/hf_transformers.py)
    transformers_classes = {'BeitModel': ('beit', ''), 'BeitForImageClassification': ('beit', 'beit.')}

    def transformers_table(self, model, cls: str, spelling: str, prefix: str) -> list:
        if cls not in self.transformers_classes:
            return super().transformers_table(model, cls, spelling, prefix)
        return transformers_beit_table(model, cls, spelling, prefix)

    def detect_torch(self, state) -> bool:
        return 'blocks.0.attn.qkv.weight' in state and 'cls_token' in state and (
            'blocks.0.attn.relative_position_bias_table' in state or 'rel_pos_bias.relative_position_bias_table'
            in state)

    def detect_layout(self, state) -> str:
        """'unilm' (microsoft/unilm's files: `relative_position_index` buffers beside BEiT's `cls_token` and
        top-level `blocks.`; Microsoft's Swin files have the buffers too, under `layers.N.blocks.`), else 'timm'."""
        beit = 'cls_token' in state and any(k.startswith('blocks.') for k in state)
        return 'unilm' if beit and any(k.endswith('relative_position_index') for k in state) else 'timm'

    def detect_flax(self, flat) -> bool:
        return 'patch_embed/kernel' in flat and any(k.endswith('relative_position_bias_table') for k in flat)

    def rules(self, model) -> List[Rule]:
        rules = [rule('patch_embed/kernel', 'patch_embed.proj.weight', CONV),
                 rule('patch_embed/bias', 'patch_embed.proj.bias'), rule('cls_token', 'cls_token')]
        if model.use_abs_pos_emb:
            rules.append(rule('pos_embed', 'pos_embed'))
        if model.use_shared_rel_pos_bias:
            rules.append(rule('rel_pos_bias/relative_position_bias_table', 'rel_pos_bias.relative_position_bias_table'))
        for i in range(model.depth):
            f, t = f'blocks_{i}', f'blocks.{i}'
            if model.init_values:
                rules += [rule(f'{f}/gamma_1', f'{t}.gamma_1'), rule(f'{f}/gamma_2', f'{t}.gamma_2')]
            rules += norm_rules(f'{f}/norm1', f'{t}.norm1')
            rules += dense_rules(f'{f}/attn/qkv', f'{t}.attn.qkv', bias=False)
            if model.qkv_bias:
                rules += [rule(f'{f}/attn/q_bias', f'{t}.attn.q_bias'), rule(f'{f}/attn/v_bias', f'{t}.attn.v_bias')]
            if model.use_rel_pos_bias:
                rules.append(rule(f'{f}/attn/relative_position_bias_table',
                                  f'{t}.attn.relative_position_bias_table'))
            rules += dense_rules(f'{f}/attn/proj', f'{t}.attn.proj')
            rules += norm_rules(f'{f}/norm2', f'{t}.norm2')
            m, tm = f'{f}/mlp', f'{t}.mlp'
            if model.mlp_layer == 'swiglu':
                rules += dense_rules(f'{m}/Dense_gate', f'{tm}.fc1_g') + dense_rules(f'{m}/Dense_0', f'{tm}.fc1_x')
            else:
                rules += dense_rules(f'{m}/Dense_0', f'{tm}.fc1')
            if model.scale_mlp_norm:
                rules += norm_rules(f'{m}/norm', f'{tm}.norm')
            rules += dense_rules(f'{m}/Dense_1', f'{tm}.fc2')
        rules += norm_rules('fc_norm', 'fc_norm') if model.use_fc_norm else norm_rules('norm', 'norm')
        if model.num_classes > 0:
            rules += dense_rules('head', 'head')
        return rules

    def config_from_torch(self, state) -> dict:
        w = np.shape(state['patch_embed.proj.weight'])
        b = 'blocks.0.'
        table = state.get(b + 'attn.relative_position_bias_table', state.get('rel_pos_bias.relative_position_bias_table'))
        swiglu = b + 'mlp.fc1_g.weight' in state
        return dict(embed_dim=w[0], in_chans=w[1], patch_size=tuple(w[2:]),
                    depth=1 + max(int(m.group(1)) for m in map(_BLOCK.match, state) if m),
                    num_heads=np.shape(table)[1], table_rows=np.shape(table)[0],
                    qkv_bias=b + 'attn.q_bias' in state, use_abs_pos_emb='pos_embed' in state,
                    use_rel_pos_bias=b + 'attn.relative_position_bias_table' in state,
                    use_shared_rel_pos_bias='rel_pos_bias.relative_position_bias_table' in state,
                    mlp_layer='swiglu' if swiglu else 'mlp', scale_mlp_norm=b + 'mlp.norm.weight' in state,
                    layer_scale=b + 'gamma_1' in state, fc_norm='fc_norm.weight' in state,
                    mlp_hidden=np.shape(state[b + ('mlp.fc1_g.weight' if swiglu else 'mlp.fc1.weight')])[0],
                    num_classes=np.shape(state['head.weight'])[0] if 'head.weight' in state else 0)

    def config_from_flax(self, flat) -> dict:
        state = {k: np.empty(shape, np.int8) for k, shape in torch_shapes_of_flax(flat).items()}
        return self.config_from_torch(state)

    _CORE = ('embed_dim', 'depth', 'num_heads', 'patch_size', 'in_chans', 'qkv_bias', 'use_abs_pos_emb',
             'use_rel_pos_bias', 'use_shared_rel_pos_bias', 'mlp_layer', 'scale_mlp_norm')

    def core(self, model) -> dict:
        kw = {k: getattr(model, k) for k in self._CORE}
        kw['patch_size'] = to_tuple(model.patch_size, 2)
        return kw

    def overrides(self, cfg: dict, model) -> dict:
        kw = {}
        if cfg.get('num_classes') is not None and cfg['num_classes'] != model.num_classes:
            kw['num_classes'] = cfg['num_classes']
        if cfg.get('layer_scale') is not None and cfg['layer_scale'] != bool(model.init_values):
            kw['init_values'] = 0.1 if cfg['layer_scale'] else None
        if cfg.get('fc_norm') is not None and cfg['fc_norm'] != model.use_fc_norm:
            kw['fc_norm'] = cfg['fc_norm']
        if cfg.get('mlp_hidden') is not None and cfg['mlp_hidden'] != model.mlp_hidden:
            kw['mlp_ratio'] = cfg['mlp_hidden'] / model.embed_dim
        rows = cfg.get('table_rows')
        hint = cfg.get('img_size_hint')
        if rows is not None and rows != relative_table_size(model.grid_size) and hint is not None \
                and relative_table_size(model.clone(img_size=hint).grid_size) == rows:
            kw['img_size'] = hint
        elif rows is not None and rows != relative_table_size(model.grid_size):
            side = int(round((((rows - 3) ** 0.5) + 1) / 2))
            if relative_table_size((side, side)) != rows:
                raise ValueError(f'a relative position table of {rows} rows is not a square grid; pass img_size')
            kw['img_size'] = side * to_tuple(model.patch_size, 2)[0]
        return kw

    def timm_kwargs(self, model) -> dict:
        from timm.layers import LayerNorm
        from functools import partial
        return dict(num_classes=model.num_classes, img_size=to_tuple(model.img_size, 2),
                    patch_size=to_tuple(model.patch_size, 2), in_chans=model.in_chans, global_pool=model.global_pool,
                    embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads, qkv_bias=model.qkv_bias,
                    mlp_ratio=model.mlp_ratio, swiglu_mlp=model.mlp_layer == 'swiglu', scale_mlp=model.scale_mlp_norm,
                    drop_rate=model.drop_rate, pos_drop_rate=model.pos_drop_rate, proj_drop_rate=model.proj_drop_rate,
                    attn_drop_rate=model.attn_drop_rate, drop_path_rate=model.drop_path_rate,
                    norm_layer=partial(LayerNorm, eps=model.norm_eps), init_values=model.init_values,
                    use_abs_pos_emb=model.use_abs_pos_emb, use_rel_pos_bias=model.use_rel_pos_bias,
                    use_shared_rel_pos_bias=model.use_shared_rel_pos_bias, use_fc_norm=model.fc_norm)

    def parity_points(self, model):
        pts = [(f'block {i}', f'block_{i}', f'blocks.{i}') for i in range(model.depth)]
        return pts

    def describe(self, ck) -> str:
        return f'BEiT ({ck.layout})'


FAMILY = BeitFamily()
