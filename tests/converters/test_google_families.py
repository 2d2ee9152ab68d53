"""Google's other ViT checkpoint families: R+ViT hybrids, SigLIP image towers, fixed sincos2d positions.

Every checkpoint is built here from a perturbed timm model, in Google's layouts; timm is the judge.
"""
import copy
import json
import re
from functools import partial
from unittest import mock

import ml_dtypes
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict
from timm.layers import HybridEmbed
from timm.models import vision_transformer as timm_vit
from timm.models import vision_transformer_hybrid as timm_hybrid
from timm.models.vision_transformer import _load_weights as timm_load_npz

import vit_flax
from converters import pipeline
from converters.families import vit as vit_family
from vit_flax_cli import parity
from converters.errors import ConversionError
from vit_flax.models.posemb import sincos2d
from vit_flax.models.resnet import standardize
from vit_flax.summary import count_macs, count_params, param_shapes

from helpers import cli, images, perturb_timm, rel_err, run_flax, run_timm, state_np, timm_model

HYBRID = re.compile(r'vit_(tiny|small|base|large)_r(\d+)?_s\d+(_p\d+)?_\d+')
SIGLIP = re.compile(r'vit_\w+_siglip(_gap)?_\d+')


def same_npz(a, b):
    a, b = np.load(a), np.load(b)
    return sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)


