"""The `vit-flax` command: summary, inspect, parity; and every bad input gets one clear line, exit 1.

In this process (`cli`, the same `main` the entry point runs) unless the test is about what only a real process
shows (`cli_process`: nothing else reaches its stderr, garbage and pickles included)."""
import json
import os
import zipfile

import numpy as np
import pytest
import torch

import vit_flax

from helpers import cli, cli_process, timm_model


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
    r = cli('summary', 'deit_small_patch16_224', '--json')
    s = json.loads(r.stdout)
    assert s['params'] == 22_050_664 and abs(s['gmacs'] - 4.6) / 4.6 < 0.05
    r = cli('summary', 'vit_base_patch16_384')
    assert '86,859,496 params' in r.stdout and 'GMACs' in r.stdout
    assert_clean_error(cli('summary', 'vit_nope'), "unknown model 'vit_nope'")


def test_inspect_reports_format_layout_model_and_totals(ckpt):
    r = cli('convert', ckpt / 'tiny.pth', ckpt / 'tiny.npz', '--force')
    assert r.returncode == 0, r.stderr
    r = cli('inspect', ckpt / 'tiny.npz', '--keys')
    assert r.returncode == 0, r.stderr
    assert 'format:  npz   layout: released' in r.stdout
    assert 'vit_tiny_patch16_224 (detected)' in r.stdout
    assert 'params: 5,717,416' in r.stdout
    line = next(l for l in r.stdout.splitlines() if 'encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in l)
    assert line.split()[1:] == ['(192,', '3,', '64)', 'float32']
    j = json.loads(cli('inspect', ckpt / 'tiny.pth', '--json').stdout)
    assert (j['format'], j['layout'], j['model'], j['params'], j['keys']) == \
        ('torch', 'timm', 'vit_tiny_patch16_224', 5_717_416, 152)


def test_parity_passes_and_fails_with_first_divergence(ckpt):
    r = cli('parity', ckpt / 'tiny.pth')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'block 11' in r.stdout and 'PASS' in r.stdout
    r = cli('parity', ckpt / 'tiny.pth', '--tol', '1e-12')
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
    monkeypatch.setattr(vit_family.family, 'heads_in', swapped)   # the rule table's module
    rows = parity.compare(model, params, ck.model_name)
    table_text = parity.format_table(rows, 1e-4)
    assert 'first divergence at block 0' in table_text


def test_missing_file_and_unknown_extension(tmp_path):
    assert_clean_error(cli('inspect', tmp_path / 'nope.pth'), 'nope.pth', 'no such file')
    (tmp_path / 'w.ckpt').write_bytes(b'x')
    assert_clean_error(cli('convert', tmp_path / 'w.ckpt', tmp_path / 'o.npz'),
                       "unknown checkpoint extension '.ckpt'")


def test_garbage_files(tmp_path):
    for name in ('g.pth', 'g.npz', 'g.safetensors'):
        (tmp_path / name).write_bytes(b'not a checkpoint at all')
        assert_clean_error(cli('inspect', tmp_path / name), name)
        assert_clean_error(cli('convert', tmp_path / name, tmp_path / 'out.pth'), name)
        assert not (tmp_path / 'out.pth').exists()
    # and as a user starts it: nothing else reaches the process's stderr
    assert_clean_error(cli_process('convert', tmp_path / 'g.npz', tmp_path / 'out.pth'), 'g.npz')


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
    assert_clean_error(cli('convert', tmp_path / 'shape.pth', tmp_path / 'o.npz', '--model', 'vit_tiny_patch16_224'),
                       'shape.pth', 'Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel', '(192, 768)', '(192, 700)')
    bad = {k: v for k, v in sd.items() if k != 'blocks.5.attn.proj.bias'}
    torch.save(bad, tmp_path / 'missing.pth')
    assert_clean_error(cli('convert', tmp_path / 'missing.pth', tmp_path / 'o.npz'), 'missing.pth',
                       "missing torch key 'blocks.5.attn.proj.bias'")
    torch.save({**sd, 'blocks.0.attn.extra': torch.zeros(3)}, tmp_path / 'extra.pth')
    assert_clean_error(cli('convert', tmp_path / 'extra.pth', tmp_path / 'o.npz'), 'extra.pth',
                       "unexpected torch key 'blocks.0.attn.extra'")
    assert not (tmp_path / 'o.npz').exists()


def test_model_mismatch(ckpt, tmp_path):
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', tmp_path / 'o.npz', '--model', 'vit_small_patch16_224'),
                       'embed_dim=192', 'vit_small_patch16_224 has embed_dim=384')
    assert not (tmp_path / 'o.npz').exists()


