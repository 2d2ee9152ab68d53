"""WZMIAOMIAO's PyTorch code (github.com/WZMIAOMIAO/deep-learning-for-image-processing) as a client: the 1-D
ViT of that blog series, its 2-D `vit_model.py` and its Swin.

The reference classes are our re-implementations in `reference/wzmiaomiao.py` (that repository is GPL-3.0
and not installable); every weight is perturbed; files go through our converters and back.
"""
from functools import partial

import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict

import converters
from converters import pipeline
from converters.families import swin as swin_family
from converters.errors import ConversionError
from vit_flax.models.swin import relative_position_index

from reference import wzmiaomiao
from helpers import cli, images, perturb_timm, rel_err, run_flax, run_timm, state_np, timm_model

TOL = 1e-4



def assert_same_state(got, want):
    assert set(got) == set(want)
    for k, v in want.items():
        g = got[k].numpy() if isinstance(got[k], torch.Tensor) else np.asarray(got[k])
        assert g.dtype == v.dtype and np.array_equal(g, v), k


def strict_load(cls_or_module, path):
    sd = torch.load(path, weights_only=True)
    cls_or_module.load_state_dict(sd, strict=True)
    return sd


# ---------------------------------------------------------------- the 1-D ViT (patch_embed.norm)

def test_1d_vit_with_embed_norm_reads_and_writes_exactly(tmp_path):
    cfg = dict(img_size=256, patch_size=16, in_c=2, num_classes=5, embed_dim=192, depth=2, num_heads=3)
    ref = perturb_timm(wzmiaomiao.VisionTransformer1D(**cfg))
    torch.save(ref.state_dict(), tmp_path / 'vit1d.pth')
    x = images((2, 256, 2))
    with torch.no_grad():
        want = ref(torch.from_numpy(x).permute(0, 2, 1).contiguous()).numpy()
    # the call the issue names, now reading patch_embed.norm into the model's embed norm
    params = converters.load_params(tmp_path / 'vit1d.pth', 'vit1d_tiny_patch16_1024', depth=2, in_chans=2,
                                    img_size=256, num_classes=5)
    import vit_flax
    model = vit_flax.create_model('vit1d_tiny_patch16_1024', depth=2, in_chans=2, img_size=256, num_classes=5)
    assert model.embed_norm and 'embedding_norm' in params
    assert rel_err(run_flax(model, params, x), want) < TOL
    # pth -> npz (the CLI, as the README says) -> pth: bit-exact, and WZMIAOMIAO's class takes it strictly
    r = cli('convert', tmp_path / 'vit1d.pth', tmp_path / 'vit1d.npz', '--model', 'vit1d_tiny_patch16_1024',
            '--set', 'depth=2')
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / 'vit1d.npz')['embedding_norm/scale'].shape == (192,)
    m2, p2, _ = pipeline.load_model(tmp_path / 'vit1d.npz')  # an npz records the heads: no name needed
    pipeline.write_flat(flatten_dict(p2, sep='/'), m2, tmp_path / 'back.pth')
    assert_same_state(strict_load(wzmiaomiao.VisionTransformer1D(**cfg), tmp_path / 'back.pth'), state_np(ref))
    # a model without the norm is refused with the option to pass, not a bare key error
    with pytest.raises(ConversionError, match='embed_norm=True'):
        converters.load_params(tmp_path / 'vit1d.pth', 'vit1d_tiny_patch16_1024', depth=2, in_chans=2,
                               img_size=256, num_classes=5, embed_norm=False)


# ---------------------------------------------------------------- the 2-D vit_model.py

SMALL_2D = dict(img_size=64, patch_size=16, embed_dim=96, depth=2, num_heads=3)
FLAX_2D = dict(img_size=64, embed_dim=96, depth=2, num_heads=3)


