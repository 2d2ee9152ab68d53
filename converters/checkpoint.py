"""What a read gives (`Checkpoint`), what it is asked for (`ReadRequest`), and how the architecture read off a
checkpoint becomes a registered model (`match_model`): shared by every source (sources.py) and the pipeline."""
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import numpy as np

import vit_flax
from vit_flax.registry import UnknownOptionError, check_options, list_models, model_config, split_tag

from .errors import ConversionError
from .families import Family


def stderr(msg: str) -> None:
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
    kind: str = 'file'                      # file | timm-folder | transformers | training
    source: Optional[str] = None            # the path or hf-hub name given (path: the weights read)
    pretrained_cfg: Optional[dict] = None   # preprocessing, timm's vocabulary
    class_names: Optional[List[str]] = None
    recorded: Dict[str, object] = field(default_factory=dict)   # model fields the file records (model_fields.py)


@dataclass(frozen=True)
class ReadRequest:
    """What a read is asked for, beside the path: one object that every source takes.

    `given`: the path or `hf-hub:` name the caller passed (sources name it in errors and in Checkpoint.source;
    the path a source reads may be what it resolved to). `model_name`: pins the registered model; `arch`:
    field overrides of it that describe the checkpoint (see `match_model`). `img_size`: the size asked for,
    taken as the checkpoint's own when its positions fit it (a position table does not say whether 280
    patches are 14x20 or 20x14). `step`: a training workdir's step ('best' by default, 'latest' or a number);
    refused by every other source. `adapt_core`: see `match_model`. `ema`: a training workdir's weight EMA
    instead of its params; refused by every other source. `model_only`: a file's model, its arrays left as
    stored (Checkpoint.flat empty where the family's table would build them): what a writer asks to see what a
    reader will take.
    """
    given: str
    model_name: Optional[str] = None
    arch: Optional[dict] = None
    img_size: object = None
    step: Optional[Union[str, int]] = None
    log: Callable[[str], None] = stderr
    adapt_core: bool = False
    ema: bool = False
    model_only: bool = False


# ---------------------------------------------------------------- model detection

def family_names(family: Family) -> List[str]:
    """The registered names whose module is the family's."""
    return [n for n in list_models() if model_config(n)[0] is family.module_cls]


def check_model_class(family: Family, model_name: str, path: str, what: Optional[str] = None) -> str:
    """`model_name` without its pretrained tag (which names weights, not an architecture), refused (one line) when
    it is not a model of `family` (`what`: the kind of checkpoint to call it, by default the family's name)."""
    model_name = split_tag(model_name)[0]
    cls, _ = model_config(model_name)
    if cls is not family.module_cls:
        raise ConversionError(f'{path}: holds a {what or family.name} checkpoint, but {model_name} is a {cls.__name__}')
    return model_name


def match_model(family: Family, cfg: dict, path: str, model_name: Optional[str] = None, arch: Optional[dict] = None,
                adapt_core: bool = False):
    """(name, module) for the checkpoint architecture `cfg`.

    `model_name` pins the registered base, and `arch` overrides its fields (a custom depth, patch size...)
    before the checkpoint is checked against it; with `adapt_core` (a caller that adapts the weights to that
    registered model, `load_params`) the family's `adaptable` core fields may differ and keep the file's.
    Without a name, the registered model sharing the most core fields is taken; an architecture no name has is
    accepted when the file records every core field (npz/orbax record the heads, a fused torch qkv does not).
    """
    if model_name:
        model_name = check_model_class(family, model_name, path)
        base = vit_flax.create_model(model_name, **(arch or {}))
        for k, v in family.core(base).items():
            if cfg.get(k) is not None and cfg[k] != v:
                if adapt_core and k in family.adaptable:   # the file's; the weights adapted to the target later
                    base = base.clone(**{k: cfg[k]})
                    continue
                raise ConversionError(f'{path}: checkpoint has {k}={cfg[k]}, but {model_name} has {k}={v}')
        name = model_name
    else:
        names = family_names(family)
        name = min(names, key=lambda n: family.preference(cfg, n, vit_flax.create_model(n)))
        core = family.core(vit_flax.create_model(name))
        unknown = [k for k in core if cfg.get(k) is None]
        if any(cfg[k] != v for k, v in core.items() if k not in unknown) and unknown:
            shown = ', '.join(f'{k}={cfg.get(k)}' for k in core)
            raise ConversionError(f'{path}: no registered model matches ({shown}); pass --model')
        base = family.with_core(vit_flax.create_model(name), cfg)
        extra = {k: v for k, v in (arch or {}).items() if k not in core}
        if extra:   # what the caller or the family's resolve said beyond the file's sizes (an activation)
            base = base.clone(**extra)
    try:
        return name, base.clone(**family.overrides(cfg, base))
    except ValueError as e:
        raise ConversionError(f'{path}: {e}') from None


# Architecture fields that may be 0 (every other integer read off a checkpoint's shapes must be >= 1).
MAY_BE_ZERO = ('num_classes', 'num_patches', 'reg_tokens')


def read_config(fn, arrays, path):
    """The family's architecture fields read off the arrays' shapes (`fn`: its config_from_torch or
    config_from_flax), which a file may set to anything: a one-line error for a missing key or a bad size."""
    try:
        cfg = fn(arrays)
    except KeyError as e:
        raise ConversionError(f'{path}: missing key {e.args[0]!r}') from None
    except (IndexError, AttributeError, ValueError, ZeroDivisionError) as e:
        raise ConversionError(f'{path}: malformed checkpoint ({e})') from None
    for k, v in cfg.items():
        values = v if isinstance(v, tuple) else (v,)
        lowest = 0 if k in MAY_BE_ZERO else 1
        if any(type(x) is int and x < lowest or isinstance(x, float) and not 0 < x < float('inf') for x in values):
            raise ConversionError(f'{path}: malformed checkpoint: the shapes give {k}={v}')
    return cfg


def check_model_options(cls, options, path, model_name=None):
    """Every override a field of `cls` with a value of its type, before anything is built from it."""
    try:
        check_options(cls, options or {}, split_tag(model_name)[0] if model_name else cls.__name__)
    except UnknownOptionError as e:
        raise ConversionError(f'{path}: {e}') from None
