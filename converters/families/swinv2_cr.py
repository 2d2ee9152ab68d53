"""Swin V2 CR (timm's `swin_transformer_v2_cr`, `vit_flax.SwinTransformerV2Cr`): the Flax tree <-> timm state_dict
map, one rule table run both ways.

timm's keys: `patch_embed.{proj, norm}`, `stages.{i}.downsample.{norm, reduction}` (i > 0),
`stages.{i}.blocks.{j}.{norm1, attn.{qkv (weight, bias), logit_scale (heads,), meta_mlp.{fc1, fc2}, proj}, norm2,
mlp.{fc1, fc2}, norm3}` (norm3 only on the blocks that carry one), `head.fc`. No buffers are saved
(`relative_coordinates_log` and `attn_mask` are non-persistent): a file records neither its window nor its input
size (the meta MLP is the same for any window); those come from the registered name (`--model`), said on stderr.
The extra norms are recorded (which blocks have a `norm3`), and read back as `extra_norm_period`/`extra_norm_stage`.

Layout `tau`: the files of timm's first release (rwightman's v0.1-weights-swinv2 GitHub assets) hold `attn.tau`
= 1 / exp(logit_scale) and the classifier as `head`; read as timm's `checkpoint_filter_fn` reads them, written
back with `--layout tau`.

Detection: `stages.*` keys with `attn.meta_mlp` (Flax: `stages_*/.../attn/meta_mlp`): neither timm's nor
Microsoft's Swin V1/V2 files (`layers.*`, `relative_position_bias_table` / `cpb_mlp`) have them, nor these files
their keys.
"""
import re
from typing import List, Optional, Tuple

import numpy as np

from vit_flax.models.layers import to_tuple
from vit_flax.models.swinv2_cr import SwinTransformerV2Cr, extra_norm_blocks

from ..errors import ConversionError
from ..rules import CONV, Rule, dense_rules, mlp_rules, norm_rules, rule
from .base import Family
from .swin_common import blocks_per_stage

TORCH_BLOCKS = r'^stages\.(\d+)\.blocks\.(\d+)\.'
FLAX_BLOCKS = r'^stages_(\d+)/blocks_(\d+)/'


def norm3_layout(keys, pattern: str, depths) -> Tuple[Tuple[bool, ...], ...]:
    """Per stage, which blocks hold a `norm3` (keys matched by `pattern` + 'norm3')."""
    have = {(int(m.group(1)), int(m.group(2))) for k in keys for m in [re.match(pattern + 'norm3', k)] if m}
    return tuple(tuple((i, j) in have for j in range(d)) for i, d in enumerate(depths))


def layout_of(model) -> Tuple[Tuple[bool, ...], ...]:
    """The `norm3` placement `model` computes (its last stage always ends with one)."""
    n = len(model.depths)
    return tuple(extra_norm_blocks(d, model.extra_norm_period, model.extra_norm_stage or i + 1 == n)
                 for i, d in enumerate(model.depths))


def norm_fields(layout, depths) -> Optional[dict]:
    """{extra_norm_period, extra_norm_stage} giving `layout`, or None when no pair gives it."""
    n = len(depths)
    for period in range(0, max(depths, default=0) + 1):
        for at_end in (False, True):
            got = tuple(extra_norm_blocks(d, period, at_end or i + 1 == n) for i, d in enumerate(depths))
            if got == tuple(layout):
                return dict(extra_norm_period=period, extra_norm_stage=at_end)
    return None


# ---------------------------------------------------------------- timm's first release files

def tau_to_timm(state):
    """timm's v0.1-weights-swinv2 release layout (`attn.tau`, classifier `head`) -> today's, as timm's own
    `checkpoint_filter_fn`: `logit_scale = log(1 / tau)` (float32, as torch computes it up to an ulp of the log),
    `head.*` -> `head.fc.*`; every other array passes through untouched."""
    out = {}
    for k, v in state.items():
        if k.endswith('attn.tau'):
            v = np.log(np.float32(1.0) / np.asarray(v, np.float32)).astype(np.float32)
            k = k[:-len('tau')] + 'logit_scale'
        if k.startswith('head.') and not k.startswith('head.fc.'):
            k = 'head.fc.' + k[len('head.'):]
        out[k] = v
    return out


def timm_to_tau(state):
    """The inverse, for that release's code: `tau = 1 / exp(logit_scale)`, `head.fc.*` -> `head.*` (a tau read
    back is within float32 rounding of the one written, not bit for bit)."""
    out = {}
    for k, v in state.items():
        if k.endswith('attn.logit_scale'):
            v = (np.float32(1.0) / np.exp(np.asarray(v, np.float32))).astype(np.float32)
            k = k[:-len('logit_scale')] + 'tau'
        if k.startswith('head.fc.'):
            k = 'head.' + k[len('head.fc.'):]
        out[k] = v
    return out


