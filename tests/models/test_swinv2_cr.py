"""Swin V2 CR (timm's swin_transformer_v2_cr): the Flax models against timm (the judge) for all sixteen names: their
defaults, sizes, MACs and logits; the rule table both ways; detection against Swin V1/V2 files; training mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

import vit_flax
from converters import rules as table
from converters.families import flax_family, torch_family
from converters.families import swin as swin_family
from converters.families import swinv2 as v2_family
from converters.families import swinv2_cr as cr_family
from vit_flax.models.swinv2_cr import SwinTransformerV2Cr, relative_coordinates_log

from helpers import images, perturb, perturb_timm, rel_err, run_flax, run_timm, state_np

NAMES = ['swinv2_cr_tiny_384', 'swinv2_cr_tiny_224', 'swinv2_cr_tiny_ns_224', 'swinv2_cr_small_384',
         'swinv2_cr_small_224', 'swinv2_cr_small_ns_224', 'swinv2_cr_small_ns_256', 'swinv2_cr_base_384',
         'swinv2_cr_base_224', 'swinv2_cr_base_ns_224', 'swinv2_cr_large_384', 'swinv2_cr_large_224',
         'swinv2_cr_huge_384', 'swinv2_cr_huge_224', 'swinv2_cr_giant_384', 'swinv2_cr_giant_224']
FAM = cr_family.FAMILY
TOL = 1e-5
# `make test`'s one compiled model: a norm3 every 2nd block (huge/giant's extra_norm_period, 6 there) and one ending
# every stage (the `_ns` names), shifted windows with their masks in stages 0-2, stage 3 one unshifted window
# (64 px, window 2 = grid // 8: stages 16, 8, 4, 2), small widths
COMBINED = dict(img_size=64, embed_dim=16, depths=(2, 1, 3, 1), num_heads=(1, 2, 2, 4), extra_norm_period=2,
                num_classes=7)


def timm_twin(model, seed=0, **extra):
    """timm's model with the flax config (the family's timm_kwargs), every weight moved off its init."""
    torch.manual_seed(seed)
    return perturb_timm(timm.create_model('swinv2_cr_tiny_224', pretrained=False, **FAM.timm_kwargs(model),
                                          **extra), seed)


def converted(model, tm):
    """Flax params read off timm's state_dict through the family's rule table (the converter's own path)."""
    return unflatten_dict(table.torch_to_flax(state_np(tm), FAM.rules(model)), sep='/')


def check_parity(model, hw=None, batch=2, **timm_extra):
    tm = timm_twin(model, **timm_extra)
    x = images((batch,) + tuple(hw or model.input_shape[:2]) + (3,))
    err = rel_err(run_flax(model, converted(model, tm), x), run_timm(tm, x))
    assert err <= TOL, err
    return err


def meta_timm(name, **kw):
    with torch.device('meta'):
        return timm.create_model(name, **kw)


# ---------------------------------------------------------------- registrations, sizes, MACs

def test_registered_names_are_timms_sixteen():
    assert vit_flax.list_models('swinv2_cr_*') == sorted(NAMES) == timm.list_models('swinv2_cr_*')


@pytest.mark.parametrize('name', NAMES)
def test_registered_defaults_equal_timms(name):
    """timm's default config (classes, input size), its per-stage windows and shifts, where its norm3s are and its
    drop path and init_values defaults (timm's model on the meta device; nothing traced here)."""
    tm = meta_timm(name)
    model = vit_flax.create_model(name)
    cfg = tm.pretrained_cfg
    assert model.num_classes == cfg['num_classes'] == tm.num_classes
    assert (3,) + tuple(model.input_shape[:2]) == tuple(cfg['input_size'])
    assert [(w, s) for w, s in model.stage_windows()] == [
        (tuple(st.blocks[-1].window_size), tuple(st.blocks[1 if len(st.blocks) > 1 else 0].shift_size))
        for st in tm.stages]
    assert cr_family.layout_of(model) == tuple(
        tuple(isinstance(b.norm3, torch.nn.LayerNorm) for b in st.blocks) for st in tm.stages)
    assert model.drop_path_rate == 0.0 and model.init_values == tm.stages[0].blocks[0].init_values == 0.0


# the count (jax.eval_shape of the whole model: 1-7 s here) of one name in `make test`, all sixteen under
# `make test-slow` (where the norm3s are is checked for every name above, without tracing)
@pytest.mark.parametrize('name', [n if n == 'swinv2_cr_tiny_224' else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
def test_param_count_equals_timms(name):
    assert vit_flax.count_params(vit_flax.create_model(name)) == sum(p.numel() for p in meta_timm(name).parameters())


def torch_macs(name, **kw):
    from torch.utils.flop_counter import FlopCounterMode
    tm = meta_timm(name, **kw).eval()
    h, w = tm.patch_embed.img_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tm(torch.empty(1, 3, h, w, device='meta'))
    return counter.get_total_flops() // 2


# every name at full depth under `make test-slow` (tracing only, 2-10 s each here); `make test` has a reduced one
@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_macs_equal_torch_flop_counter(name):
    """The meta MLP counts over every window pair (N^2 rows), as timm computes it and torch's FlopCounter sees it."""
    assert vit_flax.count_macs(vit_flax.create_model(name)) == torch_macs(name)


def test_macs_of_a_reduced_384_model_equal_torch_flop_counter():
    """Window 12: the meta MLP over 144^2 pairs per block."""
    kw = dict(depths=(1, 1, 1, 1))
    assert vit_flax.count_macs(vit_flax.create_model('swinv2_cr_tiny_384', **kw)) == torch_macs('swinv2_cr_tiny_384', **kw)


# ---------------------------------------------------------------- parity with timm

@pytest.fixture(scope='module')
def combined():
    """The one model `make test` compiles: COMBINED, timm's twin, their logits and stage outputs."""
    model = vit_flax.create_model('swinv2_cr_tiny_ns_224', **COMBINED)
    tm = timm_twin(model)
    x = images((2, 64, 64, 3))
    logits, inter = jax.jit(lambda p, x: model.apply({'params': p}, x, mutable=['intermediates']))(
        converted(model, tm), x)
    captured = {}
    hooks = [tm.get_submodule(mod).register_forward_hook(
        lambda m, i, o, mod=mod: captured.__setitem__(mod, o.detach().numpy()))
        for _, _, mod in FAM.parity_points(model)]
    try:
        ref = run_timm(tm, x)
    finally:
        for h in hooks:
            h.remove()
    return model, tm, np.asarray(logits), ref, flatten_dict(inter['intermediates'], sep='/'), captured


def test_parity_with_both_extra_norms_and_every_stage_output(combined):
    model, tm, logits, ref, inter, captured = combined
    assert cr_family.layout_of(model) == ((False, True), (True,), (False, True, True), (True,))
    assert [w for w, _ in model.stage_windows()] == [(2, 2)] * 4
    assert [s for _, s in model.stage_windows()] == [(1, 1), (1, 1), (1, 1), (0, 0)]
    assert rel_err(logits, ref) <= TOL
    for label, fpath, mod in FAM.parity_points(model):
        assert rel_err(np.asarray(inter[fpath][0]), captured[mod]) <= TOL, label
    np.testing.assert_array_equal(np.asarray(inter['encoded'][0]), np.asarray(inter['stage_3'][0]))


# every registered name at its own size, windows, widths, heads and norms, depths reduced (a stage of 6 blocks for
# huge/giant, whose norm3 comes every 6th): under `make test-slow` (~10-60 s each here)
@pytest.mark.slow
@pytest.mark.parametrize('name', NAMES)
def test_parity_every_name_reduced_depth(name):
    depths = (2, 1, 6, 1) if ('huge' in name or 'giant' in name) else (2, 1, 1, 1)
    err = check_parity(vit_flax.create_model(name, depths=depths), batch=1)
    print(f'{name}: {err:.2e} relative')   # `pytest -s` shows each name's parity


@pytest.mark.slow
def test_parity_other_input_size_and_explicit_windows():
    """A 64-built model fed 80x48 (timm's strict_img_size=False: padding, masks for the padded size); an explicit
    per-stage window; always_partition; pooled features with num_classes=0."""
    small = dict(img_size=64, embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4))
    check_parity(vit_flax.create_model('swinv2_cr_tiny_224', **small), hw=(80, 48), strict_img_size=False)
    check_parity(vit_flax.create_model('swinv2_cr_tiny_224', window_size=(4, 4, 2, 2), **small))
    check_parity(vit_flax.create_model('swinv2_cr_tiny_224', window_size=4, always_partition=True, **small))
    model = vit_flax.create_model('swinv2_cr_tiny_224', num_classes=0, **small)
    tm = timm_twin(model)
    x = images((2, 64, 64, 3))
    with torch.no_grad():
        want = tm.forward_head(tm.forward_features(torch.from_numpy(x).permute(0, 3, 1, 2)), pre_logits=True)
    assert rel_err(run_flax(model, converted(model, tm), x), want.numpy()) <= TOL


# ---------------------------------------------------------------- pieces, trees, files

def test_relative_coordinates_are_timms_buffer():
    from timm.models.swin_transformer_v2_cr import WindowMultiHeadAttention
    for window in [(7, 7), (2, 3), (1, 1), (12, 12)]:
        want = WindowMultiHeadAttention(16, 2, window).relative_coordinates_log.numpy()
        got = relative_coordinates_log(window)
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=2 * np.finfo(np.float32).eps, atol=0, err_msg=str(window))


def test_tree_names_and_the_rule_table_round_trip_bit_exact_in_timms_key_order():
    model = vit_flax.create_model('swinv2_cr_huge_224', depths=(2, 1, 6, 1), embed_dim=32, num_heads=(1, 2, 4, 8))
    with torch.device('meta'):
        shapes_t = {k: tuple(v.shape) for k, v in timm.create_model('swinv2_cr_huge_224',
                                                                    **FAM.timm_kwargs(model)).state_dict().items()}
    rng = np.random.default_rng(0)
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes_t.items()}
    flat = table.torch_to_flax(state, FAM.rules(model))
    shapes = flatten_dict(vit_flax.summary.param_shapes(model), sep='/')
    assert set(flat) == set(shapes) and all(flat[k].shape == shapes[k].shape for k in flat)
    assert shapes['stages_1/blocks_0/attn/logit_scale'].shape == (2,)
    assert shapes['stages_1/downsample/norm/scale'].shape == (128,)   # CR normalises before the reduction (4C)
    assert 'stages_2/blocks_5/norm3/scale' in shapes and 'stages_2/blocks_4/norm3/scale' not in shapes
    assert 'norm/scale' not in shapes   # the last block's norm3 is the final norm
    back = table.flax_to_torch(flat, FAM.rules(model))
    assert list(back) == list(state) and all(np.array_equal(back[k], state[k]) for k in state)
    cfg = FAM.config_from_torch(state)
    assert FAM.with_core(vit_flax.create_model('swinv2_cr_tiny_224'), cfg).extra_norm_period == 6


