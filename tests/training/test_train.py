"""train_flax.py end to end, each run a subprocess as a user would start it.

The runs share one XLA compilation cache and a tiny model (one block, 16px digits, 2 epochs of 22 steps), so
each costs mostly start-up. One uninterrupted run is the reference the others must reproduce: killed and
resumed (bit-identical), a corrupt latest checkpoint (bit-identical after the fallback), two processes of two
devices each with FSDP (within a stated tolerance; 4 devices in one process and 2 processes of one device
are the slow variants).
"""
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import cli_process, kill_9_after_checkpoint, perturb_timm, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
TRAIN = os.path.join(ROOT, 'train_flax.py')
# 2 epochs of 22 steps, a checkpoint every 16 steps and at each epoch end (16 22 32 44), keep 2 + best
BASE = ('--depth', '1', '--batch-size', '64', '--epochs', '2', '--save-every', '16', '--keep', '2')
STEPS = 44
# 4 devices / 2 processes against 1: the same global batches, other reduction orders. Per-epoch losses agree
# to float32 rounding; parameters within 1e-3 absolute (the weights are ~0.1; the worst leaf is the attention
# key bias, whose true gradient is zero, so AdamW turns rounding noise into full-size steps).
LOSS_RTOL, PARAM_ATOL = 1e-5, 1e-3


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    # One compilation cache for every run; XLA's optimisation passes off: compiling is most of a run's cost
    # here, and every comparison is between runs compiled the same way.
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
                JAX_DISABLE_MOST_OPTIMIZATIONS='1', XLA_FLAGS=xla_flags(1))


def run(env, workdir, *args, devices=1, expect=0, cmd=(TRAIN,)):
    e = dict(env, XLA_FLAGS=xla_flags(devices))
    r = subprocess.run([sys.executable, *cmd, '--workdir', str(workdir), *map(str, args)], capture_output=True,
                       text=True, env=e, cwd=ROOT, timeout=900)
    assert r.returncode == expect, f'exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


def latest(workdir, log=print):
    from converters.formats import training_ckpt
    return training_ckpt.select(workdir, 'latest', log=log)


def assert_same_params(a, b):
    assert a.flat.keys() == b.flat.keys()
    for k in a.flat:
        assert np.array_equal(a.flat[k], b.flat[k]), k


def close_params(a, b):
    return max(float(np.abs(a.flat[k] - b.flat[k]).max()) for k in a.flat)


def summary(workdir):
    with open(os.path.join(workdir, 'summary.json')) as f:
        return json.load(f)


@pytest.fixture(scope='module')
def reference(env, made_once):
    """(workdir, stdout) of the uninterrupted run every other run is compared with: one run per `make test`,
    test_train_faults.py's reference too (whichever pytest-xdist worker asks first makes it). Never modified:
    tests copy it."""
    return made_once('train-reference', lambda workdir: run(env, workdir, *BASE).stdout)