def to_flat(tm, model):
    return pipeline.rules.torch_to_flax(state_np(tm), pipeline.family_of(model).rules(model))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def to_tuple2(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


# ---------------------------------------------------------------- registry: timm's own configurations

def _timm_configs():
    """name -> (model kwargs, ResNet units per stage or None) as timm's model functions pass them, captured
    without building anything (timm's builders, and its hybrids' backbone builder, are mocked)."""
    captured = {}
    names = [n for n in timm.list_models('vit_*') if HYBRID.fullmatch(n) or SIGLIP.fullmatch(n)]
    capture = lambda variant, *a, **kw: captured.__setitem__(variant, kw)
    backbone_layers = lambda layers=(3, 4, 9), **kw: tuple(layers)      # _resnetv2's own default
    for name in names:
        with mock.patch.object(timm_vit, '_create_vision_transformer', capture), \
                mock.patch.object(timm_hybrid, '_create_vision_transformer_hybrid', capture), \
                mock.patch.object(timm_hybrid, '_resnetv2', backbone_layers):
            timm.models.model_entrypoint(name)(pretrained=False)
    return {name: (kw, kw.pop('backbone', None)) for name, kw in captured.items()}


TIMM_CONFIGS = _timm_configs()


def test_every_google_family_name_of_timm_is_registered():
    assert len([n for n in TIMM_CONFIGS if HYBRID.fullmatch(n)]) == 9
    assert len([n for n in TIMM_CONFIGS if SIGLIP.fullmatch(n)]) >= 34
    ours = {n for n in vit_flax.list_models() if HYBRID.fullmatch(n) or SIGLIP.fullmatch(n)}
    assert ours == set(TIMM_CONFIGS)


@pytest.mark.parametrize('name', sorted(TIMM_CONFIGS))
def test_configuration_equals_timm(name):
    kw, layers = TIMM_CONFIGS[name]
    cfg = timm.models.get_pretrained_cfg(name)
    m = vit_flax.create_model(name)
    assert m.resnet == layers
    assert m.num_classes == cfg.num_classes                      # timm's default head (0: the towers)
    assert to_tuple2(m.img_size) == tuple(cfg.input_size[-2:])
    assert m.patch_size_tuple == to_tuple2(kw.get('patch_size', 1 if layers is not None else 16))
    assert (m.embed_dim, m.depth, m.num_heads) == (kw['embed_dim'], kw['depth'], kw['num_heads'])
    assert int(m.embed_dim * m.mlp_ratio) == int(kw['embed_dim'] * kw.get('mlp_ratio', 4.0))
    assert m.gelu == {'gelu_tanh': 'tanh', None: 'exact'}[kw.get('act_layer')]
    assert m.has_class_token == kw.get('class_token', True)
    assert m.global_pool == {'token': 'token', 'avg': 'gap', 'map': 'map'}[kw.get('global_pool', 'token')]
    assert kw.get('fc_norm', False) is False and m.posemb == 'learn'


@pytest.mark.parametrize('name', ['vit_tiny_r_s16_p8_224', 'vit_base_patch32_siglip_256'])
def test_param_count_equals_timm(name):
    with torch.device('meta'):
        expected = sum(p.numel() for p in timm.create_model(name).parameters())
    assert count_params(vit_flax.create_model(name)) == expected


def test_hybrid_macs_equal_torch_flop_counter():
    """Our jaxpr MAC count against torch's own FLOP counter on timm's hybrid (FLOPs = 2 x MACs)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):
        tm = timm.create_model('vit_small_r26_s32_224', depth=2).eval()
        x = torch.empty(1, 3, 224, 224)
    with FlopCounterMode(display=False) as counter:
        tm(x)
    assert count_macs(vit_flax.create_model('vit_small_r26_s32_224', depth=2)) * 2 == counter.get_total_flops()


# ---------------------------------------------------------------- R+ViT hybrids

def test_hybrid_tree_is_google_tree():
    m = vit_flax.create_model('vit_base_r50_s16_384', num_classes=0)
    flat = {k: tuple(v.shape) for k, v in flatten_dict(param_shapes(m), sep='/').items()}
    assert flat['conv_root/kernel'] == (7, 7, 3, 64) and flat['gn_root/scale'] == (64,)
    assert flat['block1/unit1/conv_proj/kernel'] == (1, 1, 64, 256) and 'block1/unit2/conv_proj/kernel' not in flat
    assert flat['block3/unit9/conv3/kernel'] == (1, 1, 256, 1024) and 'block4/unit1/conv1/kernel' not in flat
    assert flat['block2/unit1/conv2/kernel'] == (3, 3, 128, 128) and flat['block2/unit1/gn2/bias'] == (128,)
    assert flat['embedding/kernel'] == (1, 1, 1024, 768)
    assert flat['Transformer/posembed_input/pos_embedding'] == (1, 1 + 24 * 24, 768)
    assert not any('bias' in k for k in flat if re.search(r'conv\w*/', k))   # bias-free convolutions


@pytest.mark.parametrize('name, kw', [('vit_tiny_patch16_224', dict(patch_size=8)),   # shares a stem-less
                                      ('vit_tiny_r_s16_p8_224', {})])                 # hybrid's core fields
def test_detection_takes_a_resnet_stem_only_from_a_file_with_one(tmp_path, name, kw):
    """A plain ViT-Ti/8 and the hybrid R-Ti/16+ViT-Ti (a stem without stages, patch 8) share embed_dim, depth,
    heads, mlp and patch size; only the stem tells them apart."""
    m = vit_flax.create_model(name, img_size=32, depth=1, **kw)
    path = str(tmp_path / 'x.npz')
    flat = {k: np.ones(v.shape, np.float32) for k, v in flatten_dict(param_shapes(m), sep='/').items()}
    pipeline.write_flat(flat, m, path)
    assert pipeline.read_checkpoint(path).model_name == name


def _timm_hybrid(layers, seed=0, **kw):
    """timm's own hybrid: its ResNetV2 backbone builder for `layers`, inside its VisionTransformer."""
    model = timm_vit.VisionTransformer(embed_layer=partial(HybridEmbed, backbone=timm_hybrid._resnetv2(layers)),
                                       patch_size=1, **kw)
    return perturb_timm(model, seed)


HYBRID_ARCH = dict(img_size=64, embed_dim=64, depth=2, num_heads=2)


@pytest.fixture(scope='module')
def hybrid(tmp_path_factory):
    tm = _timm_hybrid((1, 1), num_classes=10, **HYBRID_ARCH)
    d = tmp_path_factory.mktemp('hybrid')
    torch.save(tm.state_dict(), d / 'timm.pth')
    x = images((2, 64, 64, 3))
    return dict(tm=tm, dir=d, pth=d / 'timm.pth', x=x, y=run_timm(tm, x))


def test_hybrid_pth_parity_and_released_npz_old_group_norm_shapes(hybrid):
    model, params, ck = pipeline.load_model(hybrid['pth'], 'vit_base_r50_s16_224', **HYBRID_ARCH)
    assert model.resnet == (1, 1) and model.num_classes == 10 and model.grid_size == (8, 8)
    assert rel_err(run_flax(model, params, hybrid['x']), hybrid['y']) < 1e-4
    # the timm model `vit-flax parity` builds for a hybrid is timm's own, holding the same weights
    rebuilt = parity.build_timm(model, 'vit_tiny_r_s16_p8_224', flatten_dict(params, sep='/'))
    np.testing.assert_array_equal(run_timm(rebuilt, hybrid['x']), hybrid['y'])
    npz = hybrid['dir'] / 'released.npz'
    pipeline.write_flat(flatten_dict(params, sep='/'), model, npz)
    arrays = dict(np.load(npz))
    assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in arrays
    # the original R50+ViT-B_16 files keep GroupNorm scale/bias as (1, 1, 1, C)
    old = {k: v.reshape(1, 1, 1, -1) if re.search(r'gn(\d|_root|_proj)/', k) else v for k, v in arrays.items()}
    assert old['gn_root/scale'].shape == (1, 1, 1, 64)
    np.savez(hybrid['dir'] / 'old.npz', **old)
    fresh = timm_vit.VisionTransformer(embed_layer=partial(HybridEmbed, backbone=timm_hybrid._resnetv2((1, 1))),
                                       patch_size=1, num_classes=10, **HYBRID_ARCH).eval()
    timm_load_npz(fresh, str(hybrid['dir'] / 'old.npz'))     # timm's own reader of Google's hybrid files
    np.testing.assert_array_equal(run_timm(fresh, hybrid['x']), hybrid['y'])
    m2, p2, ck2 = pipeline.load_model(hybrid['dir'] / 'old.npz')  # npz records the whole architecture
    assert ck2.layout == 'released' and m2.resnet == (1, 1)
    assert ck2.family.describe(ck2) == 'R8+ViT hybrid (released)'
    f2 = flatten_dict(p2, sep='/')
    assert all(np.array_equal(f2[k], v) for k, v in flatten_dict(params, sep='/').items())
    back = hybrid['dir'] / 'back.pth'
    pipeline.write_flat(f2, m2, back)
    b = torch.load(back, weights_only=True)
    assert_same_state(torch.load(hybrid['pth'], weights_only=True), b)
    fresh.load_state_dict(b, strict=True)


def google_way(tm):
    """A copy of timm's hybrid computed as vit_jax computes it: its StdConv standardises a kernel as
    (w - mean) / (std + 1e-5), and flax's GroupNorm has eps 1e-6 (timm: (w - mean) / sqrt(var + 1e-8), eps
    1e-5). Source: https://github.com/google-research/vision_transformer/blob/main/vit_jax/models_resnet.py
    (class StdConv; nn.GroupNorm at its default epsilon)."""
    from timm.layers import StdConv2dSame
    from timm.layers.padding import pad_same
    tm = copy.deepcopy(tm)
    for m in tm.modules():
        if isinstance(m, StdConv2dSame):
            def forward(x, m=m):
                w = m.weight
                w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
                if m.same_pad:
                    x = pad_same(x, m.kernel_size, m.stride, m.dilation)
                return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
            m.forward = forward
        elif isinstance(m, torch.nn.GroupNorm):   # timm's GroupNormAct included
            m.eps = 1e-6
    return tm


def test_hybrid_google_numerics(hybrid):
    """'google' computes vit_jax's standardisation and GroupNorm eps; 'timm' computes timm's: each equals its
    own reference (timm's model in float64, as is or made to compute the Google way) to fp32 rounding, and
    the two references differ by far more than that, so an ignored or half-wired flag fails."""
    w = np.random.default_rng(0).standard_normal((3, 3, 8, 16)).astype(np.float32) * 0.05
    flat = w.reshape(-1, 16)
    np.testing.assert_allclose(standardize(w, 'google'), (w - flat.mean(0)) / (flat.std(0) + 1e-5), rtol=1e-5,
                               atol=1e-6)
    conv = timm.layers.StdConv2dSame(8, 16, 3, eps=1e-8)          # timm's own standardisation
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1)))
        ref = torch.nn.functional.batch_norm(conv.weight.reshape(1, 16, -1), None, None, training=True,
                                             momentum=0., eps=conv.eps).reshape_as(conv.weight)
    np.testing.assert_allclose(standardize(w, 'timm'), ref.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-6)
    # near-black images (N(0, 0.01)): gn_root's variance is then small enough for its eps to show. Measured
    # on this fixture: ours within 6e-7 of its reference, either numerics; the references 1.9e-5 apart;
    # 'google' with timm's GroupNorm eps 1.4e-5 off, with timm's standardisation 1.7e-5 off.
    x = hybrid['x'] * 0.01
    ref = {'timm': run_timm(copy.deepcopy(hybrid['tm']).double(), x.astype(np.float64)),
           'google': run_timm(google_way(hybrid['tm']).double(), x.astype(np.float64))}
    assert rel_err(ref['google'], ref['timm']) > 1e-5
    for numerics, other in (('google', 'timm'), ('timm', 'google')):
        model, params, _ = pipeline.load_model(hybrid['pth'], 'vit_base_r50_s16_224', resnet_numerics=numerics,
                                          **HYBRID_ARCH)
        y = run_flax(model, params, x)
        assert rel_err(y, ref[numerics]) < 2e-6, numerics
        assert rel_err(y, ref[other]) > 1e-5, numerics


