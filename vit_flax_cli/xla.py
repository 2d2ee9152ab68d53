"""`vit-flax xla MODEL`: compile a model's forward, or with --train the training step train_flax.py runs, for
the CPU or a TPU slice (compiled without a TPU), and print what XLA says about it: memory per device, FLOPs,
bytes, the roofline bound, fusions and collectives. Sweeps, --max-batch and --dump. The work is in
vit_train.plan; this module is flags and output. jax is imported only after the flags are read."""
import argparse
import itertools
import json
import os
import sys

SWEEP_KEYS = ('batch', 'mesh', 'remat', 'scan_blocks', 'attn_impl', 'dtype')


def prepare_env() -> None:
    """Before jax loads: nothing here executes, so jax runs on the CPU unless told otherwise (a TPU target is
    compiled through libtpu's compile-only devices), and libtpu's start-up noise is silenced."""
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    if os.environ['JAX_PLATFORMS'] == 'cpu':
        from vit_train.plan import quiet_libtpu_env
        quiet_libtpu_env()


def _sweep(text: str):
    key, sep, values = text.partition('=')
    key = key.replace('-', '_')
    if not sep or key not in SWEEP_KEYS or not values:
        raise argparse.ArgumentTypeError(f'--sweep wants KEY=V1,V2,... with KEY one of {", ".join(SWEEP_KEYS)}, '
                                         f'got {text!r}')
    return key, values.split(',') if key != 'mesh' else values.split(';')


def add_parser(sub, common, set_adder, at_least):
    s = sub.add_parser('xla', parents=[common], help='compile the forward or training step for cpu or a TPU slice '
                       '(no TPU needed) and report memory, FLOPs, roofline, fusions',
                       description='Compile without running: the forward (eval step), or with --train the exact '
                       'training step train_flax.py would run with these flags, for --target cpu or tpu:TOPOLOGY '
                       '(v4/v5p: AxBxC, v5e/v6e: AxB; needs libtpu: pip install \'vit-flax-tools[tpu]\'). Figures are per '
                       'device and per step. See docs/XLA.md for how to read them.')
    s.add_argument('model', help='registered model name')
    s.add_argument('--target', default='cpu', help='cpu (default) or tpu:TOPOLOGY, e.g. tpu:v5e:2x2, tpu:v5p:2x2x1')
    s.add_argument('--train', action='store_true', help='the training step (forward, backward, optimizer update); '
                   'default: the forward of the evaluation step')
    s.add_argument('--batch', type=at_least(1, '--batch'), default=None,
                   help='global batch (default: 8 per device)')
    s.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None,
                   help='compute dtype (default: bfloat16 for a TPU target, float32 for cpu); params stay float32')
    s.add_argument('--mesh', default='', help="'data=N,fsdp=M' (default: data over every device)")
    s.add_argument('--remat', nargs='?', const='full', metavar='POLICY',
                   help='recompute blocks in the backward pass: bare for whole blocks, or a jax.checkpoint_policies '
                   'name (dots_saveable, ...) (default: off)')
    s.add_argument('--scan-blocks', action='store_true', help='ViT: run the blocks with nn.scan (one block compiled)')
    s.add_argument('--attn-impl', help='attention kernel (auto, reference, plain, xla, pallas, splash, ...; default: the '
                   'model\'s auto, decided for the target\'s platform)')
    s.add_argument('--optimizer', choices=('adamw', 'sgd'), default='adamw', help='with --train (default adamw)')
    s.add_argument('--grad-accum', type=at_least(1, '--grad-accum'), default=1, help='micro-batches per step (default 1)')
    s.add_argument('--num-classes', type=at_least(1, '--num-classes'),
                   help='head size (default: the model\'s own; 1000 when it has none)')
    s.add_argument('--json', action='store_true', help='print one JSON object (a list of them for --sweep)')
    s.add_argument('--dump', metavar='DIR', help='write the StableHLO, the optimized HLO text and the JSON to DIR')
    s.add_argument('--sweep', type=_sweep, action='append', metavar='KEY=V1,V2',
                   help=f'compile every combination; KEY one of {", ".join(SWEEP_KEYS)} (mesh values separated '
                   'by ";", remat off for none); prints a table, writes --out.csv and --out.png')
    s.add_argument('--out', default='xla_sweep', help='--sweep: output prefix for .csv and .png (default xla_sweep)')
    s.add_argument('--max-batch', action='store_true',
                   help='find the largest global batch that fits, searching from --batch (each probe is a compile: '
                   'memory is extrapolated from the bytes XLA reports, with bisection as the safeguard)')
    set_adder(s)
    s.set_defaults(fn=cmd_xla)
    return s


def _setting_args(a, over: dict):
    """(training namespace, model fields) for one setting: `over` holds sweep values."""
    from vit_train import config
    from vit_train.plan import parse_target
    platform, _ = parse_target(over.get('target', a.target))
    remat = over.get('remat', a.remat)
    remat = None if remat in (None, 'off', 'none') else remat
    dtype = over.get('dtype', a.dtype) or ('bfloat16' if platform == 'tpu' else 'float32')
    if dtype not in ('float32', 'bfloat16'):
        from vit_train.errors import TrainError
        raise TrainError(f'--dtype {dtype!r}: choose float32 or bfloat16')
    ns = config.from_python(dict(model=a.model, batch_size=int(over.get('batch', a.batch or 1)), dtype=dtype,
                                 mesh=over.get('mesh', a.mesh), remat=remat, optimizer=a.optimizer,
                                 grad_accum=a.grad_accum, workdir=os.path.join(os.sep, 'tmp', 'vit-flax-xla-unused')))
    args = config.resolve(ns)
    extra = dict(a.set or [])
    scan = over.get('scan_blocks', a.scan_blocks)
    if isinstance(scan, str):
        scan = scan.lower() in ('1', 'true', 'yes', 'on')
    if scan:
        extra['scan_blocks'] = True
    impl = over.get('attn_impl', a.attn_impl)
    if impl:
        extra['attn_impl'] = impl
    return args, extra


