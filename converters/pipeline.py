"""The converters' pipeline: read -> adapt -> write, for any format and family.

Every path goes through the flat Flax tree (keys joined by '/', blocks unrolled):

    read_checkpoint(path)   a format (formats/) gives arrays as stored; the family (families/) that detects
                            them decodes them: its own .npz layouts, or its rule table from a torch layout;
                            the architecture read off the arrays picks the registered model (match_model)
    adapt(flat, src, dst)   the family's surgery (positions, windows), then the head
    validate, check_finite  every key, shape and dtype of the target; no NaN/Inf unless allowed
    write_flat(flat, model, path)   the family encodes (rule table, layouts, .npz layouts); a format writes

`load_model`, `load_params` and `save_params` are these steps in order. Nothing here knows a family by name.
"""
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

import vit_flax
from vit_flax.models.layers import to_tuple
from vit_flax.registry import UnknownOptionError, check_options, list_models, model_config, split_tag
from vit_flax.errors import ModelConfigError
from vit_flax.summary import param_shapes

from . import formats, hf_transformers, rules
from .errors import ConversionError
from .families import FAMILIES, Family, family_of, flax_family, torch_family
from .formats import hf_flax, timm_folder, training_ckpt
from .resample import DEFAULT_METHOD
from .scan import is_scanned, stack_blocks, unstack_blocks

HEAD_INITS = ('zeros', 'fresh')
# Overrides that describe the model wanted, not the checkpoint: adapt() bridges them (head surgery,
# resampling, bias-table resizing), so they take no part in matching a checkpoint to its model.
TARGET_ONLY = ('num_classes', 'img_size', 'window_size', 'representation_size', 'posemb', 'scan_blocks',
               'pretrained_window_sizes')


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


@dataclass
class Checkpoint:
    path: str
    format: str          # npz | torch | safetensors | orbax
    layout: str          # released | linen | big_vision | flax | a family's torch layouts (timm, microsoft, ...)
    raw: Dict[str, np.ndarray]
    flat: Dict[str, np.ndarray]   # flat Flax params, as stored (dtype kept), blocks unrolled
    family: Family
    model_name: str
    model: object                 # a module whose tree is `flat` (stacked when model.scan_blocks: the file's form)
    detected: bool                # model_name came from the checkpoint, not the caller
    notes: List[str] = field(default_factory=list)  # decided beyond the keys (e.g. a layout's config); logged
    # what a model folder (config.json), hf-hub snapshot or training run records beside the weights
    kind: str = 'file'                      # file | timm-folder | training
    source: Optional[str] = None            # the path or hf-hub name given (path: the weights read)
    pretrained_cfg: Optional[dict] = None   # preprocessing, timm's vocabulary
    class_names: Optional[List[str]] = None


# ---------------------------------------------------------------- model detection

def _family_names(family: Family) -> List[str]:
    return [n for n in list_models() if model_config(n)[0] is family.module_cls]


def match_model(family: Family, cfg: dict, path: str, model_name: Optional[str] = None, arch: Optional[dict] = None,
                adapt_core: bool = False):
    """(name, module) for the checkpoint architecture `cfg`.

    `model_name` pins the registered base, and `arch` overrides its fields (a custom depth, patch size...)
    before the checkpoint is checked against it; with `adapt_core` (a caller that adapts the weights to that
    registered model, `load_params`) the family's `adaptable` core fields may differ and keep the file's. Without a name, the registered model sharing the most
    core fields is taken; an architecture no name has is accepted when the file records every core field
    (npz/orbax record the heads, a fused torch qkv does not).
    """
    if model_name:
        model_name = split_tag(model_name)[0]   # a pretrained tag names weights, not an architecture
        cls, _ = model_config(model_name)
        if cls is not family.module_cls:
            raise ConversionError(f'{path}: holds a {family.name} checkpoint, but {model_name} is a {cls.__name__}')
        base = vit_flax.create_model(model_name, **(arch or {}))
        for k, v in family.core(base).items():
            if cfg.get(k) is not None and cfg[k] != v:
                if adapt_core and k in family.adaptable:   # the file's; the weights adapted to the target later
                    base = base.clone(**{k: cfg[k]})
                    continue
                raise ConversionError(f'{path}: checkpoint has {k}={cfg[k]}, but {model_name} has {k}={v}')
        name = model_name
    else:
        names = _family_names(family)
        name = min(names, key=lambda n: family.preference(cfg, n, vit_flax.create_model(n)))
        core = family.core(vit_flax.create_model(name))
        unknown = [k for k in core if cfg.get(k) is None]
        if any(cfg[k] != v for k, v in core.items() if k not in unknown) and unknown:
            shown = ', '.join(f'{k}={cfg.get(k)}' for k in core)
            raise ConversionError(f'{path}: no registered model matches ({shown}); pass --model')
        base = family.with_core(vit_flax.create_model(name), cfg)
    try:
        return name, base.clone(**family.overrides(cfg, base))
    except ValueError as e:
        raise ConversionError(f'{path}: {e}') from None


