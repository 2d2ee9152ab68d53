"""Swin V2 through the converters: Microsoft's own `SwinTransformerV2` (models/swin_transformer_v2.py, vendored in
tests/reference/) read and written both ways, a model fine-tuned at a larger window than it was pretrained with,
timm's layout, and the `vit-flax convert` round trip timm .pth -> .npz -> Microsoft .pth."""
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict
from timm.models.swin_transformer_v2 import checkpoint_filter_fn

import vit_flax
from converters import pipeline
from converters.errors import ConversionError
from converters.families.swinv2 import FAMILY, pretrained_window_of

from helpers import cli, images, perturb_timm, rel_err, run_flax, run_timm, state_np, timm_model
from reference import ms_swin_transformer_v2 as ms

TOL = 1e-5
SMALL = dict(embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])


def ms_model(img_size, window_size, pretrained=(0, 0, 0, 0), num_classes=10, seed=0):
    """Microsoft's SwinTransformerV2, every weight moved off its init."""
    torch.manual_seed(seed)
    return perturb_timm(ms.SwinTransformerV2(img_size=img_size, window_size=window_size, num_classes=num_classes,
                                             pretrained_window_sizes=list(pretrained), **SMALL), seed)


def save_ms(model, path):
    torch.save({'model': model.state_dict()}, path)
    return path


def load(path, **kw):
    notes = []
    model, params, ck = pipeline.load_model(path, log=notes.append, **kw)
    return model, params, ck, '\n'.join(notes)


# ---------------------------------------------------------------- reading Microsoft's files

@pytest.mark.parametrize('img,window,pretrained', [(64, 4, (0, 0, 0, 0)),
                                                   (128, 8, (4, 4, 4, 2))])   # fine-tuned 4 -> 8 at 64 -> 128
def test_a_microsoft_file_alone_rebuilds_its_model(tmp_path, img, window, pretrained):
    """Depths, heads (logit_scale), window (relative_position_index), input size (attn_mask window counts) and
    pretrained windows (the coordinate tables' normalisation) come from the file, said on stderr; the logits
    equal Microsoft's code's."""
    ref = ms_model(img, window, pretrained)
    model, params, ck, notes = load(save_ms(ref, tmp_path / 'ms.pth'))
    assert (ck.layout, type(model)) == ('microsoft', vit_flax.SwinTransformerV2)
    assert (model.embed_dim, tuple(model.depths), tuple(model.num_heads)) == (16, (2, 2, 2, 2), (1, 2, 4, 8))
    assert (model.window_size, model.img_size, tuple(model.pretrained_window_sizes)) == (window, img, pretrained)
    assert 'inferred from Microsoft\'s buffers' in notes and f'img_size={img}' in notes
    assert f'pretrained_window_sizes={pretrained}' in notes
    x = images((2, img, img, 3))
    assert rel_err(run_flax(model, params, x), run_timm(ref, x)) <= TOL


def test_pretrained_window_read_off_the_coordinate_table():
    for window, pretrained in [(8, 0), (16, 12), (24, 12), (8, 6), (12, 0), (6, 0)]:
        attn = ms.WindowAttention(16, (window, window), 2, pretrained_window_size=(pretrained, pretrained))
        assert pretrained_window_of(attn.relative_coords_table.numpy()) == pretrained


def test_microsoft_layout_reads_as_timms_own_filter(tmp_path):
    """Microsoft .pth -> timm .pth: bit-exact with timm's checkpoint_filter_fn, and timm loads it strictly."""
    ref = ms_model(64, 4)
    model, params, _, _ = load(save_ms(ref, tmp_path / 'ms.pth'), cast=False)
    pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'timm.pth')
    got = torch.load(tmp_path / 'timm.pth', weights_only=True)
    import timm
    tm = timm.create_model('swinv2_tiny_window8_256', **FAMILY.timm_kwargs(model))
    want = checkpoint_filter_fn({k: v.clone() for k, v in ref.state_dict().items()}, tm)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    tm.load_state_dict(got, strict=True)
    x = images((1, 64, 64, 3))
    assert rel_err(run_timm(tm.eval(), x), run_timm(ref, x)) <= TOL


# ---------------------------------------------------------------- writing Microsoft's layout

