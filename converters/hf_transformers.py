"""Hugging Face transformers folders (config.json + weights) as vit-flax models, read and written.

The files (config.json, single, sharded and .bin weights, which class a file's keys are) are
formats/transformers_folder.py; the key tables (timm's keys <-> each class's, per key spelling) are the
families' `transformers` layouts (`Family.transformers_classes`, `transformers_table`: families/vit/transformers.py,
swin.py, swinv2.py, eva.py: DINOv3ViTModel). Here: what config.json means for a model and back, and the refusals.

Reading: config.json alone decides the architecture (`arch_from_config`); the class's key table of the family
(run both ways by `converters.rules`, whose "flax" side holds timm's keys there and whose "torch" side holds
transformers') gives timm's state_dict, whose shapes config.json must agree with; the pipeline's matcher
(`checkpoint.match_model`, as for every source) picks the registered timm-named model, and config.json's fields
are set on it with what differs said (ViT's `layer_norm_eps` 1e-12 is no timm default); the family's own rule
table gives the Flax tree. Writing runs the same tables the other way, after refusing what the class cannot hold.

Numerics: transformers' "gelu" is exact, "gelu_pytorch_tanh"/"gelu_new" the tanh form, "quick_gelu"
x*sigmoid(1.702x); ViT/DeiT's layer_norm_eps defaults to 1e-12, DINOv2/SigLIP 1e-6, CLIP/Swin 1e-5: every one
is built into the model as the config says.
"""
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .errors import ConversionError
from .families import FAMILIES, Family
from .families.base import field_overrides
from .formats import transformers_folder as files
from .formats.transformers_folder import is_transformers_folder  # noqa: F401  (converters.hf_transformers' as before)

# buffers some files hold, derived from the config
IGNORE = ('relative_position_index', 'position_ids', 'embeddings.mask_token')
SPELLINGS = ('hub', 'internal')

Log = Callable[[str], None]


# ---------------------------------------------------------------- classes: each family's `transformers` layout

def family_of_class(cls: str) -> Tuple[Family, str, str]:
    """(family, kind, backbone prefix) of transformers class `cls`, as the family holding it declares."""
    for fam in FAMILIES:
        if cls in fam.transformers_classes:
            return (fam,) + tuple(fam.transformers_classes[cls])
    raise ConversionError(f'no transformers class {cls!r}')


def _kind(cls: str) -> str:
    return family_of_class(cls)[1]


def table(model, cls: str, spelling: str, prefix: Optional[str] = None) -> list:
    """The key table of `cls` for `model` in `spelling` ('hub' or 'internal'): its family's `transformers`
    layout, the backbone under `prefix` (default: the class's own)."""
    family, _, own = family_of_class(cls)
    return family.transformers_table(model, cls, spelling, own if prefix is None else prefix)


def prefix_of(cls: str, state) -> str:
    """The backbone prefix `state` uses: the class's, or none where transformers 5 saved a CLIPVisionModel or
    SiglipVisionModel (its `vision_model.` removed; the Hub's files and what we write keep it)."""
    p = family_of_class(cls)[2]
    if cls in ('CLIPVisionModel', 'SiglipVisionModel', 'Siglip2VisionModel') and not any(k.startswith(p) for k in state):
        return ''
    return p


# ---------------------------------------------------------------- config.json <-> model fields

_ACT = {'gelu': 'exact', 'gelu_pytorch_tanh': 'tanh', 'gelu_new': 'tanh', 'quick_gelu': 'quick_gelu',
        'silu': 'silu', 'swish': 'silu'}
_ACT_OUT = {'exact': 'gelu', 'tanh': 'gelu_pytorch_tanh', 'quick_gelu': 'quick_gelu', 'silu': 'silu'}


def _act(cfg, where):
    act = cfg.get('hidden_act', 'gelu')
    if not isinstance(act, str) or act not in _ACT:
        raise ConversionError(f'{where}: hidden_act={act!r} is not one vit-flax builds ({", ".join(_ACT)})')
    return _ACT[act]


