"""The releases' own torch layouts of a ViT: facebookresearch/dinov2's hub files, OpenAI CLIP / open_clip's
image towers and DeiT III's own files, each to timm's layout (the rule table's) and back, refusing what the
release's code cannot hold."""
import numpy as np

from ...errors import ConversionError


# ---------------------------------------------------------------- the releases' own torch layouts

# facebookresearch/dinov2's hub files (`dinov2_vit{s,b,l,g}14[_reg4]_pretrain.pth`, DinoVisionTransformer with
# block_chunks=0): timm's keys but `register_tokens` (timm `reg_token`), SwiGLUFFNFused `mlp.w12`/`mlp.w3` (timm
# SwiGLUPacked `fc1`/`fc2`), a `mask_token` (1, D) used only by masked-image training, and a position table
# that always has the class row. DINOv2 adds positions to [cls, patches] before it inserts the registers; timm's
# register models add them to the patches only (`no_embed_class`), so their class row is folded into the
# token: cls + pos[0], exactly as timm's `_convert_dinov2` does (the same function, one rounding).

def _dinov2_renames(state, pairs):
    out = {}
    for k, v in state.items():
        for a, b in pairs:
            if k.endswith(a):
                k = k[:-len(a)] + b
        out[k] = v
    return out


def dinov2_to_timm(state):
    """A DINOv2 hub state_dict -> timm's layout (mask_token dropped, see `read_notes`)."""
    state = _dinov2_renames({k: v for k, v in state.items() if k != 'mask_token'},
                            [('.mlp.w12.weight', '.mlp.fc1.weight'), ('.mlp.w12.bias', '.mlp.fc1.bias'),
                             ('.mlp.w3.weight', '.mlp.fc2.weight'), ('.mlp.w3.bias', '.mlp.fc2.bias')])
    if 'register_tokens' in state:
        state['reg_token'] = state.pop('register_tokens')
        pe = state['pos_embed']
        state['cls_token'] = (state['cls_token'] + pe[:, :1]).astype(pe.dtype)
        state['pos_embed'] = pe[:, 1:]
    return state


def timm_to_dinov2(state, model):
    """timm's layout -> what DinoVisionTransformer loads strictly: the class position row written out (zero
    where timm folded it into the token), `register_tokens`, SwiGLU as `w12`/`w3`, a zero `mask_token`."""
    what = [why for bad, why in [
        (not model.has_class_token, 'no class token'), (model.distilled, 'a distillation token'),
        (model.num_classes > 0, f'a classifier head ({model.num_classes} classes; pass --num-classes 0)'),
        (model.pre_norm, 'a pre-norm'), (model.use_fc_norm or not model.final_norm, 'no final norm on the tokens'),
        (model.norm_layer != 'layernorm', 'RmsNorm'), (model.embed_norm, 'a patch-embedding norm'),
        (model.qk_norm or model.scale_attn_norm or model.scale_mlp_norm, 'extra attention/MLP norms'),
        (model.mlp_layer == 'swiglu', "timm's unpacked SwiGLU"), (model.block_fn != 'block', 'ResPostBlock'),
        (model.has_stem, 'a ResNet stem'), (model.representation_size, 'a pre_logits layer'),
        (model.spatial_dims != 2, '1-D patches')] if bad]
    if what:
        raise ConversionError(f'the dinov2 layout (DinoVisionTransformer) cannot hold {what[0]}')
    state = _dinov2_renames(state, [('.mlp.fc1.weight', '.mlp.w12.weight'), ('.mlp.fc1.bias', '.mlp.w12.bias'),
                                    ('.mlp.fc2.weight', '.mlp.w3.weight'), ('.mlp.fc2.bias', '.mlp.w3.bias')]) \
        if model.mlp_layer == 'swiglu_packed' else dict(state)
    pe = state['pos_embed']
    if model.no_embed_class:
        state['pos_embed'] = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    elif model.reg_tokens:   # timm's table has cls and register rows; DINOv2 adds none to the registers
        raise ConversionError('the dinov2 layout cannot hold position rows for register tokens '
                              '(no_embed_class=False with reg_tokens)')
    if model.reg_tokens:
        state['register_tokens'] = state.pop('reg_token')
    state['mask_token'] = np.zeros((1, model.embed_dim), pe.dtype)
    return state


