"""Compile the step a training run would take, for a target it need not run on, and read what XLA says.

`plan(args, target, num_classes)` builds the model, the optimizer, the mesh and the jitted step with the
run's own builders (loop.build_model, loop.state_spec, loop.jit_steps, sharding.*), lowers it for `target`
and compiles it: 'cpu' (this host's devices) or 'tpu:TOPOLOGY' ('tpu:v5e:2x2', 'tpu:v5p:2x2x1'), a TPU slice
compiled *without* a TPU through libtpu's compile-only devices (jax.experimental.topologies). Nothing runs:
every input is a ShapeDtypeStruct carrying its sharding.

What comes back (a dict, every figure per device and per step, bytes unless named otherwise):
  argument_bytes, output_bytes, alias_bytes, temp_bytes   XLA's memory analysis of the executable
  param_bytes, opt_state_bytes, batch_bytes               the arguments split by what they hold (shard shapes
                                                          x itemsize: TPU tiling pads small tensors a little)
  peak_bytes = argument + output - alias + temp           what the step needs resident at once
  memory_bytes, headroom_bytes, fits                      the device's memory (TPU_SPECS, or this host's RAM)
  flops, bytes_accessed, optimal_seconds                  XLA's cost analysis (module docstring of docs/XLA.md:
                                                          a while/scan body counts once, Pallas kernels as 0)
  model_flops                                             analytic: 2 x MACs (vit_flax.summary) x images for
                                                          a forward, 6 x for a training step (3 matmuls per MAC)
  roofline_seconds = max(flops / peak, bytes_accessed / bandwidth), images_per_sec_per_chip (its bound),
  mfu_bound = model_flops / roofline_seconds / peak, fusions, collectives ({op: count}), compile_seconds.
A step that does not fit does not compile on a TPU (RESOURCE_EXHAUSTED: CompileTimeHbmOom): then `fits` is
False, `needed_bytes` is XLA's figure and the cost and temporaries are None.
"""
import importlib.util
import os
import re
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .errors import TrainError

# Per chip (one JAX device each: v4 and v5p run their two TensorCores as one "megacore" device).
# peak: dense bf16 FLOP/s; hbm: bytes; bw: HBM bytes/s. Sources: Google Cloud's TPU system-architecture pages,
#   v4  https://cloud.google.com/tpu/docs/v4            275 TFLOP/s, 32 GiB HBM2, 1200 GB/s
#   v5e https://cloud.google.com/tpu/docs/v5e           197 TFLOP/s, 16 GB HBM2, 819 GB/s
#   v5p https://cloud.google.com/tpu/docs/v5p-training  459 TFLOP/s, 95 GB HBM2e, 2765 GB/s
#   v6e https://cloud.google.com/tpu/docs/v6e           918 TFLOP/s, 32 GB HBM, 1638 GB/s (Trillium)
# HBM sizes are binary (GiB): XLA itself reports v5e's as 16 GiB less a reserve (15.75G usable).
TPU_SPECS = {
    'v4': dict(peak_flops=275e12, hbm_bytes=32 * 2 ** 30, hbm_bw=1200e9, device_kind='TPU v4'),
    'v5e': dict(peak_flops=197e12, hbm_bytes=16 * 2 ** 30, hbm_bw=819e9, device_kind='TPU v5 lite'),
    'v5p': dict(peak_flops=459e12, hbm_bytes=95 * 2 ** 30, hbm_bw=2765e9, device_kind='TPU v5'),
    'v6e': dict(peak_flops=918e12, hbm_bytes=32 * 2 ** 30, hbm_bw=1638e9, device_kind='TPU v6 lite'),
}
# Topologies that resolve with libtpu 0.0.50 (2-D for v5e/v6e, 3-D for v4/v5p); any AxB(xC) the chip takes works.
KNOWN_TOPOLOGIES = ('v4:2x2x1', 'v4:2x2x2', 'v4:4x4x4', 'v5e:1x1', 'v5e:2x2', 'v5e:2x4', 'v5e:4x4', 'v5e:8x8',
                    'v5p:2x2x1', 'v5p:2x2x2', 'v5p:4x4x4', 'v6e:1x1', 'v6e:2x2', 'v6e:2x4', 'v6e:4x4', 'v6e:8x8')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
TPU_EXTRA = "pip install 'vit-flax-tools[tpu]' (the extra that brings jax[tpu], i.e. libtpu)"