def _num_classes(a) -> int:
    import vit_flax
    from vit_train.errors import TrainError
    try:
        cls, cfg = vit_flax.model_config(a.model)
    except KeyError as e:
        raise TrainError(e.args[0]) from None
    if a.num_classes:
        return a.num_classes
    n = cfg.get('num_classes', cls.__dataclass_fields__['num_classes'].default
                if 'num_classes' in cls.__dataclass_fields__ else 1000)
    return n or 1000


def _default_batch(a) -> int:
    from vit_train.plan import target_devices
    return 8 * len(target_devices(a.target)[1])


def _plan_one(a, over, num_classes, dump=None):
    from vit_train import plan
    args, extra = _setting_args(a, over)
    return plan.plan(args, a.target, num_classes, train=a.train, extra=extra, dump=dump)


def cmd_xla(a):
    from vit_train import plan
    from vit_train.errors import TrainError
    try:
        plan.parse_target(a.target)
        num_classes = _num_classes(a)
        if a.batch is None:
            a.batch = _default_batch(a)
        if a.sweep:
            return _do_sweep(a, num_classes)
        if a.max_batch:
            return _do_max_batch(a, num_classes)
        p = _plan_one(a, {}, num_classes, a.dump)
    except TrainError as e:
        print(f'vit-flax xla: error: {e}', file=sys.stderr)
        return 1
    if a.dump:
        with open(os.path.join(a.dump, 'plan.json'), 'w') as f:
            json.dump(p, f, indent=1)
    print(json.dumps(p) if a.json else plan.describe(p))
    return 0 if p['fits'] else 1


def _do_max_batch(a, num_classes):
    from vit_train import plan
    from vit_train.plan import target_devices
    ndev = len(target_devices(a.target)[1])
    best, p, nxt = plan.max_batch(lambda n: _plan_one(a, dict(batch=n), num_classes), a.batch, ndev * a.grad_accum)
    out = dict(max_batch=best, max_batch_per_device=best // ndev, next_batch=nxt, plan=p)
    if a.json:
        print(json.dumps(out))
    else:
        if p:
            print(plan.describe(p))
        print(f'largest batch that fits on {a.target}: {best} ({best // ndev} per device)'
              + (f'; {nxt} does not fit' if nxt else '; (the search limit still fits)'))
    return 0 if best else 1


def _label(over: dict) -> str:
    return ' '.join(f'{k}={v}' for k, v in over.items())


def _do_sweep(a, num_classes):
    import csv
    keys = [k for k, _ in a.sweep]
    rows = []
    for values in itertools.product(*[v for _, v in a.sweep]):
        over = dict(zip(keys, values))
        p = _plan_one(a, over, num_classes)
        rows.append((over, p))
        if not a.json:
            print(f'compiled {_label(over)}: fits {p["fits"]} in {p["compile_seconds"]:.1f} s', file=sys.stderr)
    cols = ('fits', 'peak_bytes', 'temp_bytes', 'argument_bytes', 'flops', 'bytes_accessed', 'roofline_seconds',
            'images_per_sec_per_chip', 'fusions', 'compile_seconds')
    with open(a.out + '.csv', 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(keys + list(cols))
        for over, p in rows:
            w.writerow([over[k] for k in keys] + [p.get(c) for c in cols])
    try:
        _plot(rows, a.out + '.png', a)
        wrote = f'{a.out}.csv and {a.out}.png'
    except ImportError:
        wrote = f'{a.out}.csv (no PNG: matplotlib is not installed; pip install matplotlib)'
    if a.json:
        print(json.dumps([dict(p, setting=over) for over, p in rows]))
        return 0
    g = lambda n: '-' if n is None else f'{n / 2 ** 30:.2f}'  # noqa: E731
    head = f'{"setting":<32} {"fits":>4} {"peak GiB":>9} {"temp GiB":>9} {"GFLOP":>9} {"img/s/chip":>10} {"compile s":>9}'
    print(head)
    for over, p in rows:
        ips = p.get('images_per_sec_per_chip')
        print(f'{_label(over):<32} {"yes" if p["fits"] else "NO":>4} {g(p["peak_bytes"]):>9} {g(p["temp_bytes"]):>9} '
              f'{"-" if p.get("flops") is None else format(p["flops"] / 1e9, ".1f"):>9} '
              f'{"-" if ips is None else format(ips, ".0f"):>10} {p["compile_seconds"]:>9.1f}')
    print(f'wrote {wrote}')
    return 0


def _plot(rows, path, a):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    labels = [_label(o) for o, _ in rows]
    peak = [(p['peak_bytes'] or 0) / 2 ** 30 for _, p in rows]
    ips = [p.get('images_per_sec_per_chip') or 0 for _, p in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.2 * len(rows) + 4), 4))
    ax1.bar(range(len(rows)), peak, color=['C0' if p['fits'] else 'C3' for _, p in rows])
    ax1.axhline(rows[0][1]['memory_bytes'] / 2 ** 30, color='k', ls='--', lw=1, label='device memory')
    ax1.set_ylabel('peak memory per device (GiB)')
    ax1.legend()
    ax2.bar(range(len(rows)), ips, color='C2')
    ax2.set_ylabel('roofline images/s per chip (upper bound)')
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha='right', fontsize=8)
    fig.suptitle(f'{a.model} {"training step" if a.train else "forward"} on {a.target}')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
