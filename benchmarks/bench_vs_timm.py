"""Forward throughput of vit-flax (jit) against timm on the same machine, printed as ratios.

    python benchmarks/bench_vs_timm.py [--models vit_base_patch16_224 swin_tiny_patch4_window7_224] [--batch 8]

float32: both frameworks in float32. bf16: Flax with dtype=bfloat16 (f32 accumulation), timm under
torch.autocast(bfloat16). Ratio > 1 means Flax is faster. Weights are random; nothing is downloaded.
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np


def best_of(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_flax(name: str, mode: str, batch: int, iters: int) -> float:
    import jax
    import jax.numpy as jnp
    import vit_flax
    model = vit_flax.create_model(name, dtype=jnp.bfloat16 if mode == 'bf16' else jnp.float32)
    params = vit_flax.init_params(vit_flax.create_model(name))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch,) + tuple(model.input_shape)), jnp.float32)
    fwd = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
    return batch / best_of(lambda: fwd(params, x).block_until_ready(), iters)


def run_timm(name: str, mode: str, batch: int, iters: int) -> float:
    import timm
    import torch
    tm = timm.create_model(name, pretrained=False).eval()
    h, w = tm.patch_embed.img_size
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, h, w)).astype(np.float32))

    def fwd():
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=(mode == 'bf16')):
            tm(x)
    return batch / best_of(fwd, iters)


def measure(framework: str, name: str, mode: str, batch: int, iters: int) -> float:
    """Each measurement in its own process: JAX's and torch's thread pools slow each other down."""
    out = subprocess.run([sys.executable, __file__, '--worker', framework, '--models', name, '--mode', mode,
                          '--batch', str(batch), '--iters', str(iters)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f'{framework} {name} {mode} failed: {out.stderr.strip().splitlines()[-1]}')
    return float(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['vit_base_patch16_224', 'swin_tiny_patch4_window7_224'])
    p.add_argument('--modes', nargs='+', default=['float32', 'bf16'])
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--iters', type=int, default=5)
    p.add_argument('--worker', choices=('flax', 'timm'), help=argparse.SUPPRESS)
    p.add_argument('--mode', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        fn = run_flax if a.worker == 'flax' else run_timm
        print(fn(a.models[0], a.mode, a.batch, a.iters))
        return
    print(f'batch {a.batch}, median of {a.iters} after warm-up, each framework in its own process, '
          f'{os.cpu_count()} CPU cores')
    print(f'{"model":<32} {"mode":<8} {"flax img/s":>11} {"timm img/s":>11} {"flax/timm":>10}')
    for name in a.models:
        for mode in a.modes:
            f = measure('flax', name, mode, a.batch, a.iters)
            t = measure('timm', name, mode, a.batch, a.iters)
            print(f'{name:<32} {mode:<8} {f:11.2f} {t:11.2f} {f / t:10.2f}x', flush=True)


if __name__ == '__main__':
    main()