def test_registered_hybrid_through_the_cli(tmp_path):
    tm = timm_model('vit_tiny_r_s16_p8_224')
    torch.save(tm.state_dict(), tmp_path / 'w.pth')
    r = cli('convert', tmp_path / 'w.pth', tmp_path / 'w.npz')
    assert r.returncode == 0 and 'model vit_tiny_r_s16_p8_224 (detected)' in r.stdout, r.stderr
    assert np.load(tmp_path / 'w.npz')['conv_root/kernel'].shape == (7, 7, 3, 64)
    r = cli('convert', tmp_path / 'w.npz', tmp_path / 'back.pth')
    assert r.returncode == 0, r.stderr
    assert_same_state(tm.state_dict(), torch.load(tmp_path / 'back.pth', weights_only=True))
    r = cli('inspect', tmp_path / 'w.npz')
    assert 'family:  R+ViT hybrid (released)' in r.stdout and 'vit_tiny_r_s16_p8_224 (detected)' in r.stdout
    # a plain ViT name cannot hold a hybrid's weights
    r = cli('convert', tmp_path / 'w.npz', tmp_path / 'x.pth', '--model', 'vit_tiny_patch16_224')
    assert r.returncode == 1 and 'patch_size' in r.stderr and not (tmp_path / 'x.pth').exists()
    r = cli('summary', 'vit_tiny_r_s16_p8_224')
    # timm's parameter count (test_param_count_equals_timm); its model card rounds to 6.3M params, 0.4 GMACs
    # (https://huggingface.co/timm/vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k)
    assert r.returncode == 0 and '6,337,704 params, 0.434 GMACs' in r.stdout, r.stdout + r.stderr
    r = cli('list', '*_r50_*')
    assert r.stdout.split() == ['vit_base_r50_s16_224', 'vit_base_r50_s16_384', 'vit_large_r50_s32_224',
                                    'vit_large_r50_s32_384']


