"""train_flax.py with the whole DeiT recipe: the host side (RandAugment rand-m9-mstd0.5-inc1, random erasing
0.25 in pixel mode, 3 repeats) and the device side (erasing, then mixup 0.8 / cutmix 1.0 with smoothing 0.1, a
weight EMA, layer decay 0.65): killed with SIGKILL after its first checkpoint, the rerun resumes and ends
bit-identical to the uninterrupted run (the same pixels, boxes, noise and mixing draws after the resume; params,
EMA and the step log of metrics.jsonl), as tests/training/test_train.py shows for the plain pipeline."""
import json
import os
import re
import sys

import pytest

from helpers import kill_9_after_checkpoint, xla_flags
from test_train import ROOT, TRAIN, assert_same_params, latest, run

# 1 epoch of 21 steps of 66 (even for the mixing pairs, a multiple of the 3 repeats), a checkpoint every 8
# steps (8 16 21)
AUG = ('--depth', '1', '--batch-size', '66', '--epochs', '1', '--save-every', '8', '--keep', '2',
       '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25', '--aug-repeats', '3',
       '--mixup', '0.8', '--cutmix', '1.0', '--smoothing', '0.1', '--model-ema', '--model-ema-decay', '0.9',
       '--layer-decay', '0.65', '--log-every', '5')


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
                JAX_DISABLE_MOST_OPTIMIZATIONS='1', XLA_FLAGS=xla_flags(1))


def test_kill_9_with_the_deit_recipe_then_rerun_resumes_bit_identical(env, tmp_path):
    ref = run(env, tmp_path / 'reference', *AUG)
    assert ('augmentation: --aa rand-m9-mstd0.5-inc1, random erasing p=0.25 mode=pixel count 1-1, each image 3 times '
            'in a row') in ref.stdout, ref.stdout
    assert 'train: 1442 images, batch 66: 21 steps per epoch of 462 images 3 times each' in ref.stdout
    assert 'mixing: mixup alpha 0.8, cutmix alpha 1.0' in ref.stdout and 'EMA: decay 0.9' in ref.stdout, ref.stdout
    workdir = tmp_path / 'killed'
    kill_9_after_checkpoint([sys.executable, TRAIN, '--workdir', str(workdir), *AUG], env, workdir, 8,
                            cwd=ROOT)
    r = run(env, workdir, *AUG)
    m = re.search(r'resumed from the checkpoint of step (\d+) of 21 .*; continuing with step (\d+)', r.stdout)
    assert m and 8 <= int(m.group(1)) < 21, r.stdout
    assert_same_params(latest(tmp_path / 'reference'), latest(workdir))
    assert_same_params(ema(tmp_path / 'reference'), ema(workdir))
    # the resumed run's step log continues the killed one's: the same steps, losses and gradient norms
    ref, got = (metrics(tmp_path / 'reference'), metrics(workdir))
    assert [x['step'] for x in ref] == [5, 10, 15, 20]
    key = lambda x: (x['step'], x['loss'], x['grad_norm'])  # noqa: E731
    assert [key(x) for x in got] == [key(x) for x in ref]


def metrics(workdir):
    return [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]


def ema(workdir):
    from converters.formats import training_ckpt
    return training_ckpt.select(str(workdir), 'latest', log=lambda m: None, ema=True)
