"""nn.scan's stacked blocks <-> unrolled blocks of the ViT tree (`Transformer/encoderblock/...` with a leading
depth axis <-> `Transformer/encoderblock_{i}/...`): the form a file of a `scan_blocks=True` model holds, and the
one form every converter works on (unrolled)."""
import re
from typing import Dict

import numpy as np

from .errors import ConversionError

SCANNED = 'Transformer/encoderblock/'  # nn.scan over the blocks: every leaf has a leading depth axis


def is_scanned(flat) -> bool:
    return any(k.startswith(SCANNED) for k in flat)


def unstack_blocks(flat: Dict[str, np.ndarray], path: str = 'params') -> Dict[str, np.ndarray]:
    """nn.scan's stacked `Transformer/encoderblock/...` (leading depth axis) -> `encoderblock_{i}/...`.
    A tree without stacked blocks comes back unchanged."""
    scanned = {k: v for k, v in flat.items() if k.startswith(SCANNED)}
    if not scanned:
        return flat
    no_depth = [k for k, v in scanned.items() if v.ndim == 0]
    if no_depth:
        raise ConversionError(f'{path}: scanned block key {no_depth[0]!r} has no depth axis (shape ())')
    depths = {v.shape[0] for v in scanned.values()}
    if len(depths) != 1:
        raise ConversionError(f'{path}: scanned blocks disagree on depth: {sorted(depths)}')
    if any(k.startswith('Transformer/encoderblock_') for k in flat):
        raise ConversionError(f'{path}: holds both scanned (Transformer/encoderblock/) and unrolled blocks')
    out = {k: v for k, v in flat.items() if k not in scanned}
    for k, v in scanned.items():
        for i in range(v.shape[0]):
            out[f'Transformer/encoderblock_{i}/{k[len(SCANNED):]}'] = v[i]
    return out


def stack_blocks(flat: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """`Transformer/encoderblock_{i}/...` -> nn.scan's `Transformer/encoderblock/...` with a leading depth axis."""
    blocks = {}
    for k, v in flat.items():
        m = re.match(r'^Transformer/encoderblock_(\d+)/(.*)$', k)
        if m:
            blocks.setdefault(m.group(2), {})[int(m.group(1))] = v
    out = {k: v for k, v in flat.items() if not k.startswith('Transformer/encoderblock_')}
    for rest, layers in blocks.items():
        out[SCANNED + rest] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
    return out
