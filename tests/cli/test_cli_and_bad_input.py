"""The `vit-flax` command: summary, inspect, parity; and every bad input gets one clear line, exit 1."""
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from helpers import cli_process, timm_model


def assert_clean_error(r, *fragments):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('vit-flax: error: '), r.stderr
    assert 'Traceback' not in r.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp('cli')
    torch.save(timm_model('vit_tiny_patch16_224').state_dict(), d / 'tiny.pth')
    return d


def test_summary_json_and_text():
    # timm's parameter counts of these models; 4.6 GMACs: https://huggingface.co/timm/deit_small_patch16_224.fb_in1k
    r = cli_process('summary', 'deit_small_patch16_224', '--json')
    s = json.loads(r.stdout)
    assert s['params'] == 22_050_664 and abs(s['gmacs'] - 4.6) / 4.6 < 0.05
    r = cli_process('summary', 'vit_base_patch16_384')
    assert '86,859,496 params' in r.stdout and 'GMACs' in r.stdout
    assert_clean_error(cli_process('summary', 'vit_nope'), "unknown model 'vit_nope'")


def test_inspect_reports_format_layout_model_and_totals(ckpt):
    r = cli_process('convert', ckpt / 'tiny.pth', ckpt / 'tiny.npz', '--force')
    assert r.returncode == 0, r.stderr
    r = cli_process('inspect', ckpt / 'tiny.npz', '--keys')
    assert r.returncode == 0, r.stderr
    assert 'format:  npz   layout: released' in r.stdout
    assert 'vit_tiny_patch16_224 (detected)' in r.stdout
    assert 'params: 5,717,416' in r.stdout
    line = next(l for l in r.stdout.splitlines() if 'encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in l)
    assert line.split()[1:] == ['(192,', '3,', '64)', 'float32']
    j = json.loads(cli_process('inspect', ckpt / 'tiny.pth', '--json').stdout)
    assert (j['format'], j['layout'], j['model'], j['params'], j['keys']) == \
        ('torch', 'timm', 'vit_tiny_patch16_224', 5_717_416, 152)


def test_parity_passes_and_fails_with_first_divergence(ckpt):
    r = cli_process('parity', ckpt / 'tiny.pth')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'block 11' in r.stdout and 'PASS' in r.stdout
    r = cli_process('parity', ckpt / 'tiny.pth', '--tol', '1e-12')
    assert r.returncode == 1 and 'FAIL: first divergence at embed' in r.stdout


def test_parity_catches_a_wrong_mapping(ckpt, tmp_path, monkeypatch):
    """A swapped q/k order in the map must show up as a divergence at block 0, not pass."""
    from converters import pipeline, rules as table
    from vit_flax_cli import parity
    from converters.families import vit as vit_family
    orig = table.heads_in

    def swapped(num_heads, count=1, kernel=True):
        t = orig(num_heads, count, kernel)
        if count != 3:
            return t
        return table.Transform(t.name, lambda a: t.to_torch([a[1], a[0], a[2]]),
                               lambda a: (lambda q, k, v: [k, q, v])(*t.to_flax(a)))
    model, params, ck = pipeline.load_model(ckpt / 'tiny.pth')
    monkeypatch.setattr(vit_family, 'heads_in', swapped)
    rows = parity.compare(model, params, ck.model_name)
    table_text = parity.format_table(rows, 1e-4)
    assert 'first divergence at block 0' in table_text


def test_missing_file_and_unknown_extension(tmp_path):
    assert_clean_error(cli_process('inspect', tmp_path / 'nope.pth'), 'nope.pth', 'no such file')
    (tmp_path / 'w.ckpt').write_bytes(b'x')
    assert_clean_error(cli_process('convert', tmp_path / 'w.ckpt', tmp_path / 'o.npz'),
                       "unknown checkpoint extension '.ckpt'")


def test_garbage_files(tmp_path):
    for name in ('g.pth', 'g.npz', 'g.safetensors'):
        (tmp_path / name).write_bytes(b'not a checkpoint at all')
        assert_clean_error(cli_process('inspect', tmp_path / name), name)
        assert_clean_error(cli_process('convert', tmp_path / name, tmp_path / 'out.pth'), name)
        assert not (tmp_path / 'out.pth').exists()


class Evil:
    def __reduce__(self):
        return (os.system, (f'touch {MARKER}',))


MARKER = '/tmp/vit_flax_pickle_ran'


def test_pickle_code_is_never_run(tmp_path):
    if os.path.exists(MARKER):
        os.remove(MARKER)
    with open(tmp_path / 'evil.pth', 'wb') as f:
        torch.save({'model': Evil()}, f)
    r = cli_process('convert', tmp_path / 'evil.pth', tmp_path / 'o.npz')
    assert_clean_error(r, 'evil.pth', 'refused to load pickled posix.system')
    assert 'weights_only=False' not in r.stderr   # never suggest the unsafe way
    np.save(tmp_path / 'obj.npy', np.array([Evil()], dtype=object), allow_pickle=True)
    with zipfile.ZipFile(tmp_path / 'evil.npz', 'w') as z:
        z.write(tmp_path / 'obj.npy', 'embedding/kernel.npy')
    assert_clean_error(cli_process('inspect', tmp_path / 'evil.npz'), 'evil.npz', 'refused')
    assert not os.path.exists(MARKER)
    assert not (tmp_path / 'o.npz').exists()


def test_wrong_shape_missing_and_unexpected_keys(ckpt, tmp_path):
    sd = torch.load(ckpt / 'tiny.pth', weights_only=True)
    bad = dict(sd)
    bad['blocks.3.mlp.fc1.weight'] = torch.zeros(700, 192)
    torch.save(bad, tmp_path / 'shape.pth')
    assert_clean_error(cli_process('convert', tmp_path / 'shape.pth', tmp_path / 'o.npz', '--model', 'vit_tiny_patch16_224'),
                       'shape.pth', 'Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel', '(192, 768)', '(192, 700)')
    bad = {k: v for k, v in sd.items() if k != 'blocks.5.attn.proj.bias'}
    torch.save(bad, tmp_path / 'missing.pth')
    assert_clean_error(cli_process('convert', tmp_path / 'missing.pth', tmp_path / 'o.npz'), 'missing.pth',
                       "missing torch key 'blocks.5.attn.proj.bias'")
    torch.save({**sd, 'blocks.0.attn.extra': torch.zeros(3)}, tmp_path / 'extra.pth')
    assert_clean_error(cli_process('convert', tmp_path / 'extra.pth', tmp_path / 'o.npz'), 'extra.pth',
                       "unexpected torch key 'blocks.0.attn.extra'")
    assert not (tmp_path / 'o.npz').exists()


def test_model_mismatch(ckpt, tmp_path):
    assert_clean_error(cli_process('convert', ckpt / 'tiny.pth', tmp_path / 'o.npz', '--model', 'vit_small_patch16_224'),
                       'embed_dim=192', 'vit_small_patch16_224 has embed_dim=384')
    assert not (tmp_path / 'o.npz').exists()


def test_existing_output_is_kept_without_force(ckpt, tmp_path):
    out = tmp_path / 'o.npz'
    out.write_bytes(b'precious')
    assert_clean_error(cli_process('convert', ckpt / 'tiny.pth', out), 'o.npz', 'exists; pass --force')
    assert out.read_bytes() == b'precious'
    assert cli_process('convert', ckpt / 'tiny.pth', out, '--force').returncode == 0
    assert np.load(out)['cls'].shape == (1, 1, 192)
    assert [p.name for p in tmp_path.iterdir()] == ['o.npz']   # no temporary leftovers


def test_failure_during_write_leaves_nothing(ckpt, tmp_path):
    # big_vision cannot hold a distillation token: the error comes at write time, after reading.
    torch.save(timm_model('deit_tiny_distilled_patch16_224').state_dict(), tmp_path / 'd.pth')
    assert_clean_error(cli_process('convert', tmp_path / 'd.pth', tmp_path / 'o.npz', '--layout', 'big_vision'),
                       'distillation token')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d.pth']


def test_bad_options(ckpt, tmp_path):
    assert_clean_error(cli_process('convert', ckpt / 'tiny.pth', tmp_path / 'o.pth', '--layout', 'microsoft'),
                       "layout 'microsoft' cannot be written as torch")
    r = cli_process('convert', ckpt / 'tiny.pth', tmp_path / 'o.pth', '--img-size', 'big')
    assert r.returncode == 2 and '--img-size wants S or HxW' in r.stderr
    assert_clean_error(cli_process('convert', ckpt / 'tiny.pth', ckpt / 'tiny.pth', '--force'), 'is the source')
    for opt, value in [('--num-classes', '-5'), ('--window-size', '0')]:
        r = cli_process('convert', ckpt / 'tiny.pth', tmp_path / 'o.pth', opt, value)
        assert r.returncode == 2 and f'{opt} wants an integer' in r.stderr
    assert_clean_error(cli_process('convert', ckpt / 'tiny.pth', tmp_path / 'o.npz', '--img-size', '8'),
                       'smaller than the patch')
    assert not (tmp_path / 'o.npz').exists() and not (tmp_path / 'o.pth').exists()


def test_force_never_deletes_a_folder_of_other_files(ckpt, tmp_path):
    victim = tmp_path / 'victim'
    victim.mkdir()
    (victim / 'notes.txt').write_text('keep me')
    assert_clean_error(cli_process('convert', ckpt / 'tiny.pth', victim, '--force'), 'not an orbax checkpoint')
    assert (victim / 'notes.txt').read_text() == 'keep me'
    src = victim / 'w.pth'
    src.write_bytes((ckpt / 'tiny.pth').read_bytes())
    assert_clean_error(cli_process('convert', src, victim, '--force'), 'is the source or contains it')
    assert src.exists()
    # an orbax checkpoint, on the other hand, is replaced with --force
    assert cli_process('convert', ckpt / 'tiny.pth', tmp_path / 'ob').returncode == 0
    assert cli_process('convert', ckpt / 'tiny.pth', tmp_path / 'ob', '--force').returncode == 0


def test_malformed_tensors_and_keys(ckpt, tmp_path):
    sd = torch.load(ckpt / 'tiny.pth', weights_only=True)
    torch.save({0: torch.zeros(3)}, tmp_path / 'intkey.pth')
    assert_clean_error(cli_process('inspect', tmp_path / 'intkey.pth'), 'intkey.pth', 'key 0 is not a string')
    torch.save({**sd, 'blocks.0.attn.qkv.weight': sd['blocks.0.attn.qkv.weight'].flatten()}, tmp_path / 'q1d.pth')
    assert_clean_error(cli_process('convert', tmp_path / 'q1d.pth', tmp_path / 'o.npz'), 'q1d.pth',
                       'blocks.0.attn.qkv.weight')
    torch.save({**sd, 'norm.weight': sd['norm.weight'].long()}, tmp_path / 'int.pth')
    assert_clean_error(cli_process('convert', tmp_path / 'int.pth', tmp_path / 'o.npz'), 'int.pth', 'encoder_norm/scale',
                       'floating-point')
    np.save(tmp_path / 'a.npy', np.zeros(3))
    os.rename(tmp_path / 'a.npy', tmp_path / 'a.npz')
    assert_clean_error(cli_process('inspect', tmp_path / 'a.npz'), 'a.npz', 'not an .npz archive')
    assert_clean_error(cli_process('convert', ckpt / 'tiny.pth', '/proc/o.npz'), '/proc/o.npz', 'cannot write')
    assert not (tmp_path / 'o.npz').exists()
