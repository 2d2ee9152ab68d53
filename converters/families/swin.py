"""Swin V1: the Flax tree <-> timm state_dict map, the Microsoft release layout, and bias-table resizing.

Layouts:
- timm (>= 0.9), the table below: patch merging at the start of `layers.{i}` (i > 0), classifier `head.fc`,
  no buffers in the state_dict (`relative_position_index`/`attn_mask` are non-persistent there).
- Microsoft's release (`{'model': state_dict}`): patch merging at the end of `layers.{i}` (i < last),
  classifier `head`, and the persistent buffers `attn.relative_position_index` (int64 (w², w²)) in every
  block and `attn_mask` (float32 (nW, w², w²)) in shifted blocks of stages larger than the window.
  `microsoft_to_timm` does what timm's own `checkpoint_filter_fn` does for such files (tested equal);
  `timm_to_microsoft` regenerates the buffers so the result reads like an official file.
- WZMIAOMIAO's `pytorch_classification/swin_transformer/model.py` (layout `wzmiaomiao`):
  Microsoft's keys (merging at the end of a stage, `head`) and `relative_position_index` buffers, but no
  `attn_mask` (it builds the mask in forward), saved unwrapped. That code never shrinks the window nor
  drops the shift on a stage no larger than the window (timm's `always_partition=True`), so a file in
  this layout is read into a model with `always_partition=True` (see `SwinFamily.detect_layout`).
"""
import re
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from vit_flax.models.layers import to_tuple
from vit_flax.models.swin import SwinTransformer, relative_position_index, shifted_window_mask, stage_window_sizes

from ..errors import ConversionError
from ..resample import resize_grid
from ..rules import Rule, dense_rules, mlp_rules, norm_rules, qkv_rules, renamed_rules, rule
from .swin_common import (TORCH_BLOCKS, SwinFamilyBase, merging_to_microsoft, merging_to_timm,
                          norm_and_head_to_microsoft, stage_count)

# Buffers some files carry (Microsoft's release, timm < 0.9): derived from the config, never read.
IGNORE = ('relative_position_index', 'attn_mask')


# ---------------------------------------------------------------- Microsoft's release layout

_BLOCK = re.compile(TORCH_BLOCKS)


