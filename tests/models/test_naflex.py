"""timm's `naflexvit` module (SigLIP 2 NaFlex, timm's NaFlex ViTs, C-RADIO), each registration built here under
timm's name and judged against timm itself: names, configuration and parameter counts of all 14; per distinct
architecture the logits of a reduced copy, on one image size and on a batch of three aspect ratios padded to
one sequence budget in one jitted call; the position resize against torch's F.interpolate."""
import jax
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from flax.traverse_util import unflatten_dict

import vit_flax
from converters import rules
from converters.families.naflex import FAMILY
from vit_flax.errors import ModelConfigError
from vit_flax.models.naflex import NaFlexVit, naflex_inputs, resize_weights, size_for_sequence

from helpers import images, perturb_timm, rel_err, state_np

jax.config.update('jax_default_matmul_precision', 'highest')

TIMM_NAMES = sorted(timm.list_models(module='naflexvit'))
# one name per distinct computation: learned table + avg, factorized + aspect preserving, MAP + LayerScale,
# SigLIP (bilinear antialiased, tanh GELU), C-RADIO (class token, no final norm, align_corners, no antialias)
ARCHITECTURES = ['naflexvit_base_patch16_gap', 'naflexvit_base_patch16_parfac_gap', 'naflexvit_so150m2_patch16_reg1_map',
                 'naflexvit_base_patch16_siglip', 'naflexvit_base_patch16_radio_v3']
SLOW = ('naflexvit_base_patch16_gap', 'naflexvit_so150m2_patch16_reg1_map')   # make test-slow: their parts are
# in the others (learned table + avg in the padding test below, MAP + LayerScale in siglip + radio)
REDUCED = dict(depth=2, embed_dim=32, num_heads=4, patch_size=8, pos_embed_grid_size=(4, 4), img_size=32,
               num_classes=10)
SIZES = [(24, 64), (64, 24), (40, 40)]   # 3x8, 8x3 and 5x5 patches of 8: wide, tall, square; table 4x4
BUDGET = 40


def timm_meta(name):
    with torch.device('meta'):
        return timm.create_model(name, pretrained=False)


def test_every_naflexvit_registration_of_timm_is_built():
    ours = sorted(n for n in vit_flax.list_models() if vit_flax.model_config(n)[0] is NaFlexVit)
    assert ours == TIMM_NAMES and len(ours) == 14


def blocks_count(model) -> int:
    """The parameter count from one traced build of one block (the blocks are identical)."""
    from vit_flax.summary import param_shapes
    shapes = param_shapes(model.clone(depth=1))
    return vit_flax.count_params(shapes) + vit_flax.count_params(shapes['Transformer']['encoderblock_0']) * (model.depth - 1)


def test_every_registration_has_timms_configuration_and_parameter_count():
    """Width, depth, heads, MLP, prefix tokens, position table, pooling, norms, classes and parameter count: timm's
    (its NaFlexVitCfg read off the built module), for all 14 names."""
    wrong = {}
    for name in TIMM_NAMES:
        m, tm = vit_flax.create_model(name), timm_meta(name)
        e = tm.embeds
        grid = tuple(e.pos_embed.shape[1:3]) if e.pos_embed is not None else (e.pos_embed_y.shape[1], e.pos_embed_x.shape[1])
        ours = (m.embed_dim, m.depth, m.num_heads, m.mlp_hidden, m.class_token, m.reg_tokens, m.pos_embed,
                tuple(m.pos_embed_grid_size), m.pos_embed_interp_mode, m.pos_embed_ar_preserving,
                m.pos_embed_antialias, m.pos_embed_align_corners, m.global_pool, m.use_fc_norm and m.final_norm,
                m.final_norm and not m.use_fc_norm, m.qkv_bias, bool(m.init_values), m.num_classes,
                blocks_count(m))
        theirs = (tm.embed_dim, len(tm.blocks), tm.blocks[0].attn.num_heads, tm.blocks[0].mlp.fc1.out_features,
                  tm.has_class_token, tm.num_reg_tokens, e.pos_embed_type, grid, e.pos_embed_interp_mode,
                  e.pos_embed_ar_preserving, e.pos_embed_antialias, e.pos_embed_align_corners, tm.global_pool,
                  not isinstance(tm.fc_norm, torch.nn.Identity), not isinstance(tm.norm, torch.nn.Identity),
                  tm.blocks[0].attn.qkv.bias is not None, not isinstance(tm.blocks[0].ls1, torch.nn.Identity),
                  tm.num_classes, sum(p.numel() for p in tm.parameters()))
        act = tm.blocks[0].mlp.act
        tanh = type(act).__name__ == 'GELUTanh' or getattr(act, 'approximate', 'none') == 'tanh'
        if ours != theirs or (m.act_layer == 'gelu_tanh') != tanh or type(act).__name__ not in ('GELU', 'GELUTanh'):
            wrong[name] = (ours, theirs)
    assert not wrong, wrong