@pytest.mark.parametrize('img,window,pretrained', [(64, 4, (0, 0, 0, 0)), (128, 8, (4, 4, 4, 2))])
def test_microsoft_layout_loads_strictly_in_microsofts_code(tmp_path, img, window, pretrained):
    """--layout microsoft: the keys of Microsoft's state_dict in its order, its buffers regenerated equal to its
    own (strict loading would copy wrong ones silently), and its forward equal to the Flax model's."""
    src = ms_model(img, window, pretrained, seed=1)
    model, params, _, _ = load(save_ms(src, tmp_path / 'src.pth'), cast=False)
    assert pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'out.pth', layout='microsoft') \
        == 'microsoft'
    written = torch.load(tmp_path / 'out.pth', weights_only=True)
    assert list(written) == ['model']
    fresh = ms.SwinTransformerV2(img_size=img, window_size=window, num_classes=10,
                                 pretrained_window_sizes=list(pretrained), **SMALL)
    own = fresh.state_dict()
    assert list(written['model']) == list(own)
    for k in own:
        if k.endswith(('relative_position_index', 'attn_mask')):   # integers, and masks of 0 and -100: exact
            assert own[k].dtype == written['model'][k].dtype and torch.equal(own[k], written['model'][k]), k
        elif k.endswith('relative_coords_table'):
            # ours is numpy's float32 log2, Microsoft's torch's: kernels picked per CPU instruction set, which may
            # round an entry one ulp apart (AVX-512 EPYC: 124 of window 16's 1,922; see test_swinv2.py)
            assert own[k].dtype == written['model'][k].dtype == torch.float32, k
            np.testing.assert_allclose(written['model'][k].numpy(), own[k].numpy(),
                                       rtol=4 * np.finfo(np.float32).eps, atol=0, err_msg=k)
    fresh.load_state_dict(written['model'], strict=True)
    x = images((2, img, img, 3))
    assert rel_err(run_timm(fresh.eval(), x), run_flax(model, params, x)) <= TOL


def test_microsoft_layout_refuses_what_microsofts_code_cannot_build():
    model = vit_flax.SwinTransformerV2(img_size=(64, 96), window_size=4, embed_dim=16, depths=(2, 2, 2, 2),
                                       num_heads=(1, 2, 4, 8))
    flat = {k: np.zeros(v.shape, np.float32) for k, v in
            flatten_dict(vit_flax.summary.param_shapes(model), sep='/').items()}
    with pytest.raises(ConversionError, match='square inputs'):
        pipeline.to_torch_state(flat, model, 'microsoft')


def test_a_three_stage_file_takes_its_stage_count_from_the_file(tmp_path):
    """Microsoft's SwinTransformerV2(depths=[2, 2, 2]): read with its buffers (everything recorded), and its
    weights without them (timm's layout, what `convert` writes): the registered names all have four stages, so
    the pretrained windows the file does not record are one per stage of the file; logits equal Microsoft's.
    (Without buffers the window is the registered name's, 8: window 4 is a fine-tuning target unless the
    pretrained windows are given too, as for a four-stage file.)"""
    torch.manual_seed(0)
    ref = perturb_timm(ms.SwinTransformerV2(img_size=64, window_size=4, num_classes=10, embed_dim=16,
                                            depths=[2, 2, 2], num_heads=[1, 2, 4]), 0)
    x = images((2, 64, 64, 3))
    model, params, ck, notes = load(save_ms(ref, tmp_path / 'ms3.pth'))
    assert (tuple(model.depths), tuple(model.pretrained_window_sizes), model.window_size) == ((2, 2, 2), (0, 0, 0), 4)
    assert rel_err(run_flax(model, params, x), run_timm(ref, x)) <= TOL
    flat = flatten_dict(params, sep='/')
    pipeline.write_flat(flat, model, str(tmp_path / 'timm3.pth'), log=lambda s: None)   # no buffers
    stripped = {k: v for k, v in ref.state_dict().items() if not k.endswith(('relative_coords_table',
                                                                             'relative_position_index', 'attn_mask'))}
    torch.save({'model': stripped}, tmp_path / 'ms3_stripped.pth')
    for name in ('timm3.pth', 'ms3_stripped.pth'):
        m, p, ck, notes = load(tmp_path / name)
        assert (tuple(m.depths), tuple(m.pretrained_window_sizes), m.window_size) == ((2, 2, 2), (0, 0, 0), 8)
        m, p, ck, notes = load(tmp_path / name, window_size=4, img_size=64, pretrained_window_sizes=(0, 0, 0))
        assert (tuple(m.depths), tuple(m.pretrained_window_sizes)) == ((2, 2, 2), (0, 0, 0)), name
        assert rel_err(run_flax(m, p, x), run_timm(ref, x)) <= TOL, name
    r = cli('convert', tmp_path / 'timm3.pth', tmp_path / 'back.pth', '--layout', 'microsoft',
            '--set', 'window_size=4', '--set', 'img_size=64', '--set', 'pretrained_window_sizes=(0, 0, 0)')
    assert r.returncode == 0, r.stderr
    again = ms.SwinTransformerV2(img_size=64, window_size=4, num_classes=10, embed_dim=16, depths=[2, 2, 2],
                                 num_heads=[1, 2, 4])
    again.load_state_dict(torch.load(tmp_path / 'back.pth', weights_only=True)['model'], strict=True)
    assert rel_err(run_timm(again.eval(), x), run_timm(ref, x)) <= TOL


