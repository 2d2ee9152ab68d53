"""Checkpoint I/O and parameter maps: Google npz layouts <-> Flax tree <-> PyTorch (timm, Microsoft Swin).

Layout (see docs/ARCHITECTURE.md): `formats/` reads and writes files (no model knowledge),
`families/` holds each model family's rule table, layouts and detection, `pipeline` reads -> adapts ->
writes. Importing this package imports nothing heavy: the public names below load the pipeline (and jax)
on first use (PEP 562), so a light module such as `converters.preprocess` can be imported alone (grain's
worker processes do).
"""
import importlib

_PUBLIC = {'adapt': 'pipeline', 'LoadOptions': 'pipeline', 'load_model': 'pipeline', 'load_params': 'pipeline', 'read_checkpoint': 'pipeline',
           'save_params': 'pipeline', 'write_flat': 'pipeline', 'ConversionError': 'errors'}

__all__ = list(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f'.{_PUBLIC[name]}', __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
