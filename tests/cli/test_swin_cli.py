"""Swin through the converters and the `vit-flax` command: every name, both torch layouts, window resizing."""
import json

import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict
from timm.models.swin_transformer import checkpoint_filter_fn

import vit_flax
from converters import pipeline
from converters.families.swin import timm_to_microsoft

from helpers import cli, images, rel_err, run_flax, run_timm, state_np, timm_model

NAMES = vit_flax.list_models('swin_*')



@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp('swin')
    tm = timm_model('swin_tiny_patch4_window7_224')
    torch.save(tm.state_dict(), d / 'timm.pth')
    ms = timm_to_microsoft(state_np(tm))
    torch.save({'model': {k: torch.from_numpy(v) for k, v in ms.items()}}, d / 'ms.pth')
    return dict(tm=tm, dir=d)


@pytest.mark.slow   # a sweep over every name (~1 min): `make test-slow`
def test_summary_json_for_every_swin_name():
    # the Swin paper's Table 1 (https://arxiv.org/abs/2103.14030), FLOPs column (MACs)
    paper = {'swin_tiny_patch4_window7_224': 4.5, 'swin_small_patch4_window7_224': 8.7,
             'swin_base_patch4_window7_224': 15.4, 'swin_base_patch4_window12_384': 47.0}
    for name in NAMES:
        s = json.loads(cli('summary', name, '--json').stdout)
        with torch.device('meta'):
            assert s['params'] == sum(p.numel() for p in timm.create_model(name).parameters()), name
        if name in paper:
            assert abs(s['gmacs'] - paper[name]) / paper[name] < 0.05, (name, s['gmacs'])


# `make test` converts one name per layout of the rule table: Swin-T (uniform windows) and S3-T (a window per
# stage); the deeper and wider names map the same keys with more blocks and run under `make test-slow` (the
# window changes are tested on their own: test_window_7_to_12_resize...).
FAST_NAMES = ('swin_tiny_patch4_window7_224', 'swin_s3_tiny_224')


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n not in FAST_NAMES else n for n in NAMES])
def test_every_swin_name_converts_and_is_detected(name, tmp_path):
    """Microsoft .pth -> (read) -> timm .pth: bit-exact with timm's own filter, loads strict, model detected."""
    with torch.device('meta'):
        shapes = {k: tuple(v.shape) for k, v in timm.create_model(name).state_dict().items()}
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(s).astype(np.float32) * 0.02 for k, s in shapes.items()}
    ms = timm_to_microsoft(state)
    torch.save({'model': {k: torch.from_numpy(v) for k, v in ms.items()}}, tmp_path / 'ms.pth')
    model, params, ck = pipeline.load_model(tmp_path / 'ms.pth', cast=False)
    assert (ck.layout, ck.model_name) == ('microsoft', name)
    pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'timm.pth')
    got = torch.load(tmp_path / 'timm.pth', weights_only=True)
    with torch.device('meta'):
        ref_model = timm.create_model(name)
    ref = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in ms.items()}, ref_model)
    ref = {k: v for k, v in ref.items() if k in shapes}
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert all(np.array_equal(got[k].numpy(), state[k]) for k in state)


def test_microsoft_pth_cli_inspect_convert_parity(tiny, tmp_path):
    d = tiny['dir']
    r = cli('inspect', d / 'ms.pth')
    assert 'layout: microsoft' in r.stdout and 'swin_tiny_patch4_window7_224 (detected)' in r.stdout
    # params are the model's (timm's count), not the buffers Microsoft saves beside them
    params = sum(p.numel() for p in tiny['tm'].parameters())
    assert f'params: {params:,} ' in r.stdout and 'not parameters' in r.stdout
    j = json.loads(cli('inspect', d / 'ms.pth', '--json').stdout)
    ms = torch.load(d / 'ms.pth', weights_only=True)['model']
    assert j['params'] == params and j['params'] + j['other_values'] == sum(v.numel() for v in ms.values())
    r = cli('parity', d / 'ms.pth')
    assert r.returncode == 0 and 'stage 3' in r.stdout and 'PASS' in r.stdout, r.stdout + r.stderr
    r = cli('convert', d / 'ms.pth', tmp_path / 'timm.pth')
    assert r.returncode == 0, r.stderr
    fresh = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False).eval()
    fresh.load_state_dict(torch.load(tmp_path / 'timm.pth', weights_only=True), strict=True)
    ref = torch.load(d / 'timm.pth', weights_only=True)
    got = torch.load(tmp_path / 'timm.pth', weights_only=True)
    assert all(torch.equal(ref[k], got[k]) for k in ref) and ref.keys() == got.keys()
    # and back to Microsoft's layout: the official file, buffers included
    r = cli('convert', tmp_path / 'timm.pth', tmp_path / 'ms2.pth', '--layout', 'microsoft')
    assert r.returncode == 0, r.stderr
    a = torch.load(d / 'ms.pth', weights_only=True)['model']
    b = torch.load(tmp_path / 'ms2.pth', weights_only=True)['model']
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# the formats themselves are family-agnostic and tested with ViTs; safetensors and orbax for Swin under slow
@pytest.mark.parametrize('fmt', ['w.npz', pytest.param('w.safetensors', marks=pytest.mark.slow),
                                 pytest.param('orbax_dir', marks=pytest.mark.slow)])