@pytest.mark.parametrize('variant', ['plain', 'in21k', 'distilled', 'embed_norm'])
def test_2d_vit_model_variants(variant, tmp_path):
    kw, flax_kw = dict(num_classes=10), dict(num_classes=10)
    if variant == 'in21k':  # vit_*_in21k(has_logits=True): pre_logits.fc + Tanh
        kw.update(num_classes=21843, representation_size=96)
        flax_kw.update(num_classes=21843, representation_size=96)
    elif variant == 'distilled':
        kw.update(distilled=True)
        flax_kw.update(distilled=True)
    elif variant == 'embed_norm':  # WZMIAOMIAO's own PatchEmbed given a norm layer, as the 1-D model does
        kw.update(embed_layer=partial(wzmiaomiao.PatchEmbed, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)))
        flax_kw.update(embed_norm=True)
    ref = perturb_timm(wzmiaomiao.VisionTransformer(**SMALL_2D, **kw))
    torch.save(ref.state_dict(), tmp_path / 'w.pth')
    x = images((2, 64, 64, 3))
    model, params, ck = pipeline.load_model(tmp_path / 'w.pth', 'vit_tiny_patch16_224', **FLAX_2D)
    assert all(getattr(model, k) == v for k, v in flax_kw.items())
    assert rel_err(run_flax(model, params, x), run_timm(ref, x)) < TOL
    pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'g.npz')
    m2, p2, _ = pipeline.load_model(tmp_path / 'g.npz')
    pipeline.write_flat(flatten_dict(p2, sep='/'), m2, tmp_path / 'back.pth')
    assert_same_state(strict_load(wzmiaomiao.VisionTransformer(**SMALL_2D, **kw), tmp_path / 'back.pth'), state_np(ref))


def test_2d_embed_norm_matches_timm_embed_norm_layer(tmp_path):
    tm = timm_model('vit_tiny_patch16_224', img_size=64, depth=2, embed_norm_layer='layernorm')
    torch.save(tm.state_dict(), tmp_path / 'timm.pth')
    model, params, ck = pipeline.load_model(tmp_path / 'timm.pth', 'vit_tiny_patch16_224', depth=2)
    assert model.embed_norm and model.img_size == 64  # both read off the keys
    x = images((2, 64, 64, 3))
    assert rel_err(run_flax(model, params, x), run_timm(tm, x)) < TOL
    # and vit_timm_kwargs asks timm for the same norm (what `vit-flax parity` builds)
    from converters.families.vit import FAMILY as VIT
    assert VIT.timm_kwargs(model)['embed_norm_layer'] == 'layernorm'


# ---------------------------------------------------------------- swin_transformer/model.py

# three stages at 112: 28x28, 14x14, 7x7 -- the last is one window, where WZMIAOMIAO's code still shifts
SWIN = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), window_size=7)
SWIN_FLAX = dict(embed_dim=32, depths=(2, 2, 2), num_heads=(1, 2, 4), img_size=112)


@pytest.fixture(scope='module')
def wzmiaomiao_swin(tmp_path_factory):
    ref = perturb_timm(wzmiaomiao.SwinTransformer(num_classes=10, **SWIN))
    d = tmp_path_factory.mktemp('wzmiaomiao_swin')
    torch.save(ref.state_dict(), d / 'w.pth')
    return ref, d


def test_swin_layout_detected_and_computed_as_wzmiaomiaos_code_does(wzmiaomiao_swin):
    ref, d = wzmiaomiao_swin
    logs = []
    model, params, ck = pipeline.load_model(d / 'w.pth', 'swin_tiny_patch4_window7_224', log=logs.append, **SWIN_FLAX)
    assert ck.layout == 'wzmiaomiao' and model.always_partition
    assert any('wzmiaomiao layout' in s and 'always_partition=True' in s for s in logs)
    x = images((2, 112, 112, 3))
    want = run_timm(ref, x)
    assert rel_err(run_flax(model, params, x), want) < TOL
    # what reading it as a Microsoft/timm file computes instead (the window clamped, no shift on the 7x7 stage)
    plain = model.clone(always_partition=False)
    assert rel_err(run_flax(plain, params, x), want) > 1e-3


