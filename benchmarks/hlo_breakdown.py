"""What XLA compiled for a step, grouped by kind: the optimized HLO's top-level operations counted and sized.

    python benchmarks/hlo_breakdown.py [--model vit_small_patch16_224] [--dtype bfloat16] [--batch 16]
        [--forward] [--by where] [--hlo optimized_hlo.txt] [--json FILE]

The step is the one train_flax.py runs (AdamW, 1000 classes, one CPU device): vit_train.plan compiles it with
the run's own builders (loop.build_model, loop.state_spec, loop.jit_steps), so this is exactly what a
training run executes; `--forward` takes the eval step (normalise, forward, loss sums) instead. `--hlo FILE`
reads an optimized HLO text already dumped (`train_flax.py --plan --plan-dump DIR`, `vit-flax xla --dump`).

Each top-level instruction of the entry computation (and of while bodies, counted once: XLA's cost analysis
does the same) is put in one group, by what it does:

  dot          a dot, alone or in its fusion (XLA:CPU's YNNPACK/oneDNN custom fusions, or a loop fusion around
               one); listed per `lhs x rhs -> out` dtypes, with its FLOPs (2 x out elements x contracted size)
  convert      a fusion (or op) that only changes dtypes (with bitcasts/broadcasts/reshapes)
  transpose    a transpose or copy (a layout change), alone or fused, with or without a dtype change
  reduction    a fusion with a reduce or reduce-window and no dot
  elementwise  every other loop fusion or arithmetic op
  data         concatenate, slice, pad, dynamic-(update-)slice, gather, scatter, iota
  broadcast    a broadcast alone
Bytes are each instruction's operands read plus its output written (XLA's own per-op estimate, before
caching), so they add up to about XLA's "bytes accessed". Bitcasts, parameters, constants and tuples move
no data and are not counted. `--by where` splits every group by phase (fwd: the forward, bwd: its
transpose, i.e. the backward, other: the optimizer update and the input) and by the model part the
instruction's metadata names (LayerNorm, attention, MLP dense layers, GELU, ...).

Prints XLA's cost analysis (FLOPs, bytes accessed) and the memory analysis beside the groups. Nothing here
depends on the machine's load: compiling twice gives the same figures.

`--time-dots` (the one part that does depend on the machine) also runs every distinct dot of the program alone,
as compiled (its operand shapes, dtypes and dimension numbers, float32 or bf16 x bf16 -> float32), and prints each
one's median time and rate and their sum weighted by count: what the step's dots take when each runs as its own
program, against which the step's own time says how much goes to everything else. A dot alone is not always as
fast as inside the step: XLA:CPU runs a batched bf16 product that writes its whole float32 output on one thread
(CPU time = wall time at ViT-S/16's attention shapes), where fused with its consumers it can take both cores.
"""
import argparse
import collections
import json
import os
import re
import sys
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
         's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16, 'token': 0}
FREE = {'parameter', 'constant', 'bitcast', 'tuple', 'get-tuple-element', 'after-all', 'opt-barrier'}
SHAPE_ONLY = {'bitcast', 'reshape', 'broadcast', 'parameter', 'constant', 'tuple', 'get-tuple-element'}
DATA = {'concatenate', 'slice', 'pad', 'dynamic-slice', 'dynamic-update-slice', 'gather', 'scatter', 'iota',
        'reverse'}
LAYOUT = {'transpose', 'copy'}
_ARRAY = re.compile(r'\b(pred|[suf]\d+|bf16|c64|c128|token)\[([\d,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$')
_COMP = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*->.*\{\s*$')


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string ('f32[16,197,384]{2,1,0}', or a tuple of them)."""
    total = 0
    for dt, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(',')):
            n *= int(d)
        total += n * BYTES.get(dt, 4)
    return total


def _dims(shape: str):
    m = _ARRAY.search(shape)
    return (m.group(1), [int(d) for d in filter(None, m.group(2).split(','))]) if m else (None, [])


class Instr:
    __slots__ = ('name', 'shape', 'op', 'operands', 'rest')

    def __init__(self, name, shape, op, args):
        self.name, self.shape, self.op = name, shape, op
        depth, i = 1, 0
        while i < len(args) and depth:   # the operand list ends at the matching parenthesis
            depth += {'(': 1, ')': -1}.get(args[i], 0)
            i += 1
        self.operands = re.findall(r'%([\w.\-]+)', args[:i - 1])
        self.rest = args[i:]

    def int_list(self, key) -> tuple:
        """`key={1,2}` of the instruction's attributes as (1, 2); () when absent or empty."""
        m = re.search(key + r'=\{([\d,]*)\}', self.rest)
        return tuple(int(x) for x in m.group(1).split(',') if x) if m else ()

    def attr(self, key):
        m = re.search(key + r'=%?([\w.\-]+)', self.rest)
        return m.group(1) if m else None

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.rest)
        return m.group(1) if m else ''


