"""A/B of forward passes in ONE process: every variant compiled first, then alternated round by round.

    python benchmarks/ab_forward.py --batch 8 --rounds 8 \
        'dino|vit_base_patch16_dinov3|{"depth": 4}' \
        'norope|vit_base_patch16_dinov3|{"depth": 4, "use_rot_pos_emb": false}' \
        'f32 policy|vit_base_patch16_dinov3|{"depth": 4}|from vit_flax.ops import matmul; matmul.set_policy("float32")'

A variant is 'name|model|json overrides of create_model|python run before it is traced' (the overrides may set
"dtype": "float32"; the default is bfloat16). The python runs in this module's namespace before the variant's
trace, so a switch read while tracing (the bf16 matmul policy, a module flag) takes effect for that variant and
stays set for the next ones unless they set it again. Parameters are random (drawn from the shapes), the input
random; each variant's call is compiled ahead.

On a shared machine wall times swing by 2x between rounds; the process's CPU time per call (all its threads)
moves much less, so both are printed: per variant the best and the median over rounds (of each round's best of
--iters calls), and the speed against the first variant as the median (min-max) of the per-round ratios, with
the load average of each round (os.getloadavg, sampled before and after it; the larger is shown).
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def parser(doc, variant_help, batch, rounds):
    """The A/B scripts' command line: the variants, --batch, --rounds, --iters."""
    ap = argparse.ArgumentParser(description=doc.split('\n')[0])
    ap.add_argument('variants', nargs='+', help=variant_help)
    ap.add_argument('--batch', type=int, default=batch)
    ap.add_argument('--rounds', type=int, default=rounds)
    ap.add_argument('--iters', type=int, default=2, help='calls per variant per round (the fastest counts)')
    return ap


def alternate(variants, rounds, iters, batch, per='call'):
    """Time `variants` ((name, run, flops or None), `run()` one blocking call) alternated round by round, reversed
    in odd rounds; print each round, then per variant the best and median wall and CPU times and the speed against
    the first as the median (min-max) of the per-round ratios, with each round's load average."""
    wall = {v[0]: [] for v in variants}
    cpu = {v[0]: [] for v in variants}
    loads = []
    for r in range(rounds):
        load0 = os.getloadavg()[0]
        for name, run, _ in (variants if r % 2 == 0 else variants[::-1]):
            ts = []
            for _ in range(iters):
                t, c = time.perf_counter(), time.process_time()
                run()
                ts.append((time.perf_counter() - t, time.process_time() - c))
            w, c = min(ts)
            wall[name].append(w)
            cpu[name].append(c)
        loads.append(max(load0, os.getloadavg()[0]))
        print(f'round {r} (load {loads[-1]:.1f}): ' + ', '.join(f'{n} {wall[n][-1]:.3f} s wall {cpu[n][-1]:.3f} s cpu'
                                                                for n in wall), flush=True)
    base = variants[0][0]
    for label, times in (('wall', wall), ('CPU', cpu)):
        print(f'\n{label} time per {per} (s): best, median; speed against {base} (median, min-max of the rounds)')
        for name, _, flops in variants:
            ratios = [b / t for b, t in zip(times[base], times[name])]
            best = min(times[name])
            print(f'{name:<24} {best:7.3f} {statistics.median(times[name]):7.3f}   '
                  f'{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})'
                  + (f'   {batch / best:.2f} img/s' if label == 'wall' else '')
                  + (f', {flops / best / 1e9:.1f} GFLOP/s' if label == 'wall' and flops else ''))
    print(f'load average per round: {" ".join(f"{x:.1f}" for x in loads)} on {os.cpu_count()} cores')


def main(argv=None):
    ap = parser(__doc__, "'name|model|json overrides|python'", batch=8, rounds=6)
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np
    import vit_flax
    from vit_flax.summary import jaxpr_macs
    variants = []
    for spec in a.variants:
        name, model_name, kw, setup = (spec.split('|') + ['', ''])[:4]
        kw = json.loads(kw or '{}')
        kw['dtype'] = jnp.dtype(kw.get('dtype', 'bfloat16'))
        if setup:
            exec(setup, globals())
        model = vit_flax.create_model(model_name, **kw)
        shapes = vit_flax.summary.param_shapes(model)
        rng = np.random.default_rng(0)
        params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.02, s.dtype), shapes)
        x = jnp.asarray(rng.standard_normal((a.batch,) + tuple(model.input_shape)), jnp.float32)
        fn = jax.jit(lambda p, x, m=model: m.apply({'params': p}, x, train=False))
        flops = 2 * jaxpr_macs(jax.make_jaxpr(fn)(shapes, jax.ShapeDtypeStruct(x.shape, x.dtype)).jaxpr)
        call = fn.lower(params, x).compile()
        call(params, x).block_until_ready()
        variants.append((name, lambda c=call, p=params, x=x: c(p, x).block_until_ready(), flops))
        print(f'{name}: {flops / a.batch / 1e9:.2f} GFLOP/img', flush=True)
    alternate(variants, a.rounds, a.iters, a.batch)
    return 0


if __name__ == '__main__':
    sys.exit(main())
