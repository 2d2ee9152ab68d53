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

The peak is measured twice in the same run, before and after the cases (each GEMM in a process of its own);
a dtype's peak is the larger of all its measurements. Every table is printed with the machine it came from
(/proc/cpuinfo's model name and its avx512f, avx512_bf16 and amx_* flags) and the cores.

Load: the 1-minute load average (os.getloadavg) is sampled every --load-every seconds while a round runs (its
processes included). A round whose highest sample is above the core count gives no ratio: the ratio column
then prints "loaded (L/N)" (L: the lowest of the refused rounds' highest samples, N: the cores) unless other
rounds of the case were quiet enough, and the images/s and shares are printed as measured. Each case prints
GFLOP/s (model FLOPs per second) and its share of its dtype's peak for both frameworks.

Compile: Flax's trace+lower+compile time (AOT); for eager timm the extra time of its first call.
Peak memory: the peak RSS of the worker process (framework runtime included).

`--json FILE` writes ONE object: {'machine': {model, flags, cores}, 'settings', 'peak': {'before', 'after':
{'jax/float32': GFLOP/s, ...}, 'gflops': {dtype: peak}}, 'cases': [{case, rounds: [{flax, timm, ...: the
worker's measurements, 'load': {max, samples: [[seconds, load], ...]}, 'ratio', 'refused'}], summary}],
'compile': [...]}.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
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


def step_inputs_from_shapes(model, args, batch: int, seed: int = 0):
    """([params, AdamW state], images, labels) for `flax_step`'s compiled step, the parameters drawn from their
    shapes (N(0, 0.02): no init compile) by one numpy generator: what the one-process A/B scripts
    (ab_step.py, step_profile.py) feed the step."""
    import jax.numpy as jnp
    import optax
    rng = np.random.default_rng(seed)
    params, x = _draw(rng, args[0], args[2])
    state = [params, optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD).init(params)]
    y = jnp.asarray(rng.integers(0, model.num_classes, batch), jnp.int32)
    return state, x, y


def forward_inputs_from_shapes(args, seed: int = 0):
    """(params, images) for `flax_step`'s compiled inference call (args: param shapes, image shape), drawn as
    `step_inputs_from_shapes` draws them."""
    return _draw(np.random.default_rng(seed), args[0], args[1])


def _draw(rng, param_shapes, image_shape):
    """Params N(0, 0.02) on their shapes, then images N(0, 1), both from numpy's `rng`."""
    import jax
    import jax.numpy as jnp
    params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), param_shapes)
    return params, jnp.asarray(rng.standard_normal(image_shape.shape), jnp.float32)


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


# ---------------------------------------------------------------- processes

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


# ---------------------------------------------------------------- the machine and its load (pure, unit-tested)

CPU_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'avx512_fp16')   # and every amx_* flag the CPU reports


def cpu_info(text: str) -> dict:
    """{'model': the first 'model name' (x86), else 'Model' or 'CPU part' (ARM) of /proc/cpuinfo's text,
    'flags': those of CPU_FLAGS and every amx_* among its first 'flags' / 'Features' line, in that order}."""
    names, flags = {}, None
    for line in text.splitlines():
        key, _, value = line.partition(':')
        key, value = key.strip().lower(), value.strip()
        if key in ('model name', 'model', 'cpu part') and value and not value.isdigit():
            names.setdefault(key, value)   # x86's 'model' is a number: not a name
        if flags is None and key in ('flags', 'features'):
            flags = value.split()
    have = set(flags or ())
    model = next((names[k] for k in ('model name', 'model', 'cpu part') if k in names), 'unknown')
    return dict(model=model, flags=[f for f in CPU_FLAGS if f in have]
                + sorted(f for f in have if f.startswith('amx')))


def machine(cpuinfo_path: str = '/proc/cpuinfo', cores=None) -> dict:
    try:
        with open(cpuinfo_path) as f:
            info = cpu_info(f.read())
    except OSError:
        info = dict(model='unknown (no /proc/cpuinfo)', flags=[])
    return dict(info, cores=cores or os.cpu_count())


def machine_line(m: dict) -> str:
    flags = ' '.join(m['flags']) or 'none of avx2/avx512f/avx512_bf16/amx'
    if not any(f.startswith('amx') for f in m['flags']):
        flags += ', no amx'
    return f'machine: {m["model"]}, {m["cores"]} cores; flags: {flags}'


class LoadMonitor:
    """The 1-minute load average sampled while a `with` block runs: once on entry, every `every` seconds in a
    thread, once on exit. `samples` is [(seconds since entry, load)]; `loadavg` and `clock` are injectable."""

    def __init__(self, every: float = 2.0, loadavg=os.getloadavg, clock=time.monotonic):
        self.every, self.loadavg, self.clock = every, loadavg, clock
        self.samples, self._t0 = [], None
        self._stop = threading.Event()
        self._thread = None

    def sample(self):
        now = self.clock()
        if self._t0 is None:
            self._t0 = now
        self.samples.append((round(now - self._t0, 3), float(self.loadavg()[0])))

    def _run(self):
        while not self._stop.wait(self.every):
            self.sample()

    def __enter__(self):
        self.sample()
        if self.every and self.every > 0:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        return False

    @property
    def max(self) -> float:
        return max((l for _, l in self.samples), default=float('nan'))

    def record(self) -> dict:
        return dict(max=self.max, samples=[list(s) for s in self.samples])


def too_loaded(load_max: float, cores: int) -> bool:
    """A round counts only if its load average stayed at or below the core count (and was sampled)."""
    return not (load_max == load_max) or load_max > cores


def round_ratio(flax_rate: float, timm_rate: float, load_max: float, cores: int):
    """(ratio flax/timm or None, refused): None when either side failed or the round was too loaded."""
    if too_loaded(load_max, cores):
        return None, True
    if not (flax_rate == flax_rate and timm_rate == timm_rate) or not timm_rate:
        return None, False
    return flax_rate / timm_rate, False


def ratio_cell(rounds: list, cores: int) -> str:
    """The ratio column from the rounds' {'ratio', 'refused', 'load': {'max'}}: median (min-max) of the
    counted rounds, '+k loaded' when some were refused; 'loaded (L/N)' when every measured round was refused
    (L: the lowest of their highest load samples), 'n/a' when none measured."""
    good = [r['ratio'] for r in rounds if r['ratio'] is not None]
    refused = [r['load']['max'] for r in rounds if r['refused']]
    if good:
        cell = f'{statistics.median(good):.2f} ({min(good):.2f}-{max(good):.2f})'
        return cell + (f' +{len(refused)} loaded' if refused else '')
    if refused:
        return f'loaded ({min(refused):.1f}/{cores})'
    return 'n/a'


def peak_of(runs: dict) -> dict:
    """{dtype: peak GFLOP/s} from {'before'/'after': {'jax/float32': x, 'torch/bfloat16': y, ...}}: per dtype the
    larger of every framework's and every time's measurement. bf16 also counts the float32 peak: on a CPU
    without bf16 instructions the fastest way to multiply bf16 matrices is the float32 GEMM on the exactly
    widened operands (what vit-flax does there)."""
    best = lambda xs: max((x for x in xs if x == x), default=float('nan'))
    got = {dt: best(v for when in runs.values() for k, v in when.items() if k.endswith('/' + dt))
           for dt in ('float32', 'bfloat16')}
    got['bfloat16'] = best([got['bfloat16'], got['float32']])
    return got


def share(flops_per_image: float, img_s: float, peak_gflops: float) -> tuple:
    """(GFLOP/s, share of the peak) of a case run at img_s images/s."""
    if not flops_per_image or not (img_s == img_s):
        return float('nan'), float('nan')
    gf = flops_per_image * img_s / 1e9
    return gf, gf / peak_gflops if peak_gflops == peak_gflops and peak_gflops else float('nan')


def case_summary(row: dict, peak: dict, cores: int, kinds=('flax', 'timm')) -> dict:
    """The table's figures for one case from its rounds: per framework the median images/s with its spread,
    GFLOP/s and share of the dtype's peak; the ratio cell and the counted ratios."""
    case = row['case']
    flops = next((r[k]['flops'] for r in row['rounds'] for k in kinds if 'flops' in r.get(k, {})), None)
    out = dict(flops_per_image=flops / case['batch'] if flops else None, ratio=ratio_cell(row['rounds'], cores),
               ratios=[r['ratio'] for r in row['rounds'] if r['ratio'] is not None])
    for k in kinds:
        rates = [r['rates'][k] for r in row['rounds'] if r['rates'].get(k) == r['rates'].get(k)]
        med = statistics.median(rates) if rates else float('nan')
        gf, sh = share(out['flops_per_image'], med, peak.get(case['dtype'], float('nan')))
        out[k] = dict(img_s=med, spread=[min(rates), max(rates)] if rates else None, gflops=gf, share=sh)
    return out


def _strict(x):
    """x with NaN and infinities as None, tuples as lists (strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, float) and not (x == x and abs(x) != float('inf')):
        return None
    return x


def report(mach: dict, settings: dict, peak_runs: dict, rows: list, compiles: list) -> dict:
    """The --json object: everything measured, as one strict-JSON dict (a NaN, a failed measurement: null)."""
    return _strict(dict(machine=mach, settings=settings, peak=dict(peak_runs, gflops=peak_of(peak_runs)),
                        cases=rows, compile=compiles))


# ---------------------------------------------------------------- orchestration

def measure_round(case: Case, a, kinds, r: int, cores: int, load_every: float = 2.0) -> dict:
    """One round of a case: each framework in its own process (Flax first in even rounds), the load sampled
    throughout; the round's images/s per framework and its ratio (None when refused for load)."""
    order = kinds if r % 2 == 0 else [kinds[1], kinds[0]] + kinds[2:]
    out = {}
    with LoadMonitor(load_every) as mon:
        for kind in order:
            res = spawn(case_args(kind, case, a), a.timeout)
            out[kind] = res
            if 'error' in res:
                print(f'  {case.name} {kind} round {r}: {res["error"]}', file=sys.stderr)
    out['rates'] = {k: median_rate(out[k], case.batch) for k in kinds}
    out['load'] = mon.record()
    out['ratio'], out['refused'] = round_ratio(out['rates']['flax'], out['rates']['timm'], mon.max, cores)
    return out


def measure_peaks(cores: int, load_every: float) -> dict:
    """{'jax/float32': GFLOP/s, ..., 'load': {...}}: the four GEMMs, each in its own process."""
    runs = {}
    with LoadMonitor(load_every) as mon:
        for dt in ('float32', 'bfloat16'):
            for fw in ('jax', 'torch'):
                res = spawn(['--worker', 'gemm', '--framework', fw, '--dtype', dt, '--budget', 20], 900)
                runs[f'{fw}/{dt}'] = res.get('gflops', float('nan'))
                if 'error' in res:
                    print(f'  matmul {fw} {dt}: {res["error"]}', file=sys.stderr)
    return dict(runs, load=mon.record())


def peak_line(when: str, g: dict, cores: int) -> str:
    return (f'matmul peak {when} (GFLOP/s, f32 accumulation): float32 jax {g["jax/float32"]:.1f}, torch '
            f'{g["torch/float32"]:.1f}; bf16 jax {g["jax/bfloat16"]:.1f}, torch {g["torch/bfloat16"]:.1f} '
            f'(load {g["load"]["max"]:.1f}/{cores})')


HEAD = (f'{"model":<30} {"mode":<5} {"dtype":<8} {"bs":>3} {"flax img/s (spread)":>17} {"timm img/s (spread)":>17} '
        f'{"GFLOP/s fx":>10} {"peak% fx":>8} {"GFLOP/s tm":>10} {"peak% tm":>8} {"flax/timm (spread)":>24} '
        f'{"load":>5} {"compile":>7} {"first":>6} {"MiB fx":>6} {"MiB tm":>6}')


def summarise(row: dict, peak: dict, cores: int, peers) -> str:
    case = Case(**row['case'])
    s = row['summary']
    ok = lambda kind: [r[kind] for r in row['rounds'] if kind in r and 'error' not in r[kind]]
    med = lambda kind, key: statistics.median([r[key] for r in ok(kind)]) if ok(kind) else float('nan')
    spread = lambda k: fmt_spread([r['rates'][k] for r in row['rounds']])
    load = max((r['load']['max'] for r in row['rounds']), default=float('nan'))
    line = (f'{case.model:<30} {case.mode:<5} {case.dtype:<8} {case.batch:>3} {spread("flax")} {spread("timm")} '
            f'{s["flax"]["gflops"]:10.1f} {s["flax"]["share"]:8.1%} {s["timm"]["gflops"]:10.1f} '
            f'{s["timm"]["share"]:8.1%} {s["ratio"]:>24} {load:5.1f} {med("flax", "compile_s"):7.1f} '
            f'{med("timm", "compile_s"):6.1f} {med("flax", "peak_mib"):6.0f} {med("timm", "peak_mib"):6.0f}')
    for kind in peers:
        pr = [r['rates']['flax'] / r['rates'][kind] for r in row['rounds']
              if r['rates']['flax'] == r['rates']['flax'] and r['rates'][kind] == r['rates'][kind] and not r['refused']]
        line += f' {spread(kind)} {statistics.median(pr) if pr else float("nan"):6.2f}x'
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
    p.add_argument('--load-every', type=float, default=2.0, help='seconds between load-average samples in a round')
    p.add_argument('--peers', action='store_true', help='also timm under torch.compile and, when installed, '
                   "keras-hub's ViT on the JAX backend (columns: img/s and Flax/peer)")
    p.add_argument('--no-compile-cases', dest='compile_cases', action='store_false',
                   help='skip the ViT-L/H compile-time table')
    p.add_argument('--json', help='also write every measurement to this file (one JSON object)')
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
    mach = machine()
    cores = mach['cores']
    settings = dict(quick=a.quick, rounds=a.rounds, iters=a.iters, warmup=a.warmup, budget=a.budget,
                    load_every=a.load_every, peers=peers, started=time.strftime('%Y-%m-%d %H:%M:%S'))
    print(f'{machine_line(mach)}\n{a.rounds} round(s), each framework in its own process, alternated; per process: '
          f'first call, {a.warmup} warm-up, up to {a.iters} timed steps ({a.budget:.0f}s budget); a round whose '
          f'load average passed {cores} gives no ratio', flush=True)

    peak_runs = dict(before=measure_peaks(cores, a.load_every))
    print(peak_line('before', peak_runs['before'], cores), flush=True)
    rows = []
    before = peak_of(dict(before=peak_runs['before']))
    print('as measured (shares of the peak before; the table after the cases uses the larger of both):\n' + HEAD,
          flush=True)
    for case in cases:
        row = dict(case=case.__dict__, rounds=[measure_round(case, a, ['flax', 'timm'] + peers, r, cores,
                                                             a.load_every) for r in range(a.rounds)])
        rows.append(row)
        print(summarise(dict(row, summary=case_summary(row, before, cores)), before, cores, peers), flush=True)
    peak_runs['after'] = measure_peaks(cores, a.load_every)
    peak = peak_of(peak_runs)
    print('\n' + peak_line('before', peak_runs['before'], cores))
    print(peak_line('after', peak_runs['after'], cores))
    print(f'peak (the larger of the above): float32 {peak["float32"]:.1f}, bf16 {peak["bfloat16"]:.1f} GFLOP/s\n')
    print(machine_line(mach))
    head = HEAD + ''.join(f' {p + " img/s":>17} {"fx/" + p[:4]:>7}' for p in peers)
    print(head)
    for row in rows:
        row['summary'] = case_summary(row, peak, cores)
        print(summarise(row, peak, cores, peers), flush=True)

    compiles = []
    if a.compile_cases:
        print(f'\n{machine_line(mach)}\nFlax compile time (s, trace+lower+compile, float32), blocks unrolled -> '
              f'nn.scan (scan_blocks=True)')
        for model, mode, batch in compile_cases:
            with LoadMonitor(a.load_every) as mon:
                res = {scan: spawn(['--worker', 'compile', '--model', model, '--mode', mode, '--batch', batch]
                                   + (['--scan'] if scan else []), a.timeout) for scan in (False, True)}
            compiles.append(dict(model=model, mode=mode, batch=batch, unrolled=res[False], scanned=res[True],
                                 load=mon.record()))
            show = lambda r: f'{r["compile_s"]:7.1f}' if 'compile_s' in r else f'{"n/a":>7}'
            print(f'{model:<30} {mode:<5} bs {batch:<3} {show(res[False])} -> {show(res[True])}  '
                  f'(load {mon.max:.1f}/{cores})', flush=True)
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(report(mach, settings, peak_runs, rows, compiles), f, indent=1, allow_nan=False)


if __name__ == '__main__':
    main()
