"""Fine-tuning with optax/orbax/jax.sharding: it learns, sharding changes nothing, checkpoints round-trip."""
import json
import os
import subprocess
import sys

import numpy as np
import torch

from conftest import timm_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(*args, devices=1):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_flax.py'), '--log-every', '0', *map(str, args)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_learns_digits_and_sharding_matches_one_device(tmp_path):
    one = train('--steps', '60', '--batch', '64')
    assert one['final_loss'] < one['first_loss'] - 0.3, one
    assert one['test_accuracy'] > 0.3, one                      # chance is 0.1
    eight = train('--steps', '60', '--batch', '64', '--out', tmp_path / 'ckpt', devices=8)
    assert eight['devices'] == 8
    assert abs(eight['final_loss'] - one['final_loss']) < 1e-3 * one['final_loss'], (one, eight)
    # the orbax checkpoint is a checkpoint the converters read
    from converters import api
    model, params, ck = api.load_model(tmp_path / 'ckpt', 'vit_tiny_patch16_224', img_size=32, patch_size=8, depth=4)
    assert ck.format == 'orbax' and model.num_classes == 10


def test_fine_tune_from_a_converted_pth(tmp_path):
    kw = dict(img_size=32, patch_size=8, depth=4)
    torch.save(timm_model('vit_tiny_patch16_224', **kw).state_dict(), tmp_path / 'w.pth')
    r = train('--init', tmp_path / 'w.pth', '--steps', '5', '--batch', '16')
    assert np.isfinite(r['final_loss'])
