"""Speed of vit-flax against timm on this machine: inference and AdamW training steps, float32 and bf16.

    make bench                                    # every case, 3 rounds (python benchmarks/bench_vs_timm.py)
    python benchmarks/bench_vs_timm.py --quick    # CI-sized: 1 round, small batches, ViT-L compile only
    python benchmarks/bench_vs_timm.py --cases vit_b16_infer_f32 --rounds 5 --peers --json out.json

Every measurement runs in a process of its own (one framework's idle thread pool slows the other's), and
the frameworks alternate within each round (Flax first in even rounds, timm first in odd ones). A round
gives images/s = batch / median step time; the table shows the median over rounds with the spread
(min-max) and the ratio Flax/timm as the median of the per-round ratios (each from a back-to-back pair).

bf16: Flax with dtype=bfloat16 (float32 params and accumulation); timm under torch.autocast(bfloat16).
Training: one step = forward, cross-entropy, backward, AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8,
weight decay 0.05 on every parameter) on both sides; Flax's step is jitted with params and optimizer
state donated. Weights are random; nothing is downloaded.

MFU: model FLOPs (multiply-adds x 2, counted from the traced Flax step; the same for both frameworks)
per second over this machine's matmul rate, measured here per dtype by a large GEMM in each framework:
the float32 rate is the better of the two float32 GEMMs; the bf16 rate the best way either framework
multiplies bf16 matrices with float32 accumulation (its bf16 GEMM, or its float32 GEMM on the exactly
widened operands, which is what vit-flax does on a CPU without bf16 instructions).

Compile: Flax's trace+lower+compile time (AOT); for eager timm the extra time of its first call.
Peak memory: the peak RSS of the worker process (framework runtime included).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    mode: str      # infer | train
    dtype: str     # float32 | bfloat16
    batch: int


CASES = [
    Case('vit_b16_infer_f32', 'vit_base_patch16_224', 'infer', 'float32', 8),
    Case('vit_b16_infer_bf16', 'vit_base_patch16_224', 'infer', 'bfloat16', 8),
    Case('swin_t_infer_f32', 'swin_tiny_patch4_window7_224', 'infer', 'float32', 8),
    Case('swin_t_infer_bf16', 'swin_tiny_patch4_window7_224', 'infer', 'bfloat16', 8),
    Case('swinv2_t_infer_f32', 'swinv2_tiny_window8_256', 'infer', 'float32', 8),
    Case('swinv2_t_infer_bf16', 'swinv2_tiny_window8_256', 'infer', 'bfloat16', 8),
    Case('swinv2_t_train_f32', 'swinv2_tiny_window8_256', 'train', 'float32', 8),
    Case('swinv2_t_train_bf16', 'swinv2_tiny_window8_256', 'train', 'bfloat16', 8),
    Case('vit_s16_train_f32', 'vit_small_patch16_224', 'train', 'float32', 16),
    Case('vit_s16_train_bf16', 'vit_small_patch16_224', 'train', 'bfloat16', 16),
    # DINOv3 ViT-B/16 (RoPE, 4 registers, 256 px): the issue-33 inference case
    Case('dinov3_b16_infer_f32', 'vit_base_patch16_dinov3', 'infer', 'float32', 8),
    Case('dinov3_b16_infer_bf16', 'vit_base_patch16_dinov3', 'infer', 'bfloat16', 8),
]
# (model, mode, batch): Flax compile time with the blocks unrolled and under nn.scan
COMPILE_CASES = [('vit_large_patch16_224', 'infer', 8), ('vit_large_patch16_224', 'train', 16),
                 ('vit_huge_patch14_224', 'infer', 8), ('vit_huge_patch14_224', 'train', 16)]
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.05


# ---------------------------------------------------------------- workers (one per process)

def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_calls(fn, iters: int, warmup: int, budget: float):
    """(first call seconds, timed call seconds): `warmup` untimed calls, then `iters` timed ones, stopping
    early (after at least one) once `budget` seconds of timed calls have passed. A first call slower than a
    quarter of the budget is warm-up enough (bf16 timm on a CPU without bf16 instructions)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    for _ in range(warmup if first < budget / 4 else 0):
        fn()
    times = []
    while len(times) < iters and (not times or sum(times) < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, times


def flax_step(case: Case, scan: bool = False):
    """(jitted function, its args as concrete arrays or abstract shapes builder, flops per call)."""
    import jax
    import jax.numpy as jnp
    import optax
    import vit_flax
    dtype = jnp.bfloat16 if case.dtype == 'bfloat16' else jnp.float32
    kw = dict(scan_blocks=True) if scan else {}
    model = vit_flax.create_model(case.model, dtype=dtype, **kw)
    x = jax.ShapeDtypeStruct((case.batch,) + tuple(model.input_shape), jnp.float32)
    params = vit_flax.summary.param_shapes(model)
    if case.mode == 'infer':
        fn = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))
        args = (params, x)
    else:
        tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)

        def step(params, opt_state, x, y):
            def loss_fn(p):   # Swin's default drop path (0.1, as timm's) draws from 'dropout'; ViT's uses none
                logits = model.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
                return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        fn = jax.jit(step, donate_argnums=(0, 1))
        args = (params, jax.eval_shape(tx.init, params), x, jax.ShapeDtypeStruct((case.batch,), jnp.int32))
    return model, fn, args