@pytest.fixture(scope='module')
def naflex_batch():
    rng = np.random.default_rng(1)
    return naflex_inputs([rng.standard_normal(s + (3,)).astype(np.float32) for s in SIZES], 8, BUDGET)


def run_ours(model, params, x, batch):
    """Both modes in one compile each: NHWC images, and the NaFlex batch."""
    std = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)
    nf = jax.jit(lambda p, a, c, v: model.apply({'params': p}, a, patch_coord=c, patch_valid=v))(
        params, batch['patches'], batch['patch_coord'], batch['patch_valid'])
    return np.asarray(std), np.asarray(nf)


def run_theirs(tm, x, batch):
    with torch.no_grad():
        std = tm(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
        nf = tm(torch.from_numpy(batch['patches']), patch_coord=torch.from_numpy(batch['patch_coord']).long(),
                patch_valid=torch.from_numpy(batch['patch_valid'])).numpy()
    return std, nf


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in ARCHITECTURES])
def test_reduced_copy_equals_timm_on_one_size_and_on_three_aspect_ratios_in_one_batch(name, naflex_batch):
    """Two blocks, width 32, a 4x4 table, weights moved off their init: timm's state_dict read through the rule
    table gives timm's logits within 1e-5 relative on 32x48 images (the table resized to 4x6) and on a batch of a
    wide, a tall and a square image padded to 40 patches (each its own resize, the padding masked), and written
    back it is timm's state_dict bit for bit."""
    model = vit_flax.create_model(name, **REDUCED)
    torch.manual_seed(0)   # timm's init draws from the global generator (whatever tests ran before in this worker)
    # moved well off the init (0.1): C-RADIO's class token otherwise outweighs what the images add to it
    tm = perturb_timm(FAMILY.torch_model(model, name), scale=0.1)
    state = state_np(tm)
    flat = rules.torch_to_flax(state, FAMILY.rules(model))
    back = rules.flax_to_torch(flat, FAMILY.rules(model))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    x = images((2, 32, 48, 3))
    (std, nf), (t_std, t_nf) = run_ours(model, unflatten_dict(flat, sep='/'), x, naflex_batch), run_theirs(tm, x, naflex_batch)
    assert rel_err(std, t_std) < 1e-5 and rel_err(nf, t_nf) < 1e-5, (rel_err(std, t_std), rel_err(nf, t_nf))
    assert np.abs(nf[0] - nf[1]).max() > 1e-3 * np.abs(nf).max()   # the images differ: so do their logits


def test_padding_changes_nothing_but_the_padding():
    """The same three images padded to 25 and to 64 patches, the second batch in reverse order: the same logits
    per image (the mask keeps the padding out of attention and pooling; nothing mixes the images)."""
    model = vit_flax.create_model('naflexvit_base_patch16_gap', **REDUCED)
    params = FAMILY_PARAMS(model)
    rng = np.random.default_rng(2)
    ims = [rng.standard_normal(s + (3,)).astype(np.float32) for s in SIZES]
    fn = jax.jit(lambda p, a, c, v: model.apply({'params': p}, a, patch_coord=c, patch_valid=v))
    tight, loose = (naflex_inputs(i, 8, n) for i, n in ((ims, 25), (ims[::-1], 64)))
    a = np.asarray(fn(params, tight['patches'], tight['patch_coord'], tight['patch_valid']))
    b = np.asarray(fn(params, loose['patches'], loose['patch_coord'], loose['patch_valid']))[::-1]
    assert rel_err(b, a) < 1e-5 and np.abs(a[0] - a[2]).max() > 1e-3 * np.abs(a).max()


def FAMILY_PARAMS(model):
    """timm's initialisation moved off its init, read through the rule table (heads and norms not at 0 / 1)."""
    return unflatten_dict(rules.torch_to_flax(state_np(perturb_timm(FAMILY.torch_model(model, 'naflexvit_base_patch16_gap'))),
                                              FAMILY.rules(model)), sep='/')


