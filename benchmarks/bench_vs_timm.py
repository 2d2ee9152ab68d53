"""Forward throughput of vit-flax (jit) against timm on the same machine, printed as ratios.

    python benchmarks/bench_vs_timm.py [--models vit_base_patch16_224 swin_tiny_patch4_window7_224] [--batch 8]

float32: both frameworks in float32. bf16: Flax with dtype=bfloat16 (f32 accumulation), timm under
torch.autocast(bfloat16). Ratio > 1 means Flax is faster. Weights are random; nothing is downloaded.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import vit_flax


def best_of(fn, iters: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench(name: str, batch: int, iters: int):
    import timm
    rows = []
    tm = timm.create_model(name, pretrained=False).eval()
    model = vit_flax.create_model(name)
    params = vit_flax.init_params(model)
    x = np.random.default_rng(0).standard_normal((batch,) + tuple(model.input_shape)).astype(np.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    for mode in ('float32', 'bf16'):
        fm = vit_flax.create_model(name, dtype=jnp.bfloat16 if mode == 'bf16' else jnp.float32)
        fwd = jax.jit(lambda p, x, fm=fm: fm.apply({'params': p}, x, train=False))
        xj = jnp.asarray(x)
        t_flax = best_of(lambda: fwd(params, xj).block_until_ready(), iters)

        def run_timm():
            with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=(mode == 'bf16')):
                tm(xt)
        t_timm = best_of(run_timm, iters)
        rows.append((name, mode, batch / t_flax, batch / t_timm))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=['vit_base_patch16_224', 'swin_tiny_patch4_window7_224'])
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--iters', type=int, default=5)
    a = p.parse_args()
    print(f'devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  batch {a.batch}')
    print(f'{"model":<32} {"mode":<8} {"flax img/s":>11} {"timm img/s":>11} {"flax/timm":>10}')
    for name in a.models:
        if name not in vit_flax.list_models():
            print(f'{name:<32} not registered, skipped')
            continue
        for model, mode, f, t in bench(name, a.batch, a.iters):
            print(f'{model:<32} {mode:<8} {f:11.2f} {t:11.2f} {f / t:10.2f}x')


if __name__ == '__main__':
    main()