def run_flax(case: Case, iters: int, warmup: int, budget: float) -> dict:
    import jax
    import jax.numpy as jnp
    import vit_flax
    from vit_flax.summary import jaxpr_macs
    model, fn, args = flax_step(case)
    flops = 2 * jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)
    t = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    params = vit_flax.init_params(model.clone(dtype=jnp.float32))
    x = jnp.asarray(rng.standard_normal(args[-1].shape if case.mode == 'infer' else args[2].shape), jnp.float32)
    if case.mode == 'infer':
        call = lambda: compiled(params, x).block_until_ready()
    else:
        import optax
        state = [params, optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD).init(params)]
        y = jnp.asarray(rng.integers(0, model.num_classes, case.batch), jnp.int32)

        def call():
            state[0], state[1], loss = compiled(state[0], state[1], x, y)
            loss.block_until_ready()
    first, times = timed_calls(call, iters, warmup, budget)
    return dict(times=times, first_s=first, compile_s=compile_s, flops=flops, peak_mib=peak_rss_mib(),
                threads=os.cpu_count())


def run_timm(case: Case, iters: int, warmup: int, budget: float, compiled: bool = False) -> dict:
    import timm
    import torch
    model = timm.create_model(case.model, pretrained=False)
    model.train(case.mode == 'train')
    h, w = model.patch_embed.img_size
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((case.batch, 3, h, w)).astype(np.float32))
    autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=case.dtype == 'bfloat16')
    net = torch.compile(model) if compiled else model
    if case.mode == 'infer':
        def call():
            with torch.no_grad(), autocast():
                net(x)
    else:
        y = torch.from_numpy(rng.integers(0, model.num_classes, case.batch))
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

        def call():
            with autocast():
                loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    first, times = timed_calls(call, iters, warmup, budget)
    return dict(times=times, first_s=first, compile_s=max(first - statistics.median(times), 0.0),
                peak_mib=peak_rss_mib(), threads=torch.get_num_threads())


