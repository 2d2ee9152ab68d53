"""Model registry keyed by timm's model names: each entry is a module class and its default config.

Overrides are checked before a model is built, each fault one line: an unknown field names the valid ones
(`UnknownOptionError`); a value of the wrong type, range or choice names the field, the value and what the
field wants (`OptionValueError`). Types come from the fields' annotations (numpy scalars count as the Python
numbers they hold), choices from `Literal[...]`. What only the model can judge (heads that do not divide the
width) it raises itself as `ModelConfigError`.
"""
import collections.abc
import difflib
import fnmatch
import functools
import numbers
import os
import types
import typing
from typing import Any, Callable, Dict, List, Tuple, Union

import flax.linen as nn
import numpy as np


_REGISTRY: Dict[str, Tuple[type, Dict[str, Any]]] = {}


class UnknownModelError(KeyError):
    """A name that is not registered. A KeyError (as in timm) whose message prints without quotes."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


class UnknownOptionError(TypeError):
    """An override that is not a field of the model (a TypeError, as an unexpected keyword argument is)."""


class OptionValueError(UnknownOptionError, ValueError):
    """An override whose value the field does not take (its type, range or choices): a ValueError as well, so
    that code catching either finds it."""


def register(name: str, cls: type, **config) -> None:
    if name in _REGISTRY:
        raise ValueError(f'model {name!r} registered twice')
    _REGISTRY[name] = (cls, config)


def list_models(pattern: str = '*') -> List[str]:
    """Registered names matching a shell-style pattern, sorted (as `timm.list_models`)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def split_tag(name: str) -> Tuple[str, str]:
    """('vit_base_patch16_224', 'augreg2_in21k_ft_in1k') for timm's 'vit_base_patch16_224.augreg2_in21k_ft_in1k'.

    A pretrained tag names weights, not an architecture: like timm, the registry ignores it."""
    base, _, tag = name.partition('.')
    return base, tag


@functools.lru_cache(maxsize=1)
def timm_names() -> frozenset:
    """Every model name of timm 1.0.31 (`timm.list_models()`), from the list kept beside this module, so that
    a name timm has and this project does not build can be told apart from a typo without importing timm."""
    with open(os.path.join(os.path.dirname(__file__), 'timm_models.txt')) as f:
        return frozenset(line.strip() for line in f if line.strip() and not line.startswith('#'))


def similar_models(name: str, n: int = 5) -> List[str]:
    """Registered names closest to `name` (difflib's ratio), best first: `vit_small_patch16_224` for
    `vit_smal_patch16_224`."""
    return difflib.get_close_matches(name, list_models(), n=n, cutoff=0.6)


def unknown_model_message(name: str) -> str:
    """`'resnet50': a timm model this project does not build yet; ...` or `unknown model 'vit_smal...'; ...`."""
    head = f'{name!r}: a timm model this project does not build yet' if name in timm_names() \
        else f'unknown model {name!r}'
    close = similar_models(name)
    return head + (f'; similar: {", ".join(close)}' if close else '') + '; `vit-flax list` shows every name'


def model_config(name: str, **overrides) -> Tuple[type, Dict[str, Any]]:
    name = split_tag(name)[0]
    if name not in _REGISTRY:
        raise UnknownModelError(unknown_model_message(name))
    cls, config = _REGISTRY[name]
    check_options(cls, overrides, name)
    return cls, {**config, **overrides}


def model_fields(cls: type) -> List[str]:
    """The constructor fields of a model class (a flax dataclass), without flax's own `parent` and `name`."""
    return [f for f in cls.__dataclass_fields__ if f not in ('parent', 'name')]


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> Dict[str, Any]:
    """`typing.get_type_hints(cls)`, once per class: resolving a flax module's annotations walks its whole MRO
    (~1.5 ms a class), and detecting a checkpoint's model checks the options of every registered model."""
    return typing.get_type_hints(cls)


def check_options(cls: type, options: Dict[str, Any], owner: str = '') -> None:
    """One-line errors: UnknownOptionError for an option that is not a field of `cls` (naming the valid ones),
    OptionValueError for a value the field does not take (naming the key, the value and what it wants)."""
    owner = f'{owner or cls.__name__}: '
    fields = model_fields(cls)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise UnknownOptionError(f'{owner}unknown option(s) {unknown}; valid: {sorted(fields)}')
    if not options:
        return
    try:
        hints = field_types(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: nothing to check against
        return
    for k, v in options.items():
        tp = hints.get(k, Any)
        if not _fits(v, tp):
            raise OptionValueError(f'{owner}option {k}={v!r} ({type(v).__name__}) wants {_describe(tp)}')
        values = [x for x in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(x, numbers.Real)]
        each = 'each ' if len(values) > 1 else ''
        if k in POSITIVE and any(x < 1 for x in values):
            raise OptionValueError(f'{owner}option {k}={v!r} wants {each}value >= 1')
        if k in NON_NEGATIVE and any(x < 0 for x in values):
            raise OptionValueError(f'{owner}option {k}={v!r} wants {each}value >= 0')
        if k in GREATER_THAN_ZERO and any(x <= 0 for x in values):
            raise OptionValueError(f'{owner}option {k}={v!r} wants {each}value > 0')
        if (k.endswith('_rate') or k in RATES) and any(not 0 <= x < 1 for x in values):
            raise OptionValueError(f'{owner}option {k}={v!r} wants a rate in [0, 1)')


# Counts that must be at least 1 (or 0), ratios above 0 and rates in [0, 1), by field name across the model
# classes; the type of every field comes from its annotation, choices from `Literal[...]`.
POSITIVE = frozenset({'img_size', 'patch_size', 'in_chans', 'embed_dim', 'depth', 'depths', 'num_heads', 'mlp_dim',
                      'representation_size', 'window_size', 'dim', 'heads', 'dim_head', 'spatial_dims'})
NON_NEGATIVE = frozenset({'num_classes', 'norm_eps'})
GREATER_THAN_ZERO = frozenset({'mlp_ratio'})
RATES = frozenset({'dropout', 'emb_dropout'})


def _fits(value, tp) -> bool:
    if tp is Any or isinstance(tp, typing.TypeVar):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if tp is type(None):
        return value is None
    if tp is bool:   # numpy's bool_ too
        return isinstance(value, (bool, np.bool_))
    if tp is int:    # numpy's integers too (numbers.Integral)
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if origin is tuple or origin in (collections.abc.Sequence, list):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    if origin is collections.abc.Callable or tp is Callable:
        return callable(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True   # an annotation this check does not model (a protocol, a string): the model decides


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return 'one of ' + ', '.join(map(repr, args))
    if origin in (Union, types.UnionType):
        return ' or '.join(dict.fromkeys(_describe(a) for a in args))
    if tp is type(None):
        return 'None'
    if origin is tuple or origin in (collections.abc.Sequence, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f'a tuple ({", ".join(_describe(a) for a in args)})'
        return f'a tuple of {_describe(args[0]) if args else "values"}'
    return getattr(tp, '__name__', str(tp))


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; `overrides` replace config fields (num_classes, img_size, dtype, ...)."""
    cls, config = model_config(name, **overrides)
    return cls(**config)
