"""ViT-RelPos (`vit_flax.VisionTransformerRelPos`, timm's `vision_transformer_relpos`): the Flax tree <-> timm's
state_dict, one rule table run both ways (bit-exact), the architecture read off a checkpoint's shapes.

timm's keys: `patch_embed.proj`, `cls_token`, `shared_rel_pos.{mlp.fc1, mlp.fc2 | relative_position_bias_table}`,
`blocks.{i}.{norm1, attn.{qkv, q_norm, k_norm, rel_pos.{mlp.fc1, mlp.fc2 | relative_position_bias_table}, proj},
ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `norm` or `fc_norm`, `head`. The relative position index and the
log-coordinate table are non-persistent buffers (timm writes none; derived from the grid here). Our `.npz` is the
model's own tree (vit_flax/models/relpos.py), keys joined by '/'.

Detection claims a file only by its relative position modules at timm's places (`blocks.0.attn.rel_pos.*` or
`shared_rel_pos.*` beside `patch_embed.proj`; in a Flax tree `blocks_0/attn/rel_pos/...` or `shared_rel_pos/...`):
BEiT's tables (`blocks.0.attn.relative_position_bias_table`, `rel_pos_bias.*`), Swin's (`layers.`), Swin V2's
(`cpb_mlp`) and a plain ViT's keys are none of these, and this family comes before those in FAMILIES, whose
detection (any `relative_position_bias_table`; any `blocks.` beside `patch_embed.proj`) would take ours.

What a file does not record: the image size of an 'mlp' model (its MLP fits any grid: the registered name's size,
or the one asked for), the pooling (the registered name that has the file's class token and norms says it), the
initial LayerScale/norm values, and, without LayerScale, which block it is: a block without `ls1.gamma` reads as
timm's residual post-norm block (every such registration, the `_rpn` names), said out loud, `--set
block_fn=block` for a pre-norm block built with init_values=None.
"""
import re
from typing import List

import numpy as np

from vit_flax.models.layers import to_tuple
from vit_flax.models.relpos import VisionTransformerRelPos, bias_table_size

from ..errors import ConversionError
from ..rules import CONV, Rule, dense_rules, mlp_rules, norm_rules, rule
from .base import Family, timm_class

_TORCH_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_FLAX_BLOCK = re.compile(r'^blocks_(\d+)/')


def _rel_pos_rules(f: str, t: str, kind: str) -> List[Rule]:
    """One relative position module: the learned table, or the MLP's fc1/fc2 (fc2 without bias in Swin V2's mode)."""
    if kind == 'bias':
        return [rule(f'{f}/relative_position_bias_table', f'{t}.relative_position_bias_table')]
    return dense_rules(f'{f}/mlp/Dense_0', f'{t}.mlp.fc1') + dense_rules(f'{f}/mlp/Dense_1', f'{t}.mlp.fc2',
                                                                        bias=kind != 'mlp_swin')


def torch_shapes_of_flax(flat) -> dict:
    """timm's key -> torch's shape for each array of a flat ViT-RelPos tree (what `config_from_torch` reads)."""
    out = {}
    for key, v in flat.items():
        name = _FLAX_BLOCK.sub(lambda m: f'blocks.{m.group(1)}.', key).replace('/', '.')
        name = (name.replace('patch_embed.kernel', 'patch_embed.proj.weight')
                .replace('patch_embed.bias', 'patch_embed.proj.bias').replace('Dense_0', 'fc1')
                .replace('Dense_1', 'fc2').replace('.kernel', '.weight'))
        name = re.sub(r'(ls[12])\.scale$', r'\1.gamma', name).replace('.scale', '.weight')
        shape = tuple(np.shape(v))
        if name.endswith('.weight') and len(shape) == 2:
            shape = shape[::-1]
        if name == 'patch_embed.proj.weight':
            shape = (shape[3], shape[2]) + shape[:2]
        out[name] = shape
    return out


