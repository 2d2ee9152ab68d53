"""Print `make fuzz`'s counts (fuzzing.write_counts' JSON) as a table: per reader, examples run and failures,
the CPU seconds its examples took in the test processes and examples per CPU second (what a loaded machine's
wall time hides: a quiet machine of N cores runs about N times that many a second, the readers side by side),
and whether each reached its target. Exit status 1 when a reader failed or fell short of its target.

    python tests/durability/fuzz_table.py fuzz-counts.json [--target 10000] [--dir-target 1000] [--seconds S]
"""
import argparse
import json
import sys

# readers of one directory per case (a checkpoint folder): their own, smaller target
DIRECTORY_READERS = ('orbax', 'training-checkpoint')
# checks in real processes (seconds each): counted, no target
PROCESS_SUFFIX = '(process)'


def rate(n: int, seconds) -> tuple:
    """('CPU s', 'ex/CPU s') cells; blank where no time was recorded (real processes: their CPU is theirs)."""
    if not seconds:
        return '', ''
    return f'{seconds:,.0f}', f'{n / seconds:,.1f}'


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('counts')
    p.add_argument('--target', type=int, default=10000)
    p.add_argument('--dir-target', type=int, default=1000)
    p.add_argument('--seconds', type=float, help='wall time of the run, printed under the table')
    a = p.parse_args(argv)
    with open(a.counts) as f:
        data = json.load(f)
    examples, failures, cpu = data.get('examples', {}), data.get('failures', {}), data.get('cpu_seconds', {})
    rows, bad = [], False
    for name in sorted(examples, key=lambda n: (n in DIRECTORY_READERS, n.startswith('vit-flax'), n)):
        n, fail = examples[name], failures.get(name, 0)
        goal = None if name.endswith(PROCESS_SUFFIX) else a.dir_target if name in DIRECTORY_READERS else a.target
        if name.startswith('vit-flax') and not name.endswith(PROCESS_SUFFIX):
            goal = None   # the in-process commands share one target (below)
        short = goal is not None and n < goal
        bad |= bool(fail) or short
        rows.append((name, f'{n:,}', f'{fail:,}', *rate(n, cpu.get(name)), '' if goal is None else f'{goal:,}',
                     'SHORT' if short else ('FAILED' if fail else 'ok')))
    commands = sum(v for k, v in examples.items() if k.startswith('vit-flax') and not k.endswith(PROCESS_SUFFIX))
    if commands:
        short = commands < a.target
        bad |= short
        seconds = sum(v for k, v in cpu.items() if k.startswith('vit-flax') and not k.endswith(PROCESS_SUFFIX))
        rows.append(('vit-flax (in-process, all)', f'{commands:,}',
                     f'{sum(v for k, v in failures.items() if k.startswith("vit-flax")):,}',
                     *rate(commands, seconds or None), f'{a.target:,}', 'SHORT' if short else 'ok'))
    head = ('reader', 'examples', 'failures', 'CPU s', 'ex/CPU s', 'target', '')
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    print(line(head))
    print('  '.join('-' * w for w in widths))
    for r in rows:
        print(line(r))
    total = sum(examples.values())
    print(f'total: {total:,} examples, {sum(failures.values()):,} failures, {sum(cpu.values()):,.0f} CPU s in '
          f'the fuzzed examples' + (f', {a.seconds:,.0f} s wall' if a.seconds else ''))
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
