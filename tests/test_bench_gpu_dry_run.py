"""`make bench-gpu`'s script (benchmarks/gpu.py) runs end to end with --dry-run (tiny shapes on CPU), so it cannot rot
between the rare runs on a lent GPU: every model builds, infers and (the first ViT and Swin) trains, the cudnn rows
say why they cannot run here, and the table lands under $OUT."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gpu_dry_run_prints_and_writes_its_table(tmp_path):
    # XLA's optimisation passes off: compiling the tiny cases is most of the run (what it checks is that every
    # case builds, runs and lands in the table, not its speed); ~35 -> ~25 s of CPU here
    env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS='cpu', JAX_DISABLE_MOST_OPTIMIZATIONS='1')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu.py'), '--dry-run'],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    table = (tmp_path / 'bench_gpu.md').read_text()
    assert table in r.stdout
    rows = [l for l in table.splitlines() if l.startswith('| ') and not l.startswith('| model')]
    for model in ('vit_b16', 'vit_l16', 'dinov2_l14_518', 'swin_b'):
        ran = [l for l in rows if l.startswith(f'| {model} | infer | xla (xla) |')]
        assert ran and 'Error' not in ran[0], table
    assert any(l.startswith('| swin_b | train | xla (xla) |') and 'Error' not in l for l in rows), table
    assert any('| train | auto (manual_grad) | yes | dots_with_no_batch_dims_saveable |' in l for l in rows), table
    assert "attn_impl='cudnn': cuDNN attention runs on a CUDA GPU, not on backend 'cpu'" in table
    assert (tmp_path / 'bench_gpu.json').exists()
