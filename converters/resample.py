"""Position-embedding resampling for a new input grid (fine-tuning at 384 from 224, non-square too).

Methods:
- 'bicubic' (default): timm's `.pth` loading, `F.interpolate(mode='bicubic', antialias=True)`.
- 'bilinear': timm's `.npz` loading, `F.interpolate(mode='bilinear', antialias=False)`.
- 'google': vit_jax / big_vision, `scipy.ndimage.zoom(order=1)` (align-corners linear).
- 'dinov2': facebookresearch/dinov2's `interpolate_pos_encoding` without registers: bicubic, no antialias, at
  the scale factor (new + 0.1) / old (their "historical kludge"); with registers DINOv2 uses `size=` and
  antialias, which is 'bicubic'.
Prefix tokens (cls, dist) are kept aside and never interpolated.
"""
import math
from typing import Optional, Sequence, Tuple

import numpy as np

from .errors import ConversionError

METHODS = ('bicubic', 'bilinear', 'google', 'dinov2')
DEFAULT_METHOD = 'bicubic'


def square_grid(num_tokens: int, what: str = 'position embedding') -> Tuple[int, int]:
    side = int(round(math.sqrt(num_tokens)))
    if side * side != num_tokens:
        raise ConversionError(f'{what}: {num_tokens} patch positions are not a square grid; give the old grid')
    return side, side


def resample_pos_embed(pe: np.ndarray, new_grid: Sequence[int], num_prefix_tokens: int,
                       old_grid: Optional[Sequence[int]] = None, method: str = DEFAULT_METHOD) -> np.ndarray:
    """(1, prefix + h*w, D) -> (1, prefix + H*W, D) on the same dtype."""
    if method not in METHODS:
        raise ConversionError(f'unknown resample method {method!r}; choose one of {", ".join(METHODS)}')
    prefix, grid = pe[:, :num_prefix_tokens], pe[:, num_prefix_tokens:]
    old_grid = tuple(old_grid) if old_grid else square_grid(grid.shape[1])
    new_grid = tuple(new_grid)
    if len(new_grid) == 1 or len(old_grid) == 1:  # 1-D signal model
        old_grid, new_grid = (1,) + tuple(old_grid)[-1:], (1,) + tuple(new_grid)[-1:]
    if math.prod(old_grid) != grid.shape[1]:
        raise ConversionError(f'position embedding has {grid.shape[1]} patch rows, not the grid {old_grid}')
    if old_grid == new_grid:
        return pe
    dim, dtype = grid.shape[-1], grid.dtype
    g = grid.reshape(old_grid + (dim,)).astype(np.float32)
    if method == 'google':
        import scipy.ndimage
        zoom = (new_grid[0] / old_grid[0], new_grid[1] / old_grid[1], 1)
        g = scipy.ndimage.zoom(g, zoom, order=1)
    else:
        import torch
        import torch.nn.functional as F
        t = torch.from_numpy(np.ascontiguousarray(g)).permute(2, 0, 1)[None]
        if method == 'dinov2':
            scale = tuple(float(n + 0.1) / o for n, o in zip(new_grid, old_grid))
            t = F.interpolate(t, scale_factor=scale, mode='bicubic', antialias=False)
            if tuple(t.shape[-2:]) != new_grid:
                raise ConversionError(f'dinov2 resampling gave a grid {tuple(t.shape[-2:])}, not {new_grid}')
        else:
            t = F.interpolate(t, size=new_grid, mode=method, antialias=(method == 'bicubic'),
                              align_corners=False)
        g = t[0].permute(1, 2, 0).numpy()
    g = g.reshape(1, -1, dim).astype(dtype)
    return np.concatenate([prefix, g], axis=1)


def resample_patch_kernel(kernel: np.ndarray, new_patch: Sequence[int], method: str = DEFAULT_METHOD) -> np.ndarray:
    """A patch-embedding kernel (ph, pw, C, D) (HWIO) resized to `new_patch` so that the new patches give the
    same tokens as the old ones on the image resized with them: FlexiViT's pseudo-inverse resize (PI-resize),
    as big_vision's `flexi` code and timm's `resample_patch_embed` compute it. Each output pixel of a resize
    is a linear map B of the patch; the new kernel is pinv(B^T) applied to the old one, in float32 as timm.

    `method`: 'bicubic' (antialiased, timm's default and its .pth loading) or 'bilinear' (no antialias,
    timm's .npz loading, which FlexiViT's big_vision files go through)."""
    if method not in ('bicubic', 'bilinear'):
        raise ConversionError(f'patch-embedding resize: method {method!r} is not bicubic or bilinear')
    import torch
    import torch.nn.functional as F
    old, new = tuple(kernel.shape[:2]), tuple(new_patch)
    if old == new:
        return kernel
    n_old = old[0] * old[1]
    basis = torch.eye(n_old, dtype=torch.float32).reshape(n_old, 1, *old)
    resized = F.interpolate(basis, size=new, mode=method, antialias=(method == 'bicubic'), align_corners=False)
    resize = resized.squeeze(1).permute(1, 2, 0).reshape(new[0] * new[1], n_old)   # (new pixels, old pixels)
    pinv = torch.linalg.pinv(resize)                                               # (old, new)
    c, d = kernel.shape[2:]
    w = torch.from_numpy(np.ascontiguousarray(kernel.astype(np.float32).transpose(3, 2, 0, 1))).reshape(d, c, n_old)
    out = (w @ pinv).reshape(d, c, *new).numpy()
    return out.transpose(2, 3, 1, 0).astype(kernel.dtype)
