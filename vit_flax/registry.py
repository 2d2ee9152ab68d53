"""Model registry keyed by timm's model names: each entry is a module class and its default config."""
import fnmatch
from typing import Any, Callable, Dict, List, Tuple

import flax.linen as nn

_REGISTRY: Dict[str, Tuple[type, Dict[str, Any]]] = {}


class UnknownModelError(KeyError):
    """A name that is not registered. A KeyError (as in timm) whose message prints without quotes."""

    def __str__(self):
        return str(self.args[0]) if self.args else ''


class UnknownOptionError(TypeError):
    """An override that is not a field of the model."""


def register(name: str, cls: type, **config) -> None:
    if name in _REGISTRY:
        raise ValueError(f'model {name!r} registered twice')
    _REGISTRY[name] = (cls, config)


def list_models(pattern: str = '*') -> List[str]:
    """Registered names matching a shell-style pattern, sorted (as `timm.list_models`)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def model_config(name: str, **overrides) -> Tuple[type, Dict[str, Any]]:
    if name not in _REGISTRY:
        close = list_models(f'*{name.split("_")[0]}*')[:8]
        raise UnknownModelError(f'unknown model {name!r}' + (f'; similar: {", ".join(close)}' if close else ''))
    cls, config = _REGISTRY[name]
    fields = set(cls.__dataclass_fields__) - {'parent', 'name'}
    unknown = set(overrides) - fields
    if unknown:
        raise UnknownOptionError(f'{name}: unknown option(s) {sorted(unknown)}; valid: {sorted(fields)}')
    return cls, {**config, **overrides}


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; `overrides` replace config fields (num_classes, img_size, dtype, ...)."""
    cls, config = model_config(name, **overrides)
    return cls(**config)
