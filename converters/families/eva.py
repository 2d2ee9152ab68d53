"""timm's `Eva` (EVA / EVA-02, DINOv3, Perception Encoder, RoPE-ViT, LingBot, Sapiens2): the Flax tree
(vit_flax/models/eva.py) <-> timm's state_dict, one rule table run both ways (bit-exact: transposes only).

timm's keys (timm 1.0.31 `eva.py`): `cls_token`, `reg_token`, `pos_embed`, `patch_embed.proj.{weight,bias}`,
`rope.freqs` (mixed RoPE only: every other RoPE tensor is a non-persistent buffer), `norm_pre`,
`blocks.{i}.{gamma_1, gamma_2, norm1, attn.{qkv.weight, q_bias, v_bias | qkv.{weight,bias} | q_proj, k_proj,
v_proj}, attn.{q_norm, k_norm, norm, proj}, norm2, mlp.{fc1 | fc1_g, fc1_x}, mlp.norm, mlp.fc2}`, `norm`,
`attn_pool.{latent, q, kv, proj, norm, mlp.fc1, mlp.fc2}`, `fc_norm`, `head`. `attn.k_bias` is a non-persistent
zero buffer (never in a state_dict; ignored if a file holds it).

Detection (`detect_torch`): a timm ViT and an Eva share most keys; an Eva is told by a key no timm ViT has
(`attn.q_bias`, `attn.q_proj`, `mlp.fc1_g`, `rope.freqs`), or LayerScale as `gamma_1` (timm's ViT: `ls1.gamma`)
beside `norm_pre` or without `pos_embed`. RoPE leaves no key: a PE core/spatial state_dict without LayerScale has
exactly the keys of a pre-norm ViT, and a RoPE-ViT `_ape` file those of an old DeiT III file; pass `--model`.
"""
import re
from typing import List, Optional

import numpy as np

from vit_flax.models.eva import Eva
from vit_flax.models.layers import to_tuple

from ..errors import ConversionError
from ..rules import CONV, Rule, dense_rules, heads_in, heads_out, norm_rules, qkv_rules, renamed_rules, rule
from .base import Family

_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_FLAX_BLOCK = re.compile(r'^blocks_(\d+)/')


def torch_shapes_of_flax(flat) -> dict:
    """timm's key -> torch's shape for each array of a flat Eva/BEiT Flax tree (`blocks_{i}/...` spelled
    `blocks.{i}....`, kernels transposed, the patch kernel HWIO -> OIHW; RoPE frequencies and relative position
    tables keep their shape): what `config_from_torch` reads, without building a state_dict."""
    gated = any('Dense_gate' in k for k in flat)
    t = {}
    for key, v in flat.items():
        name = _FLAX_BLOCK.sub(lambda m: f'blocks.{m.group(1)}.', key).replace('/', '.')
        name = (name.replace('patch_embed.kernel', 'patch_embed.proj.weight')
                .replace('patch_embed.bias', 'patch_embed.proj.bias').replace('.scale', '.weight')
                .replace('.kernel', '.weight').replace('mlp.Dense_gate', 'mlp.fc1_g')
                .replace('rope_freqs', 'rope.freqs').replace('attn_pool.probe', 'attn_pool.latent'))
        if 'mlp.Dense_0' in name:
            name = name.replace('mlp.Dense_0', 'mlp.fc1_x' if gated else 'mlp.fc1')
        shape = tuple(np.shape(v))
        if name.endswith('.weight') and len(shape) == 2 and 'rope' not in name and 'table' not in name:
            shape = shape[::-1]
        if name == 'patch_embed.proj.weight':
            shape = (shape[3], shape[2]) + shape[:2]
        t[name] = shape
    return t


def _norm(model, flax: str, torch: str) -> List[Rule]:
    if model.norm_layer == 'rmsnorm':
        return [rule(f'{flax}/scale', f'{torch}.weight')]
    return norm_rules(flax, torch)


# ---------------------------------------------------------------- DINOv3's release layout

_DINO_MLP = {'w1': 'fc1_g', 'w2': 'fc1_x', 'w3': 'fc2'}