def arch_from_config(mt: str, cfg: dict, cls: str, where: str, num_classes: int) -> dict:
    """vit-flax fields of the model config.json describes, for class `cls` (its head of `num_classes`)."""
    g = lambda k, d, kind=(int,): files.config_value(cfg, k, d, where, kind)   # noqa: E731
    size = lambda k, d: files.config_size(cfg, k, d, where)   # noqa: E731
    if mt in ('swin', 'swinv2'):
        depths = files.config_int_list(cfg, 'depths', [2, 2, 6, 2], where)
        heads = files.config_int_list(cfg, 'num_heads', [3, 6, 12, 24], where)
        if cfg.get('use_absolute_embeddings'):
            raise ConversionError(f'{where}: use_absolute_embeddings=true: vit-flax\'s Swin has no absolute positions')
        act = _act(cfg, where)
        if act not in ('exact', 'tanh'):
            raise ConversionError(f'{where}: hidden_act={cfg.get("hidden_act")!r}: vit-flax\'s Swin has GELU only')
        out = dict(embed_dim=g('embed_dim', 96), depths=depths, num_heads=heads, window_size=g('window_size', 7),
                   mlp_ratio=float(g('mlp_ratio', 4.0, (float,))), qkv_bias=bool(cfg.get('qkv_bias', True)),
                   patch_size=size('patch_size', 4), img_size=size('image_size', 224), in_chans=g('num_channels', 3),
                   norm_eps=float(g('layer_norm_eps', 1e-5, (float,))), gelu=act, num_classes=num_classes,
                   always_partition=False)
        if mt == 'swinv2':   # Swinv2Config: 0 is a stage's own window (the continuous bias is scaled by it)
            # (its default is four zeros whatever the depths: stage i reads entry i, the rest go unread)
            trained = cfg.get('pretrained_window_sizes', [0] * len(depths))
            if not isinstance(trained, list) or len(trained) < len(depths) or \
                    any(type(w) is not int or w < 0 for w in trained):
                raise ConversionError(f'{where}: pretrained_window_sizes={trained!r} is not a window (>= 0) for '
                                      f'each stage of depths={list(depths)}')
            out['pretrained_window_sizes'] = tuple(trained[:len(depths)])
        return out
    if mt == 'dinov3_vit':
        return _dinov3_arch(cfg, where, g, size)
    if mt == 'beit':
        return _beit_arch(cfg, where, g, size, num_classes)
    if mt in ('siglip2_vision_model', 'siglip2'):
        return _siglip2_arch(cfg, where, g, size)
    dim = g('hidden_size', 768)
    defaults = {'vit': 1e-12, 'deit': 1e-12, 'dinov2': 1e-6, 'dinov2_with_registers': 1e-6,
                'siglip_vision_model': 1e-6, 'siglip': 1e-6, 'clip_vision_model': 1e-5, 'clip': 1e-5}
    out = dict(embed_dim=dim, depth=g('num_hidden_layers', 12), num_heads=g('num_attention_heads', 12),
               img_size=size('image_size', 224), patch_size=size('patch_size', 16), in_chans=g('num_channels', 3),
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
        if cls.endswith('ForImageClassification'):   # classifier([class token, mean of the patch tokens])
            out['global_pool'] = 'token_avg'
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


def _dinov3_arch(cfg, where, g, size) -> dict:
    """Eva fields of a `dinov3_vit` config.json (transformers' DINOv3ViTConfig defaults): RoPE of DINOv3's form
    (`rope_theta` its temperature, rotate-half layout, patch tokens only), q/v biases without a k bias, LayerScale,
    a GELU MLP or (use_gated_mlp) a SwiGLU with separate gate weights, the final norm, the class token as the pooled
    output (its pooler_output), any input size (the RoPE is computed for the image's grid)."""
    def flag(key, default):
        x = cfg.get(key, default)
        if not isinstance(x, bool):
            raise ConversionError(f'{where}: {key}={x!r} is not true or false')
        return x

    regs = cfg.get('num_register_tokens', 0)
    if type(regs) is not int or regs < 0:
        raise ConversionError(f'{where}: num_register_tokens={regs!r} is not a valid value')
    q, k, v = flag('query_bias', True), flag('key_bias', False), flag('value_bias', True)
    if k or q != v:
        raise ConversionError(f'{where}: query_bias={str(q).lower()}, key_bias={str(k).lower()}, value_bias='
                              f'{str(v).lower()}: vit-flax\'s Eva holds q and v biases together and no k bias')
    for f in ('proj_bias', 'mlp_bias'):
        if not flag(f, True):
            raise ConversionError(f'{where}: {f}=false: vit-flax\'s Eva has these biases')
    gated = flag('use_gated_mlp', False)
    act = cfg.get('hidden_act', 'gelu')
    if act != ('silu' if gated else 'gelu') and not (gated and act == 'swish'):
        raise ConversionError(f'{where}: hidden_act={act!r}: vit-flax\'s Eva builds ' +
                              ("a SiLU-gated MLP (hidden_act 'silu')" if gated else "a GELU MLP (hidden_act 'gelu')"))
    dim, hidden = g('hidden_size', 384), g('intermediate_size', 1536)
    aug = {}
    for ours, theirs, d in (('rope_shift_coords', 'pos_embed_shift', None),
                            ('rope_jitter_coords', 'pos_embed_jitter', None),
                            ('rope_rescale_coords', 'pos_embed_rescale', 2.0)):
        x = cfg.get(theirs, d)
        if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float))):
            raise ConversionError(f'{where}: {theirs}={x!r} is not a number or null')
        aug[ours] = None if x is None else float(x)
    out = dict(embed_dim=dim, depth=g('num_hidden_layers', 12), num_heads=g('num_attention_heads', 6),
               img_size=size('image_size', 224), patch_size=size('patch_size', 16), in_chans=g('num_channels', 3),
               norm_eps=float(g('layer_norm_eps', 1e-5, (float,))), num_classes=0, class_token=True,
               reg_tokens=regs, global_pool='token', qkv_bias=q, qkv_fused=True,
               attn_type='eva', init_values=float(g('layerscale_value', 1.0, (float,))), use_abs_pos_emb=False,
               use_rot_pos_emb=True, rope_type='dinov3', rope_temperature=float(g('rope_theta', 100.0, (float,))),
               rope_rotate_half=True, rope_grid_offset=0.0, rope_grid_indexing='ij', dynamic_img_size=True,
               mlp_layer='swiglu' if gated else 'mlp', mlp_ratio=hidden / dim, **aug)
    if gated:   # timm's separate-gate SwiGLU is built with an alignment; 1 keeps the width as it is
        out['swiglu_align_to'] = 8 if hidden % 8 == 0 else 1
    if hidden < 1 or int(dim * out['mlp_ratio']) != hidden:
        raise ConversionError(f'{where}: intermediate_size={hidden} is not a width vit-flax\'s Eva builds from '
                              f'hidden_size={dim}')
    return out


