"""CaiT (`vit_flax.Cait`, timm's `cait`): the Flax tree <-> timm state_dict map (one table, run both ways),
detection, and the architecture read off a checkpoint.

Files:
- timm (the table below): `patch_embed.proj`, `pos_embed` (1, N, D: no class row), `cls_token`, `blocks.{i}.{norm1,
  attn.{qkv, proj, proj_l, proj_w}, gamma_1, norm2, mlp.fc1/fc2, gamma_2}`, `blocks_token_only.{j}.{norm1,
  attn.{q, k, v, proj}, gamma_1, norm2, mlp.fc1/fc2, gamma_2}`, `norm`, `head`.
- Facebook's releases (facebookresearch/deit `cait_models.py`, dl.fbaipublicfiles.com/deit/*.pth): the same keys,
  saved by deit's training script as `{'model': state_dict, ...}` (a DataParallel run's keys under `module.`), which
  is all timm's `cait.checkpoint_filter_fn` undoes; the torch reader unwraps both, and `--layout facebook` writes
  `{'model': state_dict}` (the same keys) as deit saves it.
- `.npz`: the model's tree as it is (`patch_embed/kernel`, `encoderblock_{i}/...`, `classblock_{j}/...`; see
  vit_flax/models/cait.py), keys joined by '/'.

Detection claims a timm CaiT state_dict by its class-attention blocks or talking-heads mixers (`blocks_token_only.`,
`attn.proj_l`) and a Flax tree by `classblock_0/ClassAttention_0`: keys no ViT, DeiT, BEiT or Eva file has.
Talking heads record the head count (`proj_l` is (H, H)), so every core field is read off the shapes.

What a file does not record: LayerScale's `init_values` (an init only), dropout rates, the image size beyond its
token count (a square grid of the file's tokens unless the size asked for fits).
"""
import re
from typing import List

from vit_flax.models.cait import Cait
from vit_flax.models.layers import to_tuple

from ..errors import ConversionError
from ..rules import CONV, LINEAR, Rule, dense_rules, heads_in, heads_out, mlp_rules, norm_rules, rule
from .base import Family, square_img_size

POS_KEY = 'pos_embedding'
_FLAX_BLOCK = re.compile(r'^encoderblock_(\d+)/')
_FLAX_CLASS = re.compile(r'^classblock_(\d+)/')
_TORCH_BLOCK = re.compile(r'^blocks\.(\d+)\.')
_TORCH_CLASS = re.compile(r'^blocks_token_only\.(\d+)\.')
IDENTITY_LAYOUT = (lambda state: dict(state), lambda state: dict(state))


def _count(keys, pattern) -> int:
    return 1 + max((int(m.group(1)) for k in keys for m in [pattern.match(k)] if m), default=-1)


def _attention(f: str, t: str, heads: int, qkv_bias: bool, fused: bool) -> List[Rule]:
    """q, k, v (Google's (D, H, Dh) kernels) <-> timm's fused `qkv` (talking heads) or separate `q`, `k`, `v` (class
    attention); `out` (H, Dh, D) <-> `proj`."""
    names = ('query', 'key', 'value')
    if fused:
        rules = [rule(tuple(f'{f}/{n}/kernel' for n in names), f'{t}.qkv.weight', heads_in(heads, 3))]
        if qkv_bias:
            rules.append(rule(tuple(f'{f}/{n}/bias' for n in names), f'{t}.qkv.bias', heads_in(heads, 3, False)))
    else:
        rules = []
        for n, tn in zip(names, 'qkv'):
            rules.append(rule(f'{f}/{n}/kernel', f'{t}.{tn}.weight', heads_in(heads, 1)))
            if qkv_bias:
                rules.append(rule(f'{f}/{n}/bias', f'{t}.{tn}.bias', heads_in(heads, 1, False)))
    return rules + [rule(f'{f}/out/kernel', f'{t}.proj.weight', heads_out(heads)), rule(f'{f}/out/bias', f'{t}.proj.bias')]


def _block(f: str, t: str, attn: List[Rule]) -> List[Rule]:
    return (norm_rules(f'{f}/LayerNorm_0', f'{t}.norm1') + attn + [rule(f'{f}/LayerScale_0/scale', f'{t}.gamma_1')]
            + norm_rules(f'{f}/LayerNorm_1', f'{t}.norm2') + mlp_rules(f'{f}/MlpBlock_0', f'{t}.mlp')
            + [rule(f'{f}/LayerScale_1/scale', f'{t}.gamma_2')])


