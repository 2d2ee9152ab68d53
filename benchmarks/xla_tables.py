"""The tables of docs/XLA.md: deviceless TPU compiles of real training steps, one CSV row per compile.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python benchmarks/xla_tables.py runs/xla_tables.csv [--only PART,...]

Every row is vit_train.plan.plan(...) for an AdamW bf16 training step (1000 classes, mesh data=N over the
slice), appended (and flushed) as soon as it is done, so a partial run still fills the doc. Parts, in order:
`matrix` (ViT-B/16, ViT-L/16, Swin-B on v5e:2x2, v5p:2x2x1, v6e:2x2 at 256 images per chip, remat off/on),
`scan` (ViT-B/16 scanned vs unrolled), `maxbatch` (largest batch per chip on v5e:2x2, remat off/on),
`dinov2` (DINOv2-L/14 at 518); also `matrix-reversed`, `maxbatch-off`, `maxbatch-full` (to split the
work between two processes). Needs libtpu (`pip install 'vit-flax-tools[tpu]'`). Each compile takes ~0.5-3 min
on 2 CPU cores; the whole run about an hour.
"""
import csv
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from vit_train import config, plan  # noqa: E402

FIELDS = ('part', 'model', 'target', 'devices', 'batch_per_chip', 'remat', 'scan', 'fits', 'param_bytes',
          'opt_state_bytes', 'argument_bytes', 'output_bytes', 'alias_bytes', 'temp_bytes', 'peak_bytes',
          'memory_bytes', 'flops', 'model_flops', 'bytes_accessed', 'roofline_seconds', 'optimal_seconds',
          'images_per_sec_per_chip', 'mfu_bound', 'fusions', 'collectives', 'compile_seconds', 'error', 'note')
MODELS = {'vit_b16': ('vit_base_patch16_224', {}), 'vit_l16': ('vit_large_patch16_224', {}),
          'swin_b': ('swin_base_patch4_window7_224', {}), 'dinov2_l14': ('vit_large_patch14_dinov2', {})}
TARGETS = ('tpu:v5e:2x2', 'tpu:v5p:2x2x1', 'tpu:v6e:2x2')


def one(model, target, per_chip, remat=None, extra=None):
    args = config.resolve(config.from_python(dict(model=model, batch_size=per_chip * 4, dtype='bfloat16',
                                                  remat=remat, workdir='/tmp/xla-tables-unused')))
    try:
        return plan.plan(args, target, 1000, train=True, extra=extra or {})
    except Exception as e:  # noqa: BLE001 - a row that failed says why (e.g. a libtpu UNIMPLEMENTED)
        return dict(target=target, fits=None, error=f'{type(e).__name__}: {str(e).splitlines()[0][:200]}')


