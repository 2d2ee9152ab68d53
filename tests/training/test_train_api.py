"""vit_train.train / train_iter: the command line's run from Python, twice in one process, same result.

A tiny run (one block, 16px digits, val split 0.5, 2 epochs of 7 steps of 128) by the command line in its own
process is the reference; the Python runs in this process must give bit-identical parameters and the same
per-epoch metrics (training is deterministic given the seed).
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import absl.logging
import jax
import numpy as np
import pytest

import vit_train
from helpers import xla_flags
from vit_train import config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLAGS = dict(depth=1, epochs=2, batch_size=128, val_split=0.5)
METRICS = ('epoch', 'step', 'train_loss', 'train_acc', 'val_loss', 'val_acc', 'learning_rate', 'unreadable_images')


def as_argv(fields):
    return [x for k, v in fields.items() for x in (f'--{k.replace("_", "-")}', str(v))]


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
    """(workdir, summary.json, final params as numpy) of `python train_flax.py FLAGS` in its own process."""
    workdir = tmp_path_factory.mktemp('cli')
    r = subprocess.run([sys.executable, 'train_flax.py', *as_argv(FLAGS), '--workdir', str(workdir)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, XLA_FLAGS=xla_flags(1)))
    assert r.returncode == 0, r.stderr[-2000:]
    with open(workdir / 'summary.json') as f:
        summary = json.load(f)
    from converters.formats import training_ckpt
    ck = training_ckpt.select(str(workdir), 'latest', log=lambda m: None)
    return workdir, summary, ck.flat


def flat_np(params):
    from flax.traverse_util import flatten_dict
    return {k: np.asarray(v) for k, v in flatten_dict(params, sep='/').items()}


def metrics(history):
    return [{k: h[k] for k in METRICS} for h in history]


def test_train_twice_in_one_process_gives_the_command_lines_result(cli_run, tmp_path):
    _, summary, cli_params = cli_run
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    verbosity, cache_dir = absl.logging.get_verbosity(), jax.config.jax_compilation_cache_dir
    seen = []
    first = vit_train.train(vit_train.TrainConfig(**FLAGS, workdir=str(tmp_path / 'a')), on_epoch=seen.append)
    run = vit_train.train_iter(dict(FLAGS, workdir=str(tmp_path / 'b')))     # a plain dict, the iterator form
    records = list(run)
    second = run.result

    assert [r['epoch'] for r in seen] == [r['epoch'] for r in records] == [1, 2]  # every epoch, in order
    assert seen[-1]['val_acc'] == summary['val_acc'] and seen[-1]['best_val_acc'] == summary['best_val_acc']
    for result, workdir in ((first, tmp_path / 'a'), (second, tmp_path / 'b')):
        assert result.workdir == str(workdir) and os.path.isdir(os.path.join(result.workdir, 'checkpoints'))
        got = flat_np(result.params)
        assert got.keys() == cli_params.keys()
        for k in got:
            np.testing.assert_array_equal(got[k], cli_params[k], err_msg=k)
        assert metrics(result.history) == metrics(summary['history'])
        assert int(result.state['step']) == 14 and result.state['params'] is result.params
        assert result.history[-1]['train_loss'] < result.history[0]['train_loss']
    # nothing of the process is left changed
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    assert absl.logging.get_verbosity() == verbosity and jax.config.jax_compilation_cache_dir == cache_dir

    # a finished workdir: no epoch runs, the result is the saved one
    again = vit_train.train(dict(FLAGS, workdir=str(tmp_path / 'a')), on_epoch=lambda r: pytest.fail('trained'))
    for k, v in flat_np(again.params).items():
        np.testing.assert_array_equal(v, cli_params[k], err_msg=k)
    assert metrics(again.history) == metrics(summary['history'])


def test_an_unknown_or_ill_typed_field_is_a_train_error_naming_it(tmp_path):
    with pytest.raises(vit_train.TrainError, match=r"^unknown TrainConfig field 'epoch'; did you mean 'epochs'"):
        vit_train.train(dict(epoch=2, workdir=str(tmp_path)))
    with pytest.raises(vit_train.TrainError, match=r"^TrainConfig field batch_size \(--batch-size\) wants an "
                                                   r"integer, got '64'$"):
        vit_train.train(dict(batch_size='64'))
    with pytest.raises(vit_train.TrainError, match=r'optimizer \(--optimizer\) wants one of sgd, adamw'):
        vit_train.train(vit_train.TrainConfig(optimizer='adam'))
    with pytest.raises(vit_train.TrainError, match=r'val_split \(--val-split\) wants a fraction in \[0, 1\)'):
        vit_train.train(dict(val_split=1.5))
    with pytest.raises(vit_train.TrainError, match=r'^--epochs wants an integer >= 1, got 0$'):
        vit_train.train(dict(epochs=0, workdir=str(tmp_path)))
    with pytest.raises(vit_train.TrainError, match=r'missing\.npz') as e:   # the converters' error, as TrainError
        vit_train.train(dict(FLAGS, weights=str(tmp_path / 'missing.npz'), workdir=str(tmp_path / 'w')))
    assert '\n' not in str(e.value)
    assert not os.listdir(tmp_path)                                    # refused before anything is written


def test_the_flags_are_the_train_config_fields_with_its_defaults():
    parser = config.build_parser()
    dests = {a.dest for a in parser._actions if a.dest != 'help'}
    assert dests == {f.name for f in dataclasses.fields(vit_train.TrainConfig)}
    assert vars(parser.parse_args([])) == dataclasses.asdict(vit_train.TrainConfig())
    for a in parser._actions:                                          # dashes for underscores
        if a.dest != 'help':
            assert f'--{a.dest.replace("_", "-")}' in a.option_strings, a.dest
    # a config and the flags it stands for give the same namespace
    cfg = vit_train.TrainConfig(model='vit_small_patch16_224', mean=(0.1, 0.2, 0.3), hflip=False, remat='full',
                                freeze_layers=True, lr=0.01, epochs=3)
    argv = ['--model', 'vit_small_patch16_224', '--mean', '0.1', '0.2', '0.3', '--no-hflip', '--remat',
            '--freeze-layers', '--lr', '0.01', '--epochs', '3']
    want = vars(parser.parse_args(argv))
    assert vars(config.from_python(cfg)) == dict(want, mean=tuple(want['mean']))