def test_bad_hybrid_stems_are_clear_errors(tmp_path):
    base = {'embedding/kernel': np.zeros((1, 1, 1024, 8), np.float32)}
    np.savez(tmp_path / 'wide.npz', **base, **{'conv_root/kernel': np.zeros((7, 7, 3, 128), np.float32)})
    with pytest.raises(ConversionError, match=r'wide\.npz: malformed checkpoint \(a ResNet root of 128 channels'):
        pipeline.read_checkpoint(tmp_path / 'wide.npz')
    np.savez(tmp_path / 'gap.npz', **base, **{'conv_root/kernel': np.zeros((7, 7, 3, 64), np.float32),
                                              'block2/unit1/conv1/kernel': np.zeros((1, 1, 64, 64), np.float32)})
    with pytest.raises(ConversionError, match=r'ResNet stages numbered \[2\], expected 1'):
        pipeline.read_checkpoint(tmp_path / 'gap.npz')


def test_hybrid_stem_only_parity(tmp_path):
    tm = timm_model('vit_tiny_r_s16_p8_224', img_size=64, depth=2, num_classes=5)
    torch.save(tm.state_dict(), tmp_path / 'w.pth')
    x = images((2, 64, 64, 3))
    model, params, ck = pipeline.load_model(tmp_path / 'w.pth', 'vit_tiny_r_s16_p8_224', img_size=64, depth=2)
    assert model.resnet == () and model.grid_size == (2, 2) and 'block1/unit1/conv1/kernel' not in flatten_dict(
        params, sep='/')
    assert rel_err(run_flax(model, params, x), run_timm(tm, x)) < 1e-4


