"""The converters' pipeline: read -> adapt -> write, for any format and family.

Every path goes through the flat Flax tree (keys joined by '/', blocks unrolled):

    read_checkpoint(path)   the first source that matches the path (sources.py: training workdir, hf-hub
                            name, Flax msgpack / transformers / timm folder, file by format) reads it once: a
                            format (formats/) gives arrays as stored; the family (families/) that detects
                            them decodes them: its own .npz layouts, or its rule table from a torch layout;
                            the architecture read off the arrays picks the registered model (match_model)
    adapt(flat, src, dst)   the family's surgery (positions, windows), then the head
    validate, check_finite  every key, shape and dtype of the target; no NaN/Inf unless allowed
    write_flat(flat, model, path)   the family encodes (rule table, layouts, .npz layouts); a format writes

`load_model`, `load_params` and `save_params` are these steps in order (their options: LoadOptions). Nothing here knows a family by name.
"""
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Union

import ml_dtypes
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

import vit_flax
from vit_flax.errors import ModelConfigError
from vit_flax.registry import split_tag
from vit_flax.summary import param_shapes

from . import formats, hf_transformers, model_fields, rules, sources
from .checkpoint import Checkpoint, ReadRequest, check_model_options, stderr as _stderr
from .checkpoint import match_model  # noqa: F401  (converters.pipeline.match_model, as before)
from .errors import ConversionError
from .families import family_of
from .formats import timm_folder
from .resample import DEFAULT_METHOD
from .scan import stack_blocks, unstack_blocks

HEAD_INITS = ('zeros', 'fresh')
# Overrides that describe the model wanted, not the checkpoint: adapt() bridges them (head surgery,
# resampling, bias-table resizing), so they take no part in matching a checkpoint to its model.
TARGET_ONLY = ('num_classes', 'img_size', 'window_size', 'representation_size', 'posemb', 'scan_blocks',
               'pretrained_window_sizes')


# ---------------------------------------------------------------- reading (sources.py: the table of sources)

def read_checkpoint(path: str, model_name: Optional[str] = None, arch: Optional[dict] = None,
                    img_size=None, step=None, log: Callable[[str], None] = _stderr,
                    adapt_core: bool = False, ema: bool = False) -> Checkpoint:
    """Read any supported checkpoint and decode it into the flat Flax tree of a matching model.

    `path`: a file, an orbax folder, a timm model folder, a Hugging Face transformers folder (config.json with a
    `model_type`, see hf_transformers; Flax-only folders read by formats.hf_flax), `hf-hub:ORG/NAME[@REV]`
    (huggingface_hub; a timm or transformers repo) or a training workdir (`step`: 'best' by default, 'latest'
    or a number; `ema`: its weight EMA, not its params): the sources of `converters.sources`, tried in its
    documented order.
    `arch`: field overrides of `model_name` that describe the checkpoint (see `match_model`).
    `img_size`: the size asked for, taken as the checkpoint's own when its positions fit it (a position
    table does not say whether 280 patches are 14x20 or 20x14).
    `adapt_core`: see `match_model` (`load_params` adapts a FlexiViT patch kernel to the named model's).
    """
    return sources.read_checkpoint(str(path), ReadRequest(str(path), model_name, arch, img_size, step, log,
                                                          adapt_core, ema))


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


@dataclass(frozen=True)
class LoadOptions:
    """How a checkpoint is loaded, beside the path, the model and its overrides: one object that `load_model`,
    `load_params` and `load_into` take (`options=`), each field also accepted as the keyword it replaces.

    `resample`: the position-embedding method (ViT) on a size change; `head_init`: 'zeros' or 'fresh' (timm's
    init) for a replaced head; `bias_resize`: the relative-bias-table method (Swin: 'bicubic' as Microsoft's
    fine-tuning code, or 'timm'); `log`: where every change is said (stderr); `allow_nonfinite`: keep weights
    holding NaN/Inf (warned) instead of refusing them; `step`: a training workdir's step (default the best),
    `ema`: its weight EMA instead of its params;
    `cast`: params as private float32 arrays (else the file's dtype, maybe views of its memory map).
    """
    resample: str = DEFAULT_METHOD
    head_init: str = 'zeros'
    bias_resize: str = 'bicubic'
    log: Callable[[str], None] = _stderr
    allow_nonfinite: bool = False
    step: Optional[Union[str, int]] = None
    ema: bool = False
    cast: bool = True