def _siglip2_arch(cfg, where, g, size) -> dict:
    """NaFlexVit fields of a `siglip2_vision_model` config.json (transformers' Siglip2VisionConfig defaults): a
    square table of `num_patches` rows resized bilinearly with antialias per image, no prefix tokens, the MAP head
    (`vision_use_head`; without it the mean of the valid patches after the final norm), headless."""
    n = g('num_patches', 256)
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ConversionError(f'{where}: num_patches={n} is not a square grid')
    patch = g('patch_size', 16)
    act = _act(cfg, where)
    if act not in ('exact', 'tanh'):
        raise ConversionError(f'{where}: hidden_act={cfg.get("hidden_act")!r}: vit-flax\'s NaFlex ViT has GELU only')
    head = cfg.get('vision_use_head', True)
    return dict(embed_dim=g('hidden_size', 768), depth=g('num_hidden_layers', 12),
                num_heads=g('num_attention_heads', 12), mlp_dim=g('intermediate_size', 3072), patch_size=(patch, patch),
                in_chans=g('num_channels', 3), norm_eps=float(g('layer_norm_eps', 1e-6, (float,))),
                act_layer={'exact': 'gelu', 'tanh': 'gelu_tanh'}[act], pos_embed='learned',
                pos_embed_grid_size=(side, side), pos_embed_interp_mode='bilinear', pos_embed_antialias=True,
                pos_embed_ar_preserving=False, pos_embed_align_corners=False, class_token=False, reg_tokens=0,
                init_values=None, qkv_bias=True, global_pool='map' if head else 'avg', fc_norm=False,
                final_norm=True, num_classes=0, img_size=side * patch)


def _beit_arch(cfg, where, g, size, num_classes) -> dict:
    """Beit fields of a `beit` config.json (transformers' BeitConfig defaults): q/v biases, relative position bias
    per block or shared, absolute positions if asked, LayerScale when layer_scale_init_value > 0, mean pooling
    with its norm (our fc_norm) or the class token after the final norm."""
    def flag(key, default):
        x = cfg.get(key, default)
        if not isinstance(x, bool):
            raise ConversionError(f'{where}: {key}={x!r} is not true or false')
        return x

    if cfg.get('hidden_act', 'gelu') != 'gelu':
        raise ConversionError(f'{where}: hidden_act={cfg.get("hidden_act")!r}: vit-flax\'s Beit has exact GELU only')
    dim, hidden = g('hidden_size', 768), g('intermediate_size', 3072)
    ls = cfg.get('layer_scale_init_value', 0.1)
    if isinstance(ls, bool) or not isinstance(ls, (int, float)) or ls < 0:
        raise ConversionError(f'{where}: layer_scale_init_value={ls!r} is not a valid value')
    mean = flag('use_mean_pooling', True)
    out = dict(embed_dim=dim, depth=g('num_hidden_layers', 12), num_heads=g('num_attention_heads', 12),
               img_size=size('image_size', 224), patch_size=size('patch_size', 16), in_chans=g('num_channels', 3),
               norm_eps=float(g('layer_norm_eps', 1e-12, (float,))), num_classes=num_classes, qkv_bias=True,
               mlp_ratio=hidden / dim, mlp_layer='mlp', init_values=float(ls) if ls > 0 else None,
               use_abs_pos_emb=flag('use_absolute_position_embeddings', False),
               use_rel_pos_bias=flag('use_relative_position_bias', False),
               use_shared_rel_pos_bias=flag('use_shared_relative_position_bias', False),
               global_pool='avg' if mean else 'token', fc_norm=mean)
    if int(dim * out['mlp_ratio']) != hidden:
        raise ConversionError(f'{where}: intermediate_size={hidden} is not a width vit-flax\'s Beit builds from '
                              f'hidden_size={dim}')
    return out


# what a config field is called in config.json, for the vit-flax fields read off the weights
_HF_FIELD = {'embed_dim': 'hidden_size', 'depth': 'num_hidden_layers', 'mlp_dim': 'intermediate_size',
             'patch_size': 'patch_size', 'in_chans': 'num_channels', 'num_patches': 'image_size',
             'depths': 'depths', 'num_heads': 'num_heads', 'window_size': 'window_size', 'mlp_ratio': 'mlp_ratio',
             'reg_tokens': 'num_register_tokens', 'qkv_bias': 'qkv_bias', 'num_classes': 'id2label',
             'stage_windows': 'window_size', 'mlp_hidden': 'intermediate_size',
             'use_abs_pos_emb': 'use_absolute_position_embeddings', 'pos_embed_grid_size': 'num_patches'}


