"""The tables of docs/XLA.md: deviceless TPU compiles of real training steps, one CSV row per compile.

    JAX_PLATFORMS=cpu .venv-tpu/bin/python benchmarks/xla_tables.py runs/xla.csv [--only PART,...] [--skip FILES]
    JAX_PLATFORMS=cpu .venv-tpu/bin/python benchmarks/xla_tables.py runs/xla.csv --row maxbatch-probe:vit_b16:v5e:2x2:320:full
    .venv-tpu/bin/python benchmarks/xla_tables.py --markdown runs/xla.csv ... [--write docs/XLA.md]

Every row is vit_train.plan.plan(...) for an AdamW bf16 training step (1000 classes, mesh data=N over the
slice), appended (and flushed) as soon as it is done, with the load average it was compiled under, so a partial
run still fills the doc. Parts (PARTS, the default order: the most wanted rows first): `v5e`, `v5p`, `v6e`
(ViT-B/16, ViT-L/16, Swin-B at 256 images per chip, remat off/on), `dinov2` (DINOv2-L/14 at 518 on the three),
`dinov2-fit` (DINOv2-L/14 at 518 on v5e:2x2 with remat at 64 and 16 per chip: a row that fits),
`--row PART:MODEL:GEN:SHAPE:PER_CHIP:REMAT` (repeatable) compiles one setting instead of the parts (a
max-batch probe picked by hand, a row a part does not list). `published` (ViT-S/16 on v5p:2x2x1 at 256 per chip: big_vision's published
v3-8 run, docs/XLA.md), `maxbatch` (largest batch per chip on v5e:2x2, remat off/on, by vit_train.plan.max_batch; every probe is logged as
a `maxbatch-probe` row; `maxbatch-off` / `maxbatch-full` split it), `scan` (ViT-B/16 and ViT-L/16 under nn.scan,
against the unrolled v5e remat rows). `--skip` names CSVs and docs/XLA.md: settings already measured there are
not compiled again. `--markdown` renders the rows as docs/XLA.md's table and, with `--write`, replaces the table
between its markers, keeping the doc's rows that no CSV measures again. Needs libtpu (`pip install
'vit-flax-tools[tpu]'`). Each compile takes ~0.5-3 CPU-minutes, 5-20x that in wall time on a loaded machine.
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
          'images_per_sec_per_chip', 'mfu_bound', 'fusions', 'collectives', 'compile_seconds', 'loadavg', 'error', 'note')
MODELS = {'vit_s16': ('vit_small_patch16_224', {}), 'vit_b16': ('vit_base_patch16_224', {}), 'vit_l16': ('vit_large_patch16_224', {}),
          'swin_b': ('swin_base_patch4_window7_224', {}), 'dinov2_l14': ('vit_large_patch14_dinov2', {})}
TARGETS = ('tpu:v5e:2x2', 'tpu:v5p:2x2x1', 'tpu:v6e:2x2')


def one(model, target, per_chip, remat=None, extra=None):
    args = config.resolve(config.from_python(dict(model=model, batch_size=per_chip * 4, dtype='bfloat16',
                                                  remat=remat, workdir='/tmp/xla-tables-unused')))
    try:
        return plan.plan(args, target, 1000, train=True, extra=extra or {})
    except Exception as e:  # noqa: BLE001 - a row that failed says why (e.g. a libtpu UNIMPLEMENTED)
        return dict(target=target, fits=None, error=f'{type(e).__name__}: {str(e).splitlines()[0][:200]}')


PARTS = ('v5e', 'v5p', 'v6e', 'dinov2', 'dinov2-fit', 'maxbatch', 'scan', 'published')   # the default order: the most wanted rows first


def jobs(part):
    """(part, model key, target, per chip, remat, scan, max-batch?) of one part, in the order they run."""
    remats = (None, 'full')
    if part in ('v5e', 'v5p', 'v6e'):   # ViT-B/16, ViT-L/16, Swin-B at 256 per chip, remat off/on
        return [('matrix', key, TARGET_OF[part], 256, remat, False, False)
                for key in ('vit_b16', 'vit_l16', 'swin_b') for remat in remats]
    if part == 'dinov2':
        return [('dinov2', 'dinov2_l14', target, 256, remat, False, False) for target in TARGETS for remat in remats]
    if part == 'dinov2-fit':   # 256 images of 518 px per chip cannot fit a v5e even with remat (the 24 block inputs
        # alone are ~17 GB); 64 and 16 per chip were refused too (>= 37.14 and 17.24 GiB of temporaries): 8 per chip
        return [('dinov2', 'dinov2_l14', 'tpu:v5e:2x2', n, 'full', False, False) for n in (64, 16, 8)]
    if part.startswith('maxbatch'):   # maxbatch, maxbatch-off, maxbatch-full (to split the work)
        rs = {'maxbatch': remats, 'maxbatch-off': (None,), 'maxbatch-full': ('full',)}[part]
        return [('maxbatch', key, 'tpu:v5e:2x2', None, remat, False, True) for key in ('vit_b16', 'vit_l16') for remat in rs]
    if part == 'scan':   # against the matrix's unrolled v5e remat rows: the same step, blocks under nn.scan
        return [('scan', key, 'tpu:v5e:2x2', 256, 'full', True, False) for key in ('vit_b16', 'vit_l16')]
    if part == 'published':   # big_vision's ViT-S/16 i1k run (batch 1024 on a v3-8, 256 per chip): libtpu compiles for no
        # v3 and its v4 topologies come as one device per core, which jax's meshes refuse; the step's FLOPs and bytes
        # from a v5p (megacore, one device per chip, room without remat) are then held against v3's specs
        return [('published', 'vit_s16', 'tpu:v5p:2x2x1', 256, None, False, False)]
    raise SystemExit(f'unknown part {part!r}: one of {", ".join(PARTS)}, maxbatch-off, maxbatch-full')


TARGET_OF = {t.split(':')[1]: t for t in TARGETS}


def done_keys(paths):
    """The settings already measured (part, model, target, batch per chip or '' for a max-batch search, remat,
    scan): rows of these CSVs, and of docs/XLA.md's table (a run that only adds)."""
    keys = set()
    for path in paths:
        if path.endswith('.md'):
            for _, r in doc_rows(path):
                keys.add((r[0], r[1], 'tpu:' + r[2], '' if r[0] == 'maxbatch' else r[3], r[4], r[5] == 'True'))
        elif os.path.exists(path):
            for r in csv.DictReader(open(path)):
                if r.get('fits') in ('True', 'False'):
                    keys.add((r['part'], r['model'], r['target'], '' if r['part'] == 'maxbatch' else r['batch_per_chip'],
                              r['remat'], r['scan'] == 'True'))
    return keys


