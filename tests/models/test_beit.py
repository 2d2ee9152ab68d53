"""BEiT / BEiT v2 (timm beit.py, 7 names) in Flax: defaults and parameter counts against timm, logits on reduced
copies (per-block and shared relative position bias, absolute positions, both pools), the rule table both ways
bit-exact with timm's strict load, MACs against torch's FlopCounter, and the relative position index against timm's."""
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import unflatten_dict

import vit_flax
from converters import rules as table
from converters.families import beit as beit_family, torch_family
from vit_flax.models.beit import Beit
from vit_flax.models.eva import relative_position_index

from helpers import images, perturb_timm, rel_err, run_flax, run_timm, state_np

FAMILY = beit_family.FAMILY
NAMES = sorted(timm.list_models(module='beit'))
SMALL = dict(depth=2, embed_dim=64, num_heads=4, img_size=(48, 64), num_classes=5)


def _meta(name, **kw):
    with torch.device('meta'):
        return timm.create_model(name, **kw)


def test_every_beit_registration_with_timms_defaults_and_reduced_count():
    from timm.models import get_pretrained_cfg
    assert sorted(n for n in vit_flax.list_models() if vit_flax.model_config(n)[0] is Beit) == NAMES
    assert len(NAMES) == 7
    for name in NAMES:
        model, cfg = vit_flax.create_model(name), get_pretrained_cfg(name)
        assert (model.num_classes, tuple(model.input_shape[:2])) == (cfg.num_classes, tuple(cfg.input_size[1:]))
        tm = _meta(name, depth=2)
        assert vit_flax.count_params(vit_flax.create_model(name, depth=2)) == sum(p.numel() for p in tm.parameters())


@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_full_param_count_equals_timms(name):
    assert vit_flax.count_params(vit_flax.create_model(name)) == sum(p.numel() for p in _meta(name).parameters())


def test_relative_position_index_is_timms():
    from timm.models.beit import gen_relative_position_index
    for window in ((3, 4), (14, 14)):
        np.testing.assert_array_equal(relative_position_index(window), gen_relative_position_index(window).numpy())


@pytest.mark.parametrize('name,extra', [
    ('beit_base_patch16_224', {}),                                     # per-block tables, LayerScale 0.1, avg
    ('beitv2_large_patch16_224', dict(global_pool='token')),           # class token + norm
    ('beit_base_patch16_224', dict(use_shared_rel_pos_bias=True, use_rel_pos_bias=False, use_abs_pos_emb=True)),
])
def test_logits_equal_timms_and_the_table_is_bit_exact_both_ways(name, extra):
    model = vit_flax.create_model(name, **SMALL, **extra)
    torch.manual_seed(0)
    tm = perturb_timm(timm.create_model(name, pretrained=False, **FAMILY.timm_kwargs(model)), 0)
    ref = state_np(tm)
    assert torch_family(ref, 'x.pth') is FAMILY
    flat = table.torch_to_flax(ref, FAMILY.rules(model), FAMILY.ignore_torch)
    x = images((2, 48, 64, 3))
    assert rel_err(run_flax(model, unflatten_dict(flat, sep='/'), x), run_timm(tm, x)) <= 1e-5
    back = table.flax_to_torch(flat, FAMILY.rules(model))
    assert set(back) == set(ref) and all(np.array_equal(back[k], ref[k]) for k in ref)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


def test_macs_equal_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    name = 'beit_base_patch16_224'
    tm = _meta(name, depth=2).eval().requires_grad_(False)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tm(torch.empty(1, 3, 224, 224, device='meta'))
    assert vit_flax.count_macs(vit_flax.create_model(name, depth=2)) == counter.get_total_flops() // 2


def test_unilm_files_with_index_buffers_read_and_write_back(tmp_path):
    """unilm's BEiT layout ({'model': state_dict} with persistent relative_position_index buffers): read (buffers
    ignored), logits as timm's; written back with --layout unilm, the buffers are timm's index and the rest is
    timm's state_dict bit for bit."""
    from converters import pipeline
    from timm.models.beit import gen_relative_position_index
    name = 'beitv2_base_patch16_224'
    model = vit_flax.create_model(name, **SMALL)
    torch.manual_seed(0)
    tm = perturb_timm(timm.create_model(name, pretrained=False, **FAMILY.timm_kwargs(model)), 0)
    ref = tm.state_dict()
    index = gen_relative_position_index((3, 4))
    unilm = {}
    for k, v in ref.items():
        unilm[k] = v
        if k.endswith('relative_position_bias_table'):
            unilm[k.replace('relative_position_bias_table', 'relative_position_index')] = index
    torch.save({'model': unilm}, tmp_path / 'beit.pth')
    got, params, ck = pipeline.load_model(str(tmp_path / 'beit.pth'), name, **SMALL)
    assert ck.layout == 'unilm'
    x = images((2, 48, 64, 3))
    assert rel_err(run_flax(got, params, x), run_timm(tm, x)) <= 1e-5
    pipeline.save_params(params, str(tmp_path / 'back.pth'), name, layout='unilm', **SMALL)
    back = torch.load(tmp_path / 'back.pth', map_location='cpu', weights_only=True)['model']
    assert set(back) == set(unilm) and all(torch.equal(back[k], unilm[k]) for k in unilm)


@pytest.mark.parametrize('shared', [False, True])
def test_a_flax_npz_reads_back_as_its_model_off_the_flax_shapes(tmp_path, shared):
    """The Flax tree's shapes alone give the model (config_from_flax): heads off the relative position tables,
    which keep their (entries, heads) shape, per block or shared."""
    from converters import pipeline, save_params
    from helpers import perturb
    over = dict(SMALL, img_size=32, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared)
    model = vit_flax.create_model('beit_base_patch16_224', **over)
    path = tmp_path / 'b.npz'
    save_params(perturb(model), str(path), 'beit_base_patch16_224', **over)
    got, _, ck = pipeline.load_model(path, log=lambda s: None)
    assert ck.layout == 'flax'
    assert (got.num_heads, got.embed_dim, got.depth, got.use_shared_rel_pos_bias) == (4, 64, 2, shared)
