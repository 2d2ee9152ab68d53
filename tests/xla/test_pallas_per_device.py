"""The Pallas attention kernels ('splash', 'pallas') compiled deviceless for a sharded v5e:2x2 (data=4): XLA cannot
partition a Mosaic kernel ("Mosaic kernels cannot be automatically partitioned"), so each runs per device under
shard_map over the batch (ops/attention.batch_mesh, set by vit_train.loop.jit_steps). Checked in the optimized
HLO: every kernel's result holds one device's rows (images x windows x heads), a quarter of the global batch's. Skipped
without libtpu (`make test-tpu`). One compile per test, 256 tokens, one block: ~10-20 CPU-seconds each."""
import re

import jax
import numpy as np
import pytest

from vit_train import plan

from helpers import cli

pytestmark = pytest.mark.skipif(not plan.have_libtpu(), reason="needs libtpu: pip install 'vit-flax-tools[tpu]' (make test-tpu)")
plan.quiet_libtpu_env()

BATCH, DEVICES = 8, 4


def kernel_rows(hlo: str):
    """For every Pallas kernel in optimized HLO text, the product of its (first) result's dims but the last two
    (tokens, head dim): the (image, window, head) rows it computes, however the kernel lays them out."""
    rows = []
    for ln in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in ln:
            dims = [int(d) for d in re.search(r'=\s*\(?\w+\[([\d,]+)\]', ln).group(1).split(',')]
            rows.append(int(np.prod(dims[:-2])))
    return rows


def compile_xla(tmp_path, model, impl, *sets, train=False):
    # jax's default matmul precision, as a run: under the suite's 'highest' (tests/conftest.py) Mosaic refuses
    # the bf16 backward kernels ('Bad lhs type'), a known limitation
    with jax.default_matmul_precision('default'):
        r = cli('xla', model, '--target', 'tpu:v5e:2x2', '--mesh', f'data={DEVICES}', '--attn-impl', impl,
                '--batch', BATCH, *[a for s in sets for a in ('--set', s)], *(['--train'] if train else []),
                '--dump', tmp_path)
    assert r.returncode == 0, r.stderr
    return r.stdout, (tmp_path / 'optimized_hlo.txt').read_text()


def test_explicit_splash_training_step_compiles_per_device_on_a_data_parallel_v5e(tmp_path):
    out, hlo = compile_xla(tmp_path, 'vit_tiny_patch16_224', 'splash', 'img_size=32', 'patch_size=2', 'depth=1',
                           'embed_dim=128', 'num_heads=2', train=True)
    rows = kernel_rows(hlo)
    assert len(rows) >= 3, rows   # the forward, dq and dkv kernels
    assert set(rows) == {BATCH // DEVICES * 2}, rows   # 2 images x 2 heads per device (16 rows unsharded)
    assert "'attn_impl': 'splash'" in out and 'fits: yes' in out


def test_pallas_flash_kernel_with_swins_bias_compiles_per_device_on_a_data_parallel_v5e(tmp_path):
    # Swin's relative-position bias (and the shifted windows' mask) go to the flash kernel, which takes a bias;
    # 2 images x 4 windows x 2 heads per device (64 rows unsharded)
    out, hlo = compile_xla(tmp_path, 'swin_tiny_patch4_window7_224', 'pallas', 'img_size=32', 'embed_dim=64',
                           'depths=(2,)', 'num_heads=(2,)', 'window_size=4')
    rows = kernel_rows(hlo)
    assert len(rows) == 2 and set(rows) == {BATCH // DEVICES * 4 * 2}, rows   # one plain, one shifted (masked) block