def _check_shapes(family, timm_state, model, mt, cfg_path) -> dict:
    """config.json against the weights' shapes (what the family reads off the timm state_dict); returns those."""
    import math
    from vit_flax.models.layers import to_tuple
    got = family.config_from_torch(timm_state)
    if mt in ('swin', 'swinv2'):   # (a ViT's heads are not in its shapes: a wrong num_attention_heads cannot be seen)
        expect = dict(embed_dim=model.embed_dim, depths=tuple(model.depths), num_heads=tuple(model.num_heads),
                      in_chans=model.in_chans, qkv_bias=model.qkv_bias, patch_size=to_tuple(model.patch_size, 2),
                      mlp_ratio=model.mlp_ratio)
        if mt == 'swin':   # (a V2's continuous bias holds no window)
            expect['stage_windows'] = tuple(w[0] for w, _ in model.stage_windows())
    elif mt == 'beit':
        expect = dict(embed_dim=model.embed_dim, depth=model.depth, mlp_hidden=model.mlp_hidden,
                      patch_size=to_tuple(model.patch_size, 2), in_chans=model.in_chans, qkv_bias=model.qkv_bias,
                      use_abs_pos_emb=model.use_abs_pos_emb)
    elif mt in ('siglip2_vision_model', 'siglip2'):
        expect = dict(embed_dim=model.embed_dim, depth=model.depth, mlp_dim=model.mlp_hidden,
                      patch_size=to_tuple(model.patch_size, 2), in_chans=model.in_chans,
                      pos_embed_grid_size=tuple(model.pos_embed_grid_size))
    elif mt == 'dinov3_vit':   # (an Eva's config_from_torch names the MLP width mlp_hidden, and has no positions)
        expect = dict(embed_dim=model.embed_dim, depth=model.depth, mlp_hidden=model.mlp_hidden,
                      patch_size=to_tuple(model.patch_size, 2), in_chans=model.in_chans, reg_tokens=model.reg_tokens,
                      qkv_bias=model.qkv_bias)
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
    return got



# ---------------------------------------------------------------- reading

def registered_model(family, shapes: dict, want: dict, where: str, model_name=None, arch=None):
    """(registered name, model) for a file whose weights give `shapes` (the family's `config_from_*`) and whose
    config.json gives `want`: the pipeline's matcher (`checkpoint.match_model`) on the shapes, the heads and what
    config.json records beside them (eps, activation, input size: a registered name that has them is preferred),
    then every field of `want` set on the model."""
    from .checkpoint import match_model
    said = ('norm_eps', 'act_layer', 'gelu', 'img_size') + (('window_size', 'pretrained_window_sizes')
                                                           if family.name == 'swinv2' else ())
    recorded = dict(shapes, num_heads=want['num_heads'], img_size_hint=want['img_size'],
                    **{k: want[k] for k in said if k in want})
    name, model = match_model(family, recorded, where, model_name, arch)
    return name, model.clone(**field_overrides(model, want))


