"""Swin V2 through the `vit-flax` command and train_flax.py (`--model swinv2_tiny_window8_256`): summary, predict,
export to a timm folder and to Microsoft's layout, and a training run (under `make test-slow`)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import assert_ranks_as, cli, images, rel_err, run_flax, run_timm, timm_model, xla_flags
from reference import ms_swin_transformer_v2 as ms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = 'swinv2_tiny_window8_256'
LABELS = ['a', 'b', 'c', 'd', 'e']


def write_images(folder, n=2):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f'img{i}.png'
        Image.fromarray(rng.integers(0, 256, (70 + 9 * i, 90, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_summary_of_swinv2_tiny_equals_timms_count_and_torchs_flop_counter():
    import timm
    from torch.utils.flop_counter import FlopCounterMode
    s = json.loads(cli('summary', NAME, '--json').stdout)
    with torch.device('meta'):
        tm = timm.create_model(NAME).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tm(torch.empty(1, 3, 256, 256, device='meta'))
    assert s['params'] == sum(p.numel() for p in tm.parameters()) == 28_347_154
    assert s['gmacs'] == round(counter.get_total_flops() / 2 / 1e9, 3)
    assert s['input_shape'] == [1, 256, 256, 3]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    """A timm folder saved by timm itself for a reduced swinv2_tiny_window8_256 (64 px, one block a stage)."""
    from timm.models import save_for_hf
    tmp = tmp_path_factory.mktemp('swinv2')
    tm = timm_model(NAME, img_size=64, depths=(1, 1, 1, 1), num_classes=5)
    save_for_hf(tm, str(tmp / 'folder'), model_config={'label_names': LABELS}, safe_serialization=True)
    return tm, tmp / 'folder', write_images(tmp)


def test_predict_a_swinv2_folder_matches_timm_on_its_own_transform(folder):
    import timm
    from timm.data import create_transform, resolve_data_config
    tm, path, imgs = folder
    p = cli('predict', path, *imgs, '--top-k', '5', '--json')
    assert p.returncode == 0, p.stderr
    loaded = timm.create_model(f'local-dir:{path}', pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=loaded))
    with torch.no_grad():
        want = torch.softmax(tm(torch.stack([tf(Image.open(q).convert('RGB')) for q in imgs])), -1).numpy()
    for r, w in zip(json.loads(p.stdout)['predictions'], want):
        assert_ranks_as([t['index'] for t in r['top_k']], w, ties=2e-5, what=r['image'])   # timm's order, up to ties
        np.testing.assert_allclose([t['prob'] for t in r['top_k']], np.sort(w)[::-1], atol=1e-5)


def test_export_a_swinv2_folder_to_a_timm_folder_and_to_microsofts_layout(folder, tmp_path):
    import timm
    tm, path, _ = folder
    x = images((2, 64, 64, 3))
    want = run_timm(tm, x)
    p = cli('convert', path, tmp_path / 'ours', '--format', 'timm-folder')
    assert p.returncode == 0, p.stderr
    again = timm.create_model(f'local-dir:{tmp_path / "ours"}', pretrained=True).eval()
    assert again.pretrained_cfg['label_names'] == LABELS and rel_err(run_timm(again, x), want) < 1e-6
    p = cli('convert', path, tmp_path / 'ms.pth', '--layout', 'microsoft')
    assert p.returncode == 0, p.stderr
    ref = ms.SwinTransformerV2(img_size=64, window_size=8, embed_dim=96, depths=[1, 1, 1, 1],
                               num_heads=[3, 6, 12, 24], num_classes=5)
    ref.load_state_dict(torch.load(tmp_path / 'ms.pth', weights_only=True)['model'], strict=True)
    assert rel_err(run_timm(ref.eval(), x), want) < 1e-5


@pytest.mark.slow   # a full-depth Swin V2-T trained for an epoch on 32 px digits: ~1-3 min on 2 shared cores
def test_train_flax_swinv2_tiny_then_predict_and_export(tmp_path):
    workdir = tmp_path / 'run'
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1', XLA_FLAGS=xla_flags(1))
    r = subprocess.run([sys.executable, 'train_flax.py', '--model', NAME, '--img-size', '32', '--epochs', '1',
                        '--batch-size', '128', '--val-split', '0.5', '--dtype', 'bfloat16', '--workdir',
                        str(workdir)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'model: {NAME}' in r.stdout and 'bfloat16' in r.stdout
    with open(workdir / 'summary.json') as f:
        assert json.load(f)['best_val_acc'] > 0.3   # digits, 10 classes: it learned
    p = cli('predict', workdir, *write_images(tmp_path, 1), '--json')
    assert p.returncode == 0, p.stderr
    p = cli('convert', workdir, tmp_path / 'ms.pth', '--layout', 'microsoft')
    assert p.returncode == 0, p.stderr
    from converters import pipeline
    model, params, _ = pipeline.load_model(workdir, log=lambda m: None)
    ref = ms.SwinTransformerV2(img_size=32, window_size=8, embed_dim=96, depths=[2, 2, 6, 2],
                               num_heads=[3, 6, 12, 24], num_classes=10)
    ref.load_state_dict(torch.load(tmp_path / 'ms.pth', weights_only=True)['model'], strict=True)
    x = images((2, 32, 32, 3))
    assert rel_err(run_timm(ref.eval(), x), run_flax(model, params, x)) < 1e-4


def test_no_weight_decay_on_the_position_bias_mlp_logit_scale_and_q_v_biases():
    """timm's and Microsoft's no_weight_decay keywords for Swin V2 (cpb_mlp, logit_scale; 1-D biases)."""
    from flax.traverse_util import flatten_dict
    import vit_flax
    from vit_train import optim
    model = vit_flax.create_model(NAME, depths=(1, 1, 1, 1))
    keys = flatten_dict(vit_flax.summary.param_shapes(model), sep='/')
    block = 'layers_0/blocks_0/'
    decayed = sorted(k[len(block):] for k in keys if optim.decays(k) and k.startswith(block))
    assert decayed == ['attn/proj/kernel', 'attn/qkv/kernel', 'mlp/Dense_0/kernel', 'mlp/Dense_1/kernel']
