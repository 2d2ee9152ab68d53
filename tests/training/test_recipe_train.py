"""train_flax.py with the DeiT recipe on the device side (mixup + cutmix + smoothing, weight EMA, layer decay):
kill -9 and resume ends bit-identical (params and EMA); the workdir holds the EMA, param_groups.json and
metrics.jsonl; --eval-only and `vit-flax convert --ema` read the same weights back; --dump-batches shows the
batches the step mixes, from the same pre-mix images as a run without mixing."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers import cli, kill_9_after_checkpoint, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, 'train_flax.py')
RECIPE = ('--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1', '--model-ema', '--model-ema-decay', '0.9',
          '--layer-decay', '0.65', '--log-every', '10')
BASE = ('--depth', '1', '--batch-size', '64', '--epochs', '2', '--save-every', '16', '--keep', '2', *RECIPE)
STEPS = 44


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
                JAX_DISABLE_MOST_OPTIMIZATIONS='1', XLA_FLAGS=xla_flags(1))


def run(env, workdir, *args, expect=0):
    r = subprocess.run([sys.executable, TRAIN, '--workdir', str(workdir), *map(str, args)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == expect, f'exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


@pytest.fixture(scope='module')
def reference(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('recipe')
    return workdir, run(env, workdir, *BASE)


def _ckpt(workdir, ema=False, step='latest'):
    from converters.formats import training_ckpt
    return training_ckpt.select(str(workdir), step, log=lambda m: None, ema=ema)


def test_recipe_run_keeps_an_ema_and_says_what_it_does(reference):
    workdir, r = reference
    for line in ("mixing: mixup alpha 0.8, cutmix alpha 1.0, prob 1.0, switch 0.5, mode batch (timm's Mixup, on "
                 "the device); smoothing 0.1", "loss: soft-target cross-entropy (timm's SoftTargetCrossEntropy)",
                 "EMA: decay 0.9 (timm's ModelEmaV3), evaluated each epoch beside the raw weights",
                 'layer decay: 0.65 over 3 layer ids'):
        assert line in r.stdout, r.stdout
    assert re.search(r'epoch 2: val_acc raw 0\.\d+ / EMA 0\.\d+ \(top-5 .*\): this checkpoint ranks by the '
                     r'(raw|EMA) weights', r.stdout), r.stdout
    with open(workdir / 'summary.json') as f:
        s = json.load(f)
    assert {'val_acc_ema', 'val_top5', 'val_top5_ema'} <= set(s) and s['val_acc'] > 0.3 and s['val_acc_ema'] > 0.3
    assert s['best_val_acc'] == max(h.get('val_acc_ema', 0) for h in s['history']) or \
        s['best_val_acc'] == max(max(h['val_acc'], h['val_acc_ema']) for h in s['history'])
    raw, ema = _ckpt(workdir), _ckpt(workdir, ema=True)
    assert raw.flat.keys() == ema.flat.keys()
    assert any(not np.array_equal(raw.flat[k], ema.flat[k]) for k in raw.flat)        # an average, not a copy
    groups = json.loads((workdir / 'param_groups.json').read_text())
    assert groups['params']['head.weight']['lr_scale'] == 1.0
    assert groups['params']['cls_token']['lr_scale'] == pytest.approx(0.65 ** 2)
    lines = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert [x['step'] for x in lines] == [10, 20, 30, 40]
    assert all(x['grad_norm'] > 0 and 0 <= x['data_wait'] <= 1 and x['images_per_sec'] > 0 for x in lines)


@pytest.mark.slow  # make test's kill -9 with the whole DeiT recipe (test_train_augment.py) checks the same, metrics.jsonl too
def test_kill_9_then_resume_is_bit_identical_with_the_recipe_on(env, reference, tmp_path):
    workdir = tmp_path / 'killed'
    kill_9_after_checkpoint([sys.executable, TRAIN, '--workdir', str(workdir), *BASE], env, workdir, 16,
                            cwd=ROOT)
    r = run(env, workdir, *BASE)
    assert re.search(rf'resumed from the checkpoint of step (16|22|32) of {STEPS}', r.stdout), r.stdout
    for ema in (False, True):
        a, b = _ckpt(reference[0], ema), _ckpt(workdir, ema)
        assert a.step == b.step == STEPS
        for k in a.flat:
            assert np.array_equal(a.flat[k], b.flat[k]), (ema, k)
    ref = [json.loads(x) for x in (reference[0] / 'metrics.jsonl').read_text().splitlines()]
    got = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
    key = lambda x: (x['step'], x['loss'], x['grad_norm'])  # noqa: E731
    assert [key(x) for x in got] == [key(x) for x in ref]


def eval_only(capsys, **fields):
    """--eval-only in this process (vit_train.train, which leaves the process as it found it; what is asked
    here is what it reads and reports, not how a process exits): what it printed."""
    import vit_train
    capsys.readouterr()
    vit_train.train(dict(eval_only=True, **{k: str(v) if k in ('workdir', 'weights') else v
                                            for k, v in fields.items()}))
    return capsys.readouterr().out


def test_eval_only_and_convert_read_the_raw_and_ema_weights(reference, tmp_path, capsys):
    workdir = tmp_path / 'w'
    shutil.copytree(reference[0], workdir)
    out = eval_only(capsys, workdir=workdir, batch_size=64)
    rec = json.loads((workdir / 'eval.json').read_text())
    s = json.loads((workdir / 'summary.json').read_text())
    best = max(s['history'], key=lambda h: max(h['val_acc'], h['val_acc_ema']))
    assert rec['step'] == best['step'] and rec['num_val'] == 355
    assert rec['results']['raw']['top1'] == pytest.approx(best['val_acc'], abs=1e-6)
    assert rec['results']['ema']['top1'] == pytest.approx(best['val_acc_ema'], abs=1e-6)
    assert rec['results']['ema']['top5'] == pytest.approx(best['val_top5_ema'], abs=1e-6)
    assert 'eval: EMA weights of' in out and 'top-5' in out
    # `vit-flax convert` in this process (what it reads is the question here, not how a process exits)
    c = cli('convert', workdir, tmp_path / 'ema.npz', '--ema', '--step', STEPS)
    assert c.returncode == 0 and 'its weight EMA (val_acc_ema' in c.stderr + c.stdout, c.stderr
    c = cli('convert', workdir, tmp_path / 'raw.npz', '--step', STEPS)
    assert c.returncode == 0 and 'its raw weights (it also holds a weight EMA: --ema takes that)' in c.stderr + c.stdout
    from converters import load_params
    from flax.traverse_util import flatten_dict
    kw = dict(img_size=16, patch_size=8, depth=1, num_classes=10)
    for name, ema in (('ema.npz', True), ('raw.npz', False)):
        got = flatten_dict(load_params(tmp_path / name, 'vit_tiny_patch16_224', log=lambda m: None, **kw), sep='/')
        want = _ckpt(workdir, ema, STEPS).flat
        assert all(np.array_equal(got[k], want[k]) for k in want), name
    # the exported EMA evaluated as --weights gives the figure the run recorded for its EMA at that step
    eval_only(capsys, workdir=tmp_path / 'e', weights=tmp_path / 'ema.npz', model='vit_tiny_patch16_224', img_size=16,
              patch_size=8, depth=1, batch_size=64)
    rec = json.loads((tmp_path / 'e' / 'eval.json').read_text())
    last = json.loads((workdir / 'summary.json').read_text())['history'][-1]
    assert rec['results']['weights']['top1'] == pytest.approx(last['val_acc_ema'], abs=1e-6)


def test_dump_batches_are_the_unmixed_batches_mixed_as_timm(tmp_path, capsys):
    """The same seed gives the same images before mixing with or without --mixup; mixed = lam x + (1 - lam) x.flip
    with the targets timm's mixup_target of that lam."""
    import torch
    from timm.data.mixup import mixup_target
    import vit_train
    common = ['--depth', '1', '--batch-size', '32', '--dump-batches', '2', '--smoothing', '0.1']
    assert vit_train.main([*common, '--workdir', str(tmp_path / 'plain')]) == 0
    assert vit_train.main([*common, '--mixup', '0.8', '--workdir', str(tmp_path / 'mix')]) == 0
    assert 'no training' in capsys.readouterr().out
    plain, mixed = (np.load(tmp_path / d / 'batches.npz') for d in ('plain', 'mix'))
    assert (tmp_path / 'mix' / 'batches.png').stat().st_size > 1000
    assert not (tmp_path / 'mix' / 'checkpoints').exists()
    np.testing.assert_array_equal(plain['labels'], mixed['labels'])
    assert plain['images'].dtype == np.float32 and 0 <= plain['images'].min() and plain['images'].max() <= 1
    np.testing.assert_allclose(mixed['targets'].sum(1), 1, atol=1e-5)
    for b in range(2):
        rows = slice(32 * b, 32 * (b + 1))
        x, y, labels = plain['images'][rows], mixed['targets'][rows], plain['labels'][rows]
        # one lam for the batch, solved from the targets (least squares over every entry)
        want_y = mixup_target(torch.from_numpy(labels), 10, 1.0, 0.1).numpy()
        lam = float(np.linalg.lstsq((want_y - want_y[::-1]).reshape(-1, 1), (y - want_y[::-1]).reshape(-1),
                                    rcond=None)[0][0])
        np.testing.assert_allclose(y, mixup_target(torch.from_numpy(labels), 10, lam, 0.1).numpy(), atol=1e-5)
        np.testing.assert_allclose(mixed['images'][rows], lam * x + (1 - lam) * x[::-1], atol=1e-5)
        assert 0 < lam < 1


