"""ViT / DeiT: the Flax (Google linen) tree <-> timm state_dict map, one table for both directions.

Hybrids add their ResNet stem's rows (resnet_map.py). A model with big_vision's fixed sincos2d positions
has no position param; files that need a table (timm's `pos_embed`, vit_jax's released layout) hold it
written out (`store`), and a stored table equal to that function bit for bit reads back as the fixed one
(`unstore`), so round trips stay exact.
"""
from typing import Callable, List

import numpy as np

from vit_flax.models.posemb import sincos2d

from . import resnet_map
from .table import CONV, Rule, dense_rules, heads_in, heads_out, mlp_rules, norm_rules, rule

POS_KEY = 'Transformer/posembed_input/pos_embedding'


def _attention_out(flax: str, torch: str, heads: int) -> List[Rule]:
    return [rule(f'{flax}/out/kernel', f'{torch}.weight', heads_out(heads)),
            rule(f'{flax}/out/bias', f'{torch}.bias')]


def vit_rules(model) -> List[Rule]:
    """The map for a `vit_flax.VisionTransformer` instance (its config decides which rows exist), as stored:
    a fixed position table has its row too (see `store`)."""
    h = model.num_heads
    rules = resnet_map.resnet_rules(model.resnet) if model.resnet is not None else []
    rules += [rule('embedding/kernel', 'patch_embed.proj.weight', CONV),
              rule('embedding/bias', 'patch_embed.proj.bias'),
              rule(POS_KEY, 'pos_embed')]
    if model.embed_norm:
        rules += norm_rules('embedding_norm', 'patch_embed.norm')
    if model.has_class_token:
        rules.append(rule('cls', 'cls_token'))
    if model.distilled:
        rules.append(rule('dist', 'dist_token'))
    for i in range(model.depth):
        f, t = f'Transformer/encoderblock_{i}', f'blocks.{i}'
        mha = f'{f}/MultiHeadDotProductAttention_0'
        rules += norm_rules(f'{f}/LayerNorm_0', f'{t}.norm1')
        qkv = tuple(f'{mha}/{n}/kernel' for n in ('query', 'key', 'value'))
        rules.append(rule(qkv, f'{t}.attn.qkv.weight', heads_in(h, 3)))
        if model.qkv_bias:
            qkv_b = tuple(f'{mha}/{n}/bias' for n in ('query', 'key', 'value'))
            rules.append(rule(qkv_b, f'{t}.attn.qkv.bias', heads_in(h, 3, kernel=False)))
        rules += _attention_out(mha, f'{t}.attn.proj', h)
        rules += norm_rules(f'{f}/LayerNorm_1', f'{t}.norm2')
        rules += mlp_rules(f'{f}/MlpBlock_0', f'{t}.mlp')
    rules += norm_rules('Transformer/encoder_norm', 'norm')
    if model.global_pool == 'map':
        f, t = 'MAPHead_0', 'attn_pool'
        mha = f'{f}/MultiHeadDotProductAttention_0'
        rules += [rule(f'{f}/probe', f'{t}.latent'),
                  rule(f'{mha}/query/kernel', f'{t}.q.weight', heads_in(h, 1)),
                  rule(f'{mha}/query/bias', f'{t}.q.bias', heads_in(h, 1, kernel=False)),
                  rule((f'{mha}/key/kernel', f'{mha}/value/kernel'), f'{t}.kv.weight', heads_in(h, 2)),
                  rule((f'{mha}/key/bias', f'{mha}/value/bias'), f'{t}.kv.bias', heads_in(h, 2, kernel=False))]
        rules += _attention_out(mha, f'{t}.proj', h)
        rules += norm_rules(f'{f}/LayerNorm_0', f'{t}.norm') + mlp_rules(f'{f}/MlpBlock_0', f'{t}.mlp')
    if model.representation_size:
        rules += dense_rules('pre_logits', 'pre_logits.fc')  # the seeds' name; current timm has no such layer
    if model.num_classes > 0:
        rules += dense_rules('head', 'head')
        if model.distilled:
            rules += dense_rules('head_dist', 'head_dist')
    return rules