def test_existing_output_is_kept_without_force(ckpt, tmp_path):
    out = tmp_path / 'o.npz'
    out.write_bytes(b'precious')
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', out), 'o.npz', 'exists; pass --force')
    assert out.read_bytes() == b'precious'
    assert cli('convert', ckpt / 'tiny.pth', out, '--force').returncode == 0
    assert np.load(out)['cls'].shape == (1, 1, 192)
    assert [p.name for p in tmp_path.iterdir()] == ['o.npz']   # no temporary leftovers


def test_failure_during_write_leaves_nothing(ckpt, tmp_path):
    # big_vision cannot hold a distillation token: the error comes at write time, after reading.
    torch.save(timm_model('deit_tiny_distilled_patch16_224').state_dict(), tmp_path / 'd.pth')
    assert_clean_error(cli('convert', tmp_path / 'd.pth', tmp_path / 'o.npz', '--layout', 'big_vision'),
                       'distillation token')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d.pth']


def test_bad_options(ckpt, tmp_path):
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', tmp_path / 'o.pth', '--layout', 'microsoft'),
                       "layout 'microsoft' cannot be written as torch")
    r = cli('convert', ckpt / 'tiny.pth', tmp_path / 'o.pth', '--img-size', 'big')
    assert r.returncode == 2 and '--img-size wants S or HxW' in r.stderr
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', ckpt / 'tiny.pth', '--force'), 'is the source')
    for opt, value in [('--num-classes', '-5'), ('--window-size', '0')]:
        r = cli('convert', ckpt / 'tiny.pth', tmp_path / 'o.pth', opt, value)
        assert r.returncode == 2 and f'{opt} wants an integer' in r.stderr
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', tmp_path / 'o.npz', '--img-size', '8'),
                       'smaller than the patch')
    assert not (tmp_path / 'o.npz').exists() and not (tmp_path / 'o.pth').exists()


def test_force_never_deletes_a_folder_of_other_files(ckpt, tmp_path):
    victim = tmp_path / 'victim'
    victim.mkdir()
    (victim / 'notes.txt').write_text('keep me')
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', victim, '--force'), 'not an orbax checkpoint')
    assert (victim / 'notes.txt').read_text() == 'keep me'
    src = victim / 'w.pth'
    src.write_bytes((ckpt / 'tiny.pth').read_bytes())
    assert_clean_error(cli('convert', src, victim, '--force'), 'is the source or contains it')
    assert src.exists()
    # an orbax checkpoint, on the other hand, is replaced with --force
    assert cli('convert', ckpt / 'tiny.pth', tmp_path / 'ob').returncode == 0
    assert cli('convert', ckpt / 'tiny.pth', tmp_path / 'ob', '--force').returncode == 0