_UNSET = object()   # a keyword not passed: the options object's field (or its default) holds


def _options(options: Optional[LoadOptions], **given) -> LoadOptions:
    """`options` (default LoadOptions()) with the old keywords that were passed put over it."""
    if options is not None and not isinstance(options, LoadOptions):
        raise TypeError(f'options must be a converters.pipeline.LoadOptions, not {type(options).__name__}')
    return replace(options or LoadOptions(), **{k: v for k, v in given.items() if v is not _UNSET})


def _load(path, model_name, overrides, target_of, opts: LoadOptions, adapt_core=False):
    """read -> adapt to the target -> validate: the path shared by load_model and load_into."""
    log = opts.log
    ck = read_checkpoint(path, model_name, arch_overrides(overrides), overrides.get('img_size'), opts.step, log,
                         adapt_core, opts.ema)
    for note in ck.notes:
        log(note)
    check_model_options(type(ck.model), overrides, path, ck.model_name)
    try:
        target = target_of(ck)
    except TypeError as e:  # an unknown override
        raise ConversionError(f'{path}: {e}') from None
    target = ck.family.fine_tune_target(ck.model, target, overrides, log)
    flat = adapt(ck.flat, ck.model, target, resample=opts.resample, head_init=opts.head_init,
                 bias_resize=opts.bias_resize, log=log)
    if getattr(target, 'scan_blocks', False):
        flat = stack_blocks(flat)
    validate(flat, target, path)
    check_finite(flat, path, opts.allow_nonfinite, log)
    if opts.cast:   # private float32 arrays: never views of a file someone may overwrite, one copy at a time
        flat = {k: np.asarray(formats.detach(v), np.float32) for k, v in flat.items()}
    return target, unflatten_dict(flat, sep='/'), ck


def load_model(path: str, model_name: Optional[str] = None, *, options: Optional[LoadOptions] = None,
               resample=_UNSET, head_init=_UNSET, bias_resize=_UNSET, cast=_UNSET, log=_UNSET,
               allow_nonfinite=_UNSET, step=_UNSET, ema=_UNSET, **overrides):
    """(module, params, Checkpoint): the checkpoint's own architecture, with `overrides` applied on top.

    `options` (LoadOptions; each field also a keyword, which wins): weights holding NaN/Inf are refused unless
    `allow_nonfinite` (then a warning is logged). With `cast`, params are private float32 arrays; without,
    they keep the file's dtype and may view its memory map. `step` picks the step of a training workdir
    (default: the best), `ema` its weight EMA.
    """
    opts = _options(options, resample=resample, head_init=head_init, bias_resize=bias_resize, cast=cast, log=log,
                    allow_nonfinite=allow_nonfinite, step=step, ema=ema)
    return _load(path, model_name, overrides, lambda ck: ck.model.clone(**overrides), opts)


def load_params(path: str, model_name: str, *, options: Optional[LoadOptions] = None, resample=_UNSET,
                head_init=_UNSET, bias_resize=_UNSET, log=_UNSET, allow_nonfinite=_UNSET, **overrides):
    """Flax params for `vit_flax.create_model(model_name, **overrides)`, from any supported file (see
    `load_into`)."""
    return load_into(path, model_name, options=options, resample=resample, head_init=head_init,
                     bias_resize=bias_resize, log=log, allow_nonfinite=allow_nonfinite, **overrides)[0]