def vit_timm_kwargs(model) -> dict:
    """Arguments that make `timm.create_model(name, **kw)` build the same architecture as `model`."""
    kw = dict(num_classes=model.num_classes, img_size=model.img_size, patch_size=model.patch_size,
              in_chans=model.in_chans, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
              mlp_ratio=(model.mlp_dim / model.embed_dim) if model.mlp_dim else model.mlp_ratio,
              qkv_bias=model.qkv_bias, act_layer={'exact': 'gelu', 'tanh': 'gelu_tanh'}[model.gelu])
    if model.embed_norm:
        kw['embed_norm_layer'] = 'layernorm'  # timm's LayerNorm, eps 1e-6 as the model's norm_eps default
    if model.resnet is not None:
        from functools import partial
        from timm.layers import HybridEmbed
        kw['embed_layer'] = partial(HybridEmbed, backbone=resnet_map.timm_backbone(model.resnet, model.in_chans))
    if model.global_pool != 'token':
        kw.update(global_pool={'gap': 'avg', 'map': 'map'}[model.global_pool],
                  class_token=model.has_class_token, fc_norm=False)
    return kw


def vit_parity_points(model):
    """(label, flax intermediate, timm module) pairs compared by `vit-flax parity`, in forward order."""
    pts = [('embed', 'Transformer/embed', 'pos_drop')]
    pts += [(f'block {i}', f'Transformer/block_{i}', f'blocks.{i}') for i in range(model.depth)]
    pts.append(('norm', 'Transformer/encoded', 'norm'))
    return pts


def _count(keys, pattern):
    import re
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys for m in [rx.match(k)] if m})


def _check_kernel(kernel, key):
    if kernel.ndim not in (3, 4):
        raise ValueError(f'{key} has shape {kernel.shape}: a 1-D or 2-D convolution kernel has 3 or 4 dims')


def vit_config_from_flax(flat) -> dict:
    """Architecture fields of `VisionTransformer` read off a flat linen tree."""
    kernel = flat['embedding/kernel']
    _check_kernel(kernel, 'embedding/kernel')
    depth = _count(flat, r'^Transformer/encoderblock_(\d+)/')
    b0 = 'Transformer/encoderblock_0'
    resnet, stem_in = resnet_map.resnet_from_flax(flat)
    cfg = dict(embed_dim=kernel.shape[-1], in_chans=stem_in or kernel.shape[-2],
               patch_size=tuple(kernel.shape[:-2]), spatial_dims=kernel.ndim - 2, depth=depth,
               num_heads=flat[f'{b0}/MultiHeadDotProductAttention_0/query/kernel'].shape[1],
               mlp_dim=flat[f'{b0}/MlpBlock_0/Dense_0/kernel'].shape[1],
               qkv_bias=f'{b0}/MultiHeadDotProductAttention_0/query/bias' in flat,
               distilled='dist' in flat, class_token='cls' in flat, embed_norm='embedding_norm/scale' in flat,
               global_pool='map' if 'MAPHead_0/probe' in flat else ('token' if 'cls' in flat else 'gap'),
               representation_size=flat['pre_logits/bias'].shape[0] if 'pre_logits/bias' in flat else None,
               num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else 0, resnet=resnet)
    return _positions(cfg, flat.get(POS_KEY))


def vit_config_from_torch(state) -> dict:
    """The same fields read off a timm state_dict; `num_heads` is None (a fused qkv does not record it)."""
    w = state['patch_embed.proj.weight']
    _check_kernel(w, 'patch_embed.proj.weight')
    resnet, stem_in = resnet_map.resnet_from_torch(state)
    cfg = dict(embed_dim=w.shape[0], in_chans=stem_in or w.shape[1], patch_size=tuple(w.shape[2:]),
               spatial_dims=w.ndim - 2, depth=_count(state, r'^blocks\.(\d+)\.'), num_heads=None,
               mlp_dim=state['blocks.0.mlp.fc1.weight'].shape[0], qkv_bias='blocks.0.attn.qkv.bias' in state,
               distilled='dist_token' in state, class_token='cls_token' in state,
               embed_norm='patch_embed.norm.weight' in state,
               global_pool='map' if 'attn_pool.latent' in state else ('token' if 'cls_token' in state else 'gap'),
               representation_size=state['pre_logits.fc.bias'].shape[0] if 'pre_logits.fc.bias' in state else None,
               num_classes=state['head.bias'].shape[0] if 'head.bias' in state else 0, resnet=resnet)
    return _positions(cfg, state['pos_embed'])


