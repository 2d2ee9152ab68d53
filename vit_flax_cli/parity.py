"""Run timm (or vit-pytorch) and Flax on the same input and compare them point by point (blocks, norm, logits)."""
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
from flax.traverse_util import flatten_dict

from converters.errors import ConversionError
from converters.families import family_of
from converters.pipeline import to_torch_state


@dataclass
class Row:
    label: str
    shape: tuple
    max_abs: float
    rel: float       # max |flax - timm| / max |timm|


def build_timm(model, model_name: str, flat):
    """The timm model (or the family's own torch model) with the same architecture as `model`, holding the
    same weights (strict load)."""
    import torch
    family = family_of(model)
    try:
        tm = family.torch_model(model, model_name)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ConversionError(f'torch cannot build {model_name}: {e}') from None
    state = to_torch_state(flat, model, log=lambda s: None)  # built to match: no layout warning applies
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}
    missing, unexpected = tm.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(family.ignore_torch)]
    if missing or unexpected:
        raise ConversionError(f'timm {model_name} rejects the converted weights: missing {missing[:3]}, '
                              f'unexpected {unexpected[:3]}')
    return tm.eval()


def sample_input(model, batch: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch,) + tuple(model.input_shape)).astype(np.float32)


def compare(model, params, model_name: str, x: Optional[np.ndarray] = None, batch: int = 2) -> List[Row]:
    import jax
    import torch
    x = sample_input(model, batch) if x is None else x
    flat = {k: np.asarray(v) for k, v in flatten_dict(params, sep='/').items()}
    tm = build_timm(model, model_name, flat)
    family = family_of(model)
    points = family.parity_points(model)
    captured = {}
    modules = dict(tm.named_modules())
    hooks = [modules[mod].register_forward_hook(lambda m, i, o, key=label: captured.__setitem__(key, o))
             for label, _, mod in points]
    with torch.no_grad():
        yt = tm(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous())
    for h in hooks:
        h.remove()
    with jax.default_matmul_precision('highest'):
        yf, state = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False, mutable=['intermediates']))(
            params, x)
    inter = {k: v[0] if isinstance(v, tuple) else v
             for k, v in flatten_dict(state['intermediates'], sep='/').items()}
    rows = []
    for label, fpath, _ in points:
        rows.append(_row(label, np.asarray(inter[f'{fpath}']), captured[label].numpy()))
    rows.append(_row('logits' if model.num_classes else 'features', np.asarray(yf), yt.numpy()))
    return rows


def _row(label, a, b) -> Row:
    if a.shape != b.shape:
        raise ConversionError(f'parity point {label}: flax shape {a.shape} vs timm {b.shape}')
    diff = float(np.abs(a.astype(np.float64) - b).max())
    return Row(label, a.shape, diff, diff / max(float(np.abs(b).max()), 1e-12))


def format_table(rows: List[Row], tol: float) -> str:
    lines = [f'{"point":<12} {"shape":<20} {"max |diff|":>12} {"relative":>10}']
    first = next((r for r in rows if r.rel > tol), None)
    for r in rows:
        flag = '  <- first divergence' if r is first else ''
        lines.append(f'{r.label:<12} {str(r.shape):<20} {r.max_abs:12.3e} {r.rel:10.2e}{flag}')
    worst = max(rows, key=lambda r: r.rel)
    verdict = (f'PASS: worst relative difference {worst.rel:.2e} ({worst.label}) <= {tol:g}' if first is None
               else f'FAIL: first divergence at {first.label} (relative {first.rel:.2e} > {tol:g})')
    return '\n'.join(lines + [verdict])
