"""One-shot accelerator benchmark: vit-flax bf16 inference and AdamW training per attention implementation.

    make bench-gpu                                  # python benchmarks/gpu.py $(BENCH_ARGS)
    python benchmarks/gpu.py --dry-run              # tiny shapes on CPU (< 60 s): the script cannot rot
    python benchmarks/gpu.py --models vit_b16 --impls cudnn,xla --time-limit 300

Cases: ViT-B/16 at 224, ViT-L/16 at 224, DINOv2-L/14 at 518 (`vit_large_patch14_dinov2`), Swin-B at 224, each
inference (train=False) and one AdamW training step (forward, cross-entropy, backward, AdamW lr 1e-3, wd 0.05;
params and optimizer state donated), Flax `dtype=bfloat16` (float32 params; the bf16 policy of
vit_flax/ops/matmul.py: native bf16 operands, float32 accumulation). Rows, for each model:
- infer and train for each attention implementation (`--impls`; default per backend: GPU cudnn,xla; TPU
  pallas,xla; CPU reference,xla), ViT blocks under nn.scan (`scan_blocks=True`, Swin has no scanned form);
- then, time permitting: train with the blocks unrolled, and train with remat under the policy
  `--remat-policy` (a jax.checkpoint_policies name), both with attn_impl='auto'.
An implementation that cannot take a case prints its one-line reason instead of numbers.

Columns: img/s = batch / median step time (`--iters` timed calls after 2 warm-up calls, `--budget` seconds
at most each); compile = lower + compile seconds (AOT); peak GiB = the executable's argument + output +
temp bytes, less aliased (compiled.memory_analysis()), with the process's device.memory_stats()
'peak_bytes_in_use' in the footer; MFU = model FLOPs per second (2 x multiply-adds, counted from the traced
step with attn_impl='xla', remat's recomputation not counted) over this device's bf16 matmul rate, measured
here first (a square bf16 GEMM, float32 accumulation). timm: the same model (random weights) under
torch.compile and torch.autocast(bfloat16), img/s, the ratio Flax/timm against the best Flax row of that
model and mode. Batches (`--batch-scale` multiplies them) are sized for an 80-141 GiB card; a batch that
runs out of memory is halved and retried.

Every model runs in a process of its own (JAX preallocates device memory; the peak is per process), JAX's
first and timm's after; the whole run keeps to `--time-limit` seconds (default 450: under 8 minutes with
start-up), skipping what would not fit and saying so. The table goes to stdout, and to
$OUT/bench_gpu.md (+ .json) when $OUT is set (or to `--out`). Imports: jax, flax, optax, numpy, vit_flax;
torch and timm in the timm process only (skipped when absent or with --no-timm).
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.05

# name: (registry/timm name, overrides, infer batch, train batch, dry-run overrides)
_TINY_VIT = dict(depth=1, embed_dim=64, num_heads=2)
MODELS = {
    'vit_b16': ('vit_base_patch16_224', {}, 512, 256, dict(img_size=32, **_TINY_VIT)),
    'vit_l16': ('vit_large_patch16_224', {}, 256, 128, dict(img_size=32, **_TINY_VIT)),
    'dinov2_l14_518': ('vit_large_patch14_dinov2', dict(img_size=518, num_classes=1000), 64, 32,
                       dict(img_size=42, **_TINY_VIT)),
    'swin_b': ('swin_base_patch4_window7_224', {}, 256, 128,
               dict(img_size=32, embed_dim=32, depths=(2,), num_heads=(2,), window_size=4)),
}
DEFAULT_IMPLS = {'gpu': 'cudnn,xla', 'cuda': 'cudnn,xla', 'tpu': 'pallas,xla', 'cpu': 'reference,xla'}


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def timed(fn, iters, budget):
    """Median seconds of `iters` calls (at most `budget` s of them, at least one) after 2 warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    while len(times) < iters and (not times or sum(times) < budget):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---------------------------------------------------------------- the JAX worker (one model per process)

def matmul_rate(dry: bool) -> float:
    """bf16 GEMM FLOP/s on the default device (float32 accumulation), best of sizes."""
    import jax
    import jax.numpy as jnp
    best = 0.0
    for n in ((256,) if dry else (4096, 8192)):
        a = jnp.ones((n, n), jnp.bfloat16)
        f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
        s = timed(lambda: f(a, a).block_until_ready(), 3 if dry else 20, 2.0)
        best = max(best, 2 * n ** 3 / s)
    return best


