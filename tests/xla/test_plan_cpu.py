"""`vit-flax xla` and `train_flax.py --plan` for the CPU target (no libtpu needed), and the bad inputs that are
refused before anything compiles. The TPU compiles are in test_plan_tpu.py."""
import csv
import json

import pytest

from helpers import cli
from vit_train import main as train_main, plan

TINY = ('--set', 'img_size=32', '--set', 'patch_size=4', '--set', 'depth=1')


def test_cpu_forward_reports_memory_flops_and_hlo_counts_as_json():
    r = cli('xla', 'vit_tiny_patch16_224', *TINY, '--batch', '8', '--json')
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    for k in plan.JSON_KEYS:
        assert k in p, k
    assert p['target'] == 'cpu' and p['fits'] and p['dtype'] == 'float32'
    assert p['peak_bytes'] == p['argument_bytes'] + p['output_bytes'] - p['alias_bytes'] + p['temp_bytes']
    assert p['param_bytes'] == 4 * p['num_params']   # float32, one device
    # 2 x the summary's MACs per image (matmuls only); XLA adds the elementwise ops
    assert 1.0 <= p['flops'] / p['model_flops'] < 1.05, p['flops'] / p['model_flops']
    assert p['fusions'] > 0 and p['collectives'] == {}
    assert p['roofline_seconds'] is None   # no peak FLOP/s for a CPU


def test_sweep_writes_a_table_csv_and_png(tmp_path):
    out = tmp_path / 'sw'
    r = cli('xla', 'vit_tiny_patch16_224', *TINY, '--sweep', 'batch=2,8', '--out', out)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(f'{out}.csv')))
    assert [row['batch'] for row in rows] == ['2', '8']
    assert int(rows[1]['peak_bytes']) > int(rows[0]['peak_bytes'])
    assert float(rows[1]['flops']) > 3.5 * float(rows[0]['flops'])
    assert (tmp_path / 'sw.png').stat().st_size > 1000
    assert 'batch=8' in r.stdout


def test_train_flax_plan_compiles_the_step_and_exits_without_training(tmp_path):
    rc = train_main(['--plan', 'cpu', '--model', 'vit_tiny_patch16_224', '--img-size', '32', '--patch-size', '4',
                     '--depth', '1', '--num-classes', '10', '--batch-size', '4', '--workdir', str(tmp_path / 'w')])
    assert rc == 0
    assert not (tmp_path / 'w').exists()   # nothing written: no run happened


@pytest.mark.parametrize('args, says', [
    (('nosuch_vit',), 'nosuch_vit'),
    (('vit_tiny_patch16_224', '--target', 'tpu:v9x:2x2'), 'known: v4:2x2x1'),
    (('vit_tiny_patch16_224', '--target', 'gpu'), 'tpu:TOPOLOGY'),
    (('vit_tiny_patch16_224', '--mesh', 'data=2'), "--mesh 'data=2'"),
    (('vit_tiny_patch16_224', '--batch', '3', '--grad-accum', '2', '--train'), 'batch 3'),
])
def test_bad_input_is_one_line_and_exit_1(args, says):
    r = cli('xla', *args)
    assert r.returncode == 1 and r.stdout == ''
    assert len(r.stderr.strip().splitlines()) == 1 and says in r.stderr, r.stderr


def test_a_tpu_target_without_libtpu_names_the_tpu_extra(monkeypatch):
    monkeypatch.setattr(plan, 'have_libtpu', lambda: False)
    r = cli('xla', 'vit_tiny_patch16_224', '--target', 'tpu:v5e:2x2')
    assert r.returncode == 1 and "vit-flax-tools[tpu]" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
