"""Images per second of the training input pipeline: ours (grain) from an image folder and from packed
ArrayRecord shards, against timm's create_loader (torch DataLoader), on the same synthetic JPEG set.

The set: ImageNet-like JPEGs (quality 90, sides drawn around 500x375: width 400-600, height 300-450, smooth
random content so they compress like photos), in class folders, made once under --root and packed there.
Two augmentations (--aug, default both):
- crop: RandomResizedCrop(224, scale 0.08-1, bilinear) + horizontal flip;
- deit: DeiT's host side: RandomResizedCrop(224, bicubic) + flip + RandAugment rand-m9-mstd0.5-inc1 (color
  jitter 0.3 given, which both drop under a policy, as timm does), random erasing 0.25 (pixel, 1 box), ImageNet
  mean. timm gets them as create_loader(auto_augment=..., re_prob=0.25, ...); its random erasing runs in the
  prefetcher, on the device, as ours fills its boxes in the jitted step (ours draws the boxes on the host), and
  mixup/cutmix are on the device for both: neither is part of a loader.
uint8 batches out (both normalise on the device: ours in the jitted step, timm in its prefetcher, which is left
out here), the same batch size and the same worker count (default: the cores this process may use). Each
measurement runs in its own process; the kinds alternate over --rounds and the median is reported, with the
ratio to timm (same augmentation) and the images/s per worker. Figures on a shared machine are noisy: read
them as ratios.

    python benchmarks/bench_data.py [--images 800 --batch 64 --batches 12 --rounds 3 --workers N --aug both]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VAL = 0.1  # a folder needs a validation split; the timed train split is the same 90% for ours
KINDS = ('ours-folder', 'ours-shards', 'timm-folder')
AUGS = ('crop', 'deit')
DEIT_AA, DEIT_REPROB, DEIT_JITTER = 'rand-m9-mstd0.5-inc1', 0.25, 0.3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def make_set(root: str, n: int, classes: int = 10, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image
    folder = os.path.join(root, f'jpeg-{n}')
    if os.path.isdir(folder) and sum(len(fs) for _, _, fs in os.walk(folder)) >= n:
        return folder
    rng = np.random.default_rng(seed)
    for i in range(n):
        w, h = int(rng.integers(400, 601)), int(rng.integers(300, 451))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)   # smooth: compresses like a photo
        d = os.path.join(folder, f'c{i % classes}')
        os.makedirs(d, exist_ok=True)
        img.save(os.path.join(d, f'{i:06d}.jpg'), quality=90)
    return folder


def packed_set(folder: str) -> str:
    from vit_train import pack, records
    dst = folder + '-packed'
    if not records.has_manifest(dst):
        pack.pack(folder, dst, force=True, val_split=VAL, progress=False)
    return dst


def measure(kind: str, path: str, batch: int, batches: int, workers: int, aug: str = 'crop') -> float:
    """Images/s over `batches` batches after warm-up batches, one per worker and one more (each worker process
    starts, imports and opens its files on its first batch: start-up, not throughput)."""
    if kind.startswith('ours'):
        from vit_train import data
        ds = data.load('packed' if kind == 'ours-shards' else 'folder', path, VAL, verify='size')
        if aug == 'deit':
            from vit_train import augment
            policy = augment.TrainAugment(DEIT_AA, DEIT_JITTER, DEIT_REPROB, 1, 224, IMAGENET_MEAN, 'bicubic')
            tf = data.TrainTransform(224, 'bicubic', (0.08, 1.0), hflip=True, augment=policy)
        else:
            tf = data.TrainTransform(224, 'bilinear', (0.08, 1.0), hflip=True)
        it = data.train_iterator(ds.train, tf, batch=batch, seed=0, process_index=0, process_count=1,
                                 workers=workers)
        take = lambda: next(it)['image']  # noqa: E731
    else:
        import torch
        from timm.data import ImageDataset, create_loader
        extra = dict(color_jitter=None, interpolation='bilinear')
        if aug == 'deit':
            from PIL import ImageOps
            posterize = ImageOps.posterize
            # Pillow 13 refuses the posterize(img, 0) timm asks for (~3% of PosterizeIncreasing calls at m9
            # mstd0.5): give timm what older Pillow gave (all black), as vit_train.augment does (the workers are
            # forked, so they inherit it), or the loader dies within a few hundred images
            ImageOps.posterize = lambda img, bits: img.point([0] * 256 * len(img.getbands())) if bits < 1 \
                else posterize(img, bits)
            extra = dict(color_jitter=DEIT_JITTER, auto_augment=DEIT_AA, re_prob=DEIT_REPROB, re_mode='pixel',
                         re_count=1, interpolation='bicubic', mean=IMAGENET_MEAN, std=IMAGENET_STD)
        loader = create_loader(ImageDataset(path), input_size=(3, 224, 224), batch_size=batch, is_training=True,
                               scale=(0.08, 1.0), hflip=0.5, num_workers=workers, use_prefetcher=True,
                               device=torch.device('cpu'), persistent_workers=True, **extra)
        raw = getattr(loader, 'loader', loader)   # the DataLoader of uint8 tensors, before the prefetcher
        gen = iter(raw)

        def take():
            nonlocal gen
            try:
                return next(gen)[0]
            except StopIteration:
                gen = iter(raw)
                return next(gen)[0]
    for _ in range(workers + 1):
        take()
    t0 = time.perf_counter()
    for _ in range(batches):
        x = take()
    assert tuple(x.shape[-3:]) in ((224, 224, 3), (3, 224, 224)), x.shape
    return batches * batch / (time.perf_counter() - t0)


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--root', default=os.path.join(os.environ.get('TMPDIR', '/tmp'), 'vit-flax-bench-data'))
    p.add_argument('--images', type=int, default=800)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--batches', type=int, default=10, help='timed batches per measurement')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--workers', type=int, default=host_cores())
    p.add_argument('--aug', choices=AUGS + ('both',), default='both', help='crop + flip, DeiT\'s, or both')
    p.add_argument('--child', choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument('--path', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.path, a.batch, a.batches, a.workers, a.aug)))
        return
    folder = make_set(a.root, a.images)
    shards = packed_set(folder)
    paths = {'ours-folder': folder, 'ours-shards': shards, 'timm-folder': folder}
    augs = AUGS if a.aug == 'both' else (a.aug,)
    runs = [(kind, aug) for aug in augs for kind in KINDS]
    got = {r: [] for r in runs}
    for r in range(a.rounds):
        for kind, aug in (runs if r % 2 == 0 else runs[::-1]):   # alternated: drift hits every kind alike
            out = subprocess.run([sys.executable, __file__, '--child', kind, '--aug', aug, '--path', paths[kind],
                                  '--batch', str(a.batch), '--batches', str(a.batches), '--workers', str(a.workers)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f'{kind} {aug}: failed\n{out.stderr[-2000:]}')
            got[kind, aug].append(float(out.stdout.strip().splitlines()[-1]))
            print(f'round {r + 1} {kind} {aug}: {got[kind, aug][-1]:.1f} img/s', file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    load = os.getloadavg()[0] if hasattr(os, 'getloadavg') else float('nan')
    print(f'\ninput pipeline, {a.images} JPEGs ~500x375 q90, batch {a.batch}, {a.workers} worker(s), '
          f'{host_cores()} core(s), median of {a.rounds} rounds, load average {load:.1f} at the end:')
    print(f'| augmentation | pipeline | images/s | per worker | vs timm |\n|---|---|---:|---:|---:|')
    for kind, aug in runs:
        m = med[kind, aug]
        print(f'| {aug} | {kind} | {m:.1f} | {m / max(a.workers, 1):.1f} | {m / med["timm-folder", aug]:.2f}x |')


if __name__ == '__main__':
    main()