def quiet_libtpu_env() -> None:
    """Before libtpu loads on a machine with no TPU: the values that stop its start-up warnings (hostnames,
    accelerator type) and let two processes compile at once. Only set where unset, and only called when jax
    runs on the CPU, so a real TPU VM's own values are never touched."""
    for k, v in dict(TPU_ACCELERATOR_TYPE='v5litepod-4', TPU_WORKER_HOSTNAMES='localhost', TPU_WORKER_ID='0',
                     ALLOW_MULTIPLE_LIBTPU_LOAD='1').items():
        os.environ.setdefault(k, v)


def parse_target(target: str) -> Tuple[str, Optional[str]]:
    """'cpu' -> ('cpu', None); 'tpu:v5e:2x2' -> ('tpu', 'v5e:2x2'); anything else is a TrainError."""
    text = (target or '').strip()
    if text == 'cpu':
        return 'cpu', None
    if text.startswith('tpu:'):
        topo = text[4:]
        gen, _, shape = topo.partition(':')
        if gen not in TPU_SPECS or not re.fullmatch(r'\d+(x\d+){1,2}', shape):
            raise TrainError(f'--target {target}: unknown TPU topology {topo!r}; known: {", ".join(KNOWN_TOPOLOGIES)} '
                             f'(generation:AxB for v5e/v6e, AxBxC for v4/v5p)')
        return 'tpu', topo
    raise TrainError(f'--target {target!r}: use cpu or tpu:TOPOLOGY (e.g. tpu:v5e:2x2; known: '
                     f'{", ".join(KNOWN_TOPOLOGIES)})')


def have_libtpu() -> bool:
    return importlib.util.find_spec('libtpu') is not None


def target_devices(target: str):
    """(platform, devices, spec): the devices to compile for and the chip's TPU_SPECS entry (None for cpu)."""
    import jax
    platform, topo = parse_target(target)
    if platform == 'cpu':
        return 'cpu', jax.devices('cpu'), None
    if not have_libtpu():
        raise TrainError(f'--target {target}: compiling for a TPU needs libtpu, which is not installed: {TPU_EXTRA}')
    from jax.experimental import topologies
    gen = topo.split(':')[0]
    try:
        # libtpu describes a v4 slice as one device per TensorCore unless asked for its "megacore" chip config,
        # one device per chip as a v4 VM runs JAX (jax's meshes refuse per-core v4 devices); v5p is megacore already
        desc = topologies.get_topology_desc(topo, 'tpu', **(dict(chip_config_name='megacore') if gen == 'v4' else {}))
    except Exception as e:  # noqa: BLE001 - libtpu raises JaxRuntimeError / RuntimeError for a bad name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f'--target {target}: libtpu does not know topology {topo!r} ({first}); known: '
                         f'{", ".join(KNOWN_TOPOLOGIES)}') from None
    return 'tpu', list(desc.devices), TPU_SPECS[gen]


def host_memory_bytes() -> int:
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 0


def _shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the first device's shard)."""
    import jax
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def hlo_counts(hlo_text: str) -> Tuple[int, Dict[str, int]]:
    """(fusion instructions, {collective op: count}) in optimized HLO text; async pairs count once (-start)."""
    fusions = len(re.findall(r'=\s*\S+\s+fusion\(', hlo_text)) + len(re.findall(r'=\s*\([^=]*\)\s+fusion\(', hlo_text))
    coll = {}
    for op in COLLECTIVES:
        n = len(re.findall(r'\s' + op + r'(?:-start)?\(', hlo_text))
        if n:
            coll[op] = n
    return fusions, coll


_OOM = re.compile(r'memory required for [^(]*\(([\d.]+)([KMGT]?)\)?.*?available HBM \(([\d.]+)([KMGT]?)\)', re.S)


def _oom_bytes(message: str):
    """(needed, available) bytes from XLA's CompileTimeHbmOom message, or (None, None)."""
    m = _OOM.search(message)
    if not m:
        return None, None
    scale = dict(K=2 ** 10, M=2 ** 20, G=2 ** 30, T=2 ** 40)
    return (int(float(m.group(1)) * scale.get(m.group(2), 1)), int(float(m.group(3)) * scale.get(m.group(4), 1)))


