"""Images per second of the training input pipeline: ours (grain) from an image folder and from packed
ArrayRecord shards, against timm's create_loader (torch DataLoader), on the same synthetic JPEG set.

The set: ImageNet-like JPEGs (quality 90, sides drawn around 500x375: width 400-600, height 300-450, smooth
random content so they compress like photos), in class folders, made once under --root and packed there.
Each pipeline: RandomResizedCrop(224, scale 0.08-1, bilinear) + horizontal flip, uint8 batches out (both
normalise on the device: ours in the jitted step, timm in its prefetcher, which is left out here), the same
batch size and the same worker count (default: the cores this process may use). Each measurement runs in its
own process; the kinds alternate over --rounds and the median is reported, with the ratio to timm and the
images/s per core. Figures on a shared machine are noisy: read them as ratios.

    python benchmarks/bench_data.py [--images 800 --batch 64 --batches 12 --rounds 3 --workers N]
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


def measure(kind: str, path: str, batch: int, batches: int, workers: int) -> float:
    """Images/s over `batches` batches after warm-up batches, one per worker and one more (each worker process
    starts, imports and opens its files on its first batch: start-up, not throughput)."""
    if kind.startswith('ours'):
        from vit_train import data
        ds = data.load('packed' if kind == 'ours-shards' else 'folder', path, VAL, verify='size')
        tf = data.TrainTransform(224, 'bilinear', (0.08, 1.0), hflip=True)
        it = data.train_iterator(ds.train, tf, batch=batch, seed=0, process_index=0, process_count=1,
                                 workers=workers)
        take = lambda: next(it)['image']  # noqa: E731
    else:
        import torch
        from timm.data import ImageDataset, create_loader
        loader = create_loader(ImageDataset(path), input_size=(3, 224, 224), batch_size=batch, is_training=True,
                               scale=(0.08, 1.0), hflip=0.5, color_jitter=None, interpolation='bilinear',
                               num_workers=workers, use_prefetcher=True, device=torch.device('cpu'),
                               persistent_workers=True)
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
    p.add_argument('--child', choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument('--path', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(a.child, a.path, a.batch, a.batches, a.workers)))
        return
    folder = make_set(a.root, a.images)
    shards = packed_set(folder)
    paths = {'ours-folder': folder, 'ours-shards': shards, 'timm-folder': folder}
    got = {k: [] for k in KINDS}
    for r in range(a.rounds):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):   # alternated: drift hits every kind alike
            out = subprocess.run([sys.executable, __file__, '--child', kind, '--path', paths[kind], '--batch',
                                  str(a.batch), '--batches', str(a.batches), '--workers', str(a.workers)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f'{kind}: failed\n{out.stderr[-2000:]}')
            got[kind].append(float(out.stdout.strip().splitlines()[-1]))
            print(f'round {r + 1} {kind}: {got[kind][-1]:.1f} img/s', file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f'\ninput pipeline, {a.images} JPEGs ~500x375 q90, RandomResizedCrop 224 + flip, batch {a.batch}, '
          f'{a.workers} worker(s), {host_cores()} core(s), median of {a.rounds} rounds:')
    print(f'| pipeline | images/s | per worker | vs timm |\n|---|---:|---:|---:|')
    for k in KINDS:
        print(f'| {k} | {med[k]:.1f} | {med[k] / max(a.workers, 1):.1f} | {med[k] / med["timm-folder"]:.2f}x |')


if __name__ == '__main__':
    main()
