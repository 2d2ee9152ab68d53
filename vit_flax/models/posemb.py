"""Fixed 2-D sine-cosine position embeddings: big_vision's `posemb='sincos2d'` (the MoCo v3 table).

For a grid of h x w patches and width D (a multiple of 4), with q = D // 4 frequencies
omega_k = 1 / 10000 ** (k / (q - 1)) and the patch at row y, column x (row-major order):

    pe[y * w + x] = [sin(x * omega), cos(x * omega), sin(y * omega), cos(y * omega)]

The table is added to the patch tokens before any class token is prepended, so prefix tokens get no
position. It is computed in float32 with jax's own ops, in big_vision's order (the frequencies in float32,
one float32 product per entry), eagerly on the host CPU: the model and the converters that write it out
as a learned table therefore see the same bits on every machine.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from ..errors import ModelConfigError

TEMPERATURE = 10_000.


@functools.lru_cache(maxsize=64)
def _table(h: int, w: int, width: int, temperature: float) -> np.ndarray:
    q = width // 4
    with jax.ensure_compile_time_eval(), jax.default_device(jax.devices('cpu')[0]):
        omega = 1. / temperature ** (jnp.arange(q) / (q - 1))           # float32, as big_vision
        rows, cols = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing='ij')
        x = cols.reshape(-1, 1) * omega[None]
        y = rows.reshape(-1, 1) * omega[None]
        pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
    table = np.asarray(pe, np.float32)[None]
    table.flags.writeable = False
    return table


def sincos2d(h: int, w: int, width: int, temperature: float = TEMPERATURE) -> np.ndarray:
    """(1, h*w, width) float32 table of big_vision's `posemb_sincos_2d` (read-only, cached)."""
    if width % 4 or width < 8:
        raise ModelConfigError(f'sincos2d position embeddings need a width that is a multiple of 4 and >= 8, got {width}')
    return _table(int(h), int(w), int(width), float(temperature))