# OpenAI CLIP / open_clip image towers (`VisionTransformer` of open_clip; `visual.` in a whole CLIP model's
# state_dict, beside the text tower): conv1 (no bias), class_embedding (D), positional_embedding (N+1, D),
# ln_pre, transformer.resblocks.N.{ln_1, attn.in_proj_weight/bias (q, k, v rows), attn.out_proj, ls_1.gamma,
# ln_2, mlp.c_fc, mlp.c_proj, ls_2.gamma}, ln_post, proj (D, E). timm's CLIP names are the same computation:
# pre_norm, `proj` as `head.weight` = proj.T with a zero bias (timm's `_convert_openai_clip`).
_OPEN_CLIP_BLOCK = [('ln_1.', 'norm1.'), ('attn.in_proj_weight', 'attn.qkv.weight'), ('attn.in_proj_bias', 'attn.qkv.bias'),
                    ('attn.out_proj.', 'attn.proj.'), ('ls_1.gamma', 'ls1.gamma'), ('ln_2.', 'norm2.'),
                    ('mlp.c_fc.', 'mlp.fc1.'), ('mlp.c_proj.', 'mlp.fc2.'), ('ls_2.gamma', 'ls2.gamma')]
_OPEN_CLIP_TOP = [('conv1.weight', 'patch_embed.proj.weight'), ('ln_pre.weight', 'norm_pre.weight'),
                  ('ln_pre.bias', 'norm_pre.bias'), ('ln_post.weight', 'norm.weight'), ('ln_post.bias', 'norm.bias')]


def _renamed(rest: str, pairs):
    """`rest` with the first matching prefix `a` of `pairs` [(a, b), ...] replaced by its `b` (None: none matches)."""
    for a, b in pairs:
        if rest.startswith(a):
            return b + rest[len(a):]
    return None


def is_open_clip(state) -> bool:
    return any(k.endswith('class_embedding') and ('conv1.weight' in state or 'visual.conv1.weight' in state)
               for k in state)


def open_clip_to_timm(state):
    """An open_clip image tower (or a whole CLIP state_dict: its `visual.` keys) -> timm's layout."""
    if 'visual.conv1.weight' in state:
        state = {k[len('visual.'):]: v for k, v in state.items() if k.startswith('visual.')}
    out = {}
    for k, v in state.items():
        if k.startswith('transformer.resblocks.'):
            i, rest = k[len('transformer.resblocks.'):].split('.', 1)
            rest = _renamed(rest, _OPEN_CLIP_BLOCK)
            if rest is None:
                raise ConversionError(f'open_clip key {k!r} is not one of a ViT block')
            out[f'blocks.{i}.{rest}'] = v
        elif k in dict(_OPEN_CLIP_TOP):
            out[dict(_OPEN_CLIP_TOP)[k]] = v
        elif k == 'class_embedding':
            out['cls_token'] = v.reshape(1, 1, -1)
        elif k == 'positional_embedding':
            out['pos_embed'] = v[None]
        elif k == 'proj':
            if v is not None:
                out['head.weight'] = np.ascontiguousarray(v.T)
                out['head.bias'] = np.zeros(v.shape[1], v.dtype)
        else:
            raise ConversionError(f'open_clip key {k!r} is not part of the ViT image tower this project reads '
                                  f'(attentional pooling and other towers are not supported)')
    return out