@pytest.mark.parametrize('mode,antialias,align', [pytest.param('bilinear', True, False, marks=pytest.mark.slow),
                                                  ('bicubic', True, False),
                                                  ('bilinear', False, False), ('bilinear', False, True)])
def test_position_resize_weights_are_torchs_interpolate(mode, antialias, align):
    """Table lengths 1, 2, 3, 4, 7, 16 x output lengths 1, 2, 3, 5, 8, 13, 20 (shrinking, equal, growing): the weights reproduce F.interpolate of an identity
    table (channel c = input position c; a width of 3 kept as it is: torch's antialiased kernels mis-handle a
    width of 1)."""
    worst = 0.0
    outs = np.asarray([1, 2, 3, 5, 8, 13, 20])
    index = np.concatenate([np.arange(o) for o in outs])
    size = np.concatenate([np.full(o, o) for o in outs])
    for n in (1, 2, 3, 4, 7, 16):
        eye = torch.eye(n)[None, :, :, None].expand(1, n, n, 3).contiguous()
        want = np.concatenate([F.interpolate(eye, size=(int(o), 3), mode=mode, antialias=antialias, align_corners=align)
                               [0, :, :, 1].T.numpy() for o in outs])
        got = np.asarray(resize_weights(index, size, n, mode, antialias, align))
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst < 1e-5, worst


def test_sequence_sizes_fill_the_budget_at_the_aspect_ratio():
    assert size_for_sequence(480, 640, 16, 256) == (224, 288)   # transformers' Siglip2ImageProcessor gives the same
    for h, w in [(100, 1000), (1000, 100), (333, 333), (20, 20)]:
        H, W = size_for_sequence(h, w, 16, 256)
        assert H % 16 == 0 and W % 16 == 0 and (H // 16) * (W // 16) <= 256


def test_bad_inputs_and_options_fail_in_one_line():
    model = vit_flax.create_model('naflexvit_base_patch16_siglip', **REDUCED)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images((1, 32, 32, 3))))
    with pytest.raises(ModelConfigError, match='multiples of the patch'):
        model.init(jax.random.PRNGKey(0), images((1, 30, 32, 3)))
    with pytest.raises(ModelConfigError, match='patch_valid'):
        model.init(jax.random.PRNGKey(0), np.zeros((1, 4, 192), np.float32), patch_coord=np.zeros((1, 4, 2), int))
    with pytest.raises(ModelConfigError, match='exceeds max_seq_len'):
        naflex_inputs([np.zeros((64, 64, 3), np.float32)], 8, 10)
    with pytest.raises(ModelConfigError, match='bicubic'):
        vit_flax.create_model('naflexvit_base_patch16_gap', **REDUCED, pos_embed_antialias=False).init(
            jax.random.PRNGKey(0), images((1, 32, 32, 3)))
    with pytest.raises(vit_flax.UnknownOptionError):
        vit_flax.create_model('naflexvit_base_patch16_gap', pos_embed='rope')
    assert params is not None


@pytest.mark.parametrize('name', ['naflexvit_base_patch16_parfac_gap', 'naflexvit_base_patch16_siglip',
                                  'naflexvit_base_patch16_radio_v3'])
def test_macs_are_torch_flop_counters_plus_the_position_resize(name):
    """`vit-flax summary`'s MACs against torch's FLOP counter on timm's model (FLOPs = 2 x MACs), one block at the
    registered widths and input size. The one difference is the position resize: timm calls F.interpolate, which
    the counter does not count; ours weighs the table per patch, counted as the two contractions it is: a learned
    (gh, gw, D) table N x gh x gw x D + N x gw x D, a factorized one N x (gh + gw) x D, for N patches."""
    from torch.utils.flop_counter import FlopCounterMode
    model = vit_flax.create_model(name, depth=1)
    with torch.device('meta'):
        tm = timm.create_model(name, pretrained=False, depth=1).eval()
    h, w, c = model.input_shape
    with FlopCounterMode(display=False) as counter:
        tm(torch.empty(1, c, h, w, device='meta'))
    n, (gh, gw), d = (h // model.patch_size) * (w // model.patch_size), model.pos_embed_grid_size, model.embed_dim
    resize = n * (gh + gw) * d if model.pos_embed == 'factorized' else n * gh * gw * d + n * gw * d
    assert vit_flax.count_macs(model) - resize == counter.get_total_flops() // 2