def test_swin_flax_formats_round_trip(tiny, tmp_path, fmt):
    r = cli('convert', tiny['dir'] / 'timm.pth', tmp_path / fmt)
    assert r.returncode == 0, r.stderr
    model, params, ck = pipeline.load_model(tmp_path / fmt)
    assert ck.model_name == 'swin_tiny_patch4_window7_224'
    x = images((1, 224, 224, 3))
    assert rel_err(run_flax(model, params, x), run_timm(tiny['tm'], x)) < 1e-4


def test_window_7_to_12_resize_runs_in_both_frameworks(tiny, tmp_path):
    r = cli('convert', tiny['dir'] / 'timm.pth', tmp_path / 'w12.pth', '--img-size', '384', '--window-size', '12')
    assert r.returncode == 0, r.stderr
    assert 'relative_position_bias_table: window 7 -> 12 (bicubic)' in r.stderr
    t12 = timm.create_model('swin_tiny_patch4_window7_224', pretrained=False, img_size=384, window_size=12).eval()
    t12.load_state_dict(torch.load(tmp_path / 'w12.pth', weights_only=True), strict=True)
    model, params, ck = pipeline.load_model(tmp_path / 'w12.pth')
    assert tuple(model.img_size) == (384, 384) and model.window_size == 12
    x = images((1, 384, 384, 3))
    assert rel_err(run_flax(model, params, x), run_timm(t12, x)) < 1e-4
    # the resized table is Microsoft's bicubic of the 13x13 grid
    old = tiny['tm'].layers[0].blocks[0].attn.relative_position_bias_table.detach()
    expect = torch.nn.functional.interpolate(old.T.reshape(1, -1, 13, 13), size=(23, 23), mode='bicubic',
                                             align_corners=False).reshape(-1, 23 * 23).T
    np.testing.assert_allclose(t12.layers[0].blocks[0].attn.relative_position_bias_table.detach(), expect,
                               rtol=1e-6, atol=1e-7)


def test_swin_head_surgery_and_mismatch(tiny):
    logs = []
    p = pipeline.load_params(tiny['dir'] / 'timm.pth', 'swin_tiny_patch4_window7_224', num_classes=21841,
                        log=logs.append)
    assert p['head']['kernel'].shape == (768, 21841) and any('1000 -> 21841' in l for l in logs)
    r = cli('convert', tiny['dir'] / 'timm.pth', '/tmp/never.pth', '--model', 'swin_small_patch4_window7_224')
    assert r.returncode == 1 and 'depths=(2, 2, 6, 2), but swin_small_patch4_window7_224 has depths=(2, 2, 18, 2)' \
        in r.stderr, r.stderr


def test_swin_headless_file_gets_a_new_head(tiny, tmp_path):
    r = cli('convert', tiny['dir'] / 'timm.pth', tmp_path / 'nohead.pth', '--num-classes', '0')
    assert r.returncode == 0 and 'head: dropped' in r.stderr, r.stderr
    r = cli('convert', tmp_path / 'nohead.pth', tmp_path / 'ten.pth', '--num-classes', '10')
    assert r.returncode == 0 and 'head: 0 -> 10 classes' in r.stderr, r.stderr
    assert torch.load(tmp_path / 'ten.pth', weights_only=True)['head.fc.weight'].shape == (10, 768)