def dinov3_to_timm(state) -> dict:
    """facebookresearch/dinov3 hub state_dicts -> timm's keys, as timm's `checkpoint_filter_fn` reads them:
    `storage_tokens` -> `reg_token`, `ls{1,2}.gamma` -> `gamma_{1,2}`, `attn.qkv.bias` split into `q_bias`,
    `v_bias` (the k third is masked to zero by `bias_mask` in DINOv3's code: dropped), `mlp.w1/w2/w3` ->
    `mlp.fc1_g/fc1_x/fc2`; dropped: `rope_embed.periods` (recomputed in float32), `bias_mask`, `mask_token`
    (training only), `local_cls_norm` (training only: the local crops' class-token norm), and q/v biases that are
    all zero in every block. Arrays pass untouched."""
    out = {}
    # the distilled B/L/H releases hold all-zero q/v biases: dropped (adding zero is exact), so that the file is
    # the architecture without them, as timm registers those models (`vit_*_dinov3`, not `_qkvb`)
    biases = [np.asarray(v) for k, v in state.items() if k.endswith('attn.qkv.bias')]
    zero_bias = bool(biases) and all(not np.any(np.concatenate([b[:len(b) // 3], b[2 * len(b) // 3:]]))
                                     for b in biases)
    for k, v in state.items():
        if zero_bias and k.endswith('attn.qkv.bias'):
            continue
        if k.endswith(('periods', 'bias_mask')) or k == 'mask_token' or k.startswith('local_cls_norm'):
            continue
        if k.startswith('cls_norm'):
            raise ConversionError("a DINOv3 file with `cls_norm` (untie_cls_and_patch_norms) has no timm form")
        if k == 'storage_tokens':
            k = 'reg_token'
        k = re.sub(r'\.ls([12])\.gamma$', lambda m: f'.gamma_{m.group(1)}', k)
        k = re.sub(r'\.mlp\.(w[123])\.', lambda m: f'.mlp.{_DINO_MLP[m.group(1)]}.', k)
        if k.endswith('attn.qkv.bias'):
            q, _, vb = np.split(np.asarray(v), 3)
            out[k[:-len('qkv.bias')] + 'q_bias'], out[k[:-len('qkv.bias')] + 'v_bias'] = q, vb
            continue
        out[k] = v
    return out


def timm_to_dinov3(state, model) -> dict:
    """timm's keys -> a DINOv3 hub state_dict that DINOv3's `DinoVisionTransformer` loads strictly: the inverse
    renames, `qkv.bias` = [q_bias | 0 | v_bias] with `bias_mask` [1 | 0 | 1], `rope_embed.periods` (float32, the
    model's), and a zero `mask_token` (1, D) (training only; the file read had one, which reading dropped)."""
    problems = []
    if not model.class_token or model.use_abs_pos_emb or model.rope_type != 'dinov3' or not model.use_rot_pos_emb:
        problems.append('a class token, no absolute positions and DINOv3 RoPE')
    if model.attn_type != 'eva' or not model.qkv_fused or model.qk_norm or model.scale_attn_norm \
            or model.scale_mlp_norm or model.init_values is None or model.attn_only_layer_scale \
            or model.block_fn != 'block' or model.pre_norm or model.mlp_layer == 'swiglu_packed':
        problems.append("EVA attention with fused qkv, LayerScale on both branches, a GELU MLP or SwiGLU, no "
                        "sub-norms")
    if not model.use_final_norm or model.use_fc_norm or model.num_classes or model.norm_layer != 'layernorm':
        problems.append('the final LayerNorm, no fc_norm and no head')
    if problems:
        raise ConversionError("DINOv3's DinoVisionTransformer needs " + '; '.join(problems))
    from vit_flax.ops.rope import dinov3_periods
    dim = model.embed_dim
    out = {'cls_token': state['cls_token']}
    if 'reg_token' in state:
        out['storage_tokens'] = state['reg_token']
    out['mask_token'] = np.zeros((1, dim), np.asarray(state['cls_token']).dtype)
    out['patch_embed.proj.weight'] = state['patch_embed.proj.weight']
    out['patch_embed.proj.bias'] = state['patch_embed.proj.bias']
    out['rope_embed.periods'] = dinov3_periods(model.head_dim, model.rope_temperature)
    inv = {v: k for k, v in _DINO_MLP.items()}
    for k, v in state.items():
        if not k.startswith('blocks.'):
            continue
        if k.endswith(('attn.q_bias', 'attn.v_bias')):
            if k.endswith('q_bias'):
                base = k[:-len('q_bias')]
                q, vb = np.asarray(v), np.asarray(state[base + 'v_bias'])
                out[base + 'qkv.bias'] = np.concatenate([q, np.zeros_like(q), vb])
                out[base + 'qkv.bias_mask'] = np.concatenate([np.ones_like(q), np.zeros_like(q), np.ones_like(q)])
            continue
        k = re.sub(r'\.gamma_([12])$', lambda m: f'.ls{m.group(1)}.gamma', k)
        k = re.sub(r'\.mlp\.(fc1_g|fc1_x|fc2)\.', lambda m: f'.mlp.{inv[m.group(1)]}.', k) \
            if model.mlp_layer == 'swiglu' else k
        out[k] = v
    out['norm.weight'], out['norm.bias'] = state['norm.weight'], state['norm.bias']
    return out


# ---------------------------------------------------------------- EVA-02's release layout (baaivision/EVA)

_EVA02_RENAMES = [('mlp.ffn_ln', 'mlp.norm'), ('attn.inner_attn_ln', 'attn.norm'), ('mlp.w12', 'mlp.fc1'),
                  ('mlp.w1', 'mlp.fc1_g'), ('mlp.w2', 'mlp.fc1_x'), ('mlp.w3', 'mlp.fc2')]


def is_eva02(state) -> bool:
    """baaivision/EVA's EVA-02 keys: `mlp.ffn_ln`, `attn.inner_attn_ln` or `rope.freqs_cos`; or `mlp.w12` /
    `mlp.w1` where no DINOv2 key stands beside them (facebookresearch/dinov2's SwiGLU files have `mlp.w12` too,
    with `ls1.gamma` and `register_tokens`, which no EVA-02 release has: the ViT family reads those)."""
    if any(('.mlp.ffn_ln.' in k or '.attn.inner_attn_ln.' in k or 'rope.freqs_' in k) for k in state):
        return True
    dinov2 = 'register_tokens' in state or any('.ls1.gamma' in k for k in state)
    return not dinov2 and any('.mlp.w1' in k for k in state)


def eva02_to_timm(state) -> dict:
    """EVA-02's own files -> timm's keys, as timm's `checkpoint_filter_fn` reads them: RoPE buffers
    (`rope.freqs_cos/sin`, persistent there) dropped, `ffn_ln` -> `mlp.norm`, `inner_attn_ln` -> `attn.norm`,
    `w12` -> `fc1` (packed), `w1/w2/w3` -> `fc1_g/fc1_x/fc2`, and with separate q/k/v projections the `q_bias`,
    `v_bias` -> `q_proj.bias`, `v_proj.bias`. A MIM pre-training file (`mask_token`): `mask_token` and `lm_head`
    dropped and `norm` read as `fc_norm`, as timm does."""
    mim = 'mask_token' in state
    unfused = 'blocks.0.attn.q_proj.weight' in state
    out = {}
    for k, v in state.items():
        if 'rope' in k and k != 'rope.freqs':
            continue
        if mim and k in ('mask_token', 'lm_head.weight', 'lm_head.bias'):
            continue
        if mim and k in ('norm.weight', 'norm.bias'):
            k = 'fc_' + k
        for a, b in _EVA02_RENAMES:
            k = k.replace(a, b)
        if unfused:
            k = k.replace('q_bias', 'q_proj.bias').replace('v_bias', 'v_proj.bias')
        out[k] = v
    return out


def timm_to_eva02(state, model) -> dict:
    raise ConversionError("writing EVA-02's original layout is not supported (its code's persistent RoPE buffers "
                          "are not reproduced); write timm's layout, which EVA-02's timm port loads")


# ---------------------------------------------------------------- Sapiens2's release layout (Meta)

_SAPIENS2 = [('storage_tokens', 'reg_token'), ('patch_embed.projection.', 'patch_embed.proj.'),
             ('attn.wq.', 'attn.q_proj.'), ('attn.wk.', 'attn.k_proj.'), ('attn.wv.', 'attn.v_proj.'),
             ('attn.gamma.weight', 'gamma_1'), ('.ffn.w12.', '.mlp.fc1.'), ('.ffn.w3.', '.mlp.fc2.'),
             ('.ln1.', '.norm1.'), ('.ln2.', '.norm2.')]


def is_sapiens2(state) -> bool:
    return 'blocks.0.attn.wq.weight' in state and 'blocks.0.ffn.w12.weight' in state


def sapiens2_to_timm(state) -> dict:
    """Sapiens2's own keys -> timm's, as timm's `checkpoint_filter_fn` reads them (`storage_tokens`, `projection`,
    `wq/wk/wv`, the attention's `gamma`, `ffn.w12/w3`, `ln1/ln2`, the final `ln1` -> `norm`); `mask_token`
    (pre-training only) dropped."""
    out = {}
    for k, v in state.items():
        if k == 'mask_token':
            continue
        for a, b in _SAPIENS2:
            k = k.replace(a, b)
        if k.startswith('ln1.'):
            k = 'norm.' + k[len('ln1.'):]
        out[k] = v
    return out


def timm_to_sapiens2(state, model) -> dict:
    """timm's keys -> Sapiens2's (the inverse renames; no mask_token)."""
    if model.norm_layer != 'rmsnorm' or model.attn_type != 'rope' or model.qkv_fused or not model.attn_only_layer_scale \
            or model.mlp_layer != 'swiglu_packed' or not model.use_final_norm:
        raise ConversionError("Sapiens2's layout holds its own architecture: RMSNorm, separate q/k/v, packed SwiGLU, "
                              'attention-only LayerScale and the final norm')
    out = {}
    for k, v in state.items():
        if k.startswith('norm.'):
            k = 'ln1.' + k[len('norm.'):]
        for a, b in _SAPIENS2:
            k = k.replace(b, a) if b != 'gamma_1' else re.sub(r'\.gamma_1$', '.attn.gamma.weight', k)
        out[k] = v
    return out


# ---------------------------------------------------------------- Perception Encoder's release layout

_PE_SWAPS = [('conv1', 'patch_embed.proj'), ('positional_embedding', 'pos_embed'),
             ('transformer.resblocks.', 'blocks.'), ('ln_pre', 'norm_pre'), ('ln_post', 'norm'), ('ln_', 'norm'),
             ('ls_1.gamma', 'gamma_1'), ('ls_2.gamma', 'gamma_2'), ('in_proj_', 'qkv.'), ('out_proj', 'proj'),
             ('mlp.c_fc', 'mlp.fc1'), ('mlp.c_proj', 'mlp.fc2')]


def is_pe(state) -> bool:
    """A Perception Encoder vision tower (facebookresearch/perception_models), bare or under `visual.`: CLIP's
    keys (`conv1`, `transformer.resblocks`) with PE's LayerScale (`ls_1.gamma`) or attention pool (`attn_pool.probe`).
    PE's spatial T/S/B/L towers have neither: their keys are an open_clip ViT's (read them with that layout)."""
    for p in ('', 'visual.'):
        if p + 'conv1.weight' in state and (p + 'attn_pool.probe' in state
                                            or p + 'transformer.resblocks.0.ls_1.gamma' in state):
            return True
    return False


def pe_to_timm(state) -> dict:
    """perception_models' vision tower -> timm's keys, as timm's `_convert_pe` reads it: the `visual.` prefix
    stripped (other keys, a CLIP text tower, left out), CLIP's names to timm's, `class_embedding` (D,) -> (1, 1, D),
    `positional_embedding` (L, D) -> (1, L, D), the pool's fused `in_proj` split into `q` and `kv`, `proj` (D, E)
    -> `head.weight` (E, D) with a zero `head.bias` (PE has none)."""
    prefix = 'visual.' if any(k.startswith('visual.conv1') for k in state) else ''
    out = {}
    for k, v in state.items():
        if not k.startswith(prefix):
            continue
        k = k[len(prefix):]
        for a, b in _PE_SWAPS:
            k = k.replace(a, b)
        v = np.asarray(v)
        if k.startswith('attn_pool'):
            k = (k.replace('attn_pool.attn', 'attn_pool').replace('attn_pool.layernorm', 'attn_pool.norm')
                 .replace('attn_pool.probe', 'attn_pool.latent'))
            if k.startswith('attn_pool.qkv'):
                dim = v.shape[0] // 3
                kind = k.rsplit('.', 1)[1]
                out[f'attn_pool.q.{kind}'], out[f'attn_pool.kv.{kind}'] = v[:dim], v[dim:]
                continue
        elif k == 'proj':
            out['head.weight'] = np.ascontiguousarray(v.T)
            out['head.bias'] = np.zeros(v.shape[1], v.dtype)
            continue
        elif k == 'class_embedding':
            k, v = 'cls_token', v[None, None]
        elif k == 'pos_embed':
            v = v[None]
        out[k] = v
    return out


def timm_to_pe(state, model) -> dict:
    """timm's keys -> perception_models' vision tower keys (unprefixed, as its VisionTransformer's state_dict):
    the inverse of `pe_to_timm`; refused when the model is not one PE's code builds or has a nonzero head bias."""
    if model.attn_type != 'rope' or not model.pre_norm or not model.qkv_fused or not model.qkv_bias \
            or model.rope_type != 'cat' or model.rope_grid_indexing != 'xy' or model.mlp_layer != 'mlp' \
            or not model.use_abs_pos_emb or model.reg_tokens or model.use_fc_norm or model.qk_norm \
            or model.global_pool not in ('map', 'token', 'avg', ''):
        raise ConversionError("PE's VisionTransformer needs rope attention with a fused qkv bias, norm_pre, 'xy' "
                              'axial RoPE, absolute positions, a GELU MLP, no registers and no fc_norm')
    if 'head.bias' in state and np.any(np.asarray(state['head.bias'])):
        raise ConversionError("PE's projection has no bias: this model's head.bias is not zero")
    out = {}
    for k, v in state.items():
        v = np.asarray(v)
        if k == 'cls_token':
            out['class_embedding'] = v[0, 0]
            continue
        if k == 'pos_embed':
            out['positional_embedding'] = v[0]
            continue
        if k == 'head.weight':
            out['proj'] = np.ascontiguousarray(v.T)
            continue
        if k == 'head.bias':
            continue
        if k.startswith('attn_pool.'):
            if k.startswith(('attn_pool.q.', 'attn_pool.kv.')):
                if k.startswith('attn_pool.q.'):
                    kind = k.rsplit('.', 1)[1]
                    out[f'attn_pool.attn.in_proj_{kind}'] = np.concatenate([v, np.asarray(state[f'attn_pool.kv.{kind}'])])
                continue
            k = (k.replace('attn_pool.latent', 'attn_pool.probe').replace('attn_pool.norm', 'attn_pool.layernorm')
                 .replace('attn_pool.proj', 'attn_pool.attn.out_proj'))
            out[k] = v
            continue
        k = re.sub(r'\.norm([12])\.', lambda m: f'.ln_{m.group(1)}.', k)
        k = k.replace('norm_pre.', 'ln_pre.')
        if k.startswith('norm.'):
            k = 'ln_post.' + k[len('norm.'):]
        for a, b in (('patch_embed.proj', 'conv1'), ('blocks.', 'transformer.resblocks.'), ('gamma_1', 'ls_1.gamma'),
                     ('gamma_2', 'ls_2.gamma'), ('attn.qkv.', 'attn.in_proj_'), ('attn.proj', 'attn.out_proj'),
                     ('mlp.fc1', 'mlp.c_fc'), ('mlp.fc2', 'mlp.c_proj')):
            k = k.replace(a, b)
        out[k] = v
    return out


# ---------------------------------------------------------------- transformers' DINOv3ViTModel

def dinov3_vit_table(model, spelling: str, prefix: str = '') -> List[Rule]:
    """timm's Eva keys (the rules' flax side) <-> transformers' `DINOv3ViTModel` (its torch side), run both ways by
    `converters.rules`; arrays unchanged but the fused qkv split into rows. Hub spelling (what `save_pretrained`
    writes and the Hub holds): `embeddings.{cls_token, mask_token (1, 1, D), register_tokens,
    patch_embeddings.{weight,bias}}`, `layer.i.{norm1, attention.{q_proj, k_proj (no bias), v_proj, o_proj},
    layer_scale1.lambda1, norm2, mlp.{up_proj, down_proj} | mlp.{gate_proj, up_proj, down_proj},
    layer_scale2.lambda1}`, `norm`; transformers 5's own spelling has `model.layer.i.`. timm's `gamma_1/2` are
    `layer_scale{1,2}.lambda1`, `q_bias`/`v_bias` the q/v projections' biases, `mlp.fc1_g`/`fc1_x` (SwiGLU)
    `gate_proj`/`up_proj` (transformers' gated MLP: down(act(gate(x)) * up(x))). `mask_token` serves masked
    training only (dropped on read, written as zeros); RoPE periods are not stored (`rope_theta`)."""
    e, p = f'{prefix}embeddings.', prefix + ('layer.{i}.' if spelling == 'hub' else 'model.layer.{i}.')
    rules = [rule('cls_token', f'{e}cls_token')]
    if model.reg_tokens:
        rules.append(rule('reg_token', f'{e}register_tokens'))
    rules += renamed_rules('patch_embed.proj', f'{e}patch_embeddings')
    for i in range(model.depth):
        t, h = f'blocks.{i}.', p.format(i=i)
        rules += renamed_rules(f'{t}norm1', f'{h}norm1')
        a = f'{h}attention.'
        rules += qkv_rules(f'{t}attn.qkv', [f'{a}q_proj', f'{a}k_proj', f'{a}v_proj'], False)
        if model.qkv_bias:
            rules += [rule(f'{t}attn.q_bias', f'{a}q_proj.bias'), rule(f'{t}attn.v_bias', f'{a}v_proj.bias')]
        rules += renamed_rules(f'{t}attn.proj', f'{a}o_proj')
        rules += [rule(f'{t}gamma_1', f'{h}layer_scale1.lambda1'), rule(f'{t}gamma_2', f'{h}layer_scale2.lambda1')]
        rules += renamed_rules(f'{t}norm2', f'{h}norm2')
        if model.mlp_layer == 'swiglu':
            rules += renamed_rules(f'{t}mlp.fc1_g', f'{h}mlp.gate_proj')
            rules += renamed_rules(f'{t}mlp.fc1_x', f'{h}mlp.up_proj')
        else:
            rules += renamed_rules(f'{t}mlp.fc1', f'{h}mlp.up_proj')
        rules += renamed_rules(f'{t}mlp.fc2', f'{h}mlp.down_proj')
    return rules + renamed_rules('norm', f'{prefix}norm')


class EvaFamily(Family):
    name = 'eva'
    module_cls = Eva
    recorded_fields = ('num_heads', 'num_kv_heads', 'norm_eps', 'norm_layer', 'global_pool', 'fc_norm',
                       'use_post_transformer_norm', 'attn_type', 'block_fn', 'use_rot_pos_emb',
                       'rope_type', 'rope_grid_offset', 'rope_grid_indexing', 'rope_temperature', 'rope_rotate_half',
                       'ref_feat_shape', 'attn_pool_num_heads', 'dynamic_img_size', 'img_size')
    ignore_torch = ('attn.k_bias',)
    layouts = {'dinov3': (dinov3_to_timm, timm_to_dinov3), 'pe': (pe_to_timm, timm_to_pe),
               'eva02': (eva02_to_timm, timm_to_eva02), 'sapiens2': (sapiens2_to_timm, timm_to_sapiens2)}
    layout_models = ('dinov3', 'pe', 'eva02', 'sapiens2')
    layout_config = {'dinov3': (dict(global_pool='token'),
                                "DINOv3's code returns the normed class token; mask_token, rope_embed.periods, "
                                'bias_mask and the k third of qkv.bias (masked to zero) dropped, q/v biases too where '
                                'all are zero (the distilled releases), periods recomputed in float32'),
                     'eva02': ({}, "baaivision/EVA's EVA-02: RoPE buffers dropped (recomputed), ffn_ln/inner_attn_ln/"
                                   'w12/w1-w3 renamed; a MIM file loses mask_token and lm_head, its norm read as fc_norm'),
                     'sapiens2': ({}, "Sapiens2's own keys; mask_token (pre-training only) dropped"),
                     'pe': ({}, "perception_models' vision tower: CLIP's key names, proj read as the head with a "
                                'zero bias, the text tower (if any) left out')}
    # DINOv3's releases: 64-wide heads (its fused qkv does not record the count)
    head_width = {'dinov3': 64}
    # transformers' DINOv3 backbone (config.json: converters/hf_transformers.py)
    transformers_classes = {'DINOv3ViTModel': ('dinov3', '')}
    pos_key = 'pos_embed'
    timm_default_pool = 'avg'

    def transformers_table(self, model, cls: str, spelling: str, prefix: str) -> list:
        if cls != 'DINOv3ViTModel':
            return super().transformers_table(model, cls, spelling, prefix)
        return dinov3_vit_table(model, spelling, prefix)

    # ------------------------------------------------------------ detection

    def detect_torch(self, state) -> bool:
        if 'patch_embed.proj.weight' not in state or 'blocks.0.norm1.weight' not in state:
            return False
        if any('relative_position_bias_table' in k for k in state):
            return False   # BEiT
        keys = ('blocks.0.attn.q_bias', 'blocks.0.attn.q_proj.weight', 'blocks.0.mlp.fc1_g.weight', 'rope.freqs')
        if any(k in state for k in keys):
            return True
        return 'blocks.0.gamma_1' in state and ('norm_pre.weight' in state or 'pos_embed' not in state)

    def can_read(self, state) -> bool:
        """timm-layout keys of any Eva, including those a timm ViT shares (PE without LayerScale, RoPE-ViT _ape)."""
        return 'patch_embed.proj.weight' in state and 'blocks.0.norm1.weight' in state and not any(
            'relative_position_bias_table' in k for k in state)

    def detect_layout(self, state) -> str:
        """'pe' (`is_pe`), 'dinov3' (facebookresearch/dinov3: `storage_tokens`, or `rope_embed.periods`),
        'eva02' (`is_eva02`), 'sapiens2' (`is_sapiens2`, before DINOv3: both have storage tokens), else 'timm'."""
        if is_pe(state):
            return 'pe'
        if is_sapiens2(state):
            return 'sapiens2'
        if 'storage_tokens' in state or 'rope_embed.periods' in state:   # before EVA-02's: DINOv3 has w1/w2/w3 too
            return 'dinov3'
        return 'eva02' if is_eva02(state) else 'timm'

    def detect_flax(self, flat) -> bool:
        return 'patch_embed/kernel' in flat and 'blocks_0/attn/proj/kernel' in flat

    # ------------------------------------------------------------ the rule table

    def rules(self, model) -> List[Rule]:
        rules = [rule('patch_embed/kernel', 'patch_embed.proj.weight', CONV)]
        if not model.pre_norm:
            rules.append(rule('patch_embed/bias', 'patch_embed.proj.bias'))
        if model.class_token:
            rules.append(rule('cls_token', 'cls_token'))
        if model.reg_tokens:
            rules.append(rule('reg_token', 'reg_token'))
        if model.use_abs_pos_emb:
            rules.append(rule('pos_embed', 'pos_embed'))
        if model.use_rot_pos_emb and model.rope_type == 'mixed':
            rules.append(rule('rope_freqs', 'rope.freqs'))
        if model.pre_norm:
            rules += _norm(model, 'norm_pre', 'norm_pre')
        for i in range(model.depth):
            f, t = f'blocks_{i}', f'blocks.{i}'
            post = model.block_fn == 'res_post'
            if model.init_values is not None and not post:
                rules.append(rule(f'{f}/gamma_1', f'{t}.gamma_1'))
                if not model.attn_only_layer_scale:
                    rules.append(rule(f'{f}/gamma_2', f'{t}.gamma_2'))
            rules += _norm(model, f'{f}/norm1', f'{t}.norm1')
            a, ta = f'{f}/attn', f'{t}.attn'
            full = model.attn_type == 'rope' and model.qkv_bias
            if model.qkv_fused:
                rules += dense_rules(f'{a}/qkv', f'{ta}.qkv', bias=full)
                if model.qkv_bias and not full:
                    rules += [rule(f'{a}/q_bias', f'{ta}.q_bias'), rule(f'{a}/v_bias', f'{ta}.v_bias')]
            else:
                rules += dense_rules(f'{a}/q_proj', f'{ta}.q_proj', bias=model.qkv_bias)
                rules += dense_rules(f'{a}/k_proj', f'{ta}.k_proj', bias=full)
                rules += dense_rules(f'{a}/v_proj', f'{ta}.v_proj', bias=model.qkv_bias)
            if model.qk_norm:
                rules += _norm(model, f'{a}/q_norm', f'{ta}.q_norm') + _norm(model, f'{a}/k_norm', f'{ta}.k_norm')
            if model.scale_attn_norm:
                rules += _norm(model, f'{a}/norm', f'{ta}.norm')
            rules += dense_rules(f'{a}/proj', f'{ta}.proj')
            rules += _norm(model, f'{f}/norm2', f'{t}.norm2')
            m, tm = f'{f}/mlp', f'{t}.mlp'
            if model.mlp_layer == 'swiglu':
                rules += dense_rules(f'{m}/Dense_gate', f'{tm}.fc1_g') + dense_rules(f'{m}/Dense_0', f'{tm}.fc1_x')
            else:
                rules += dense_rules(f'{m}/Dense_0', f'{tm}.fc1')
            if model.scale_mlp_norm:
                rules += _norm(model, f'{m}/norm', f'{tm}.norm')
            rules += dense_rules(f'{m}/Dense_1', f'{tm}.fc2')
        if model.use_final_norm:
            rules += _norm(model, 'norm', 'norm')
        if model.global_pool == 'map':
            h = model.attn_pool_num_heads or model.num_heads
            f, t = 'attn_pool', 'attn_pool'
            mha = f'{f}/MultiHeadDotProductAttention_0'
            rules += [rule(f'{f}/probe', f'{t}.latent'),
                      rule(f'{mha}/query/kernel', f'{t}.q.weight', heads_in(h, 1)),
                      rule(f'{mha}/query/bias', f'{t}.q.bias', heads_in(h, 1, kernel=False)),
                      rule((f'{mha}/key/kernel', f'{mha}/value/kernel'), f'{t}.kv.weight', heads_in(h, 2)),
                      rule((f'{mha}/key/bias', f'{mha}/value/bias'), f'{t}.kv.bias', heads_in(h, 2, kernel=False)),
                      rule(f'{mha}/out/kernel', f'{t}.proj.weight', heads_out(h)),
                      rule(f'{mha}/out/bias', f'{t}.proj.bias')]
            rules += _norm(model, f'{f}/LayerNorm_0', f'{t}.norm')
            rules += dense_rules(f'{f}/MlpBlock_0/Dense_0', f'{t}.mlp.fc1')
            rules += dense_rules(f'{f}/MlpBlock_0/Dense_1', f'{t}.mlp.fc2')
        if model.use_fc_norm:
            rules += _norm(model, 'fc_norm', 'fc_norm')
        if model.num_classes > 0:
            rules += dense_rules('head', 'head')
        return rules

    # ------------------------------------------------------------ architecture read off a checkpoint

    def _config(self, has, shape) -> dict:
        """The fields a tree records, through `has(key)` (None: every key) and `shape(key)` (torch's shape) on
        timm's keys."""
        w = shape('patch_embed.proj.weight')
        dim = w[0]
        depth = 1 + max(int(m.group(1)) for m in map(_BLOCK.match, has(None)) if m)
        b = 'blocks.0.'
        fused = has(b + 'attn.qkv.weight')
        full = has(b + 'attn.qkv.bias') or has(b + 'attn.k_proj.bias')
        qkv_bias = full or has(b + 'attn.q_bias') or has(b + 'attn.q_proj.bias')
        swiglu = has(b + 'mlp.fc1_g.weight')
        hidden = shape(b + ('mlp.fc1_g.weight' if swiglu else 'mlp.fc1.weight'))[0]
        heads = None
        if has(b + 'attn.q_norm.weight'):
            heads = dim // shape(b + 'attn.q_norm.weight')[0]
        elif has('rope.freqs'):
            heads = shape('rope.freqs')[2]
        cfg = dict(embed_dim=dim, in_chans=w[1], patch_size=tuple(w[2:]), depth=depth,
                   pre_norm=has('norm_pre.weight'), class_token=has('cls_token'),
                   reg_tokens=shape('reg_token')[1] if has('reg_token') else 0,
                   use_abs_pos_emb=has('pos_embed'), qkv_fused=fused,
                   attn_type='rope' if full else 'eva', qkv_bias=qkv_bias,
                   mlp_layer='swiglu' if swiglu else 'fc1', scale_mlp_norm=has(b + 'mlp.norm.weight'),
                   scale_attn_norm=has(b + 'attn.norm.weight'), qk_norm=has(b + 'attn.q_norm.weight'),
                   norm_layer='layernorm' if has(b + 'norm1.bias') else 'rmsnorm',
                   num_classes=shape('head.weight')[0] if has('head.weight') else 0,
                   mixed_rope=has('rope.freqs'), layer_scale=has(b + 'gamma_1'),
                   attn_only_layer_scale=has(b + 'gamma_1') and not has(b + 'gamma_2'),
                   map_pool=has('attn_pool.latent'), fc_norm=has('fc_norm.weight'), final_norm=has('norm.weight'),
                   mlp_hidden=hidden, num_heads=heads,
                   pos_rows=shape('pos_embed')[1] if has('pos_embed') else None)
        return cfg

    def config_from_torch(self, state) -> dict:
        return self._config(lambda key: list(state) if key is None else key in state,
                            lambda key: tuple(np.shape(state[key])))

    def config_from_flax(self, flat) -> dict:
        """The same fields off a flat Flax tree: its names spelled as timm's, its shapes as torch's."""
        t = torch_shapes_of_flax(flat)
        return self._config(lambda key: list(t) if key is None else key in t, lambda key: t[key])

    def resolve(self, cfg: dict, arch, layout: str, model_name, path: str):
        """A DINOv3 file of no registered size: 64-wide heads (the release's convention), said out loud. The
        layout is kept (`release`) so that a release's file takes that release's names (`preference`)."""
        note = self.heads_by_convention(cfg, arch, layout, model_name, path)
        cfg = dict(cfg, release=layout)
        return cfg, arch, [note] if note else []

    _RELEASE_TAG = {'dinov3': 'dinov3', 'pe': '_pe_', 'eva02': 'eva02', 'sapiens2': 'sapiens2'}

    def preference(self, cfg: dict, name: str, model) -> tuple:
        """As the base class's, after one rule: a release's own file prefers that release's names (a DINOv3 hub
        file is a `vit_*_dinov3`, not the LingBot model of the same sizes)."""
        tag = self._RELEASE_TAG.get(cfg.get('release'))
        return (0 if tag is None or tag in name else 1,) + super().preference(cfg, name, model)

    _CORE = ('embed_dim', 'depth', 'patch_size', 'in_chans', 'pre_norm', 'class_token', 'reg_tokens',
             'use_abs_pos_emb', 'qkv_fused', 'attn_type', 'qkv_bias', 'mlp_layer', 'scale_mlp_norm',
             'scale_attn_norm', 'qk_norm', 'norm_layer')

    def core(self, model) -> dict:
        kw = {k: getattr(model, k) for k in self._CORE}
        kw['patch_size'] = to_tuple(model.patch_size, 2)
        # what the keys say: one `fc1` (a GELU MLP or a packed SwiGLU, the registered name tells which) or
        # `fc1_g` + `fc1_x`; without biases, EVA's attention and timm's AttentionRope hold the same weights
        kw['mlp_layer'] = 'swiglu' if model.mlp_layer == 'swiglu' else 'fc1'
        if not model.qkv_bias and model.num_kv_heads is None:
            kw['attn_type'] = 'eva'
        return kw

    def with_core(self, model, cfg: dict):
        core = self.core(model)
        kw = {k: cfg[k] for k in core if cfg.get(k) is not None and cfg[k] != core[k]}
        if kw.get('mlp_layer') == 'fc1':
            kw['mlp_layer'] = 'mlp'
        if kw.get('attn_type') == 'eva' and not cfg.get('qkv_bias'):
            del kw['attn_type']
        return model.clone(**kw)

    def overrides(self, cfg: dict, model) -> dict:
        """num_classes, num_heads (when recorded), the LayerScale / pooling norms and the MLP width a file records
        beyond the core fields; img_size when the absolute table is for another grid."""
        kw = {}
        if cfg.get('global_pool') is not None and cfg['global_pool'] != model.global_pool:
            kw['global_pool'] = cfg['global_pool']
        if cfg.get('num_classes') is not None and cfg['num_classes'] != model.num_classes:
            kw['num_classes'] = cfg['num_classes']
        if cfg.get('num_heads') and cfg['num_heads'] != model.num_heads:
            kw['num_heads'] = cfg['num_heads']
        if cfg.get('layer_scale') is not None and cfg['layer_scale'] != (model.init_values is not None):
            kw['init_values'] = 1e-5 if cfg['layer_scale'] else None
        if cfg.get('fc_norm') is not None and cfg['fc_norm'] != model.use_fc_norm:
            kw['fc_norm'] = cfg['fc_norm']
        if cfg.get('final_norm') is not None and cfg['final_norm'] != model.use_final_norm:
            kw['use_post_transformer_norm'] = cfg['final_norm']
        if cfg.get('map_pool') is not None and cfg['map_pool'] != (model.global_pool == 'map'):
            raise ValueError(f"the checkpoint {'has' if cfg['map_pool'] else 'has no'} attention pool; "
                             f'the model {"has" if model.global_pool == "map" else "has not"}')
        m = model.clone(**kw)
        if cfg.get('mlp_hidden') is not None and cfg['mlp_hidden'] != m.mlp_hidden:
            per = cfg['mlp_hidden'] / (2 if m.mlp_layer == 'swiglu_packed' else 1)
            kw['mlp_ratio'] = per / m.embed_dim
            kw['swiglu_align_to'] = 0
        if cfg.get('pos_rows') is not None and not m.dynamic_img_size:
            n = cfg['pos_rows'] - (0 if m.no_embed_class else m.num_prefix_tokens)
            hint = cfg.get('img_size_hint')
            if n != int(np.prod(m.grid_size)) and hint is not None \
                    and int(np.prod(m.clone(img_size=hint).grid_size)) == n:
                kw['img_size'] = hint
            elif n != int(np.prod(m.grid_size)):
                side = int(round(n ** 0.5))
                if side * side != n:
                    raise ValueError(f'{n} positions are not a square grid; pass img_size (HxW)')
                p = to_tuple(m.patch_size, 2)
                kw['img_size'] = (side * p[0], side * p[1]) if p[0] != p[1] else side * p[0]
        return kw

    # ------------------------------------------------------------ timm

    def timm_kwargs(self, model) -> dict:
        """Arguments that make `timm.create_model(name, **kw)` build `model`'s architecture (timm's Eva)."""
        from functools import partial
        from timm.layers import LayerNorm, RmsNorm
        img = to_tuple(model.img_size, 2)
        kw = dict(num_classes=model.num_classes, img_size=img, patch_size=to_tuple(model.patch_size, 2),
                  in_chans=model.in_chans, global_pool=model.global_pool, embed_dim=model.embed_dim,
                  depth=model.depth, num_heads=model.num_heads, num_kv_heads=model.num_kv_heads,
                  qkv_bias=model.qkv_bias, qkv_fused=model.qkv_fused, qk_norm=model.qk_norm,
                  mlp_ratio=model.mlp_ratio, swiglu_mlp=model.mlp_layer != 'mlp',
                  swiglu_align_to=model.swiglu_align_to, scale_mlp=model.scale_mlp_norm,
                  scale_attn_inner=model.scale_attn_norm, attn_type=model.attn_type, drop_rate=model.drop_rate,
                  pos_drop_rate=model.pos_drop_rate, patch_drop_rate=model.patch_drop_rate,
                  proj_drop_rate=model.proj_drop_rate, attn_drop_rate=model.attn_drop_rate,
                  drop_path_rate=model.drop_path_rate,
                  norm_layer=partial(RmsNorm if model.norm_layer == 'rmsnorm' else LayerNorm, eps=model.norm_eps),
                  init_values=model.init_values, attn_only_layer_scale=model.attn_only_layer_scale,
                  class_token=model.class_token, num_reg_tokens=model.reg_tokens,
                  no_embed_class=model.no_embed_class, use_abs_pos_emb=model.use_abs_pos_emb,
                  use_rot_pos_emb=model.use_rot_pos_emb, rope_type=model.rope_type,
                  rope_grid_offset=model.rope_grid_offset, rope_grid_indexing=model.rope_grid_indexing,
                  rope_temperature=model.rope_temperature, rope_rotate_half=model.rope_rotate_half,
                  rope_shift_coords=model.rope_shift_coords, rope_jitter_coords=model.rope_jitter_coords,
                  rope_rescale_coords=model.rope_rescale_coords, use_post_norm=model.block_fn == 'res_post',
                  use_pre_transformer_norm=model.pre_norm,
                  use_post_transformer_norm=model.use_post_transformer_norm, use_fc_norm=model.fc_norm,
                  attn_pool_num_heads=model.attn_pool_num_heads, attn_pool_mlp_ratio=model.attn_pool_mlp_ratio,
                  dynamic_img_size=model.dynamic_img_size,
                  ref_feat_shape=None if model.ref_feat_shape is None else to_tuple(model.ref_feat_shape, 2))
        if model.mlp_layer == 'swiglu' and not (model.scale_mlp_norm or model.swiglu_align_to):
            raise ValueError("timm builds a SwiGLU with separate gate weights only with scale_mlp or swiglu_align_to")
        if model.mlp_layer == 'swiglu_packed' and (model.scale_mlp_norm or model.swiglu_align_to):
            raise ValueError('timm builds a packed SwiGLU only without scale_mlp and swiglu_align_to')
        return kw

    def torch_model(self, model, model_name: str):
        from ..optional import require
        timm = require('timm', 'vit-flax parity')
        return timm.create_model(model_name, pretrained=False, **self.timm_kwargs(model))

    def parity_points(self, model):
        pts = [(f'block {i}', f'block_{i}', f'blocks.{i}') for i in range(model.depth)]
        if model.use_final_norm:
            pts.append(('norm', 'encoded', 'norm'))
        return pts

    def describe(self, ck) -> str:
        return f'Eva ({ck.layout})'


FAMILY = EvaFamily()
