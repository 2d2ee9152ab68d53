"""Swin V1: the Flax model against timm (the judge), the converter table, and Microsoft's release layout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from timm.models.swin_transformer import checkpoint_filter_fn, get_relative_position_index

import vit_flax
from converters.families import swin as swin_family
from converters import rules as table
from converters.errors import ConversionError
from converters.families import family_of
from vit_flax.models.swin import SwinTransformer, relative_position_index

from helpers import perturb, perturb_timm

jax.config.update('jax_default_matmul_precision', 'highest')

NAMES = ['swin_tiny_patch4_window7_224', 'swin_small_patch4_window7_224', 'swin_base_patch4_window7_224',
         'swin_base_patch4_window12_384', 'swin_large_patch4_window7_224', 'swin_large_patch4_window12_384']
TOL = 1e-4
# small but complete 4-stage configs, so the many parity cases stay fast on 2 CPU cores
SMALL = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8))
# two stages only, for the tests that compile gradients or train-mode graphs
TWO_STAGES = dict(embed_dim=16, depths=(2, 2), num_heads=(1, 2))


# ---------------------------------------------------------------- helpers

def timm_model(model, seed=0, **extra):
    """timm's model with the flax config, every weight moved off its init (no 1s or 0s left to hide a bad map)."""
    kw = swin_family.FAMILY.timm_kwargs(model)
    kw.update(extra)
    torch.manual_seed(seed)
    return perturb_timm(timm.create_model('swin_tiny_patch4_window7_224', **kw), seed)


def numpy_state(tm):
    return {k: v.detach().numpy() for k, v in tm.state_dict().items()}


def flax_params(model, state):
    return unflatten_dict(table.torch_to_flax(state, swin_family.FAMILY.rules(model), ignore=swin_family.IGNORE),
                          sep='/')


_APPLY = {}


def flax_apply(model, params, x, **kw):
    key = (model, tuple(sorted(kw)))
    if key not in _APPLY:
        _APPLY[key] = jax.jit(lambda p, x: model.apply({'params': p}, x, **kw))
    return np.asarray(_APPLY[key](params, x))


def images(hw, batch=2, seed=0):
    return np.random.RandomState(seed).randn(batch, hw[0], hw[1], 3).astype(np.float32)


def timm_forward(tm, x, **kw):
    with torch.no_grad():
        return tm(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), **kw).numpy()


def rel_err(a, ref):
    assert a.shape == ref.shape, (a.shape, ref.shape)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def check_parity(model, hw=None, faint_embed=False, **timm_extra):
    tm = timm_model(model, **timm_extra)
    if faint_embed:
        # a patch embedding of tiny variance makes its LayerNorm eps (1e-5, not 1e-6) decide the output
        with torch.no_grad():
            tm.patch_embed.proj.weight.mul_(1e-3)
            tm.patch_embed.proj.bias.mul_(1e-3)
    x = images(hw or model.input_shape[:2])
    err = rel_err(flax_apply(model, flax_params(model, numpy_state(tm)), x), timm_forward(tm, x))
    assert err <= TOL, err
    return err


@pytest.fixture(scope='module')
def tiny():
    """swin_tiny at 224 (stage 4 is 7x7, equal to the window: clamped, no shift) and its perturbed timm twin."""
    model = vit_flax.create_model('swin_tiny_patch4_window7_224')
    tm = timm_model(model)
    return model, tm, numpy_state(tm)


# ---------------------------------------------------------------- sizes

# one name a window size in `make test` (window 7 at 224, window 12 at 384); the other widths under slow
FAST_NAMES = ('swin_tiny_patch4_window7_224', 'swin_base_patch4_window12_384')


