"""Swin V2: the Flax tree <-> timm state_dict map (one rule table, run both ways), and Microsoft's V2 release.

Layouts:
- timm, the table below: patch merging at the start of `layers.{i}` (i > 0), classifier `head.fc`, no buffers
  in the state_dict (timm's `relative_coords_table`, `relative_position_index`, `k_bias` and `attn_mask` are
  non-persistent). Such a file does not record the window, the pretrained window nor the input size (the bias
  MLP is the same for any window): those come from the registered name (`--model`), said on stderr.
- Microsoft's release (`models/swin_transformer_v2.py`, `{'model': state_dict}`): patch merging at the end of
  `layers.{i}` (i < last), classifier `head`, and the persistent buffers `attn.relative_coords_table`
  (1, 2w-1, 2w-1, 2), `attn.relative_position_index` (w², w²) in every block and `attn_mask` (nW, w², w²) in the
  shifted blocks of stages larger than the window. Read: the buffers are never required and never copied, but
  what they record is read: each stage's window (the index), its pretrained window (the table's normalisation:
  its largest entry is log2(8 (w-1)/(p-1) + 1) / 3) and the input resolution (a mask's window count).
  Written: regenerated from the model, in Microsoft's key order, so that its `SwinTransformerV2` loads the file
  with `strict=True`.
"""
import math
from typing import Dict, List

import numpy as np

from vit_flax.models.layers import to_tuple
from vit_flax.models.swin import relative_position_index, shifted_window_mask
from vit_flax.models.swinv2 import SwinTransformerV2, relative_coords_table

from ..errors import ConversionError
from ..rules import QKV_ROWS, Rule, dense_rules, mlp_rules, norm_rules, renamed_rules, rule
from .swin_common import (DOWNSAMPLE, TORCH_BLOCKS, SwinFamilyBase, blocks_per_stage, merging_to_microsoft,
                          merging_to_timm, norm_and_head_to_microsoft)

# Buffers Microsoft's files carry: derived from the config, never read as weights.
IGNORE = ('relative_position_index', 'relative_coords_table', 'attn_mask', 'k_bias')


# ---------------------------------------------------------------- Microsoft's release layout