class RelPosFamily(Family):
    """`vit_flax.VisionTransformerRelPos`: timm's layout (.pth/.safetensors), our tree (.npz)."""
    name = 'relpos'
    recorded_fields = ('num_heads', 'norm_eps', 'global_pool', 'rel_pos_type', 'block_fn', 'img_size')
    module_cls = VisionTransformerRelPos
    ignore_torch = ('relative_position_index', 'rel_coords_log')
    timm_default_pool = 'avg'

    # ------------------------------------------------------------ detection

    def detect_torch(self, state) -> bool:
        return 'patch_embed.proj.weight' in state and any(
            k.startswith(('blocks.0.attn.rel_pos.', 'shared_rel_pos.')) for k in state)

    def detect_flax(self, flat) -> bool:
        return 'patch_embed/kernel' in flat and any(
            k.startswith(('blocks_0/attn/rel_pos/', 'shared_rel_pos/')) for k in flat)

    # ------------------------------------------------------------ the rule table

    def rules(self, model) -> List[Rule]:
        """The map for a `VisionTransformerRelPos` instance (its config decides which rows exist)."""
        kind = model.rel_pos_type
        rules = [rule('patch_embed/kernel', 'patch_embed.proj.weight', CONV),
                 rule('patch_embed/bias', 'patch_embed.proj.bias')]
        if model.class_token:
            rules.append(rule('cls_token', 'cls_token'))
        if model.shared_rel_pos:
            rules += _rel_pos_rules('shared_rel_pos', 'shared_rel_pos', kind)
        layer_scale = model.block_fn == 'block' and bool(model.init_values)
        for i in range(model.depth):
            f, t = f'blocks_{i}', f'blocks.{i}'
            rules += norm_rules(f'{f}/norm1', f'{t}.norm1')
            rules += dense_rules(f'{f}/attn/qkv', f'{t}.attn.qkv', bias=model.qkv_bias)
            if model.qk_norm:
                rules += norm_rules(f'{f}/attn/q_norm', f'{t}.attn.q_norm')
                rules += norm_rules(f'{f}/attn/k_norm', f'{t}.attn.k_norm')
            if not model.shared_rel_pos:
                rules += _rel_pos_rules(f'{f}/attn/rel_pos', f'{t}.attn.rel_pos', kind)
            rules += dense_rules(f'{f}/attn/proj', f'{t}.attn.proj')
            if layer_scale:
                rules.append(rule(f'{f}/ls1/scale', f'{t}.ls1.gamma'))
            rules += norm_rules(f'{f}/norm2', f'{t}.norm2')
            rules += mlp_rules(f'{f}/mlp', f'{t}.mlp')
            if layer_scale:
                rules.append(rule(f'{f}/ls2/scale', f'{t}.ls2.gamma'))
        rules += norm_rules('fc_norm', 'fc_norm') if model.fc_norm else norm_rules('norm', 'norm')
        if model.num_classes > 0:
            rules += dense_rules('head', 'head')
        return rules

    # ------------------------------------------------------------ architecture

    def config_from_torch(self, state) -> dict:
        """Architecture fields read off a timm-layout state_dict's shapes."""
        w = np.shape(state['patch_embed.proj.weight'])
        shared = any(k.startswith('shared_rel_pos.') for k in state)
        r = 'shared_rel_pos.' if shared else 'blocks.0.attn.rel_pos.'
        b = 'blocks.0.'
        if r + 'relative_position_bias_table' in state:
            table = np.shape(state[r + 'relative_position_bias_table'])
            kind, heads, hidden, rows = 'bias', table[1], None, table[0]
        else:
            kind = 'mlp' if r + 'mlp.fc2.bias' in state else 'mlp_swin'
            heads, hidden = np.shape(state[r + 'mlp.fc2.weight'])[0], np.shape(state[r + 'mlp.fc1.weight'])[0]
            rows = None
        dim = w[0]
        return dict(embed_dim=dim, in_chans=w[1], patch_size=tuple(w[2:]),
                    depth=1 + max(int(m.group(1)) for m in map(_TORCH_BLOCK.match, state) if m),
                    num_heads=heads, rel_pos_type=kind, rel_pos_dim=hidden, table_rows=rows, shared_rel_pos=shared,
                    qkv_bias=b + 'attn.qkv.bias' in state, qk_norm=b + 'attn.q_norm.weight' in state,
                    class_token='cls_token' in state, fc_norm='fc_norm.weight' in state,
                    layer_scale=b + 'ls1.gamma' in state, mlp_hidden=np.shape(state[b + 'mlp.fc1.weight'])[0],
                    num_classes=np.shape(state['head.weight'])[0] if 'head.weight' in state else 0)

    def config_from_flax(self, flat) -> dict:
        state = {k: np.empty(shape, np.int8) for k, shape in torch_shapes_of_flax(flat).items()}
        return self.config_from_torch(state)

    def resolve(self, cfg: dict, arch, layout: str, model_name, path: str):
        """A block with LayerScale is timm's `RelPosBlock`; one without reads as the residual post-norm block (the
        `_rpn` names), said out loud, unless the caller names the block (`--set block_fn=...`) or a model."""
        notes = []
        if 'block_fn' in (arch or {}):
            cfg = dict(cfg, block_fn=arch['block_fn'])
        elif cfg.get('layer_scale'):
            cfg = dict(cfg, block_fn='block')
        elif cfg.get('layer_scale') is not None and model_name is None:
            cfg = dict(cfg, block_fn='res_post')
            notes.append(f"{path}: blocks without LayerScale read as timm's residual post-norm block "
                         f"(block_fn='res_post', the _rpn names); --set block_fn=block for a pre-norm block "
                         f'built with init_values=None')
        return cfg, arch, notes

    _CORE = ('embed_dim', 'depth', 'num_heads', 'in_chans', 'qkv_bias', 'qk_norm', 'class_token', 'fc_norm',
             'rel_pos_type', 'shared_rel_pos', 'block_fn')

    def core(self, model) -> dict:
        kw = {k: getattr(model, k) for k in self._CORE}
        kw['patch_size'] = to_tuple(model.patch_size, 2)
        return kw

    def overrides(self, cfg: dict, model) -> dict:
        """Classes, the MLPs' widths, LayerScale, and the image size a 'bias' table's rows give (the hint's if it
        fits; an MLP's file records none: the hint's, else the registered size)."""
        kw = {}
        if cfg.get('rel_pos_dim') is not None and model.rel_pos_type != 'bias' \
                and cfg['rel_pos_dim'] != model.rel_pos_hidden:
            kw['rel_pos_dim'] = cfg['rel_pos_dim']
        if cfg.get('num_classes') is not None and cfg['num_classes'] != model.num_classes:
            kw['num_classes'] = cfg['num_classes']
        if cfg.get('mlp_hidden') is not None and cfg['mlp_hidden'] != model.mlp_hidden:
            kw['mlp_ratio'] = cfg['mlp_hidden'] / model.embed_dim
        if model.block_fn == 'block' and cfg.get('layer_scale') is not None \
                and cfg['layer_scale'] != bool(model.init_values):
            kw['init_values'] = 1e-6 if cfg['layer_scale'] else None
        hint = cfg.get('img_size_hint')
        if hint is not None and to_tuple(hint, 2) != to_tuple(model.img_size, 2) and model.rel_pos_type != 'bias':
            kw['img_size'] = hint
        rows = cfg.get('table_rows')
        size = lambda m: bias_table_size(m.grid_size, m.num_prefix_tokens)
        if rows is not None and rows != size(model):
            if hint is not None and size(model.clone(img_size=hint)) == rows:
                kw['img_size'] = hint
            else:
                p = model.num_prefix_tokens
                side = int(round(((rows - 3 * p) ** 0.5 + 1) / 2))
                if bias_table_size((side, side), p) != rows:
                    raise ValueError(f'a relative position table of {rows} rows is not a square grid; pass img_size')
                kw['img_size'] = side * to_tuple(model.patch_size, 2)[0]
        return kw

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str, log):
        """An MLP bias fits any grid (evaluated on the new one); a learned table fits only its own."""
        if tuple(src.grid_size) != tuple(dst.grid_size):
            if src.rel_pos_type == 'bias':
                raise ConversionError(f'the relative position tables are sized for a {src.grid_size} patch grid '
                                      f'(img_size {src.img_size}); a {dst.grid_size} grid (img_size {dst.img_size}) '
                                      f'is not made from them here')
            log(f'relative position MLP: evaluated on the {tuple(dst.grid_size)} patch grid instead of '
                f'{tuple(src.grid_size)} (its weights fit any grid)')
        return flat

    # ------------------------------------------------------------ torch, timm, inspection

    def timm_kwargs(self, model) -> dict:
        """Arguments of timm's `VisionTransformerRelPos` that build `model`'s architecture (timm's registered
        functions take these as overrides of their own)."""
        block = timm_class('timm.models.vision_transformer_relpos',
                           'ResPostRelPosBlock' if model.block_fn == 'res_post' else 'RelPosBlock')
        kw = dict(num_classes=model.num_classes, img_size=to_tuple(model.img_size, 2),
                  patch_size=to_tuple(model.patch_size, 2), in_chans=model.in_chans, global_pool=model.global_pool,
                  embed_dim=model.embed_dim, depth=model.depth, num_heads=model.num_heads,
                  mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias, qk_norm=model.qk_norm,
                  init_values=model.init_values, class_token=model.class_token, fc_norm=model.fc_norm,
                  rel_pos_type=model.rel_pos_type, rel_pos_dim=model.rel_pos_dim,
                  shared_rel_pos=model.shared_rel_pos, drop_rate=model.drop_rate,
                  proj_drop_rate=model.proj_drop_rate, attn_drop_rate=model.attn_drop_rate,
                  drop_path_rate=model.drop_path_rate, block_fn=block)
        if model.norm_eps != 1e-6:
            kw['norm_layer'] = timm_class('torch.nn', 'LayerNorm', eps=model.norm_eps)
        return kw

    def torch_model(self, model, model_name: str):
        """timm's `VisionTransformerRelPos` built from `timm_kwargs` (any size; randomly initialised)."""
        from ..optional import require
        require('timm', 'vit-flax parity')
        from timm.models.vision_transformer_relpos import VisionTransformerRelPos as TimmRelPos
        return TimmRelPos(**self.timm_kwargs(model))

    def parity_points(self, model):
        pts = [('patch_embed', 'embed', 'patch_embed')]
        pts += [(f'block {i}', f'block_{i}', f'blocks.{i}') for i in range(model.depth)]
        return pts + ([] if model.fc_norm else [('norm', 'encoded', 'norm')])

    def describe(self, ck) -> str:
        return f'ViT-RelPos ({ck.layout})'


FAMILY = RelPosFamily()