# ---------------------------------------------------------------- fine-tuning at a larger window

def test_window_change_needs_no_table_resampling_and_keeps_the_pretrained_windows(tmp_path):
    """A window-4 model pretrained at 64 fine-tuned to window 8 at 128 (Microsoft's 12 -> 16 at 192 -> 256,
    small): the target gets pretrained_window_sizes = the trained windows (4, 4, 4, 2), as Microsoft's configs
    set them, said on stderr; the weights are copied unchanged; the logits equal Microsoft's model built that
    way, loading the pretrained file as its `load_pretrained` does (buffers dropped, strict=False)."""
    pre = ms_model(64, 4)
    model, params, _, notes = load(save_ms(pre, tmp_path / 'pre.pth'), window_size=8, img_size=128)
    assert (model.window_size, model.img_size, tuple(model.pretrained_window_sizes)) == (8, 128, (4, 4, 4, 2))
    assert 'needs no table resampling' in notes and 'pretrained_window_sizes=(4, 4, 4, 2)' in notes
    ft = ms.SwinTransformerV2(img_size=128, window_size=8, num_classes=10, pretrained_window_sizes=[4, 4, 4, 2],
                              **SMALL)
    state = {k: v for k, v in pre.state_dict().items()
             if not k.endswith(('relative_coords_table', 'relative_position_index', 'attn_mask'))}
    missing, unexpected = ft.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith(('relative_coords_table', 'relative_position_index', 'attn_mask'))
                                  for k in missing)
    x = images((2, 128, 128, 3))
    assert rel_err(run_flax(model, params, x), run_timm(ft.eval(), x)) <= TOL


# ---------------------------------------------------------------- timm's layout and the command

def test_a_timm_file_says_what_it_does_not_record(tmp_path):
    tm = timm_model('swinv2_tiny_window8_256', depths=(1, 1, 1, 1))
    torch.save(tm.state_dict(), tmp_path / 'timm.pth')
    model, params, ck, notes = load(tmp_path / 'timm.pth')
    assert ck.layout == 'timm' and 'does not record its window' in notes
    assert (model.window_size, model.img_size) == (8, 256)
    x = images((1, 256, 256, 3))
    assert rel_err(run_flax(model, params, x), run_timm(tm, x)) <= TOL


def test_cli_timm_pth_to_npz_to_microsoft_pth(tmp_path):
    """`vit-flax convert` timm .pth -> .npz -> Microsoft .pth; Microsoft's code loads the result strictly and
    computes timm's logits."""
    tm = timm_model('swinv2_tiny_window8_256', depths=(2, 2, 2, 2))
    torch.save(tm.state_dict(), tmp_path / 'timm.pth')
    arch = ('--model', 'swinv2_tiny_window8_256', '--set', 'depths=(2, 2, 2, 2)')
    r = cli('convert', tmp_path / 'timm.pth', tmp_path / 'flax.npz', *arch)
    assert r.returncode == 0, r.stderr
    r = cli('convert', tmp_path / 'flax.npz', tmp_path / 'ms.pth', '--layout', 'microsoft', *arch)
    assert r.returncode == 0, r.stderr
    ref = ms.SwinTransformerV2(img_size=256, window_size=8, embed_dim=96, depths=[2, 2, 2, 2],
                               num_heads=[3, 6, 12, 24])
    ref.load_state_dict(torch.load(tmp_path / 'ms.pth', weights_only=True)['model'], strict=True)
    x = images((1, 256, 256, 3))
    assert rel_err(run_timm(ref.eval(), x), run_timm(tm, x)) <= TOL
    r = cli('inspect', tmp_path / 'ms.pth')
    assert r.returncode == 0 and 'microsoft' in r.stdout, r.stdout + r.stderr


def test_cli_parity_on_a_microsoft_file(tmp_path):
    """`vit-flax parity` on a Microsoft file: the model it rebuilds against timm's, stage by stage."""
    save_ms(ms_model(64, 4, seed=2), tmp_path / 'ms.pth')
    r = cli('parity', tmp_path / 'ms.pth', '--batch', '1')
    assert r.returncode == 0, r.stdout + r.stderr
    assert 'microsoft' in r.stdout and 'stage 3' in r.stdout


def test_a_corrupt_coordinate_table_is_one_line_naming_its_key(tmp_path):
    state = ms_model(64, 4).state_dict()
    state['layers.1.blocks.0.attn.relative_coords_table'] = torch.full_like(
        state['layers.1.blocks.0.attn.relative_coords_table'], 7.5)
    torch.save({'model': state}, tmp_path / 'bad.pth')
    r = cli('inspect', tmp_path / 'bad.pth')
    assert r.returncode == 1 and 'Traceback' not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert 'layers.1.blocks.0.attn.relative_coords_table' in r.stderr and 'bad.pth' in r.stderr
