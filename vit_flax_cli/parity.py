"""Run timm (or vit-pytorch) and Flax on the same input and compare them point by point (blocks, norm, logits).

A transformers folder (config.json with a `model_type`; an hf-hub repo of one) is compared with transformers
itself instead (`compare_transformers`): the class `config.architectures[0]` loads the folder's own weights with
`from_pretrained` (no missing or unexpected keys), independently of how vit-flax read them, and runs beside Flax
with `output_hidden_states=True`; a folder holding only `flax_model.msgpack` (which transformers 5 cannot load)
is turned into torch weights by transformers' own Flax->PyTorch rule in a temporary folder first.
"""
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


# ---------------------------------------------------------------- transformers folders

def transformers_folder(ck) -> Optional[str]:
    """The transformers folder `ck` was read from (the folder named, or the one holding its weights: an hf-hub
    snapshot), or None when it was not read from one (no config.json with a `model_type`)."""
    import json
    import os
    source = ck.source if ck.source and os.path.isdir(ck.source) else os.path.dirname(os.path.abspath(ck.path))
    try:
        with open(os.path.join(source, 'config.json'), 'rb') as f:
            cfg = json.loads(f.read().decode('utf-8'))
    except (OSError, ValueError):
        return None
    return source if isinstance(cfg, dict) and 'model_type' in cfg else None


def _flax_to_torch_names(raw):
    """transformers' own rule for its Flax trees (`load_flax_weights_in_pytorch_model`): '/' -> '.', a Dense
    `kernel` transposed and a Conv `kernel` (H,W,I,O) permuted to (O,I,H,W) as `weight`, a norm's `scale` as
    `weight`; everything else as it is."""
    import torch
    state = {}
    for k, v in raw.items():
        parts = k.split('/')
        if parts[0] == 'params':
            parts = parts[1:]
        v = np.array(v, np.float32)   # a private, writable copy
        if parts[-1] == 'kernel':
            v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
            parts[-1] = 'weight'
        elif parts[-1] == 'scale':
            parts[-1] = 'weight'
        state['.'.join(parts)] = torch.from_numpy(np.ascontiguousarray(v))
    return state


def build_transformers(folder: str):
    """transformers' model for `folder` (its config's `architectures[0]`, else AutoModel), holding the folder's
    weights, strictly: a missing, unexpected or mismatched key is a one-line error."""
    import os
    import tempfile
    from converters.optional import require
    transformers = require('transformers', 'vit-flax parity of a transformers folder')
    config = transformers.AutoConfig.from_pretrained(folder)
    name = (getattr(config, 'architectures', None) or [None])[0]
    cls = getattr(transformers, name, None) if name else transformers.AutoModel
    if cls is None:
        raise ConversionError(f'{folder}/config.json: architectures {name!r} is not a transformers class here')
    weights = [f for f in ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                           'pytorch_model.bin.index.json') if os.path.isfile(os.path.join(folder, f))]
    with tempfile.TemporaryDirectory() as tmp:
        src = folder
        if not weights:   # flax_model.msgpack only: transformers 5 reads no Flax weights
            from converters.formats.hf_flax import MSGPACK, read_msgpack
            from safetensors.torch import save_file
            save_file(_flax_to_torch_names(read_msgpack(os.path.join(folder, MSGPACK))),
                      os.path.join(tmp, 'model.safetensors'), metadata={'format': 'pt'})
            config.save_pretrained(tmp)
            src = tmp
        try:
            model, info = cls.from_pretrained(src, output_loading_info=True)
        except Exception as e:  # noqa: BLE001  (transformers' own errors: shapes, files)
            raise ConversionError(f'{folder}: transformers {cls.__name__} cannot load it ({type(e).__name__}: '
                                  f'{str(e).strip().splitlines()[0] if str(e).strip() else ""})') from None
    bad = {k: v for k, v in info.items() if k in ('missing_keys', 'unexpected_keys', 'mismatched_keys') and v}
    if bad:
        raise ConversionError(f'{folder}: transformers {cls.__name__} does not load it strictly: ' +
                              '; '.join(f'{k.replace("_", " ")} {sorted(v)[:3]}' for k, v in bad.items()))
    return model.eval()


def _hf_output(out):
    """transformers' counterpart of the Flax model's output: logits, else image_embeds, else pooler_output, else
    the last hidden state."""
    for label in ('logits', 'image_embeds', 'pooler_output', 'last_hidden_state'):
        v = getattr(out, label, None)
        if v is not None:
            return label, v


def compare_transformers(model, params, folder: str, x: Optional[np.ndarray] = None, batch: int = 2) -> List[Row]:
    """Rows as `compare`, against transformers' model for `folder`: the embedded tokens (when no norm sits
    between them and the blocks), every block's output, the final norm, then the output (`_hf_output`); a
    hidden state whose shape is not the Flax intermediate's (Swin's stages) is left out."""
    import jax
    import torch
    x = sample_input(model, batch) if x is None else x
    tm = build_transformers(folder)
    with torch.no_grad():
        out = tm(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), output_hidden_states=True)
    with jax.default_matmul_precision('highest'):
        yf, state = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False, mutable=['intermediates']))(
            params, x)
    inter = {k: np.asarray(v[0] if isinstance(v, tuple) else v)
             for k, v in flatten_dict(state['intermediates'], sep='/').items()}
    hidden = list(getattr(out, 'hidden_states', None) or ())
    points = [('embed', 'Transformer/embed')] if not getattr(model, 'pre_norm', False) else []
    points = [(label, path, h) for (label, path), h in zip(points, hidden[:1])]
    points += [(f'block {i}', f'Transformer/block_{i}', h) for i, h in enumerate(hidden[1:])]
    rows = [_row(label, inter[path], h.numpy()) for label, path, h in points
            if path in inter and tuple(inter[path].shape) == tuple(h.shape)]
    last = getattr(out, 'last_hidden_state', None)
    if last is not None and 'Transformer/encoded' in inter and inter['Transformer/encoded'].shape == tuple(last.shape):
        rows.append(_row('norm', inter['Transformer/encoded'], last.numpy()))
    label, want = _hf_output(out)
    rows.append(_row(label, np.asarray(yf), want.numpy()))
    return rows
