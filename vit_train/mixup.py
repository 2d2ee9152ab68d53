"""Mixup and CutMix on the device, inside the jitted step: timm's `timm.data.mixup.Mixup` semantics.

Images are NHWC floats (the step mixes the normalised images after random erasing, as timm does; mixing
commutes with the per-channel normalisation, so the figures are those of mixing x / 255). Sample i is mixed
with sample B-1-i of the unmixed batch (timm's `x.flip(0)`) in every mode:

- `batch`: one draw for the whole batch: applied with probability `prob`; with both alphas on, cutmix with
  probability `switch_prob`, else mixup; lambda ~ Beta(alpha, alpha) of the chosen method.
- `pair`: B/2 draws, the parameters of pair (i, B-1-i) shared (both images take the other's box / weight).
- `elem`: B draws, one per sample.

CutMix's box (`rand_bbox`): r = sqrt(1 - lambda), cut = int(H r) x int(W r) centred at (randint(0, H),
randint(0, W)), clipped to the image; with `cutmix_minmax=(lo, hi)` (`rand_bbox_minmax`) the sides are
randint(int(H lo), int(H hi)) and the corner randint(0, H - cut + 1). lambda is then corrected to the
unboxed area, 1 - box area / (H W) (timm's `correct_lam`, always on with minmax). A draw whose lambda is
exactly 1 leaves its images alone (timm's `if lam != 1`).

Targets are timm's `mixup_target`: one-hot smoothed to on = 1 - e + e/C, off = e/C, then
lambda y + (1 - lambda) y.flip(0) (lambda per sample in `pair`/`elem` mode).

Randomness: a key of its own (`mix_key(seed, step)`), so a run with and without mixing draws the same
dropout and sees the same images before mixing; the draws are jax.random's, so they follow timm's
distributions, not its NumPy stream.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

MODES = ('batch', 'pair', 'elem')
MIX_STREAM = 0x6D6978   # 'mix': the stream mixing draws from, beside the dropout stream of the same step


@dataclass(frozen=True)
class MixupConfig:
    """timm's Mixup arguments (mixup_alpha, cutmix_alpha, cutmix_minmax, prob, switch_prob, mode, correct_lam,
    label_smoothing, num_classes). cutmix_minmax set forces cutmix_alpha = 1, as timm."""
    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: Optional[Tuple[float, float]] = None
    prob: float = 1.0
    switch_prob: float = 0.5
    mode: str = 'batch'
    correct_lam: bool = True
    label_smoothing: float = 0.1
    num_classes: int = 1000

    def __post_init__(self):
        if self.cutmix_minmax is not None:
            object.__setattr__(self, 'cutmix_minmax', tuple(self.cutmix_minmax))
            object.__setattr__(self, 'cutmix_alpha', 1.0)
        if self.mode not in MODES:
            raise ValueError(f'mixup mode {self.mode!r}: one of {", ".join(MODES)}')
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0):
            raise ValueError('one of mixup_alpha > 0, cutmix_alpha > 0, cutmix_minmax must be set')

    @classmethod
    def from_args(cls, args, num_classes: int) -> Optional['MixupConfig']:
        """From the training flags (timm's train.py names), or None when no mixing is asked for."""
        if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
            return None
        return cls(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                   cutmix_minmax=None if args.cutmix_minmax is None else tuple(args.cutmix_minmax),
                   prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                   label_smoothing=args.smoothing, num_classes=num_classes)


def mix_key(seed: int, step):
    """The key the mixing of update `step` draws from (its own stream: fold_in of the run's key)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), MIX_STREAM), step)


def one_hot_smoothed(labels, num_classes: int, smoothing: float):
    """timm's one_hot with off = e/C, on = 1 - e + e/C (float32)."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), jnp.float32(on), jnp.float32(off))


def mixup_target(labels, num_classes: int, lam, smoothing: float = 0.0):
    """timm's mixup_target: lam * y1 + (1 - lam) * y1.flip(0); `lam` a scalar or one per sample."""
    y1 = one_hot_smoothed(labels, num_classes, smoothing)
    lam = jnp.asarray(lam, jnp.float32)
    lam = lam.reshape(-1, 1) if lam.ndim else lam
    return y1 * lam + y1[::-1] * (1.0 - lam)


def draw(key, cfg: MixupConfig, n: int, height: int, width: int):
    """n parameter sets (1 for batch mode, B/2 for pair, B for elem): (lam, use_cutmix, box) with lam the
    drawn lambda (1 where nothing is applied) and box int32 (n, 4) = (yl, yh, xl, xh) of the cut."""
    k_apply, k_switch, k_mix, k_cut, k_y, k_x, k_h, k_w = jax.random.split(key, 8)
    both = cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0
    if both:
        use_cutmix = jax.random.uniform(k_switch, (n,)) < cfg.switch_prob
    else:
        use_cutmix = jnp.full((n,), cfg.cutmix_alpha > 0)
    lam_mix = (jax.random.beta(k_mix, cfg.mixup_alpha, cfg.mixup_alpha, (n,)) if cfg.mixup_alpha > 0
               else jnp.ones((n,)))
    lam_cut = (jax.random.beta(k_cut, cfg.cutmix_alpha, cfg.cutmix_alpha, (n,)) if cfg.cutmix_alpha > 0
               else jnp.ones((n,)))
    lam = jnp.where(use_cutmix, lam_cut, lam_mix).astype(jnp.float32)
    lam = jnp.where(jax.random.uniform(k_apply, (n,)) < cfg.prob, lam, 1.0)
    if cfg.cutmix_minmax is not None:
        lo, hi = cfg.cutmix_minmax
        cut_h = jax.random.randint(k_h, (n,), int(height * lo), int(height * hi))
        cut_w = jax.random.randint(k_w, (n,), int(width * lo), int(width * hi))
        yl = jax.random.randint(k_y, (n,), 0, height - cut_h + 1)
        xl = jax.random.randint(k_x, (n,), 0, width - cut_w + 1)
        box = jnp.stack([yl, yl + cut_h, xl, xl + cut_w], -1)
    else:
        ratio = jnp.sqrt(1.0 - lam)
        cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
        cy = jax.random.randint(k_y, (n,), 0, height)
        cx = jax.random.randint(k_x, (n,), 0, width)
        box = jnp.stack([jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + 1) // 2, 0, height),
                         jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + 1) // 2, 0, width)], -1)
    return lam, use_cutmix, box.astype(jnp.int32)


def _per_sample(v, mode: str, batch: int):
    if mode == 'batch':
        return jnp.broadcast_to(v, (batch,) + v.shape[1:])
    if mode == 'pair':
        return jnp.concatenate([v, v[::-1]], 0)
    return v


def mix(x, labels, cfg: MixupConfig, lam, use_cutmix, box):
    """Apply drawn parameters (see `draw`) to images x (B, H, W, C) and integer labels: (mixed x, soft targets
    (B, num_classes), lam per sample after timm's box correction)."""
    batch, height, width = x.shape[:3]
    active = lam != 1.0
    cut = use_cutmix & active
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    if cfg.correct_lam or cfg.cutmix_minmax is not None:
        lam = jnp.where(cut, 1.0 - area.astype(jnp.float32) / float(height * width), lam)
    lam, cut, box = (_per_sample(v, cfg.mode, batch) for v in (lam, cut, box))
    active = _per_sample(active, cfg.mode, batch)
    other = x[::-1]
    ys = jnp.arange(height)[None, :, None]
    xs = jnp.arange(width)[None, None, :]
    inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None]) &
              (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None]))[..., None]
    lam_b = lam.reshape(-1, 1, 1, 1).astype(x.dtype)
    blended = x * lam_b + other * (1.0 - lam_b)
    out = jnp.where(cut.reshape(-1, 1, 1, 1), jnp.where(inside, other, x),
                    jnp.where(active.reshape(-1, 1, 1, 1), blended, x))
    targets = mixup_target(labels, cfg.num_classes, lam, cfg.label_smoothing)
    return out, targets, lam


def apply(key, cfg: MixupConfig, x, labels):
    """Draw and mix: (images, soft targets, lam per sample). The batch must be even (timm asserts it)."""
    batch, height, width = x.shape[:3]
    n = {'batch': 1, 'pair': batch // 2, 'elem': batch}[cfg.mode]
    return mix(x, labels, cfg, *draw(key, cfg, n, height, width))
