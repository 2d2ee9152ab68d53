"""timm's RandomErasing fill, on the device, applied to the normalised batch inside the jitted step.

The host draws each image's boxes with timm's rule and timm's draws (`vit_train.augment.erase_boxes`, in the
grain workers) and a 32-bit seed for the noise; this fills them, as timm's prefetcher does on the GPU after
normalising: `const` writes 0 (the mean colour), `rand` one N(0, 1) value per box and channel, `pixel` N(0, 1)
per pixel and channel, in normalised units. Boxes are written in order (a later one over an earlier one), as
timm writes them. The noise comes from jax.random (timm's from torch's generator): the same distribution, and a
function of the element's seed only, so a resumed or multi-process run erases with the same noise.
"""
import jax
import jax.numpy as jnp

MODES = ('const', 'rand', 'pixel')


def erase(x, boxes, seeds, mode: str):
    """x: float (B, H, W, C) normalised images; boxes: int32 (B, K, 4) rows (top, left, h, w), h = 0 for none;
    seeds: uint32 (B,). Returns x with every box filled."""
    if mode not in MODES:
        raise ValueError(f'erasing mode {mode!r} is not one of {", ".join(MODES)}')
    _, H, W, C = x.shape
    rows, cols = jnp.arange(H)[:, None], jnp.arange(W)[None, :]

    def one(img, bx, seed):
        key = jax.random.PRNGKey(seed)
        for k in range(bx.shape[0]):
            top, left, h, w = bx[k, 0], bx[k, 1], bx[k, 2], bx[k, 3]
            inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
            if mode == 'const':
                fill = jnp.zeros((), img.dtype)
            else:
                shape = (C,) if mode == 'rand' else (H, W, C)
                fill = jax.random.normal(jax.random.fold_in(key, k), shape, jnp.float32).astype(img.dtype)
            img = jnp.where(inside[:, :, None], fill, img)
        return img

    return jax.vmap(one)(x, boxes, seeds)