# ---------------------------------------------------------------- SigLIP image towers

SIGLIP_KW = dict(img_size=64, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=3.7362,
                 class_token=False, global_pool='map', act_layer='gelu_tanh', num_classes=0)
SIGLIP_ARCH = dict(img_size=64, embed_dim=64, depth=2, num_heads=4)


def _two_tower(flat, dtype=None):
    """A big_vision SigLIP file: the image tower under params/img/ with scanned blocks, a text tower, t and b."""
    img = {k[len('params/'):]: v for k, v in vit_family.flax_to_npz(flat, 'big_vision').items()}
    depth = len({k.split('/')[1] for k in img if k.startswith('Transformer/encoderblock_')})
    for k in [k for k in img if k.startswith('Transformer/encoderblock_0/')]:
        rest = k[len('Transformer/encoderblock_0/'):]
        img[f'Transformer/encoderblock/{rest}'] = np.stack([img.pop(f'Transformer/encoderblock_{i}/{rest}')
                                                           for i in range(depth)])
    out = {f'params/img/{k}': v for k, v in img.items()}
    out.update({'params/txt/Embed_0/embedding': np.ones((11, 8), np.float32), 'params/t': np.ones(1, np.float32),
                'params/b': np.zeros(1, np.float32)})
    return {k: v.astype(dtype) if dtype else v for k, v in out.items()}


