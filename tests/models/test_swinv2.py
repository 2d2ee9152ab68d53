"""Swin V2 and Swin-S3: the Flax models against timm (the judge) for all fifteen names, their sizes and MACs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

import vit_flax
from converters import rules as table
from converters.families import family_of
from converters.families import swin as swin_family
from converters.families import swinv2 as v2_family
from vit_flax.models.swinv2 import SwinTransformerV2, SwinTransformerV2Block, relative_coords_table

from helpers import images, perturb, perturb_timm, rel_err, run_flax, run_timm, state_np

V2_NAMES = ['swinv2_tiny_window8_256', 'swinv2_tiny_window16_256', 'swinv2_small_window8_256',
            'swinv2_small_window16_256', 'swinv2_base_window8_256', 'swinv2_base_window16_256',
            'swinv2_base_window12_192', 'swinv2_base_window12to16_192to256', 'swinv2_base_window12to24_192to384',
            'swinv2_large_window12_192', 'swinv2_large_window12to16_192to256', 'swinv2_large_window12to24_192to384']
S3_NAMES = ['swin_s3_tiny_224', 'swin_s3_small_224', 'swin_s3_base_224']
NAMES = V2_NAMES + S3_NAMES
# complete 4-stage configs, small: shifted blocks in stages 0 and 2 (2 blocks each), one block in stages 1 and 3
SMALL = dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(1, 2, 4, 8))
TOL = 1e-5
# two blocks (the second shifted, with its mask) in the first stage, one in each of the others (each with its own
# window and pretrained window); widths and heads are the registered ones
REDUCED = (2, 1, 1, 1)
# `make test` runs the registered widths of two names: window 8, and pretrained windows (12 fine-tuned to 16);
# a window clamped on the small stages (16 on 32, 16, 8, 4) and Swin-S3's per-stage windows (7, 7, 14, 7) are
# in `make test` at a small width (test_parity_window_clamped_on_small_stages, test_parity_swin_s3_other_input_size);
# the other names (window 16, Swin-S3 and the larger widths, 5-30 s each here) run under `make test-slow`
FAST_NAMES = ('swinv2_tiny_window8_256', 'swinv2_base_window12to16_192to256')
# the per-name counts: one of each kind (V2 window 8, V2 pretrained windows, Swin-S3) here, all 15 under slow
COUNT_NAMES = ('swinv2_tiny_window8_256', 'swinv2_base_window12to16_192to256', 'swin_s3_tiny_224')


def family(model):
    return family_of(model)


def converted(model, tm):
    """Flax params read off timm's state_dict through the family's rule table (the converter's own path)."""
    fam = family(model)
    return unflatten_dict(table.torch_to_flax(state_np(tm), fam.rules(model), ignore=fam.ignore_torch), sep='/')


def timm_twin(model, seed=0, **extra):
    """timm's model with the flax config (timm_kwargs), every weight moved off its init."""
    torch.manual_seed(seed)
    kw = dict(family(model).timm_kwargs(model), **extra)
    base = 'swinv2_tiny_window8_256' if isinstance(model, SwinTransformerV2) else 'swin_tiny_patch4_window7_224'
    return perturb_timm(timm.create_model(base, pretrained=False, **kw), seed)


def check_parity(model, hw=None, batch=2, **timm_extra):
    tm = timm_twin(model, **timm_extra)
    x = images((batch,) + tuple(hw or model.input_shape[:2]) + (3,))
    err = rel_err(run_flax(model, converted(model, tm), x), run_timm(tm, x))
    assert err <= TOL, err
    return err


# ---------------------------------------------------------------- registrations, sizes, MACs

@pytest.mark.parametrize('name', [n if n in COUNT_NAMES else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_registered_defaults_and_param_count_equal_timms(name):
    """timm's default classes, input size, per-stage windows and pretrained windows, and its parameter count
    (`vit_flax.count_params`: shapes only, jax.eval_shape) against timm's model on the meta device."""
    with torch.device('meta'):
        tm = timm.create_model(name)
    model = vit_flax.create_model(name)
    assert model.num_classes == tm.num_classes
    assert tuple(model.input_shape[:2]) == tuple(tm.patch_embed.img_size)
    blocks = [layer.blocks[0] for layer in tm.layers]
    assert [tuple(w) for w, _ in model.stage_windows()] == [tuple(b.window_size) for b in blocks]
    if name.startswith('swinv2'):
        assert tuple(model.pretrained_window_sizes) == tuple(b.attn.pretrained_window_size[0] for b in blocks)
    assert vit_flax.count_params(model) == sum(p.numel() for p in tm.parameters())


def test_registered_names():
    assert [n for n in vit_flax.list_models('swinv2_*') if not n.startswith('swinv2_cr_')] == sorted(V2_NAMES)
    assert vit_flax.list_models('swin_s3_*') == sorted(S3_NAMES)
    assert set(NAMES) <= set(timm.list_models())


def torch_macs(name, **kw):
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device('meta'):
        tm = timm.create_model(name, **kw).eval()
    h, w = tm.patch_embed.img_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tm(torch.empty(1, 3, h, w, device='meta'))
    return counter.get_total_flops() // 2


# two names in `make test` (full depth, default size), the other thirteen under `make test-slow` (~100 s)
@pytest.mark.parametrize('name', [n if n in ('swinv2_tiny_window8_256', 'swin_s3_tiny_224')
                                  else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_macs_equal_torch_flop_counter(name):
    assert vit_flax.count_macs(vit_flax.create_model(name)) == torch_macs(name)


def test_macs_of_a_fine_tuned_window_equal_torch_flop_counter():
    kw = dict(depths=(1, 1, 1, 1))
    name = 'swinv2_base_window12to24_192to384'
    assert vit_flax.count_macs(vit_flax.create_model(name, **kw)) == torch_macs(name, **kw)


# ---------------------------------------------------------------- parity with timm, every name

@pytest.mark.parametrize('name', [n if n in FAST_NAMES else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_parity_every_name_reduced_depth(name):
    """Every registered name at its own size, window, pretrained windows, widths and heads, with depths
    REDUCED: perturbed timm weights through the rule table, logits within 1e-5 (float32)."""
    check_parity(vit_flax.create_model(name, depths=REDUCED), batch=1)


def test_parity_fine_tuned_window_24_on_pretrained_12():
    """The 12to24 models' geometry (384 px, window 24 on stages 96, 48, 24, 12, pretrained (12, 12, 12, 6)) at a
    small width, so that `make test` covers it (the registered widths are under `make test-slow`)."""
    model = vit_flax.create_model('swinv2_base_window12to24_192to384', embed_dim=16, depths=(2, 2, 1, 1),
                                  num_heads=(1, 2, 4, 8))
    assert [w for w, _ in model.stage_windows()] == [(24, 24), (24, 24), (24, 24), (12, 12)]
    check_parity(model, batch=1)


def test_parity_with_stage_outputs():
    model = vit_flax.create_model('swinv2_tiny_window8_256', **SMALL)
    tm = timm_twin(model)
    x = images((1, 256, 256, 3))
    logits, inter = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
        converted(model, tm), x)
    captured = {}
    hooks = [tm.get_submodule(mod).register_forward_hook(
        lambda m, i, o, mod=mod: captured.__setitem__(mod, o.detach().numpy()))
        for _, _, mod in v2_family.FAMILY.parity_points(model)]
    try:
        ref = run_timm(tm, x)
    finally:
        for h in hooks:
            h.remove()
    assert rel_err(np.asarray(logits), ref) <= TOL
    flat = flatten_dict(inter['intermediates'], sep='/')
    for label, fpath, mod in v2_family.FAMILY.parity_points(model):
        assert rel_err(np.asarray(flat[fpath][0]), captured[mod]) <= TOL, label


def test_parity_window_clamped_on_small_stages():
    # 128 px, window 8: stages 32, 16, 8, 4 -> the third is exactly one window (no shift), the fourth clamps to 4
    model = SwinTransformerV2(img_size=128, window_size=8, **SMALL)
    assert [w for w, _ in model.stage_windows()] == [(8, 8), (8, 8), (8, 8), (4, 4)]
    assert [s for _, s in model.stage_windows()] == [(4, 4), (4, 4), (0, 0), (0, 0)]
    check_parity(model)
    # and a window larger than every stage but the first: 16 on 32, 16, 8, 4 with a pretrained window of 8
    check_parity(SwinTransformerV2(img_size=128, window_size=16, pretrained_window_sizes=(8, 8, 8, 4), **SMALL))


def test_parity_always_partition():
    check_parity(SwinTransformerV2(img_size=128, window_size=8, always_partition=True, **SMALL))


def test_parity_other_input_size_builds_masks_for_it():
    """A 256-built window-8 model fed 200x232 (stages not multiples of 8: padding, masks for the padded size),
    as timm with strict_img_size=False (its dynamic masks); and a model built at a non-square size."""
    check_parity(SwinTransformerV2(img_size=256, window_size=8, **SMALL), hw=(200, 232), strict_img_size=False)
    check_parity(SwinTransformerV2(img_size=(192, 256), window_size=8, **SMALL))


def test_parity_swin_s3_other_input_size():
    model = vit_flax.create_model('swin_s3_tiny_224', **SMALL)
    assert [w for w, _ in model.stage_windows()] == [(7, 7), (7, 7), (14, 14), (7, 7)]
    check_parity(model)
    check_parity(model, hw=(256, 256), strict_img_size=False)


def test_pooled_features_num_classes_0():
    model = SwinTransformerV2(img_size=64, window_size=8, num_classes=0, **SMALL)
    tm = timm_twin(model)
    x = images((2, 64, 64, 3))
    with torch.no_grad():
        ref = tm.forward_head(tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)), pre_logits=True).numpy()
    assert rel_err(run_flax(model, converted(model, tm), x), ref) <= TOL


# ---------------------------------------------------------------- pieces

def test_coordinate_table_equals_timms_and_microsofts_formula_to_float32_ulps_on_any_cpu():
    """Our table (numpy's float32 log2) against timm's (torch's): equal to a few float32 epsilons, not bit for
    bit. The two libraries' log2 kernels are chosen per CPU instruction set and need not round alike: on an
    AVX-512 AMD EPYC 124 of the 1,922 entries of window 16 (pretrained 12) differ by one ulp (1.2e-7), with
    torch at ATEN_CPU_CAPABILITY=avx2 and with numpy's AVX-512 paths off as well; on AVX2 machines they happened
    to agree. Everything before the log2 (the division by the window, the x8) is exact IEEE arithmetic in both."""
    from timm.models.swin_transformer_v2 import WindowAttention
    for window, pretrained in [((8, 8), (0, 0)), ((16, 16), (12, 12)), ((8, 8), (6, 6)), ((1, 1), (0, 0)),
                               ((6, 10), (0, 0))]:
        attn = WindowAttention(16, window, 2, pretrained_window_size=pretrained)
        ours, timms = relative_coords_table(window, pretrained), attn.relative_coords_table[0].numpy()
        assert ours.dtype == timms.dtype == np.float32 and ours.shape == timms.shape
        # each entry within 4 float32 epsilons of timm's, relative (the zeros of the centre row/column: exactly 0)
        np.testing.assert_allclose(ours, timms, rtol=4 * np.finfo(np.float32).eps, atol=0,
                                   err_msg=f'window {window}, pretrained {pretrained}')


def test_logit_scale_is_clamped_at_log_100():
    """A logit_scale above log(1/0.01) attends exactly as log(100): timm's clamp, not a silent exp()."""
    model = SwinTransformerV2(img_size=32, window_size=8, embed_dim=16, depths=(2,), num_heads=(2,),
                              pretrained_window_sizes=(0,))
    x = images((1, 32, 32, 3))
    params = flatten_dict(perturb(model), sep='/')
    key = 'layers_0/blocks_0/attn/logit_scale'
    apply = jax.jit(lambda p, x: model.apply({'params': p}, x))   # one compilation for the three values
    at = lambda v: np.asarray(apply(unflatten_dict({**params, key: np.full_like(params[key], v)}, sep='/'), x))
    np.testing.assert_array_equal(at(np.log(100.0)), at(7.0))
    assert not np.allclose(at(np.log(100.0)), at(np.log(50.0)))


def test_tree_names_and_the_rule_table_round_trip_bit_exact():
    model = vit_flax.create_model('swinv2_tiny_window8_256', depths=REDUCED)
    tm = timm_twin(model)
    state = state_np(tm)
    assert not any(k.endswith(v2_family.IGNORE) for k in state)   # timm's buffers are non-persistent
    flat = table.torch_to_flax(state, v2_family.FAMILY.rules(model))
    shapes = flatten_dict(vit_flax.summary.param_shapes(model), sep='/')
    assert set(flat) == set(shapes) and all(flat[k].shape == shapes[k].shape for k in flat)
    assert shapes['layers_1/blocks_0/attn/logit_scale'].shape == (6, 1, 1)
    assert 'layers_1/blocks_0/attn/qkv/bias' not in shapes and 'layers_1/blocks_0/attn/k_bias' not in shapes
    assert shapes['layers_1/downsample/norm/scale'].shape == (192,)   # V2 normalises after the reduction
    back = table.flax_to_torch(flat, v2_family.FAMILY.rules(model))
    assert back.keys() == state.keys() and all(np.array_equal(back[k], state[k]) for k in state)


def test_v1_and_v2_families_tell_their_files_apart():
    v2 = state_np(timm_twin(vit_flax.create_model('swinv2_tiny_window8_256', depths=(1, 1, 1, 1))))
    v1 = state_np(timm_twin(vit_flax.create_model('swin_tiny_patch4_window7_224', depths=(1, 1, 1, 1))))
    assert v2_family.FAMILY.detect_torch(v2) and not swin_family.FAMILY.detect_torch(v2)
    assert swin_family.FAMILY.detect_torch(v1) and not v2_family.FAMILY.detect_torch(v1)
    ms_v2 = {k.replace('layers.1.downsample', 'layers.0.downsample'): v for k, v in v2.items()}
    assert swin_family.FAMILY.detect_layout(ms_v2) == 'timm'   # V1 does not claim a V2 Microsoft file
    assert v2_family.FAMILY.detect_layout(ms_v2) == 'microsoft'


def test_train_mode_drop_path_and_bfloat16_keeps_float32_parts():
    model = SwinTransformerV2(img_size=32, window_size=8, embed_dim=16, depths=(2,), num_heads=(2,),
                              pretrained_window_sizes=(0,), drop_path_rate=0.5)
    bf16 = model.clone(dtype=jnp.bfloat16)
    x = jnp.asarray(images((2, 32, 32, 3)))
    params = perturb(model)
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(
        jax.eval_shape(lambda: bf16.init(jax.random.PRNGKey(0), x))['params']))
    ref = run_flax(model, params, x)
    out = jax.jit(lambda p, x: bf16.apply({'params': p}, x))(params, x)
    assert out.dtype == jnp.bfloat16 and rel_err(np.asarray(out, np.float32), ref) < 5e-2
    # the cosine normalisation and the bias MLP stay float32 under bf16: no bf16 rsqrt/sigmoid in the graph
    jaxpr = str(jax.make_jaxpr(lambda p, x: bf16.apply({'params': p}, x))(params, x))
    assert 'logistic' in jaxpr and not any('bf16' in line for line in jaxpr.splitlines() if 'logistic' in line)
    step = jax.jit(lambda p, x, rng: model.apply({'params': p}, x, train=True, rngs={'dropout': rng}))
    train = lambda seed: np.asarray(step(params, x, jax.random.PRNGKey(seed)))
    assert not np.allclose(train(1), ref) and not np.allclose(train(1), train(2))


def test_bfloat16_fast_path_agrees_with_the_autodiff_reference():
    """Under bf16 the fast path (cosine_qk's written-out derivative, the XLA:CPU fusion boundary after the MLP) and
    attn_impl='autodiff' (JAX's derivatives of the same forward, no boundary) give a shifted block the same output
    and the same parameter gradients to bf16 rounding; cosine_qk's own gradients equal autodiff's of its
    formula, and stay finite (torch's F.normalize: g / eps) where a vector is zero and autodiff's give NaN."""
    from vit_flax.models.swinv2 import cosine_qk, cosine_qk_reference
    rng = np.random.default_rng(0)
    q, k = (jnp.asarray(rng.standard_normal((2, 3, 16, 8)), jnp.bfloat16) for _ in range(2))
    scale = jnp.asarray(rng.uniform(1, 10, (3, 1, 1)), jnp.float32)
    w = [jnp.asarray(rng.standard_normal(q.shape), jnp.float32) for _ in range(2)]
    loss = lambda f: lambda *a: sum(jnp.sum(o.astype(jnp.float32) * wi) for o, wi in zip(f(*a), w))
    fast, ref = (jax.jit(jax.value_and_grad(loss(f), (0, 1, 2))) for f in (cosine_qk, cosine_qk_reference))
    (lf, gf), (lr, gr) = fast(q, k, scale), ref(q, k, scale)
    assert lf == lr
    for a, b in zip(gf, gr):
        assert a.dtype == b.dtype and rel_err(np.asarray(a, np.float32), np.asarray(b, np.float32)) < 1e-2
    k0 = k.at[0, 0, 0].set(0)
    dk_fast, dk_ref = fast(q, k0, scale)[1][1], ref(q, k0, scale)[1][1]
    assert np.isfinite(np.asarray(dk_fast, np.float32)).all() and np.isnan(np.asarray(dk_ref, np.float32)).any()
    g = np.asarray(w[1][0, 0, 0])   # the zero key's gradient is torch's: the cotangent over eps
    np.testing.assert_allclose(np.asarray(dk_fast[0, 0, 0], np.float32), g / 1e-12, rtol=1e-2)

    # a shifted block (its mask) at bf16: the boundary sits in the block, cosine_qk in its attention
    block = SwinTransformerV2Block(num_heads=2, window_size=(4, 4), shift_size=(2, 2), dtype=jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 16)), jnp.float32)
    shapes = jax.eval_shape(block.init, jax.random.PRNGKey(0), x)['params']
    params = perturb(jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes), scale=0.3)
    out_w = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def value_and_grads(m):
        f = lambda p: jnp.sum(m.apply({'params': p}, x).astype(jnp.float32) * out_w)
        return jax.jit(jax.value_and_grad(f))(params)
    (vf, gf), (vr, gr) = value_and_grads(block), value_and_grads(block.clone(attn_impl='autodiff'))
    assert abs(float(vf) - float(vr)) <= 1e-2 * abs(float(vr))
    flat_f, flat_r = flatten_dict(gf), flatten_dict(gr)
    errs = {k: rel_err(np.asarray(flat_f[k]), np.asarray(flat_r[k])) for k in flat_r}
    assert len(errs) == 17 and max(errs.values()) < 5e-2, sorted(errs.items(), key=lambda kv: -kv[1])[:3]