@pytest.mark.parametrize('name', [n if n in FAST_NAMES else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_param_count_matches_timm(name):
    with torch.device('meta'):
        tm = timm.create_model(name)
    expected = sum(p.numel() for p in tm.parameters())
    assert vit_flax.count_params(vit_flax.create_model(name)) == expected


def test_registered_names_are_timm_names_with_1000_classes():
    assert [n for n in vit_flax.list_models('swin_*') if not n.startswith('swin_s3_')] == sorted(NAMES)  # S3: test_swinv2.py
    for name in NAMES:
        assert name in timm.list_models('swin_*')
        assert vit_flax.create_model(name).num_classes == 1000
    assert vit_flax.create_model(NAMES[0], num_classes=21841).num_classes == 21841


# the FLOPs column of the Swin paper's Table 1 (Liu et al., https://arxiv.org/abs/2103.14030), which counts MACs
@pytest.mark.parametrize('name,gmacs', [('swin_tiny_patch4_window7_224', 4.5),
                                        pytest.param('swin_small_patch4_window7_224', 8.7, marks=pytest.mark.slow),
                                        pytest.param('swin_base_patch4_window7_224', 15.4, marks=pytest.mark.slow),
                                        ('swin_base_patch4_window12_384', 47.0)])
def test_gmacs_match_paper(name, gmacs):
    measured = vit_flax.count_macs(vit_flax.create_model(name)) / 1e9
    assert abs(measured - gmacs) / gmacs < 0.05, measured


# ---------------------------------------------------------------- parity with timm

def test_parity_tiny_224_with_stage_outputs(tiny):
    model, tm, state = tiny
    x = images((224, 224))
    params = flax_params(model, state)
    logits, inter = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(params, x)
    captured = {}
    hooks = [tm.get_submodule(mod).register_forward_hook(
        lambda m, i, o, mod=mod: captured.__setitem__(mod, o.detach().numpy()))
        for _, _, mod in swin_family.FAMILY.parity_points(model)]
    try:
        ref = timm_forward(tm, x)
    finally:
        for h in hooks:
            h.remove()
    assert rel_err(np.asarray(logits), ref) <= TOL
    flat = flatten_dict(inter['intermediates'], sep='/')
    for label, fpath, mod in swin_family.FAMILY.parity_points(model):
        assert rel_err(np.asarray(flat[fpath][0]), captured[mod]) <= TOL, label


def test_parity_window12_at_384():
    check_parity(SwinTransformer(img_size=384, window_size=12, **SMALL))


def test_parity_stage_smaller_than_window():
    # 128 px: stages are 32, 16, 8, 4; the last (4 < 7) clamps the window to 4x4 and drops the shift
    model = SwinTransformer(img_size=128, **SMALL)
    assert model.stage_windows()[-1] == ((4, 4), (0, 0))
    check_parity(model)
    check_parity(model, faint_embed=True)


def test_parity_always_partition():
    # timm's always_partition keeps the 7x7 window on the 4x4 stage: padding plus a mask over the pad
    check_parity(SwinTransformer(img_size=128, always_partition=True, **SMALL))


@pytest.mark.parametrize('size', [256, pytest.param(320, marks=pytest.mark.slow)])
def test_parity_other_input_sizes(size):
    """A 224-built window-7 model takes 256 and 320 (stages not multiples of 7: padding and masks for the
    padded size), as timm does with strict_img_size=False; and a model built at that size matches timm's."""
    base = SwinTransformer(img_size=224, **SMALL)
    check_parity(base, hw=(size, size), strict_img_size=False)
    check_parity(SwinTransformer(img_size=size, **SMALL))


def test_parity_image_not_a_multiple_of_patch_nor_square():
    check_parity(SwinTransformer(img_size=(226, 250), **SMALL))


def test_pooled_features_num_classes_0(tiny):
    model, tm, state = tiny
    headless = vit_flax.create_model('swin_tiny_patch4_window7_224', num_classes=0)
    x = images((224, 224))
    state = {k: v for k, v in state.items() if not k.startswith('head.')}
    feats = flax_apply(headless, flax_params(headless, state), x)
    assert feats.shape == (2, 768) and headless.num_features == 768
    with torch.no_grad():
        ref = tm.forward_head(tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)), pre_logits=True).numpy()
    assert rel_err(feats, ref) <= TOL


@pytest.mark.slow
def test_parity_full_swin_base_window12_384():
    check_parity(vit_flax.create_model('swin_base_patch4_window12_384'))


# ---------------------------------------------------------------- converter table and layouts

def test_round_trip_torch_flax_torch_bit_exact(tiny):
    model, _, state = tiny
    assert not any(s in k for k in state for s in swin_family.IGNORE)  # non-persistent in timm
    rules = swin_family.FAMILY.rules(model)
    flat = table.torch_to_flax(state, rules)
    shapes = flatten_dict(vit_flax.summary.param_shapes(model), sep='/')
    assert set(flat) == set(shapes)
    assert all(flat[k].shape == shapes[k].shape for k in flat)
    back = table.flax_to_torch(flat, rules)
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k


def test_buffers_in_the_state_dict_are_ignored_when_reading(tiny):
    model, _, state = tiny
    with_buffers = dict(state)
    with_buffers['layers.0.blocks.1.attn.relative_position_index'] = relative_position_index((7, 7))
    with_buffers['layers.0.blocks.1.attn_mask'] = np.zeros((64, 49, 49), np.float32)
    flat = table.torch_to_flax(with_buffers, swin_family.FAMILY.rules(model), ignore=swin_family.IGNORE)
    assert set(flat) == set(table.torch_to_flax(state, swin_family.FAMILY.rules(model)))