def read_scalars(workdir):
    """Tags -> [(step, value)] from the TensorBoard event files (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event
    out = {}
    for name in os.listdir(workdir):
        if not name.startswith('events.out.tfevents'):
            continue
        with open(os.path.join(workdir, name), 'rb') as f:
            raw = f.read()
        pos = 0
        while pos < len(raw):
            (n,) = struct.unpack('<Q', raw[pos:pos + 8])
            ev = Event.FromString(raw[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


def test_run_learns_and_writes_its_workdir(reference):
    workdir, stdout = reference
    s = summary(workdir)
    for k in ('epoch', 'step', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'best_val_acc', 'learning_rate',
              'images_per_sec', 'num_devices', 'num_processes', 'model'):
        assert k in s, k
    assert (s['epoch'], s['step'], s['num_devices'], s['num_processes']) == (2, STEPS, 1, 1)
    first, last = s['history']
    assert last['train_loss'] < first['train_loss'] - 0.3, s['history']
    assert s['val_acc'] > 0.5, s                                    # chance is 0.1
    assert 'epoch 2/2' in stdout and 'a save blocked the loop' in stdout
    with open(os.path.join(workdir, 'class_indices.json')) as f:
        assert json.load(f) == {str(i): str(i) for i in range(10)}
    scalars = read_scalars(workdir)
    for tag in ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate'):
        assert [e for e, _ in scalars[tag]] == [1, 2], tag
    assert scalars['val_acc'][-1][1] == pytest.approx(s['val_acc'])
    # the checkpoint stands alone: its metadata rebuilds the model and its preprocessing
    from converters.formats import training_ckpt
    ck = latest(workdir)
    assert ck.step == STEPS and ck.meta['val_acc'] == pytest.approx(s['val_acc'])
    assert ck.meta['pretrained_cfg'] == dict(input_size=[3, 16, 16], interpolation='bilinear', crop_pct=1.0,
                                             crop_mode='center', mean=[0.5] * 3, std=[0.5] * 3)
    assert ck.meta['class_names'] == [str(i) for i in range(10)] and ck.meta['weights'] is None
    model = training_ckpt.model_from_meta(ck.meta)
    from converters import pipeline
    pipeline.validate(ck.flat, model, 'checkpoint')
    # the params item is also a plain orbax tree for the converters' own reader (convert, inspect, parity)
    _, params, c = pipeline.load_model(os.path.join(ck.path, 'params'), ck.meta['model'],
                                  **training_ckpt.model_overrides(ck.meta))
    from flax.traverse_util import flatten_dict
    assert c.format == 'orbax' and ck.flat.keys() == flatten_dict(params, sep='/').keys()
    assert all(np.array_equal(v, ck.flat[k]) for k, v in flatten_dict(params, sep='/').items())
    import timm  # and timm builds the same architecture from the recorded overrides
    t = timm.create_model(ck.meta['model'], **ck.meta['model_overrides'])
    assert sum(p.numel() for p in t.parameters()) == sum(v.size for v in ck.flat.values())
    # keep 2 + best: the mid-epoch step 32 and the final (and best) 44
    assert training_ckpt.list_steps(os.path.join(workdir, 'checkpoints')) == [32, STEPS]
    assert training_ckpt.select(workdir, 'best').step == STEPS


def test_rerun_of_a_finished_run_does_nothing(env, reference, tmp_path):
    workdir = tmp_path / 'w'
    shutil.copytree(reference[0], workdir)
    before = latest(workdir)
    r = run(env, workdir, *BASE)
    assert f'training already finished: epoch 2 of 2 (step {STEPS})' in r.stdout
    assert_same_params(before, latest(workdir))


def test_resume_refuses_another_run(env, reference, tmp_path):
    workdir = tmp_path / 'w'
    shutil.copytree(reference[0], workdir)
    r = run(env, workdir, *BASE[:2], '--batch-size', '32', *BASE[4:], expect=1)
    assert 'batch_size=64' in r.stderr and 'batch_size=32' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unreadable_weights_fail_in_one_line_and_write_nothing(env, tmp_path):
    (tmp_path / 'w.pth').write_bytes(b'not a torch file')
    r = run(env, tmp_path / 'run', '--weights', tmp_path / 'w.pth', expect=1)
    assert r.stderr.startswith('train_flax.py: error: ') and f'{tmp_path}/w.pth' in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'run').exists()


def test_kill_9_then_rerun_resumes_and_ends_bit_identical(env, reference, tmp_path):
    workdir = tmp_path / 'killed'
    e = dict(env, XLA_FLAGS=xla_flags(1))
    kill_9_after_checkpoint([sys.executable, TRAIN, '--workdir', str(workdir), *BASE], e, workdir, 16,
                            cwd=ROOT)
    r = run(env, workdir, *BASE)
    m = re.search(rf'resumed from the checkpoint of step (\d+) of {STEPS} \((.*?)\); continuing with step (\d+)',
                  r.stdout)
    assert m and 16 <= int(m.group(1)) < STEPS and int(m.group(3)) == int(m.group(1)) + 1, r.stdout
    assert_same_params(latest(reference[0]), latest(workdir))


# tensorstore's callbacks complain on a closed asyncio loop after the failed read (orbax's noise, not ours)
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_corrupt_latest_checkpoint_falls_back_to_the_one_before(env, reference, tmp_path):
    workdir = tmp_path / 'corrupt'
    shutil.copytree(reference[0], workdir)
    data = workdir / 'checkpoints' / str(STEPS) / 'params' / 'd'
    for f in data.iterdir():  # a torn write: every data file of the newest step cut in half
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    warnings = []
    assert latest(workdir, log=warnings.append).step == 32     # the reader skips it ...
    assert any(f'checkpoints/{STEPS}' in w for w in warnings), warnings
    r = run(env, workdir, *BASE)                                # ... and the trainer falls back and redoes it
    assert f'checkpoint step {STEPS} is unusable' in r.stderr
    # step 32 is the 10th of epoch 2's 22 (the epoch line of epoch 1 said step 22)
    assert 'resumed from the checkpoint of step 32 of 44 (epoch 2 of 2, step 10 of 22 in it); continuing with ' \
        'step 33\n' in r.stdout, r.stdout
    assert (workdir / 'checkpoints' / f'{STEPS}.corrupt').is_dir()
    assert_same_params(latest(reference[0]), latest(workdir))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(env, reference, tmp_path):
    workdir = tmp_path / 'nan'
    shutil.copytree(reference[0], workdir)
    before = latest(workdir)
    r = run(env, workdir, *BASE[:4], '--epochs', '3', *BASE[6:], '--lr', '1e30', expect=3)
    assert 'non-finite loss' in r.stderr and f'Last good checkpoint: step {STEPS}' in r.stderr
    # resumed at an epoch end: the next step opens the next epoch
    assert 'resumed from the checkpoint of step 44 of 66 (the end of epoch 2 of 3); continuing with step 45, the ' \
        'first of epoch 3\n' in r.stdout, r.stdout
    from converters.formats import training_ckpt
    assert training_ckpt.list_steps(str(workdir / 'checkpoints')) == [32, STEPS]
    assert_same_params(before, latest(workdir))


def assert_matches_reference(reference, workdir):
    ref, got = summary(reference), summary(workdir)
    assert len(got['history']) == len(ref['history']) == 2
    for a, b in zip(ref['history'], got['history']):
        assert b['train_loss'] == pytest.approx(a['train_loss'], rel=LOSS_RTOL)
        assert b['val_loss'] == pytest.approx(a['val_loss'], rel=LOSS_RTOL)
    assert close_params(latest(reference), latest(workdir)) < PARAM_ATOL


def assert_fsdp_sharded(workdir, out):
    assert re.search(r'[1-9]\d* of 24 param tensors sharded over fsdp', out), out
    # what orbax recorded: the large kernels and their Adam moments were split over 'fsdp'
    import orbax.checkpoint as ocp
    step = workdir / 'checkpoints' / str(STEPS)

    def tree(item):
        m = ocp.StandardCheckpointer().metadata(str(step / item))
        return getattr(getattr(m, 'item_metadata', m), 'tree', m)
    params = tree('params')
    mlp = params['Transformer']['encoderblock_0']['MlpBlock_0']
    assert tuple(mlp['Dense_0']['kernel'].sharding.partition_spec) == (None, 'fsdp')
    assert tuple(mlp['Dense_1']['kernel'].sharding.partition_spec) == ('fsdp', None)
    assert tuple(params['cls'].sharding.partition_spec) == ()
    specs = [tuple(x.sharding.partition_spec) for x in _leaves(tree('train_state')['opt_state'])
             if getattr(x, 'shape', None) == (192, 768)]
    assert specs and all(s == (None, 'fsdp') for s in specs), specs


def _leaves(tree):
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    return [tree]


def test_unknown_remat_policy_is_one_line_before_anything_runs(env, tmp_path):
    r = run(env, tmp_path / 'bad', *BASE, '--remat', 'nope', expect=1)
    assert r.stderr.startswith('train_flax.py: error: --remat nope: unknown remat_policy') and \
        len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / 'bad').exists()


@pytest.mark.slow  # a whole run (~30 s); the remat forward/backward itself is tested in test_fast_paths
def test_remat_recomputes_the_same_training(env, reference, tmp_path):
    """--remat changes what the backward pass recomputes, not what it computes, and stays out of the model
    overrides that checkpoints record."""
    workdir = tmp_path / 'remat'
    run(env, workdir, *BASE, '--remat', 'dots_saveable')
    assert_matches_reference(reference[0], workdir)
    assert 'remat' not in str(latest(workdir).meta['model_overrides'])


@pytest.mark.slow  # the default suite runs FSDP inside the multi-process test below
def test_fsdp_on_4_devices_matches_1_device_with_params_sharded(env, reference, tmp_path):
    workdir = tmp_path / 'fsdp'
    r = run(env, workdir, *BASE, '--mesh', 'data=2,fsdp=2', devices=4, cmd=('-m', 'vit_flax_cli', 'train'))
    assert 'data=2 fsdp=2 over 4 device(s) in 1 process(es)' in r.stdout
    assert_matches_reference(reference[0], workdir)
    assert_fsdp_sharded(workdir, r.stdout)


@pytest.mark.parametrize('devices,mesh', [
    pytest.param(2, 'data=2,fsdp=2', id='2x2-devices-fsdp'),      # processes, FSDP and the CLI in one run
    pytest.param(1, 'data=2', id='2x1-device', marks=pytest.mark.slow)])
def test_two_processes_match_one(env, reference, tmp_path, devices, mesh):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    workdir = tmp_path / 'two'
    e = dict(env, XLA_FLAGS=xla_flags(devices))
    procs = [cli_process('train', '--workdir', workdir, *BASE, '--mesh', mesh, '--coordinator', f'127.0.0.1:{port}',
                         '--num-processes', '2', '--process-id', i, wait=False, cwd=ROOT, env=e)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    assert f'over {2 * devices} device(s) in 2 process(es)' in outs[0][0]
    # process 0 reports; process 1 prints only Gloo's connection log (whose '[Gloo] Rank' prefix can come apart
    # from the rest of its line when its C++ writes interleave, leaving a piece or an empty line)
    assert not [line for line in outs[1][0].splitlines()
                if line.strip() and '[Gloo]' not in line and 'peer ranks' not in line]
    assert summary(workdir)['num_processes'] == 2
    assert_matches_reference(reference[0], workdir)
    assert sorted(os.listdir(workdir / 'checkpoints' / str(STEPS) / 'data'))[-2:] == \
        ['process_0-of-2.json', 'process_1-of-2.json']
    if 'fsdp=2' in mesh:
        assert_fsdp_sharded(workdir, outs[0][0])


def test_fine_tune_a_timm_pth_with_frozen_layers(env, tmp_path):
    import timm
    from converters import load_params
    kw = dict(img_size=32, patch_size=8, depth=1)
    torch.save(perturb_timm(timm.create_model('deit_tiny_patch16_224', **kw)).state_dict(), tmp_path / 'w.pth')
    workdir = tmp_path / 'ft'
    r = run(env, workdir, '--model', 'deit_tiny_patch16_224', '--weights', tmp_path / 'w.pth', '--img-size', 16,
            '--patch-size', 8, '--depth', 1, '--batch-size', 64, '--epochs', 1, '--freeze-layers')
    assert 'head: 1000 -> 10 classes' in r.stderr and 'pos_embedding: grid (4, 4) -> (2, 2)' in r.stderr
    assert '1,930 trainable' in r.stdout
    ck = latest(workdir)
    assert ck.meta['weights']['format'] == 'torch'
    assert ck.meta['pretrained_cfg']['mean'] == [0.485, 0.456, 0.406]   # timm's DeiT default, logged
    assert "timm's default for deit" in r.stdout
    from flax.traverse_util import flatten_dict
    start = flatten_dict(load_params(tmp_path / 'w.pth', 'deit_tiny_patch16_224', num_classes=10, img_size=16,
                                     patch_size=8, depth=1, log=lambda m: None), sep='/')
    for k, v in start.items():
        if k.startswith('head/'):
            assert not np.array_equal(ck.flat[k], v), k      # the head learned
        else:
            assert np.array_equal(ck.flat[k], v), k          # everything else is bit-identical


def _folder(root, classes=('daisy', 'rose', 'tulip'), n=27):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        os.makedirs(root / name)
        for i in range(n):
            a = (np.full((20 + i, 24, 3), 80 * c) + rng.integers(0, 40, (20 + i, 24, 3))).astype(np.uint8)
            Image.fromarray(a).save(root / name / (f'{i:02d}.png' if i % 2 else f'{i:02d}.jpg'))
    (root / classes[1] / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
    return classes


def test_fine_tune_a_google_npz_on_a_folder_with_an_unreadable_image(env, tmp_path):
    import jax
    import vit_flax
    from converters import save_params
    kw = dict(img_size=32, patch_size=8, depth=1, num_classes=100, representation_size=192)
    model = vit_flax.create_model('vit_tiny_patch16_224', **kw)
    params = jax.tree.map(lambda x: x + 0.01, vit_flax.init_params(model))  # off the init, head non-zero
    save_params(params, tmp_path / 'g.npz', 'vit_tiny_patch16_224', **kw)
    classes = _folder(tmp_path / 'flowers')
    workdir = tmp_path / 'ft'
    # 10 classes and a batch of 64 (one step per epoch): the reference run's shapes, so its compiled programs
    r = run(env, workdir, '--model', 'vit_tiny_patch16_224', '--weights', tmp_path / 'g.npz', '--img-size', 16,
            '--patch-size', 8, '--depth', 1, '--batch-size', 64, '--epochs', 2, '--data-path', tmp_path / 'flowers',
            '--workers', 0, '--num-classes', 10)
    assert 'pre_logits: dropped' in r.stderr and 'head: 100 -> 10 classes' in r.stderr
    assert 'pos_embedding: grid (4, 4) -> (2, 2)' in r.stderr
    assert f'skipped unreadable image {tmp_path}/flowers/rose/broken.jpg' in r.stderr
    assert re.search(r'epoch \d: skipped 1 unreadable image', r.stderr), r.stderr
    assert 'data: folder 67 train / 15 val images, 10 classes' in r.stdout   # WZMIAOMIAO's 80/20 per class
    # whole batches only: what is left out is said, not silently dropped
    assert 'train: 67 images, batch 64: 1 step per epoch, 3 images left out each epoch (a different 3 each ' \
        'epoch: every epoch is a new shuffle)\n' in r.stdout, r.stdout
    # one step per epoch, the one that compiles: no throughput figure rather than '0 img/s'
    lines = [line for line in r.stdout.splitlines() if line.startswith('epoch ')]
    assert len(lines) == 2 and all(line.endswith('img/s n/a (too few steps after the first, which compiles, to '
                                                 'time)') for line in lines), lines
    with open(workdir / 'class_indices.json') as f:
        assert json.load(f) == {str(i): c for i, c in enumerate(classes)}
    s = summary(workdir)
    assert s['unreadable_images'] in (0, 1) and np.isfinite(s['train_loss'])
    scalars = read_scalars(workdir)
    assert sum(v for _, v in scalars['unreadable_images']) >= 1     # counted in TensorBoard too
    assert 'images_per_sec' not in scalars and s['images_per_sec'] is None   # no made-up 0 there either
    ck = latest(workdir)
    assert ck.meta['pretrained_cfg']['mean'] == [0.5] * 3 and ck.meta['weights']['format'] == 'npz'
    assert ck.meta['pretrained_cfg']['crop_pct'] == 0.875 and ck.meta['class_names'] == list(classes)
    emb = np.asarray(params['embedding']['kernel'])        # fine-tuned from the npz, not from scratch
    assert 0 < np.abs(ck.flat['embedding/kernel'] - emb).max() < 0.05 * np.abs(emb).max()
