"""Google's `.npz` layouts of the ViT tree (the package docstring describes them): released, linen and
big_vision, prefixed or scanned. Reading gives the linen tree (our Flax tree); writing, any of the three."""
import re
from typing import Dict, Tuple

import numpy as np

from ...errors import ConversionError
from ...scan import unstack_blocks


# ---------------------------------------------------------------- Google's .npz layouts

LAYOUTS = ('released', 'linen', 'big_vision')
_PREFIXES = ('params/img/', 'opt/target/', 'params/', '')
# released name -> linen name, for the children of one encoder block
_RELEASED_TO_LINEN = {'LayerNorm_0': 'LayerNorm_0', 'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
                      'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
_LINEN_TO_RELEASED = {v: k for k, v in _RELEASED_TO_LINEN.items()}
_BLOCK = re.compile(r'^(Transformer/encoderblock_\d+)/([^/]+)(/.*)$')
_GROUP_NORM = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')


def _rename_block_children(flat, table, path):
    out = {}
    for k, v in flat.items():
        m = _BLOCK.match(k)
        if m:
            if m.group(2) not in table:
                raise ConversionError(f'{path}: unexpected block child {m.group(2)!r} in key {k!r}')
            k = f'{m.group(1)}/{table[m.group(2)]}{m.group(3)}'
        out[k] = v
    return out


def detect_prefix(arrays: Dict[str, np.ndarray], path: str = '<npz>') -> str:
    for p in _PREFIXES:
        if f'{p}embedding/kernel' in arrays:
            return p
    raise ConversionError(f"{path}: not a Google ViT checkpoint: no 'embedding/kernel' "
                          f"under any of the prefixes {', '.join(repr(p) for p in _PREFIXES)}")


def detect_npz_layout(arrays: Dict[str, np.ndarray], path: str = '<npz>') -> str:
    """big_vision (as timm decides it: a `params/` prefix, a top-level pos_embedding or scanned blocks),
    else released or linen by the block numbering, whatever the prefix (an `opt/target/` file may be either)."""
    prefix = detect_prefix(arrays, path)
    if (prefix.startswith('params/') or f'{prefix}pos_embedding' in arrays
            or any(k.startswith(f'{prefix}Transformer/encoderblock/') for k in arrays)):
        return 'big_vision'
    return 'released' if _released_numbering(arrays) else 'linen'


def _released_numbering(keys) -> bool:
    return any('/MultiHeadDotProductAttention_1/' in k for k in keys)


def npz_to_flax(arrays: Dict[str, np.ndarray], path: str = '<npz>') -> Tuple[Dict[str, np.ndarray], str]:
    """Any Google layout -> (flat linen Flax params, layout name). Keys outside the model prefix are dropped."""
    layout = detect_npz_layout(arrays, path)
    prefix = detect_prefix(arrays, path)
    flat = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if prefix == 'params/':  # a multi-tower (e.g. LiT/SigLIP) file keeps its image tower under img/
        flat = {k: v for k, v in flat.items() if not k.startswith(('txt/', 'img/'))}
    flat = unstack_blocks(flat, path)
    if _released_numbering(flat):
        flat = _rename_block_children(flat, _RELEASED_TO_LINEN, path)
    for k, v in flat.items():  # old hybrid files keep GroupNorm scale/bias as (1, 1, 1, C)
        if _GROUP_NORM.search(k) and v.ndim == 4 and v.shape[:3] == (1, 1, 1):
            flat[k] = v.reshape(-1)
    if 'pos_embedding' in flat:
        # big_vision adds positions before concatenating cls; an all-zero cls row reproduces that exactly.
        pe = flat.pop('pos_embedding')
        if pe.ndim not in (3, 4):
            raise ConversionError(f'{path}: pos_embedding has shape {pe.shape}: expected (1, N, D) or (1, H, W, D)')
        if pe.ndim == 4:  # some files keep the (1, h, w, D) grid
            pe = pe.reshape(1, -1, pe.shape[-1])
        if 'cls' in flat:
            pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
        flat['Transformer/posembed_input/pos_embedding'] = pe
    return flat, layout


def flax_to_npz(flat: Dict[str, np.ndarray], layout: str = 'released') -> Dict[str, np.ndarray]:
    """Flat linen Flax params -> arrays keyed for `layout`. Stacked (scanned) blocks stay stacked in the
    linen and big_vision layouts; `released` (vit_jax) has no scanned form and unrolls them."""
    if layout not in LAYOUTS:
        raise ConversionError(f'unknown npz layout {layout!r}; choose one of {", ".join(LAYOUTS)}')
    if layout == 'linen':
        return dict(flat)
    if layout == 'released':
        return _rename_block_children(unstack_blocks(flat), _LINEN_TO_RELEASED, 'params')
    if 'dist' in flat:
        raise ConversionError('the big_vision layout cannot hold a distillation token; use released or linen')
    out = dict(flat)
    pe = out.pop('Transformer/posembed_input/pos_embedding', None)
    if pe is not None:  # (a model with fixed sincos2d positions has no table: big_vision stores none)
        if 'cls' in out:
            # big_vision has no position for cls: fold its row into the token (same function, one rounding).
            out['cls'] = out['cls'] + pe[:, :1]
            pe = pe[:, 1:]
        out['pos_embedding'] = pe
    return {f'params/{k}': v for k, v in out.items()}