def test_swin_written_in_the_wzmiaomiao_layout_loads_strictly_bit_exact(wzmiaomiao_swin, tmp_path):
    ref, d = wzmiaomiao_swin
    arch = ['--model', 'swin_tiny_patch4_window7_224', '--set', 'embed_dim=32', '--set', 'depths=(2,2,2)',
            '--set', 'num_heads=(1,2,4)']
    r = cli('convert', d / 'w.pth', tmp_path / 'f.npz', *arch)
    assert r.returncode == 0, r.stderr
    assert 'wzmiaomiao' in r.stdout and 'always_partition=True' in r.stderr
    # an npz does not record always_partition: it is asked for when writing back
    logs = []
    model, params, _ = pipeline.load_model(tmp_path / 'f.npz', always_partition=True, log=logs.append)
    assert pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'back.pth', layout='wzmiaomiao',
                          log=logs.append) == 'wzmiaomiao'
    assert not logs
    sd = strict_load(wzmiaomiao.SwinTransformer(num_classes=10, **SWIN), tmp_path / 'back.pth')
    assert_same_state(sd, state_np(ref))  # relative_position_index buffers included, no attn_mask
    # the Microsoft layout carries attn_mask buffers WZMIAOMIAO's class does not have
    ms = swin_family.timm_to_microsoft(swin_family.microsoft_to_timm(state_np(ref)), img_size=112)
    missing, unexpected = wzmiaomiao.SwinTransformer(num_classes=10, **SWIN).load_state_dict(
        {k: torch.from_numpy(v) for k, v in ms.items()}, strict=False)
    assert not missing and unexpected and all(k.endswith('attn_mask') for k in unexpected)


def test_swin_layout_detection_rules():
    state = state_np(perturb_timm(wzmiaomiao.SwinTransformer(num_classes=10, **SWIN)))
    timm_state = swin_family.microsoft_to_timm(state)
    assert swin_family.FAMILY.detect_layout(state) == 'wzmiaomiao'
    assert swin_family.FAMILY.detect_layout(timm_state) == 'timm'
    ms = swin_family.timm_to_microsoft(timm_state, img_size=112)
    assert swin_family.FAMILY.detect_layout(ms) == 'microsoft'
    stripped = {k: v for k, v in ms.items() if not k.endswith(('attn_mask', 'relative_position_index'))}
    assert swin_family.FAMILY.detect_layout(stripped) == 'microsoft'  # no buffers: Microsoft's computation
    ours = swin_family.timm_to_wzmiaomiao(timm_state)
    assert list(ours) == list(state)  # WZMIAOMIAO's own key order
    assert all(np.array_equal(ours[k], state[k]) for k in state)
    assert np.array_equal(state['layers.2.blocks.1.attn.relative_position_index'], relative_position_index((7, 7)))


def test_swin_writing_a_layout_whose_code_computes_otherwise_warns(wzmiaomiao_swin, tmp_path):
    ref, d = wzmiaomiao_swin
    model, params, _ = pipeline.load_model(d / 'w.pth', 'swin_tiny_patch4_window7_224', log=lambda s: None,
                                      **SWIN_FLAX)
    flat = flatten_dict(params, sep='/')
    logs = []
    layout_notes = lambda: [s for s in logs if 'records no model fields' not in s]   # noqa: E731 (model_fields')
    for layout in ('microsoft', 'timm'):
        pipeline.write_flat(flat, model, tmp_path / f'{layout}.pth', layout=layout, log=logs.append)
        assert len(layout_notes()) == 1 and 'always_partition=True' in layout_notes()[0]
        logs.clear()
    pipeline.write_flat(flat, model, tmp_path / 'w.pth', layout='wzmiaomiao', log=logs.append)
    assert not layout_notes()
    pipeline.write_flat(flat, model.clone(always_partition=False), tmp_path / 's.pth', layout='wzmiaomiao', log=logs.append)
    assert len(layout_notes()) == 1 and 'always_partition=False' in layout_notes()[0]