def read_folder(folder: str, model_name: Optional[str] = None, arch: Optional[dict] = None) -> dict:
    """A transformers folder decoded: {raw (the file's arrays), format, weights (the file read), family, name
    (registered), model, flat (the Flax tree), notes (what config.json decided, for stderr), class_names, cls
    (the transformers class its keys are), spelling ('hub' | 'internal')}. `model_name` pins the registered
    base, `arch` overrides fields (as `pipeline.match_model`).

    config.json describes the model (`want`): its structure picks the key table, whose timm state_dict must have
    config.json's sizes; the registered name is the pipeline's match for those sizes (with the heads and what
    config.json records beside: eps, activation), config.json's fields set on it."""
    import os
    import vit_flax
    from . import rules
    from .checkpoint import check_model_class
    folder = os.path.abspath(folder)
    cfg_path, cfg = files.read_config(folder)
    mt, vcfg = files.vision_config(cfg, cfg_path)
    raw, fmt, weights = files.read_weights(folder)
    cls = files.class_of(mt, raw, cfg_path)
    n = files.head_size(cls, raw, cfg, vcfg, cfg_path)
    family, kind, _ = family_of_class(cls)
    want = arch_from_config(mt, vcfg, cls, cfg_path, n)
    want.update(arch or {})
    prefix = prefix_of(cls, raw)
    hf_depth = files.blocks_held(raw, prefix)
    if kind not in ('swin', 'swinv2') and hf_depth != want['depth']:
        raise ConversionError(f'{cfg_path}: num_hidden_layers={want["depth"]}, but the weights hold {hf_depth} blocks')
    if kind in ('swin', 'swinv2') and hf_depth != len(want['depths']):
        raise ConversionError(f'{cfg_path}: depths={list(want["depths"])} has {len(want["depths"])} stages, but the '
                              f'weights hold {hf_depth}')
    if model_name:
        check_model_class(family, model_name, cfg_path, kind)
    plain = family.module_cls()
    described = plain.clone(**field_overrides(plain, want))   # the model config.json describes: its key table's
    dropped = [k for k in raw if not k.startswith(prefix) and not files.is_head_key(k, cls)]
    state = {k: v for k, v in raw.items() if k not in dropped
             and not (k.endswith('embeddings.register_tokens') and 0 in np.shape(v))}   # DINOv3's, with none
    timm_state, spelling, err = None, None, None
    for sp in SPELLINGS:
        try:
            timm_state = rules.torch_to_flax(state, table(described, cls, sp, prefix), ignore=IGNORE)
            spelling = sp
            break
        except ConversionError as e:
            err = err or e
    if timm_state is None:
        flipped = described.clone(qkv_bias=not described.qkv_bias)
        for sp in SPELLINGS:   # the keys fit once q/k/v biases are (not) there: config.json's qkv_bias is wrong
            try:
                rules.torch_to_flax(state, table(flipped, cls, sp, prefix), ignore=IGNORE)
            except ConversionError:
                continue
            raise ConversionError(f'{cfg_path}: qkv_bias={str(described.qkv_bias).lower()}, but the weights '
                                  f'{"lack" if described.qkv_bias else "hold"} query/key/value biases')
        raise ConversionError(f'{weights}: {err}')
    try:
        shapes = _check_shapes(family, timm_state, described, mt, cfg_path)
        name, model = registered_model(family, shapes, want, cfg_path, model_name, arch)
        flat = rules.torch_to_flax(timm_state, family.rules(model), ignore=family.ignore_torch)
    except (KeyError, IndexError, ValueError) as e:
        raise ConversionError(f'{weights}: malformed checkpoint ({e})') from None
    except ConversionError as e:
        if str(e).startswith(cfg_path):
            raise
        raise ConversionError(f'{weights}: {e}') from None
    over = field_overrides(vit_flax.create_model(name, **((arch or {}) if model_name else {})), want)
    notes = [f'{cfg_path}: model_type {mt} ({cls}) is {name}' +
             (f' with {", ".join(f"{k}={v!r}" for k, v in over.items())}' if over else '')]
    if dropped:
        notes.append(f'{cfg_path}: {len(dropped)} arrays outside the vision tower ignored '
                     f'({", ".join(sorted({k.split(".")[0] for k in dropped})[:4])})')
    if any(k.endswith('embeddings.mask_token') for k in state):
        notes.append('embeddings.mask_token dropped (used only by masked-image training; written back as zeros)')
    if kind in ('swin', 'swinv2') and model.norm_eps != 1e-5:
        notes.append(f'warning: {cfg_path}: layer_norm_eps={model.norm_eps}: transformers uses it in the blocks and '
                     f'the final norm only (its patch embedding and merging norms keep 1e-5); vit-flax\'s Swin uses '
                     f'it in every norm (outputs ~1e-4 relative apart)')
    flat = family.unstore(flat, model)
    return dict(raw=raw, format=fmt, weights=weights, family=family, name=name, model=model, flat=flat,
                notes=notes, class_names=files.labels(cfg, n) if 'CLIP' not in cls else None, cls=cls,
                spelling=spelling)


# ---------------------------------------------------------------- writing

def target_class(model) -> str:
    """The transformers class that holds `model` (its head, tokens and norms decide); `check_holds` then
    refuses what the class cannot hold."""
    if type(model).__name__ == 'Eva':   # `check_holds` refuses what DINOv3's backbone cannot hold
        return 'DINOv3ViTModel'
    if type(model).__name__ == 'Beit':
        return 'BeitForImageClassification' if model.num_classes else 'BeitModel'
    if type(model).__name__ == 'NaFlexVit':   # `check_holds` refuses what SigLIP 2's tower cannot hold
        return 'Siglip2VisionModel'
    if not hasattr(model, 'depths') and not hasattr(model, 'pre_norm'):   # vit-pytorch's ViT, MLP-Mixer: no class
        raise ConversionError(f'transformers has no class for a {type(model).__name__}; write .pth, .safetensors '
                              f'or .npz instead')
    if type(model).__name__ == 'SwinTransformerV2':
        return 'Swinv2ForImageClassification' if model.num_classes else 'Swinv2Model'
    if hasattr(model, 'depths'):
        return 'SwinForImageClassification' if model.num_classes else 'SwinModel'
    if model.pre_norm:
        return 'CLIPVisionModelWithProjection' if model.num_classes else 'CLIPVisionModel'
    if not model.has_class_token or model.pool_type == 'map':
        return 'SiglipVisionModel'
    if model.init_values and model.pool_type == 'token_avg' and not model.distilled:
        return 'Dinov2WithRegistersForImageClassification' if model.reg_tokens else 'Dinov2ForImageClassification'
    if model.init_values and not model.num_classes and not model.distilled:   # with a head: ViT's, refused
        return 'Dinov2WithRegistersModel' if model.reg_tokens else 'Dinov2Model'
    if model.distilled:
        return 'DeiTForImageClassificationWithTeacher'
    base = 'DeiT' if model.reg_tokens == 1 and not model.no_embed_class else 'ViT'
    if model.representation_size and not model.num_classes:
        return f'{base}Model'
    return f'{base}ForImageClassification'   # num_labels 0: an identity classifier (the pooled features)


