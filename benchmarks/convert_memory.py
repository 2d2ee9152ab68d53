"""Peak memory (RSS) of checkpoint conversion, as a ratio to the checkpoint's file size.

    python benchmarks/convert_memory.py [--models vit_huge_patch14_224 vit_large_patch16_224] [--dir /tmp/...]

For each model: writes a Google `.npz` of random float32 weights (streamed, so this script stays small),
then runs every conversion in a fresh subprocess (`vit-flax convert` and `converters.load_params`) and
reads that child's peak RSS from `os.wait4` (ru_maxrss: anonymous and file-backed pages alike, so a
memory-mapped source counts as it is touched). `ratio` is that peak over the source file size;
`added` is (peak - base) over the file size, `base` being the peak of a child that only imports the same
modules (the interpreter, jax and flax, plus torch when a .pth is written: ~0.2-0.7 GiB).

Exits non-zero when `added` reaches `--limit` for any run, or `ratio` does for a file of 2 GiB or more
(below that the interpreter and libraries alone are a large part of the limit). Files stay in `--dir`
(default: a folder in /tmp), never in the repository; `--keep` keeps them for the next run.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPORTS = 'import converters, vit_flax_cli.cli, converters.pipeline'
CONVERT = 'import sys; from vit_flax_cli.cli import main; sys.exit(main(["convert", sys.argv[1], sys.argv[2], "--force"]))'
LOAD = ('import sys, converters; p = converters.load_params(sys.argv[1], sys.argv[2]); '
        'print(sum(v.size for v in __import__("jax").tree_util.tree_leaves(p)))')


def write_random_npz(model_name: str, path: str, seed: int = 0) -> None:
    """A released-layout Google checkpoint of `model_name` with random weights, one array in memory at a time."""
    import vit_flax
    from flax.traverse_util import flatten_dict
    from vit_flax.summary import param_shapes
    from converters.families.vit import flax_to_npz
    shapes = flatten_dict(param_shapes(vit_flax.create_model(model_name)), sep='/')
    names = flax_to_npz({k: k for k in shapes}, 'released')   # key renaming only
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path + '.part', 'w', zipfile.ZIP_STORED, allowZip64=True) as z:
        for npz_key, flax_key in names.items():
            a = (rng.standard_normal(shapes[flax_key].shape, np.float32) * 0.02).astype(np.float32)
            with z.open(npz_key + '.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    os.replace(path + '.part', path)


def peak_rss(code: str, *args: str, root: str = ROOT):
    """(exit status, peak RSS in bytes, seconds, stderr) of `python -c code args...` run from `root`."""
    env = dict(os.environ, PYTHONPATH=root, XLA_PYTHON_CLIENT_PREALLOCATE='false')
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, '-c', code, *args], cwd=root, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read().decode(errors='replace')
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss * 1024, time.perf_counter() - t0, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--models', nargs='+', default=['vit_large_patch16_224', 'vit_huge_patch14_224'])
    ap.add_argument('--dir', default=os.path.join(tempfile.gettempdir(), 'vit-flax-memory'))
    ap.add_argument('--root', default=ROOT, help='repository whose converters are measured (default: this one)')
    ap.add_argument('--limit', type=float, default=1.5, help='fail when peak RSS >= LIMIT x file size')
    ap.add_argument('--keep', action='store_true', help='keep the checkpoint files for the next run')
    a = ap.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    gib = 1024 ** 3
    failed = False
    bases = {torch: peak_rss(IMPORTS + (', torch' if torch else ''), root=a.root)[1] for torch in (False, True)}
    print(f'base RSS (imports only): {bases[False] / gib:.2f} GiB, {bases[True] / gib:.2f} GiB with torch; '
          f'limit {a.limit}x the source file size')
    print(f'{"model":<24} {"conversion":<26} {"file GiB":>8} {"peak GiB":>8} {"ratio":>6} {"added":>6} {"secs":>6}')
    for name in a.models:
        npz = os.path.join(a.dir, f'{name}.npz')
        if not os.path.exists(npz):
            write_random_npz(name, npz)
        pth, st, out = (os.path.join(a.dir, f'{name}{e}') for e in ('.pth', '.safetensors', '.out'))
        runs = [('npz -> pth', CONVERT, npz, pth), ('npz -> safetensors', CONVERT, npz, st),
                ('pth -> npz', CONVERT, pth, out + '.npz'), ('safetensors -> npz', CONVERT, st, out + '.npz'),
                ('load_params(npz)', LOAD, npz, name), ('load_params(pth)', LOAD, pth, name),
                ('load_params(safetensors)', LOAD, st, name)]
        for label, code, src, dst in runs:
            rc, peak, secs, err = peak_rss(code, src, dst, root=a.root)
            size = os.path.getsize(src)
            ratio, added = peak / size, (peak - bases[dst.endswith('.pth')]) / size
            over = added >= a.limit or (ratio >= a.limit and size >= 2 * gib)
            failed |= over or rc != 0
            print(f'{name:<24} {label:<26} {size / gib:8.2f} {peak / gib:8.2f} {ratio:6.2f} {added:6.2f} {secs:6.1f}'
                  + (f'  FAILED rc={rc}: {err.strip().splitlines()[-1] if err.strip() else ""}' if rc else '')
                  + ('  OVER THE LIMIT' if over else ''), flush=True)
        for f in (out + '.npz',) + (() if a.keep else (npz, pth, st)):
            if os.path.isdir(f):
                shutil.rmtree(f)
            elif os.path.exists(f):
                os.remove(f)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