def load_into(path: str, model_name: str, *, options: Optional[LoadOptions] = None, resample=_UNSET,
              head_init=_UNSET, bias_resize=_UNSET, log=_UNSET, allow_nonfinite=_UNSET, **overrides):
    """(params, Checkpoint): Flax params for `vit_flax.create_model(model_name, **overrides)`, from any
    supported file, and what was read (its format, layout, recorded preprocessing and class names).

    The result always fits that model. A checkpoint head of another size is replaced only when
    `num_classes` is passed explicitly (and the change is logged); a different input size resamples the
    position embedding (logged); any other mismatch is an error naming the key and shapes. Weights
    holding NaN/Inf are refused unless `allow_nonfinite`. `options` as in `load_model`.
    """
    opts = _options(options, resample=resample, head_init=head_init, bias_resize=bias_resize, log=log,
                    allow_nonfinite=allow_nonfinite)

    def target_of(ck):
        target = vit_flax.create_model(model_name, **overrides)
        family_of(target).check_target(ck.model, target, path, model_name, overrides)
        # what the file records and the named model computes otherwise (the caller's overrides are wanted)
        other = {k: v for k, v in ck.recorded.items() if k not in overrides and k not in TARGET_ONLY
                 and hasattr(target, k) and model_fields.computes_otherwise(target, ck.model, k)}
        if other:
            opts.log(f'warning: {path}: the file\'s model has ' + ', '.join(f'{k}={v!r}' for k, v in other.items())
                + f', {model_name} ' + ', '.join(f'{k}={getattr(target, k)!r}' for k in other)
                + '; pass ' + ', '.join(f'{k}={v!r}' for k, v in other.items()) + ' to compute as the file\'s model')
        return target
    _, params, ck = _load(path, model_name, overrides, target_of, opts, adapt_core=True)
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
        formats.write_npz(family.to_npz(flat, model, layout, log), path, force, comment=model_fields.zip_comment(model))
    elif fmt == 'torch':
        formats.write_torch(to_torch_state(flat, model, layout, log), path, force, wrap=family.torch_wrap.get(layout))
    elif fmt == 'safetensors':
        formats.write_safetensors(to_torch_state(flat, model, layout, log), path, force,
                                  metadata=model_fields.safetensors_metadata(model))
    else:
        formats.write_orbax(flat, path, force)
    if fmt in ('torch', 'orbax'):
        say_unrecorded(path, model, fmt, log)
    return layout


def say_unrecorded(path: str, model, fmt: str, log: Callable[[str], None] = _stderr) -> Dict[str, object]:
    """A file written where the format has no room for model fields (a torch state_dict, a bare orbax tree):
    read back as a reader reads it (the model only), each field of `model_fields` that comes back otherwise (or
    without which the file is refused: a torch qkv's heads) is said through `log`, with both values and the
    `--set` flags that read it as `model`. Returns those {field: value}."""
    want = model_fields.record(model)
    if not want:
        return {}
    what = {'torch': 'a torch state_dict', 'orbax': 'an orbax tree'}[fmt]
    rest = ' (or write .npz / .safetensors, which record them)'

    def read_back(arch):
        return sources.read_checkpoint(str(path), ReadRequest(str(path), arch=arch or None, log=lambda s: None,
                                                              model_only=True)).model
    plain = type(model)()   # the module's defaults: what to name when the file cannot be read back as it is
    named = {k: v for k, v in want.items() if model_fields.computes_otherwise(plain, model, k)}
    refused, given = None, {}
    try:
        back = read_back({})
    except ConversionError as e:
        refused = str(e).split(': ', 1)[-1]
        given = {k: v for k, v in want.items() if f'{k}=None' in refused}   # what the match found unknown
        try:
            back = read_back(given)
        except ConversionError:
            log(f'warning: {path}: {what} records no model fields, and read back alone it is refused ({refused}); '
                f'read it with --model naming its architecture and {model_fields.set_flags(named)}{rest}')
            return named
    if type(back) is not type(model):   # the keys another family reads too (open_clip's LayerScale tower)
        log(f'warning: {path}: {what} records no model fields, and read back alone it reads as a '
            f'{type(back).__name__}; read it with --model naming a {type(model).__name__} and '
            f'{model_fields.set_flags(named)}{rest}')
        return named
    wrong = {k: v for k, v in want.items() if k in given or model_fields.computes_otherwise(back, model, k)}
    if wrong:
        said = [f'{k} unknown (this model: {v!r})' if k in given else f'{k}={getattr(back, k)!r} (this model: {v!r})'
                for k, v in wrong.items()]
        log(f'warning: {path}: {what} records no model fields' +
            (f' (read back alone it is refused: {refused})' if refused else '') +
            f': a reader will take {", ".join(said)}; read it with {model_fields.set_flags(wrong)}{rest}')
    return wrong


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
