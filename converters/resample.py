"""Position-embedding resampling for a new input grid (fine-tuning at 384 from 224, non-square too).

Methods:
- 'bicubic' (default): timm's `.pth` loading, `F.interpolate(mode='bicubic', antialias=True)`.
- 'bilinear': timm's `.npz` loading, `F.interpolate(mode='bilinear', antialias=False)`.
- 'google': vit_jax / big_vision, `scipy.ndimage.zoom(order=1)` (align-corners linear).
- 'dinov2': facebookresearch/dinov2's `interpolate_pos_encoding` without registers: bicubic, no antialias, at
  the scale factor (new + 0.1) / old (their "historical kludge"); with registers DINOv2 uses `size=` and
  antialias, which is 'bicubic'.
Prefix tokens (cls, dist) are kept aside and never interpolated.

'bicubic' and 'bilinear' are torch's `F.interpolate` (align_corners=False), run by torch where it is
installed (bit-identical to timm's loading); without torch they are computed here in numpy, as one (out, in) weight
matrix per axis (`interp_matrix`), applied in float64 and cast back; it equals torch's to ~3e-6 of the
largest value (torch rounds in float32), tested against torch over up- and down-sampling. Without antialias
(Keys' cubic, a=-0.75): source position (i + 0.5) * in/out - 0.5, four taps with indices clamped to the
edge (bilinear: the position clamped at 0, two taps). With antialias (torch's `_upsample_*_aa`, PIL's
filter: cubic a=-0.5, triangle): a filter of support 2 (bilinear 1) widened by in/out when shrinking,
centred at (i + 0.5) * in/out, truncated at the edges and normalised to sum 1.

numpy is imported by the functions that use it, so that the CLI's parser (which takes METHODS from here)
answers --help without it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

from .errors import ConversionError
from .optional import available

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
    import numpy as np
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
        if method == 'dinov2':   # torch's scale_factor semantics (source positions at out / scale)
            from .optional import require
            torch = require('torch', "resample='dinov2'")
            import torch.nn.functional as F
            scale = tuple(float(n + 0.1) / o for n, o in zip(new_grid, old_grid))
            t = torch.from_numpy(np.ascontiguousarray(g)).permute(2, 0, 1)[None]
            t = F.interpolate(t, scale_factor=scale, mode='bicubic', antialias=False)
            if tuple(t.shape[-2:]) != new_grid:
                raise ConversionError(f'dinov2 resampling gave a grid {tuple(t.shape[-2:])}, not {new_grid}')
            g = t[0].permute(1, 2, 0).numpy()
        else:
            g = resize_grid(g, new_grid, method, antialias=(method == 'bicubic'))
    g = g.reshape(1, -1, dim).astype(dtype)
    return np.concatenate([prefix, g], axis=1)


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with parameter a (torch: -0.75; its antialiased path and PIL: -0.5)."""
    import numpy as np
    x = np.abs(x)
    return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, ((x - 5) * x + 8) * x * a - 4 * a, 0.0))


def interp_matrix(n_in: int, n_out: int, mode: str = 'bicubic', antialias: bool = False) -> np.ndarray:
    """(n_out, n_in) float64 weights: `m @ v` resizes a length-n_in axis as torch's `F.interpolate(size=n_out,
    mode=mode, align_corners=False, antialias=antialias)` does (mode 'bicubic' or 'bilinear'; see the module
    docstring for the formulas)."""
    import numpy as np
    if mode not in ('bicubic', 'bilinear'):
        raise ValueError(f"mode must be 'bicubic' or 'bilinear', got {mode!r}")
    m = np.zeros((n_out, n_in), np.float64)
    scale = n_in / n_out
    rows = np.arange(n_out)
    if antialias:
        half = 2.0 if mode == 'bicubic' else 1.0
        support = half * scale if scale >= 1 else half
        inv = 1 / scale if scale >= 1 else 1.0
        for i in rows:
            centre = scale * (i + 0.5)
            lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
            x = (np.arange(lo, hi) - centre + 0.5) * inv
            w = _cubic(x, -0.5) if mode == 'bicubic' else np.maximum(0.0, 1.0 - np.abs(x))
            total = w.sum()
            m[i, lo:hi] = w / total if total != 0 else w
        return m
    src = (rows + 0.5) * scale - 0.5
    if mode == 'bicubic':
        i0 = np.floor(src).astype(np.int64)
        t = src - i0
        for k in (-1, 0, 1, 2):
            np.add.at(m, (rows, np.clip(i0 + k, 0, n_in - 1)), _cubic(t - k, -0.75))
    else:
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(np.int64)
        frac = src - i0
        np.add.at(m, (rows, i0), 1 - frac)
        np.add.at(m, (rows, np.minimum(i0 + 1, n_in - 1)), frac)
    return m