class SwinV2CrFamily(Family):
    """`vit_flax.SwinTransformerV2Cr`: timm's `swinv2_cr_*` files (.pth / .safetensors) and our .npz."""
    name = 'swinv2_cr'
    recorded_fields = ('window_size', 'norm_eps', 'gelu', 'always_partition', 'img_size')
    module_cls = SwinTransformerV2Cr
    timm_classifier = 'head.fc'
    timm_default_pool = 'avg'
    layouts = {'tau': (tau_to_timm, timm_to_tau)}

    def detect_layout(self, state) -> str:
        """'tau' for timm's first release files (`attn.tau` for the logit scale, classifier `head`)."""
        if self.detect_torch(state) and any(k.endswith('attn.tau') for k in state):
            return 'tau'
        return self.torch_layout

    def detect_torch(self, state) -> bool:
        return 'patch_embed.proj.weight' in state and any(
            k.startswith('stages.') and k.endswith('attn.meta_mlp.fc1.weight') for k in state)

    def detect_flax(self, flat) -> bool:
        return 'patch_embed/proj/kernel' in flat and any(
            k.startswith('stages_') and k.endswith('attn/meta_mlp/Dense_0/kernel') for k in flat)

    # ------------------------------------------------------------ the rule table

    def rules(self, model) -> List[Rule]:
        """The map for a `vit_flax.SwinTransformerV2Cr` instance (its config decides which rows exist)."""
        rules = [rule('patch_embed/proj/kernel', 'patch_embed.proj.weight', CONV),
                 rule('patch_embed/proj/bias', 'patch_embed.proj.bias')]
        rules += norm_rules('patch_embed/norm', 'patch_embed.norm')
        for i, (depth, norms) in enumerate(zip(model.depths, layout_of(model))):
            f, t = f'stages_{i}', f'stages.{i}'
            if i > 0:
                rules += norm_rules(f'{f}/downsample/norm', f'{t}.downsample.norm')
                rules += dense_rules(f'{f}/downsample/reduction', f'{t}.downsample.reduction', bias=False)
            for j in range(depth):
                fb, tb = f'{f}/blocks_{j}', f'{t}.blocks.{j}'
                rules.append(rule(f'{fb}/attn/logit_scale', f'{tb}.attn.logit_scale'))   # timm's key order
                rules += dense_rules(f'{fb}/attn/qkv', f'{tb}.attn.qkv')
                rules += dense_rules(f'{fb}/attn/proj', f'{tb}.attn.proj')
                rules += mlp_rules(f'{fb}/attn/meta_mlp', f'{tb}.attn.meta_mlp')
                rules += norm_rules(f'{fb}/norm1', f'{tb}.norm1')
                rules += mlp_rules(f'{fb}/mlp', f'{tb}.mlp')
                rules += norm_rules(f'{fb}/norm2', f'{tb}.norm2')
                if norms[j]:
                    rules += norm_rules(f'{fb}/norm3', f'{tb}.norm3')
        if model.num_classes > 0:
            rules += dense_rules('head', 'head.fc')
        return rules

    # ------------------------------------------------------------ architecture

    def config_from_flax(self, flat) -> dict:
        """Architecture fields read off a flat Flax tree (heads from `logit_scale`; no window, no input size)."""
        kernel = flat['patch_embed/proj/kernel']
        depths = blocks_per_stage(flat, FLAX_BLOCKS)
        return dict(embed_dim=kernel.shape[-1], in_chans=kernel.shape[-2], patch_size=tuple(kernel.shape[:2]),
                    depths=depths, num_heads=tuple(flat[f'stages_{i}/blocks_0/attn/logit_scale'].shape[0]
                                                   for i in range(len(depths))),
                    mlp_ratio=flat['stages_0/blocks_0/mlp/Dense_0/kernel'].shape[1] / kernel.shape[-1],
                    extra_norms=norm3_layout(flat, FLAX_BLOCKS, depths),
                    num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else 0)

    def config_from_torch(self, state) -> dict:
        """The same fields off a timm state_dict."""
        w = state['patch_embed.proj.weight']
        depths = blocks_per_stage(state, TORCH_BLOCKS)
        return dict(embed_dim=w.shape[0], in_chans=w.shape[1], patch_size=tuple(w.shape[2:]), depths=depths,
                    num_heads=tuple(state[f'stages.{i}.blocks.0.attn.logit_scale'].shape[0]
                                    for i in range(len(depths))),
                    mlp_ratio=state['stages.0.blocks.0.mlp.fc1.weight'].shape[0] / w.shape[0],
                    extra_norms=norm3_layout(state, TORCH_BLOCKS, depths),
                    num_classes=state['head.fc.bias'].shape[0] if 'head.fc.bias' in state else 0)

    def core(self, model) -> dict:
        """Sizes, and where the `norm3`s are (what `extra_norm_period`/`extra_norm_stage` decide at these depths)."""
        return dict(embed_dim=model.embed_dim, patch_size=to_tuple(model.patch_size, 2), depths=tuple(model.depths),
                    num_heads=tuple(model.num_heads), mlp_ratio=model.mlp_ratio, extra_norms=layout_of(model))

    def with_core(self, model, cfg: dict):
        core = self.core(model)
        kw = {k: cfg[k] for k in core if k != 'extra_norms' and cfg.get(k) is not None and cfg[k] != core[k]}
        model = model.clone(**kw)
        want = cfg.get('extra_norms')
        if want is not None and tuple(want) != layout_of(model):
            fields = norm_fields(want, model.depths)
            if fields is None:
                raise ConversionError(f'norm3 on blocks {want}: no extra_norm_period/extra_norm_stage gives them')
            model = model.clone(**fields)
        return model

    def overrides(self, cfg: dict, model) -> dict:
        return {k: cfg[k] for k in ('num_classes', 'in_chans') if cfg.get(k) is not None and cfg[k] != getattr(model, k)}

    def resolve(self, cfg, arch, layout, model_name, path):
        notes = []
        if model_name is None and not (arch or {}).get('window_size') and not (arch or {}).get('img_size'):
            notes.append(f'{path}: a Swin V2 CR file does not record its window or input size: the registered '
                         f'model\'s are taken (pass --model or --set window_size=/img_size= to choose)')
        return cfg, arch, notes

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str = 'bicubic', log):
        """A window change needs nothing: the meta MLP reads the new window's offsets. Said."""
        flat = super().adapt(flat, src, dst, resample=resample, bias_resize=bias_resize, log=log)
        old = [w for w, _ in src.stage_windows()]
        new = [w for w, _ in dst.stage_windows()]
        if old != new:
            log(f'window: stage windows {tuple(old)} -> {tuple(new)}; Swin V2 CR\'s position bias needs no table '
                f'resampling (its meta MLP reads the new window\'s log-spaced offsets)')
        return flat

    # ------------------------------------------------------------ timm

    def timm_kwargs(self, model) -> dict:
        """Arguments that make `timm.create_model(name, **kw)` build the same architecture as `model` (add
        `strict_img_size=False` to feed it other sizes, as the Flax model accepts)."""
        if model.gelu != 'exact' or model.norm_eps != 1e-5:
            raise ValueError("timm's Swin V2 CR uses exact GELU and LayerNorm eps 1e-5")
        img, patch = to_tuple(model.img_size, 2), to_tuple(model.patch_size, 2)
        if any(i % p for i, p in zip(img, patch)):
            raise ValueError(f'timm\'s Swin V2 CR needs an img_size that is a whole number of patches, not {img}')
        if patch[0] != patch[1]:
            raise ValueError(f'timm\'s Swin V2 CR has square patches, not {patch}')
        window = model.window_size
        return dict(num_classes=model.num_classes, img_size=img, patch_size=patch[0], in_chans=model.in_chans,
                    embed_dim=model.embed_dim, depths=tuple(model.depths), num_heads=tuple(model.num_heads),
                    window_size=tuple(window) if isinstance(window, (list, tuple)) else window,
                    window_ratio=model.window_ratio, always_partition=model.always_partition,
                    mlp_ratio=model.mlp_ratio, init_values=model.init_values,
                    extra_norm_period=model.extra_norm_period, extra_norm_stage=model.extra_norm_stage,
                    drop_rate=model.drop_rate, proj_drop_rate=model.proj_drop_rate,
                    attn_drop_rate=model.attn_drop_rate, drop_path_rate=model.drop_path_rate)

    def parity_points(self, model):
        """(label, flax intermediate, timm module): timm's stages output NCHW, its blocks NHWC, so the stem is
        read at stage 0's (identity) downsample and each stage at its last block."""
        pts = [('patch_embed', 'embed', 'stages.0.downsample')]
        return pts + [(f'stage {i}', f'stage_{i}', f'stages.{i}.blocks.{d - 1}') for i, d in enumerate(model.depths)]

    def describe(self, ck) -> str:
        return f'Swin V2 CR ({ck.layout})'


FAMILY = SwinV2CrFamily()
