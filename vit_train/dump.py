"""`--dump-batches N`: the first N training batches as the model sees them, then exit without training.

WORKDIR/batches.npz holds `images` float32 (N*B, H, W, 3) after every augmentation, random erasing and the
mixing, de-normalised back to [0, 1] units (x * std + mean: erased boxes' N(0, 1) noise may lie outside [0, 1];
the sheet clips it), `targets` float32 (N*B, num_classes) the soft targets the loss is given, `labels`
int32 (N*B,) the original labels, `class_names`. The erasing and mixing are the train step's own (`step.make_prepare`
with the same seed and update numbers 0..N-1), so these are the batches of the run's first N updates.
WORKDIR/batches.png is a contact sheet: each image with its label and its top-2 target classes and weights.
"""
import io

import jax
import jax.numpy as jnp
import numpy as np

from converters.formats import paths

from . import step as steps
from .errors import TrainError

SHEET_COLUMNS = 8
TILE = 96   # pixels per image on the sheet (nearest-neighbour upscaling of small images)


def dump_batches(args, it, class_names, num_classes, mix_cfg, log, mean, std) -> dict:
    """`it`: the run's training iterator (host batches); `mean`, `std`: the run's normalisation."""
    if jax.process_count() > 1:
        raise TrainError('--dump-batches: run it in one process (the mixing pairs rows across the global batch)')
    prep = steps.make_prepare(num_classes, mean=mean, std=std, smoothing=args.smoothing, mix=mix_cfg,
                              seed=args.seed, erase_mode=args.remode if args.reprob else None)

    @jax.jit
    def prepare(batch, step):
        x, t = prep(batch, step)
        return steps.denormalize(x, mean, std), t
    images, targets, labels = [], [], []
    for s in range(args.dump_batches):
        b = next(it)
        x, t = prepare({k: jnp.asarray(v) for k, v in b.items()}, jnp.int32(s))
        images.append(np.asarray(x, np.float32))
        targets.append(np.asarray(t, np.float32))
        labels.append(np.asarray(b['label'], np.int32))
    images, targets, labels = (np.concatenate(v) for v in (images, targets, labels))
    paths.makedirs(args.workdir)
    npz, png = paths.join(args.workdir, 'batches.npz'), paths.join(args.workdir, 'batches.png')
    for out, write in ((npz, lambda f: np.savez(f, images=images, targets=targets, labels=labels,
                                                 class_names=np.array(class_names))),
                       (png, lambda f: contact_sheet(images, targets, labels, class_names).save(f, format='PNG'))):
        buf = io.BytesIO()
        write(buf)
        paths.write_bytes(out, buf.getvalue())
    log(f'dump: {args.dump_batches} batch(es), {len(labels)} images as the model sees them (mixing '
        f'{"on" if mix_cfg is not None else "off"}) -> {npz} and {png}; no training')
    return dict(npz=npz, png=png, images=images, targets=targets, labels=labels)


def contact_sheet(images, targets, labels, class_names, columns: int = SHEET_COLUMNS, tile: int = TILE):
    """A PIL image: one tile per image, captioned 'y=<label>' and its two largest target weights."""
    from PIL import Image, ImageDraw
    n = len(images)
    rows = -(-n // columns)
    cap = 26
    sheet = Image.new('RGB', (columns * tile, rows * (tile + cap)), 'white')
    draw = ImageDraw.Draw(sheet)
    name = lambda c: str(class_names[c]) if c < len(class_names) else str(c)  # noqa: E731
    for i in range(n):
        r, c = divmod(i, columns)
        img = Image.fromarray(np.clip(np.round(images[i] * 255), 0, 255).astype(np.uint8))
        sheet.paste(img.resize((tile, tile), Image.NEAREST), (c * tile, r * (tile + cap)))
        top = np.argsort(-targets[i])[:2]
        y0 = r * (tile + cap) + tile
        draw.text((c * tile + 2, y0), f'y={name(labels[i])}', fill='black')
        draw.text((c * tile + 2, y0 + 12), ' '.join(f'{name(k)}:{targets[i][k]:.2f}' for k in top), fill='blue')
    return sheet
