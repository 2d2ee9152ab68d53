"""An NNX face over the registered models: a bridge, not a second implementation.

`create_model(name, rngs=nnx.Rngs(0), **overrides)` wraps the linen module `vit_flax.create_model(name,
**overrides)` in `flax.nnx.bridge.ToNNX`. Its `nnx.Param` state **is** the linen parameter tree (the same
nested names and shapes as `model.init(...)['params']`, so every converter's output loads with `nnx.update`
or `load_params` and `params_of` hands it back for `converters.save_params`); the only other state is the
`nnx.RngState` of the rngs it was given (under `to_nnx__rngs`). The linen module is `model.to_nnx__module`.

    import vit_flax.nnx as vnnx                     # flax.nnx is imported here, not by `import vit_flax`
    model = vnnx.create_model('vit_tiny_patch16_224', rngs=nnx.Rngs(0, dropout=1), num_classes=10)
    logits = model(x, train=False)                  # NHWC, as model.apply({'params': p}, x, train=False)
    vnnx.load_params(model, converters.load_params('ViT-Ti_16.npz', 'vit_tiny_patch16_224', num_classes=10))

Training (`train=True`) draws dropout keys from the model's `dropout` stream (`nnx.Rngs(0, dropout=1)`), or
from its default stream when it has none; it works under `nnx.jit`, `nnx.Optimizer(model, tx, wrt=nnx.Param)`
and `nnx.split`/`nnx.merge`. Being a bridge, every linen option (dtype, remat, scan_blocks, attn_impl) and
every family behaves exactly as the linen model: the outputs are the linen outputs.
"""
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import bridge
from flax.traverse_util import flatten_dict, unflatten_dict

from . import registry
from .summary import init_params, input_shape

__all__ = ['create_model', 'load_params', 'params_of']


def create_model(name: str, rngs: Optional[nnx.Rngs] = None, *, params=None, **overrides) -> nnx.Module:
    """An `nnx.Module` (a `bridge.ToNNX`) of the registered model `name` with `overrides` (the options of
    `vit_flax.create_model`; errors as there).

    `params`: a linen tree (`{'params': tree}`, nested or flat, see `load_params`) to start from, e.g. a
    converter's output; none is drawn then. Without it the params are `vit_flax.init_params(linen_model,
    rngs.params())`, the linen initialisation for that key. `rngs` defaults to `nnx.Rngs(0)` and is forked
    into the model for its dropout keys."""
    linen = registry.create_model(name, **overrides)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    if params is None:
        params = init_params(linen, rngs.params())
    model = bridge.ToNNX(linen, rngs=rngs)
    x = jnp.zeros(input_shape(linen), jnp.float32)

    def init(m):
        bridge.lazy_init(m, x, train=False)
        return m
    skeleton = nnx.eval_shape(init, nnx.clone(model))  # the parameter shapes, nothing computed
    graphdef, abstract, _ = nnx.split(skeleton, nnx.Param, ...)
    model = nnx.merge(graphdef, abstract, nnx.state(model, nnx.RngState))
    load_params(model, params)
    return model


def _nested(params) -> dict:
    """A linen tree as nested dicts: `{'params': tree}` unwrapped; flat keys ('a/b/kernel' or tuples) nested."""
    if not isinstance(params, dict) and hasattr(params, 'items') and type(params).__name__ == 'State':
        params = nnx.to_pure_dict(params)   # what nnx.state(model, nnx.Param) returns
    params = dict(params)
    if set(params) == {'params'} and isinstance(params['params'], Mapping):
        params = dict(params['params'])
    if params and all(isinstance(k, tuple) for k in params):
        return unflatten_dict(params)
    if params and any(isinstance(k, str) and '/' in k for k in params):
        return unflatten_dict(params, sep='/')
    return params


def load_params(model: nnx.Module, params) -> nnx.Module:
    """Put a linen parameter tree into `model` (in place; returns it): `{'params': tree}`, the nested tree,
    or a flat dict keyed 'a/b/kernel' or by tuples, numpy or jax arrays (cast to the model's param dtype).
    The keys must be exactly the model's and every shape equal: otherwise a one-line ValueError naming the
    first key at fault (a missing, unexpected or misshapen leaf)."""
    state = nnx.state(model, nnx.Param)
    want = flatten_dict(nnx.to_pure_dict(state), sep='/')
    got = flatten_dict(_nested(params), sep='/')
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        what = (f'missing {missing[0]!r}' if missing else '') + (' and ' if missing and extra else '') + \
            (f'unexpected {extra[0]!r}' if extra else '')
        raise ValueError(f'load_params: the tree does not fit the model: {what} '
                         f'({len(missing)} missing, {len(extra)} unexpected of {len(want)} leaves)')
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise ValueError(f'load_params: {k!r} has shape {tuple(v.shape)}, the model wants {tuple(want[k].shape)}')
    new = unflatten_dict({k: jnp.asarray(v, want[k].dtype) for k, v in got.items()}, sep='/')
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    return model


def params_of(model: nnx.Module) -> dict:
    """The model's parameters as the linen tree (nested dicts of jax arrays, no `{'params': ...}` wrapper):
    what `model.to_nnx__module.apply({'params': tree}, x)` and `converters.save_params` take."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