_MODEL_TYPE = {'vit': 'vit', 'deit': 'deit', 'siglip': 'siglip_vision_model', 'clip': 'clip_vision_model',
               'swin': 'swin', 'swinv2': 'swinv2'}


def config_for(model, cls: str, class_names=None) -> dict:
    """config.json of class `cls` for `model` (keys both transformers 4.4x and 5.x read)."""
    from vit_flax.models.layers import to_tuple
    kind = _kind(cls)
    if kind == 'dinov3':
        cfg = _dinov3_config(model, cls)
    elif kind == 'siglip2':
        patch = to_tuple(model.patch_size, 2)
        gh, gw = model.pos_embed_grid_size
        if patch[0] != patch[1] or gh != gw:
            raise ConversionError(f'transformers\' {cls} takes square patches and a square position table; this '
                                  f'model has patch_size={model.patch_size}, pos_embed_grid_size={(gh, gw)}')
        cfg = dict(model_type='siglip2_vision_model', hidden_size=model.embed_dim, intermediate_size=model.mlp_hidden,
                   num_hidden_layers=model.depth, num_attention_heads=model.num_heads, num_channels=model.in_chans,
                   patch_size=patch[0], num_patches=gh * gw, layer_norm_eps=model.norm_eps,
                   hidden_act=_ACT_OUT[model.gelu], attention_dropout=0.0,
                   vision_use_head=model.global_pool == 'map')
    elif kind == 'beit':
        cfg = _beit_config(model, cls)
    elif kind in ('swin', 'swinv2'):
        patch, img = to_tuple(model.patch_size, 2), to_tuple(model.img_size, 2)
        win = model.window_size if isinstance(model.window_size, int) else tuple(model.window_size)
        win = to_tuple(win, 2) if isinstance(win, int) or len(win) == 2 else win
        if patch[0] != patch[1] or img[0] != img[1] or len(win) != 2 or win[0] != win[1]:
            raise ConversionError(f'transformers\' {cls} takes square images, patches and one square window; this '
                                  f'model has img_size={model.img_size}, patch_size={model.patch_size}, '
                                  f'window_size={model.window_size}')
        cfg = dict(model_type=kind, embed_dim=model.embed_dim, depths=list(model.depths),
                   num_heads=list(model.num_heads), window_size=win[0], mlp_ratio=float(model.mlp_ratio),
                   qkv_bias=model.qkv_bias, patch_size=patch[0], image_size=img[0], num_channels=model.in_chans,
                   layer_norm_eps=model.norm_eps, hidden_act=_ACT_OUT[model.gelu], use_absolute_embeddings=False,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.1,
                   num_layers=len(model.depths), hidden_size=int(model.embed_dim * 2 ** (len(model.depths) - 1)))
        if kind == 'swinv2':
            cfg['pretrained_window_sizes'] = [int(w) for w in model.pretrained_window_sizes]
    else:
        patch, img = to_tuple(model.patch_size, 2), to_tuple(model.img_size, 2)
        if patch[0] != patch[1] or img[0] != img[1]:
            raise ConversionError(f'transformers\' {cls} takes square images and patches; this model has '
                                  f'img_size={model.img_size}, patch_size={model.patch_size}')
        act = model.activation
        if act not in _ACT_OUT:
            raise ConversionError(f'transformers\' {cls} cannot hold activation {act!r}')
        mt = 'dinov2_with_registers' if cls.startswith('Dinov2WithRegisters') else 'dinov2' if kind == 'dinov2' \
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


def _dinov3_config(model, cls: str) -> dict:
    """config.json of transformers' DINOv3ViTConfig for an Eva (`check_holds` refuses what it cannot hold)."""
    from vit_flax.models.layers import to_tuple
    patch, img = to_tuple(model.patch_size, 2), to_tuple(model.img_size, 2)
    if patch[0] != patch[1] or img[0] != img[1]:
        raise ConversionError(f'transformers\' {cls} takes square images and patches; this model has '
                              f'img_size={model.img_size}, patch_size={model.patch_size}')
    gated = model.mlp_layer == 'swiglu'
    return dict(model_type='dinov3_vit', hidden_size=model.embed_dim, intermediate_size=model.mlp_hidden,
                num_hidden_layers=model.depth, num_attention_heads=model.num_heads,
                hidden_act='silu' if gated else 'gelu', use_gated_mlp=gated, image_size=img[0], patch_size=patch[0],
                num_channels=model.in_chans, layer_norm_eps=model.norm_eps, rope_theta=model.rope_temperature,
                query_bias=model.qkv_bias, key_bias=False, value_bias=model.qkv_bias, proj_bias=True, mlp_bias=True,
                layerscale_value=float(model.init_values) if model.init_values is not None else 1.0,
                num_register_tokens=model.reg_tokens, pos_embed_shift=model.rope_shift_coords,
                pos_embed_jitter=model.rope_jitter_coords, pos_embed_rescale=model.rope_rescale_coords,
                attention_dropout=0.0, drop_path_rate=0.0)


