"""Resizing a grid of embeddings inside a forward pass, as torch's `F.interpolate(mode='bicubic',
antialias=True, align_corners=False)` computes it (what timm's `resample_abs_pos_embed` calls for
`dynamic_img_size` models).

torch's antialiased bicubic is PIL's: the cubic kernel with a = -0.5 (not the -0.75 of its plain bicubic),
stretched by the scale when shrinking, weights normalised per output pixel, pixel centres at (i + 0.5).
Both axes are separable, so the resize is two small matrices built in numpy from the static sizes and one
einsum (jit-friendly; no gather). Matches torch to float32 rounding (tests/models/test_vit_options.py).
"""
from functools import lru_cache

import jax.numpy as jnp
import numpy as np


def _cubic(x, a: float):
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


@lru_cache(maxsize=64)
def bicubic_aa_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float64 weights of torch's antialiased bicubic resize along one axis."""
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = _cubic((np.arange(lo, hi) - centre + 0.5) * inv, -0.5)
        w[i, lo:hi] = taps / taps.sum()
    return w


def resize_grid(x, size):
    """(B, H, W, D) -> (B, h, w, D) by torch's antialiased bicubic, computed in float32."""
    (h_in, w_in), (h, w) = x.shape[1:3], tuple(size)
    if (h_in, w_in) == (h, w):
        return x
    wh = jnp.asarray(bicubic_aa_matrix(h_in, h), jnp.float32)
    ww = jnp.asarray(bicubic_aa_matrix(w_in, w), jnp.float32)
    return jnp.einsum('hH,wW,bHWd->bhwd', wh, ww, x.astype(jnp.float32)).astype(x.dtype)