def run_keras(case: Case, iters: int, warmup: int, budget: float) -> dict:
    """keras-hub's ViT (inference only) on the JAX backend, when keras-hub is installed."""
    os.environ.setdefault('KERAS_BACKEND', 'jax')
    import keras
    import keras_hub
    if case.mode != 'infer' or not case.model.startswith('vit_base_patch16_224'):
        raise SystemExit('keras-hub peer: ViT-B/16 inference only')
    keras.config.set_dtype_policy('mixed_bfloat16' if case.dtype == 'bfloat16' else 'float32')
    backbone = keras_hub.models.ViTBackbone(image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=12,
                                            hidden_dim=768, mlp_dim=3072)
    model = keras_hub.models.ViTImageClassifier(backbone=backbone, num_classes=1000, preprocessor=None)
    x = np.random.default_rng(0).standard_normal((case.batch, 224, 224, 3)).astype(np.float32)
    first, times = timed_calls(lambda: np.asarray(model.predict_on_batch(x)), iters, warmup, budget)
    return dict(times=times, first_s=first, compile_s=max(first - statistics.median(times), 0.0),
                peak_mib=peak_rss_mib(), threads=os.cpu_count())


def run_gemm(framework: str, dtype: str, budget: float) -> dict:
    """GFLOP/s of an n x n x n matmul with float32 accumulation (n = 2048, or 1024 where that is slow)."""
    def rate(n):
        rng = np.random.default_rng(0)
        a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
        if framework == 'jax':
            import jax
            import jax.numpy as jnp
            dt = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
            a, b = jnp.asarray(a, dt), jnp.asarray(b, dt)
            f = jax.jit(lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32))
            call = lambda: f(a, b).block_until_ready()
        else:
            import torch
            dt = torch.bfloat16 if dtype == 'bfloat16' else torch.float32
            a, b = torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt)
            call = lambda: torch.mm(a, b)
        first, times = timed_calls(call, 10, 1 if n > 1024 else 0, budget)
        return 2 * n ** 3 / min(times) / 1e9, min(times)
    gflops, t = rate(1024)
    if t < 0.5:
        gflops = max(gflops, rate(2048)[0])
    return dict(gflops=gflops)


def compile_time(model_name: str, mode: str, batch: int, scan: bool) -> dict:
    case = Case('', model_name, mode, 'float32', batch)
    t = time.perf_counter()
    _, fn, args = flax_step(case, scan)
    fn.lower(*args).compile()
    return dict(compile_s=time.perf_counter() - t, peak_mib=peak_rss_mib())


def worker(a) -> dict:
    if a.worker == 'gemm':
        return run_gemm(a.framework, a.dtype, a.budget)
    if a.worker == 'compile':
        return compile_time(a.model, a.mode, a.batch, a.scan)
    case = Case(a.case, a.model, a.mode, a.dtype, a.batch)
    if a.worker == 'flax':
        return run_flax(case, a.iters, a.warmup, a.budget)
    if a.worker == 'keras':
        return run_keras(case, a.iters, a.warmup, a.budget)
    return run_timm(case, a.iters, a.warmup, a.budget, compiled=a.worker == 'timm-compile')


# ---------------------------------------------------------------- orchestration