def _positions(cfg: dict, table) -> dict:
    """`num_patches` and `posemb` from the stored table (None: a file without one, big_vision's sincos2d)."""
    prefix = int(cfg['class_token']) + int(cfg['distilled'])
    cfg['num_patches'] = None if table is None else table.shape[1] - prefix
    cfg['posemb'] = 'sincos2d' if table is None or is_sincos2d_table(table, prefix) else 'learn'
    return cfg


def is_sincos2d_table(table, prefix: int) -> bool:
    """A stored (1, prefix + s*s, D) table that is big_vision's sincos2d for an s x s grid, bit for bit at its
    dtype, with zero prefix rows: exactly what `store` writes, so it reads back as the fixed table."""
    if table.ndim != 3 or table.shape[-1] % 4 or table.shape[-1] < 8 or np.any(table[:, :prefix] != 0):
        return False
    side = int(round((table.shape[1] - prefix) ** 0.5))
    return side * side == table.shape[1] - prefix and np.array_equal(
        table[:, prefix:], sincos2d(side, side, table.shape[-1]).astype(table.dtype))


def sincos2d_pos_embed(model, dtype) -> np.ndarray:
    """The model's fixed positions as a learned table over all tokens (prefix rows zero), in `dtype`."""
    grid = sincos2d(*model.grid_size, model.embed_dim)
    return np.concatenate([np.zeros((1, model.num_prefix_tokens, model.embed_dim), np.float32), grid],
                          axis=1).astype(dtype)


def vit_store(flat, model, log: Callable[[str], None] = lambda s: None):
    """The tree as a file with a position table holds it: fixed sincos2d positions written out."""
    if model.posemb != 'sincos2d':
        return flat
    log(f'pos_embed: big_vision\'s fixed sincos2d positions (grid {"x".join(map(str, model.grid_size))}) written '
        f'out as a learned table, prefix rows zero: a model holding it computes the same function')
    return {**flat, POS_KEY: sincos2d_pos_embed(model, flat['embedding/kernel'].dtype)}


def vit_unstore(flat, model):
    """The inverse of `vit_store`: a fixed table (checked equal when the config was read) is dropped."""
    return {k: v for k, v in flat.items() if k != POS_KEY} if model.posemb == 'sincos2d' else flat


VIT_CORE = ('embed_dim', 'depth', 'patch_size', 'mlp_dim', 'spatial_dims', 'num_heads')


def vit_core(model) -> dict:
    return dict(embed_dim=model.embed_dim, depth=model.depth, patch_size=model.patch_size_tuple,
                mlp_dim=model.mlp_dim or int(model.embed_dim * model.mlp_ratio), spatial_dims=model.spatial_dims,
                num_heads=model.num_heads)


def vit_overrides(cfg: dict, model) -> dict:
    """Overrides that make registered `model` hold exactly the checkpoint described by `cfg`."""
    current = dict(num_classes=model.num_classes, representation_size=model.representation_size or None,
                   distilled=model.distilled, class_token=model.has_class_token, global_pool=model.global_pool,
                   qkv_bias=model.qkv_bias, in_chans=model.in_chans, embed_norm=model.embed_norm,
                   posemb=model.posemb, resnet=model.resnet)
    kw = {k: cfg[k] for k, v in current.items() if cfg[k] != v}
    if 'resnet' in kw:  # the stem decides how many tokens an image makes
        model = model.clone(resnet=kw['resnet'])
    img = img_size_override(cfg, model)
    return {**kw, **({'img_size': img} if img is not None else {})}


def img_size_override(cfg: dict, model):
    """The img_size that gives `model` the checkpoint's `num_patches` positions (None: its own does).

    The caller's size (`img_size_hint`) when it fits, else a square grid (a 1-D model: a line). A file
    without positions (fixed sincos2d) takes the size asked for, if any."""
    hint = cfg.get('img_size_hint')
    if cfg['num_patches'] is None:
        return hint
    if cfg['num_patches'] == int(np.prod(model.grid_size)):
        return None
    if hint is not None and int(np.prod(model.clone(img_size=hint).grid_size)) == cfg['num_patches']:
        return hint
    stride = getattr(model, 'token_stride', None) or model.patch_size_tuple
    if getattr(model, 'spatial_dims', 2) == 1:
        return cfg['num_patches'] * stride[0]
    side = int(round(cfg['num_patches'] ** 0.5))
    if side * side != cfg['num_patches']:
        raise ValueError(f"{cfg['num_patches']} positions are not a square grid; pass img_size (HxW)")
    return side * stride[0] if stride[0] == stride[1] else (side * stride[0], side * stride[1])
