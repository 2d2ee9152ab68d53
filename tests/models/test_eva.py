"""timm's `eva.py` in Flax (vit_flax.models.eva.Eva): every registration's defaults and parameter count against
timm, logits against timm on reduced copies of one name per architecture, MACs against torch's FlopCounter, the
RoPE forms against timm's tables, and RoPE under bf16 against float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import unflatten_dict

import vit_flax
from converters import rules as table
from converters.families import eva as eva_family
from vit_flax.models.eva import Eva
from vit_flax.ops import rope

from helpers import images, perturb_timm, rel_err, run_flax, run_timm, state_np

FAMILY = eva_family.FAMILY
TOL = 1e-5
NAMES = sorted(timm.list_models(module='eva'))
# the reduced copies: two blocks, 64 wide (4 heads of 16), a 48 x 64 input (a 3 x 4 grid: non-square, so that a
# swapped axis shows); one registered name per distinct architecture
SMALL = dict(depth=2, embed_dim=64, num_heads=4, img_size=(48, 64))
ARCHS = {
    'eva_giant': 'eva_giant_patch14_224',                     # abs pos, fused qkv + q/v bias, GELU, avg + fc_norm
    'eva_giant_clip': 'eva_giant_patch14_clip_224',           # token pool + norm
    'eva02_packed': 'eva02_tiny_patch14_336',                 # packed SwiGLU, rope cat on a 16x16 reference
    'eva02_swiglu': 'eva02_base_patch14_448',                 # unfused q/k/v, SwiGLU + sub-LN (scale_mlp)
    'eva02_clip': 'eva02_large_patch14_clip_336',             # + inner attention norm, token pool
    'eva02_post_norm': 'eva02_enormous_patch14_clip_224',     # post-norm blocks, no rope
    'sbb_reg': 'vit_betwixt_patch16_rope_reg4_gap_256',       # registers, no cls, no abs pos, LayerScale
    'sbb_nobias': 'vit_mediumd_patch16_rope_reg1_gap_256',    # no qkv bias
    'pe_core': 'vit_pe_core_base_patch16_224',                # rope attention, norm_pre, offset 1 'xy', MAP pool
    'pe_core_g': 'vit_pe_core_gigantic_patch14_448',          # no class token, offset 0
    'pe_lang': 'vit_pe_lang_large_patch14_448',               # LayerScale, no final norms
    'pe_spatial': 'vit_pe_spatial_base_patch16_512',
    'rope_axial': 'vit_base_patch16_rope_224',                # Naver axial T=100 'xy'
    'rope_axial_ape': 'vit_base_patch16_rope_ape_224',        # + patch-only abs pos
    'rope_mixed': 'vit_base_patch16_rope_mixed_224',          # learned frequencies
    'rope_mixed_ape': 'vit_small_patch16_rope_mixed_ape_224',
    'dinov3': 'vit_base_patch16_dinov3',                      # periods, half layout, 4 registers, no qkv bias
    'dinov3_qkvb': 'vit_base_patch16_dinov3_qkvb',            # q/v bias
    'dinov3_swiglu': 'vit_small_plus_patch16_dinov3',         # SwiGLU aligned to 8
    'dinov3_7b': 'vit_7b_patch16_dinov3',                     # mlp_ratio 2, aligned to 64
    'lingbot': 'vit_large_patch16_lingbot',                   # token pool
    'sapiens2': 'vit_base_patch16_sapiens2',                  # GQA, RMSNorm, q/k norm, attn-only LayerScale
}
# `make test` runs these; the others under `make test-slow`
FAST = ('eva02_swiglu', 'pe_core', 'rope_mixed', 'dinov3_qkvb', 'sapiens2')


def reduced(name, **extra):
    kw = dict(SMALL)
    cfg = vit_flax.model_config(name)[1]
    if cfg.get('num_kv_heads') is not None:
        kw['num_kv_heads'] = (4, 2)        # GQA in the second block
    return vit_flax.create_model(name, **dict(kw, **extra))


def timm_twin(model, name, seed=0):
    torch.manual_seed(seed)
    return perturb_timm(timm.create_model(name, pretrained=False, **FAMILY.timm_kwargs(model)), seed)


def converted(model, tm):
    return unflatten_dict(table.torch_to_flax(state_np(tm), FAMILY.rules(model), ignore=FAMILY.ignore_torch), sep='/')


# ---------------------------------------------------------------- registrations

def test_every_eva_registration_is_registered():
    assert sorted(n for n in vit_flax.list_models() if vit_flax.model_config(n)[0] is Eva) == NAMES
    assert len(NAMES) == 65


def _timm_meta(name, **kw):
    with torch.device('meta'):
        return timm.create_model(name, **kw)


def test_defaults_equal_timms():
    """timm's default classes and input size (its default pretrained config) for all 65 names."""
    from timm.models import get_pretrained_cfg
    for name in NAMES:
        model, cfg = vit_flax.create_model(name), get_pretrained_cfg(name)
        assert (model.num_classes, tuple(model.input_shape[:2])) == (cfg.num_classes, tuple(cfg.input_size[1:])), name