def test_cr_v1_and_v2_families_tell_their_files_apart():
    """A CR file (timm's, and its Flax tree) is claimed by the CR family only; Swin V1/V2 files from timm and
    Microsoft's layout are never claimed by it."""
    def state_of(name, **kw):
        with torch.device('meta'):
            sd = timm.create_model(name, depths=(1, 1, 1, 1), **kw).state_dict()
        return {k: np.zeros(v.shape, np.float32) for k, v in sd.items()}
    cr = state_of('swinv2_cr_tiny_224')
    v2, v1 = state_of('swinv2_tiny_window8_256'), state_of('swin_tiny_patch4_window7_224')
    ms_v2 = {k.replace('layers.1.downsample', 'layers.0.downsample'): v for k, v in v2.items()}
    ms_v1 = {k.replace('layers.1.downsample', 'layers.0.downsample'): v for k, v in v1.items()}
    assert torch_family(cr, 'cr.pth') is FAM
    assert FAM.detect_layout(cr) == 'timm' and not v2_family.FAMILY.detect_torch(cr)
    assert not swin_family.FAMILY.detect_torch(cr) and swin_family.FAMILY.detect_layout(cr) == 'timm'
    assert v2_family.FAMILY.detect_layout(cr) == 'timm'
    for other, fam in [(v2, v2_family.FAMILY), (ms_v2, v2_family.FAMILY), (v1, swin_family.FAMILY),
                       (ms_v1, swin_family.FAMILY)]:
        assert not FAM.detect_torch(other) and torch_family(other, 'x.pth') is fam
    tree = lambda name: flatten_dict(vit_flax.summary.param_shapes(vit_flax.create_model(name, depths=(1, 1, 1, 1))),
                                     sep='/')
    assert flax_family(tree('swinv2_cr_tiny_224')) is FAM
    assert flax_family(tree('swinv2_tiny_window8_256')) is v2_family.FAMILY
    assert flax_family(tree('swin_tiny_patch4_window7_224')) is swin_family.FAMILY