def _beit_config(model, cls: str) -> dict:
    """config.json of transformers' BeitConfig for a Beit (`check_holds` refuses what it cannot hold)."""
    from vit_flax.models.layers import to_tuple
    patch, img = to_tuple(model.patch_size, 2), to_tuple(model.img_size, 2)
    if patch[0] != patch[1] or img[0] != img[1]:
        raise ConversionError(f'transformers\' {cls} takes square images and patches; this model has '
                              f'img_size={model.img_size}, patch_size={model.patch_size}')
    return dict(model_type='beit', hidden_size=model.embed_dim, intermediate_size=model.mlp_hidden,
                num_hidden_layers=model.depth, num_attention_heads=model.num_heads, hidden_act='gelu',
                image_size=img[0], patch_size=patch[0], num_channels=model.in_chans, layer_norm_eps=model.norm_eps,
                use_mask_token=False, use_absolute_position_embeddings=model.use_abs_pos_emb,
                use_relative_position_bias=model.use_rel_pos_bias,
                use_shared_relative_position_bias=model.use_shared_rel_pos_bias,
                layer_scale_init_value=float(model.init_values) if model.init_values else 0.0,
                use_mean_pooling=model.use_fc_norm, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                drop_path_rate=0.0)


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
_HELD = {'NaFlexVit': [
    ('embed_dim', 'the width'), ('depth', 'the depth'), ('num_heads', 'the heads'), ('mlp_hidden', 'the MLP width'),
    ('patch_size_tuple', 'the patch'), ('in_chans', 'the input channels'), ('qkv_bias', 'qkv_bias'),
    ('norm_eps', 'this norm eps'), ('act_layer', 'this activation'), ('pos_embed', 'this position embedding'),
    ('pos_embed_grid_size', 'this position table'), ('pos_embed_interp_mode', 'this position resize'),
    ('pos_embed_antialias', 'this position resize'), ('pos_embed_ar_preserving', 'an aspect-preserving resize'),
    ('pos_embed_align_corners', 'align_corners'), ('class_token', 'a class token'), ('reg_tokens', 'register tokens'),
    ('init_values', 'LayerScale'), ('global_pool', 'this pooling'), ('use_fc_norm', 'this pooling norm'),
    ('final_norm', 'no final norm'), ('num_classes', 'a classifier head')],
    'VisionTransformer': [
    ('embed_dim', 'the width'), ('depth', 'the depth'), ('num_heads', 'the heads'), ('mlp_hidden', 'the MLP width'),
    ('patch_size_tuple', 'the patch'), ('in_chans', 'the input channels'), ('qkv_bias', 'qkv_bias'),
    ('qk_scale', 'a custom attention scale'), ('representation_size', 'a pre_logits layer'),
    ('pool_type', 'this pooling'), ('has_class_token', 'the class token'), ('distilled', 'a distillation head'),
    ('embed_norm', 'a patch-embedding norm'), ('activation', 'this activation'), ('norm_eps', 'this norm eps'),
    ('spatial_dims', '1-D patches'), ('resnet', 'a ResNet stem'), ('posemb', 'fixed sincos2d positions'),
    ('resnet_d', 'a ResNet-D stem'), ('mci_stem', 'an MCI stem'), ('attn_layer', 'differential attention'),
    ('norm_layer', 'RmsNorm'), ('init_values', 'LayerScale'), ('reg_tokens', 'register tokens'),
    ('no_embed_class', 'positions for the patches only'), ('pre_norm', 'a pre-norm'), ('final_norm', 'no final norm'),
    ('use_fc_norm', 'a norm after pooling (fc_norm)'), ('proj_bias', 'no projection biases'),
    ('qk_norm', 'q/k norms'), ('scale_attn_norm', 'an attention scale norm'), ('scale_mlp_norm', 'an MLP norm'),
    ('mlp_layer', 'this MLP'), ('block_fn', 'this block'), ('num_classes', 'a classifier head'),
    ('dynamic_img_size', 'dynamic image sizes')],
    'Eva': [
        ('embed_dim', 'the width'), ('depth', 'the depth'), ('num_heads', 'the heads'), ('num_kv_heads', 'GQA'),
        ('mlp_layer', 'this MLP'), ('mlp_hidden', 'the MLP width'), ('patch_size_tuple', 'the patch'),
        ('in_chans', 'the input channels'), ('qkv_bias', 'qkv_bias'), ('qkv_fused', 'separate q/k/v weights'),
        ('attn_type', 'this attention'), ('qk_norm', 'q/k norms'), ('scale_attn_norm', 'an attention sub-norm'),
        ('scale_mlp_norm', 'an MLP sub-norm'), ('norm_layer', 'RmsNorm'), ('norm_eps', 'this norm eps'),
        ('init_values', 'no LayerScale'), ('attn_only_layer_scale', 'attention-only LayerScale'),
        ('block_fn', 'post-norm blocks'), ('pre_norm', 'a pre-norm'), ('class_token', 'no class token'),
        ('reg_tokens', 'this many register tokens'), ('use_abs_pos_emb', 'absolute positions'),
        ('use_rot_pos_emb', 'no RoPE'), ('rope_type', 'this RoPE'), ('rope_temperature', 'this RoPE temperature'),
        ('rope_rotate_half', 'interleaved RoPE'), ('rope_grid_offset', 'a RoPE grid offset'),
        ('rope_grid_indexing', 'this RoPE grid indexing'), ('use_fc_norm', 'a norm after pooling (fc_norm)'),
        ('use_final_norm', 'no final norm'), ('num_classes', 'a classifier head')],
    'Beit': [
        ('embed_dim', 'the width'), ('depth', 'the depth'), ('num_heads', 'the heads'), ('mlp_layer', 'this MLP'),
        ('mlp_hidden', 'the MLP width'), ('scale_mlp_norm', 'an MLP sub-norm'), ('patch_size', 'the patch'),
        ('in_chans', 'the input channels'), ('qkv_bias', 'qkv_bias'), ('norm_eps', 'this norm eps'),
        ('init_values', 'LayerScale'), ('use_abs_pos_emb', 'absolute positions'),
        ('use_rel_pos_bias', 'a relative position bias per block'),
        ('use_shared_rel_pos_bias', 'a shared relative position bias'), ('global_pool', 'this pooling'),
        ('use_fc_norm', 'this pooling norm'), ('num_classes', 'a classifier head')],
    'SwinTransformer': [('embed_dim', 'the width'), ('depths', 'the depths'), ('num_heads', 'the heads'),
                        ('window_size', 'the window'), ('mlp_ratio', 'the MLP ratio'), ('qkv_bias', 'qkv_bias'),
                        ('qk_scale', 'a custom attention scale'), ('in_chans', 'the input channels'),
                        ('norm_eps', 'this norm eps'), ('gelu', 'this GELU'), ('num_classes', 'a classifier head'),
                        ('always_partition', 'always_partition')],
    'SwinTransformerV2': [('embed_dim', 'the width'), ('depths', 'the depths'), ('num_heads', 'the heads'),
                          ('window_size', 'the window'), ('pretrained_window_sizes', 'the pretrained windows'),
                          ('mlp_ratio', 'the MLP ratio'), ('qkv_bias', 'qkv_bias'), ('in_chans', 'the input channels'),
                          ('norm_eps', 'this norm eps'), ('gelu', 'this GELU'), ('num_classes', 'a classifier head'),
                          ('always_partition', 'always_partition')]}


