"""NaFlex ViT (`vit_flax.NaFlexVit`: timm's `naflexvit`, big_vision's SigLIP 2 NaFlex tower): the Flax tree <->
timm state_dict map (one table, run both ways) and the architecture read off a checkpoint.

Files:
- timm (the table below): `embeds.proj` a Linear over (ph, pw, C)-flattened patches, `embeds.pos_embed`
  (1, gh, gw, D) (or `embeds.pos_embed_y` (1, gh, D) / `embeds.pos_embed_x` (1, gw, D), 'factorized'),
  `embeds.cls_token`, `embeds.reg_token`, `blocks.{i}` (a timm ViT Block), `norm`, `attn_pool`, `fc_norm`,
  `head`. Detection claims only `embeds.proj.weight` (a timm ViT has `patch_embed.proj`), and the ViT family
  claims no 2-D `embedding/kernel` (NaFlex's Dense; a ViT's is a convolution).
- big_vision's `.npz` (naflex_vit.py's tree: `embedding` (P*P*C, D), `pos_embedding` (gh, gw, D),
  `Transformer/...`, `MAPHead_0`, `head`): the model's own tree, read and written as it is, also under
  big_vision's `params/` or a SigLIP 2 checkpoint's `params/img/` (the text tower left out).

What a file does not record: the activation (timm's exact GELU or SigLIP's tanh form), the position resize
(mode, antialias, aspect preservation, align_corners), the pooling when not 'map' (avg or class token), the
head count from a fused timm qkv: the registered name whose shapes fit says them; `--set` changes them.
"""
import re
from typing import List

import numpy as np

from vit_flax.models.layers import to_tuple
from vit_flax.models.naflex import NaFlexVit

from ..rules import (LINEAR, Rule, Transform, attention_out_rules, dense_rules, heads_in, map_head_rules, mlp_rules,
                     norm_rules, qkv_rules, renamed_rules, rule)
from .base import Family
from .vit.transformers import Q_KV

# transformers' SigLIP block keys (Siglip2's are SigLIP's)
SIGLIP_BLOCK = dict(layer='encoder.layers.{i}.', norm1='layer_norm1', norm2='layer_norm2',
                    qkv=('self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj'), proj='self_attn.out_proj',
                    fc1='mlp.fc1', fc2='mlp.fc2')



# timm's tables carry a leading batch axis: (1, gh, gw, D) / (1, L, D) there, (gh, gw, D) / (L, D) here
BATCH = Transform('batch_axis', lambda a: [a[0][None]], lambda a: [a[0][0]])
_FLAX_BLOCK = re.compile(r'^Transformer/encoderblock_(\d+)/')
_TORCH_BLOCK = re.compile(r'^blocks\.(\d+)\.')
SIGLIP2_PREFIXES = ('params/img/', 'img/', 'params/')


def _grid_rows(grid):
    """timm's (1, gh, gw, D) table <-> transformers' Siglip2 `position_embedding.weight` (gh*gw, D), row-major."""
    gh, gw = grid
    return Transform(f'grid_rows({gh}x{gw})', lambda a: [a[0].reshape(gh * gw, -1)],
                     lambda a: [a[0].reshape(1, gh, gw, -1)])


def transformers_siglip2_table(model, cls: str, spelling: str, prefix: str) -> List[Rule]:
    """timm's naflexvit keys <-> transformers' Siglip2VisionModel / Siglip2Model (its vision half) keys under
    `prefix` (Hub spelling `vision_model.`; transformers 5's Siglip2VisionModel state_dict has none):
    `embeddings.patch_embedding` (a Linear over (ph, pw, C)-flattened patches: timm's `embeds.proj` as it is),
    `embeddings.position_embedding.weight` (gh*gw, D) (timm (1, gh, gw, D)), `encoder.layers.{i}` (SigLIP's
    blocks), `post_layernorm`, `head` (SigLIP's MAP head)."""
    p, e = prefix, f'{prefix}embeddings.'
    rules = renamed_rules('embeds.proj', f'{e}patch_embedding')
    rules.append(rule('embeds.pos_embed', f'{e}position_embedding.weight', _grid_rows(model.pos_embed_grid_size)))
    block = SIGLIP_BLOCK
    for i in range(model.depth):
        t, h = f'blocks.{i}.', p + block['layer'].format(i=i)
        rules += renamed_rules(f'{t}norm1', h + block['norm1'])
        rules += qkv_rules(f'{t}attn.qkv', [h + k for k in block['qkv']], True)
        rules += renamed_rules(f'{t}attn.proj', h + block['proj'])
        rules += renamed_rules(f'{t}norm2', h + block['norm2'])
        rules += renamed_rules(f'{t}mlp.fc1', h + block['fc1']) + renamed_rules(f'{t}mlp.fc2', h + block['fc2'])
    rules += renamed_rules('norm', f'{p}post_layernorm')
    if model.global_pool == 'map':
        hd = f'{p}head.'
        rules += [rule('attn_pool.latent', f'{hd}probe'),
                  rule(('attn_pool.q.weight', 'attn_pool.kv.weight'), f'{hd}attention.in_proj_weight', Q_KV),
                  rule(('attn_pool.q.bias', 'attn_pool.kv.bias'), f'{hd}attention.in_proj_bias', Q_KV)]
        rules += renamed_rules('attn_pool.proj', f'{hd}attention.out_proj') + renamed_rules('attn_pool.norm', f'{hd}layernorm')
        rules += renamed_rules('attn_pool.mlp.fc1', f'{hd}mlp.fc1') + renamed_rules('attn_pool.mlp.fc2', f'{hd}mlp.fc2')
    return rules