def main(path, only=None):
    plan.quiet_libtpu_env()
    new = not os.path.exists(path)
    f = open(path, 'a', newline='')
    w = csv.DictWriter(f, FIELDS, extrasaction='ignore')
    if new:
        w.writeheader()

    def row(part, key, p, per_chip, remat, scan=False, note=''):
        r = dict(p, part=part, model=key, batch_per_chip=per_chip, remat=remat or 'off', scan=scan, note=note)
        r['collectives'] = ' '.join(f'{k}:{v}' for k, v in (p.get('collectives') or {}).items())
        w.writerow(r)
        f.flush()
        print(time.strftime('%H:%M:%S'), part, key, p.get('target'), per_chip, remat, scan, 'fits', p.get('fits'),
              p.get('compile_seconds'), p.get('error', ''), flush=True)

    parts = only or ('matrix', 'scan', 'maxbatch', 'dinov2')
    for part in parts:
        if part in ('matrix', 'matrix-reversed'):
            jobs = [(key, target, remat) for key in ('vit_b16', 'vit_l16', 'swin_b') for target in TARGETS
                    for remat in (None, 'full')]
            for key, target, remat in (jobs[::-1] if part == 'matrix-reversed' else jobs):
                row('matrix', key, one(MODELS[key][0], target, 256, remat), 256, remat)
        if part == 'scan':   # against the matrix's unrolled vit_b16 v5e remat row: same step, blocks under nn.scan
            row('scan', 'vit_b16', one('vit_base_patch16_224', 'tpu:v5e:2x2', 256, 'full', dict(scan_blocks=True)), 256,
                'full', True)
        if part.startswith('maxbatch'):
            remats = {'maxbatch': (None, 'full'), 'maxbatch-off': (None,), 'maxbatch-full': ('full',)}[part]
            for key in ('vit_b16', 'vit_l16'):
                for remat in remats:
                    probe = lambda n, key=key, remat=remat: one(MODELS[key][0], 'tpu:v5e:2x2', n // 4, remat)  # noqa: E731
                    best, p, nxt = plan.max_batch(probe, 4 * 128, 4 * 8)   # per chip in steps of 8
                    row('maxbatch', key, p or dict(target='tpu:v5e:2x2', fits=False), best // 4, remat,
                        note=f'next tried: {None if nxt is None else nxt // 4} per chip does not fit')
        if part == 'v5e-off':   # refusals are cheap (seconds): the models that do not fit v5e without remat
            for key in ('vit_l16', 'swin_b', 'dinov2_l14'):
                row('matrix' if key != 'dinov2_l14' else 'dinov2', key, one(MODELS[key][0], 'tpu:v5e:2x2', 256, None),
                    256, None)
        if part == 'dinov2':
            for target in TARGETS:
                for remat in (None, 'full'):
                    row('dinov2', 'dinov2_l14', one(MODELS['dinov2_l14'][0], target, 256, remat), 256, remat)
    f.close()


def markdown(paths):
    """The rows of one or more CSVs as docs/XLA.md's tables (the last row per setting wins)."""
    rows = {}
    for path in paths:
        for r in csv.DictReader(open(path)):
            rows[(r['part'], r['model'], r['target'], r['batch_per_chip'], r['remat'], r['scan'])] = r
    g = lambda v: '-' if v in ('', None) else f'{float(v) / 2 ** 30:.2f}'  # noqa: E731
    f = lambda v, d=0: '-' if v in ('', None) else f'{float(v):.{d}f}'  # noqa: E731
    print('| part | model | target | batch/chip | remat | scan | fits | params+opt GiB | temp GiB | peak (or needed) GiB '
          '| TFLOP/step/chip | XLA/analytic | GB accessed | roofline img/s/chip | bound | compile s |')
    print('|' + '---|' * 16)
    for r in rows.values():
        fl, mf = r['flops'], r['model_flops']
        ratio = f'{float(fl) / float(mf):.3f}' if fl and mf else '-'
        state = (float(r['param_bytes']) + float(r['opt_state_bytes'])) if r['param_bytes'] else None
        bound = '-'
        if r['roofline_seconds'] and fl:
            spec = plan.TPU_SPECS[r['target'].split(':')[1]]
            bound = 'compute' if float(fl) / spec['peak_flops'] >= float(r['bytes_accessed']) / spec['hbm_bw'] else 'memory'
        need = ('>= ' if r['fits'] == 'False' and r['peak_bytes'] else '') + g(r['peak_bytes'])
        ips = 'n/a (loop body counted once)' if r['scan'] == 'True' else f(r['images_per_sec_per_chip'])
        fits = r['fits'] or ('error: ' + r['error'][:60] if r.get('error') else '-')
        print(f"| {r['part']} | {r['model']} | {r['target'][4:]} | {r['batch_per_chip']} | {r['remat']} | {r['scan']} "
              f"| {fits} | {g(state)} | {g(r['temp_bytes'])} | {need} "
              f"| {'-' if not fl else f'{float(fl) / 1e12:.2f}'} | {ratio} "
              f"| {'-' if not r['bytes_accessed'] else f'{float(r['bytes_accessed']) / 1e9:.1f}'} "
              f"| {ips} | {bound} | {f(r['compile_seconds'])} |")


if __name__ == '__main__':
    if sys.argv[1] == '--markdown':
        sys.exit(markdown(sys.argv[2:]))
    only = None
    if '--only' in sys.argv:
        only = sys.argv[sys.argv.index('--only') + 1].split(',')
    sys.exit(main(sys.argv[1], only))