def _value(model, k):
    v = getattr(model, k)
    if k == 'init_values':
        return bool(v)
    if k in ('window_size', 'patch_size') and not isinstance(v, (tuple, list)):
        return (v, v)
    return tuple(v) if isinstance(v, list) else v


def check_holds(model, cls: str, cfg: dict) -> None:
    """Refuse (one line naming it) what `cls` built from `cfg` would not compute as `model` does: the config
    read back as on `read_folder` must give the same model."""
    mt, vcfg = files.vision_config(cfg, 'config.json')
    n = model.num_classes if 'CLIP' not in cls else (model.num_classes if cls.endswith('Projection') else 0)
    want = arch_from_config(mt, vcfg, cls, 'config.json', n)
    base = family_of_class(cls)[0].module_cls()   # what the config leaves unsaid: the plain model
    back = base.clone(**field_overrides(base, want))
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
    if _kind(cls) in ('dinov2', 'dinov3'):   # DINOv2's is (1, D), DINOv3's (1, 1, D)
        shape = (1, model.embed_dim) if _kind(cls) == 'dinov2' else (1, 1, model.embed_dim)
        e = family_of_class(cls)[2] + 'embeddings.'
        state[e + 'mask_token'] = np.zeros(shape, state[e + 'cls_token'].dtype)
    if _kind(cls) == 'dinov3' and not model.reg_tokens:   # DINOv3ViTModel holds an empty (1, 0, D) parameter
        state['embeddings.register_tokens'] = np.zeros((1, 0, model.embed_dim), state['embeddings.cls_token'].dtype)
    return state


def write_folder(timm_state, model, path: str, class_names=None, force: bool = False, log: Log = print) -> str:
    """config.json + model.safetensors (Hub spelling) that transformers' class for `model` loads with
    `from_pretrained(path)` and no missing, unexpected or mismatched keys. Returns the class written."""
    cls = target_class(model)
    cfg = config_for(model, cls, class_names)
    check_holds(model, cls, cfg)
    if cls == 'DINOv3ViTModel' and model.global_pool != 'token':
        log(f'transformers: {cls}\'s pooler_output is the normed class token; this model pools '
            f'{model.global_pool!r} (its last_hidden_state holds the same tokens); read back, it pools the token')
    state = hf_state(timm_state, model, cls)
    dtypes = {str(np.asarray(v).dtype) for v in state.values()}
    cfg['torch_dtype'] = cfg['dtype'] = next(iter(dtypes)) if len(dtypes) == 1 else 'float32'   # --dtype bfloat16
    files.write(state, cfg, path, force)
    log(f'transformers: {cls} (model_type {cfg["model_type"]}), {len(state)} arrays in the Hub\'s key spelling')
    return cls


__all__ = ['is_transformers_folder', 'read_folder', 'write_folder', 'table', 'target_class',
           'config_for', 'arch_from_config']
