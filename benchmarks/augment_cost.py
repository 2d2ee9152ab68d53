"""Host cost of the training augmentation per image: vit_train's pipeline against timm's create_transform on the
same images, each side in a process of its own, the two alternated over rounds.

    python benchmarks/augment_cost.py [--images 64] [--size 224] [--src 320x256] [--rounds 3]
        [--aa rand-m9-mstd0.5-inc1] [--reprob 0.25] [--remode pixel] [--color-jitter 0.4] [--interpolation bicubic]

Both sides start from the same decoded PIL images (made here: smooth colour fields plus noise, --src wide x high)
and do the whole host share of a training example:
- timm: create_transform(size, is_training=True, auto_augment=aa, interpolation, re_prob, re_mode,
  color_jitter) called on the image: RandomResizedCrop + flip, the policy, ToTensor + Normalize and
  RandomErasing, all on the CPU (torch with one thread, as in a DataLoader worker). Pillow 13 makes timm's
  posterize at 0 bits raise; the timm worker patches ImageOps.posterize to return the all-black image older
  Pillow returned (what ours does), or the run would die within a few hundred images.
- ours: data.TrainTransform with augment.TrainAugment (crop + flip, the policy, the erasing boxes) called as
  grain calls it (the element's numpy Generator), out to the uint8 array the device receives; the
  normalisation and the erasing fill run on the device inside the step and are not counted.
Each process: one warm-up pass, then every image once per timed pass; a round's cost is the median pass over
--passes, in ms per image. Printed: per round and the median over rounds for each side, and the ratio
ours / timm (< 1: ours is cheaper), the median of the per-round ratios. Rows for the crop + flip alone
(no policy, no jitter, no erasing) show what the augmentation itself adds. The machine is shared and noisy:
only the ratios of back-to-back processes mean much.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n, w, h):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        c = rng.uniform(0, 255, (3, 3))
        field = sum(c[:, k][None, None, :] * f[..., None] for k, f in
                    enumerate((np.sin(6 * xx + rng.uniform(0, 6)) ** 2, np.cos(5 * yy) ** 2, xx * yy)))
        img = np.clip(field / 1.5 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    return out


def worker(side, a):
    import numpy as np
    w, h = (int(v) for v in a.src.split('x'))
    images = _images(a.images, w, h)
    aa = a.aa or None
    if side == 'timm':
        import torch
        torch.set_num_threads(1)
        from PIL import ImageOps
        from timm.data import create_transform
        posterize = ImageOps.posterize
        # Pillow 13 refuses the posterize(img, 0) timm asks for (~3% of PosterizeIncreasing calls at m9 mstd0.5):
        # give timm what older Pillow gave (all black), as vit_train.augment does, so the run survives
        ImageOps.posterize = lambda img, bits: img.point([0] * 256 * len(img.getbands())) if bits < 1 \
            else posterize(img, bits)
        tf = create_transform(a.size, is_training=True, auto_augment=aa, interpolation=a.interpolation,
                              re_prob=a.reprob, re_mode=a.remode, color_jitter=a.color_jitter or None)
        fn = tf
    else:
        sys.path.insert(0, ROOT)
        from vit_train import augment, data
        aug = augment.TrainAugment(aa, a.color_jitter, a.reprob, 1, a.size, (0.485, 0.456, 0.406), a.interpolation)
        tf = data.TrainTransform(a.size, a.interpolation, (0.08, 1.0), hflip=True, augment=aug)

        def fn(img, _k=[0]):
            _k[0] += 1
            return tf({'image': np.asarray(img), 'label': 0}, np.random.Generator(np.random.Philox(_k[0])))
    for img in images:  # warm-up
        fn(img)
    passes = []
    for _ in range(a.passes):
        t = time.perf_counter()
        for img in images:
            fn(img)
        passes.append((time.perf_counter() - t) / len(images) * 1e3)
    print(json.dumps(statistics.median(passes)))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--images', type=int, default=64)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--src', default='320x256', help='source image size WxH (default 320x256)')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--passes', type=int, default=3)
    p.add_argument('--aa', default='rand-m9-mstd0.5-inc1')
    p.add_argument('--reprob', type=float, default=0.25)
    p.add_argument('--remode', default='pixel')
    p.add_argument('--color-jitter', type=float, default=0.4)
    p.add_argument('--interpolation', default='bicubic')
    p.add_argument('--worker', choices=('ours', 'timm'))
    p.add_argument('--plain', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        if a.plain:
            a.aa, a.reprob, a.color_jitter = '', 0.0, 0.0
        return worker(a.worker, a)
    base = [sys.executable, os.path.abspath(__file__)] + [f'--{k.replace("_", "-")}={v}' for k, v in vars(a).items()
                                                        if k not in ('worker', 'plain', 'rounds')]
    rows = {}
    for label, extra in (('DeiT augmentation', []), ('crop + flip only', ['--plain'])):
        got = {'ours': [], 'timm': []}
        for r in range(a.rounds):
            for side in (('ours', 'timm') if r % 2 == 0 else ('timm', 'ours')):
                out = subprocess.run(base + extra + ['--worker', side], capture_output=True, text=True, cwd=ROOT,
                                     env=dict(os.environ, OMP_NUM_THREADS='1'))
                if out.returncode:
                    sys.exit(f'{side} worker failed:\n{out.stderr[-2000:]}')
                got[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f'{label}: round {r + 1}: ours {got["ours"][-1]:.2f} ms/image, timm {got["timm"][-1]:.2f} ms/image',
                  flush=True)
        rows[label] = got
    print(f'\n{a.images} images {a.src} -> {a.size}, --aa {a.aa} --reprob {a.reprob} --remode {a.remode} '
          f'(color jitter {a.color_jitter} applies only without --aa), {a.interpolation}; median of {a.rounds} rounds')
    print(f'{"":24s} {"ours ms/img":>12s} {"timm ms/img":>12s} {"ours/timm":>10s}')
    for label, got in rows.items():
        ratio = statistics.median(o / t for o, t in zip(got['ours'], got['timm']))
        print(f'{label:24s} {statistics.median(got["ours"]):12.2f} {statistics.median(got["timm"]):12.2f} {ratio:10.2f}')


if __name__ == '__main__':
    main()
