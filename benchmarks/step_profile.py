"""Where the bench's training step (or, `--forward`, its inference call) spends its time, op by op: jax.profiler
over a few steps, each op's time joined to its optimized-HLO instruction and grouped as hlo_breakdown.py groups
them.

    python benchmarks/step_profile.py [--model vit_small_patch16_224] [--dtype float32] [--batch 16]
        [--steps 4] [--top 30] [--setup 'python run before the trace'] [--json FILE] [--forward]

The step is bench_vs_timm.flax_step's (AdamW, donated state), compiled with XLA:CPU's per-op trace events on
(`--xla_cpu_enable_xprof_traceme`, which slows the step ~1.3x: read the shares, not the sums). The first
traced step is dropped; each op's time is its median over the others (`--stat min` takes the fastest: the
least disturbed on a loaded machine). Printed: the sum by phase (fwd, bwd, other = the optimizer, loss and
input) x model part x kind, by kind and detail (dot dtypes; hlo_breakdown's groups), the slowest ops with
their GFLOP/s and bytes, and the dot map: every top-level dot by the runtime that executes it (a YNNPACK
fusion `ynn`, a plain `dot` thunk = Eigen, or a dot inside an XLA loop fusion) and its contracting dims,
with the ops' summed time. XLA:CPU hands YNNPACK a dot whose lhs is contracted on its last axis (with the
batch axes leading); one contracting the leading axis of both operands (a weight gradient x^T ct, or
attention's p^T do and ds^T q) runs on Eigen, asynchronously, beside the YNNPACK ops on the same cores (so
the YNNPACK ops it overlaps look slower than they are).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import statistics
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_cpu_enable_xprof_traceme=true').strip()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def dot_map(comps, entry, times):
    """{(runtime, batched, 'lc.. rc..', out shape): [count, ms]} over the entry's dots."""
    out = collections.defaultdict(lambda: [0, 0.0])
    for ins in comps[entry]:
        body = comps.get(ins.attr('calls')) if ins.op == 'fusion' else None
        dots = [i for i in (body or [ins]) if i.op == 'dot']
        if not dots:
            continue
        runtime = 'eigen dot' if ins.op == 'dot' else ('ynn' if 'ynn' in ins.name else 'loop fusion')
        d = dots[0]
        lc = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', d.rest).group(1)
        rc = re.search(r'rhs_contracting_dims=\{([\d,]*)\}', d.rest).group(1)
        row = out[(runtime, 'batched' if 'lhs_batch_dims' in d.rest else '2-d', f'lc {lc} rc {rc}',
                   d.shape.split('{')[0])]
        row[0] += 1
        row[1] += times.get(ins.name, 0.0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='vit_small_patch16_224')
    ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--steps', type=int, default=4, help='traced steps (the first is dropped)')
    ap.add_argument('--stat', choices=('median', 'min'), default='median')
    ap.add_argument('--top', type=int, default=30)
    ap.add_argument('--setup', default='', help='python run before the trace (a switch: matmul.set_policy(...))')
    ap.add_argument('--json', help='write the per-op times and groups here')
    ap.add_argument('--forward', action='store_true', help="the bench's inference call instead of the AdamW step")
    a = ap.parse_args(argv)
    import jax
    import bench_vs_timm as bench
    import hlo_breakdown as hb
    if a.setup:
        exec(a.setup, globals())
    mode = 'infer' if a.forward else 'train'
    model, fn, args = bench.flax_step(bench.Case('profile', a.model, mode, a.dtype, a.batch))
    compiled = fn.lower(*args).compile()
    text = compiled.as_text()
    if a.forward:
        params, images = bench.forward_inputs_from_shapes(args)

        def step():
            compiled(params, images).block_until_ready()
    else:
        state, x, y = bench.step_inputs_from_shapes(model, args, a.batch)

        def step():
            state[0], state[1], loss = compiled(state[0], state[1], x, y)
            loss.block_until_ready()
    step()
    bounds = []
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(a.steps):
                t = time.perf_counter()
                step()
                bounds.append((t, time.perf_counter()))
        events = json.load(gzip.open(glob.glob(os.path.join(d, '**', '*perfetto_trace.json.gz'), recursive=True)[0]))
    events = events['traceEvents'] if isinstance(events, dict) else events
    walls = [b - t for t, b in bounds]
    what = 'forward' if a.forward else 'AdamW step'
    print(f'{a.model} {what}, {a.dtype}, batch {a.batch}: traced steps {" ".join(f"{w:.2f}" for w in walls)} s '
          f'(load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)')
    comps, entry = hb.parse(text)
    info = {}
    for c, body in comps.items():
        table = {i.name: i for i in body}
        for ins in body:
            nbytes = hb.shape_bytes(ins.shape) + sum(hb.shape_bytes(table[o].shape) for o in ins.operands if o in table)
            info[ins.name] = (hb.classify(ins, comps, table), hb.where(ins), nbytes, ins.op_name)
    # the steps: the python events of step() (the profiler traces python calls too); the first is dropped
    starts = sorted(e['ts'] for e in events if e.get('ph') == 'X' and e['name'].startswith('$')
                    and e['name'].endswith(' step') and 'step_profile' in e['name'])
    begin = starts[1] if len(starts) > 1 else 0
    per = collections.defaultdict(list)
    for e in events:
        if e.get('ph') == 'X' and e['name'] in info and e['ts'] >= begin:
            per[e['name']].append(e['dur'] / 1e3)
    n_steps = max(len(starts) - 1, 1)
    stat = min if a.stat == 'min' else statistics.median
    times = {n: stat(v) * len(v) / n_steps for n, v in per.items()}   # an op run k times a step counts k times
    by_where, by_kind = collections.Counter(), collections.Counter()
    for n, t in times.items():
        (g, detail, _), (phase, part), _, _ = info[n]
        by_where[(phase, part, g)] += t
        by_kind[(g, detail)] += t
    total = sum(times.values())
    print(f'sum of op times {total:.0f} ms a step ({a.stat} over {n_steps} steps; async ops overlap others)\n')
    print('by phase, part, kind (ms, share):')
    for (phase, part, g), t in by_where.most_common():
        if t >= 0.5:
            print(f'  {t:8.1f} {100 * t / total:5.1f}%  {phase:5s} {part:22s} {g}')
    print('\nby kind and detail:')
    for (g, detail), t in by_kind.most_common():
        if t >= 0.5:
            print(f'  {t:8.1f} {100 * t / total:5.1f}%  {g:11s} {detail}')
    print('\ndots by runtime (count, ms a step):')
    for (rt, batched, dims, shape), (count, t) in sorted(dot_map(comps, entry, times).items()):
        print(f'  {count:4d} {t:8.1f}  {rt:11s} {batched:7s} {dims:12s} {shape}')
    print(f'\nslowest {a.top} ops:')
    for n, t in sorted(times.items(), key=lambda kv: -kv[1])[:a.top]:
        (g, detail, flops), (phase, part), nbytes, op_name = info[n]
        rate = f'{flops / t / 1e6:6.1f} GFLOP/s' if flops else ' ' * 14
        print(f'  {t:7.1f} ms {rate} {nbytes / 1e6:7.1f} MB  {n:26s} {g:11s} {phase} {part}  {op_name[-70:]}')
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(walls=walls, times=times, by_where={' '.join(k): v for k, v in by_where.items()},
                           by_kind={' '.join(k): v for k, v in by_kind.items()}), f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