def test_microsoft_layout(tiny):
    model, tm, state = tiny
    ms = swin_family.timm_to_microsoft(state)
    # official structure: merging at the end of stages 0..2, plain head, buffers regenerated
    assert 'layers.0.downsample.reduction.weight' in ms and 'layers.3.downsample.reduction.weight' not in ms
    assert 'head.weight' in ms and not any(k.startswith('head.fc') for k in ms)
    for i, (depth, res) in enumerate(zip(model.depths, (56, 28, 14, 7))):
        for j in range(depth):
            index = ms[f'layers.{i}.blocks.{j}.attn.relative_position_index']
            assert index.dtype == np.int64 and np.array_equal(index, get_relative_position_index(7, 7).numpy())
            mask_key = f'layers.{i}.blocks.{j}.attn_mask'
            if j % 2 and res > 7:
                mask = ms[mask_key]
                assert mask.dtype == np.float32 and mask.shape == ((res // 7) ** 2, 49, 49)
                assert set(np.unique(mask)) == {0.0, -100.0}
                block = tm.layers[i].blocks[j]
                assert np.array_equal(mask, block.attn_mask.numpy())  # timm's own mask at the same size
            else:
                assert mask_key not in ms
    # back to timm: bit-exact, what timm's own checkpoint filter makes of it, and loads strictly
    back = swin_family.microsoft_to_timm(ms)
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)
    filtered = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in ms.items()}, tm)
    assert set(filtered) == set(back) and all(np.array_equal(filtered[k].numpy(), back[k]) for k in back)
    fresh = timm.create_model('swin_tiny_patch4_window7_224').eval()
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    # and the Microsoft file gives the same Flax model, hence the same logits
    x = images((224, 224))
    assert rel_err(flax_apply(model, flax_params(model, back), x), timm_forward(tm, x)) <= TOL
    with pytest.raises(ConversionError):
        swin_family.microsoft_to_timm(state)
    with pytest.raises(ConversionError):
        swin_family.timm_to_microsoft(ms)


