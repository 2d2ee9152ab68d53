"""lucidrains' vit-pytorch `ViT`: the Flax tree <-> its state_dicts, one rule table, and its releases' layouts.

The table speaks the current layout (`vit-pytorch`, releases 1.17 on). Older releases saved the same
weights under other keys or shapes; each is a named layout, read and written by renaming only (read
here: 0.6.8, 0.7.0, 0.10.1 to 0.40.2, 1.0.0 to 1.2.9, 1.4.0 to 1.16.0, 1.17.0, 1.22.0, 1.26.11):

| layout | releases | differs from the current one by |
|---|---|---|
| `vit-pytorch` | 1.17 on | (the table) `cls_token` (n, dim), n = 0 under `pool='mean'`; `pos_embedding` (N + n, dim) |
| `vit-pytorch-1.16` | 1.4 - 1.16 | tables (1, n, dim) and (1, N + n, dim) |
| `vit-pytorch-1.2` | 0.10 - 1.2 | tables as 1.16; PreNorm wrappers (`layers.{i}.{0,1}.norm`, `.fn.to_qkv`, |
| | | `.fn.to_out.0`, `.fn.net.{0,3}`); `mlp_head.{0: LayerNorm, 1: Linear}` |
| `vit-pytorch-0.7` | 0.7 | as 1.2 inside `Residual`: `.fn.norm`, `.fn.fn.*` |
| `vit-pytorch-0.6` | 0.6 | as 0.7, the patch Linear named `patch_to_embedding` |

Releases before 0.6 (e.g. 0.2: no `pool`, attention scaled by dim ** -0.5, a two-layer MLP head) are not read.

What the keys cannot say: `heads` vs `dim_head` (a fused `to_qkv` holds heads x dim_head rows, see
`ViTPytorchFamily.resolve`), and, before 1.16, whether a file with a class token was pooled by `cls` or `mean`
(those releases keep the token under mean pooling and average it in). Both are taken from the caller's
overrides, else said out loud.
"""
import re
from math import isqrt
from typing import Dict, List

import numpy as np

from vit_flax.models.layers import to_tuple
from vit_flax.models.vit_pytorch import LucidViT
from vit_flax.registry import create_model, list_models, model_config

from ..errors import ConversionError
from ..rules import Transform, dense_rules, heads_in, heads_out, norm_rules, rule
from .base import Family
from .vit import img_size_override

CURRENT = 'vit-pytorch'
# a (1, n, dim) Flax table <-> a vit-pytorch >= 1.17 (n, dim) table
_BATCH_AXIS = Transform('drop_batch_axis', lambda a: [a[0][0]], lambda a: [a[0][None]])


def _no_class_token(dim: int) -> Transform:
    # vit-pytorch >= 1.16 keeps an empty cls_token (0, dim) under pool='mean'; the Flax model has none.
    def to_flax(arrays):
        if arrays[0].size:
            raise ValueError(f'the model has no class token, the file has {arrays[0].shape[0]} row(s)')
        return []
    return Transform('no_class_token', lambda a: [np.zeros((0, dim), np.float32)], to_flax)


# ---------------------------------------------------------------- the older releases' layouts
# Each step is one table of key-prefix renames (or a reshape) run both ways, so reading cannot drift from
# writing; an older layout is the current one put through its steps in order.

_BLOCK = re.compile(r'^(transformer\.layers\.\d+\.)(.*)$')
# inside a block: current names -> PreNorm(dim, fn) wrappers (<= 1.2; the attention's own norm keeps its name)
_PRENORM = {'0.to_qkv.': '0.fn.to_qkv.', '0.to_out.': '0.fn.to_out.', '1.net.0.': '1.norm.',
            '1.net.1.': '1.fn.net.0.', '1.net.4.': '1.fn.net.3.'}