# ---------------------------------------------------------------- reading

def read_checkpoint(path: str, model_name: Optional[str] = None, arch: Optional[dict] = None,
                    img_size=None, step=None, log: Callable[[str], None] = _stderr,
                    adapt_core: bool = False, ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint and decode it into the flat Flax tree of a matching model.

    `path`: a file, an orbax folder, a timm model folder, a Hugging Face transformers folder (config.json with a
    `model_type`, see hf_transformers; Flax-only folders read by formats.hf_flax), `hf-hub:ORG/NAME[@REV]`
    (huggingface_hub; a timm or transformers repo) or a
    training workdir (`step`: 'best' by default, 'latest' or a number; `ema`: its weight EMA, not its params).
    `arch`: field overrides of `model_name` that describe the checkpoint (see `match_model`).
    `img_size`: the size asked for, taken as the checkpoint's own when its positions fit it (a position
    table does not say whether 280 patches are 14x20 or 20x14).
    `adapt_core`: see `match_model` (`load_params` adapts a FlexiViT patch kernel to the named model's).
    """
    path = str(path)
    if training_ckpt.is_training_checkpoint(path):
        return _read_training(path, step, log, ema)
    folder = timm_folder.resolve(path)
    if step is not None:
        raise ConversionError(f'{path}: a step is chosen only in a training workdir')
    if ema:
        raise ConversionError(f'{path}: EMA weights are chosen only in a training workdir')
    if folder is not None and not os.path.isdir(folder):   # an hf-hub repo without config.json: its weights
        path = folder
    elif folder is not None:
        msgpack = hf_flax.folder_msgpack(folder)   # a transformers folder whose weights are Flax's only
        if msgpack is not None:
            ck = read_checkpoint(msgpack, model_name, arch, img_size, None, log, adapt_core)
            ck.source = path
            return ck
        if hf_transformers.is_transformers_folder(folder):   # config.json names a model_type
            return _read_transformers(path, folder, model_name, arch, img_size)
        return _read_folder(path, folder, model_name, arch, img_size)
    fmt = formats.file_format(path)
    raw = formats.read_file(path)
    scanned, notes, flat, hf, arch_in = False, [], None, None, arch
    if fmt == 'msgpack':   # transformers' former Flax checkpoints: our ViT tree, config.json beside the file
        hf = hf_flax.read_vit(path, raw)
        flat, layout, notes = hf.flat, 'hf_flax', list(hf.notes)
        img_size = img_size if img_size is not None else hf.img_size
    if fmt == 'npz':   # a family's own .npz layouts (Google's), else the Flax tree itself
        flat, layout, scanned = next(filter(None, (fam.from_npz(raw, path) for fam in FAMILIES)), (None,) * 3)
    if fmt in ('npz', 'orbax') and flat is None:
        scanned = is_scanned(raw)
        flat, layout = unstack_blocks(dict(raw), path), 'flax'
    if flat is not None:
        family = flax_family(flat)
        if family is None:
            raise ConversionError(f'{path}: not a ViT/DeiT/Swin/vit-pytorch Flax tree '
                                  f'(first keys: {", ".join(list(flat)[:3])})')
        cfg = dict(_read_config(family.config_from_flax, flat, path), img_size_hint=img_size)
    else:
        family = torch_family(raw, path)
        state, layout = raw, family.detect_layout(raw)
        if layout != family.torch_layout:
            try:
                state = family.layouts[layout][0](raw)
            except ConversionError as e:
                raise ConversionError(f'{path}: {e}') from None
        cfg = dict(_read_config(family.config_from_torch, state, path), img_size_hint=img_size)
        if layout in family.layout_config:
            fields, why = family.layout_config[layout]
            cfg.update(fields)
            notes.append(f'{layout} layout ({why}): {", ".join(f"{k}={v}" for k, v in fields.items())}')
    _check_options(family.module_cls, {**(arch or {}), **({} if img_size is None else {'img_size': img_size})},
                   path, model_name)
    cfg, arch, resolved = family.resolve(cfg, arch, layout, model_name, path)
    notes += resolved
    name, model = match_model(family, cfg, path, model_name, arch, adapt_core)
    if scanned:  # a file written from nn.scan'd blocks describes a model that scans them
        model = model.clone(scan_blocks=True)
    if hf is not None:   # what config.json says beyond the shapes (eps, activation), unless the caller said
        model = model.clone(**{k: v for k, v in hf.arch.items() if k not in (arch_in or {})})
    if flat is None:
        try:
            flat = rules.torch_to_flax(state, family.rules(model), ignore=family.ignore_torch)
        except ConversionError as e:
            raise ConversionError(f'{path}: {e}') from None
    flat = family.unstore(flat, model)
    ck = Checkpoint(path, fmt, layout, raw, flat, family, name, model, detected=model_name is None, notes=notes)
    if hf is not None:
        ck.kind, ck.source, ck.class_names, ck.pretrained_cfg = 'transformers', path, hf.class_names, hf.pretrained_cfg
    return ck


def _read_training(path, step, log, ema=False) -> Checkpoint:
    tck = training_ckpt.select(path, 'best' if step is None else step, log, ema=ema)
    meta = tck.meta
    model = training_ckpt.model_from_meta(meta)
    family = family_of(model)
    acc = meta['val_acc']   # None on a step saved inside an epoch
    note = (f'training checkpoint step {tck.step} (epoch {meta["epoch"]}, '
            f'val_acc {"none (saved inside an epoch)" if acc is None else f"{acc:.4f}"}) '
            f'of {meta["model"]}')
    if ema:
        acc = meta.get('val_acc_ema')
        note += f': its weight EMA (val_acc_ema {"none" if acc is None else f"{acc:.4f}"})'
    elif training_ckpt.has_ema(tck.path):
        note += ': its raw weights (it also holds a weight EMA: --ema takes that)'
    else:
        note += ': its weights'
    return Checkpoint(tck.path, 'training', 'flax', tck.flat, tck.flat, family, meta['model'], model, detected=True,
                      notes=[note], kind='training', source=path, pretrained_cfg=meta['pretrained_cfg'],
                      class_names=list(meta['class_names']))


def _read_folder(path, folder, model_name, arch, img_size) -> Checkpoint:
    """A timm model folder: the weights read as any torch file, the model named by config.json."""
    fc = timm_folder.read_config(folder, path)
    detected, arch_in = model_name is None, arch
    if model_name is None or split_tag(model_name)[0] == fc.model_name:
        # what config.json records describes the weights (a window size too); the head and input size are
        # checked against the weights' own below / resolved from the position table
        recorded = {k: v for k, v in fc.arch.items() if k not in ('num_classes', 'img_size')}
        model_name, arch = fc.model_name, {**recorded, **(arch or {})}
    ck = read_checkpoint(fc.weights, model_name, arch, img_size or fc.arch.get('img_size'))
    for k, v in fc.arch.items():   # a recorded field the weights contradict (their keys decided otherwise)
        if k not in ('num_classes', 'img_size') and k not in (arch_in or {}) and hasattr(ck.model, k) \
                and getattr(ck.model, k) != v and not isinstance(v, (list, tuple)):
            raise ConversionError(f'{fc.config_path}: model_args {k}={v!r}, but the weights are for {k}='
                                  f'{getattr(ck.model, k)!r}')
    if fc.num_classes is not None and fc.num_classes != ck.model.num_classes:
        raise ConversionError(f'{fc.config_path}: num_classes {fc.num_classes}, but the weights\' head has '
                              f'{ck.model.num_classes} classes')
    size = fc.arch.get('img_size')
    if size is not None and to_tuple(size, 2) != to_tuple(ck.model.img_size, 2):
        if ck.family.pos_key in ck.flat:   # a learned position table says which size the weights are for
            raise ConversionError(f'{fc.config_path}: img_size {size}, but the weights\' position table is for '
                                  f'{ck.model.img_size}')
        ck.model = ck.model.clone(img_size=size)   # nothing in the weights depends on it (Swin): as recorded
    if fc.label_names and len(fc.label_names) > ck.model.num_classes:
        raise ConversionError(f'{fc.config_path}: {len(fc.label_names)} label_names, but the weights\' head has '
                              f'{ck.model.num_classes} classes')
    ck.notes, ck.detected = fc.notes + ck.notes, detected
    ck.kind, ck.source, ck.pretrained_cfg, ck.class_names = 'timm-folder', path, fc.pretrained_cfg, fc.label_names
    return ck



def _read_transformers(path, folder, model_name, arch, img_size) -> Checkpoint:
    """A Hugging Face transformers folder (config.json `model_type`; `path` as given, maybe hf-hub:, `folder`
    where it is): see hf_transformers.read_folder."""
    r = hf_transformers.read_folder(folder, model_name, arch)
    fam = r['family']
    if img_size is not None and fam.pos_key is None and to_tuple(img_size, 2) != to_tuple(r['model'].img_size, 2):
        r['model'] = r['model'].clone(img_size=img_size)
    layout = f'transformers {r["cls"]} ({r["spelling"]} keys)'
    return Checkpoint(r['weights'], r['format'], layout, r['raw'], r['flat'], fam, r['name'], r['model'],
                      detected=model_name is None, notes=r['notes'], kind='transformers', source=path,
                      class_names=r['class_names'])


# Architecture fields that may be 0 (every other integer read off a checkpoint's shapes must be >= 1).
_MAY_BE_ZERO = ('num_classes', 'num_patches', 'reg_tokens')


def _read_config(fn, arrays, path):
    """The family's architecture fields read off the arrays' shapes, which a file may set to anything."""
    try:
        cfg = fn(arrays)
    except KeyError as e:
        raise ConversionError(f'{path}: missing key {e.args[0]!r}') from None
    except (IndexError, AttributeError, ValueError, ZeroDivisionError) as e:
        raise ConversionError(f'{path}: malformed checkpoint ({e})') from None
    for k, v in cfg.items():
        values = v if isinstance(v, tuple) else (v,)
        lowest = 0 if k in _MAY_BE_ZERO else 1
        if any(type(x) is int and x < lowest or isinstance(x, float) and not 0 < x < float('inf') for x in values):
            raise ConversionError(f'{path}: malformed checkpoint: the shapes give {k}={v}')
    return cfg


# ---------------------------------------------------------------- adapting to a target model

def _new_head(shape, head_init: str, rng: np.random.Generator) -> np.ndarray:
    """A replacement head kernel: zeros, or timm's head init (truncated normal, std 0.02; the bias is zeros)."""
    if head_init == 'zeros':
        return np.zeros(shape, np.float32)
    return np.clip(rng.standard_normal(shape), -2, 2).astype(np.float32) * 0.02


def adapt(flat, src, dst, *, resample: str = DEFAULT_METHOD, head_init: str = 'zeros',
          bias_resize: str = 'bicubic', log: Callable[[str], None] = _stderr, seed: int = 0) -> Dict[str, np.ndarray]:
    """The family's surgery from `src` to `dst` (position resampling, window-table resizing, pre_logits),
    then head surgery.

    `resample`: position-embedding method (ViT); `bias_resize`: relative-bias-table method (Swin,
    'bicubic' as Microsoft's fine-tuning code, or 'timm'). Every change is reported through `log`;
    nothing is reset silently.
    """
    if head_init not in HEAD_INITS:
        raise ConversionError(f'unknown head init {head_init!r}; choose one of {", ".join(HEAD_INITS)}')
    grid = tuple(getattr(dst, 'grid_size', ()))
    if grid and min(grid) < 1:
        raise ConversionError(f'img_size {dst.img_size} is smaller than the patch {dst.patch_size}')
    family = family_of(dst)
    flat = family.adapt(dict(flat), src, dst, resample=resample, bias_resize=bias_resize, log=log)
    rng = np.random.default_rng(seed)
    for head in ('head', 'head_dist'):
        keys = [f'{head}/kernel', f'{head}/bias']
        # a whole head (kernel (in, classes), bias (classes,)); a stray half is left for validate() to name
        kernel, bias = flat.get(keys[0]), flat.get(keys[1])
        had = kernel is not None and bias is not None and kernel.ndim == 2 and bias.ndim == 1
        if dst.num_classes == 0 or (head == 'head_dist' and not getattr(dst, 'distilled', False)):
            if had:
                old = flat.pop(keys[1]).shape[0]
                flat.pop(keys[0])
                log(f'{head}: dropped ({old} classes; the model returns features)')
            continue
        if had and flat[keys[1]].shape[0] == dst.num_classes:
            continue
        in_dim = flat[keys[0]].shape[0] if had else family.head_features(dst)
        old = flat[keys[1]].shape[0] if had else 0
        flat[keys[0]] = _new_head((in_dim, dst.num_classes), head_init, rng)
        flat[keys[1]] = np.zeros((dst.num_classes,), np.float32)
        log(f'{head}: {old} -> {dst.num_classes} classes, new head initialised with {head_init}')
    return flat


def _is_float(dtype) -> bool:
    return np.dtype(dtype).kind == 'f' or np.dtype(dtype) == ml_dtypes.bfloat16


def validate(flat: Dict[str, np.ndarray], model, where: str) -> None:
    """Raise a one-line error naming the first missing, unexpected, mis-shaped or non-float key."""
    try:
        shapes = param_shapes(model)
    except ModelConfigError as e:   # a configuration the file's arrays led to, which the model refuses at setup
        raise ConversionError(f'{where}: {e}') from None
    expected = {k: tuple(v.shape) for k, v in flatten_dict(shapes, sep='/').items()}
    for k, shape in expected.items():
        if k not in flat:
            raise ConversionError(f'{where}: missing key {k!r} (expected shape {shape})')
        if tuple(flat[k].shape) != shape:
            raise ConversionError(f'{where}: key {k!r}: expected shape {shape}, found {tuple(flat[k].shape)}')
        if not _is_float(flat[k].dtype):
            raise ConversionError(f'{where}: key {k!r}: expected a floating-point array, found {flat[k].dtype}')
    extra = [k for k in flat if k not in expected]
    if extra:
        raise ConversionError(f'{where}: unexpected key {extra[0]!r} for this model')


def _check_options(cls, options, path, model_name=None):
    """Every override a field of `cls` with a value of its type, before anything is built from it."""
    try:
        check_options(cls, options or {}, split_tag(model_name)[0] if model_name else cls.__name__)
    except UnknownOptionError as e:
        raise ConversionError(f'{path}: {e}') from None


def arch_overrides(overrides):
    """The overrides that describe the checkpoint's architecture (the rest describe the target model)."""
    return {k: v for k, v in overrides.items() if k not in TARGET_ONLY}


def check_finite(flat: Dict[str, np.ndarray], where: str, allow: bool = False,
                 log: Callable[[str], None] = _stderr) -> Dict[str, int]:
    """{key: count} of the arrays holding NaN or Inf. Refused (one line naming the first) unless `allow`,
    then said out loud: weights like that are a broken checkpoint, and a converter must not hide it."""
    bad = {}
    for k, v in flat.items():
        if _is_float(v.dtype):
            n = int(v.size - np.count_nonzero(np.isfinite(v)))
            formats.release(v)
            if n:
                bad[k] = n
    if bad:
        k, n = next(iter(bad.items()))
        more = f' (and {len(bad) - 1} more keys)' if len(bad) > 1 else ''
        if not allow:
            raise ConversionError(f'{where}: key {k!r} holds {n} non-finite values (NaN/Inf){more}; '
                                  f'pass --allow-nonfinite (allow_nonfinite=True) to convert it anyway')
        log(f'warning: {where}: key {k!r} holds {n} non-finite values (NaN/Inf){more}; kept as they are')
    return bad


def _load(path, model_name, overrides, target_of, resample, head_init, bias_resize, log, cast,
          allow_nonfinite=False, step=None, adapt_core=False, ema=False):
    """read -> adapt to the target -> validate: the path shared by load_model and load_params."""
    ck = read_checkpoint(path, model_name, arch_overrides(overrides), overrides.get('img_size'), step, log,
                         adapt_core, ema)
    for note in ck.notes:
        log(note)
    _check_options(type(ck.model), overrides, path, ck.model_name)
    try:
        target = target_of(ck)
    except TypeError as e:  # an unknown override
        raise ConversionError(f'{path}: {e}') from None
    target = ck.family.fine_tune_target(ck.model, target, overrides, log)
    flat = adapt(ck.flat, ck.model, target, resample=resample, head_init=head_init, bias_resize=bias_resize,
                 log=log)
    if getattr(target, 'scan_blocks', False):
        flat = stack_blocks(flat)
    validate(flat, target, path)
    check_finite(flat, path, allow_nonfinite, log)
    if cast:   # private float32 arrays: never views of a file someone may overwrite, one copy at a time
        flat = {k: np.asarray(formats.detach(v), np.float32) for k, v in flat.items()}
    return target, unflatten_dict(flat, sep='/'), ck


def load_model(path: str, model_name: Optional[str] = None, *, resample: str = DEFAULT_METHOD,
               head_init: str = 'zeros', bias_resize: str = 'bicubic', cast: bool = True,
               log: Callable[[str], None] = _stderr, allow_nonfinite: bool = False, step=None, ema: bool = False,
               **overrides):
    """(module, params, Checkpoint): the checkpoint's own architecture, with `overrides` applied on top.

    Weights holding NaN/Inf are refused unless `allow_nonfinite` (then a warning is logged). With `cast`,
    params are private float32 arrays; without, they keep the file's dtype and may view its memory map.
    `step` picks the step of a training workdir (default: the best), `ema` its weight EMA.
    """
    return _load(path, model_name, overrides, lambda ck: ck.model.clone(**overrides), resample, head_init,
                 bias_resize, log, cast, allow_nonfinite, step, ema=ema)


def load_params(path: str, model_name: str, *, resample: str = DEFAULT_METHOD, head_init: str = 'zeros',
                bias_resize: str = 'bicubic', log: Callable[[str], None] = _stderr, allow_nonfinite: bool = False,
                **overrides):
    """Flax params for `vit_flax.create_model(model_name, **overrides)`, from any supported file (see
    `load_into`)."""
    return load_into(path, model_name, resample=resample, head_init=head_init, bias_resize=bias_resize, log=log,
                     allow_nonfinite=allow_nonfinite, **overrides)[0]


def load_into(path: str, model_name: str, *, resample: str = DEFAULT_METHOD, head_init: str = 'zeros',
              bias_resize: str = 'bicubic', log: Callable[[str], None] = _stderr, allow_nonfinite: bool = False,
              **overrides):
    """(params, Checkpoint): Flax params for `vit_flax.create_model(model_name, **overrides)`, from any
    supported file, and what was read (its format, layout, recorded preprocessing and class names).

    The result always fits that model. A checkpoint head of another size is replaced only when
    `num_classes` is passed explicitly (and the change is logged); a different input size resamples the
    position embedding (logged); any other mismatch is an error naming the key and shapes. Weights
    holding NaN/Inf are refused unless `allow_nonfinite`.
    """
    def target_of(ck):
        target = vit_flax.create_model(model_name, **overrides)
        src = ck.model
        family_of(target).check_target(src, target, path, model_name, overrides)
        return target
    _, params, ck = _load(path, model_name, overrides, target_of, resample, head_init, bias_resize, log, cast=True,
                          allow_nonfinite=allow_nonfinite, adapt_core=True)
    return params, ck


# ---------------------------------------------------------------- writing

def to_torch_state(flat, model, layout: Optional[str] = None,
                   log: Callable[[str], None] = _stderr) -> Dict[str, np.ndarray]:
    family = family_of(model)
    state = rules.flax_to_torch(family.store(unstack_blocks(flat), model, log), family.rules(model))
    layout = layout or family.torch_layout
    if layout != family.torch_layout:
        if layout not in family.layouts:
            raise ConversionError(f'{family.name} has no torch layout {layout!r}; choose {family.torch_layout}'
                                  + ''.join(f' or {n}' for n in family.layouts))
        writer = family.layouts[layout][1]
        state = writer(state, model) if layout in family.layout_models else writer(state)
    note = family.layout_note(model, layout)
    if note:
        log(f'warning: {layout} layout: {note}')
    return state


def output_layouts(model, fmt: str):
    family = family_of(model)
    if fmt == 'npz':
        return family.npz_layouts_for(model)
    if fmt in ('torch', 'safetensors'):
        return (family.torch_layout,) + tuple(family.layouts)
    return ('flax',)


def write_flat(flat: Dict[str, np.ndarray], model, path: str, *, layout: Optional[str] = None,
               force: bool = False, log: Callable[[str], None] = _stderr) -> str:
    """Write a flat Flax tree of `model` to `path` (format from the extension). Returns the layout written.

    Layouts that need arrays the model computes (timm's `pos_embed` of a sincos2d model; vit_jax's released
    and linen npz) get them written out, said through `log`; big_vision's npz and orbax hold the tree itself.
    """
    fmt = formats.output_format(path)
    allowed = output_layouts(model, fmt)
    layout = layout or allowed[0]
    if layout not in allowed:
        raise ConversionError(f'{path}: layout {layout!r} cannot be written as {fmt}; choose {", ".join(allowed)}')
    family = family_of(model)
    if fmt == 'npz':
        formats.write_npz(family.to_npz(flat, model, layout, log), path, force)
    elif fmt == 'torch':
        formats.write_torch(to_torch_state(flat, model, layout, log), path, force, wrap=family.torch_wrap.get(layout))
    elif fmt == 'safetensors':
        formats.write_safetensors(to_torch_state(flat, model, layout, log), path, force)
    else:
        formats.write_orbax(flat, path, force)
    return layout


def write_transformers(flat: Dict[str, np.ndarray], model, path: str, *, class_names: Optional[List[str]] = None,
                       force: bool = False, log: Callable[[str], None] = _stderr) -> str:
    """Write a transformers folder (config.json + model.safetensors, the Hub's key spelling) that the class
    holding `model` loads with `from_pretrained(path)`; returns that class (see hf_transformers.write_folder)."""
    return hf_transformers.write_folder(to_torch_state(flat, model, None, log), model, path, class_names, force, log)


def write_model_folder(flat: Dict[str, np.ndarray], model, model_name: str, path: str, *, pretrained_cfg: dict,
                       class_names: Optional[List[str]] = None, force: bool = False,
                       log: Callable[[str], None] = _stderr) -> dict:
    """Write a timm model folder (config.json + model.safetensors, class_indices.json when names are known)
    that `timm.create_model('local-dir:PATH', pretrained=True)` loads. Returns the config written."""
    config = family_of(model).timm_folder_config(model, split_tag(model_name)[0], pretrained_cfg, class_names)
    timm_folder.write(to_torch_state(flat, model, None, log), config, path, force, class_names)
    return config


def save_params(params, path: str, model_name: str, *, layout: Optional[str] = None, force: bool = False,
                **overrides) -> str:
    """Write Flax params of `create_model(model_name, **overrides)` to `path`; format from the extension."""
    model = vit_flax.create_model(model_name, **overrides)
    flat = {k: np.asarray(v) for k, v in flatten_dict(dict(params), sep='/').items()}
    validate(flat, model, 'params')
    return write_flat(flat, model, path, layout=layout, force=force)
