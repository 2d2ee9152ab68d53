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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('variants', nargs='+', help="'name|model|json overrides|python'")
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--rounds', type=int, default=6)
    ap.add_argument('--iters', type=int, default=2, help='calls per variant per round (the best one counts)')
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
        variants.append((name, call, params, x, flops))
        print(f'{name}: {flops / a.batch / 1e9:.2f} GFLOP/img', flush=True)
    wall = {v[0]: [] for v in variants}
    cpu = {v[0]: [] for v in variants}
    loads = []
    for r in range(a.rounds):
        load0 = os.getloadavg()[0]
        for name, call, params, x, _ in (variants if r % 2 == 0 else variants[::-1]):
            ts = []
            for _ in range(a.iters):
                t, c = time.perf_counter(), time.process_time()
                call(params, x).block_until_ready()
                ts.append((time.perf_counter() - t, time.process_time() - c))
            wall[name].append(min(w for w, _ in ts))
            cpu[name].append(min(c for _, c in ts))
        loads.append(max(load0, os.getloadavg()[0]))
        print(f'round {r} (load {loads[-1]:.1f}): ' + ', '.join(f'{n} {a.batch / wall[n][-1]:.2f} img/s' for n in wall),
              flush=True)
    base = variants[0][0]
    for label, times in (('wall', wall), ('CPU', cpu)):
        print(f'\n{label} time per call (s): best, median; speed against {base} (median, min-max of the rounds)')
        for name, *_, flops in variants:
            ratios = [b / t for b, t in zip(times[base], times[name])]
            print(f'{name:<24} {min(times[name]):7.3f} {statistics.median(times[name]):7.3f}   '
                  f'{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})'
                  + (f'   {a.batch / min(times[name]):.2f} img/s, {flops / min(times[name]) / 1e9:.1f} GFLOP/s'
                     if label == 'wall' else ''))
    print(f'load average per round: {" ".join(f"{x:.1f}" for x in loads)} on {os.cpu_count()} cores')
    return 0


if __name__ == '__main__':
    sys.exit(main())
