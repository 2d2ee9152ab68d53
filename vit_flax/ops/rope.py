"""Rotary position embeddings (RoPE) for 2-D patch grids, in the forms timm 1.0.31 has (`timm/layers/
pos_embed_sincos.py`), as an op beside attention that any model can call.

A table is an angle per patch and frequency, theta (N, Dh/2) for head width Dh: the first Dh/4 frequencies
rotate with axis 0's coordinate, the last Dh/4 with axis 1's (axis order per `indexing`: 'ij' row then column,
'xy' column then row). `apply_rope(x, sin, cos, half)` computes x * cos + R(x) * sin over the last axis:

- interleaved layout (`half=False`: EVA-02, PE, the RoPE-ViTs; timm `rot`): angles repeated pairwise
  [t0, t0, t1, t1, ...], R rotates adjacent pairs (x0, x1, ...) -> (-x1, x0, -x3, x2, ...);
- half layout (`half=True`: DINOv3, timm `rope_rotate_half`): angles tiled [t || t], R([a || b]) = [-b || a].

The forms (omega_k for k < nb = Dh/4; coordinates per patch (i, j) = (row, column) of an H x W grid):

| form | function | omega_k | coordinate |
|---|---|---|---|
| EVA-02 / timm `RotaryEmbeddingCat` | `cat_angles` | T^(-k/nb) (T = temperature, 10000) | index + offset; x ref/grid per axis if `ref_grid` |
| DINOv3 / timm `RotaryEmbeddingDinoV3` | `dinov3_angles` | 2 pi / base^(k/nb) (base 100) | 2 (index + 0.5 + offset) / size - 1 |
| RoPE-ViT mixed / timm `RotaryEmbeddingMixed` | `mixed_angles` | learned (2, depth, heads, Dh/2) `freqs` | angle = t_x fx + t_y fy |

Numerics: fixed tables are computed in numpy float32 in timm's order of operations (bands, grid, product, sin/cos
in float32) from static shapes, so they are constants of the compiled program; the learned mixed form computes
its angles in float32 in the graph with elementwise products (no matmul: timm avoids autocast's downcast the same
way). `apply_rope` rotates in float32 whatever x's dtype (the caller casts the result to its compute dtype): under
a bf16 compute dtype the positions are not rounded to bf16.
"""
import functools
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError


def _grid(shape, indexing: str, ref=None, offset: float = 0., centered: bool = False, normalize: str = 'separate'):
    """(H*W, 2) float32 coordinates, row-major over the grid, channels (row, col) for 'ij', (col, row) for 'xy'
    (timm `_build_grid`: 'index' grid, or 'centered' for DINOv3)."""
    if indexing not in ('ij', 'xy'):
        raise ModelConfigError(f"rope grid indexing must be 'ij' or 'xy', got {indexing!r}")
    shape = [int(s) for s in shape]
    if indexing == 'xy':
        shape = shape[::-1]
        ref = None if ref is None else tuple(ref)[::-1]
    if centered:
        denom = {'separate': shape, 'max': [max(shape)] * 2, 'min': [min(shape)] * 2}.get(normalize)
        if denom is None:
            raise ModelConfigError(f"normalize_coords must be 'separate', 'min' or 'max', got {normalize!r}")
        t = [(np.arange(0.5, s, dtype=np.float32) + np.float32(offset)) / np.float32(d) for s, d in zip(shape, denom)]
    else:
        t = [np.arange(s).astype(np.float32) + np.float32(offset) for s in shape]
    if ref is not None:
        t = [x / np.float32(f) * np.float32(r) for x, f, r in zip(t, shape, ref)]
    grid = np.stack(np.meshgrid(*t, indexing=indexing), axis=-1).astype(np.float32)
    if centered:
        grid = np.float32(2.0) * grid - np.float32(1.0)
    return grid.reshape(-1, 2)