def test_malformed_tensors_and_keys(ckpt, tmp_path):
    sd = torch.load(ckpt / 'tiny.pth', weights_only=True)
    torch.save({0: torch.zeros(3)}, tmp_path / 'intkey.pth')
    assert_clean_error(cli('inspect', tmp_path / 'intkey.pth'), 'intkey.pth', 'key 0 is not a string')
    torch.save({**sd, 'blocks.0.attn.qkv.weight': sd['blocks.0.attn.qkv.weight'].flatten()}, tmp_path / 'q1d.pth')
    assert_clean_error(cli('convert', tmp_path / 'q1d.pth', tmp_path / 'o.npz'), 'q1d.pth',
                       'blocks.0.attn.qkv.weight')
    torch.save({**sd, 'norm.weight': sd['norm.weight'].long()}, tmp_path / 'int.pth')
    assert_clean_error(cli('convert', tmp_path / 'int.pth', tmp_path / 'o.npz'), 'int.pth', 'encoder_norm/scale',
                       'floating-point')
    np.save(tmp_path / 'a.npy', np.zeros(3))
    os.rename(tmp_path / 'a.npy', tmp_path / 'a.npz')
    assert_clean_error(cli('inspect', tmp_path / 'a.npz'), 'a.npz', 'not an .npz archive')
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', '/proc/o.npz'), '/proc/o.npz', 'cannot write')
    assert not (tmp_path / 'o.npz').exists()


# ---------------------------------------------------------------- what a new user types wrong

def test_set_values_are_checked_against_the_field_types_before_a_model_is_built(ckpt, tmp_path):
    out = tmp_path / 'o.npz'
    for setting, fragments in [
            ('depth=six', ["depth='six' (str)", 'wants int']),
            ('foo=1', ["unknown option(s) ['foo']", "valid: ['act_layer'", "'depth'"]),
            ('qkv_bias=1', ['qkv_bias=1 (int)', 'wants bool']),
            ('img_size=(224,"a")', ['img_size=(224, \'a\')', 'wants int or a tuple of int']),
            ('gelu=fast', ["gelu='fast'", "wants one of 'exact', 'tanh'"]),
            ('depth=0', ['depth=0', 'wants value >= 1']),
            ('num_classes=-3', ['num_classes=-3', 'wants value >= 0']),
            ('drop_rate=1.5', ['drop_rate=1.5', 'wants a rate in [0, 1)'])]:
        assert_clean_error(cli('convert', ckpt / 'tiny.pth', out, '--set', setting), 'tiny.pth', *fragments)
        assert not out.exists()
    # a cross-field fault the model itself finds: still one line, exit 1, not an internal error
    assert_clean_error(cli('convert', ckpt / 'tiny.pth', out, '--set', 'num_heads=5'),
                       'embed dim 192 is not divisible by 5 heads')
    assert_clean_error(cli('summary', 'lucid_vit_base_patch16_224', '--img-size', '225'),
                       'img_size 225 is not a multiple of the patch 16')


def test_create_model_takes_what_its_fields_take():
    """Values of the right kind pass: numpy scalars (what a file's shapes give), a ratio below 1, tuples, None."""
    m = vit_flax.create_model('vit_tiny_patch16_224', embed_dim=np.int64(96), depth=np.int32(2), mlp_ratio=0.5,
                              qkv_bias=np.bool_(False), drop_rate=np.float32(0.1), img_size=(32, 48), mlp_dim=None)
    assert (m.embed_dim, m.depth, m.mlp_ratio, m.img_size) == (96, 2, 0.5, (32, 48))
    for bad, match in [(dict(mlp_ratio=0), 'mlp_ratio=0 wants value > 0'), (dict(depth=2.0), 'wants int'),
                       (dict(posemb='sine'), "wants one of 'learn', 'sincos2d'")]:
        with pytest.raises(ValueError, match=match):   # OptionValueError: a ValueError (and a TypeError)
            vit_flax.create_model('vit_tiny_patch16_224', **bad)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['depths'\]"):
        vit_flax.create_model('vit_tiny_patch16_224', depths=(2, 2))


