"""Swin V2 CR files both ways: timm's `.pth` / `.safetensors` <-> our `.npz` through `vit-flax convert`, bit-exact
and in timm's key order; the extra norms read off a file; a timm folder timm itself loads strictly; `vit-flax
predict` on a folder timm saved, against timm on its own transform; the wrong model named is one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from converters import pipeline

from helpers import assert_ranks_as, cli, timm_model, xla_flags

# a small CR: width 16, a norm3 every 2nd block and one ending every stage, 64 px (window 2), 5 classes
SMALL = dict(embed_dim=16, depths=(2, 1, 3, 1), num_heads=(1, 2, 2, 4), extra_norm_period=2, img_size=64,
             num_classes=5)
LABELS = ['a', 'b', 'c', 'd', 'e']


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """timm's swinv2_cr_tiny_ns_224 made SMALL, every weight off its init, saved as a plain state_dict."""
    tmp = tmp_path_factory.mktemp('cr')
    tm = timm_model('swinv2_cr_tiny_ns_224', **SMALL)
    state = {k: v.detach().clone() for k, v in tm.state_dict().items()}
    torch.save(state, tmp / 'timm.pth')
    return tm, state, tmp


def load(path, **kw):
    notes = []
    model, params, ck = pipeline.load_model(str(path), log=notes.append, **kw)
    return model, params, ck, '\n'.join(notes)


def test_pth_to_npz_to_pth_and_safetensors_is_bit_exact_in_timms_key_order(source):
    tm, state, tmp = source
    for src, dst in [('timm.pth', 'flax.npz'), ('flax.npz', 'back.pth'), ('flax.npz', 'back.safetensors')]:
        r = cli('convert', tmp / src, tmp / dst)
        assert r.returncode == 0, r.stderr
        assert 'does not record its window or input size' in r.stderr
    back = torch.load(tmp / 'back.pth', weights_only=True)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    st = load_file(str(tmp / 'back.safetensors'))
    assert st.keys() == state.keys() and all(np.array_equal(st[k], state[k].numpy()) for k in state)
    r = cli('inspect', tmp / 'flax.npz')
    assert r.returncode == 0 and 'Swin V2 CR' in r.stdout, r.stdout + r.stderr


def test_extra_norms_and_sizes_are_read_off_the_file(source):
    """Where the norm3s are gives extra_norm_period=2 with extra_norm_stage; heads come from logit_scale; a
    reduced huge (a norm3 on the 6th block) reads as period 6; window and size from --set, said when absent."""
    tm, state, tmp = source
    model, params, ck, notes = load(tmp / 'timm.pth')
    assert (ck.layout, type(model).__name__) == ('timm', 'SwinTransformerV2Cr')
    assert (model.embed_dim, tuple(model.depths), tuple(model.num_heads), model.num_classes) == \
        (16, (2, 1, 3, 1), (1, 2, 2, 4), 5)
    assert (model.extra_norm_period, model.extra_norm_stage) == (2, True)
    assert 'does not record its window' in notes
    model, _, _, notes = load(tmp / 'timm.pth', img_size=64, window_size=4)
    assert (model.img_size, model.window_size) == (64, 4) and 'needs no table resampling' in notes
    huge = timm_model('swinv2_cr_huge_224', embed_dim=32, depths=(1, 1, 6, 1), num_heads=(1, 2, 4, 8))
    torch.save(huge.state_dict(), tmp / 'huge.pth')
    model, _, _, _ = load(tmp / 'huge.pth')
    assert (model.extra_norm_period, model.extra_norm_stage) == (6, False)


def test_a_timm_folder_we_write_loads_in_timm_strictly_with_the_same_weights(source):
    import timm
    tm, state, tmp = source
    r = cli('convert', tmp / 'timm.pth', tmp / 'folder', '--format', 'timm-folder', '--model',
            'swinv2_cr_tiny_ns_224', '--set', 'embed_dim=16', '--set', 'depths=(2, 1, 3, 1)',
            '--set', 'num_heads=(1, 2, 2, 4)', '--set', 'extra_norm_period=2', '--set', 'img_size=64')
    assert r.returncode == 0, r.stderr
    again = timm.create_model(f'local-dir:{tmp / "folder"}', pretrained=True)
    assert tuple(again.patch_embed.img_size) == (64, 64)
    got = again.state_dict()
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_timms_first_release_layout_reads_as_its_checkpoint_filter_fn_and_writes_back(source):
    """timm's first release files (`attn.tau` = 1 / exp(logit_scale), classifier `head`): read as timm's own
    checkpoint_filter_fn reads them (logit_scale = log(1 / tau) to a float32 ulp of torch's log, the rest
    bit-exact); `--layout tau` writes that layout back (tau within float32 rounding), which timm's filter reads
    into a model that loads it strictly."""
    import timm
    from timm.models.swin_transformer_v2_cr import checkpoint_filter_fn
    tm, state, tmp = source
    old = {}
    for k, v in state.items():
        if k.endswith('attn.logit_scale'):
            k, v = k[:-len('logit_scale')] + 'tau', torch.exp(-v)
        old[k.replace('head.fc.', 'head.')] = v
    torch.save(old, tmp / 'release.pth')
    r = cli('convert', tmp / 'release.pth', tmp / 'from_release.pth')
    assert r.returncode == 0, r.stderr
    got = torch.load(tmp / 'from_release.pth', weights_only=True)
    want = checkpoint_filter_fn({k: v.clone() for k, v in old.items()}, tm)
    assert list(got) == list(want)
    for k in want:
        if k.endswith('logit_scale'):
            np.testing.assert_allclose(got[k].numpy(), want[k].numpy(), rtol=2 * np.finfo(np.float32).eps, atol=0)
        else:
            assert torch.equal(got[k], want[k]), k
    r = cli('inspect', tmp / 'release.pth')
    assert 'Swin V2 CR (tau)' in r.stdout, r.stdout + r.stderr
    r = cli('convert', tmp / 'from_release.pth', tmp / 'again.pth', '--layout', 'tau')
    assert r.returncode == 0, r.stderr
    again = torch.load(tmp / 'again.pth', weights_only=True)
    assert list(again) == list(old)
    for k in old:
        if k.endswith('tau'):
            np.testing.assert_allclose(again[k].numpy(), old[k].numpy(), rtol=4 * np.finfo(np.float32).eps, atol=0)
        else:
            assert torch.equal(again[k], old[k]), k
    fresh = timm.create_model('swinv2_cr_tiny_ns_224', **SMALL)
    fresh.load_state_dict(checkpoint_filter_fn(again, fresh), strict=True)