def test_microsoft_layout_window12_and_family():
    model = SwinTransformer(img_size=384, window_size=12, **SMALL)
    tm = timm_model(model)
    state = numpy_state(tm)
    ms = swin_family.timm_to_microsoft(state)  # resolution inferred: 4 * 12 * 8 = 384
    assert ms['layers.0.blocks.1.attn_mask'].shape == (64, 144, 144)
    assert ms['layers.2.blocks.1.attn_mask'].shape == (4, 144, 144)
    assert 'layers.3.blocks.1.attn_mask' not in ms
    assert np.array_equal(ms['layers.0.blocks.1.attn_mask'], tm.layers[0].blocks[1].attn_mask.numpy())
    fam = family_of(model)
    to_timm, from_timm = fam.layouts['microsoft']
    assert fam.name == 'swin' and fam.detect_torch(state) and fam.detect_torch(ms)
    back = to_timm(from_timm(state))
    assert set(back) == set(state) and all(np.array_equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize('name', ['swin_tiny_patch4_window7_224', 'swin_large_patch4_window12_384'])
def test_architecture_read_off_checkpoints(name):
    model = vit_flax.create_model(name, num_classes=21841)
    with torch.device('meta'):
        state = timm.create_model(name, num_classes=21841).state_dict()
    from_torch = swin_family.FAMILY.config_from_torch(state)
    from_flax = swin_family.FAMILY.config_from_flax(flatten_dict(vit_flax.summary.param_shapes(model), sep='/'))
    assert from_torch == from_flax
    assert all(from_flax[k] == v for k, v in swin_family.FAMILY.core(vit_flax.create_model(name)).items())
    assert swin_family.FAMILY.overrides(from_flax, vit_flax.create_model(name)) == dict(num_classes=21841)
    # a window-12 file on a window-7 base re-shaped to window 12: at 224 its last stage would clamp to 7,
    # which the file's tables deny, so it gets the size at which no stage clamps
    w12 = swin_family.FAMILY.config_from_flax(flatten_dict(vit_flax.summary.param_shapes(
        vit_flax.create_model('swin_base_patch4_window12_384')), sep='/'))
    base = vit_flax.create_model('swin_base_patch4_window7_224').clone(window_size=12)
    assert swin_family.FAMILY.overrides(w12, base) == dict(img_size=(384, 384))


def test_timm_kwargs_refuse_what_timm_cannot_build():
    with pytest.raises(ValueError):
        swin_family.FAMILY.timm_kwargs(SwinTransformer(qk_scale=0.1))


# ---------------------------------------------------------------- pieces

def test_relative_position_index_matches_timm():
    for window in [(7, 7), (12, 12), (3, 5)]:
        assert np.array_equal(relative_position_index(window), get_relative_position_index(*window).numpy())


@pytest.mark.filterwarnings('ignore::UserWarning')  # timm's interpolator warns about its own indexing
def test_resize_relative_bias_table():
    torch.manual_seed(0)
    table7 = (0.5 * torch.randn(169, 3)).numpy()
    # timm's interpolation: exactly what timm's checkpoint filter does when a window-7 table meets a window-12 model
    w12 = timm.create_model('swin_tiny_patch4_window7_224', img_size=384, window_size=12, **SMALL)
    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    ref = checkpoint_filter_fn({key: torch.from_numpy(table7[:, :1])}, w12)[key].numpy()
    assert np.array_equal(swin_family.resize_relative_bias_table(table7[:, :1], 12, method='timm'), ref)
    # Microsoft's (default): per-head bicubic on the 13x13 grid
    resized = swin_family.resize_relative_bias_table(table7, 12)
    expected = torch.nn.functional.interpolate(torch.from_numpy(table7).T.reshape(1, 3, 13, 13), size=(23, 23),
                                               mode='bicubic', align_corners=False).reshape(3, -1).T.numpy()
    assert resized.shape == (529, 3) and np.array_equal(resized, expected)
    # the centre (zero offset) keeps its value: 13x13 -> 23x23 maps centre to centre
    assert np.allclose(resized.reshape(23, 23, 3)[11, 11], table7.reshape(13, 13, 3)[6, 6], atol=0.2)
    assert np.array_equal(swin_family.resize_relative_bias_table(table7, 7), table7)


def test_drop_path_rates_and_train_vs_eval():
    model = SwinTransformer(img_size=32, drop_path_rate=0.5, **TWO_STAGES)
    with torch.device('meta'):
        tm = timm.create_model('swin_tiny_patch4_window7_224', **swin_family.FAMILY.timm_kwargs(model))
    expected = [b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.0
                for stage in tm.layers for b in stage.blocks]
    x = jnp.asarray(images((32, 32)))
    variables = {'params': perturb(model)}   # drawn on the shapes: no init to compile
    bound = model.bind(variables)
    got = [r for stage in bound.layers for r in stage.drop_path_rates]
    assert np.allclose(got, expected, atol=1e-7)  # linear over all blocks of all stages
    apply = jax.jit(lambda v, x, r: model.apply(v, x, train=True, rngs={'dropout': r}))
    evaluate = jax.jit(lambda v, x: model.apply(v, x))
    ev1, ev2 = evaluate(variables, x), evaluate(variables, x)
    tr1, tr2 = apply(variables, x, jax.random.PRNGKey(1)), apply(variables, x, jax.random.PRNGKey(2))
    assert np.array_equal(ev1, ev2)
    assert not np.allclose(tr1, ev1) and not np.allclose(tr1, tr2)


@pytest.mark.slow   # ~1 min; ViT's test_remat_matches covers the remat machinery in `make test`
def test_remat_gives_the_same_outputs_and_grads():
    plain = SwinTransformer(img_size=32, **TWO_STAGES)
    remat = SwinTransformer(img_size=32, remat=True, **TWO_STAGES)
    x = jnp.asarray(images((32, 32)))
    params = jax.jit(plain.init)(jax.random.PRNGKey(0), x)['params']
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda: remat.init(jax.random.PRNGKey(0), x))['params'])
    def loss_and_grad(m):
        loss = lambda p: (m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(3)}) ** 2).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    (l1, g1), (l2, g2) = loss_and_grad(plain), loss_and_grad(remat)
    assert np.allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        assert np.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params_and_stays_close():
    f32 = SwinTransformer(img_size=32, **TWO_STAGES)
    bf16 = SwinTransformer(img_size=32, dtype=jnp.bfloat16, **TWO_STAGES)
    x = jnp.asarray(images((32, 32)))
    params = perturb(f32)   # drawn on the shapes: no init to compile
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), x))['params']))
    ref, out = flax_apply(f32, params, x), jax.jit(lambda p, x: bf16.apply({'params': p}, x))(params, x)
    assert out.dtype == jnp.bfloat16 and rel_err(np.asarray(out, np.float32), ref) < 5e-2