@pytest.mark.slow  # a third epoch (~40 s)
def test_resume_with_more_epochs_recomputes_the_cosine_and_says_so(env, reference, tmp_path):
    from vit_train import optim
    workdir = tmp_path / 'longer'
    shutil.copytree(reference[0], workdir)
    r = run(env, workdir, *BASE[:4], '--epochs', '3', *BASE[6:])
    old = optim.schedule(1e-3, 0.01, 22, 44)(44)
    new = optim.schedule(1e-3, 0.01, 22, 66)(44)
    assert f"schedule: --epochs 3 (the checkpoint's run had 2): the cosine is recomputed over 66 steps; learning " \
        f"rate at step 45: {old:.6g} -> {new:.6g}\n" in r.stdout, r.stdout
    assert json.loads((workdir / 'summary.json').read_text())['step'] == 66


def test_dump_batches_show_the_erasing_and_mix_the_erased_images(tmp_path):
    """--reprob: the dumped images are the plain ones with boxes of the mean colour (const fill 0, de-normalised
    to 0.5); with --mixup too, the erased images are what gets mixed (timm's order: erase, then mix)."""
    import vit_train
    common = ['--depth', '1', '--batch-size', '32', '--dump-batches', '1']
    erase = ['--reprob', '1', '--remode', 'const']
    for name, extra in (('plain', []), ('erased', erase), ('both', [*erase, '--mixup', '0.8'])):
        assert vit_train.main([*common, *extra, '--workdir', str(tmp_path / name)]) == 0
    plain, erased, both = (np.load(tmp_path / d / 'batches.npz')['images'] for d in ('plain', 'erased', 'both'))
    boxed = ~np.isclose(erased, plain, rtol=0, atol=1e-6)        # (the de-normalisation rounds: 1e-7)
    assert boxed.any(axis=(1, 2, 3)).sum() >= 24                   # nearly every image got its box
    assert 0.02 < boxed.mean() < 0.4                                # boxes, not whole images
    np.testing.assert_allclose(erased[boxed], 0.5, atol=1e-6)       # filled with the mean colour
    targets = np.load(tmp_path / 'both' / 'batches.npz')['targets']
    labels = np.load(tmp_path / 'both' / 'batches.npz')['labels']
    other = labels != labels[::-1]                                  # one lam for the batch (no smoothing)
    lam = float(targets[np.arange(32), labels][other][0])
    np.testing.assert_allclose(targets[np.arange(32), labels][other], lam, atol=1e-6)
    assert 0.5 <= lam < 1 and not np.allclose(both, erased)
    np.testing.assert_allclose(both, lam * erased + (1 - lam) * erased[::-1], atol=1e-5)