def test_norm3_layouts_no_pair_of_fields_gives_are_refused():
    model = vit_flax.create_model('swinv2_cr_tiny_224', depths=(2, 2, 2, 2))
    assert cr_family.norm_fields(((True, False), (False, False), (False, False), (False, True)), (2, 2, 2, 2)) is None
    with pytest.raises(Exception, match='norm3 on blocks'):
        FAM.with_core(model, dict(extra_norms=((True, False), (False, False), (False, False), (False, True))))


def test_option_values_are_checked_before_a_model_is_built():
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    for bad in (dict(window_ratio=0, num_heads=(1, 2, 2)), dict(num_heads=(1, 2))):
        model = SwinTransformerV2Cr(img_size=64, embed_dim=16, depths=(1, 1, 1), **bad)
        with pytest.raises(vit_flax.ModelConfigError):
            jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)


# ---------------------------------------------------------------- training mode, bf16

def eqns(jaxpr):
    """Every equation of a jaxpr, nested calls included."""
    from jax.extend import core as jcore
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jcore.ClosedJaxpr):
                    yield from eqns(sub.jaxpr)
                elif isinstance(sub, jcore.Jaxpr):
                    yield from eqns(sub)


def test_train_step_draws_the_meta_mlp_dropout_and_bfloat16_keeps_float32_parts():
    """train=True with every other dropout and drop path at 0: two 'dropout' rngs give two outputs, so the meta MLP's
    dropout (timm's 0.125 after its ReLU, training only) draws; a gradient step reaches every parameter; under bf16
    the meta MLP stays float32."""
    model = SwinTransformerV2Cr(img_size=32, embed_dim=16, depths=(1,), num_heads=(2,), window_ratio=2, num_classes=3)
    assert (model.drop_path_rate, model.drop_rate, model.proj_drop_rate, model.attn_drop_rate) == (0, 0, 0, 0)
    x = jnp.asarray(images((2, 32, 32, 3)))
    params = perturb(model)

    def loss(p, rng):
        logits = model.apply({'params': p}, x, train=True, rngs={'dropout': rng})
        return -jax.nn.log_softmax(logits)[:, 0].mean(), logits
    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, out1), grads = step(params, jax.random.PRNGKey(1))
    (_, out2), _ = step(params, jax.random.PRNGKey(2))
    assert not np.allclose(out1, out2)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
    bf16 = model.clone(dtype=jnp.bfloat16)
    jaxpr = jax.make_jaxpr(lambda p, x: bf16.apply({'params': p}, x))(params, x)
    assert jaxpr.out_avals[0].dtype == jnp.bfloat16
    meta = [e for e in eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general'
            and e.invars[0].aval.shape[-1] == 2]   # the meta MLP's first layer reads (N^2, 2) offsets
    assert meta and all(v.aval.dtype == jnp.float32 for e in meta for v in e.invars)
