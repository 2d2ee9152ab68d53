"""Weight EMA as timm's `ModelEmaV3` (timm/utils/model_ema.py), as timm's train.py drives it.

After update number n (1-based, `update(model, step=n)` in train.py) the EMA moves towards the new weights:
ema.lerp_(params, 1 - d) with d = `decay_at(n)`:
- s = max(0, n - 1) (update_after_step 0); s = 0 gives d = 0, so the first update copies the weights;
- otherwise d = `decay`, or with warm-up d = min(decay, 1 - (1 + s)^(-2/3)) (warmup_gamma 1, power 2/3,
  min_decay 0).
The weight 1 - d is computed here in float64 and handed to the step as a float32 scalar, as torch casts
the Python float; the lerp is torch's (`step.ema_update`). The EMA is float32 (the params' dtype) and covers
the params only: these models have no buffers (no BatchNorm statistics).
"""
import jax
import jax.numpy as jnp
import numpy as np


def decay_at(n: int, decay: float, warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
             min_decay: float = 0.0, update_after_step: int = 0) -> float:
    """ModelEmaV3.get_decay(n)."""
    s = max(0, n - update_after_step - 1)
    if s <= 0:
        return 0.0
    if warmup:
        d = 1 - (1 + s / warmup_gamma) ** -warmup_power
        return max(min(d, decay), min_decay)
    return decay


def weight_at(n: int, decay: float, warmup: bool = False) -> np.float32:
    """The lerp weight 1 - d of update n, as the float32 torch's lerp_ receives."""
    return np.float32(1.0 - decay_at(n, decay, warmup))


def lerp(ema, params, weight):
    """torch's lerp (ema.lerp_(params, weight)): ema + w (p - ema) for w < 0.5, else p - (p - ema)(1 - w)."""
    def one(e, p):
        d = p - e
        return jnp.where(weight < 0.5, e + weight * d, p - d * (1.0 - weight))
    return jax.tree.map(one, ema, params)