class CaitFamily(Family):
    """`vit_flax.Cait`: timm's and Facebook's deit CaiT files (the same keys), the tree as `.npz`."""
    name = 'cait'
    recorded_fields = ('num_heads', 'norm_eps')
    module_cls = Cait
    pos_key = POS_KEY
    layouts = {'facebook': IDENTITY_LAYOUT}
    torch_wrap = {'facebook': 'model'}   # deit's main.py: torch.save({'model': state_dict, 'optimizer': ...})
    timm_classifier = 'head'
    timm_default_pool = 'token'

    # ------------------------------------------------------------ detection

    def detect_torch(self, state) -> bool:
        return 'patch_embed.proj.weight' in state and (
            any(_TORCH_CLASS.match(k) for k in state) or 'blocks.0.attn.proj_l.weight' in state)

    def detect_flax(self, flat) -> bool:
        return 'patch_embed/kernel' in flat and (
            any(_FLAX_CLASS.match(k) for k in flat) or 'encoderblock_0/TalkingHeadsAttention_0/pre_softmax/kernel' in flat)

    # ------------------------------------------------------------ the rule table

    def rules(self, model) -> List[Rule]:
        """The map for a `vit_flax.Cait` instance (its depths, heads and qkv bias decide which rows exist)."""
        h, bias = model.num_heads, model.qkv_bias
        rules = [rule('patch_embed/kernel', 'patch_embed.proj.weight', CONV),
                 rule('patch_embed/bias', 'patch_embed.proj.bias'),
                 rule(POS_KEY, 'pos_embed'), rule('cls', 'cls_token')]
        for i in range(model.depth):
            f, t = f'encoderblock_{i}', f'blocks.{i}'
            a, ta = f'{f}/TalkingHeadsAttention_0', f'{t}.attn'
            rules += _block(f, t, _attention(a, ta, h, bias, fused=True) + [
                rule(f'{a}/pre_softmax/kernel', f'{ta}.proj_l.weight', LINEAR), rule(f'{a}/pre_softmax/bias', f'{ta}.proj_l.bias'),
                rule(f'{a}/post_softmax/kernel', f'{ta}.proj_w.weight', LINEAR), rule(f'{a}/post_softmax/bias', f'{ta}.proj_w.bias')])
        for j in range(model.depth_token_only):
            f, t = f'classblock_{j}', f'blocks_token_only.{j}'
            rules += _block(f, t, _attention(f'{f}/ClassAttention_0', f'{t}.attn', h, bias, fused=False))
        rules += norm_rules('encoder_norm', 'norm')
        return rules + (dense_rules('head', 'head') if model.num_classes > 0 else [])

    # ------------------------------------------------------------ architecture

    def config_from_flax(self, flat) -> dict:
        """Architecture fields of `Cait` read off a flat Flax tree."""
        kh, kw, cin, dim = flat['patch_embed/kernel'].shape
        depth, tokens = _count(flat, _FLAX_BLOCK), _count(flat, _FLAX_CLASS)
        a = 'encoderblock_0/TalkingHeadsAttention_0' if depth else 'classblock_0/ClassAttention_0'
        mlp = lambda f: flat[f'{f}/MlpBlock_0/Dense_0/kernel'].shape[1] / dim
        return dict(embed_dim=dim, patch_size=(kh, kw), in_chans=cin, depth=depth, depth_token_only=tokens,
                    num_heads=flat[f'{a}/query/kernel'].shape[1], qkv_bias=f'{a}/query/bias' in flat,
                    mlp_ratio=mlp('encoderblock_0') if depth else None,
                    mlp_ratio_token_only=mlp('classblock_0') if tokens else None,
                    num_patches=flat[POS_KEY].shape[1],
                    num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else 0)

    def config_from_torch(self, state) -> dict:
        """The same fields off a timm state_dict (talking heads' (H, H) mixers give the head count)."""
        dim, cin, kh, kw = state['patch_embed.proj.weight'].shape
        depth, tokens = _count(state, _TORCH_BLOCK), _count(state, _TORCH_CLASS)
        mlp = lambda t: state[f'{t}.mlp.fc1.weight'].shape[0] / dim
        return dict(embed_dim=dim, patch_size=(kh, kw), in_chans=cin, depth=depth, depth_token_only=tokens,
                    num_heads=state['blocks.0.attn.proj_l.weight'].shape[0] if depth else None,
                    qkv_bias='blocks.0.attn.qkv.bias' in state or 'blocks_token_only.0.attn.q.bias' in state,
                    mlp_ratio=mlp('blocks.0') if depth else None,
                    mlp_ratio_token_only=mlp('blocks_token_only.0') if tokens else None,
                    num_patches=state['pos_embed'].shape[1],
                    num_classes=state['head.bias'].shape[0] if 'head.bias' in state else 0)

    def core(self, model) -> dict:
        """Fields of a registered model that a checkpoint must share (the rest are `overrides`)."""
        return dict(embed_dim=model.embed_dim, patch_size=to_tuple(model.patch_size, 2), depth=model.depth,
                    num_heads=model.num_heads, depth_token_only=model.depth_token_only,
                    mlp_ratio=model.mlp_hidden / model.embed_dim,
                    mlp_ratio_token_only=model.mlp_hidden_token_only / model.embed_dim)

    def overrides(self, cfg: dict, model) -> dict:
        """Classes, channels, qkv bias, and the image size whose grid has the file's token count."""
        kw = {k: cfg[k] for k in ('num_classes', 'in_chans', 'qkv_bias') if k in cfg and cfg[k] != getattr(model, k)}
        size = square_img_size(cfg, model)
        if size is not None:
            kw['img_size'] = size
        return kw

    def adapt_positions(self, flat, src, dst, resample: str, log):
        """The position table (patch rows only: CaiT's class token has no position) resampled to `dst`'s grid."""
        from ..resample import resample_pos_embed
        grid = tuple(dst.grid_size)
        if POS_KEY in flat and tuple(src.grid_size) != grid:
            flat[POS_KEY] = resample_pos_embed(flat[POS_KEY], grid, 0, src.grid_size, resample)
            log(f'pos_embedding: grid {tuple(src.grid_size)} -> {grid} ({resample}), no prefix rows')
        return flat

    # ------------------------------------------------------------ torch, timm, inspection

    def timm_kwargs(self, model) -> dict:
        """Arguments of timm's `Cait` (and so of `timm.create_model(name, **kw)`) that build `model`'s architecture."""
        return dict(num_classes=model.num_classes, img_size=model.img_size, in_chans=model.in_chans,
                    patch_size=model.patch_size, embed_dim=model.embed_dim, depth=model.depth,
                    num_heads=model.num_heads, mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias,
                    init_values=model.init_values, depth_token_only=model.depth_token_only,
                    mlp_ratio_token_only=model.mlp_ratio_token_only, global_pool=model.global_pool,
                    drop_rate=model.drop_rate, pos_drop_rate=model.pos_drop_rate,
                    proj_drop_rate=model.proj_drop_rate, attn_drop_rate=model.attn_drop_rate,
                    drop_path_rate=model.drop_path_rate)

    def torch_model(self, model, model_name: str):
        """timm's `Cait` built from `timm_kwargs` (any size or depth; randomly initialised). The LayerNorm eps is
        timm's class default (1e-6); another `norm_eps` is refused."""
        from ..optional import require
        require('timm', 'vit-flax parity')
        from timm.models.cait import Cait as TimmCait
        if model.norm_eps != 1e-6:
            raise ConversionError(f"timm's Cait is built here with its LayerNorm eps 1e-6, not {model.norm_eps}")
        return TimmCait(**self.timm_kwargs(model))

    def parity_points(self, model):
        """(label, flax intermediate, timm module) pairs, in forward order."""
        pts = [('patch_embed', 'embed', 'patch_embed')]
        pts += [(f'block {i}', f'block_{i}', f'blocks.{i}') for i in range(model.depth)]
        pts += [(f'cls block {j}', f'class_block_{j}', f'blocks_token_only.{j}') for j in range(model.depth_token_only)]
        return pts + [('norm', 'encoded', 'norm')]

    def describe(self, ck) -> str:
        return f'CaiT ({ck.layout})'


FAMILY = CaitFamily()