def test_the_wrong_model_named_is_one_line(source):
    tm, state, tmp = source
    r = cli('convert', tmp / 'timm.pth', tmp / 'x.npz', '--model', 'swinv2_tiny_window8_256')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr
    assert 'swinv2_cr' in r.stderr and not (tmp / 'x.npz').exists()
    v2 = timm_model('swinv2_tiny_window8_256', depths=(1, 1, 1, 1), img_size=64)
    torch.save(v2.state_dict(), tmp / 'v2.pth')
    r = cli('convert', tmp / 'v2.pth', tmp / 'y.npz', '--model', 'swinv2_cr_tiny_224')
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr


def test_predict_a_folder_timm_saved_matches_timm_on_its_own_transform(source):
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf
    tm, state, tmp = source
    save_for_hf(tm, str(tmp / 'saved'), model_config={'label_names': LABELS}, safe_serialization=True)
    rng = np.random.default_rng(0)
    imgs = []
    for i in range(2):
        imgs.append(tmp / f'img{i}.png')
        Image.fromarray(rng.integers(0, 256, (70 + 9 * i, 90, 3), dtype=np.uint8)).save(imgs[-1])
    p = cli('predict', tmp / 'saved', *imgs, '--top-k', '5', '--json')
    assert p.returncode == 0, p.stderr
    loaded = timm.create_model(f'local-dir:{tmp / "saved"}', pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=loaded))
    with torch.no_grad():
        want = torch.softmax(tm(torch.stack([tf(Image.open(q).convert('RGB')) for q in imgs])), -1).numpy()
    for r, w in zip(json.loads(p.stdout)['predictions'], want):
        assert [t['label'] for t in r['top_k']] == [LABELS[t['index']] for t in r['top_k']]
        assert_ranks_as([t['index'] for t in r['top_k']], w, ties=2e-5, what=r['image'])
        np.testing.assert_allclose([t['prob'] for t in r['top_k']], np.sort(w)[::-1], atol=1e-5)


@pytest.mark.slow   # a full-depth swinv2_cr_tiny_224 trained an epoch on 32 px digits: ~2-5 min on 2 shared cores
def test_train_flax_then_predict_and_convert_to_a_file_timm_loads(tmp_path):
    """train_flax.py --model swinv2_cr_tiny_224 learns (bf16), `vit-flax predict` reads its workdir, and the .pth
    `convert` writes loads strictly in timm with the Flax model's logits (measured 1.2e-6)."""
    import os
    import subprocess
    import sys
    import timm
    from helpers import images, rel_err, run_flax, run_timm
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    workdir = tmp_path / 'run'
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1', XLA_FLAGS=xla_flags(1))
    r = subprocess.run([sys.executable, 'train_flax.py', '--model', 'swinv2_cr_tiny_224', '--img-size', '32',
                        '--epochs', '1', '--batch-size', '128', '--val-split', '0.5', '--dtype', 'bfloat16',
                        '--workdir', str(workdir)], cwd=root, capture_output=True, text=True, env=env, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(workdir / 'summary.json') as f:
        assert json.load(f)['best_val_acc'] > 0.3   # digits, 10 classes: it learned (0.88 here)
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / 'i.png')
    p = cli('predict', workdir, tmp_path / 'i.png', '--json')
    assert p.returncode == 0, p.stderr
    p = cli('convert', workdir, tmp_path / 'cr.pth')
    assert p.returncode == 0, p.stderr
    model, params, _ = pipeline.load_model(str(workdir), log=lambda m: None)
    tm = timm.create_model('swinv2_cr_tiny_224', img_size=32, num_classes=10)
    tm.load_state_dict(torch.load(tmp_path / 'cr.pth', weights_only=True), strict=True)
    x = images((2, 32, 32, 3))
    assert rel_err(run_timm(tm.eval(), x), run_flax(model, params, x)) < 1e-4


@pytest.mark.slow
def test_cli_parity_on_a_timm_file_compares_every_stage(source):
    """`vit-flax parity`: timm's stages are NCHW, its blocks NHWC: the stem is read at stage 0's identity
    downsample and each stage at its last block (measured: worst 5.7e-7 relative)."""
    tm, state, tmp = source
    r = cli('parity', tmp / 'timm.pth', '--batch', '1', '--set', 'img_size=64')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'stage 3' in r.stdout and 'PASS' in r.stdout