def test_siglip_tower_big_vision_to_timm_and_back(tmp_path):
    tm = timm_model('vit_so400m_patch16_siglip_256', **SIGLIP_KW)
    x = images((2, 64, 64, 3))
    y = run_timm(tm, x)
    model = vit_flax.create_model('vit_so400m_patch16_siglip_256', **SIGLIP_ARCH)
    assert model.gelu == 'tanh' and model.global_pool == 'map' and not model.has_class_token
    np.savez(tmp_path / 'siglip.npz', **_two_tower(to_flat(tm, model)))
    m, p, ck = pipeline.load_model(tmp_path / 'siglip.npz', 'vit_so400m_patch16_siglip_256', **SIGLIP_ARCH)
    assert (ck.layout, m.num_classes, m.mlp_dim or int(m.embed_dim * m.mlp_ratio)) == ('big_vision', 0, 239)
    assert ck.family.describe(ck) == 'big_vision SigLIP image tower (scanned)'
    assert rel_err(run_flax(m, p, x), y) < 1e-4
    np.testing.assert_array_equal(run_timm(parity.build_timm(m, 'vit_so400m_patch16_siglip_256',
                                                             flatten_dict(p, sep='/')), x), y)
    fresh = timm.create_model('vit_so400m_patch16_siglip_256', pretrained=False, **SIGLIP_KW).eval()
    timm_load_npz(fresh, str(tmp_path / 'siglip.npz'))          # timm reads the same tower
    assert rel_err(run_timm(fresh, x), y) < 1e-6
    pipeline.write_flat(flatten_dict(p, sep='/'), m, tmp_path / 'tower.pth')
    sd = torch.load(tmp_path / 'tower.pth', weights_only=True)
    assert_same_state(tm.state_dict(), sd)                        # timm's names, exactly its tensors
    fresh.load_state_dict(sd, strict=True)
    # .pth -> big_vision npz -> .pth is bit-exact, and the npz holds the tower's arrays unchanged
    m2, p2, _ = pipeline.load_model(tmp_path / 'tower.pth', 'vit_so400m_patch16_siglip_256', **SIGLIP_ARCH)
    pipeline.write_flat(flatten_dict(p2, sep='/'), m2, tmp_path / 'bv.npz', layout='big_vision')
    z, src = np.load(tmp_path / 'bv.npz'), np.load(tmp_path / 'siglip.npz')
    scanned = 'params/img/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel'
    np.testing.assert_array_equal(z['params/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'], src[scanned][1])
    np.testing.assert_array_equal(z['params/pos_embedding'], src['params/img/pos_embedding'])
    m3, p3, _ = pipeline.load_model(tmp_path / 'bv.npz', 'vit_so400m_patch16_siglip_256', **SIGLIP_ARCH)
    pipeline.write_flat(flatten_dict(p3, sep='/'), m3, tmp_path / 'back.pth')
    assert_same_state(sd, torch.load(tmp_path / 'back.pth', weights_only=True))


def test_registered_siglip_tower_detected_from_a_bf16_scanned_file(tmp_path):
    """A full-size SigLIP B/16 tower as big_vision saves it (bf16 here) reads as timm's name, no --model."""
    model = vit_flax.create_model('vit_base_patch16_siglip_224')
    from vit_flax.summary import param_shapes
    flat = {k: np.full(v.shape, 0.5, ml_dtypes.bfloat16) for k, v in flatten_dict(param_shapes(model), sep='/').items()}
    np.savez(tmp_path / 'siglip_b16.npz', **_two_tower(flat))
    ck = pipeline.read_checkpoint(tmp_path / 'siglip_b16.npz')
    assert ck.model_name == 'vit_base_patch16_siglip_224' and ck.detected and ck.model.num_classes == 0
    assert ck.family.describe(ck) == 'big_vision SigLIP image tower (scanned, bf16)'
    r = cli('inspect', tmp_path / 'siglip_b16.npz', '--json')
    info = json.loads(r.stdout)
    assert info['family'] == 'big_vision SigLIP image tower (scanned, bf16)'
    # the model that holds a scanned tree as it is: create_model(name, scan_blocks=True)
    assert info['model'] == 'vit_base_patch16_siglip_224' and info['overrides'] == {'scan_blocks': True}


# ---------------------------------------------------------------- fixed sincos2d positions