def timm_to_open_clip(state, model):
    """timm's layout -> what open_clip's `VisionTransformer` loads strictly (its own key names, no `visual.`)."""
    what = [why for bad, why in [
        (not model.pre_norm, 'no pre-norm (ln_pre)'), (not model.has_class_token, 'no class token'),
        (model.distilled or model.reg_tokens, 'extra prefix tokens'), (model.no_embed_class, 'no position for cls'),
        (model.pool_type != 'token', f'{model.pool_type!r} pooling (open_clip pools the class token)'),
        (model.use_fc_norm or not model.final_norm, 'no final norm on the tokens'),
        (model.norm_layer != 'layernorm' or model.qk_norm or model.scale_attn_norm or model.scale_mlp_norm,
         'norms other than LayerNorm'), (model.mlp_layer != 'mlp', 'a gated MLP'),
        (not model.qkv_bias or not model.proj_bias, 'projections without bias'), (model.block_fn != 'block', 'ResPostBlock'),
        (model.has_stem or model.embed_norm or model.spatial_dims != 2, 'another patch embedding')] if bad]
    if not what and model.num_classes == 0:
        what = ['a model without a head (open_clip\'s tower ends in its projection `proj`: pass --num-classes E)']
    if what:
        raise ConversionError(f'the open_clip layout (open_clip VisionTransformer) cannot hold {what[0]}')
    if 'head.bias' in state and np.any(state['head.bias'] != 0):
        raise ConversionError("the open_clip layout's proj has no bias, but this head's bias is not zero")
    back = {b: a for a, b in _OPEN_CLIP_TOP}
    out = {}
    for k, v in state.items():
        if k.startswith('blocks.'):
            i, rest = k[len('blocks.'):].split('.', 1)
            out[f'transformer.resblocks.{i}.{_renamed(rest, [(b, a) for a, b in _OPEN_CLIP_BLOCK])}'] = v
        elif k in back:
            out[back[k]] = v
        elif k == 'cls_token':
            out['class_embedding'] = v.reshape(-1)
        elif k == 'pos_embed':
            out['positional_embedding'] = v[0]
        elif k == 'head.weight':
            out['proj'] = np.ascontiguousarray(v.T)
        elif k != 'head.bias':
            raise ConversionError(f'the open_clip layout has no place for {k!r}')
    return out


# DeiT III's own files (facebookresearch/deit `models_v2.py`, `{'model': state_dict}`): timm's keys but
# LayerScale as `blocks.N.gamma_1` / `gamma_2` (timm `ls1.gamma` / `ls2.gamma`); positions for the patches only.

def deit3_to_timm(state):
    return {k.replace('.gamma_1', '.ls1.gamma').replace('.gamma_2', '.ls2.gamma'): v for k, v in state.items()}


def timm_to_deit3(state, model):
    """timm's layout -> what DeiT III's `vit_models` (Layer_scale_init_Block) loads strictly."""
    what = [why for bad, why in [
        (not (model.init_values and model.block_fn == 'block'), 'no LayerScale'),
        (not model.has_class_token or model.distilled or model.reg_tokens, 'other prefix tokens than one cls'),
        (not model.no_embed_class, 'a position row for the class token'), (model.pool_type != 'token', 'pooling'),
        (model.pre_norm or model.use_fc_norm or not model.final_norm or model.norm_layer != 'layernorm'
         or model.qk_norm or model.scale_attn_norm or model.scale_mlp_norm, 'other norms'),
        (model.mlp_layer != 'mlp' or not model.proj_bias, 'another MLP'),
        (model.has_stem or model.embed_norm or model.spatial_dims != 2, 'another patch embedding'),
        (model.representation_size, 'a pre_logits layer')] if bad]
    if what:
        raise ConversionError(f'the deit3 layout (DeiT III vit_models) cannot hold {what[0]}')
    return {k.replace('.ls1.gamma', '.gamma_1').replace('.ls2.gamma', '.gamma_2'): v for k, v in state.items()}
