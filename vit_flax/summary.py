"""Parameter counts and multiply-accumulate counts (the papers' "FLOPs").

MACs are counted by a documented rule over the traced computation (the jaxpr), not estimated:
every `dot_general` contributes batch x M x N x K and every convolution contributes
output elements x (input channels / groups) x kernel window. That is fvcore's rule, which the DeiT and
Swin papers report: attention's two matmuls count, elementwise ops (softmax, GELU, norms) do not.
"""
import math
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore


def input_shape(model, batch: int = 1):
    return (batch,) + tuple(model.input_shape)


def init_params(model, rng=None, batch: int = 1):
    """Random float32 params for `model` (the init rng only; nothing is downloaded)."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    x = jnp.zeros(input_shape(model, batch), jnp.float32)
    return jax.jit(lambda r: model.init(r, x, train=False))(rng)['params']


def param_shapes(model):
    x = jax.ShapeDtypeStruct(input_shape(model), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), x)['params']


def count_params(params_or_model) -> int:
    tree = params_or_model
    if hasattr(params_or_model, 'apply'):
        tree = param_shapes(params_or_model)
    return sum(int(math.prod(l.shape)) for l in jax.tree_util.tree_leaves(tree))


def _dot_macs(eqn) -> int:
    (lc, rc), (lb, _) = eqn.params['dimension_numbers']
    lhs, rhs = (v.aval.shape for v in eqn.invars)
    batch = math.prod(lhs[d] for d in lb)
    contract = math.prod(lhs[d] for d in lc)
    m = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    n = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in eqn.params['dimension_numbers'][1][1])
    return batch * m * n * contract


def _conv_macs(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params['dimension_numbers']
    spec = dn.rhs_spec  # (out_feature_dim, in_feature_dim, *spatial)
    window = math.prod(rhs[d] for d in spec[2:])
    in_per_group = rhs[spec[1]]
    return math.prod(out) * in_per_group * window


def _jaxpr_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == 'dot_general':
            total += _dot_macs(eqn)
        elif name == 'conv_general_dilated':
            total += _conv_macs(eqn)
        if name == 'cond':   # one branch runs: lax.platform_dependent's per-platform forms of the same matmul
            total += max(_jaxpr_macs(b.jaxpr) for b in eqn.params['branches'])
            continue
        mult = eqn.params.get('length', 1) if name == 'scan' else 1
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jcore.ClosedJaxpr):
                    total += mult * _jaxpr_macs(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    total += mult * _jaxpr_macs(sub)
    return total


def jaxpr_macs(jaxpr) -> int:
    """Multiply-adds of every matmul and convolution in a traced computation (`jax.make_jaxpr(fn)(...).jaxpr`),
    loops and nested calls included: e.g. a whole training step, backward pass and all; of a `cond`, the
    costliest branch (one runs)."""
    return _jaxpr_macs(jaxpr)


def count_macs(model, params=None, batch: int = 1) -> int:
    """Multiply-adds of one eval forward pass at the model's input size, per `batch` images."""
    params = param_shapes(model) if params is None else params
    x = jax.ShapeDtypeStruct(input_shape(model, batch), jnp.float32)
    closed = jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x, train=False))(params, x)
    return _jaxpr_macs(closed.jaxpr)


def input_notes(model) -> List[str]:
    """What the model does with an input size that is not a whole number of patches: a ViT never sees the
    last rows/columns (its patch convolution is VALID), a Swin zero-pads them (timm's and Microsoft's way);
    a hybrid's ResNet stem pads 'SAME' and needs no note."""
    from .models.layers import to_tuple
    img = tuple(model.input_shape[:-1])
    patch = to_tuple(model.patch_size, len(img))
    rest = tuple(i % p for i, p in zip(img, patch))
    if not any(rest) or getattr(model, 'resnet', None) is not None:
        return []
    size = 'x'.join(map(str, img))
    if hasattr(model, 'depths'):   # Swin
        padded = 'x'.join(str(i + (-i) % p) for i, p in zip(img, patch))
        return [f'img_size {size} is not a multiple of the patch {"x".join(map(str, patch))}: '
                f'each image is zero-padded to {padded} on the right and bottom']
    seen = 'x'.join(str(i - r) for i, r in zip(img, rest))
    return [f'img_size {size} is not a multiple of the patch {"x".join(map(str, patch))}: the last rows/columns '
            f'of each image are never seen (the patches cover {seen})']


def summarize(name: str, **overrides) -> Dict[str, Any]:
    """{model, params, gmacs, input_shape, num_classes, notes}: notes say what the input size implies."""
    from .registry import create_model
    model = create_model(name, **overrides)
    shapes = param_shapes(model)
    return dict(model=name, params=count_params(shapes), gmacs=round(count_macs(model, shapes) / 1e9, 3),
                input_shape=list(input_shape(model)), num_classes=model.num_classes, notes=input_notes(model))