class NaFlexFamily(Family):
    """`vit_flax.NaFlexVit`: timm's naflexvit files, big_vision's NaFlex `.npz` (the tree itself)."""
    name = 'naflex'
    recorded_fields = ('num_heads', 'act_layer', 'norm_eps', 'global_pool', 'pos_embed_interp_mode',
                       'pos_embed_ar_preserving', 'pos_embed_antialias', 'pos_embed_align_corners', 'max_seq_len',
                       'img_size')
    module_cls = NaFlexVit
    timm_classifier = 'head'
    timm_default_pool = 'map'
    # transformers' SigLIP 2 NaFlex tower (config.json: converters/hf_transformers.py)
    transformers_classes = {'Siglip2VisionModel': ('siglip2', 'vision_model.'), 'Siglip2Model': ('siglip2', 'vision_model.')}

    def transformers_table(self, model, cls: str, spelling: str, prefix: str) -> list:
        if cls not in self.transformers_classes:
            return super().transformers_table(model, cls, spelling, prefix)
        return transformers_siglip2_table(model, cls, spelling, prefix)

    # ------------------------------------------------------------ detection

    def detect_torch(self, state) -> bool:
        return 'embeds.proj.weight' in state and any(_TORCH_BLOCK.match(k) for k in state)

    def detect_flax(self, flat) -> bool:
        k = flat.get('embedding/kernel')
        return k is not None and np.ndim(k) == 2 and any(_FLAX_BLOCK.match(n) for n in flat)

    def from_npz(self, arrays, path: str):
        """A NaFlex tree as it is, or under big_vision's `params/` or a SigLIP 2 two-tower `params/img/`:
        (tree, layout, False); None for any other `.npz`."""
        for prefix in ('',) + SIGLIP2_PREFIXES:
            k = arrays.get(f'{prefix}embedding/kernel')
            if k is not None and np.ndim(k) == 2 and f'{prefix}Transformer/encoderblock_0/LayerNorm_0/scale' in arrays:
                flat = {n[len(prefix):]: v for n, v in arrays.items() if n.startswith(prefix)}
                return flat, 'big_vision' if prefix else 'flax', False
        return None

    # ------------------------------------------------------------ the rule table

    def rules(self, model) -> List[Rule]:
        h = model.num_heads
        rules = [rule('embedding/kernel', 'embeds.proj.weight', LINEAR), rule('embedding/bias', 'embeds.proj.bias')]
        if model.pos_embed == 'learned':
            rules.append(rule('pos_embedding', 'embeds.pos_embed', BATCH))
        elif model.pos_embed == 'factorized':
            rules += [rule('pos_embedding_y', 'embeds.pos_embed_y', BATCH),
                      rule('pos_embedding_x', 'embeds.pos_embed_x', BATCH)]
        if model.class_token:
            rules.append(rule('cls', 'embeds.cls_token'))
        if model.reg_tokens:
            rules.append(rule('reg', 'embeds.reg_token'))
        for i in range(model.depth):
            f, t = f'Transformer/encoderblock_{i}', f'blocks.{i}'
            mha = f'{f}/MultiHeadDotProductAttention_0'
            rules += norm_rules(f'{f}/LayerNorm_0', f'{t}.norm1')
            rules.append(rule(tuple(f'{mha}/{n}/kernel' for n in ('query', 'key', 'value')), f'{t}.attn.qkv.weight',
                              heads_in(h, 3)))
            if model.qkv_bias:
                rules.append(rule(tuple(f'{mha}/{n}/bias' for n in ('query', 'key', 'value')), f'{t}.attn.qkv.bias',
                                  heads_in(h, 3, kernel=False)))
            rules += attention_out_rules(mha, f'{t}.attn.proj', h)
            if model.init_values:
                rules += [rule(f'{f}/LayerScale_0/scale', f'{t}.ls1.gamma'),
                          rule(f'{f}/LayerScale_1/scale', f'{t}.ls2.gamma')]
            rules += norm_rules(f'{f}/LayerNorm_1', f'{t}.norm2') + mlp_rules(f'{f}/MlpBlock_0', f'{t}.mlp')
        if model.final_norm and not model.use_fc_norm:
            rules += norm_rules('Transformer/encoder_norm', 'norm')
        if model.global_pool == 'map':
            rules += map_head_rules(h)
        if model.final_norm and model.use_fc_norm:
            rules += norm_rules('pool_norm', 'fc_norm')
        if model.num_classes > 0:
            rules += dense_rules('head', 'head')
        return rules

    # ------------------------------------------------------------ architecture

    @staticmethod
    def _config(dim, patch_in, depth, hidden, pos, grid, cls, reg, qkv_bias, ls, map_head, encoder_norm,
                pool_norm, head_bias, heads=None) -> dict:
        in_chans = next((c for c in (3, 1, 4) if patch_in % c == 0 and round((patch_in // c) ** 0.5) ** 2 ==
                         patch_in // c), 3)
        p = round((patch_in // in_chans) ** 0.5)
        cfg = dict(embed_dim=dim, patch_size=(p, p), in_chans=in_chans, depth=depth, mlp_dim=hidden, pos_embed=pos,
                   pos_embed_grid_size=grid, class_token=cls, reg_tokens=reg, qkv_bias=qkv_bias,
                   layer_scale=bool(ls), map_head=map_head, final_norm=encoder_norm or pool_norm,
                   fc_norm=pool_norm, num_heads=heads,
                   num_classes=int(head_bias.shape[0]) if head_bias is not None else 0)
        return cfg

    def config_from_flax(self, flat) -> dict:
        depth = 1 + max(int(m.group(1)) for k in flat for m in [_FLAX_BLOCK.match(k)] if m)
        b = 'Transformer/encoderblock_0'
        if 'pos_embedding' in flat:
            pos, grid = 'learned', tuple(int(s) for s in flat['pos_embedding'].shape[:2])
        elif 'pos_embedding_y' in flat:
            pos, grid = 'factorized', (int(flat['pos_embedding_y'].shape[0]), int(flat['pos_embedding_x'].shape[0]))
        else:
            pos, grid = 'none', ()
        k = flat['embedding/kernel']
        return self._config(int(k.shape[1]), int(k.shape[0]), depth, int(flat[f'{b}/MlpBlock_0/Dense_0/kernel'].shape[1]),
                            pos, grid, 'cls' in flat, int(flat['reg'].shape[1]) if 'reg' in flat else 0,
                            f'{b}/MultiHeadDotProductAttention_0/query/bias' in flat, f'{b}/LayerScale_0/scale' in flat,
                            'MAPHead_0/probe' in flat, 'Transformer/encoder_norm/scale' in flat,
                            'pool_norm/scale' in flat, flat.get('head/bias'),
                            heads=int(flat[f'{b}/MultiHeadDotProductAttention_0/query/kernel'].shape[1]))

    def config_from_torch(self, state) -> dict:
        depth = 1 + max(int(m.group(1)) for k in state for m in [_TORCH_BLOCK.match(k)] if m)
        if 'embeds.pos_embed' in state:
            pos, grid = 'learned', tuple(int(s) for s in state['embeds.pos_embed'].shape[1:3])
        elif 'embeds.pos_embed_y' in state:
            pos, grid = 'factorized', (int(state['embeds.pos_embed_y'].shape[1]),
                                       int(state['embeds.pos_embed_x'].shape[1]))
        else:
            pos, grid = 'none', ()
        w = state['embeds.proj.weight']
        return self._config(int(w.shape[0]), int(w.shape[1]), depth, int(state['blocks.0.mlp.fc1.weight'].shape[0]),
                            pos, grid, 'embeds.cls_token' in state,
                            int(state['embeds.reg_token'].shape[1]) if 'embeds.reg_token' in state else 0,
                            'blocks.0.attn.qkv.bias' in state, 'blocks.0.ls1.gamma' in state,
                            'attn_pool.latent' in state, 'norm.weight' in state, 'fc_norm.weight' in state,
                            state.get('head.bias'))

    def core(self, model) -> dict:
        return dict(embed_dim=model.embed_dim, patch_size=tuple(to_tuple(model.patch_size, 2)), depth=model.depth,
                    mlp_dim=model.mlp_hidden, pos_embed=model.pos_embed,
                    pos_embed_grid_size=tuple(model.pos_embed_grid_size) if model.pos_embed != 'none' else (),
                    class_token=model.class_token, reg_tokens=model.reg_tokens, qkv_bias=model.qkv_bias,
                    layer_scale=bool(model.init_values), map_head=model.global_pool == 'map',
                    final_norm=model.final_norm, fc_norm=model.final_norm and model.use_fc_norm)

    def with_core(self, model, cfg: dict):
        core = self.core(model)
        kw = {k: cfg[k] for k in core if cfg.get(k) is not None and cfg[k] != core[k]}
        if 'layer_scale' in kw:   # LayerScale's presence (its init value seeds training only)
            kw['init_values'] = 1e-5 if kw.pop('layer_scale') else None
        if kw.get('pos_embed_grid_size') == ():
            kw.pop('pos_embed_grid_size')
        if 'map_head' in kw:
            kw.pop('map_head')
            kw['global_pool'] = 'map' if cfg['map_head'] else ('token' if cfg.get('class_token') else 'avg')
        if 'fc_norm' in kw:
            kw['fc_norm'] = cfg['fc_norm']
        return model.clone(**kw)

    def overrides(self, cfg: dict, model) -> dict:
        kw = {k: cfg[k] for k in ('num_classes', 'in_chans', 'num_heads') if cfg.get(k) is not None
              and cfg[k] != getattr(model, k)}
        if 'num_heads' in kw and model.embed_dim % kw['num_heads']:
            raise ValueError(f'embed_dim {model.embed_dim} is not divisible by {kw["num_heads"]} heads')
        return kw

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str, log):
        """Nothing to adapt: the position table is resized per image in the forward."""
        return flat

    # ------------------------------------------------------------ torch, timm, inspection

    def timm_kwargs(self, model) -> dict:
        """Arguments of timm's `naflexvit_*` entrypoints (NaFlexVitCfg fields overlaid) that build `model`."""
        return dict(num_classes=model.num_classes, in_chans=model.in_chans,
                    patch_size=tuple(to_tuple(model.patch_size, 2)), embed_dim=model.embed_dim, depth=model.depth,
                    num_heads=model.num_heads, mlp_ratio=model.mlp_hidden / model.embed_dim,
                    qkv_bias=model.qkv_bias, init_values=model.init_values, class_token=model.class_token,
                    reg_tokens=model.reg_tokens, pos_embed=model.pos_embed,
                    pos_embed_grid_size=tuple(model.pos_embed_grid_size),
                    pos_embed_interp_mode=model.pos_embed_interp_mode,
                    pos_embed_ar_preserving=model.pos_embed_ar_preserving,
                    pos_embed_antialias=model.pos_embed_antialias,
                    pos_embed_align_corners=model.pos_embed_align_corners, global_pool=model.global_pool,
                    fc_norm=model.use_fc_norm, final_norm=model.final_norm, act_layer=model.act_layer,
                    drop_rate=model.drop_rate, proj_drop_rate=model.proj_drop_rate,
                    attn_drop_rate=model.attn_drop_rate, drop_path_rate=model.drop_path_rate)

    def torch_model(self, model, model_name: str):
        """timm's NaFlexVit for `model` (any size; randomly initialised)."""
        from ..optional import require
        timm = require('timm', 'vit-flax parity')
        kw = self.timm_kwargs(model)
        if kw['mlp_ratio'] * model.embed_dim != int(kw['mlp_ratio'] * model.embed_dim):
            kw['mlp_ratio'] = (model.mlp_hidden + 0.5) / model.embed_dim   # timm's int(dim * ratio) = mlp_hidden
        return timm.create_model(model_name, pretrained=False, **kw)

    def parity_points(self, model):
        return [(f'block {i}', f'Transformer/block_{i}', f'blocks.{i}') for i in range(model.depth)]

    def describe(self, ck) -> str:
        return f'NaFlex ViT ({ck.layout})'


FAMILY = NaFlexFamily()