def microsoft_to_timm(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Microsoft layout -> timm layout, as timm's own `checkpoint_filter_fn`: `layers.{i}.downsample` moved to
    `layers.{i+1}`, `head.*` to `head.fc.*`. Arrays pass through untouched (bit-exact). The buffers are kept
    (timm's filter drops them; the rule table ignores them) so that `config_from_torch` can read what they record."""
    return merging_to_timm(state)


def timm_to_microsoft(state: Dict[str, np.ndarray], model) -> Dict[str, np.ndarray]:
    """timm layout -> Microsoft's, with the buffers its code registers (regenerated from `model`: windows,
    pretrained windows, input size), in its state_dict order: a block's `attn_mask` first (registered after its
    children, but a module's own buffers come first), then norm1, attn (logit_scale, q_bias, v_bias,
    relative_coords_table, relative_position_index, cpb_mlp, qkv, proj), norm2, mlp; blocks before the stage's
    downsample (reduction, norm); then norm and head.

    Microsoft's code squares windows and resolutions (`min(resolution)` as the window), asserts that merging sees
    even sizes, and builds each stage at img_size / patch / 2^i: a model it cannot build is refused."""
    img, patch = to_tuple(model.img_size, 2), to_tuple(model.patch_size, 2)
    res = tuple(i // p for i, p in zip(img, patch))
    if any(i % p for i, p in zip(img, patch)) or res[0] != res[1] or model.always_partition:
        raise ConversionError(f'Microsoft\'s SwinTransformerV2 builds square inputs that are a whole number of '
                              f'patches, and always clamps the window: cannot describe img_size {img} '
                              f'(patch {patch}, always_partition={model.always_partition})')
    windows = [w for w, _ in model.stage_windows()]
    if any(w[0] != w[1] for w in windows) or len(set(to_tuple(model.window_size, 2))) != 1 or \
            isinstance(model.window_size, (tuple, list)) and len(model.window_size) not in (1, 2):
        raise ConversionError(f'Microsoft\'s SwinTransformerV2 has one square window for every stage, not '
                              f'{model.window_size}')
    pretrained = model.stage_pretrained_windows()
    out = {k: v for k, v in state.items() if k.startswith('patch_embed.')}
    num_stages = len(model.depths)
    for i, depth in enumerate(model.depths):
        r = res[0] // 2 ** i
        if i + 1 < num_stages and r % 2:
            raise ConversionError(f'stage {i} resolution {r} is odd: Microsoft\'s patch merging needs even sizes')
        w = min(r, to_tuple(model.window_size, 2)[0])
        for j in range(depth):
            prefix = f'layers.{i}.blocks.{j}.'
            if j % 2 and r > w:
                if r % w:
                    raise ConversionError(f'stage {i} resolution {r} is not a multiple of window {w}: Microsoft\'s '
                                          f'code cannot build it')
                out[prefix + 'attn_mask'] = shifted_window_mask((r, r), (w, w), (w // 2, w // 2))
            for name in ('norm1.weight', 'norm1.bias', 'attn.logit_scale', 'attn.q_bias', 'attn.v_bias'):
                if prefix + name in state:
                    out[prefix + name] = state[prefix + name]
            out[prefix + 'attn.relative_coords_table'] = relative_coords_table((w, w), pretrained[i])[None]
            out[prefix + 'attn.relative_position_index'] = relative_position_index((w, w))
            for name in ('attn.cpb_mlp.0.weight', 'attn.cpb_mlp.0.bias', 'attn.cpb_mlp.2.weight', 'attn.qkv.weight',
                         'attn.proj.weight', 'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight',
                         'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'):
                out[prefix + name] = state[prefix + name]
        if i + 1 < num_stages:
            merging_to_microsoft(state, out, i)
    norm_and_head_to_microsoft(state, out)
    placed = sum(1 for k in out if not any(s in k for s in IGNORE))
    if placed != len(state):
        extra = next(k for k in state if k not in out and not k.startswith('head.fc.') and
                     not DOWNSAMPLE.match(k))
        raise ConversionError(f'unexpected timm key {extra!r} for the Microsoft layout')
    return out


# ---------------------------------------------------------------- what Microsoft's buffers record

def _window_of_index(index: np.ndarray) -> int:
    side = int(round(math.sqrt(index.shape[0])))
    if index.ndim != 2 or side * side != index.shape[0]:
        raise ConversionError(f'relative_position_index of shape {tuple(index.shape)} is not a square window')
    return side


def pretrained_window_of(table: np.ndarray) -> int:
    """The window a stored `relative_coords_table` (1, 2w-1, 2w-1, 2) was normalised by: its largest entry is
    log2(8 (w-1)/(p-1) + 1) / log2(8), so p - 1 = 8 (w-1) / (2^(3 m) - 1). Equal to w: not fine-tuned (0)."""
    table = np.asarray(table, np.float64)
    w = (table.shape[1] + 1) // 2
    if w < 2:
        return 0
    m = float(np.abs(table).max())
    p = 1 + 8 * (w - 1) / (2 ** (3 * m) - 1) if 0 < m < 60 else float('nan')
    if not p == p or p < 1.5 or abs(p - round(p)) > 1e-3:
        raise ValueError(f'relative_coords_table of window {w} is normalised by no window (largest entry {m:.6g})')
    p = int(round(p))
    return 0 if p == w else p


def read_microsoft_buffers(state) -> dict:
    """{stage_windows, pretrained_window_sizes, img_res} read off Microsoft's buffers (each None when absent)."""
    depths = blocks_per_stage(state, TORCH_BLOCKS)
    windows, pretrained, res = [], [], None
    for i in range(len(depths)):
        index = state.get(f'layers.{i}.blocks.0.attn.relative_position_index')
        table = state.get(f'layers.{i}.blocks.0.attn.relative_coords_table')
        windows.append(None if index is None else _window_of_index(np.asarray(index)))
        try:
            pretrained.append(None if table is None else pretrained_window_of(table))
        except ValueError as e:
            raise ValueError(f'layers.{i}.blocks.0.attn.{e}') from None
        for j in range(depths[i]):
            mask = state.get(f'layers.{i}.blocks.{j}.attn_mask')
            if res is None and mask is not None and windows[i]:
                per_side = int(round(math.sqrt(mask.shape[0])))
                res = per_side * windows[i] * 2 ** i   # the patch grid of stage 0
    return dict(stage_windows=None if None in windows else tuple(windows),
                pretrained_window_sizes=None if None in pretrained else tuple(pretrained), grid=res)


# ---------------------------------------------------------------- the family

class SwinV2Family(SwinFamilyBase):
    """`vit_flax.SwinTransformerV2`: timm's layout and Microsoft's V2 release."""
    name = 'swinv2'
    module_cls = SwinTransformerV2
    recorded_fields = ('window_size', 'norm_eps', 'gelu', 'always_partition', 'img_size', 'pretrained_window_sizes')
    ignore_torch = IGNORE
    layouts = {'microsoft': (microsoft_to_timm, timm_to_microsoft)}
    layout_models = ('microsoft',)
    # config.json's `swinv2` model_type: converters/hf_transformers.py
    transformers_classes = {'Swinv2Model': ('swinv2', ''), 'Swinv2ForImageClassification': ('swinv2', 'swinv2.')}

    def detect_torch(self, state) -> bool:
        """`layers.*` keys with a logit scale or bias MLP (Swin V2 CR's files have `stages.*`: not this family's)."""
        return 'patch_embed.proj.weight' in state and any(
            k.startswith('layers.') and k.endswith(('attn.logit_scale', 'cpb_mlp.0.weight')) for k in state)

    def detect_flax(self, flat) -> bool:
        return 'patch_embed/proj/kernel' in flat and any(
            k.startswith('layers_') and k.endswith(('attn/logit_scale', 'cpb_mlp/Dense_0/kernel')) for k in flat)

    def detect_layout(self, state) -> str:
        """'microsoft' when stage 0 holds a patch merging (Microsoft's code puts it at the end of a stage)."""
        if self.detect_torch(state) and 'layers.0.downsample.reduction.weight' in state:
            return 'microsoft'
        return self.torch_layout

    def rules(self, model) -> List[Rule]:
        """The map for a `vit_flax.SwinTransformerV2` instance (its config decides which rows exist)."""
        rules = self.stem_rules()
        for i, depth in enumerate(model.depths):
            f, t = f'layers_{i}', f'layers.{i}'
            if i > 0:
                rules += dense_rules(f'{f}/downsample/reduction', f'{t}.downsample.reduction', bias=False)
                rules += norm_rules(f'{f}/downsample/norm', f'{t}.downsample.norm')
            for j in range(depth):
                fb, tb = f'{f}/blocks_{j}', f'{t}.blocks.{j}'
                rules.append(rule(f'{fb}/attn/logit_scale', f'{tb}.attn.logit_scale'))
                if model.qkv_bias:
                    rules += [rule(f'{fb}/attn/q_bias', f'{tb}.attn.q_bias'),
                              rule(f'{fb}/attn/v_bias', f'{tb}.attn.v_bias')]
                rules += dense_rules(f'{fb}/attn/cpb_mlp/Dense_0', f'{tb}.attn.cpb_mlp.0')
                rules += dense_rules(f'{fb}/attn/cpb_mlp/Dense_1', f'{tb}.attn.cpb_mlp.2', bias=False)
                rules += dense_rules(f'{fb}/attn/qkv', f'{tb}.attn.qkv', bias=False)
                rules += dense_rules(f'{fb}/attn/proj', f'{tb}.attn.proj')
                rules += norm_rules(f'{fb}/norm1', f'{tb}.norm1')
                rules += mlp_rules(f'{fb}/mlp', f'{tb}.mlp')
                rules += norm_rules(f'{fb}/norm2', f'{tb}.norm2')
        return rules + self.tail_rules(model)

    def transformers_block(self, model, t: str, h: str, spelling: str) -> List[Rule]:
        """transformers' Swinv2 block (both spellings are the same keys in 5.x): `attention.self.{query (weight,
        bias), key (weight only), value (weight, bias)}` = timm's `attn.qkv.weight` (rows q, k, v) with
        `attn.q_bias`, `attn.v_bias` (timm's k bias is a zero buffer); `attention.self.logit_scale` (H, 1, 1),
        `continuous_position_bias_mlp.{0 (w, b), 2 (w)}` = `attn.cpb_mlp`; `layernorm_before/after` are V2's
        post-norms, timm's `norm1/norm2`."""
        a = f'{h}attention.'
        qkv = tuple(f'{a}self.{n}.weight' for n in ('query', 'key', 'value'))
        rules = [rule(f'{t}attn.qkv.weight', qkv, QKV_ROWS),
                 rule(f'{t}attn.q_bias', f'{a}self.query.bias'), rule(f'{t}attn.v_bias', f'{a}self.value.bias'),
                 rule(f'{t}attn.logit_scale', f'{a}self.logit_scale'),
                 rule(f'{t}attn.cpb_mlp.2.weight', f'{a}self.continuous_position_bias_mlp.2.weight')]
        rules += renamed_rules(f'{t}attn.cpb_mlp.0', f'{a}self.continuous_position_bias_mlp.0')
        rules += renamed_rules(f'{t}attn.proj', f'{a}output.dense')
        rules += renamed_rules(f'{t}norm1', f'{h}layernorm_before') + renamed_rules(f'{t}norm2', f'{h}layernorm_after')
        return rules + renamed_rules(f'{t}mlp.fc1', f'{h}intermediate.dense') + renamed_rules(f'{t}mlp.fc2', f'{h}output.dense')

    # ------------------------------------------------------------ architecture

    def config_from_flax(self, flat) -> dict:
        """Architecture fields read off a flat Flax tree (heads from `logit_scale`; the window is not recorded)."""
        sizes = self.sizes_from_flax(flat)
        return dict(sizes, qkv_bias='layers_0/blocks_0/attn/q_bias' in flat,
                    num_heads=tuple(flat[f'layers_{i}/blocks_0/attn/logit_scale'].shape[0]
                                    for i in range(len(sizes['depths']))))

    def config_from_torch(self, state) -> dict:
        """The same fields off a timm-layout state_dict, plus (`_ms`, for `resolve`) what Microsoft's buffers
        record when the file has them."""
        sizes = self.sizes_from_torch(state)
        return dict(sizes, qkv_bias='layers.0.blocks.0.attn.q_bias' in state,
                    num_heads=tuple(state[f'layers.{i}.blocks.0.attn.logit_scale'].shape[0]
                                    for i in range(len(sizes['depths']))),
                    _ms=read_microsoft_buffers(state) if any(k.endswith(IGNORE) for k in state) else None)

    def core(self, model) -> dict:
        return self.core_sizes(model)

    def overrides(self, cfg: dict, model) -> dict:
        """The fields that make `model` (holding the file's core fields) hold the checkpoint: its head, biases,
        channels, and what Microsoft's buffers recorded (window, pretrained windows, input size)."""
        kw = {k: cfg[k] for k in ('num_classes', 'qkv_bias', 'in_chans', 'window_size', 'pretrained_window_sizes',
                                  'img_size') if cfg.get(k) is not None and cfg[k] != getattr(model, k)}
        stages = len(model.depths)   # the file's (with_core), which may differ from the registered four
        trained = tuple(model.pretrained_window_sizes)
        if 'pretrained_window_sizes' not in kw and len(trained) != stages:
            # not recorded (no buffers): one entry per stage of the file, the registered value where it is one
            # for every stage (0: each stage's own window), else 0
            kw['pretrained_window_sizes'] = (trained[0] if len(set(trained)) == 1 else 0,) * stages
        return kw

    def preference(self, cfg: dict, name: str, model) -> tuple:
        """Most core fields shared, then the fewest recorded fields (window, pretrained windows, size) differing,
        then (a timm file records none of them) the smallest window: window 8 at 256 for T/S/B, not window 16."""
        shared = sum(cfg.get(k) is None or cfg[k] == v for k, v in self.core(model).items())
        recorded = sum(cfg.get(k) is not None and cfg[k] != getattr(model, k)
                       for k in ('window_size', 'pretrained_window_sizes', 'img_size', 'num_classes'))
        return -shared, recorded, max(to_tuple(model.window_size, 2)), name

    def resolve(self, cfg, arch, layout, model_name, path):
        """Microsoft's buffers (`cfg['_ms']`, from `config_from_torch`) give the window, the pretrained windows and
        the input size; a timm-layout file gives none of them: the registered name's are taken. Both are said."""
        notes = []
        ms = cfg.pop('_ms', None)
        if ms is not None:
            found = []
            if ms['stage_windows']:
                window = ms['stage_windows'][0]
                cfg['window_size'] = window
                found.append(f'window_size={window}')
            if ms['pretrained_window_sizes']:
                cfg['pretrained_window_sizes'] = ms['pretrained_window_sizes']
                found.append(f'pretrained_window_sizes={ms["pretrained_window_sizes"]} (from the coordinate '
                             f'tables\' normalisation)')
            if ms['grid']:
                img = ms['grid'] * cfg['patch_size'][0]
                cfg['img_size'] = img
                found.append(f'img_size={img} (from the attn_mask window counts)')
            elif ms['stage_windows']:
                img = ms['stage_windows'][-1] * 2 ** (len(ms['stage_windows']) - 1) * cfg['patch_size'][0]
                cfg['img_size'] = img
                found.append(f'img_size={img} (no attn_mask: the last stage taken as one window)')
            if found:
                notes.append(f'{path}: inferred from Microsoft\'s buffers: {", ".join(found)}')
        elif model_name is None:
            notes.append(f'{path}: a {layout}-layout Swin V2 file does not record its window, pretrained window or '
                         f'input size: the registered model\'s are taken (pass --model to choose)')
        for k in ('window_size', 'pretrained_window_sizes', 'img_size'):
            if arch and k in arch and cfg.get(k) is not None and arch[k] != cfg[k]:
                notes.append(f'{path}: {k}={arch[k]} as asked (the file records {cfg[k]})')
                cfg[k] = arch[k]
        return cfg, arch, notes

    def fine_tune_target(self, src, target, overrides: dict, log):
        """A window change (8 -> 16, 12 -> 24) normalises the new coordinate tables by the windows the weights were
        trained with, as Microsoft's fine-tuning configs do (`PRETRAINED_WINDOW_SIZES: [12, 12, 12, 6]` for
        12 -> 16 at 192 -> 256): when the caller sets no pretrained_window_sizes and the target has none, they
        are the source's (its own pretrained windows, else its stage windows)."""
        if not isinstance(target, SwinTransformerV2) or 'pretrained_window_sizes' in overrides \
                or any(target.pretrained_window_sizes) or len(target.depths) != len(src.depths):
            return target
        old = [w for w, _ in src.stage_windows()]
        if old == [w for w, _ in target.stage_windows()]:
            return target
        trained = tuple(p if p else w[0] for p, w in zip(src.pretrained_window_sizes, old))
        log(f'pretrained_window_sizes={trained}: the windows the weights were trained with, as Microsoft\'s '
            f'fine-tuning configs set them when the window changes (pass pretrained_window_sizes to choose)')
        return target.clone(pretrained_window_sizes=trained)

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str = 'bicubic', log):
        """A window change needs no table resampling (the bias MLP is evaluated on the new window's coordinates,
        Microsoft's fine-tuning 8 -> 16, 12 -> 24): said, nothing else changes."""
        flat = super().adapt(flat, src, dst, resample=resample, bias_resize=bias_resize, log=log)
        old = [w for w, _ in src.stage_windows()]
        new = [w for w, _ in dst.stage_windows()]
        if old != new:
            log(f'window: stage windows {tuple(w[0] for w in old)} -> {tuple(w[0] for w in new)}; Swin V2\'s '
                f'continuous position bias needs no table resampling (the bias MLP reads the new coordinates, '
                f'normalised by pretrained_window_sizes={tuple(dst.pretrained_window_sizes)})')
        return flat

    # ------------------------------------------------------------ timm

    def timm_kwargs(self, model) -> dict:
        """Arguments that make `timm.create_model(name, **kw)` build the same architecture as `model`."""
        if model.gelu != 'exact' or model.norm_eps != 1e-5:
            raise ValueError("timm's Swin V2 uses exact GELU and LayerNorm eps 1e-5")
        img, patch = to_tuple(model.img_size, 2), to_tuple(model.patch_size, 2)
        if any(i % p for i, p in zip(img, patch)):
            raise ValueError(f'timm\'s Swin V2 needs an img_size that is a whole number of patches, not {img}')
        return dict(num_classes=model.num_classes, img_size=img, patch_size=patch, in_chans=model.in_chans,
                    embed_dim=model.embed_dim, depths=tuple(model.depths), num_heads=tuple(model.num_heads),
                    window_size=model.window_size, pretrained_window_sizes=tuple(model.pretrained_window_sizes),
                    always_partition=model.always_partition, mlp_ratio=model.mlp_ratio, qkv_bias=model.qkv_bias,
                    drop_rate=model.drop_rate, proj_drop_rate=model.proj_drop_rate,
                    attn_drop_rate=model.attn_drop_rate, drop_path_rate=model.drop_path_rate)

    def describe(self, ck) -> str:
        return f'Swin V2 ({ck.layout})'


FAMILY = SwinV2Family()
