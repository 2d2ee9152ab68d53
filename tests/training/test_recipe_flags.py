"""The flags are TrainConfig's fields: one definition (type, default, help, choices), timm's names, abbreviations
refused, bad recipe values refused in one line before anything is built."""
import dataclasses
import os
import subprocess
import sys

import pytest

import vit_train
from vit_train import config
from vit_train.errors import TrainError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _resolve(tmp_path, *argv):
    return config.resolve(config.build_parser().parse_args([*argv, '--workdir', str(tmp_path / 'w')]))


def test_every_field_is_one_flag_generated_from_its_metadata():
    parser = config.build_parser()
    by_dest = {a.dest: a for a in parser._actions if a.dest != 'help'}
    for f in dataclasses.fields(vit_train.TrainConfig):
        a = by_dest[f.name]
        assert a.help == f.metadata['help'] and 'default' in a.help, f.name
        assert a.option_strings[0] == '--' + f.name.replace('_', '-')
    assert by_dest['mixup_mode'].choices == ('batch', 'pair', 'elem')
    assert by_dest['cutmix_minmax'].nargs == 2 and by_dest['cutmix_minmax'].type is float
    assert by_dest['layer_decay'].type is float and by_dest['model_ema'].nargs == 0


def test_timm_spellings_and_the_old_alias():
    p = config.build_parser()
    a = p.parse_args('--mixup 0.8 --cutmix 1.0 --smoothing 0.1 --model-ema --model-ema-decay 0.99996 '
                     '--layer-decay 0.65 --mixup-switch-prob 0.5 --bce-loss --bce-target-thresh 0.2'.split())
    assert (a.mixup, a.cutmix, a.smoothing, a.model_ema, a.model_ema_decay, a.layer_decay) == \
        (0.8, 1.0, 0.1, True, 0.99996, 0.65)
    assert p.parse_args(['--label-smoothing', '0.2']).smoothing == 0.2
    assert config.from_python(dict(label_smoothing=0.3)).smoothing == 0.3


@pytest.mark.parametrize('argv', [['--epoch', '1'], ['--mix', '0.8'], ['--model-ema-d', '0.9']])
def test_abbreviated_flags_are_refused_with_exit_2_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        config.build_parser('train_flax.py').parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('train_flax.py: error: unrecognized arguments: ' + argv[0]) and '\n' not in err, err


def test_unknown_mixup_mode_is_exit_2_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, 'train_flax.py', '--mixup-mode', 'foo', '--workdir', str(tmp_path / 'w')],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "argument --mixup-mode: invalid choice: 'foo'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / 'w').exists()


@pytest.mark.parametrize('argv,message', [
    (['--layer-decay', '0'], '--layer-decay 0.0: wants a factor in (0, 1]'),
    (['--layer-decay', '1.5'], '--layer-decay 1.5: wants a factor in (0, 1]'),
    (['--mixup', '-1'], '--mixup -1.0: wants an alpha >= 0'),
    (['--mixup-prob', '2'], '--mixup-prob 2.0: wants a probability in [0, 1]'),
    (['--cutmix-minmax', '0.8', '0.2'], '--cutmix-minmax 0.8 0.2: wants MIN MAX with 0 < MIN < MAX <= 1'),
    (['--model-ema-decay', '1'], '--model-ema-decay 1.0: wants a decay in [0, 1)'),
    (['--bce-target-thresh', '0.2'], '--bce-target-thresh 0.2: only with --bce-loss'),
    (['--mixup', '0.8', '--batch-size', '33'], '--batch-size 33: mixup/cutmix pair image i with image B-1-i'),
    (['--grad-accum-steps', '2', '--grad-accum', '2'], '--grad-accum-steps 2 (timm'),
    (['--step', '10'], '--step 10: only with --eval-only'),
])
def test_bad_recipe_values_name_their_flag(tmp_path, argv, message):
    with pytest.raises(TrainError) as e:
        _resolve(tmp_path, *argv)
    assert str(e.value).startswith(message) and '\n' not in str(e.value), str(e.value)


def test_bad_recipe_value_exits_1_before_anything_is_written(tmp_path, capsys):
    assert vit_train.main(['--layer-decay', '2', '--workdir', str(tmp_path / 'w')]) == 1
    err = capsys.readouterr().err.strip()
    assert err == 'train_flax.py: error: --layer-decay 2.0: wants a factor in (0, 1]'
    assert not (tmp_path / 'w').exists()


def test_grad_accum_steps_multiplies_the_batch_as_timm(tmp_path):
    a = _resolve(tmp_path, '--batch-size', '16', '--grad-accum-steps', '4')
    assert (a.batch_size, a.grad_accum) == (64, 4) and 'updates of 4 x 16 = 64 images' in a.accum_note