def parse(text: str):
    """{computation name: [Instr]}, and the entry computation's name."""
    comps, entry, cur = {}, None, None
    for line in text.splitlines():
        if cur is None:
            m = _COMP.match(line)
            if m:
                cur = comps.setdefault(m.group(1), [])
                if line.startswith('ENTRY'):
                    entry = m.group(1)
            continue
        if line.startswith('}'):
            cur = None
            continue
        m = _INSTR.match(line)
        if m:
            cur.append(Instr(m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _dot_info(ins: Instr, table: dict):
    """(key 'bf16 x bf16 -> f32', flops, batched) of a dot instruction; `table` names its operands' shapes."""
    lhs, rhs = (table[o].shape if o in table else '' for o in ins.operands[:2])
    (lt, ldims), (rt, _), (ot, odims) = _dims(lhs), _dims(rhs), _dims(ins.shape)
    k = 1
    for d in ins.int_list('lhs_contracting_dims'):
        k *= ldims[d] if d < len(ldims) else 1
    n = 1
    for d in odims:
        n *= d
    return f'{lt} x {rt} -> {ot}', 2 * n * k, 'lhs_batch_dims' in ins.rest


def classify(ins: Instr, comps: dict, scope: dict):
    """(group, detail, flops) of one top-level instruction; `scope` names the instructions of its computation."""
    body = comps.get(ins.attr('calls')) if ins.op == 'fusion' else None
    ops = list(body) if body is not None else [ins]
    table = {i.name: i for i in body} if body is not None else scope
    kinds = {i.op for i in ops}
    dots = [i for i in ops if i.op in ('dot', 'convolution')]
    if dots:
        key, flops, batched = _dot_info(dots[0], table)
        extra = sorted(kinds - SHAPE_ONLY - {'dot', 'convolution'})
        detail = key + (' batched' if batched else '') + (' +' + '+'.join(extra) if extra else '')
        return 'dot', detail, sum(_dot_info(d, table)[1] for d in dots)
    if ins.op == 'custom-call':
        return 'other', ins.attr('custom_call_target') or 'custom-call', 0
    real = kinds - SHAPE_ONLY
    if not real and 'broadcast' in kinds:
        return 'broadcast', _dims(ins.shape)[0], 0
    if not real:
        return 'transpose', 'copy (bitcasts/reshapes only)', 0
    out_dt = _dims(ins.shape)[0]
    if real and real <= {'convert'}:
        src = sorted({_dims(table[i.operands[0]].shape)[0] for i in ops if i.op == 'convert' and i.operands
                      and i.operands[0] in table})
        return 'convert', f'{"/".join(src) or "?"} -> {out_dt}', 0
    if real and real <= LAYOUT | {'convert'}:
        return 'transpose', ins.op if body is None else '+'.join(sorted(real)), 0
    if kinds & {'reduce', 'reduce-window'}:
        return 'reduction', out_dt, 0
    if real and real <= DATA | {'convert'}:
        return 'data', '+'.join(sorted(real)), 0
    return 'elementwise', out_dt, 0


PARTS = (('attention', ('MultiHeadDotProductAttention', '/attn/', 'Attention')),
         ('mlp', ('MlpBlock', '/mlp/')), ('layernorm', ('LayerNorm', 'encoder_norm', '/norm')),
         ('patch-embed', ('embedding', 'patch_embed')), ('head', ('head',)), ('posemb', ('posembed',)))


def where(ins: Instr):
    """(phase, part) from the instruction's metadata op_name: the phase fwd (the forward), bwd (its
    transpose: the backward) or other (no model in the name: the optimizer update, the input, the loss); the
    part the innermost model module named (an attention, an MLP, a norm, ...), 'block' for the residual adds
    between them. Instructions XLA made itself (the copies it inserts) carry no name: 'unnamed'."""
    name = ins.op_name
    if not name:
        return 'other', 'unnamed'
    phase = 'bwd' if 'transpose(' in name else ('fwd' if 'VisionTransformer' in name or 'Swin' in name else 'other')
    hits = [(name.rfind(k), part) for part, keys in PARTS for k in keys if k in name]
    if hits:
        return phase, max(hits)[1]
    if phase != 'other':
        return phase, 'block'
    return phase, 'optimizer/loss/input'


def breakdown(text: str, by_where: bool = False) -> dict:
    """{'groups': {group: {'count', 'bytes', 'flops', 'detail': {detail: {'count', 'bytes', 'flops'}}}},
    'where': {(phase, part): {group: count/bytes}}, 'totals': {...}} over the entry and its while bodies."""
    comps, entry = parse(text)
    todo, seen, top = [entry], set(), []
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for ins in comps[c]:
            if ins.op == 'while':
                todo += [ins.attr('body'), ins.attr('condition')]
            elif ins.op in ('call', 'conditional'):
                todo += re.findall(r'%([\w.\-]+)', ins.rest.split('metadata=')[0])
            else:
                top.append((c, ins))
    groups = collections.OrderedDict((g, dict(count=0, bytes=0, flops=0, detail={})) for g in
                                     ('dot', 'convert', 'transpose', 'reduction', 'elementwise', 'data', 'broadcast',
                                      'other'))
    wh = collections.defaultdict(lambda: collections.defaultdict(lambda: [0, 0, 0]))
    for c, ins in top:
        if ins.op in FREE or ins.op in ('while', 'call', 'conditional'):
            continue
        table = {i.name: i for i in comps[c]}
        nbytes = shape_bytes(ins.shape) + sum(shape_bytes(table[o].shape) for o in ins.operands if o in table)
        g, detail, flops = classify(ins, comps, table)
        row = groups[g]
        row['count'] += 1
        row['bytes'] += nbytes
        row['flops'] += flops
        d = row['detail'].setdefault(detail, dict(count=0, bytes=0, flops=0))
        d['count'] += 1
        d['bytes'] += nbytes
        d['flops'] += flops
        if by_where:
            cell = wh[where(ins)][g]
            cell[0] += 1
            cell[1] += nbytes
            cell[2] += flops
    totals = dict(count=sum(r['count'] for r in groups.values()), bytes=sum(r['bytes'] for r in groups.values()),
                  flops=sum(r['flops'] for r in groups.values()))
    return dict(groups=groups, totals=totals,
                where={f'{p} {w}': {g: dict(count=v[0], bytes=v[1], flops=v[2]) for g, v in cells.items()}
                       for (p, w), cells in sorted(wh.items())})


def _mb(n):
    return f'{n / 1e6:9.1f}'


def render(b: dict, head: str = '', details: bool = True) -> str:
    lines = [head] if head else []
    lines.append(f'{"group":<12} {"count":>6} {"MB r+w":>9} {"GFLOP":>8}   detail (count, MB, GFLOP)')
    for g, r in b['groups'].items():
        if not r['count']:
            continue
        lines.append(f'{g:<12} {r["count"]:>6} {_mb(r["bytes"])} {r["flops"] / 1e9:8.2f}')
        if details:
            for d, v in sorted(r['detail'].items(), key=lambda kv: -kv[1]['bytes']):
                fl = f', {v["flops"] / 1e9:.2f}' if v['flops'] else ''
                lines.append(f'{"":<12} {"":>6} {"":>9} {"":>8}   {d}: {v["count"]}, {v["bytes"] / 1e6:.1f}{fl}')
    t = b['totals']
    lines.append(f'{"total":<12} {t["count"]:>6} {_mb(t["bytes"])} {t["flops"] / 1e9:8.2f}')
    if b.get('where'):
        lines.append('')
        lines.append(f'{"phase part":<22} ' + ' '.join(f'{g[:11]:>16}' for g in b['groups']) + '   (count/MB)')
        for key, cells in b['where'].items():
            lines.append(f'{key:<22} ' + ' '.join(
                f'{(str(cells[g]["count"]) + "/" + format(cells[g]["bytes"] / 1e6, ".0f")) if g in cells else "":>16}'
                for g in b['groups']))
    return '\n'.join(lines)


def compile_step(model, dtype, batch, forward, extra=None):
    """(optimized HLO text, the plan dict) of the step vit_train would run."""
    from vit_train import config, plan
    fields = dict(model=model, batch_size=batch, dtype=dtype, workdir=os.path.join(tempfile.gettempdir(), 'hlo-wd'))
    args = config.resolve(config.from_python(fields))
    with tempfile.TemporaryDirectory() as d:
        p = plan.plan(args, 'cpu', 1000, train=not forward, dump=d, extra=extra or {})
        with open(os.path.join(d, 'optimized_hlo.txt')) as f:
            return f.read(), p


def dot_shapes(text: str) -> collections.Counter:
    """{(lhs dtype, lhs dims, rhs dtype, rhs dims, out dtype, dimension numbers): count} of every dot in the
    program, fused or not."""
    comps, _ = parse(text)
    dots = collections.Counter()
    for instrs in comps.values():
        table = {i.name: i for i in instrs}
        for i in instrs:
            if i.op != 'dot' or not all(o in table for o in i.operands[:2]):
                continue
            (lt, ld), (rt, rd) = (_dims(table[o].shape) for o in i.operands[:2])
            dn = ((i.int_list('lhs_contracting_dims'), i.int_list('rhs_contracting_dims')),
                  (i.int_list('lhs_batch_dims'), i.int_list('rhs_batch_dims')))
            dots[(lt, tuple(ld), rt, tuple(rd), _dims(i.shape)[0], dn)] += 1
    return dots


def time_dots(text: str, repeats: int = 15) -> list:
    """[(count, key, median ms, flops)] of every distinct dot of `text`, each jitted and run alone (compiled by a
    first call, then `repeats` timed calls: bench_vs_timm's timing)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    from bench_vs_timm import timed_calls
    dtypes = {'bf16': jnp.bfloat16, 'f32': jnp.float32, 'f16': jnp.float16}
    rows = []
    for key, n in sorted(dot_shapes(text).items(), key=lambda kv: -kv[1]):
        lt, ld, rt, rd, ot, dn = key
        a = jax.random.normal(jax.random.PRNGKey(0), ld).astype(dtypes[lt])
        b = jax.random.normal(jax.random.PRNGKey(1), rd).astype(dtypes[rt])
        f = jax.jit(lambda a, b, dn=dn, ot=ot: jax.lax.dot_general(a, b, dn, preferred_element_type=dtypes[ot]))
        ts = timed_calls(lambda: f(a, b).block_until_ready(), repeats, warmup=0, budget=float('inf'))[1]
        out = int(np.prod(jax.eval_shape(f, a, b).shape))
        rows.append((n, key, float(np.median(ts)) * 1e3, 2 * out * int(np.prod([ld[d] for d in dn[0][0]]))))
    return rows


def render_dots(rows: list) -> str:
    lines = ['every dot alone (count x lhs . rhs, contracting and batch dims -> out: median ms, GFLOP/s):']
    for n, (lt, ld, rt, rd, ot, dn), ms, fl in rows:
        lines.append(f'  {n:3d} x {lt}{list(ld)} . {rt}{list(rd)} c{dn[0]} b{dn[1]} -> {ot}: '
                     f'{ms:7.2f} ms {fl / ms / 1e6:6.0f}')
    ms, fl = sum(n * t for n, _, t, _ in rows), sum(n * f for n, _, _, f in rows)
    lines.append(f'{sum(r[0] for r in rows)} dots, {fl / 1e9:.1f} GFLOP: {ms:.0f} ms a step if each ran as it does '
                 f'alone ({fl / ms / 1e6:.0f} GFLOP/s)')
    return '\n'.join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='vit_small_patch16_224')
    ap.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--forward', action='store_true', help='the eval step (forward) instead of the training step')
    ap.add_argument('--hlo', help='read this optimized HLO text instead of compiling')
    ap.add_argument('--by', choices=('kind', 'where'), default='kind', help="'where': also by phase and model part")
    ap.add_argument('--no-details', action='store_true')
    ap.add_argument('--json', help='write the breakdown (and the plan figures) here')
    ap.add_argument('--time-dots', action='store_true',
                    help="also run every distinct dot alone and sum their times (depends on the machine's load)")
    a = ap.parse_args(argv)
    p = {}
    if a.hlo:
        with open(a.hlo) as f:
            text = f.read()
        head = a.hlo
    else:
        text, p = compile_step(a.model, a.dtype, a.batch, a.forward)
        what = 'forward (eval step)' if a.forward else 'AdamW training step'
        head = f'{a.model} {what}, compute {a.dtype}, batch {a.batch}, XLA:CPU'
    b = breakdown(text, by_where=a.by == 'where')
    print(render(b, head, details=not a.no_details))
    if p:
        print(f"XLA cost analysis: {p['flops'] / 1e9:.1f} GFLOP, {p['bytes_accessed'] / 1e9:.2f} GB accessed; "
              f"model FLOPs {p['model_flops'] / 1e9:.1f} G; temp {p['temp_bytes'] / 2 ** 20:.0f} MiB, "
              f"arguments {p['argument_bytes'] / 2 ** 20:.0f} MiB ({p['param_bytes'] / 2 ** 20:.0f} params, "
              f"{p['opt_state_bytes'] / 2 ** 20:.0f} optimizer state); {p['fusions']} fusions")
    dots = time_dots(text) if a.time_dots else None
    if dots:
        print(render_dots(dots))
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(breakdown=b, plan={k: v for k, v in p.items() if isinstance(v, (int, float, str, type(None)))},
                           head=head, dots_alone=[dict(count=n, dot=str(k), ms=t, flops=fl) for n, k, t, fl in dots or []]),
                      f, indent=1, default=str)
    return 0


if __name__ == '__main__':
    sys.exit(main())