def test_remat_keeps_the_tree_and_the_outputs():
    plain = SwinTransformerV2(img_size=32, window_size=8, embed_dim=16, depths=(2,), num_heads=(2,),
                              pretrained_window_sizes=(0,))
    remat = plain.clone(remat=True)
    x = jnp.asarray(images((1, 32, 32, 3)))
    params = perturb(plain)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda: remat.init(jax.random.PRNGKey(0), x))['params'])
    np.testing.assert_allclose(run_flax(remat, params, x), run_flax(plain, params, x), rtol=1e-6, atol=1e-6)


def test_swin_s3_microsoft_layout_masks_are_for_224():
    """V1's Microsoft writer sizes its masks from the last stage's window: Swin-S3-S (14, 14, 14, 7) is a 224 model
    (56 / 14 = 4 windows a side in stage 0), not 448."""
    with torch.device('meta'):
        tm = timm.create_model('swin_s3_small_224', depths=(2, 2, 2, 2))
    shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    state = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    out = swin_family.timm_to_microsoft(state)
    assert out['layers.0.blocks.1.attn_mask'].shape == (16, 196, 196)
    assert 'layers.2.blocks.1.attn_mask' not in out   # 14x14 stage, window 14: no shift


@pytest.mark.parametrize('name,extra', [('swinv2_tiny_window8_256', dict(pretrained_window_sizes=(0, 0))),
                                        ('swinv2_cr_tiny_224', {})])
def test_eval_forward_puts_the_fusion_boundary_after_each_mlp_on_the_fast_path_only(name, extra):
    """The XLA:CPU hint (swinv2.mlp_output -> fusion_boundary, a reduce_precision) sits once per block in an
    eval forward on the fast path, bf16 and float32, in Swin V2 and Swin V2 CR alike; 'autodiff' and the training
    forward have none."""
    kw = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4, **extra)

    def boundaries(train=False, **options):
        model = vit_flax.create_model(name, **kw, **options)
        x = jax.ShapeDtypeStruct((1,) + tuple(model.input_shape), jnp.float32)
        jaxpr = jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x, train=train,
                                                        rngs={'dropout': jax.random.PRNGKey(0)}))(
            vit_flax.summary.param_shapes(model), x)
        return str(jaxpr).count('reduce_precision')
    assert boundaries(dtype=jnp.bfloat16) == 2
    assert boundaries() == 2
    assert boundaries(dtype=jnp.bfloat16, attn_impl='autodiff') == 0
    assert boundaries(attn_impl='autodiff') == 0
    assert boundaries(train=True) == 0