def test_unreadable_files_say_what_they_are(ckpt, tmp_path):
    whole = (ckpt / 'tiny.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(whole[:len(whole) // 2])
    np.savez(tmp_path / 'full.npz', a=np.zeros(1000))
    (tmp_path / 'cut.npz').write_bytes((tmp_path / 'full.npz').read_bytes()[:3000])
    (tmp_path / 'text.npz').write_text('hello, this is not an archive\n')
    (tmp_path / 'lfs.pth').write_text('version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n')
    (tmp_path / 'page.safetensors').write_text('<!DOCTYPE html><html><body>404</body></html>')
    from safetensors.numpy import save_file
    save_file({'a': np.zeros(1000, np.float32)}, str(tmp_path / 'full.safetensors'))
    (tmp_path / 'cut.safetensors').write_bytes((tmp_path / 'full.safetensors').read_bytes()[:2000])
    for name, fragments in [
            ('cut.pth', ['truncated', 'begins as a zip archive', 'cut short']),
            ('cut.npz', ['truncated', 'begins as a zip archive']),
            ('text.npz', ['a text file', "'hello, this is not an archive'"]),
            ('lfs.pth', ['a Git LFS pointer', 'git lfs pull']),
            ('page.safetensors', ['not a .safetensors file', 'an HTML page']),
            ('cut.safetensors', ['truncated', "tensor 'a' ends at byte 4,000"])]:
        r = cli('inspect', tmp_path / name)
        assert_clean_error(r, name, *fragments)
        assert 'seek out of range' not in r.stderr and 'File is not a zip file' not in r.stderr


def test_unknown_names_suggest_the_closest_and_tell_timm_names_apart():
    r = cli('summary', 'vit_smal_patch16_224')
    assert_clean_error(r, "unknown model 'vit_smal_patch16_224'", 'similar: vit_small_patch16_224, ')
    assert_clean_error(cli('summary', 'resnet50'), "'resnet50': a timm model this project does not build yet")
    r = cli('list', 'xcit_*')   # timm's XCiT, not built here
    assert r.returncode == 1 and r.stdout == ''
    assert "no registered model matches 'xcit_*'" in r.stderr and 'timm model(s) do' in r.stderr
    r = cli('list', 'deit_*')
    assert r.returncode == 0 and 'deit_small_patch16_224' in r.stdout.split()


def test_the_timm_name_list_is_timms():
    import timm
    from vit_flax.registry import timm_names
    path = os.path.join(os.path.dirname(vit_flax.__file__), 'timm_models.txt')
    with open(path) as f:
        kept = f.readline().split()[2].rstrip(':')
    if kept != timm.__version__:
        pytest.skip(f'the list is timm {kept}\'s; timm {timm.__version__} is installed')
    assert timm_names() == set(timm.list_models())
    # every registered name is timm's, except the vit-pytorch and 1-D models, which timm does not have
    assert all(n.startswith(('lucid_vit_', 'vit1d_')) for n in set(vit_flax.list_models()) - timm_names())


def test_summary_says_what_an_odd_input_size_does():
    r = cli('summary', 'vit_small_patch16_224', '--img-size', '225')
    assert r.returncode == 0 and 'the last rows/columns of each image are never seen (the patches cover 224x224)' in r.stderr
    r = cli('summary', 'swin_tiny_patch4_window7_224', '--img-size', '225', '--json')
    assert json.loads(r.stdout)['notes'] == ['img_size 225x225 is not a multiple of the patch 4x4: each image is '
                                             'zero-padded to 228x228 on the right and bottom']
    assert cli('summary', 'vit_small_patch16_224', '--json').stderr == ''
    assert_clean_error(cli('summary', 'vit_small_patch16_224', '--img-size', '8'),
                       'img_size 8 is smaller than the patch 16')


def test_every_option_has_help_and_states_its_default():
    import argparse
    from vit_flax_cli.cli import build_parser
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, parser in sub.choices.items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (cmd, action.option_strings or action.dest)
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert 'default' in action.help, (cmd, action.option_strings)
    text = cli('summary', '--help').stdout
    assert '--num-classes' in text and "the model's own" in text
