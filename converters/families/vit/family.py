"""The ViT rule table (Flax <-> timm, one table for both directions) and `ViTFamily`: detection, the
architecture read off a checkpoint, matching, surgery (positions, the patch kernel), with the layouts of
npz.py and releases.py and the hybrid stem of hybrid.py."""
import re
from dataclasses import dataclass
from typing import Callable, List, Tuple

import ml_dtypes
import numpy as np

from vit_flax.models.posemb import sincos2d
from vit_flax.models.vit import VisionTransformer

from ...errors import ConversionError
from ...resample import resample_patch_kernel, resample_pos_embed
from ...rules import (CONV, Rule, Transform, attention_out_rules, dense_rules, heads_in, heads_out, map_head_rules,
                      mlp_rules, norm_rules, rule)
from ...scan import SCANNED, is_scanned
from ..base import Family, field_overrides
from . import transformers
from .npz import LAYOUTS, detect_prefix, flax_to_npz, npz_to_flax
from .hybrid import (TORCH_PREFIX, mci_rules, resnet_d_rules, resnet_from_flax, resnet_from_torch, resnet_label,
                     resnet_rules, stem_from_flax, stem_from_torch, timm_backbone, timm_resnet_d)
from .releases import (deit3_to_timm, dinov2_to_timm, is_open_clip, open_clip_to_timm, timm_to_deit3,
                       timm_to_dinov2, timm_to_open_clip)


# ---------------------------------------------------------------- the rule table and the architecture

POS_KEY = 'Transformer/posembed_input/pos_embedding'


@dataclass(frozen=True)
class TimmRef:
    """A timm class (with keyword arguments) named where timm is not installed: compares by name and
    arguments, as `timm_folder_config` compares a model's timm arguments with its registered name's, and is no
    JSON value (such an argument cannot be written to a timm folder's config.json either way)."""
    name: str
    kwargs: tuple = ()


def _timm_ref(module: str, name: str, **kwargs):
    """timm's `module.name` (a functools.partial with `kwargs`), or a `TimmRef` where timm is absent. A
    hybrid's `backbone=('resnet', layers, in_chans)` is built as timm's own ResNetV2 for those layers,
    `('resnet_d', layers, in_chans)` as its features_only ResNet-D, `('mci', width, in_chans)` as MobileCLIP's
    ConvStem."""
    import importlib
    from functools import partial
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        return TimmRef(name, tuple(sorted(kwargs.items())))
    if 'backbone' in kwargs:
        kind, arg, in_chans = kwargs['backbone']
        if kind == 'mci':
            import torch.nn
            from timm.models.vision_transformer_hybrid import ConvStem
            backbone = ConvStem(channels=(arg // 4, arg // 4, arg), stride=(4, 2, 2), kernel_size=(4, 2, 2),
                                padding=0, in_chans=in_chans, act_layer=torch.nn.GELU)
        else:
            backbone = (timm_resnet_d if kind == 'resnet_d' else timm_backbone)(arg, in_chans)
        kwargs = dict(kwargs, backbone=backbone)
    return partial(cls, **kwargs) if kwargs else cls


def _fc1_and_heads(num_heads: int, dim: int, kernel: bool = True) -> Transform:
    """ParallelScalingBlock's `in_proj` (timm): the MLP's first Linear and q, k, v fused, in that order, as one
    Linear ((hidden + 3D, D), or its bias) <-> MlpBlock's Dense_0 and attention's query/key/value."""
    qkv = heads_in(num_heads, 3, kernel)

    def to_torch(arrays):
        fc1 = arrays[0].T if kernel else arrays[0]
        return [np.concatenate([fc1] + qkv.to_torch(arrays[1:]), axis=0)]

    def to_flax(arrays):
        (w,) = arrays
        hidden = w.shape[0] - 3 * dim
        fc1 = w[:hidden].T if kernel else w[:hidden]
        return [np.ascontiguousarray(fc1)] + qkv.to_flax([w[hidden:]])

    return Transform(f'fc1_and_heads(h={num_heads},{"kernel" if kernel else "bias"})', to_torch, to_flax)


def _heads_and_fc2(num_heads: int) -> Transform:
    """DiffParallelScalingBlock's `out_proj` (timm): attention's output projection and the MLP's second Linear
    fused, in that order, as one Linear (D, D + hidden) <-> attention's `out` (H, Dh, D) and `Dense_1` (hidden, D)."""
    out = heads_out(num_heads)

    def to_torch(arrays):
        return [np.concatenate(out.to_torch(arrays[:1]) + [arrays[1].T], axis=1)]

    def to_flax(arrays):
        (w,) = arrays
        dim = w.shape[0]
        return out.to_flax([w[:, :dim]]) + [np.ascontiguousarray(w[:, dim:].T)]

    return Transform(f'heads_and_fc2(h={num_heads})', to_torch, to_flax)


def _diff_rules(mha: str, torch: str) -> List[Rule]:
    """Differential attention's own params (timm DiffAttention, DiffParallelScalingBlock): the four lambda
    vectors and `sub_norm` (an RmsNorm)."""
    return [rule(f'{mha}/{n}', f'{torch}.{n}') for n in ('lambda_q1', 'lambda_k1', 'lambda_q2', 'lambda_k2')] + \
        [rule(f'{mha}/sub_norm/scale', f'{torch}.sub_norm.weight')]


def _mlp(flax: str, torch: str, kind: str, bias: bool) -> List[Rule]:
    """timm's Mlp and SwiGLUPacked (fc1, fc2) or SwiGLU (fc1_g, fc1_x, fc2) <-> MlpBlock's Dense_0, Dense_1
    (and Dense_gate)."""
    if kind == 'swiglu':
        return (dense_rules(f'{flax}/Dense_gate', f'{torch}.fc1_g', bias) + dense_rules(f'{flax}/Dense_0', f'{torch}.fc1_x', bias)
                + dense_rules(f'{flax}/Dense_1', f'{torch}.fc2', bias))
    return dense_rules(f'{flax}/Dense_0', f'{torch}.fc1', bias) + dense_rules(f'{flax}/Dense_1', f'{torch}.fc2', bias)


def _count(keys, pattern):
    import re
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys for m in [rx.match(k)] if m})


