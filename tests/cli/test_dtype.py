"""Reduced precision on the command line: `convert --dtype` writes bf16/fp16 copies, `parity --dtype bfloat16`
reports Flax in bf16 against timm in float32."""
import ml_dtypes
import numpy as np
import torch
from safetensors.numpy import load_file

from helpers import cli, timm_model

ARCH = ['--set', 'depth=1', '--set', 'img_size=32']


def _tiny(tmp_path, scale=None):
    tm = timm_model('vit_tiny_patch16_224', depth=1, img_size=32)
    state = {k: v.clone() for k, v in tm.state_dict().items()}
    if scale:
        state['head.weight'] *= scale
    torch.save(state, tmp_path / 'w.pth')
    return {k: v.numpy() for k, v in state.items()}


def test_convert_dtype_writes_every_float_rounded_to_nearest_even(tmp_path):
    src = _tiny(tmp_path)
    for dtype, np_dtype in (('bfloat16', ml_dtypes.bfloat16), ('float16', np.float16)):
        out = tmp_path / f'{dtype}.safetensors'
        r = cli('convert', tmp_path / 'w.pth', out, '--dtype', dtype, '--model', 'vit_tiny_patch16_224', *ARCH)
        assert r.returncode == 0 and f'written as {dtype}' in r.stderr, r.stderr
        got = load_file(str(out))
        assert set(got) == set(src)
        for k, v in src.items():
            assert got[k].dtype == np_dtype and np.array_equal(got[k], v.astype(np_dtype)), k


def test_convert_to_float16_refuses_values_it_cannot_hold(tmp_path):
    _tiny(tmp_path, scale=1e7)
    r = cli('convert', tmp_path / 'w.pth', tmp_path / 'x.npz', '--dtype', 'float16', '--model',
            'vit_tiny_patch16_224', *ARCH)
    assert r.returncode == 1 and "'head/kernel'" in r.stderr and '65504' in r.stderr and len(r.stderr.splitlines()) == 1
    assert not (tmp_path / 'x.npz').exists()


def test_parity_in_bfloat16_is_reported_against_timm_in_float32(tmp_path):
    _tiny(tmp_path)
    r = cli('parity', tmp_path / 'w.pth', '--dtype', 'bfloat16', '--model', 'vit_tiny_patch16_224', *ARCH)
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'Flax bfloat16 against timm in float32' in r.stdout and 'PASS' in r.stdout
    worst = float(r.stdout.split('worst relative difference ')[1].split()[0])
    assert 1e-4 < worst < 5e-2        # bf16 rounding shows, within the bf16 tolerance