def formula(h, w, width):
    """REFERENCE.md's formula, in float64: [sin(x w), cos(x w), sin(y w), cos(y w)], (x, y) row-major."""
    y, x = np.mgrid[:h, :w]
    omega = 1 / 10000 ** (np.arange(width // 4) / (width // 4 - 1))
    x, y = np.outer(x.reshape(-1), omega), np.outer(y.reshape(-1), omega)
    return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None]


@pytest.mark.parametrize('h,w,width', [(14, 14, 384), (24, 24, 768), (5, 9, 64), (16, 16, 1152)])
def test_sincos2d_table_is_big_visions_formula(h, w, width):
    table = sincos2d(h, w, width)
    assert table.shape == (1, h * w, width) and table.dtype == np.float32
    np.testing.assert_allclose(table, formula(h, w, width), rtol=0, atol=2e-6)
    q = width // 4   # patch (y=0, x=1): sin/cos of omega in the x half, sin 0 / cos 0 in the y half
    np.testing.assert_array_equal(table[0, 1, 2 * q:], np.r_[np.zeros(q), np.ones(q)].astype(np.float32))
    with pytest.raises(ValueError, match='multiple of 4'):
        sincos2d(2, 2, 66)


SINCOS_ARCH = dict(img_size=64, embed_dim=64, depth=2, num_heads=4)


@pytest.mark.parametrize('pool', ['gap', 'token'])
def test_table_less_big_vision_file_parity_and_round_trips(tmp_path, pool):
    kw = dict(num_classes=10, **SINCOS_ARCH)
    if pool == 'gap':
        kw.update(class_token=False, global_pool='avg', fc_norm=False)
    tm = timm_model('vit_small_patch16_224', **kw)
    ours = dict(num_classes=10, global_pool=pool, class_token=pool == 'token', **SINCOS_ARCH)
    prefix = 1 if pool == 'token' else 0
    with torch.no_grad():  # timm with a learned table holding the formula (cls row zero)
        tm.pos_embed.copy_(torch.from_numpy(np.pad(formula(4, 4, 64), ((0, 0), (prefix, 0), (0, 0)))).float())
    x = images((2, 64, 64, 3))
    y = run_timm(tm, x)
    flat = to_flat(tm, vit_flax.create_model('vit_small_patch16_224', **ours))
    del flat['Transformer/posembed_input/pos_embedding']       # big_vision stores no sincos2d table
    np.savez(tmp_path / 'bv.npz', **vit_family.flax_to_npz(flat, 'big_vision'))
    logs = []
    m, p, ck = pipeline.load_model(tmp_path / 'bv.npz', 'vit_small_patch16_224', log=logs.append, **SINCOS_ARCH)
    assert m.posemb == 'sincos2d' and 'pos_embedding' not in p.get('Transformer', {}).get('posembed_input', {})
    assert any('fixed sincos2d table for grid (4, 4)' in l for l in logs)
    assert ck.family.describe(ck) == 'big_vision ViT (sincos2d positions)'
    assert rel_err(run_flax(m, p, x), y) < 1e-4
    # to timm: the table is written out, said out loud, and timm holding it computes the same function
    logs = []
    pipeline.write_flat(flatten_dict(p, sep='/'), m, tmp_path / 'w.pth', log=logs.append)
    assert any('written out as a learned table' in l for l in logs)
    sd = torch.load(tmp_path / 'w.pth', weights_only=True)
    fresh = timm.create_model('vit_small_patch16_224', pretrained=False, **kw).eval()
    fresh.load_state_dict(sd, strict=True)
    assert rel_err(run_timm(fresh, x), y) < 1e-5
    # ... and back: a table equal to sincos2d bit for bit reads as the fixed one; big_vision stores none
    m2, p2, _ = pipeline.load_model(tmp_path / 'w.pth', 'vit_small_patch16_224', **SINCOS_ARCH)
    assert m2.posemb == 'sincos2d'
    pipeline.write_flat(flatten_dict(p2, sep='/'), m2, tmp_path / 'back.npz', layout='big_vision')
    assert same_npz(tmp_path / 'bv.npz', tmp_path / 'back.npz')
    # released layout: vit_jax and timm's npz reader need a table, so it is written out there
    pipeline.write_flat(flatten_dict(p2, sep='/'), m2, tmp_path / 'rel.npz', layout='released')
    fresh2 = timm.create_model('vit_small_patch16_224', pretrained=False, **kw).eval()
    timm_load_npz(fresh2, str(tmp_path / 'rel.npz'))
    np.testing.assert_array_equal(run_timm(fresh2, x), run_timm(fresh, x))
    m3, _, _ = pipeline.load_model(tmp_path / 'rel.npz', 'vit_small_patch16_224', **SINCOS_ARCH)
    assert m3.posemb == 'sincos2d'


def test_sincos2d_through_the_cli(tmp_path):
    """The layout of big_vision's i1k baselines (gap, sincos2d, no table), registered size: detected, converted."""
    model = vit_flax.create_model('vit_tiny_patch16_224', global_pool='gap', class_token=False, posemb='sincos2d')
    from vit_flax.summary import param_shapes
    rng = np.random.default_rng(0)
    flat = {k: rng.standard_normal(v.shape, np.float32) * 0.02
            for k, v in flatten_dict(param_shapes(model), sep='/').items()}
    np.savez(tmp_path / 'vit.npz', **vit_family.flax_to_npz(flat, 'big_vision'))   # (no 'pos_embedding')
    r = cli('inspect', tmp_path / 'vit.npz')
    assert 'family:  big_vision ViT (sincos2d positions)' in r.stdout, r.stdout + r.stderr
    assert 'vit_tiny_patch16_224 (detected)' in r.stdout and 'posemb=sincos2d' in r.stdout
    r = cli('convert', tmp_path / 'vit.npz', tmp_path / 'vit.pth')
    assert r.returncode == 0 and 'written out as a learned table' in r.stderr, r.stderr
    pe = torch.load(tmp_path / 'vit.pth', weights_only=True)['pos_embed'].numpy()
    np.testing.assert_array_equal(pe, sincos2d(14, 14, 192))
    r = cli('convert', tmp_path / 'vit.pth', tmp_path / 'back.npz', '--layout', 'big_vision')
    assert r.returncode == 0, r.stderr
    assert same_npz(tmp_path / 'vit.npz', tmp_path / 'back.npz')
    # asked for: a learned table in big_vision's layout (the same function, now trainable)
    r = cli('convert', tmp_path / 'vit.npz', tmp_path / 'learn.npz', '--layout', 'big_vision',
            '--posemb', 'learn')
    assert r.returncode == 0 and 'written out as a learned table' in r.stderr, r.stderr
    np.testing.assert_array_equal(np.load(tmp_path / 'learn.npz')['params/pos_embedding'], sincos2d(14, 14, 192))


def test_sincos2d_into_a_learned_model_and_a_new_grid(tmp_path):
    model = vit_flax.create_model('vit_tiny_patch16_224', posemb='sincos2d', depth=1)
    from vit_flax.summary import param_shapes
    flat = {k: np.ones(v.shape, np.float32) for k, v in flatten_dict(param_shapes(model), sep='/').items()}
    np.savez(tmp_path / 't.npz', **vit_family.flax_to_npz(flat, 'big_vision'))
    logs = []
    p = pipeline.load_params(tmp_path / 't.npz', 'vit_tiny_patch16_224', depth=1, log=logs.append)
    np.testing.assert_array_equal(p['Transformer']['posembed_input']['pos_embedding'][0, 1:], sincos2d(14, 14, 192)[0])
    assert not p['Transformer']['posembed_input']['pos_embedding'][0, 0].any()
    assert any('written out as a learned table' in l for l in logs)
    # fine-tuning at 384: the fixed table is recomputed for the new grid, not resampled
    m384, p384, _ = pipeline.load_model(tmp_path / 't.npz', 'vit_tiny_patch16_224', depth=1, img_size=384, log=logs.append)
    assert m384.posemb == 'sincos2d' and m384.grid_size == (24, 24)
    assert any('grid (24, 24)' in l for l in logs)
    with pytest.raises(ValueError, match='posemb'):
        run_flax(vit_flax.create_model('vit_tiny_patch16_224', posemb='sine'), {}, images((1, 224, 224, 3)))