# inside a block: PreNorm names -> Residual(PreNorm(dim, fn)) wrappers (0.6, 0.7)
_RESIDUAL = {'0.norm.': '0.fn.norm.', '0.fn.': '0.fn.fn.', '1.norm.': '1.fn.norm.', '1.fn.': '1.fn.fn.'}
# top level: 0.6 applied the patch Linear directly
_PATCH_LINEAR = {'to_patch_embedding.1.': 'patch_to_embedding.'}


def _renames(table: Dict[str, str], in_blocks: bool):
    """(forward, inverse) key renaming by the longest matching prefix of `table` (block-relative or top-level)."""
    def run(mapping):
        prefixes = sorted(mapping, key=len, reverse=True)

        def rename(state):
            out = {}
            for k, v in state.items():
                m = _BLOCK.match(k)
                head, rest = (m.group(1), m.group(2)) if m else ('', k)
                if bool(m) == in_blocks:
                    p = next((p for p in prefixes if rest.startswith(p)), None)
                    rest = mapping[p] + rest[len(p):] if p else rest
                out[head + rest] = v
            return out
        return rename
    return run(table), run({v: k for k, v in table.items()})


def _tables_3d(state):
    return {k: v[None] if k in ('cls_token', 'pos_embedding') else v for k, v in state.items()}


def _tables_2d(state):
    for k in ('cls_token', 'pos_embedding'):
        if k not in state:
            raise ConversionError(f'missing torch key {k!r}')
        if state[k].ndim != 3 or state[k].shape[0] != 1:
            raise ConversionError(f'torch key {k!r}: expected shape (1, n, dim), found {tuple(state[k].shape)}')
    return {k: v[0] if k in ('cls_token', 'pos_embedding') else v for k, v in state.items()}


def _prenorm_holds(state):
    """Releases <= 1.2 norm the pooled vector (mlp_head.0) and always have a class token."""
    if 'transformer.norm.weight' in state:
        raise ConversionError("vit-pytorch <= 1.2 has no transformer.norm: this model norms the tokens "
                              "(final_norm='tokens'); write the vit-pytorch or vit-pytorch-1.16 layout")
    if state['cls_token'].shape[0] != 1:
        raise ConversionError('vit-pytorch <= 1.15 always has a class token: this model has none')
    return state


_TO_PRENORM, _FROM_PRENORM = _renames(_PRENORM, in_blocks=True)
_STEPS = {  # name: (current -> older, older -> current)
    'tables': (_tables_3d, _tables_2d),
    'prenorm': (lambda s: _TO_PRENORM(_prenorm_holds(s)), _FROM_PRENORM),
    'residual': _renames(_RESIDUAL, in_blocks=True),
    'patch_linear': _renames(_PATCH_LINEAR, in_blocks=False),
}


def _layout(*steps):
    """(read: older -> current, write: current -> older) for an older layout made of `steps`, in order."""
    def read(state):
        for name in reversed(steps):
            state = _STEPS[name][1](state)
        return state

    def write(state):
        for name in steps:
            state = _STEPS[name][0](state)
        return state
    return read, write


LAYOUTS = {
    'vit-pytorch-1.16': _layout('tables'),
    'vit-pytorch-1.2': _layout('tables', 'prenorm'),
    'vit-pytorch-0.7': _layout('tables', 'prenorm', 'residual'),
    'vit-pytorch-0.6': _layout('tables', 'prenorm', 'residual', 'patch_linear'),
}


# ---------------------------------------------------------------- architecture read off a checkpoint
# Helpers of the family methods below (`config_from_*`, `core`, `overrides`; `resolve` for what keys cannot say).

def _count(keys, pattern) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys for m in [rx.match(k)] if m})


