"""A/B of training steps in ONE process: the bench's AdamW step (bench_vs_timm.flax_step) per variant, every
variant compiled first, then alternated round by round (reversed in odd rounds).

    python benchmarks/ab_step.py --rounds 6 \
        'plain|float32||from vit_flax.ops import matmul; matmul.set_f32_grads("plain")' \
        'gemm|float32||matmul.set_f32_grads("gemm")' \
        'ynn dots only|float32|{"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}'

A variant is 'name|dtype|compiler options (json)|python run before it is traced' (dtype float32 or bfloat16;
the compiler options go to `.compile(compiler_options=...)`, XLA's DebugOptions fields, so an XLA flag can be
compared in one process; the python runs in this module's namespace before the trace, as in ab_forward.py).
`--model` and `--batch` pick the case (default the bench's ViT-S/16 step, batch 16). Parameters are random
(drawn from their shapes), the state donated step to step as in the bench; the loss of the first two steps is
printed per variant, so a variant that changes the numbers shows it.

On a shared machine wall times swing by 2x between rounds; the process's CPU time per step (all its threads)
moves much less, so both are printed: per variant the best and the median over rounds (of each round's fastest
of --iters steps, by wall time), and the speed against the first variant as the median (min-max) of the
per-round ratios, with the load average of each round.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('variants', nargs='+', help="'name|dtype|compiler options json|python'")
    ap.add_argument('--model', default='vit_small_patch16_224')
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--rounds', type=int, default=4)
    ap.add_argument('--iters', type=int, default=2, help='steps per variant per round (the fastest counts)')
    a = ap.parse_args(argv)
    import jax
    import bench_vs_timm as bench
    variants = []
    for spec in a.variants:
        name, dtype, opts, setup = (spec.split('|') + ['', '', ''])[:4]
        if setup:
            exec(setup, globals())
        case = bench.Case(name, a.model, 'train', dtype or 'float32', a.batch)
        model, fn, args = bench.flax_step(case)
        t = time.perf_counter()
        compiled = fn.lower(*args).compile(compiler_options=json.loads(opts) if opts else None)
        compile_s = time.perf_counter() - t
        state, x, y = bench.step_inputs_from_shapes(model, args, a.batch)

        def step(c=compiled, st=state, x=x, y=y):
            st[0], st[1], loss = c(st[0], st[1], x, y)
            return float(loss)
        losses = [step(), step()]
        print(f'{name}: compiled in {compile_s:.1f} s, loss {losses[0]:.6f} {losses[1]:.6f}', flush=True)
        variants.append((name, step))
    wall = {n: [] for n, _ in variants}
    cpu = {n: [] for n, _ in variants}
    loads = []
    for r in range(a.rounds):
        load0 = os.getloadavg()[0]
        for name, step in (variants if r % 2 == 0 else variants[::-1]):
            ts = []
            for _ in range(a.iters):
                t, c = time.perf_counter(), time.process_time()
                step()
                ts.append((time.perf_counter() - t, time.process_time() - c))
            w, c = min(ts)
            wall[name].append(w)
            cpu[name].append(c)
        loads.append(max(load0, os.getloadavg()[0]))
        print(f'round {r} (load {loads[-1]:.1f}): ' + ', '.join(f'{n} {wall[n][-1]:.2f} s wall {cpu[n][-1]:.2f} s cpu'
                                                                for n in wall), flush=True)
    base = variants[0][0]
    for label, times in (('wall', wall), ('CPU', cpu)):
        print(f'\n{label} time per step (s): best, median; speed against {base} (median, min-max of the rounds)')
        for name, _ in variants:
            ratios = [b / t for b, t in zip(times[base], times[name])]
            print(f'{name:<24} {min(times[name]):7.3f} {statistics.median(times[name]):7.3f}   '
                  f'{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})'
                  + (f'   {a.batch / min(times[name]):.2f} img/s' if label == 'wall' else ''))
    print(f'load average per round: {" ".join(f"{x:.1f}" for x in loads)} on {os.cpu_count()} cores')
    return 0


if __name__ == '__main__':
    sys.exit(main())