# one name per architecture in `make test`, every name under `make test-slow` (~0.5 s each)
COUNT_FAST = tuple(ARCHS[a] for a in FAST)


@pytest.mark.parametrize('name', [n if n in COUNT_FAST else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_reduced_param_count_equals_timms(name):
    """The parameter count of each name's configuration at depth 2 (every option that shapes a block, the stem
    and the head; full depth below), against timm's model on the meta device; and its prefix tokens."""
    model = vit_flax.create_model(name)
    kw = dict(depth=2)
    if model.num_kv_heads is not None:
        kw['num_kv_heads'] = tuple(model.num_kv_heads)[7:9]   # a full-heads block and a GQA block
    tm = _timm_meta(name, **kw)
    assert model.num_prefix_tokens == tm.num_prefix_tokens
    assert vit_flax.count_params(vit_flax.create_model(name, **kw)) == sum(p.numel() for p in tm.parameters())


FULL_COUNT = ('eva02_tiny_patch14_224',)


@pytest.mark.parametrize('name', [n if n in FULL_COUNT else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_full_param_count_equals_timms(name):
    assert vit_flax.count_params(vit_flax.create_model(name)) == sum(p.numel() for p in _timm_meta(name).parameters())


# ---------------------------------------------------------------- parity with timm

@pytest.mark.parametrize('arch', [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_logits_equal_timms_on_a_reduced_copy(arch):
    """Perturbed timm weights through the rule table: logits within 1e-5 (float32); and the table run back
    gives timm's state_dict bit for bit, which timm loads strictly."""
    name = ARCHS[arch]
    model = reduced(name, num_classes=7)
    tm = timm_twin(model, name)
    params = converted(model, tm)
    x = images((2,) + tuple(model.input_shape))
    err = rel_err(run_flax(model, params, x), run_timm(tm, x))
    assert err <= TOL, (arch, err)
    back = table.flax_to_torch(table.torch_to_flax(state_np(tm), FAMILY.rules(model), FAMILY.ignore_torch),
                               FAMILY.rules(model))
    ref = state_np(tm)
    assert set(back) == set(ref)
    assert all(np.array_equal(back[k], ref[k]) and back[k].dtype == ref[k].dtype for k in ref)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)


@pytest.mark.parametrize('name,hw', [('vit_small_patch16_dinov3_qkvb', (80, 48)),
                                     pytest.param('eva02_tiny_patch14_224', (84, 56), marks=pytest.mark.slow)])
def test_dynamic_img_size_other_grid_equals_timm(name, hw):
    """A DINOv3 (dynamic size, rope built for the input's grid) and an EVA-02 with abs positions resized:
    another input size than the model's, logits as timm's."""
    model = reduced(name, num_classes=5, dynamic_img_size=True)
    tm = timm_twin(model, name)
    x = images((1,) + hw + (3,))
    err = rel_err(run_flax(model, converted(model, tm), x), run_timm(tm, x))
    assert err <= TOL, (name, err)


# ---------------------------------------------------------------- the RoPE op against timm's tables

def test_rope_tables_equal_timms():
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat, RotaryEmbeddingDinoV3, RotaryEmbeddingMixed
    for kw in (dict(temperature=10000., grid_offset=0., grid_indexing='ij', ref_feat_shape=(16, 16)),
               dict(temperature=10000., grid_offset=1., grid_indexing='xy', ref_feat_shape=(24, 24)),
               dict(temperature=100., grid_offset=0., grid_indexing='xy', ref_feat_shape=None)):
        want = RotaryEmbeddingCat(dim=16, in_pixels=False, feat_shape=[3, 5], **kw).get_embed().numpy()
        sin, cos = rope.sin_cos(rope.cat_angles((3, 5), 16, kw['temperature'], kw['grid_offset'],
                                                kw['grid_indexing'], kw['ref_feat_shape']), False)
        np.testing.assert_allclose(np.concatenate([sin, cos], -1), want, atol=1e-6)
    want = RotaryEmbeddingDinoV3(dim=16, temperature=100., feat_shape=[3, 5]).get_embed().numpy()
    sin, cos = rope.sin_cos(rope.dinov3_angles((3, 5), 16, 100.), True)
    np.testing.assert_allclose(np.concatenate([sin, cos], -1), want, atol=1e-6)
    mixed = RotaryEmbeddingMixed(dim=64, depth=2, num_heads=4, temperature=10., feat_shape=[3, 5])
    want = mixed.get_embed().detach().numpy()
    sin, cos = rope.sin_cos(rope.mixed_angles(mixed.freqs.detach().numpy(), (3, 5), 'xy'), False)
    np.testing.assert_allclose(np.concatenate([sin, cos], -1), want, atol=1e-6)


def test_rope_leaves_prefix_tokens_and_rotates_like_timm():
    from timm.layers.pos_embed_sincos import apply_rot_embed_cat
    x = images((2, 3, 1 + 15, 16))
    for half in (False, True):
        ang = rope.dinov3_angles((3, 5), 16) if half else rope.cat_angles((3, 5), 16)
        sin, cos = rope.sin_cos(ang, half)
        got = np.asarray(rope.apply_rope(jnp.asarray(x), sin, cos, half, prefix=1))
        emb = torch.from_numpy(np.concatenate([np.asarray(sin), np.asarray(cos)], -1))
        want = apply_rot_embed_cat(torch.from_numpy(x[:, :, 1:]), emb, half=half).numpy()
        np.testing.assert_array_equal(got[:, :, :1], x[:, :, :1])
        np.testing.assert_allclose(got[:, :, 1:], want, atol=1e-6)


def test_rope_bf16_against_float32_reported(capsys):
    """RoPE under a bf16 compute dtype: the tables and the rotation stay float32 (ops/rope.py), so the only
    rounding is bf16's on q and k after the rotation. Reported: the relative difference of a reduced DINOv3's
    features, bf16 against float32, and of the rotation alone when it is computed in bf16 instead."""
    name = 'vit_small_patch16_dinov3_qkvb'
    model = reduced(name, num_classes=0, depth=1)
    tm = timm_twin(model, name)
    params = converted(model, tm)
    x = images((2,) + tuple(model.input_shape))
    f32 = run_flax(model, params, x)
    bf16 = run_flax(model.clone(dtype=jnp.bfloat16), params, x).astype(np.float32)
    model_err = rel_err(bf16, f32)
    q = jnp.asarray(images((1, 4, 12, 16)))
    sin, cos = rope.sin_cos(rope.dinov3_angles((3, 4), 16), True)
    exact = rope.apply_rope(q, sin, cos, True)
    low = rope.apply_rope(q.astype(jnp.bfloat16), sin.astype(jnp.bfloat16), cos.astype(jnp.bfloat16), True)
    rot_f32_tables = rel_err(rope.apply_rope(q.astype(jnp.bfloat16), sin, cos, True).astype(jnp.bfloat16)
                             .astype(jnp.float32), exact)
    rot_bf16_tables = rel_err(np.asarray(low.astype(jnp.float32)), exact)
    with capsys.disabled():
        print(f'\nRoPE bf16 vs float32: reduced DINOv3 features {model_err:.2e}; rotation with float32 tables '
              f'{rot_f32_tables:.2e}, with bf16 tables {rot_bf16_tables:.2e}')
    assert model_err < 5e-2
    assert rot_f32_tables <= rot_bf16_tables


# ---------------------------------------------------------------- MACs against torch's FlopCounter

def torch_macs(name, **kw):
    from torch.utils.flop_counter import FlopCounterMode
    tm = _timm_meta(name, **kw).eval().requires_grad_(False)
    h, w = tm.patch_embed.img_size
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        tm(torch.empty(1, 3, h, w, device='meta'))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize('arch', [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_macs_equal_torch_flop_counter(arch):
    """Each architecture at its registered width and input size, two blocks (MACs are linear in depth)."""
    name = ARCHS[arch]
    kw = dict(depth=2)
    if vit_flax.model_config(name)[1].get('num_kv_heads') is not None:
        kw['num_kv_heads'] = tuple(vit_flax.create_model(name).num_kv_heads)[7:9]
    assert vit_flax.count_macs(vit_flax.create_model(name, **kw)) == torch_macs(name, **kw)


def test_patch_dropout_keeps_timms_count_of_patches_with_their_rotations():
    """patch_drop_rate in training: every image keeps its prefix tokens and int(N (1 - rate)) patches (timm's
    PatchDropoutWithIndices), each with its own rotation; in eval nothing is dropped; gradients flow."""
    model = reduced('vit_small_patch16_dinov3_qkvb', num_classes=3, depth=1, patch_drop_rate=0.5)
    params = converted(model, timm_twin(model, 'vit_small_patch16_dinov3_qkvb'))
    x = images((2,) + tuple(model.input_shape))
    rng = {'dropout': jax.random.PRNGKey(0)}

    def loss(p):
        out, inter = model.apply({'params': p}, x, train=True, rngs=rng, mutable=['intermediates'])
        return out.sum(), inter['intermediates']['block_0'][0]
    (_, tokens), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert tokens.shape == (2, model.num_prefix_tokens + int(12 * 0.5), 64)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree_util.tree_leaves(grads))
    assert float(np.abs(np.asarray(grads['blocks_0']['attn']['qkv']['kernel'])).max()) > 0
