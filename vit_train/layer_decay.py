"""Layer-wise learning-rate decay and weight-decay flags as timm's `param_groups_layer_decay`, per parameter.

Layer ids are timm's: each of our parameters is named by its timm name (the converters' rule table of its
family: `Transformer/encoderblock_3/...` is `blocks.3....`), and the timm name is grouped by timm's
`group_matcher(coarse=False)` regexes with timm's `group_with_matcher` ordering:
- ViT / DeiT: `cls_token|reg_token|pos_embed|patch_embed|norm_pre|dist_token` id 0, `blocks.i` id i+1, the
  final `norm` merged with the last block, everything else (head, head_dist, fc_norm, attn_pool) the last id;
- Swin (V1, V2): `patch_embed` (and V2's `absolute_pos_embed`) id 0, blocks numbered across stages,
  `layers.i.downsample` with block 0 of stage i, the final `norm` with the last block, the head last.
- Swin V2 CR: the same over `stages.i` (no final `norm`: the last block's `norm3` is that block's).
- MLP-Mixer, ResMLP, gMLP: `stem` id 0, `blocks.i` id i+1, the final `norm` with the last block, the head last.
- CaiT (timm's function matcher): `cls_token|pos_embed|patch_embed` 0, `blocks.i` i+1, `blocks_token_only.j`
  j + depth - depth_token_only + 1 (with the last blocks), the final `norm` with the last block, the head last.
With n ids, id i gets lr x decay^(n-1-i). Weight decay as timm: none for 1-d tensors and for the model's
`no_weight_decay` names (positions, tokens, Swin's relative-position tables), which is exactly our rule of
decaying Dense/Conv kernels only (`optim.decays`); param_groups.json records both so that is checked.
"""
import fnmatch
import json
import re
from itertools import chain
from typing import Dict

from converters.families import family_of

from .errors import TrainError

_MERGE = 99999.0   # timm's MATCH_PREV_GROUP
VIT_MATCHER = dict(stem=r'^cls_token|reg_token|pos_embed|patch_embed|norm_pre|dist_token',
                   blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])
SWIN_MATCHER = dict(stem=r'^absolute_pos_embed|patch_embed',
                    blocks=[(r'^layers\.(\d+).downsample', (0,)), (r'^layers\.(\d+)\.\w+\.(\d+)', None),
                            (r'^norm', (99999,))])
MIXER_MATCHER = dict(stem=r'^stem', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])
# Swin V2 CR: timm's SwinTransformerV2Cr.group_matcher (no final norm: the last block's norm3 is in its block)
SWIN_CR_MATCHER = dict(stem=r'^patch_embed',
                       blocks=[(r'^stages\.(\d+).downsample', (0,)), (r'^stages\.(\d+)\.\w+\.(\d+)', None)])


def cait_matcher(model):
    """timm's `Cait.group_matcher` (a function there): patch embedding, positions and class token 0, `blocks.i` i+1,
    the class-attention blocks overlapping the last self-attention blocks (`blocks_token_only.j` j + depth -
    depth_token_only + 1), the final norm with the last block, the head last."""
    offset = model.depth - model.depth_token_only + 1

    def match(name):
        if name.startswith(('cls_token', 'pos_embed', 'patch_embed')):
            return (0.0,)
        if name.startswith(('blocks.', 'blocks_token_only.')):
            return (float(int(name.split('.')[1]) + (1 if name.startswith('blocks.') else offset)),)
        return (float(model.depth),) if name.startswith('norm.') else (float('inf'),)
    return match


# timm's model.no_weight_decay() (fnmatch patterns, as create_optimizer_v2 passes them)
NO_WEIGHT_DECAY = {'vit': ('pos_embed', 'cls_token', 'dist_token', 'reg_token'),
                   'swin': ('*relative_position_bias_table*',),
                   'swinv2': ('absolute_pos_embed', '*relative_position_bias_table*', '*cpb_mlp*', '*logit_scale*'),
                   'mixer': (), 'cait': ('pos_embed', 'cls_token'), 'swinv2_cr': ()}