def _patch_and_channels(patch_dim: int, arch: dict, path: str):
    """(patch (ph, pw), channels) from a (p1 p2 c) patch dimension: the caller's values, else square
    patches of 3 channels (vit-pytorch's default), else of 1."""
    if arch.get('patch_size') is not None:
        ph, pw = to_tuple(arch['patch_size'], 2)
        c = arch.get('in_chans') or patch_dim // (ph * pw)
        if c * ph * pw == patch_dim:
            return (ph, pw), c
    else:
        for c in ([arch['in_chans']] if arch.get('in_chans') else [3, 1]):
            side = isqrt(patch_dim // c)
            if side * side * c == patch_dim:
                return (side, side), c
    raise ConversionError(f'{path}: a patch of {patch_dim} values (p1 x p2 x channels) does not fit '
                          f"patch_size={arch.get('patch_size')}, in_chans={arch.get('in_chans')}; pass both")


CORE = ('dim', 'depth', 'heads', 'dim_head', 'mlp_dim', 'patch_size')


class ViTPytorchFamily(Family):
    """`vit_flax.LucidViT`: lucidrains' vit-pytorch `ViT`, in the layouts of its releases."""
    name = 'vit-pytorch'
    module_cls = LucidViT
    recorded_fields = ('heads', 'dim_head', 'pool', 'class_token', 'final_norm', 'img_size')
    layouts = LAYOUTS
    torch_layout = CURRENT
    pos_key = 'pos_embedding'
    in_timm = False

    def rules(self, model) -> List:
        """The map for a `vit_flax.LucidViT` instance, in the current vit-pytorch layout."""
        h, pe = model.heads, 'to_patch_embedding'
        if model.patch_norm:
            rules = (norm_rules('patch_embed/pixel_norm', f'{pe}.1') + dense_rules('patch_embed/proj', f'{pe}.2')
                     + norm_rules('patch_embed/norm', f'{pe}.3'))
        else:
            rules = dense_rules('patch_embed/proj', f'{pe}.1')
        rules.append(rule('cls', 'cls_token', _BATCH_AXIS) if model.has_class_token
                     else rule((), 'cls_token', _no_class_token(model.dim)))
        rules.append(rule('pos_embedding', 'pos_embedding', _BATCH_AXIS))
        for i in range(model.depth):
            f, t = f'Transformer/layers_{i}', f'transformer.layers.{i}'
            rules += norm_rules(f'{f}/attn/norm', f'{t}.0.norm')
            qkv = tuple(f'{f}/attn/{n}/kernel' for n in ('query', 'key', 'value'))
            rules.append(rule(qkv, f'{t}.0.to_qkv.weight', heads_in(h, 3)))
            if model.project_out:
                rules += [rule(f'{f}/attn/out/kernel', f'{t}.0.to_out.0.weight', heads_out(h)),
                          rule(f'{f}/attn/out/bias', f'{t}.0.to_out.0.bias')]
            rules += norm_rules(f'{f}/ff/norm', f'{t}.1.net.0')
            rules += dense_rules(f'{f}/ff/mlp/Dense_0', f'{t}.1.net.1')
            rules += dense_rules(f'{f}/ff/mlp/Dense_1', f'{t}.1.net.4')
        if model.final_norm == 'tokens':
            rules += norm_rules('Transformer/norm', 'transformer.norm')
            head = 'mlp_head'
        else:
            rules += norm_rules('head_norm', 'mlp_head.0')
            head = 'mlp_head.1'
        if model.num_classes > 0:
            rules += dense_rules('head', head)
        return rules

    def parity_points(self, model):
        """(label, flax intermediate, vit_pytorch.ViT module): its blocks are not modules, so embed and norm only."""
        return [('embed', 'Transformer/embed', 'dropout'), ('norm', 'Transformer/encoded', 'transformer')]

    def detect_torch(self, state) -> bool:
        return 'pos_embedding' in state and any(k.startswith('transformer.layers.') for k in state)

    def detect_flax(self, flat) -> bool:
        return 'Transformer/layers_0/attn/query/kernel' in flat

    def config_from_flax(self, flat) -> dict:
        patch_dim, dim = flat['patch_embed/proj/kernel'].shape
        _, heads, dim_head = flat['Transformer/layers_0/attn/query/kernel'].shape
        n_cls = int('cls' in flat)
        return dict(dim=dim, depth=_count(flat, r'^Transformer/layers_(\d+)/'), inner=heads * dim_head, heads=heads,
                    dim_head=dim_head, mlp_dim=flat['Transformer/layers_0/ff/mlp/Dense_0/kernel'].shape[1],
                    patch_dim=patch_dim, patch_norm='patch_embed/norm/scale' in flat, class_token=bool(n_cls),
                    pool='cls' if n_cls else 'mean', final_norm='pooled' if 'head_norm/scale' in flat else 'tokens',
                    num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else 0,
                    num_patches=flat['pos_embedding'].shape[1] - n_cls)

    def config_from_torch(self, state) -> dict:
        """Fields of `LucidViT` read off a current-layout state_dict; `heads`/`dim_head` None unless there is no
        output projection (vit-pytorch drops it exactly when heads == 1 and dim_head == dim)."""
        patch_norm = 'to_patch_embedding.3.weight' in state
        patch_dim = state['to_patch_embedding.2.weight' if patch_norm else 'to_patch_embedding.1.weight'].shape[1]
        dim = state['pos_embedding'].shape[-1]
        n_cls = state['cls_token'].shape[0]
        project_out = 'transformer.layers.0.0.to_out.0.weight' in state
        head = state.get('mlp_head.weight', state.get('mlp_head.1.weight'))
        return dict(dim=dim, depth=_count(state, r'^transformer\.layers\.(\d+)\.'),
                    inner=state['transformer.layers.0.0.to_qkv.weight'].shape[0] // 3,
                    heads=None if project_out else 1, dim_head=None if project_out else dim,
                    mlp_dim=state['transformer.layers.0.1.net.1.weight'].shape[0], patch_dim=patch_dim,
                    patch_norm=patch_norm, class_token=n_cls > 0, pool='cls' if n_cls else 'mean',
                    final_norm='tokens' if 'transformer.norm.weight' in state else 'pooled',
                    num_classes=head.shape[0] if head is not None else 0,
                    num_patches=state['pos_embedding'].shape[0] - n_cls)

    def core(self, model) -> dict:
        return {k: model.patch_size_tuple if k == 'patch_size' else getattr(model, k) for k in CORE}

    def overrides(self, cfg: dict, model) -> dict:
        """Overrides that make `model` (already holding the file's core fields) hold exactly the checkpoint."""
        kw = {k: cfg[k] for k in ('num_classes', 'in_chans', 'pool', 'patch_norm', 'final_norm')
              if cfg[k] != getattr(model, k)}
        if cfg['class_token'] != model.clone(**kw).has_class_token:  # a class token under mean pooling (< 1.16)
            kw['class_token'] = cfg['class_token']
        img = img_size_override(cfg, model.clone(**kw))
        return {**kw, **({'img_size': img} if img is not None else {})}

    def detect_layout(self, state) -> str:
        if 'patch_to_embedding.weight' in state:
            return 'vit-pytorch-0.6'
        if any('.fn.fn.' in k for k in state):
            return 'vit-pytorch-0.7'
        if any(re.match(r'^transformer\.layers\.\d+\.0\.fn\.', k) for k in state):
            return 'vit-pytorch-1.2'
        if np.ndim(state.get('pos_embedding')) == 3:
            return 'vit-pytorch-1.16'
        return CURRENT

    def layout_note(self, model, layout: str):
        if layout == CURRENT and model.pool == 'mean' and model.has_class_token:
            return ("vit-pytorch >= 1.16 has no class token under pool='mean': this model averages one in, as "
                    "releases <= 1.15 do; write the vit-pytorch-1.16 layout for them")
        return None

    def resolve(self, cfg: dict, arch: dict, layout: str, model_name, path: str):
        """Complete `cfg` with what the keys cannot say, from `arch` (the caller's overrides) or a registered
        model: (cfg, arch, notes). The heads: `heads` or `dim_head` from the caller (the other is the inner
        width divided by it), else the named (or a registered) `lucid_vit_*` whose split fits the inner width;
        else an error asking for `heads`."""
        cfg, arch, notes = dict(cfg), dict(arch or {}), []
        cfg['patch_size'], cfg['in_chans'] = _patch_and_channels(cfg['patch_dim'], arch, path)
        if cfg['in_chans'] != 3 and 'in_chans' not in arch:
            notes.append(f"in_chans={cfg['in_chans']}, patch_size={cfg['patch_size']} read off a patch of "
                         f"{cfg['patch_dim']} values; pass in_chans and patch_size if that is not the model's")
        inner = cfg['inner']
        if cfg['heads'] is None:
            h, d = arch.get('heads'), arch.get('dim_head')
            if h is None and d is None:
                if model_name:
                    candidates = [(model_name, create_model(model_name))]
                else:  # a registered model of the same shape
                    candidates = [(n, create_model(n)) for n in list_models() if model_config(n)[0] is LucidViT]
                    candidates = [(n, m) for n, m in candidates
                                  if (m.dim, m.depth, m.mlp_dim) == (cfg['dim'], cfg['depth'], cfg['mlp_dim'])]
                fits = [(n, m) for n, m in candidates if m.heads * m.dim_head == inner]
                if not fits:
                    raise ConversionError(
                        f"{path}: a vit-pytorch ViT (dim {cfg['dim']}, depth {cfg['depth']}, mlp_dim {cfg['mlp_dim']}) "
                        f'whose fused to_qkv holds heads x dim_head = {inner}, a split the file does not record'
                        + (f' and {model_name} does not have' if model_name else ' and no registered model has')
                        + f'; pass heads=H (CLI: --set heads=H), dim_head is then {inner}/H '
                        "(vit-pytorch's default dim_head is 64)")
                name, m = fits[0]
                h, d = m.heads, m.dim_head
                notes.append(f'heads={h}, dim_head={d} from {name}: a fused to_qkv records only heads x dim_head = '
                             f'{inner}; pass heads=H to choose another split')
            elif h is None or d is None:
                given = h or d
                if inner % given:
                    raise ConversionError(f'{path}: {"heads" if h else "dim_head"}={given} does not divide the to_qkv '
                                          f'inner width {inner} (= heads x dim_head)')
                h, d = (h, inner // h) if h else (inner // d, d)
            if h * d != inner:
                raise ConversionError(f'{path}: heads={h} x dim_head={d} is not the to_qkv inner width {inner}')
            cfg.update(heads=h, dim_head=d)
            arch.update(heads=h, dim_head=d)
        if cfg['class_token'] and layout != CURRENT:
            if 'pool' in arch:
                cfg['pool'] = arch['pool']
            else:
                notes.append("pool=cls: the file does not record it (vit-pytorch < 1.16 keeps the class token under "
                             "pool='mean' too); pass pool=mean if the model averaged its tokens")
        return cfg, arch, notes

    def torch_model(self, model, model_name: str):
        """The installed `vit_pytorch.ViT` that computes what `model` computes (the current architecture only)."""
        from ..optional import require
        vit_pytorch = require('vit_pytorch', 'vit-flax parity of a vit-pytorch model')
        if not model.patch_norm or model.final_norm != 'tokens' or model.has_class_token != (model.pool == 'cls'):
            raise ConversionError("this is an older vit-pytorch architecture (patch_norm=False, final_norm='pooled' "
                                  'or a class token under mean pooling): the installed vit_pytorch.ViT cannot build it')
        return vit_pytorch.ViT(image_size=to_tuple(model.img_size, 2), patch_size=model.patch_size_tuple,
                               num_classes=model.num_classes, dim=model.dim, depth=model.depth, heads=model.heads,
                               dim_head=model.dim_head, mlp_dim=model.mlp_dim, pool=model.pool, channels=model.in_chans)


FAMILY = ViTPytorchFamily()
