"""A/B of training steps in ONE process: the bench's AdamW step (bench_vs_timm.flax_step) per variant, every
variant compiled first, then alternated round by round (reversed in odd rounds).

    python benchmarks/ab_step.py --rounds 6 \
        'plain|float32' 'bf16|bfloat16' \
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
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab_forward  # noqa: E402 - the command line and the alternation


def main(argv=None):
    ap = ab_forward.parser(__doc__, "'name|dtype|compiler options json|python'", batch=16, rounds=4)
    ap.add_argument('--model', default='vit_small_patch16_224')
    a = ap.parse_args(argv)
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
        variants.append((name, step, None))
    ab_forward.alternate(variants, a.rounds, a.iters, a.batch, per='step')
    return 0


if __name__ == '__main__':
    sys.exit(main())