def compile_for(jitted, specs, platform: str):
    """(compiled or None, lowered, seconds, oom message or None): `jitted` traced with `specs`, lowered for
    `platform` and compiled. Only an out-of-memory refusal is returned as a message; other errors raise."""
    t0 = time.perf_counter()
    traced = jitted.trace(*specs)
    lowered = traced.lower(lowering_platforms=(platform,))
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError (XlaRuntimeError in older jax)
        if 'RESOURCE_EXHAUSTED' in str(e):
            return None, lowered, time.perf_counter() - t0, str(e)
        raise
    return compiled, lowered, time.perf_counter() - t0, None


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):   # jax < 0.4.30 returned one dict per program
        cost = cost[0] if cost else {}
    return dict(cost or {})


def plan(args, target: str, num_classes: int, *, train: bool = True, extra: Optional[dict] = None,
         dump: Optional[str] = None) -> dict:
    """Compile the run's step for `target` (module docstring). `args`: a resolved training namespace
    (config.resolve), whose batch_size is global; `extra`: more model fields (scan, attn_impl, ...);
    `dump`: a folder for the StableHLO and the optimized HLO text."""
    import jax
    from vit_flax import summary
    from vit_flax.ops.attention import target_backend
    from . import loop, sharding, weights

    platform, devices, spec = target_devices(target)
    ndev = len(devices)
    sizes = sharding.parse_mesh(args.mesh, ndev)
    mesh = sharding.make_mesh(sizes, devices=devices)
    batch = args.batch_size
    if batch % ndev or (batch // ndev) % args.grad_accum:
        raise TrainError(f'batch {batch} must split evenly over the {ndev} devices of {target} (data={sizes["data"]} '
                         f'x fsdp={sizes["fsdp"]}) and --grad-accum {args.grad_accum} micro-batches per device')
    with target_backend(platform):
        model, overrides, size = loop.build_model(args, num_classes, extra)
        st = loop.state_spec(model, args, mesh)
        mean, std, _ = weights.normalization(args, None)
        train_step, eval_step = loop.jit_steps(model, st, mesh, args, mean, std)
        batch_spec = loop.batch_specs(batch, size, mesh, args, train)
        if train:
            lr = jax.ShapeDtypeStruct((), np.float32, sharding=sharding.replicated(mesh))
            ema_weight = jax.ShapeDtypeStruct((), np.float32, sharding=sharding.replicated(mesh))
            compiled, lowered, seconds, oom = compile_for(train_step, (st.abstract, batch_spec, lr, ema_weight),
                                                          platform)
        else:
            compiled, lowered, seconds, oom = compile_for(eval_step, (st.abstract['params'], batch_spec), platform)
    # per image, the eval forward (fvcore's rule), counted with the 'manual_grad' attention (plain matmuls: a Pallas
    # kernel is opaque to the count, and an explicit 'splash' or 'pallas' refuses to trace for this CPU host)
    counted = model.clone(attn_impl='manual_grad') if hasattr(model, 'attn_impl') else model
    macs = summary.count_macs(counted)
    opt_bytes = _shard_bytes(st.abstract['opt_state']) if train else 0
    out = dict(target=target, platform=platform, devices=ndev, device_kind=devices[0].device_kind,
               model=args.model, overrides=overrides, train=train, batch=batch, batch_per_device=batch // ndev,
               dtype=args.dtype, mesh=sizes, remat=args.remat, optimizer=args.optimizer if train else None,
               grad_accum=args.grad_accum, num_params=st.num_params,
               param_bytes=_shard_bytes(st.abstract['params']), opt_state_bytes=opt_bytes,
               batch_bytes=_shard_bytes(batch_spec),
               memory_bytes=spec['hbm_bytes'] if spec else host_memory_bytes(),
               peak_flops=spec['peak_flops'] if spec else None, hbm_bw=spec['hbm_bw'] if spec else None,
               compile_seconds=round(seconds, 3), gmacs_per_image=macs / 1e9,
               model_flops=(6 if train else 2) * macs * batch / ndev)
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, 'stablehlo.mlir'), 'w') as f:
            f.write(lowered.as_text())
    if compiled is None:
        needed, available = _oom_bytes(oom)
        out.update(fits=False, needed_bytes=needed, memory_bytes=available or out['memory_bytes'],
                   argument_bytes=None, output_bytes=None, alias_bytes=None, temp_bytes=None, peak_bytes=needed,
                   headroom_bytes=None if needed is None else (available or out['memory_bytes']) - needed,
                   flops=None, bytes_accessed=None, optimal_seconds=None, roofline_seconds=None,
                   images_per_sec_per_chip=None, mfu_bound=None, fusions=None, collectives=None,
                   error=oom.strip().splitlines()[0])
        return out
    mem = compiled.memory_analysis()
    arg, outb = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    peak = arg + outb - alias + temp
    cost = _cost(compiled)
    flops, nbytes = cost.get('flops'), cost.get('bytes accessed')
    hlo = compiled.as_text() or ''
    fusions, coll = hlo_counts(hlo)
    if dump:
        with open(os.path.join(dump, 'optimized_hlo.txt'), 'w') as f:
            f.write(hlo)
    caveats = []
    if re.search(r'\swhile\(', hlo):
        caveats.append('the program has a while loop (nn.scan over blocks, --grad-accum): cost analysis counts its body '
                       'once, so FLOPs, bytes and the roofline cover one iteration')
    if 'tpu_custom_call' in hlo:
        caveats.append('Pallas kernels (splash/flash attention) count 0 FLOPs and bytes in cost analysis')
    roof = None
    if spec and flops is not None and nbytes is not None:
        roof = max(flops / spec['peak_flops'], nbytes / spec['hbm_bw'])
    out.update(argument_bytes=arg, output_bytes=outb, alias_bytes=alias, temp_bytes=temp, peak_bytes=peak,
               generated_code_bytes=int(mem.generated_code_size_in_bytes),
               headroom_bytes=out['memory_bytes'] - peak, fits=peak <= out['memory_bytes'],
               flops=flops, bytes_accessed=nbytes, transcendentals=cost.get('transcendentals'),
               intensity=(flops / nbytes) if flops and nbytes else None,
               optimal_seconds=cost.get('optimal_seconds') if (cost.get('optimal_seconds') or 0) > 0 else None,
               roofline_seconds=roof,
               roofline_bound=None if roof is None else ('compute' if flops / spec['peak_flops'] >= nbytes / spec['hbm_bw']
                                                         else 'memory'),
               images_per_sec_per_chip=(batch / ndev / roof) if roof else None,
               mfu_bound=(out['model_flops'] / roof / spec['peak_flops']) if roof else None,
               fusions=fusions, collectives=coll, caveats=caveats)
    return out