def _check_kernel(kernel, key):
    if kernel.ndim not in (3, 4):
        raise ValueError(f'{key} has shape {kernel.shape}: a 1-D or 2-D convolution kernel has 3 or 4 dims')


def _as_standard_block(state):
    """(state, block_fn): block 0 of a ParallelThingsBlock or ParallelScalingBlock state_dict also under the
    names a timm Block has (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1/fc2), so that one reader takes all
    three; 'block' stands for Block and ResPostBlock alike (their keys are the same)."""
    t = 'blocks.0.'
    if f'{t}attns.0.norm.weight' in state:
        pairs = [('attns.0.norm.', 'norm1.'), ('attns.0.attn.', 'attn.'), ('attns.0.ls.', 'ls1.'),
                 ('ffns.0.norm.', 'norm2.'), ('ffns.0.mlp.', 'mlp.')]
        kind = 'parallel_things'
    elif f'{t}in_proj.weight' in state:
        w = state[f'{t}in_proj.weight']
        dim = w.shape[1]
        view = {f'{t}attn.qkv.weight': w[-3 * dim:], f'{t}mlp.fc1.weight': w[:-3 * dim]}
        if f'{t}in_proj.bias' in state:
            view[f'{t}attn.qkv.bias'] = state[f'{t}in_proj.bias'][-3 * dim:]
        if f'{t}out_proj.weight' in state:   # DiffParallelScalingBlock: one out_proj over [attention, MLP]
            w = state[f'{t}out_proj.weight']
            view.update({f'{t}attn.proj.weight': w[:, :dim], f'{t}mlp.fc2.weight': w[:, dim:]})
            if f'{t}out_proj.bias' in state:
                view[f'{t}attn.proj.bias'] = state[f'{t}out_proj.bias']
        pairs = [('in_norm.', 'norm1.'), ('in_norm.', 'norm2.'), ('attn_out_proj.', 'attn.proj.'),
                 ('mlp_out_proj.', 'mlp.fc2.'), ('q_norm.', 'attn.q_norm.'), ('ls.', 'ls1.'),
                 ('lambda_q1', 'attn.lambda_q1')]
        state = {**state, **view}
        kind = 'parallel_scaling'
    else:
        return state, 'block'
    extra = {}
    for k, v in state.items():
        for a, b in pairs:
            if k.startswith(t + a):
                extra[t + b + k[len(t + a):]] = v
    return {**state, **extra}, kind


def _packed(hidden: int, fc2_in: int) -> str:
    """'swiglu_packed' when the second Linear reads half of what the first writes (timm's GluMlp), else 'mlp'."""
    return 'swiglu_packed' if fc2_in * 2 == hidden else 'mlp'


def _is_square(n: int) -> bool:
    return n > 0 and int(round(n ** 0.5)) ** 2 == n


def _positions(cfg: dict, table) -> dict:
    """`num_patches`, `no_embed_class` and `posemb` from the stored table (None: a file without one, big_vision's
    sincos2d). A table with a row per prefix token besides the patches covers them (timm's default); one whose
    length is a square grid while that length less the prefix is not has rows for the patches only
    (`no_embed_class`, DeiT III, FlexiViT, the register models). With no prefix tokens the two agree."""
    prefix = int(cfg['class_token']) + int(cfg['distilled']) + int(cfg.get('reg_tokens', 0))
    rows = None if table is None else table.shape[1]
    no_embed = bool(prefix) and rows is not None and cfg.get('spatial_dims', 2) == 2 and _is_square(rows) \
        and not _is_square(rows - prefix)
    cfg['no_embed_class'] = no_embed
    cfg['num_patches'] = None if rows is None else rows - (0 if no_embed else prefix)
    skip = 0 if no_embed else prefix
    cfg['posemb'] = 'sincos2d' if table is None or is_sincos2d_table(table, skip) else 'learn'
    return cfg


def _same_pooling(cfg: dict, model) -> bool:
    """Whether `model` pools as a file read by `_pooling` does: the same head, and for a reduction over the
    patches ('avg', 'avgmax', 'max') the final norm on the same side of it."""
    read, pool = cfg['global_pool'], model.pool_type
    if read in ('avg', 'gap'):
        after = model.use_fc_norm and model.final_norm
        return pool in ('avg', 'avgmax', 'max') and (not cfg['final_norm'] or after == (read == 'avg'))
    return read == pool or (read == 'token' and pool == '')


def _pooling(cfg: dict, map_head: bool, encoder_norm: bool, fc_norm: bool, head_in=None) -> dict:
    """`global_pool` and `final_norm` from the heads and norms a file holds: a MAP head is 'map'; a norm after
    pooling (timm `fc_norm`) is 'avg'; no class token (and no such norm) is 'gap' (timm's avg with
    fc_norm=False); a head `head_in` = 2 * embed_dim wide over a class token is 'token_avg' (DINOv2's linear
    classifier); else 'token'. The file cannot tell avg from max or avgmax, nor a class token read by
    'token' from one left out by '' (the registered name or --set decides those)."""
    cfg['final_norm'] = encoder_norm or fc_norm
    cfg['global_pool'] = 'map' if map_head else 'avg' if fc_norm else 'gap' if not cfg['class_token'] else 'token'
    if cfg['global_pool'] == 'token' and not cfg.get('representation_size') and head_in == 2 * cfg['embed_dim'] \
            and not cfg.get('distilled'):
        cfg['global_pool'] = 'token_avg'
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


VIT_CORE = ('embed_dim', 'depth', 'patch_size', 'mlp_dim', 'spatial_dims', 'num_heads')


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