def is_oom(e: Exception) -> bool:
    text = str(e)
    return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def jax_variant(key, mode, impl, batch, scan, remat_policy, a):
    """One row: build, count FLOPs, compile, run. Returns the row dict (or raises)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import vit_flax
    from vit_flax.models.layers import to_tuple
    from vit_flax.ops import attention
    from vit_flax.summary import jaxpr_macs
    name, over, *_ = MODELS[key]
    over = dict(over, **(MODELS[key][4] if a.dry_run else {}))
    if mode == 'train' and not over.get('num_classes', 1):
        over['num_classes'] = 1000
    kw = dict(dtype=jnp.bfloat16, attn_impl=impl, **over)
    if scan:
        kw['scan_blocks'] = True
    if remat_policy:
        kw.update(remat=True, remat_policy=remat_policy)
    model = vit_flax.create_model(name, **kw)
    heads = model.num_heads if isinstance(model.num_heads, int) else model.num_heads[0]
    seq = math.prod(model.grid_size) + model.num_prefix_tokens if hasattr(model, 'num_prefix_tokens') else \
        math.prod(to_tuple(model.window_size, 2))
    ran = attention.choose_impl(jax.default_backend(), jnp.bfloat16, seq, model.embed_dim // heads, impl=impl).impl
    tx = optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD)

    def build(m):
        if mode == 'infer':
            return jax.jit(lambda p, x: m.apply({'params': p}, x, train=False))

        def step(params, opt_state, x, y):
            def loss_fn(p):   # a fixed dropout key: drop path's masks cost the same whatever they are
                logits = m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
                return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()
            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss
        return jax.jit(step, donate_argnums=(0, 1))

    shapes = vit_flax.summary.param_shapes(model)
    x = jax.ShapeDtypeStruct((batch,) + tuple(model.input_shape), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)
    args = (shapes, x) if mode == 'infer' else (shapes, jax.eval_shape(tx.init, shapes), x, y)
    flops_model = model.clone(attn_impl='xla', remat=False)   # the same math, every product visible to the count
    flops = 2 * jaxpr_macs(jax.make_jaxpr(build(flops_model))(*args).jaxpr)
    t = time.perf_counter()
    compiled = build(model).lower(*args).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                - mem.alias_size_in_bytes) / 2 ** 30
    # random weights and a zero optimizer state from numpy: nothing more to compile (speed is all that counts)
    rng = np.random.default_rng(0)
    host = lambda tree, f: jax.device_put(jax.tree_util.tree_map(f, tree))
    params = host(shapes, lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype))
    xs = jax.device_put(rng.standard_normal(x.shape).astype(np.float32))
    if mode == 'infer':
        call = lambda: compiled(params, xs).block_until_ready()
    else:
        state = [params, host(args[1], lambda s: np.zeros(s.shape, s.dtype))]
        ys = jax.device_put(np.zeros((batch,), np.int32))

        def call():
            state[0], state[1], loss = compiled(state[0], state[1], xs, ys)
            loss.block_until_ready()
    s = timed(call, a.iters, a.budget)
    del compiled, params
    return dict(img_s=batch / s, step_ms=1e3 * s, compile_s=compile_s, peak_gib=peak, flops=flops, ran=ran)


def jax_worker(a):
    import jax
    from vit_flax.ops import matmul as mm
    deadline = a.deadline
    backend = jax.default_backend()
    dev = jax.devices()[0]
    out = dict(backend=backend, device=getattr(dev, 'device_kind', str(dev)), jax=jax.__version__,
               policy=mm.bf16_policy(backend), rows=[])
    if a.measure_matmul:
        out['matmul_flops'] = matmul_rate(a.dry_run)
    # the dry run asks for cudnn too (its row shows the one-line reason a kernel cannot run here); to stay
    # under 60 s on a 2-core CPU it trains only its first model (with the remat row, not the unrolled) and Swin:
    # the other ViTs' training step is the same code
    impls = (a.impls or ('xla,cudnn' if a.dry_run else DEFAULT_IMPLS.get(backend, 'xla'))).split(',')
    for n, key in enumerate(a.models.split(',')):
        swin = MODELS[key][0].startswith('swin')
        modes = ('infer', 'train') if (n == 0 or swin or not a.dry_run) else ('infer',)
        plan = [(mode, impl, not swin, None) for mode in modes for impl in impls]
        if not (swin or a.dry_run):
            plan += [('train', 'auto', False, None)]
        if n == 0 or not a.dry_run:
            plan += [('train', 'auto', not swin, a.remat_policy)]
        for i, (mode, impl, scan, remat) in enumerate(plan):
            row = dict(model=key, mode=mode, impl=impl, scan=scan, remat=remat or '')
            batch = max(1, int((MODELS[key][2] if mode == 'infer' else MODELS[key][3]) * a.batch_scale))
            if a.dry_run:
                batch = 2
            if time.time() > deadline:
                out['rows'].append(dict(row, batch=batch, error='skipped: out of time'))
                continue
            while True:
                try:
                    row.update(jax_variant(key, mode, impl, batch, scan, remat, a), batch=batch)
                    break
                except Exception as e:   # one line per row: what the kernel or the allocator said
                    if is_oom(e) and batch > 1:
                        batch //= 2
                        log(f'{key} {mode} {impl}: out of memory, batch -> {batch}')
                        continue
                    row.update(batch=batch, error=f'{type(e).__name__}: {str(e).splitlines()[0][:160]}')
                    break
            log(json.dumps(row))
            out['rows'].append(row)
    stats = dev.memory_stats() or {}
    out['process_peak_gib'] = stats.get('peak_bytes_in_use', 0) / 2 ** 30 or None
    return out


# ---------------------------------------------------------------- the timm worker

def timm_worker(a):
    import timm
    import torch
    cuda = torch.cuda.is_available()
    device = 'cuda' if cuda else 'cpu'
    rows = []
    for key in a.models.split(','):
        name, over, bi, bt, tiny = MODELS[key]
        over = dict(over, **(tiny if a.dry_run else {}))
        over['num_classes'] = over.get('num_classes') or 1000
        for mode, batch in (('infer', bi), ('train', bt)):
            batch = 2 if a.dry_run else max(1, int(batch * a.batch_scale))
            row = dict(model=key, mode=mode, batch=batch)
            if time.time() > a.deadline:
                rows.append(dict(row, error='skipped: out of time'))
                continue
            try:
                model = timm.create_model(name, pretrained=False, **over).to(device)
                model.train(mode == 'train')
                compiled = model if (a.dry_run or not cuda) else torch.compile(model)
                size = over.get('img_size', 224)
                x = torch.randn(batch, 3, size, size, device=device)
                y = torch.randint(0, 1000, (batch,), device=device)
                opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
                sync = torch.cuda.synchronize if cuda else (lambda: None)

                def call():
                    with torch.autocast(device, dtype=torch.bfloat16):
                        if mode == 'infer':
                            with torch.no_grad():
                                compiled(x)
                        else:
                            loss = torch.nn.functional.cross_entropy(compiled(x).float(), y)
                    if mode == 'train':
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        opt.step()
                    sync()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                t = time.perf_counter()
                call()
                first = time.perf_counter() - t
                s = timed(call, a.iters, a.budget)
                row.update(img_s=batch / s, compile_s=first,
                           peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
                           compiled=not (a.dry_run or not cuda))
                del model, compiled, opt
                if cuda:
                    torch.cuda.empty_cache()
            except Exception as e:
                row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:160]}' if str(e) else type(e).__name__
            log(json.dumps(row))
            rows.append(row)
    return dict(torch=torch.__version__, timm=timm.__version__, rows=rows)


# ---------------------------------------------------------------- the driver

def spawn(kind, a, models, deadline, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), '--worker', kind, '--models', models,
           '--deadline', str(deadline), '--iters', str(a.iters), '--budget', str(a.budget),
           '--batch-scale', str(a.batch_scale), '--remat-policy', a.remat_policy] + list(extra)
    cmd += ['--dry-run'] if a.dry_run else []
    cmd += ['--impls', a.impls] if a.impls else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
    if a.dry_run:
        env.setdefault('JAX_PLATFORMS', 'cpu')
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env,
                           timeout=max(5.0, deadline - time.time() + 30))
    except subprocess.TimeoutExpired:
        return dict(error=f'{kind} worker for {models}: timed out')
    lines = [l for l in r.stdout.splitlines() if l.startswith('{')]
    if r.returncode or not lines:
        return dict(error=f'{kind} worker for {models}: exit {r.returncode}')
    return json.loads(lines[-1])


def fmt(v, spec):
    return '-' if v is None else format(v, spec)


def render(jax_runs, timm_run, args_line) -> str:
    first = next((r for r in jax_runs if 'device' in r), {})
    rate = first.get('matmul_flops')
    lines = [f"# vit-flax bench-gpu: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             '', f"device: {first.get('device', '?')} ({first.get('backend', '?')}), jax {first.get('jax', '?')}"
             + (f", torch {timm_run['torch']}, timm {timm_run['timm']}" if timm_run.get('torch') else ''),
             f"bf16 matmul rate (measured): {fmt(rate and rate / 1e12, '.4g')} TFLOP/s; bf16 policy: "
             f"{first.get('policy')}", f'args: {args_line}', '',
             '| model | mode | attn_impl (ran) | scan | remat | batch | img/s | step ms | compile s | peak GiB '
             '| MFU | timm img/s | Flax/timm |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    timm_rows = {(r['model'], r['mode']): r for r in timm_run.get('rows', [])}
    best = {}
    for run in jax_runs:
        for r in run.get('rows', []):
            if 'img_s' in r:
                best[(r['model'], r['mode'])] = max(best.get((r['model'], r['mode']), 0), r['img_s'])
    for run in jax_runs:
        if 'error' in run:
            lines.append(f"| {run['error']} |")
        for r in run.get('rows', []):
            t = timm_rows.get((r['model'], r['mode']), {})
            head = (f"| {r['model']} | {r['mode']} | {r['impl']}" + (f" ({r['ran']})" if r.get('ran') else '')
                    + f" | {'yes' if r['scan'] else 'no'} | {r['remat'] or '-'} | {r['batch']} |")
            if 'error' in r:
                lines.append(f"{head} {r['error']} |  |  |  |  | {fmt(t.get('img_s'), '.1f')} |  |")
                continue
            mfu = r['flops'] * r['img_s'] / r['batch'] / rate if rate else None
            is_best = r['img_s'] == best.get((r['model'], r['mode']))
            ratio = r['img_s'] / t['img_s'] if t.get('img_s') and is_best else None
            lines.append(f"{head} {r['img_s']:.1f} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | "
                         f"{fmt(r['peak_gib'], '.2f')} | {fmt(mfu and 100 * mfu, '.1f')}% | "
                         f"{fmt(t.get('img_s'), '.1f')} | {fmt(ratio, '.2f')} |")
    lines.append('')
    peaks = ', '.join(f"{r['rows'][0]['model']} {fmt(r.get('process_peak_gib'), '.1f')}"
                      for r in jax_runs if r.get('rows'))
    lines.append(f'process peak device memory (memory_stats peak_bytes_in_use, GiB): {peaks or "-"}')
    for r in timm_run.get('rows', []):
        if 'error' in r:
            lines.append(f"timm {r['model']} {r['mode']}: {r['error']}")
        elif r.get('peak_gib') is not None or not r.get('compiled', True):
            lines.append(f"timm {r['model']} {r['mode']}: batch {r['batch']}, first call {r['compile_s']:.1f} s"
                         + (f", peak {r['peak_gib']:.2f} GiB" if r.get('peak_gib') is not None else '')
                         + ('' if r.get('compiled', True) else ', eager (no torch.compile: dry run or no CUDA)'))
    if timm_run.get('error'):
        lines.append(f"timm: {timm_run['error']}")
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--dry-run', action='store_true', help='tiny shapes on CPU, batch 2, one timed call')
    p.add_argument('--models', default=','.join(MODELS))
    p.add_argument('--impls', default='', help='comma-separated attn_impl values (default: per backend)')
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--budget', type=float, default=4.0, help='seconds of timed calls per row, at most')
    p.add_argument('--batch-scale', type=float, default=1.0)
    p.add_argument('--remat-policy', default='dots_with_no_batch_dims_saveable')
    p.add_argument('--time-limit', type=float, default=450.0)
    p.add_argument('--no-timm', action='store_true')
    p.add_argument('--out', default='', help='table file (default $OUT/bench_gpu.md when $OUT is set)')
    p.add_argument('--worker', choices=['jax', 'timm'], help=argparse.SUPPRESS)
    p.add_argument('--deadline', type=float, help=argparse.SUPPRESS)
    p.add_argument('--measure-matmul', action='store_true', help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    unknown = set(a.models.split(',')) - set(MODELS)
    if unknown:
        p.error(f"unknown --models {', '.join(sorted(unknown))}; known: {', '.join(MODELS)}")
    if a.dry_run:
        a.iters, a.budget = 1, 1.0
    if a.worker:
        print(json.dumps(jax_worker(a) if a.worker == 'jax' else timm_worker(a)))
        return 0
    start = time.time()
    end = start + a.time_limit
    models = a.models.split(',')
    # JAX gets ~60% of the time (split over the models), timm the rest; the dry run runs one process each
    groups = [a.models] if a.dry_run else models
    jax_end = start + (0.6 if not a.no_timm else 1.0) * a.time_limit
    jax_runs = []
    for i, group in enumerate(groups):
        share = start + (jax_end - start) * (i + 1) / len(groups)
        jax_runs.append(spawn('jax', a, group, min(share, end), ['--measure-matmul'] if i == 0 else []))
    timm_run = {}
    if not a.no_timm:
        import importlib.util
        if importlib.util.find_spec('torch') and importlib.util.find_spec('timm'):
            timm_run = spawn('timm', a, a.models, end - 20)
        else:
            timm_run = dict(error='torch or timm is not installed: no timm column')
    args_line = ' '.join(sys.argv[1:] if argv is None else argv) or '(defaults)'
    table = render(jax_runs, timm_run, args_line) + f'\nwall time: {time.time() - start:.0f} s\n'
    print(table)
    path = a.out or (os.path.join(os.environ['OUT'], 'bench_gpu.md') if os.environ.get('OUT') else '')
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            f.write(table)
        with open(os.path.splitext(path)[0] + '.json', 'w') as f:
            json.dump(dict(jax=jax_runs, timm=timm_run), f, indent=1)
        log(f'wrote {path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