def max_batch(probe: Callable[[int], dict], start: int, unit: int, limit: int = 1 << 20):
    """(largest fitting batch, the plan there, the smallest batch above it that does not fit), in multiples
    of `unit` (devices x micro-batches). `probe(batch)` returns a plan.

    A safeguarded secant search: memory grows about linearly with the batch, and every probe says how much it
    needs (a fitting plan its peak, a refused one XLA's figure), so the boundary is predicted from the two
    probes nearest it, kept strictly inside the bracket of known fit / known refusal, with a bisection step
    whenever a prediction did not halve the bracket. A fitting probe compiles fully (minutes for a real model
    on a laptop), a refused one takes seconds on a TPU, so this usually ends in 3-5 probes where doubling
    and bisection take 8-12. Returns (0, None, unit) when even `unit` does not fit; (best, plan, None) when
    `limit` still fits."""
    plans = {}
    lo, hi = 0, None               # in units: lo fits (0: none known), hi does not (None: none known)
    k = min(max(start // unit, 1), max(limit // unit, 1))
    bisect_next = False
    while True:
        p = plans[k] = probe(k * unit)
        width = None if hi is None else hi - lo
        if p['fits']:
            lo = k
        else:
            hi = k
        if hi is not None and hi - lo <= 1:
            break
        if hi is None and lo * unit >= limit:
            return lo * unit, plans[lo], None
        bisect_next = width is not None and (hi - lo) * 2 > width and not bisect_next
        k = _next_probe(plans, lo, hi, bisect_next, max(limit // unit, 1))
    if lo == 0:
        return 0, None, unit
    return lo * unit, plans[lo], hi * unit


def _next_probe(plans, lo, hi, bisect, kmax):
    low, high = lo + 1, (hi - 1 if hi is not None else min(max(8 * lo, 2), kmax))
    if bisect and hi is not None:
        return max(low, min(high, (lo + hi) // 2))
    pts = sorted((k, p['peak_bytes'], p['memory_bytes']) for k, p in plans.items() if p.get('peak_bytes'))
    refused = [p['memory_bytes'] for p in plans.values() if not p['fits'] and p.get('memory_bytes')]
    cap = min(refused) if refused else (pts[-1][2] if pts else None)   # XLA's usable HBM, once it has said it
    guess = None
    if cap and len(pts) >= 2:
        near = sorted(pts, key=lambda t: abs(t[1] - cap))[:2]
        (k1, b1, _), (k2, b2, _) = sorted(near)
        if k2 > k1 and b2 > b1:
            guess = k1 + (cap - b1) * (k2 - k1) / (b2 - b1)
    elif cap and pts:
        guess = pts[0][0] * cap / pts[0][1]
    if guess is None or (hi is None and guess < 2 * lo):   # no fail known yet: grow at least by doubling
        return (lo + hi) // 2 if hi is not None else min(max(2 * lo, 1), kmax)
    return max(low, min(high, int(guess)))


# ---------------------------------------------------------------- text

def fmt_bytes(n) -> str:
    if n is None:
        return '-'
    return f'{n / 2 ** 30:.2f} GiB' if abs(n) >= 2 ** 30 else f'{n / 2 ** 20:.1f} MiB'


def _si(x, unit='') -> str:
    if x is None:
        return '-'
    for p, s in ((1e15, 'P'), (1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= p:
            return f'{x / p:.3g} {s}{unit}'
    return f'{x:.3g} {unit}'


def describe(p: dict) -> str:
    """The plan as the lines `vit-flax xla` and `train_flax.py --plan` print."""
    what = 'training step' if p['train'] else 'forward (eval step)'
    mesh = ','.join(f'{k}={v}' for k, v in p['mesh'].items())
    lines = [f"{p['model']} {p['overrides']} {what}, {p['dtype']}, batch {p['batch']} ({p['batch_per_device']} per "
             f"device), mesh {mesh}, remat {p['remat'] or 'off'}"
             + (f", optimizer {p['optimizer']}" if p['train'] else ''),
             f"target {p['target']}: {p['devices']} x {p['device_kind']}; compiled in {p['compile_seconds']:.1f} s",
             'memory per device:']
    rows = [('params', p['param_bytes']), ('optimizer state', p['opt_state_bytes']), ('batch', p['batch_bytes']),
            ('arguments (all)', p['argument_bytes']), ('outputs', p['output_bytes']),
            ('aliased (donated)', p['alias_bytes']), ('temporaries', p['temp_bytes']),
            ('peak', p['peak_bytes']), ('device memory', p['memory_bytes']), ('headroom', p['headroom_bytes'])]
    lines += [f'  {k:<18} {fmt_bytes(v):>12}' for k, v in rows]
    lines.append(f"  fits: {'yes' if p['fits'] else 'NO'}" + (f" ({p['error']})" if p.get('error') else ''))
    if p.get('flops') is not None:
        lines.append('per device per step:')
        lines.append(f"  FLOPs (XLA)        {_si(p['flops'])}   analytic {_si(p['model_flops'])} "
                     f"({(6 if p['train'] else 2)} x {p['gmacs_per_image']:.3f} GMACs x {p['batch_per_device']} images); "
                     f"XLA/analytic {p['flops'] / p['model_flops']:.3f}" if p['model_flops'] else '')
        lines.append(f"  bytes accessed     {_si(p['bytes_accessed'], 'B')}   FLOPs/byte {p['intensity']:.1f}"
                     if p.get('intensity') else f"  bytes accessed     {_si(p['bytes_accessed'], 'B')}")
        if p['roofline_seconds']:
            lines.append(f"  roofline           {p['roofline_seconds'] * 1e3:.2f} ms ({p['roofline_bound']}-bound at "
                         f"{_si(p['peak_flops'], 'FLOP/s')} bf16, {_si(p['hbm_bw'], 'B/s')} HBM) -> at most "
                         f"{p['images_per_sec_per_chip']:.0f} images/s per chip, MFU at most {p['mfu_bound']:.2f}")
        if p.get('optimal_seconds'):
            lines.append(f"  XLA's own estimate {p['optimal_seconds'] * 1e3:.2f} ms")
        coll = ', '.join(f'{k} {v}' for k, v in p['collectives'].items()) or 'none'
        lines.append(f"  optimized HLO: {p['fusions']} fusions; collectives: {coll}")
        if p.get('remat'):
            lines.append('  note: remat recomputes each block\'s forward in the backward pass (more FLOPs than 6 x MACs)')
        for c in p.get('caveats') or ():
            lines.append(f'  caveat: {c}')
    return '\n'.join(lines)


JSON_KEYS = ('target', 'devices', 'device_kind', 'memory_bytes', 'argument_bytes', 'output_bytes', 'temp_bytes',
             'fits', 'flops', 'bytes_accessed', 'roofline_seconds', 'compile_seconds')