class ViTFamily(Family):
    """`vit_flax.VisionTransformer`: ViT, DeiT, R+ViT hybrids, SigLIP towers, 1-D ViTs, and timm's other ViTs
    (DINOv2, CLIP, DeiT III, ...). Torch layouts: timm's (the rule table's), facebookresearch/dinov2's hub files,
    OpenAI / open_clip image towers and DeiT III's own files, detected from the keys and written with
    `--layout dinov2|open_clip|deit3`."""
    name = 'vit'
    module_cls = VisionTransformer
    # (not no_embed_class: the table's rows say it, and Google's layouts store it as zero prefix rows)
    recorded_fields = ('num_heads', 'qk_scale', 'norm_eps', 'norm_layer', 'gelu', 'act_layer', 'global_pool',
                       'fc_norm', 'class_token', 'posemb', 'resnet_numerics', 'block_fn', 'dynamic_img_size',
                       'img_size')
    pos_key = POS_KEY
    npz_layouts = LAYOUTS
    layouts = {'dinov2': (dinov2_to_timm, timm_to_dinov2), 'open_clip': (open_clip_to_timm, timm_to_open_clip),
               'deit3': (deit3_to_timm, timm_to_deit3)}
    layout_models = ('dinov2', 'open_clip', 'deit3')   # writers that take the model too (their checks need it)
    # the width of every head in DINOv2's and open_clip's files whose sizes no registered name has (the larger
    # open_clip towers, 80- to 104-wide, are registered: their names give their heads)
    head_width = {'dinov2': 64, 'open_clip': 64}
    torch_wrap = {'deit3': 'model'}                    # as DeiT III's own training script saves
    adaptable = ('patch_size',)               # FlexiViT's PI-resize of the patch embedding (`adapt`)
    transformers_classes = transformers.CLASSES

    def transformers_table(self, model, cls: str, spelling: str, prefix: str) -> List[Rule]:
        return transformers.table(model, cls, spelling, prefix)

    def detect_layout(self, state) -> str:
        """'dinov2' (a `mask_token`, or `register_tokens`), 'open_clip' (`class_embedding` beside `conv1`, with or
        without `visual.`), 'deit3' (`gamma_1`), else 'timm'."""
        if is_open_clip(state):
            return 'open_clip'
        if 'mask_token' in state or 'register_tokens' in state:
            return 'dinov2'
        if 'blocks.0.gamma_1' in state:
            return 'deit3'
        return 'timm'

    def resolve(self, cfg: dict, arch, layout: str, model_name, path: str):
        """What a release's file does not record, said out loud: open_clip files give no activation (open_clip's
        default GELU unless --set act_layer=quick_gelu, which OpenAI's weights need); DINOv2's mask token is
        dropped and a register model's class position row is folded into the token."""
        cfg, arch, notes = dict(cfg), dict(arch or {}), []
        heads = self.heads_by_convention(cfg, arch, layout, model_name, path)
        notes += [heads] if heads else []
        if layout == 'open_clip':
            if 'act_layer' not in arch:
                arch['act_layer'] = 'gelu'
                notes.append("open_clip layout: the file does not record its activation; GELU (open_clip's default) "
                             "is used: OpenAI's CLIP weights need --set act_layer=quick_gelu")
            notes.append("open_clip layout: conv1, class_embedding, positional_embedding, ln_pre, resblocks, ln_post "
                         "read as timm's CLIP ViT; proj read as the head (zero bias); text tower keys ignored")
        elif layout == 'dinov2':
            if cfg.get('mlp_layer', 'mlp') != 'mlp' and 'act_layer' not in arch:
                arch['act_layer'] = 'silu'   # DINOv2's SwiGLUFFN(Fused): F.silu, as timm's ViT-g/14 registration
                notes.append('dinov2 layout: SwiGLU feed-forward, gated by SiLU (DINOv2\'s SwiGLUFFN)')
            notes.append('dinov2 layout: mask_token dropped (used only by masked-image training), w12/w3 read as fc1/fc2'
                         + ('; the class position row folded into cls_token (registers get no position)'
                            if cfg.get('reg_tokens') else ''))
        return cfg, arch, notes

    def layout_note(self, model, layout: str):
        if layout == 'dinov2' and (model.activation not in ('exact', 'gelu') and model.mlp_layer == 'mlp'
                                   or model.norm_eps != 1e-6):
            return f'DinoVisionTransformer computes exact GELU and LayerNorm eps 1e-6; this model has ' \
                   f'{model.activation}, eps {model.norm_eps:g}'
        if layout == 'open_clip' and model.norm_eps != 1e-5:
            return f'open_clip\'s LayerNorm has eps 1e-5; this model has {model.norm_eps:g}'
        return None

    def rules(self, model) -> List[Rule]:
        """The map for a `vit_flax.VisionTransformer` instance (its config decides which rows exist), as stored:
        a fixed position table has its row too (see `store`)."""
        h = model.num_heads
        norm = (lambda f, t: norm_rules(f, t)) if model.norm_layer == 'layernorm' else \
            (lambda f, t: [rule(f'{f}/scale', f'{t}.weight')])   # RmsNorm: a weight, no bias
        rules = resnet_rules(model.resnet) if model.resnet is not None else \
            resnet_d_rules(model.resnet_d) if model.resnet_d is not None else mci_rules() if model.mci_stem else []
        if not model.mci_stem:   # MCI: timm's last stem conv is the embedding (mci_rules)
            rules.append(rule('embedding/kernel', 'patch_embed.proj.weight', CONV))
            if not model.pre_norm:   # timm's pre_norm models have no patch-embedding bias
                rules.append(rule('embedding/bias', 'patch_embed.proj.bias'))
        rules.append(rule(POS_KEY, 'pos_embed'))
        if model.embed_norm:
            rules += norm('embedding_norm', 'patch_embed.norm')
        if model.has_class_token:
            rules.append(rule('cls', 'cls_token'))
        if model.distilled:
            rules.append(rule('dist', 'dist_token'))
        if model.reg_tokens:
            rules.append(rule('reg', 'reg_token'))
        if model.pre_norm:
            rules += norm('Transformer/pre_norm', 'norm_pre')
        layer_scale = model.init_values and model.block_fn != 'res_post'

        def attention(f, mha, t, qkv_key='qkv'):
            out = [rule(tuple(f'{mha}/{n}/kernel' for n in ('query', 'key', 'value')), f'{t}.{qkv_key}.weight',
                        heads_in(h, 3))] if qkv_key else []
            if model.qkv_bias and qkv_key:
                out.append(rule(tuple(f'{mha}/{n}/bias' for n in ('query', 'key', 'value')), f'{t}.{qkv_key}.bias',
                                heads_in(h, 3, kernel=False)))
            if model.qk_norm:
                out += norm(f'{mha}/query_norm', f'{t}.q_norm') + norm(f'{mha}/key_norm', f'{t}.k_norm')
            if model.scale_attn_norm:
                out += norm(f'{mha}/out_norm', f'{t}.norm')
            if model.attn_layer == 'diff':
                out += _diff_rules(mha, t)
            return out

        for i in range(model.depth):
            f, t = f'Transformer/encoderblock_{i}', f'blocks.{i}'
            mha = f'{f}/MultiHeadDotProductAttention_{{}}'
            if model.block_fn == 'parallel_things':   # timm: attns.{j}.{norm, attn, ls}, ffns.{j}.{norm, mlp, ls}
                for j in range(2):
                    a, m = f'{t}.attns.{j}', f'{t}.ffns.{j}'
                    rules += norm(f'{f}/LayerNorm_{j}', f'{a}.norm') + attention(f, mha.format(j), f'{a}.attn')
                    rules += attention_out_rules(mha.format(j), f'{a}.attn.proj', h, bias=model.proj_bias)
                    rules += norm(f'{f}/LayerNorm_{2 + j}', f'{m}.norm')
                    rules += _mlp(f'{f}/MlpBlock_{j}', f'{m}.mlp', model.mlp_layer, model.proj_bias)
                    if model.scale_mlp_norm:
                        rules += norm(f'{f}/MlpBlock_{j}/norm', f'{m}.mlp.norm')
                    if layer_scale:
                        rules += [rule(f'{f}/LayerScale_{j}/scale', f'{a}.ls.gamma'),
                                  rule(f'{f}/LayerScale_{2 + j}/scale', f'{m}.ls.gamma')]
                continue
            if model.block_fn == 'parallel_scaling':   # timm: in_norm, in_proj = [fc1; q; k; v], two out projections
                mha0, mlp0 = mha.format(0), f'{f}/MlpBlock_0'
                rules += norm(f'{f}/LayerNorm_0', f'{t}.in_norm') + attention(f, mha0, t, qkv_key=None)
                rules.append(rule((f'{mlp0}/Dense_0/kernel',) + tuple(f'{mha0}/{n}/kernel' for n in ('query', 'key', 'value')),
                                  f'{t}.in_proj.weight', _fc1_and_heads(h, model.embed_dim)))
                if model.qkv_bias:
                    rules.append(rule((f'{mlp0}/Dense_0/bias',) + tuple(f'{mha0}/{n}/bias' for n in ('query', 'key', 'value')),
                                      f'{t}.in_proj.bias', _fc1_and_heads(h, model.embed_dim, kernel=False)))
                else:
                    rules.append(rule(f'{mlp0}/Dense_0/bias', f'{t}.mlp_bias'))
                if model.attn_layer == 'diff':   # DiffParallelScalingBlock: out_proj = [attention out; fc2], one bias
                    rules.append(rule((f'{mha0}/out/kernel', f'{mlp0}/Dense_1/kernel'), f'{t}.out_proj.weight',
                                      _heads_and_fc2(h)))
                    rules += [rule(f'{mha0}/out/bias', f'{t}.out_proj.bias')] if model.proj_bias else []
                else:
                    rules += attention_out_rules(mha0, f'{t}.attn_out_proj', h, bias=model.proj_bias)
                    rules += dense_rules(f'{mlp0}/Dense_1', f'{t}.mlp_out_proj', model.proj_bias)
                if layer_scale:
                    rules.append(rule(f'{f}/LayerScale_0/scale', f'{t}.ls.gamma'))
                continue
            rules += norm(f'{f}/LayerNorm_0', f'{t}.norm1') + attention(f, mha.format(0), f'{t}.attn')
            rules += attention_out_rules(mha.format(0), f'{t}.attn.proj', h, bias=model.proj_bias)
            if layer_scale:
                rules += [rule(f'{f}/LayerScale_0/scale', f'{t}.ls1.gamma'),
                          rule(f'{f}/LayerScale_1/scale', f'{t}.ls2.gamma')]
            rules += norm(f'{f}/LayerNorm_1', f'{t}.norm2')
            rules += _mlp(f'{f}/MlpBlock_0', f'{t}.mlp', model.mlp_layer, model.proj_bias)
            if model.scale_mlp_norm:
                rules += norm(f'{f}/MlpBlock_0/norm', f'{t}.mlp.norm')
        if model.final_norm and not model.use_fc_norm:
            rules += norm('Transformer/encoder_norm', 'norm')
        if model.global_pool == 'map':
            rules += map_head_rules(h, norm)
        if model.final_norm and model.use_fc_norm:
            rules += norm('pool_norm', 'fc_norm')
        if model.representation_size:
            rules += dense_rules('pre_logits', 'pre_logits.fc')  # WZMIAOMIAO's name; current timm has no such layer
        if model.num_classes > 0:
            rules += dense_rules('head', 'head')
            if model.distilled:
                rules += dense_rules('head_dist', 'head_dist')
        return rules

    def timm_kwargs(self, model) -> dict:
        """Arguments that make `timm.create_model(name, **kw)` build the same architecture as `model`."""
        if model.pool_type == 'token_avg':
            raise ConversionError("timm has no global_pool='token_avg' (the class token beside the mean of the "
                                  "patches: transformers' Dinov2ForImageClassification head)")
        act = {'exact': 'gelu', 'tanh': 'gelu_tanh'}.get(model.activation, model.activation)
        # timm's names where its default eps (1e-6) is the model's (they fit in a timm folder's config.json)
        norm = model.norm_layer if model.norm_eps == 1e-6 else \
            _timm_ref('timm.layers', {'layernorm': 'LayerNorm', 'rmsnorm': 'RmsNorm'}[model.norm_layer],
                      eps=model.norm_eps)
        kw = dict(num_classes=model.num_classes, img_size=model.img_size, patch_size=model.patch_size,
                  in_chans=model.in_chans, embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                  mlp_ratio=(model.mlp_hidden + 0.5) / model.embed_dim, qkv_bias=model.qkv_bias, act_layer=act,
                  norm_layer=norm, global_pool=model.pool_type, class_token=model.has_class_token,
                  # None where timm's own default (a norm after avg/avgmax/max pooling) is the model's
                  fc_norm=None if model.use_fc_norm == (model.pool_type in ('avg', 'avgmax', 'max'))
                  else model.use_fc_norm, final_norm=model.final_norm, init_values=model.init_values,
                  reg_tokens=model.reg_tokens, no_embed_class=model.no_embed_class, pre_norm=model.pre_norm,
                  proj_bias=model.proj_bias, qk_norm=model.qk_norm, scale_attn_norm=model.scale_attn_norm,
                  scale_mlp_norm=model.scale_mlp_norm, dynamic_img_size=model.dynamic_img_size)
        if model.mlp_layer != 'mlp':
            kw['mlp_layer'] = _timm_ref('timm.layers', {'swiglu': 'SwiGLU', 'swiglu_packed': 'SwiGLUPacked'}[model.mlp_layer])
        diff = model.attn_layer == 'diff'
        if model.block_fn != 'block':
            kw['block_fn'] = _timm_ref('timm.models.vision_transformer', {
                'res_post': 'ResPostBlock', 'parallel_things': 'ParallelThingsBlock',
                'parallel_scaling': 'DiffParallelScalingBlock' if diff else 'ParallelScalingBlock'}[model.block_fn])
        elif diff:
            kw['attn_layer'] = 'diff'
        if model.embed_norm:
            kw['embed_norm_layer'] = norm
        if model.resnet is not None:
            kw['embed_layer'] = _timm_ref('timm.layers', 'HybridEmbed', backbone=('resnet', tuple(model.resnet),
                                                                                 model.in_chans))
        elif model.resnet_d is not None:
            kw['embed_layer'] = _timm_ref('timm.layers', 'HybridEmbed', backbone=('resnet_d', tuple(model.resnet_d),
                                                                                 model.in_chans))
        elif model.mci_stem:   # timm: the stem's last conv embeds (patch 1, no projection)
            kw['embed_layer'] = _timm_ref('timm.layers', 'HybridEmbed', backbone=('mci', model.embed_dim, model.in_chans),
                                          proj=False)
            kw['patch_size'] = 1
        return kw

    def parity_points(self, model):
        """(label, flax intermediate, timm module) pairs compared by `vit-flax parity`, in forward order."""
        pts = [('embed', 'Transformer/embed', 'pos_drop')]
        pts += [(f'block {i}', f'Transformer/block_{i}', f'blocks.{i}') for i in range(model.depth)]
        pts.append(('norm', 'Transformer/encoded', 'norm'))
        return pts

    def config_from_flax(self, flat) -> dict:
        """Architecture fields of `VisionTransformer` read off a flat linen tree."""
        b0 = 'Transformer/encoderblock_0'
        block_fn = 'parallel_things' if f'{b0}/MultiHeadDotProductAttention_1/query/kernel' in flat else \
            'parallel_scaling' if f'{b0}/LayerNorm_0/scale' in flat and f'{b0}/LayerNorm_1/scale' not in flat else 'block'
        kernel = flat['embedding/kernel']
        _check_kernel(kernel, 'embedding/kernel')
        depth = _count(flat, r'^Transformer/encoderblock_(\d+)/')
        b0 = 'Transformer/encoderblock_0'
        mha, mlp = f'{b0}/MultiHeadDotProductAttention_0', f'{b0}/MlpBlock_0'
        resnet, stem_in = resnet_from_flax(flat)
        stem = stem_from_flax(flat)
        if stem:
            stem_in = flat['backbone/stem_conv0/kernel' if 'resnet_d' in stem else 'backbone/conv0/kernel'].shape[-2]
        swiglu = f'{mlp}/Dense_gate/kernel' in flat
        hidden = flat[f'{mlp}/Dense_0/kernel'].shape[1]
        cfg = dict(embed_dim=kernel.shape[-1], in_chans=stem_in or kernel.shape[-2],
                   patch_size=tuple(kernel.shape[:-2]), spatial_dims=kernel.ndim - 2, depth=depth,
                   num_heads=flat[f'{mha}/query/kernel'].shape[1], mlp_dim=hidden,
                   qkv_bias=f'{mha}/query/bias' in flat,
                   distilled='dist' in flat, class_token='cls' in flat, embed_norm='embedding_norm/scale' in flat,
                   representation_size=flat['pre_logits/bias'].shape[0] if 'pre_logits/bias' in flat else None,
                   num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else 0, resnet=resnet,
                   reg_tokens=flat['reg'].shape[1] if 'reg' in flat else 0, pre_norm='Transformer/pre_norm/scale' in flat,
                   proj_bias=f'{mha}/out/bias' in flat, qk_norm=f'{mha}/query_norm/scale' in flat,
                   scale_attn_norm=f'{mha}/out_norm/scale' in flat, scale_mlp_norm=f'{mlp}/norm/scale' in flat,
                   layer_scale=f'{b0}/LayerScale_0/scale' in flat,
                   norm_layer='layernorm' if f'{b0}/LayerNorm_0/bias' in flat else 'rmsnorm',
                   mlp_layer='swiglu' if swiglu else _packed(hidden, flat[f'{mlp}/Dense_1/kernel'].shape[0]))
        cfg['block_fn'] = block_fn
        cfg['attn_layer'] = 'diff' if f'{mha}/lambda_q1' in flat else 'attn'
        cfg.update(dict(resnet_d=None, mci_stem=False), **stem)
        return _pooling(_positions(cfg, flat.get(POS_KEY)), map_head='MAPHead_0/probe' in flat,
                        encoder_norm='Transformer/encoder_norm/scale' in flat, fc_norm='pool_norm/scale' in flat,
                        head_in=flat['head/kernel'].shape[0] if 'head/kernel' in flat else None)

    def config_from_torch(self, state) -> dict:
        """The same fields read off a timm state_dict; `num_heads` is None (a fused qkv does not record it)."""
        state, block_fn = _as_standard_block(state)
        stem = stem_from_torch(state)
        proj = f'{TORCH_PREFIX}.2.conv.weight' if stem.get('mci_stem') else 'patch_embed.proj.weight'
        w = state[proj]
        _check_kernel(w, proj)
        resnet, stem_in = resnet_from_torch(state)
        if stem:
            stem_in = state[f'{TORCH_PREFIX}.conv1.0.weight' if 'resnet_d' in stem else f'{TORCH_PREFIX}.0.conv.weight'].shape[1]
        b0 = 'blocks.0'
        swiglu = f'{b0}.mlp.fc1_g.weight' in state
        hidden = state[f'{b0}.mlp.fc1_x.weight' if swiglu else f'{b0}.mlp.fc1.weight'].shape[0]
        cfg = dict(embed_dim=w.shape[0], in_chans=stem_in or w.shape[1], patch_size=tuple(w.shape[2:]),
                   spatial_dims=w.ndim - 2, depth=_count(state, r'^blocks\.(\d+)\.'), num_heads=None,
                   mlp_dim=hidden, qkv_bias=f'{b0}.attn.qkv.bias' in state,
                   distilled='dist_token' in state, class_token='cls_token' in state,
                   embed_norm='patch_embed.norm.weight' in state,
                   representation_size=state['pre_logits.fc.bias'].shape[0] if 'pre_logits.fc.bias' in state else None,
                   num_classes=state['head.bias'].shape[0] if 'head.bias' in state else 0, resnet=resnet,
                   reg_tokens=state['reg_token'].shape[1] if 'reg_token' in state else 0,
                   pre_norm='norm_pre.weight' in state, proj_bias=f'{b0}.attn.proj.bias' in state,
                   qk_norm=f'{b0}.attn.q_norm.weight' in state, scale_attn_norm=f'{b0}.attn.norm.weight' in state,
                   scale_mlp_norm=f'{b0}.mlp.norm.weight' in state, layer_scale=f'{b0}.ls1.gamma' in state,
                   norm_layer='layernorm' if f'{b0}.norm1.bias' in state else 'rmsnorm',
                   mlp_layer='swiglu' if swiglu else _packed(hidden, state[f'{b0}.mlp.fc2.weight'].shape[1]))
        cfg['block_fn'] = block_fn
        cfg['attn_layer'] = 'diff' if f'{b0}.attn.lambda_q1' in state else 'attn'
        cfg.update(dict(resnet_d=None, mci_stem=False), **stem)
        return _pooling(_positions(cfg, state['pos_embed']), map_head='attn_pool.latent' in state,
                        encoder_norm='norm.weight' in state, fc_norm='fc_norm.weight' in state,
                        head_in=state['head.weight'].shape[-1] if 'head.weight' in state else None)

    def store(self, flat, model, log: Callable[[str], None] = lambda s: None):
        """The tree as a file with a position table holds it: fixed sincos2d positions written out."""
        if model.posemb != 'sincos2d':
            return flat
        log(f'pos_embed: big_vision\'s fixed sincos2d positions (grid {"x".join(map(str, model.grid_size))}) written '
            f'out as a learned table, prefix rows zero: a model holding it computes the same function')
        return {**flat, POS_KEY: sincos2d_pos_embed(model, flat['embedding/kernel'].dtype)}

    def unstore(self, flat, model):
        """The inverse of `store`: a fixed table (checked equal when the config was read) is dropped."""
        return {k: v for k, v in flat.items() if k != POS_KEY} if model.posemb == 'sincos2d' else flat

    def core(self, model) -> dict:
        return dict(embed_dim=model.embed_dim, depth=model.depth, patch_size=model.patch_size_tuple,
                    mlp_dim=model.mlp_hidden, spatial_dims=model.spatial_dims, num_heads=model.num_heads)

    def overrides(self, cfg: dict, model) -> dict:
        """Overrides that make registered `model` hold exactly the checkpoint described by `cfg`. What a file
        cannot record (the activation, norm eps, avg against max pooling, ResPostBlock, LayerScale's initial
        value) stays the registered model's; a config.json beside the weights records the first two and the
        input size (`norm_eps`, `act_layer`, `gelu`, `img_size` in `cfg`)."""
        current = dict(num_classes=model.num_classes, representation_size=model.representation_size or None,
                       distilled=model.distilled, class_token=model.has_class_token,
                       qkv_bias=model.qkv_bias, in_chans=model.in_chans, embed_norm=model.embed_norm,
                       posemb=model.posemb, resnet=model.resnet, reg_tokens=model.reg_tokens,
                       no_embed_class=model.no_embed_class and model.num_prefix_tokens > 0, pre_norm=model.pre_norm,
                       proj_bias=model.proj_bias, qk_norm=model.qk_norm, scale_attn_norm=model.scale_attn_norm,
                       scale_mlp_norm=model.scale_mlp_norm, norm_layer=model.norm_layer, mlp_layer=model.mlp_layer,
                       final_norm=model.final_norm, attn_layer=model.attn_layer, resnet_d=model.resnet_d,
                       mci_stem=model.mci_stem)
        kw = {k: cfg[k] for k, v in current.items() if k in cfg and cfg[k] != v}
        # what a config.json records beside the shapes (a transformers folder): eps, activation, input size
        kw.update(field_overrides(model, {k: cfg[k] for k in ('norm_eps', 'act_layer', 'gelu', 'img_size') if k in cfg}))
        if cfg.get('global_pool') is not None and not _same_pooling(cfg, model):
            kw.update(global_pool=cfg['global_pool'], fc_norm=None)
        read_block = cfg.get('block_fn', 'block')
        if read_block != ('block' if model.block_fn in ('block', 'res_post') else model.block_fn):
            kw['block_fn'] = read_block
        if 'layer_scale' in cfg and kw.get('block_fn', model.block_fn) != 'res_post' \
                and cfg['layer_scale'] != bool(model.init_values):
            kw['init_values'] = 1e-5 if cfg['layer_scale'] else None   # the value only seeds training
        stems = {k: kw[k] for k in ('resnet', 'resnet_d', 'mci_stem') if k in kw}
        if stems:  # the stem decides how many tokens an image makes
            model = model.clone(**stems)
        img = img_size_override(cfg, model.clone(**{k: v for k, v in kw.items() if k in ('reg_tokens', 'class_token', 'distilled')}))
        return {**kw, **({'img_size': img} if img is not None else {})}

    # ------------------------------------------------------------ detection, files

    def detect_torch(self, state) -> bool:
        return (('patch_embed.proj.weight' in state or f'{TORCH_PREFIX}.2.conv.weight' in state)
                and any(k.startswith('blocks.') for k in state)) or is_open_clip(state)

    def detect_flax(self, flat) -> bool:
        # a 2-D embedding kernel is a Dense over flattened patches: NaFlex's (naflex.py), not a ViT's convolution
        return 'embedding/kernel' in flat and np.ndim(flat['embedding/kernel']) != 2

    def from_npz(self, arrays, path: str):
        """Google's own layouts (released, linen, big_vision; prefixed, scanned): any file with an
        `embedding/kernel` under some prefix."""
        if not any(k.endswith('embedding/kernel') for k in arrays):
            return None
        prefix = detect_prefix(arrays, path)
        scanned = is_scanned(k[len(prefix):] for k in arrays if k.startswith(prefix))
        flat, layout = npz_to_flax(arrays, path)
        return flat, layout, scanned

    def to_npz(self, flat, model, layout: str, log):
        """big_vision's layout holds the tree itself (fixed positions stay fixed); vit_jax's layouts hold a
        position table, written out for a sincos2d model."""
        if layout == 'big_vision' and model.reg_tokens:
            raise ConversionError('the big_vision layout has no register tokens; use linen')
        if layout != 'linen' and model.no_embed_class and model.num_prefix_tokens and POS_KEY in flat:
            # Google's layouts hold a table over [prefix, patches] (big_vision folds its class row into the
            # token): zero rows for the prefix tokens are the same function
            pe = flat[POS_KEY]
            flat = {**flat, POS_KEY: np.concatenate(
                [np.zeros((1, model.num_prefix_tokens, pe.shape[-1]), pe.dtype), pe], axis=1)}
        return flax_to_npz(flat if layout == 'big_vision' else self.store(flat, model, log), layout)

    def npz_layouts_for(self, model) -> Tuple[str, ...]:
        """vit_jax's released numbering has no LayerScale in a block, one attention and MLP per block in
        sequence and no stem but Google's: other models (LayerScale, the parallel blocks, timm's ResNet-D and
        MobileCLIP's stems) offer linen (the default, the tree itself) and big_vision."""
        plain = (model.block_fn == 'res_post' or model.block_fn == 'block' and not model.init_values) \
            and model.resnet_d is None and not model.mci_stem
        return LAYOUTS if plain else ('linen', 'big_vision')

    # ------------------------------------------------------------ matching and adapting

    def preference(self, cfg: dict, name: str, model) -> tuple:
        """A ResNet stem exactly when the file has one first, then the generic order, with ViT before DeiT for
        undistilled files just before the name."""
        stem = (model.resnet is None) != (cfg.get('resnet') is None) \
            or (model.resnet_d is None) != (cfg.get('resnet_d') is None) \
            or bool(model.mci_stem) != bool(cfg.get('mci_stem'))          # () is a stem without stages
        fewest_unshared, changed, _ = super().preference(cfg, name, model)
        return stem, fewest_unshared, changed, name.startswith('deit') != bool(cfg.get('distilled')), name

    def check_target(self, src, target, path: str, model_name: str, overrides: dict) -> None:
        super().check_target(src, target, path, model_name, overrides)
        norm = src.embed_norm
        if norm != target.embed_norm:
            raise ConversionError(f'{path}: checkpoint has {"a" if norm else "no"} patch-embedding norm '
                                  f'(patch_embed.norm), {model_name} has {"none" if norm else "one"}; '
                                  f'pass embed_norm={norm}')
        rep = src.representation_size
        if rep and 'representation_size' not in overrides and not target.representation_size:
            raise ConversionError(f'{path}: checkpoint has a pre_logits layer ({rep}); pass '
                                  f'representation_size={rep} to keep it or representation_size=None to drop it')

    def num_features(self, model) -> int:
        return int(model.embed_dim) * (2 if model.pool_type == 'token_avg' else 1)

    def head_features(self, model) -> int:
        return int(model.representation_size or self.num_features(model))

    def adapt_positions(self, flat, src, dst, resample: str, log):
        """Fixed sincos2d positions replace a learned table (or are written out as one), else the table is
        resampled."""
        grid = tuple(dst.grid_size)
        if dst.posemb == 'sincos2d':
            if flat.pop(POS_KEY, None) is not None:
                log('pos_embedding: learned table dropped, replaced by big_vision\'s fixed sincos2d positions')
            log(f'positions: big_vision\'s fixed sincos2d table for grid {grid} (no stored table)')
        elif POS_KEY not in flat and src.posemb == 'sincos2d':
            flat[POS_KEY] = sincos2d_pos_embed(dst, flat['embedding/kernel'].dtype)
            log(f'pos_embedding: big_vision\'s fixed sincos2d positions written out as a learned table '
                f'(grid {grid}, prefix rows zero)')
        else:
            flat = self._prefix_rows(flat, src, dst, log)
            if POS_KEY in flat and tuple(src.grid_size) != grid:
                rows = 0 if dst.no_embed_class else dst.num_prefix_tokens
                flat[POS_KEY] = resample_pos_embed(flat[POS_KEY], grid, rows, src.grid_size, resample)
                log(f'pos_embedding: grid {tuple(src.grid_size)} -> {grid} ({resample}), '
                    f'{rows} prefix row(s) kept aside')
        return flat

    def _prefix_rows(self, flat, src, dst, log):
        """A table with rows for the prefix tokens made one without (`no_embed_class`, timm's DeiT III / FlexiViT /
        register layout) by folding each row into its token, or the reverse with zero rows: the same function."""
        n = src.num_prefix_tokens
        if POS_KEY not in flat or not n or src.no_embed_class == dst.no_embed_class:
            return flat
        pe = flat[POS_KEY]
        if dst.no_embed_class:
            i = 0
            for key, count in (('cls', int(src.has_class_token)), ('dist', int(src.distilled)), ('reg', src.reg_tokens)):
                if count:
                    flat[key] = (flat[key] + pe[:, i:i + count]).astype(flat[key].dtype)
                    i += count
            flat[POS_KEY] = pe[:, n:]
            log(f'pos_embedding: {n} prefix row(s) folded into their tokens (no_embed_class: positions for the '
                f'patches only)')
        else:
            flat[POS_KEY] = np.concatenate([np.zeros((1, n, pe.shape[-1]), pe.dtype), pe], axis=1)
            log(f'pos_embedding: {n} zero row(s) for the prefix tokens written out (no_embed_class=False)')
        return flat

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str, log):
        """The patch kernel PI-resized to `dst`'s patch (FlexiViT), positions, then `pre_logits` dropped when
        `dst` has no representation layer."""
        old, new = tuple(src.patch_size_tuple), tuple(dst.patch_size_tuple)
        if old != new:
            if src.spatial_dims != 2 or src.has_stem:
                raise ConversionError(f'patch {old} -> {new}: only a 2-D ViT without a stem resizes its patches')
            method = resample if resample in ('bicubic', 'bilinear') else 'bicubic'
            flat['embedding/kernel'] = resample_patch_kernel(flat['embedding/kernel'], new, method)
            log(f'embedding/kernel: patch {"x".join(map(str, old))} -> {"x".join(map(str, new))} by FlexiViT\'s '
                f'pseudo-inverse resize ({method})')
        flat = super().adapt(flat, src, dst, resample=resample, bias_resize=bias_resize, log=log)
        rep = src.representation_size
        if rep and not dst.representation_size:
            for k in [k for k in flat if k.startswith('pre_logits/')]:
                del flat[k]
            log(f'pre_logits: dropped (representation {rep})')
            if dst.num_classes == src.num_classes and dst.num_classes:
                log('head: kept, but it now reads un-projected features; pass --num-classes to replace it')
        return flat

    # ------------------------------------------------------------ torch, inspection

    def torch_model(self, model, model_name: str):
        if model.spatial_dims != 2:
            raise ConversionError(f'{model_name}: timm has no 1-D ViT to compare with')
        if model.representation_size:
            raise ConversionError(f'{model_name}: current timm has no pre_logits layer; drop it to compare')
        return super().torch_model(model, model_name)

    def describe(self, ck) -> str:
        """"Google ViT (released)", "R50+ViT hybrid (released)", "big_vision ViT (sincos2d positions)",
        "big_vision SigLIP image tower (scanned, bf16)", "timm R26+ViT hybrid"... A SigLIP tower is recognised
        by its file (a two-tower big_vision file's `params/img/`), not by the timm name that fits it."""
        model = ck.model
        arch = f'{resnet_label(model.resnet)}+ViT hybrid' if model.resnet is not None else \
            f'ResNet-D ({len(model.resnet_d)} stages)+ViT hybrid' if model.resnet_d is not None else \
            'MCI+ViT hybrid' if model.mci_stem else \
            ('DeiT' if model.distilled else 'ViT')
        notes = []
        if ck.format == 'npz':
            prefix = detect_prefix(ck.raw, ck.path)
            if prefix == 'params/img/':  # the image tower of a two-tower (LiT / SigLIP) file
                siglip = model.global_pool == 'map' and not model.has_class_token
                source = 'big_vision SigLIP image tower' if siglip else 'big_vision image tower (two-tower file)'
            elif ck.layout == 'big_vision':
                source = f'big_vision {arch}'
            else:   # a tree Google's own models do not have (LayerScale, registers, ...) is not "Google's"
                google = not (model.init_values or model.reg_tokens or model.pre_norm or model.qk_norm
                              or model.mlp_layer != 'mlp' or model.norm_layer != 'layernorm' or model.no_embed_class)
                source = arch if model.has_stem else f'{"Google" if google else "Flax"} {arch}'
                notes.append(ck.layout)
            if prefix == 'opt/target/':
                notes.append('opt/target/ prefix')
            if any(k.startswith(f'{prefix}{SCANNED}') for k in ck.raw):
                notes.append('scanned')
        elif ck.format in ('torch', 'safetensors'):
            source = f'{ck.layout} {arch}'
        else:
            source = f'Flax {arch}'
        if any(v.dtype == ml_dtypes.bfloat16 for v in ck.raw.values()):
            notes.append('bf16')
        if model.posemb == 'sincos2d':
            notes.append('sincos2d positions')
        return source + (f' ({", ".join(notes)})' if notes else '')


FAMILY = ViTFamily()