@functools.lru_cache(maxsize=64)
def cat_angles(grid: Tuple[int, int], head_dim: int, temperature: float = 10000., offset: float = 0.,
               indexing: str = 'ij', ref_grid: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """(H*W, Dh/2) float32 angles of timm's `RotaryEmbeddingCat` (`in_pixels=False`), EVA-02's table."""
    if head_dim % 4:
        raise ModelConfigError(f'2-D RoPE needs a head width that is a multiple of 4, got {head_dim}')
    nb = head_dim // 4
    exp = np.arange(nb).astype(np.float32) / np.float32(nb)
    bands = (np.float32(1.) / (np.float32(temperature) ** exp)).astype(np.float32)
    coords = _grid(grid, indexing, ref_grid, offset)
    out = (coords[:, :, None] * bands).reshape(len(coords), -1).astype(np.float32)
    out.flags.writeable = False
    return out


def dinov3_periods(head_dim: int, temperature: float = 100., min_period: Optional[float] = None,
                   max_period: Optional[float] = None) -> np.ndarray:
    """(Dh/4,) float32 periods of DINOv3's RoPE: base^(2k/(Dh/2)), or geometric from `min_period` to
    `max_period` (timm `RotaryEmbeddingDinoV3._compute_periods`)."""
    if head_dim % 4:
        raise ModelConfigError(f'2-D RoPE needs a head width that is a multiple of 4, got {head_dim}')
    nb = head_dim // 4
    if min_period is not None and max_period is not None:
        periods = np.float32(min_period) * ((np.float32(max_period) / np.float32(min_period))
                                            ** np.linspace(0, 1, nb, dtype=np.float32))
    else:
        periods = np.float32(temperature) ** (np.float32(2.0) * np.arange(nb, dtype=np.float32)
                                               / np.float32(head_dim // 2))
    return periods.astype(np.float32)


def dinov3_coords(grid: Tuple[int, int], offset: float = 0., indexing: str = 'ij',
                  normalize: str = 'separate') -> np.ndarray:
    """(H*W, 2) float32 0.5-centred coordinates in [-1, 1] (DINOv3's, timm `make_coords_dinov3`)."""
    return _grid(grid, indexing, None, offset, centered=True, normalize=normalize)


def dinov3_angles_from(coords, periods):
    """(N, Dh/2) angles 2 pi coord / period from (N, 2) coordinates (numpy or traced, e.g. augmented)."""
    xp = np if isinstance(coords, np.ndarray) else jnp
    out = xp.float32(2 * math.pi) * coords[:, :, None] / periods[None, None, :]
    return out.reshape(coords.shape[0], -1).astype(xp.float32)


@functools.lru_cache(maxsize=64)
def dinov3_angles(grid: Tuple[int, int], head_dim: int, temperature: float = 100., offset: float = 0.,
                  indexing: str = 'ij', normalize: str = 'separate', min_period: Optional[float] = None,
                  max_period: Optional[float] = None) -> np.ndarray:
    """(H*W, Dh/2) float32 angles of DINOv3's `RopePositionEmbedding` (timm `RotaryEmbeddingDinoV3`): periods
    base^(2k/(Dh/2)) (or geometric from `min_period` to `max_period`), 0.5-centred coordinates in [-1, 1]."""
    out = dinov3_angles_from(dinov3_coords(grid, offset, indexing, normalize),
                             dinov3_periods(head_dim, temperature, min_period, max_period))
    out.flags.writeable = False
    return out


def mixed_coords(grid: Tuple[int, int], indexing: str = 'xy') -> Tuple[np.ndarray, np.ndarray]:
    """(t_x, t_y) float32 (H*W,) each: timm `get_mixed_grid`, 0-based, channel order per `indexing`."""
    coords = _grid(grid, indexing)
    return coords[:, 0].copy(), coords[:, 1].copy()


def mixed_angles(freqs, grid: Tuple[int, int], indexing: str = 'xy', coords=None):
    """Angles (depth, heads, H*W, Dh/2) float32 of timm's `RotaryEmbeddingMixed` from its learned `freqs`
    (2, depth, heads, Dh/2): t_x * fx + t_y * fy, as elementwise products. `coords` ((t_x, t_y), e.g.
    augmented) replaces the grid's."""
    t_x, t_y = mixed_coords(grid, indexing) if coords is None else coords
    f = jnp.asarray(freqs, jnp.float32)
    t_x, t_y = jnp.asarray(t_x, jnp.float32), jnp.asarray(t_y, jnp.float32)
    return t_x[:, None] * f[0][..., None, :] + t_y[:, None] * f[1][..., None, :]


def init_mixed_freqs(rng, head_dim: int, depth: int, num_heads: int, temperature: float = 10.):
    """(2, depth, heads, Dh/2) float32, as timm's `init_random_2d_freqs`: magnitudes T^(-4k/Dh), each (block,
    head) rotated by a random angle; fx = mag*[cos a, cos(a + pi/2)], fy = mag*[sin a, sin(a + pi/2)]."""
    mag = 1.0 / (temperature ** (jnp.arange(0, head_dim, 4, dtype=jnp.float32) / head_dim))
    angles = jax.random.uniform(rng, (depth, num_heads, 1), jnp.float32) * 2 * jnp.pi
    fx = jnp.concatenate([mag * jnp.cos(angles), mag * jnp.cos(angles + jnp.pi / 2)], axis=-1)
    fy = jnp.concatenate([mag * jnp.sin(angles), mag * jnp.sin(angles + jnp.pi / 2)], axis=-1)
    return jnp.stack([fx, fy], axis=0)


def sin_cos(angles, half: bool):
    """(sin, cos) float32 (..., Dh) of angles (..., Dh/2) in the interleaved (`half=False`) or half layout."""
    a = jnp.asarray(angles, jnp.float32)
    s, c = jnp.sin(a), jnp.cos(a)
    if half:
        return jnp.concatenate([s, s], -1), jnp.concatenate([c, c], -1)
    return jnp.repeat(s, 2, axis=-1), jnp.repeat(c, 2, axis=-1)


def rotate(x, half: bool):
    """R(x): [-b || a] for x = [a || b] (`half`), else adjacent pairs (x0, x1) -> (-x1, x0)."""
    if half:
        a, b = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([-b, a], axis=-1)
    pairs = x.reshape(x.shape[:-1] + (-1, 2))
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


def apply_rope(x, sin, cos, half: bool = False, prefix: int = 0):
    """x (..., N, Dh) rotated as timm's `apply_rot_embed_cat`, in float32 (returned float32): the first
    `prefix` tokens (class, registers) are left unrotated, the others take sin, cos (..., N - prefix, Dh),
    broadcast over the leading axes."""
    x = x.astype(jnp.float32)
    tail = x[..., prefix:, :]
    tail = tail * cos + rotate(tail, half) * sin
    return tail if prefix == 0 else jnp.concatenate([x[..., :prefix, :], tail], axis=-2)


def check_rope_type(rope_type: str, half: bool) -> None:
    if rope_type not in ('cat', 'mixed', 'dinov3'):
        raise ModelConfigError(f"rope_type must be 'cat', 'mixed' or 'dinov3', got {rope_type!r}")
    if rope_type == 'mixed' and half:
        raise ModelConfigError("rope_type='mixed' needs rope_rotate_half=False (timm's rule)")


__all__ = ['apply_rope', 'cat_angles', 'dinov3_angles', 'dinov3_angles_from', 'dinov3_coords', 'dinov3_periods', 'init_mixed_freqs', 'mixed_angles', 'mixed_coords',
           'rotate', 'sin_cos']