def resize_grid(g: np.ndarray, size: Sequence[int], mode: str = 'bicubic', antialias: bool = False,
                use_torch: Optional[bool] = None) -> np.ndarray:
    """(h, w, C) -> (H, W, C) float32: torch's `F.interpolate(size=(H, W), mode=mode, antialias=antialias,
    align_corners=False)` on the (1, C, h, w) tensor. With torch installed (use_torch=None) torch computes it,
    so a table is bit-identical to what timm's or Microsoft's own loading makes; without torch (or
    use_torch=False) `interp_matrix` does, equal to torch's to ~3e-6 of the largest value."""
    import numpy as np
    if use_torch is None:
        use_torch = available('torch')
    if use_torch:
        import torch
        import torch.nn.functional as F
        t = torch.from_numpy(np.ascontiguousarray(g, np.float32)).permute(2, 0, 1)[None]
        t = F.interpolate(t, size=tuple(size), mode=mode, antialias=antialias, align_corners=False)
        return t[0].permute(1, 2, 0).contiguous().numpy()
    g = np.asarray(g, np.float64)
    out = np.einsum('Hh,hwc->Hwc', interp_matrix(g.shape[0], size[0], mode, antialias), g)
    out = np.einsum('Ww,Hwc->HWc', interp_matrix(g.shape[1], size[1], mode, antialias), out)
    return out.astype(np.float32)


def resample_patch_kernel(kernel: np.ndarray, new_patch: Sequence[int], method: str = DEFAULT_METHOD) -> np.ndarray:
    """A patch-embedding kernel (ph, pw, C, D) (HWIO) resized to `new_patch` so that the new patches give the
    same tokens as the old ones on the image resized with them: FlexiViT's pseudo-inverse resize (PI-resize),
    as big_vision's `flexi` code and timm's `resample_patch_embed` compute it. Each output pixel of a resize
    is a linear map B of the patch; the new kernel is pinv(B^T) applied to the old one, in float32 as timm.

    `method`: 'bicubic' (antialiased, timm's default and its .pth loading) or 'bilinear' (no antialias,
    timm's .npz loading, which FlexiViT's big_vision files go through)."""
    if method not in ('bicubic', 'bilinear'):
        raise ConversionError(f'patch-embedding resize: method {method!r} is not bicubic or bilinear')
    import numpy as np
    old, new = tuple(kernel.shape[:2]), tuple(new_patch)
    if old == new:
        return kernel
    aa = method == 'bicubic'
    c, d = kernel.shape[2:]
    w = np.ascontiguousarray(kernel.astype(np.float32).transpose(3, 2, 0, 1)).reshape(d, c, -1)
    if available('torch'):   # timm's own computation (torch's resize of the basis, its float32 pinv)
        import torch
        import torch.nn.functional as F
        n_old = old[0] * old[1]
        basis = torch.eye(n_old, dtype=torch.float32).reshape(n_old, 1, *old)
        resized = F.interpolate(basis, size=new, mode=method, antialias=aa, align_corners=False)
        resize = resized.squeeze(1).permute(1, 2, 0).reshape(new[0] * new[1], n_old)   # (new pixels, old pixels)
        out = (torch.from_numpy(w) @ torch.linalg.pinv(resize)).numpy()
    else:                    # the same resize as the outer product of the per-axis matrices (interp_matrix)
        resize = np.kron(interp_matrix(old[0], new[0], method, aa), interp_matrix(old[1], new[1], method, aa))
        out = (w.astype(np.float64) @ np.linalg.pinv(resize)).astype(np.float32)
    return out.reshape(d, c, *new).transpose(2, 3, 1, 0).astype(kernel.dtype)