def microsoft_to_timm(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Official layout -> timm layout: drop the buffers, move `layers.{i}.downsample` to `layers.{i+1}`,
    `head.*` to `head.fc.*`. Arrays are passed through untouched (bit-exact)."""
    return merging_to_timm(state, drop=IGNORE)


def window_field(windows: Sequence[int]):
    """The `window_size` a checkpoint's per-stage windows record: one int when they never grow from stage to
    stage (a later stage no larger than the window clamps it: swin_tiny at 224, Swin-S3-S's (14, 14, 14, 7)),
    else the tuple of stage windows (Swin-S3-T/B's (7, 7, 14, 7))."""
    windows = tuple(int(w) for w in windows)
    return windows[0] if all(a >= b for a, b in zip(windows, windows[1:])) else windows


def _window_of(table: np.ndarray) -> int:
    side = int(round(np.sqrt(table.shape[0])))
    if side * side != table.shape[0] or side % 2 == 0:
        raise ConversionError(f'relative_position_bias_table of shape {tuple(table.shape)} is not a square window')
    return (side + 1) // 2


def timm_to_microsoft(state: Dict[str, np.ndarray], img_size: Optional[Union[int, Sequence[int]]] = None,
                      masks: bool = True) -> Dict[str, np.ndarray]:
    """timm layout -> official layout, with the buffers the official code saves, in its key order.
    `masks=False` leaves out the `attn_mask` buffers: WZMIAOMIAO's layout (`timm_to_wzmiaomiao`).

    The masks depend on each stage's resolution, which a state_dict does not record: `img_size` gives it.
    Left out, it is what every official model uses, patch * window * 2^(stages-1) (224 for window 7,
    384 for window 12), i.e. the last stage's resolution equals its window (Swin-S3 too: 224).
    Each block's window is read from its bias table (already clamped where a stage is smaller).
    """
    num_stages = stage_count(state)
    if 'layers.0.downsample.reduction.weight' in state:
        raise ConversionError('already in the Microsoft layout (layers.0 has a downsample)')
    patch = tuple(state['patch_embed.proj.weight'].shape[-2:])
    if img_size is None:   # the last stage's window: Swin-S3-S's first stage has 14, its 224 px last stage 7
        w_last = _window_of(state[f'layers.{num_stages - 1}.blocks.0.attn.relative_position_bias_table'])
        img_size = tuple(p * w_last * 2 ** (num_stages - 1) for p in patch)
    img = to_tuple(img_size, 2)
    res = tuple(-(-i // p) for i, p in zip(img, patch))

    # official state_dict order: a module's own params and buffers before its children's
    # (so a block's attn_mask precedes norm1; an attention's index follows its table), blocks before
    # the stage's downsample (whose `reduction` was registered before `norm`), then norm and head.
    out = {k: v for k, v in state.items() if k.startswith('patch_embed.')}
    for i in range(num_stages):
        if i > 0:
            res = tuple((r + 1) // 2 for r in res)
        depth = 1 + max(int(m.group(2)) for k in state for m in [_BLOCK.match(k)] if m and int(m.group(1)) == i)
        for j in range(depth):
            prefix = f'layers.{i}.blocks.{j}.'
            table = state[prefix + 'attn.relative_position_bias_table']
            w = _window_of(table)
            # the official rule: shift only when the stage is larger than the window
            if masks and j % 2 and min(res) > w:
                if any(r % w for r in res):
                    raise ConversionError(f'stage {i} resolution {res} is not a multiple of window {w}: '
                                          f'the official code cannot build it (pass the right img_size)')
                out[prefix + 'attn_mask'] = shifted_window_mask(res, (w, w), (w // 2, w // 2))
            block = {k: v for k, v in state.items() if k.startswith(prefix)}
            for k, v in block.items():
                out[k] = v
                if k.endswith('attn.relative_position_bias_table'):
                    out[prefix + 'attn.relative_position_index'] = relative_position_index((w, w))
        if i + 1 < num_stages:
            merging_to_microsoft(state, out, i)
    norm_and_head_to_microsoft(state, out)
    missing = [k for k in state if not k.startswith(('layers.', 'patch_embed.', 'norm.', 'head.fc.'))
               and not any(s in k for s in IGNORE)]
    if missing:
        raise ConversionError(f'unexpected timm key {missing[0]!r} for the Microsoft layout')
    n_in = sum(1 for k in state if not any(s in k for s in IGNORE))
    n_out = sum(1 for k in out if not any(s in k for s in IGNORE))
    if n_in != n_out:
        raise ConversionError(f'{n_in - n_out} timm key(s) have no place in the Microsoft layout')
    return out


# ---------------------------------------------------------------- window size changes

def resize_relative_bias_table(table: np.ndarray, new_window: Union[int, Tuple[int, int]],
                               method: str = 'bicubic', old_window: Optional[Union[int, Tuple[int, int]]] = None,
                               ) -> np.ndarray:
    """Resize a ((2w-1)², heads) bias table to a new window, e.g. 7 -> 12: (169, H) -> (529, H).

    method='bicubic' (default): Microsoft's fine-tuning code (`load_pretrained`): each head's (2w-1)²
    grid through `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`, no antialias
    (computed in numpy without torch, `converters.resample.resize_grid`: equal to torch's to ~1e-6).
    method='timm': timm's `resize_rel_pos_bias_table` (used by its `checkpoint_filter_fn` and
    `set_window_size`): BEiT's geometric-progression sample positions, linear interpolation
    (needs timm: `pip install 'vit-flax-tools[torch]'`). The two give different tables; neither is exact, both are starting points
    for fine-tuning. The source window is taken as square unless `old_window` is given.
    """
    table = np.asarray(table)
    heads = table.shape[1]
    new = to_tuple(new_window, 2)
    old = to_tuple(old_window, 2) if old_window is not None else (_window_of(table),) * 2
    src, dst = tuple(2 * w - 1 for w in old), tuple(2 * w - 1 for w in new)
    if src[0] * src[1] != table.shape[0]:
        raise ConversionError(f'table {tuple(table.shape)} does not fit window {old}')
    if src == dst:
        return table.copy()
    if method == 'bicubic':   # torch's F.interpolate computed in numpy (converters.resample), no torch needed
        out = resize_grid(np.asarray(table, np.float32).reshape(*src, heads), dst, 'bicubic').reshape(-1, heads)
    elif method == 'timm':
        from ..optional import require
        resize_rel_pos_bias_table = require('timm.layers', "--bias-resize timm").resize_rel_pos_bias_table
        import torch   # timm imported it
        t = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32))
        out = resize_rel_pos_bias_table(t, new_window_size=new, new_bias_shape=(dst[0] * dst[1], heads),
                                        old_window_size=old).contiguous().numpy()
    else:
        raise ValueError(f"method must be 'bicubic' or 'timm', got {method!r}")
    return out.astype(table.dtype)


def timm_to_wzmiaomiao(state: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """timm layout -> WZMIAOMIAO's layout: Microsoft's keys and index buffers, no `attn_mask`."""
    return timm_to_microsoft(state, masks=False)


# What a layout says about the computation, beyond the weights: (config fields, why), said out loud on read.
LAYOUT_CONFIG = {
    'wzmiaomiao': (dict(always_partition=True),
                   "relative_position_index buffers and no attn_mask: WZMIAOMIAO's swin_transformer/model.py, "
                   'which never shrinks the window nor drops the shift on a stage no larger than the window'),
}


# transformers' Swin block: timm name -> transformers name under `encoder.layers.i.blocks.j.`, per key spelling
# (5.x: transformers 5's own, `save_original_format=False`); `relative_position_index` buffers (older files) ignored
TRANSFORMERS_BLOCK = {
    'hub': dict(norm1='layernorm_before', norm2='layernorm_after',
                qkv=('attention.self.query', 'attention.self.key', 'attention.self.value'),
                table='attention.self.relative_position_bias_table', proj='attention.output.dense',
                fc1='intermediate.dense', fc2='output.dense'),
    'internal': dict(norm1='layernorm_before', norm2='layernorm_after',
                     qkv=('attention.q_proj', 'attention.k_proj', 'attention.v_proj'),
                     table='attention.relative_position_bias.relative_position_bias_table', proj='attention.o_proj',
                     fc1='mlp.fc1', fc2='mlp.fc2'),
}


class SwinFamily(SwinFamilyBase):
    """`vit_flax.SwinTransformer` (Swin V1): timm's layout, Microsoft's release and WZMIAOMIAO's code."""
    name = 'swin'
    module_cls = SwinTransformer
    recorded_fields = ('qk_scale', 'norm_eps', 'gelu', 'always_partition', 'img_size')
    ignore_torch = IGNORE
    layouts = {'microsoft': (microsoft_to_timm, timm_to_microsoft),
               'wzmiaomiao': (microsoft_to_timm, timm_to_wzmiaomiao)}
    layout_config = LAYOUT_CONFIG
    transformers_classes = {'SwinModel': ('swin', ''), 'SwinForImageClassification': ('swin', 'swin.')}

    def detect_torch(self, state) -> bool:
        return any('relative_position_bias_table' in k for k in state) and 'patch_embed.proj.weight' in state

    def detect_flax(self, flat) -> bool:
        return 'patch_embed/proj/kernel' in flat and any('relative_position_bias_table' in k for k in flat)

    def rules(self, model) -> List[Rule]:
        """The map for a `vit_flax.SwinTransformer` instance (its config decides which rows exist)."""
        rules = self.stem_rules()
        for i, depth in enumerate(model.depths):
            f, t = f'layers_{i}', f'layers.{i}'
            if i > 0:
                rules += norm_rules(f'{f}/downsample/norm', f'{t}.downsample.norm')
                rules += dense_rules(f'{f}/downsample/reduction', f'{t}.downsample.reduction', bias=False)
            for j in range(depth):
                fb, tb = f'{f}/blocks_{j}', f'{t}.blocks.{j}'
                rules += norm_rules(f'{fb}/norm1', f'{tb}.norm1')
                rules.append(rule(f'{fb}/attn/relative_position_bias_table', f'{tb}.attn.relative_position_bias_table'))
                rules += dense_rules(f'{fb}/attn/qkv', f'{tb}.attn.qkv', bias=model.qkv_bias)
                rules += dense_rules(f'{fb}/attn/proj', f'{tb}.attn.proj')
                rules += norm_rules(f'{fb}/norm2', f'{tb}.norm2')
                rules += mlp_rules(f'{fb}/mlp', f'{tb}.mlp')
        return rules + self.tail_rules(model)

    def transformers_block(self, model, t: str, h: str, spelling: str) -> List[Rule]:
        b = TRANSFORMERS_BLOCK[spelling]
        return (renamed_rules(f'{t}norm1', h + b['norm1']) + qkv_rules(f'{t}attn.qkv', [h + k for k in b['qkv']],
                                                                        model.qkv_bias)
                + [rule(f'{t}attn.relative_position_bias_table', h + b['table'])]
                + renamed_rules(f'{t}attn.proj', h + b['proj']) + renamed_rules(f'{t}norm2', h + b['norm2'])
                + renamed_rules(f'{t}mlp.fc1', h + b['fc1']) + renamed_rules(f'{t}mlp.fc2', h + b['fc2']))

    def timm_kwargs(self, model) -> dict:
        """Arguments that make `timm.create_model(name, **kw)` build the same architecture as `model`.

        timm builds at `img_size` with `strict_img_size=True` (its default); to feed other sizes to the timm
        model add `strict_img_size=False`, which is what the Flax model always accepts.
        """
        if model.qk_scale is not None:
            raise ValueError('timm has no qk_scale: its attention scale is always head_dim ** -0.5')
        if model.gelu != 'exact' or model.norm_eps != 1e-5:
            raise ValueError("timm's Swin uses exact GELU and LayerNorm eps 1e-5")
        img, patch = to_tuple(model.img_size, 2), to_tuple(model.patch_size, 2)
        kw = dict(num_classes=model.num_classes, img_size=img, patch_size=patch, in_chans=model.in_chans,
                  embed_dim=model.embed_dim, depths=tuple(model.depths), num_heads=tuple(model.num_heads),
                  window_size=model.window_size, always_partition=model.always_partition, mlp_ratio=model.mlp_ratio,
                  qkv_bias=model.qkv_bias, drop_rate=model.drop_rate, proj_drop_rate=model.proj_drop_rate,
                  attn_drop_rate=model.attn_drop_rate, drop_path_rate=model.drop_path_rate)
        if any(i % p for i, p in zip(img, patch)):
            # Flax pads the image to whole patches; timm does that only with dynamic_img_pad, and sizes its
            # stages from the floored grid, so build it at the padded size and let it accept the real one.
            from functools import partial
            from timm.layers import PatchEmbed
            kw.update(img_size=tuple(-(-i // p) * p for i, p in zip(img, patch)), strict_img_size=False,
                      embed_layer=partial(PatchEmbed, dynamic_img_pad=True))
        return kw

    def config_from_flax(self, flat) -> dict:
        """Architecture fields of `SwinTransformer` read off a flat Flax tree (heads and window from the bias tables)."""
        sizes = self.sizes_from_flax(flat)
        tables = [flat[f'layers_{i}/blocks_0/attn/relative_position_bias_table'] for i in range(len(sizes['depths']))]
        windows = tuple(_window_of(t) for t in tables)
        return dict(sizes, stage_windows=windows, num_heads=tuple(t.shape[1] for t in tables),
                    window_size=window_field(windows), qkv_bias='layers_0/blocks_0/attn/qkv/bias' in flat)

    def config_from_torch(self, state) -> dict:
        """The same fields read off a timm-layout state_dict (Swin's bias tables do record the heads)."""
        sizes = self.sizes_from_torch(state)
        tables = [state[f'layers.{i}.blocks.0.attn.relative_position_bias_table'] for i in range(len(sizes['depths']))]
        windows = tuple(_window_of(t) for t in tables)
        return dict(sizes, stage_windows=windows, num_heads=tuple(t.shape[1] for t in tables),
                    window_size=window_field(windows), qkv_bias='layers.0.blocks.0.attn.qkv.bias' in state)

    def core(self, model) -> dict:
        """Fields of a registered model that a checkpoint must share (the rest are `overrides`)."""
        windows = stage_window_sizes(model.window_size, len(model.depths))
        if len(set(windows)) == 1 or any(h != w for h, w in windows):
            wh, ww = windows[0]
            window = wh if wh == ww else (wh, ww)
        else:   # square windows per stage (Swin-S3), as a checkpoint's tables record them
            window = window_field([h for h, _ in windows])
        return dict(self.core_sizes(model), window_size=window)

    def overrides(self, cfg: dict, model) -> dict:
        """Overrides that make `model` (already holding the file's core fields) hold exactly the checkpoint.

        A Swin checkpoint does not record its image size, but its per-stage bias tables record each stage's
        window, which the image size decides (a stage no larger than the window uses the whole stage). The
        registered size is kept when it gives the file's windows; otherwise the official convention
        patch * window * 2^(stages-1), where the last stage is exactly one window."""
        kw = {k: cfg[k] for k in ('num_classes', 'qkv_bias', 'in_chans', 'always_partition')
              if k in cfg and cfg[k] != getattr(model, k)}
        windows = lambda m: tuple(w[0] for w, _ in m.stage_windows())
        if cfg.get('stage_windows') and windows(model.clone(**kw)) != tuple(cfg['stage_windows']):
            patch, window = to_tuple(model.patch_size, 2), stage_window_sizes(model.window_size, len(model.depths))[0]
            kw['img_size'] = tuple(p * w * 2 ** (len(model.depths) - 1) for p, w in zip(patch, window))
        return kw

    def detect_layout(self, state) -> str:
        """'timm', 'microsoft' or 'wzmiaomiao' (WZMIAOMIAO's code), from the keys alone.

        Microsoft and WZMIAOMIAO's code keep each stage's patch merging at the end of that stage, so stage 0 has one.
        Both save `relative_position_index`; only Microsoft's code saves `attn_mask`, in the shifted blocks
        of every stage larger than the window (every official configuration has such stages). So: index
        buffers and no mask anywhere -> WZMIAOMIAO's code. A file with no buffers at all is read as Microsoft's
        (pass `always_partition=True` to read it as WZMIAOMIAO's computation).
        """
        if 'layers.0.downsample.reduction.weight' not in state or not self.detect_torch(state):
            return 'timm'   # (a Swin V2 file has no relative_position_bias_table: not this family's)
        has = lambda suffix: any(k.endswith(suffix) for k in state)
        if has('relative_position_index') and not has('attn_mask'):
            return 'wzmiaomiao'
        return 'microsoft'

    def layout_note(self, model, layout: str) -> Optional[str]:
        """A warning when `model` computes differently from the code that reads `layout`."""
        if layout == 'wzmiaomiao' and not model.always_partition:
            return ("WZMIAOMIAO's code shifts and keeps the full window on every stage; this model "
                    '(always_partition=False) does not on stages no larger than the window, so that code will '
                    'compute other logits from this file')
        if layout == 'microsoft' and model.always_partition:
            return ("Microsoft's code shrinks the window and drops the shift on stages no larger than the window; this "
                    'model (always_partition=True) does not, so that code will compute other logits from this file')
        if layout == 'timm' and model.always_partition:
            return 'this model has always_partition=True: build the timm model with always_partition=True as well'
        return None

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str = 'bicubic', log):
        """Resize every relative-position bias table whose window differs in `dst` (e.g. 7 -> 12), by
        `bias_resize` ('bicubic' as Microsoft's fine-tuning code, or 'timm')."""
        from flax.traverse_util import flatten_dict
        from vit_flax.summary import param_shapes
        flat = super().adapt(flat, src, dst, resample=resample, bias_resize=bias_resize, log=log)
        expected = flatten_dict(param_shapes(dst), sep='/')
        flat = dict(flat)
        changed = set()
        for k, v in flat.items():
            if k.endswith('relative_position_bias_table') and k in expected and expected[k].shape != v.shape:
                new_w = int(round((expected[k].shape[0] ** 0.5 + 1) / 2))
                old_w = _window_of(v)
                flat[k] = resize_relative_bias_table(v, new_w, method=bias_resize)
                changed.add((old_w, new_w))
        for old_w, new_w in sorted(changed):
            log(f'relative_position_bias_table: window {old_w} -> {new_w} ({bias_resize})')
        return flat


FAMILY = SwinFamily()