# a regex spec as timm's dict matchers, or a function of the model giving timm's function matcher
MATCHERS = {'vit': VIT_MATCHER, 'swin': SWIN_MATCHER, 'swinv2': SWIN_MATCHER, 'mixer': MIXER_MATCHER,
            'cait': cait_matcher, 'swinv2_cr': SWIN_CR_MATCHER}


def layer_ids(names, matcher) -> Dict[str, int]:
    """timm's `group_with_matcher(names, matcher, reverse=True)`: name -> dense layer id. `matcher`: a dict of
    regex specs, or a function name -> ordinal tuple."""
    compiled = []
    for ordinal, spec in enumerate(matcher.values() if isinstance(matcher, dict) else ()):
        for regex, suffix in (spec if isinstance(spec, (list, tuple)) else [(spec, None)]):
            compiled.append((re.compile(regex), (ordinal,), suffix))

    def grouping(name):
        if not isinstance(matcher, dict):
            return matcher(name)
        for regex, prefix, suffix in compiled:
            m = regex.match(name)
            if m:
                return tuple(map(float, chain.from_iterable(filter(None, (prefix, m.groups(), suffix)))))
        return (float('inf'),)

    groups = {}
    for n in names:
        groups.setdefault(grouping(n), []).append(n)
    out, lid = {}, -1
    for k in sorted(groups):
        if lid < 0 or k[-1] != _MERGE:
            lid += 1
        for n in groups[k]:
            out[n] = lid
    return out


def timm_names(model) -> Dict[str, list]:
    """timm parameter name -> our flat '/' keys it is made of (the converters' rule table of the family)."""
    out = {}
    for r in family_of(model).rules(model):
        for t in r.torch:
            out.setdefault(t, []).extend(r.flax)
    return out


def param_groups(model, flat_shapes: Dict[str, tuple], layer_decay: float, decays) -> dict:
    """{timm name: {'ours': [keys], 'layer_id', 'lr_scale', 'weight_decay' (ours), 'timm_weight_decay'}} for
    every parameter; `flat_shapes` our flat key -> shape, `decays(key)` our weight-decay rule."""
    fam = family_of(model)
    if fam.name not in MATCHERS:
        raise TrainError(f'--layer-decay: no timm layer grouping for the {fam.name} family '
                         f'(ViT, DeiT, Swin, Swin V2 CR, Mixer, CaiT only)')
    names = timm_names(model)
    covered = {k for ks in names.values() for k in ks}
    missing = sorted(set(flat_shapes) - covered)
    if missing:
        raise TrainError(f'--layer-decay: parameter {missing[0]} has no timm name in the {fam.name} rule table')
    matcher = MATCHERS[fam.name]
    ids = layer_ids(list(names), matcher if isinstance(matcher, dict) else matcher(model))
    last = max(ids.values())
    no_wd = NO_WEIGHT_DECAY[fam.name]
    out = {}
    for t, ours in names.items():
        ours = [k for k in ours if k in flat_shapes]
        if not ours:
            continue
        # timm's tensor is 1-d where ours is, and for every bias and norm scale (Google's q/k/v biases are
        # (heads, head_dim), timm's fused qkv bias is 1-d); ResMLP's Affine alpha/beta are (1, 1, D) there, which
        # timm does decay, and ours (D,) not
        one_d = all(len(flat_shapes[k]) <= 1 or k.rsplit('/', 1)[-1] in ('bias', 'scale') for k in ours) \
            and not t.endswith(('.alpha', '.beta'))
        out[t] = dict(ours=ours, layer_id=ids[t], lr_scale=float(layer_decay ** (last - ids[t])),
                      weight_decay=all(decays(k) for k in ours),
                      timm_weight_decay=not (one_d or any(fnmatch.fnmatch(t, p) for p in no_wd)))
    return out


def scales(groups: dict) -> Dict[str, float]:
    """Our flat key -> its learning-rate multiplier."""
    return {k: g['lr_scale'] for g in groups.values() for k in g['ours']}


def write(path: str, groups: dict, layer_decay: float) -> None:
    from converters.formats import paths
    paths.makedirs(paths.dirname(path))
    record = dict(layer_decay=layer_decay, num_layers=max(g['layer_id'] for g in groups.values()) + 1,
                  params=groups)
    paths.write_text(path, json.dumps(record, indent=1))