def spawn(args, timeout: float, script: str = __file__) -> dict:
    """Run `script` (this file, or another benchmark's worker) with `args` in a process of its own; its
    last stdout line is the JSON result, or dict(error=...) with its last line or the timeout."""
    cmd = [sys.executable, os.path.abspath(script), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(error=f'timed out after {timeout:.0f}s')
    if out.returncode:
        lines = (out.stderr or out.stdout).strip().splitlines()
        return dict(error=lines[-1][:160] if lines else f'exit {out.returncode}')
    return json.loads(out.stdout.strip().splitlines()[-1])


def case_args(kind: str, case: Case, a) -> list:
    return ['--worker', kind, '--case', case.name, '--model', case.model, '--mode', case.mode, '--dtype', case.dtype,
            '--batch', case.batch, '--iters', a.iters, '--warmup', a.warmup, '--budget', a.budget]


def median_rate(result: dict, batch: int) -> float:
    return batch / statistics.median(result['times']) if 'times' in result else float('nan')


def fmt_spread(rates) -> str:
    good = [r for r in rates if r == r]
    if not good:
        return f'{"n/a":>17}'
    return f'{statistics.median(good):7.2f} ({min(good):.2f}-{max(good):.2f})'.rjust(17)


def measure_case(case: Case, a, kinds) -> dict:
    runs = {k: [] for k in kinds}
    for r in range(a.rounds):
        order = kinds if r % 2 == 0 else [kinds[1], kinds[0]] + kinds[2:]
        for kind in order:
            res = spawn(case_args(kind, case, a), a.timeout)
            runs[kind].append(res)
            if 'error' in res:
                print(f'  {case.name} {kind} round {r}: {res["error"]}', file=sys.stderr)
    rates = {k: [median_rate(res, case.batch) for res in v] for k, v in runs.items()}
    return dict(case=case.__dict__, runs=runs, rates=rates)


def summarise(row: dict, matmul: dict, peers) -> str:
    case = Case(**row['case'])
    rates, runs = row['rates'], row['runs']
    ratios = [f / t for f, t in zip(rates['flax'], rates['timm']) if f == f and t == t]
    ratio = f'{statistics.median(ratios):5.2f} ({min(ratios):.2f}-{max(ratios):.2f})' if ratios else 'n/a'
    ok = lambda kind: [r for r in runs[kind] if 'error' not in r]
    flops = next((r['flops'] for r in ok('flax')), None)
    peak = rate_of = lambda kind, key: statistics.median([r[key] for r in ok(kind)]) if ok(kind) else float('nan')
    mfu = lambda kind: (flops / case.batch * statistics.median([x for x in rates[kind] if x == x])
                        / (matmul[case.dtype] * 1e9)) if flops and ok(kind) else float('nan')
    line = (f'{case.model:<30} {case.mode:<5} {case.dtype:<8} {case.batch:>3} {fmt_spread(rates["flax"])} '
            f'{fmt_spread(rates["timm"])} {ratio:>18} {rate_of("flax", "compile_s"):7.1f} '
            f'{rate_of("timm", "compile_s"):6.1f} {peak("flax", "peak_mib"):6.0f} {peak("timm", "peak_mib"):6.0f} '
            f'{mfu("flax"):6.1%} {mfu("timm"):6.1%}')
    for kind in peers:
        pr = [f / p for f, p in zip(rates['flax'], rates[kind]) if f == f and p == p]
        line += f' {fmt_spread(rates[kind])} {statistics.median(pr) if pr else float("nan"):6.2f}x'
    return line


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='CI-sized: 1 round, batch 2 (inference) / 4 (training), '
                   'fewer timed steps, ViT-L compile times only')
    p.add_argument('--cases', nargs='+', choices=[c.name for c in CASES], help='default: all')
    p.add_argument('--rounds', type=int, default=3)
    p.add_argument('--iters', type=int, default=5, help='timed steps per process (fewer past --budget seconds)')
    p.add_argument('--warmup', type=int, default=1, help='untimed steps after the first call')
    p.add_argument('--budget', type=float, default=60.0, help='seconds of timed steps per process')
    p.add_argument('--timeout', type=float, default=1800.0, help='seconds before a worker is abandoned')
    p.add_argument('--peers', action='store_true', help='also timm under torch.compile and, when installed, '
                   "keras-hub's ViT on the JAX backend (columns: img/s and Flax/peer)")
    p.add_argument('--no-compile-cases', dest='compile_cases', action='store_false',
                   help='skip the ViT-L/H compile-time table')
    p.add_argument('--json', help='also write every measurement to this file')
    # worker mode
    p.add_argument('--worker', choices=('flax', 'timm', 'timm-compile', 'keras', 'gemm', 'compile'),
                   help=argparse.SUPPRESS)
    for name, kind in (('--case', str), ('--model', str), ('--mode', str), ('--dtype', str), ('--framework', str),
                       ('--batch', int)):
        p.add_argument(name, type=kind, help=argparse.SUPPRESS)
    p.add_argument('--scan', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return

    cases = [c for c in CASES if not a.cases or c.name in a.cases]
    compile_cases = COMPILE_CASES
    if a.quick:
        a.rounds, a.iters, a.budget = 1, 2, 20.0
        cases = [Case(c.name, c.model, c.mode, c.dtype, 2 if c.mode == 'infer' else 4) for c in cases]
        compile_cases = [c for c in COMPILE_CASES if c[0] == 'vit_large_patch16_224' and c[1] == 'infer']
    peers = []
    if a.peers:
        peers.append('timm-compile')
        if subprocess.run([sys.executable, '-c', 'import keras_hub'], capture_output=True).returncode == 0:
            peers.append('keras')
        else:
            print('keras-hub is not installed: no keras-hub column', file=sys.stderr)
    print(f'{os.cpu_count()} CPU cores; {a.rounds} round(s), each framework in its own process, alternated; '
          f'per process: first call, {a.warmup} warm-up, up to {a.iters} timed steps ({a.budget:.0f}s budget)',
          flush=True)

    matmul_runs = {(fw, dt): spawn(['--worker', 'gemm', '--framework', fw, '--dtype', dt, '--budget', 20], 900)
                   for dt in ('float32', 'bfloat16') for fw in ('jax', 'torch')}
    g = {k: v.get('gflops', float('nan')) for k, v in matmul_runs.items()}
    best = lambda *xs: max((x for x in xs if x == x), default=float('nan'))
    matmul = {'float32': best(g['jax', 'float32'], g['torch', 'float32'])}
    matmul['bfloat16'] = best(g['jax', 'bfloat16'], g['torch', 'bfloat16'], matmul['float32'])
    print(f'matmul rate (GFLOP/s, f32 accumulation): float32 jax {g["jax", "float32"]:.1f}, torch '
          f'{g["torch", "float32"]:.1f}; bf16 operands jax {g["jax", "bfloat16"]:.1f}, torch {g["torch", "bfloat16"]:.1f}'
          f' -> MFU denominators float32 {matmul["float32"]:.1f}, bf16 {matmul["bfloat16"]:.1f}', flush=True)

    head = (f'{"model":<30} {"mode":<5} {"dtype":<8} {"bs":>3} {"flax img/s (spread)":>17} {"timm img/s (spread)":>17} '
            f'{"flax/timm (spread)":>18} {"compile":>7} {"first":>6} {"MiB fx":>6} {"MiB tm":>6} {"MFU fx":>6} '
            f'{"MFU tm":>6}')
    head += ''.join(f' {p + " img/s":>17} {"fx/" + p[:4]:>7}' for p in peers)
    rows = []
    print(head, flush=True)
    for case in cases:
        row = measure_case(case, a, ['flax', 'timm'] + peers)
        rows.append(row)
        print(summarise(row, matmul, peers), flush=True)

    compiles = []
    if a.compile_cases:
        print('\nFlax compile time (s, trace+lower+compile, float32), blocks unrolled -> nn.scan (scan_blocks=True)')
        for model, mode, batch in compile_cases:
            res = {scan: spawn(['--worker', 'compile', '--model', model, '--mode', mode, '--batch', batch]
                               + (['--scan'] if scan else []), a.timeout) for scan in (False, True)}
            compiles.append(dict(model=model, mode=mode, batch=batch, unrolled=res[False], scanned=res[True]))
            show = lambda r: f'{r["compile_s"]:7.1f}' if 'compile_s' in r else f'{"n/a":>7}'
            print(f'{model:<30} {mode:<5} bs {batch:<3} {show(res[False])} -> {show(res[True])}', flush=True)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(matmul_gflops={f'{k[0]}/{k[1]}': v for k, v in g.items()}, mfu_denominator=matmul,
                           rounds=a.rounds, cases=rows, compile=compiles), f, indent=1, default=str)


if __name__ == '__main__':
    main()