def parse_row(text):
    """'PART:MODEL:GEN:SHAPE:PER_CHIP:REMAT' (--row) -> one jobs() entry; a bad one is a one-line exit."""
    f = text.split(':')
    if len(f) != 6 or f[1] not in MODELS or not f[4].isdigit() or f[5] not in ('off', 'full'):
        raise SystemExit(f'--row {text!r}: PART:MODEL:GEN:SHAPE:PER_CHIP:REMAT, MODEL one of {", ".join(MODELS)}, '
                         f'REMAT off or full (e.g. maxbatch-probe:vit_b16:v5e:2x2:320:full)')
    return (f[0], f[1], f'tpu:{f[2]}:{f[3]}', int(f[4]), None if f[5] == 'off' else 'full', False, False)


def main(path, only=None, skip=(), rows=()):
    plan.quiet_libtpu_env()
    new = not os.path.exists(path)
    f = open(path, 'a', newline='')
    w = csv.DictWriter(f, FIELDS, extrasaction='ignore')
    if new:
        w.writeheader()
    done = done_keys(skip)

    def row(part, key, p, per_chip, remat, scan=False, note=''):
        r = dict(p, part=part, model=key, batch_per_chip=per_chip, remat=remat or 'off', scan=scan, note=note,
                 loadavg=f'{os.getloadavg()[0]:.1f}')
        r['collectives'] = ' '.join(f'{k}:{v}' for k, v in (p.get('collectives') or {}).items())
        w.writerow(r)
        f.flush()
        print(time.strftime('%H:%M:%S'), part, key, p.get('target'), per_chip, remat, scan, 'fits', p.get('fits'),
              p.get('compile_seconds'), p.get('error', ''), 'load', r['loadavg'], flush=True)

    for part in ([None] if rows else only or PARTS):
        for kind, key, target, per_chip, remat, scan, search in (rows if part is None else jobs(part)):
            if (kind, key, target, '' if search else str(per_chip), remat or 'off', scan) in done:
                print('already measured:', kind, key, target, remat or 'off', 'scan' if scan else '', flush=True)
                continue
            extra = dict(scan_blocks=True) if scan else None
            if not search:
                row(kind, key, one(MODELS[key][0], target, per_chip, remat, extra), per_chip, remat, scan)
                continue
            def probe(n, key=key, remat=remat):   # every probe is logged: an interrupted search still says something
                p = one(MODELS[key][0], target, n // 4, remat)
                row('maxbatch-probe', key, p, n // 4, remat)
                return p
            best, p, nxt = plan.max_batch(probe, 4 * (256 if remat else 128), 4 * 8)   # per chip in steps of 8
            row('maxbatch', key, p or dict(target=target, fits=False), best // 4, remat,
                note=f'next tried: {None if nxt is None else nxt // 4} per chip does not fit')
    f.close()


BEGIN, END = '<!-- table: benchmarks/xla_tables.py --markdown -->', '<!-- /table -->'


def doc_rows(doc):
    """(line, cells) of the table between BEGIN and END in `doc` (docs/XLA.md), header and rule left out."""
    text = open(doc).read()
    if BEGIN not in text:
        return []
    body = text.split(BEGIN, 1)[1].split(END, 1)[0]
    out = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        out.append((line, cells))
    return out


HEADER = ('| part | model | target | batch/chip | remat | scan | fits | params+opt GiB | temp GiB | peak (or needed) GiB '
          '| TFLOP/step/chip | XLA/analytic | GB accessed | roofline img/s/chip | bound | compile s | load |')
ORDER = dict(part=('matrix', 'dinov2', 'maxbatch', 'maxbatch-probe', 'scan', 'published'), model=tuple(MODELS), target=('v5e', 'v5p', 'v6e'),
             remat=('off', 'full'))


def _cells(r) -> list:
    """One CSV row as the table's cells."""
    g = lambda v: '-' if v in ('', None) else f'{float(v) / 2 ** 30:.2f}'  # noqa: E731
    f = lambda v, d=0: '-' if v in ('', None) else f'{float(v):.{d}f}'  # noqa: E731
    fl, mf = r['flops'], r['model_flops']
    ratio = f'{float(fl) / float(mf):.3f}' if fl and mf else '-'
    state = (float(r['param_bytes']) + float(r['opt_state_bytes'])) if r['param_bytes'] else None
    bound = '-'
    if r['roofline_seconds'] and fl:
        spec = plan.TPU_SPECS[r['target'].split(':')[1]]
        bound = 'compute' if float(fl) / spec['peak_flops'] >= float(r['bytes_accessed']) / spec['hbm_bw'] else 'memory'
    # '>=': XLA refused the step (no temporaries, its "needed" figure); a compiled step over the HBM keeps its peak
    need = ('>= ' if r['fits'] == 'False' and r['peak_bytes'] and not r['temp_bytes'] else '') + g(r['peak_bytes'])
    ips = 'n/a (loop body counted once)' if r['scan'] == 'True' else f(r['images_per_sec_per_chip'])
    fits = r['fits'] or ('error: ' + r['error'][:60] if r.get('error') else '-')
    if r['part'] == 'maxbatch' and r.get('note'):   # 'next tried: N per chip does not fit'
        fits = f"largest (next: {r['note'].split(': ', 1)[1].split(' per')[0]} does not fit)"
    return [r['part'], r['model'], r['target'].replace('tpu:', ''), r['batch_per_chip'], r['remat'], r['scan'], fits,
            g(state), g(r['temp_bytes']), need, '-' if not fl else f'{float(fl) / 1e12:.2f}', ratio,
            '-' if not r['bytes_accessed'] else f"{float(r['bytes_accessed']) / 1e9:.1f}", ips, bound,
            f(r['compile_seconds']), r.get('loadavg') or '-']


def _key(cells):
    part, model, target, batch, remat, scan = cells[:6]
    return (part, model, target, '' if part == 'maxbatch' else batch, remat, scan)


def _rank(cells):
    pos = lambda seq, v: seq.index(v) if v in seq else len(seq)  # noqa: E731
    part, model, target, batch, remat, scan = cells[:6]
    return (pos(ORDER['part'], part), pos(ORDER['model'], model), pos(ORDER['target'], target.split(':')[0]),
            pos(ORDER['remat'], remat), scan, int(batch) if batch.isdigit() else 0)


def markdown(paths, doc=None) -> str:
    """docs/XLA.md's table: the rows of `doc`'s table (measured before, kept) updated by the rows of the CSVs
    (the last row per setting wins; every max-batch probe kept), in a fixed order. With `doc`, the table
    between its BEGIN and END markers is replaced. Returns the table's text."""
    rows = {}
    if doc:
        for line, cells in doc_rows(doc):
            rows[_key(cells)] = cells + ['-'] * (HEADER.count('|') - 1 - len(cells))   # older tables had no load column
    for path in paths:
        for r in csv.DictReader(open(path)):
            cells = _cells(r)
            rows[_key(cells)] = cells
    lines = [HEADER, '|' + '---|' * (HEADER.count('|') - 1)]
    lines += ['| ' + ' | '.join(c) + ' |' for c in sorted(rows.values(), key=_rank)]
    table = '\n'.join(lines)
    if doc:
        text = open(doc).read()
        head, rest = text.split(BEGIN, 1)
        open(doc, 'w').write(head + BEGIN + '\n' + table + '\n' + END + rest.split(END, 1)[1])
    print(table)
    return table


if __name__ == '__main__':
    if sys.argv[1] == '--markdown':   # --markdown CSV... [--write docs/XLA.md]
        rest = sys.argv[2:]
        doc = rest[rest.index('--write') + 1] if '--write' in rest else None
        markdown([a for a in rest if a not in ('--write', doc)], doc)
        sys.exit(0)
    only = None
    if '--only' in sys.argv:
        only = sys.argv[sys.argv.index('--only') + 1].split(',')
    skip = sys.argv[sys.argv.index('--skip') + 1].split(',') if '--skip' in sys.argv else ()
    rows = [parse_row(sys.argv[i + 1]) for i, a in enumerate(sys.argv) if a == '--row']
    sys.exit(main(sys.argv[1], only, skip, rows))

