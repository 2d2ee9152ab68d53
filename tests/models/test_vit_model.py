"""The ViT/DeiT family in Flax: registry, sizes, GMACs, shapes, train/eval behaviour, options."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import timm
import torch

import vit_flax
from vit_flax.models.layers import drop_path_rates
from vit_flax.summary import count_macs, count_params

from helpers import images, perturb, rel_err

ORIGINAL = re.compile(r'(vit_(tiny|small|base|large|huge)_patch(8|14|16|32)_(224|384))|'
                      r'(deit_(tiny|small|base)(_distilled)?_patch16_(224|384))')


def test_registry_has_every_timm_vit_and_deit_name():
    timm_names = {n for n in timm.list_models('*') if ORIGINAL.fullmatch(n)}
    ours = {n for n in vit_flax.list_models('*') if ORIGINAL.fullmatch(n)}
    assert len(timm_names) >= 26
    assert timm_names == ours


@pytest.mark.parametrize('name', [n for n in vit_flax.list_models('*') if ORIGINAL.fullmatch(n)])
def test_param_count_equals_timm(name):
    with torch.device('meta'):
        tm = timm.create_model(name, pretrained=False)
    expected = sum(p.numel() for p in tm.parameters())
    assert count_params(vit_flax.create_model(name)) == expected


def test_param_counts_match_reference_figures():
    # timm's counts (sum of its models' parameters); its model cards round them to 5.7M, 22.1M, 86.6M and 304.3M
    # (https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k and the other sizes' cards)
    ref = {'vit_tiny_patch16_224': 5_717_416, 'vit_small_patch16_224': 22_050_664,
           'vit_base_patch16_224': 86_567_656, 'vit_large_patch16_224': 304_326_632}
    assert {n: count_params(vit_flax.create_model(n)) for n in ref} == ref


# GMACs as timm's model cards give them (https://huggingface.co/timm/deit_base_patch16_384.fb_in1k: 55.5, and the
# deit_{tiny,small,base}_patch16_224.fb_in1k cards) for DeiT (Touvron et al., https://arxiv.org/abs/2012.12877)
@pytest.mark.parametrize('name,paper', [('deit_tiny_patch16_224', 1.3), ('deit_small_patch16_224', 4.6),
                                        ('deit_base_patch16_224', 17.6), ('deit_base_patch16_384', 55.5)])
def test_gmacs_within_5pct_of_deit_paper(name, paper):
    gmacs = count_macs(vit_flax.create_model(name)) / 1e9
    assert abs(gmacs - paper) / paper < 0.05, gmacs


def test_macs_rule_counts_matmuls_exactly():
    # ViT-B/16: patch conv + 12 x (qkv, q@k, attn@v, proj, fc1, fc2) + head, counted by hand.
    n, d, m = 197, 768, 3072
    block = 3 * n * d * d + 2 * n * n * d + n * d * d + 2 * n * d * m
    expected = 196 * 16 * 16 * 3 * d + 12 * block + d * 1000
    assert count_macs(vit_flax.create_model('vit_base_patch16_224')) == expected


def test_macs_rule_counts_one_branch_of_a_platform_choice():
    # lax.platform_dependent traces every platform's form into the jaxpr; one of them runs
    from vit_flax.summary import jaxpr_macs
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    w = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    f = lambda x, w: jax.lax.platform_dependent(x, w, cpu=lambda x, w: x @ w, default=lambda x, w: (x @ w) @ w.T @ w)
    assert jaxpr_macs(jax.make_jaxpr(f)(x, w).jaxpr) == 8 * 16 * 4 + 8 * 4 * 16 + 8 * 16 * 4


def test_unknown_model_and_option_errors():
    with pytest.raises(KeyError, match='unknown model'):
        vit_flax.create_model('vit_nonexistent')
    with pytest.raises(TypeError, match='unknown option'):
        vit_flax.create_model('vit_tiny_patch16_224', bogus=1)


def tiny(**kw):
    cfg = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=7)
    cfg.update(kw)
    return vit_flax.VisionTransformer(**cfg)


def test_google_tree_names():
    from vit_flax.summary import param_shapes   # the tree's names, shapes and dtypes: nothing to compute
    p = param_shapes(vit_flax.create_model('vit_tiny_patch16_224'))
    assert set(p) == {'embedding', 'cls', 'Transformer', 'head'}
    assert p['embedding']['kernel'].shape == (16, 16, 3, 192)
    assert p['cls'].shape == (1, 1, 192)
    t = p['Transformer']
    assert t['posembed_input']['pos_embedding'].shape == (1, 197, 192)
    b = t['encoderblock_11']
    assert set(b) == {'LayerNorm_0', 'MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0'}
    assert b['MultiHeadDotProductAttention_0']['query']['kernel'].shape == (192, 3, 64)
    assert b['MultiHeadDotProductAttention_0']['out']['kernel'].shape == (3, 64, 192)
    assert set(b['MlpBlock_0']) == {'Dense_0', 'Dense_1'}
    assert 'encoder_norm' in t
    assert jax.tree_util.tree_reduce(lambda a, l: a and l.dtype == jnp.float32, p, True)


@pytest.mark.parametrize('kw,out', [({}, (2, 7)), ({'num_classes': 0}, (2, 32)), ({'global_pool': 'gap'}, (2, 7)),
                                    ({'global_pool': 'map'}, (2, 7)), ({'representation_size': 16}, (2, 7)),
                                    ({'representation_size': 16, 'num_classes': 0}, (2, 16)),
                                    ({'img_size': (32, 48)}, (2, 7)), ({'in_chans': 1}, (2, 7))])
def test_output_shapes(kw, out):
    m = tiny(**kw)
    x = images((2,) + m.input_shape)
    assert m.apply({'params': perturb(m)}, x).shape == out   # values drawn on the shapes: no init to compile


def test_features_and_pooling_values():
    m = tiny()
    p = perturb(m)
    x = images((2,) + m.input_shape)
    tokens = m.apply({'params': p}, x, method=m.forward_features)
    assert tokens.shape == (2, 1 + 16, 32)
    feats = tiny(num_classes=0).apply({'params': {k: v for k, v in p.items() if k != 'head'}}, x)
    np.testing.assert_allclose(feats, tokens[:, 0], rtol=1e-6)
    logits = m.apply({'params': p}, x)
    np.testing.assert_allclose(logits, tokens[:, 0] @ p['head']['kernel'] + p['head']['bias'], rtol=1e-5, atol=1e-6)
    gap = tiny(global_pool='gap', class_token=True)
    tokens = gap.apply({'params': p}, x, method=gap.forward_features)
    np.testing.assert_allclose(gap.apply({'params': p}, x),
                               tokens[:, 1:].mean(1) @ p['head']['kernel'] + p['head']['bias'], rtol=1e-5, atol=1e-6)


def test_pre_logits_is_dense_tanh():
    m = tiny(representation_size=16, num_classes=0)
    p = perturb(m)
    x = images((2,) + m.input_shape)
    tokens = m.apply({'params': p}, x, method=m.forward_features)
    expected = np.tanh(tokens[:, 0] @ p['pre_logits']['kernel'] + p['pre_logits']['bias'])
    np.testing.assert_allclose(m.apply({'params': p}, x), expected, rtol=1e-5, atol=1e-6)


def test_eval_is_deterministic_and_train_is_not():
    m = tiny(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.2)
    p = perturb(m)
    x = images((4,) + m.input_shape)
    ev = m.apply({'params': p}, x, train=False)
    np.testing.assert_array_equal(ev, tiny().apply({'params': p}, x))  # eval ignores every rate
    t1 = m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)})
    t2 = m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(2)})
    assert rel_err(t1, ev) > 1e-3 and rel_err(t1, t2) > 1e-3
    with pytest.raises(Exception, match='dropout'):
        m.apply({'params': p}, x, train=True)
    # zero rates: train needs no rng and equals eval
    np.testing.assert_allclose(tiny().apply({'params': p}, x, train=True), ev, rtol=1e-6)


def test_drop_path_only_is_active_in_train():
    m = tiny(drop_path_rate=0.5)
    p = perturb(m)
    x = images((8,) + m.input_shape)
    t = m.apply({'params': p}, x, train=True, rngs={'dropout': jax.random.PRNGKey(0)})
    assert rel_err(t, m.apply({'params': p}, x)) > 1e-3


def test_drop_path_rates_increase_linearly():
    np.testing.assert_allclose(drop_path_rates(0.1, 5), [0, 0.025, 0.05, 0.075, 0.1])
    np.testing.assert_allclose(drop_path_rates(0.1, 12), torch.linspace(0, 0.1, 12).numpy(), rtol=1e-6)
    assert drop_path_rates(0.3, 1) == [0.0]


def test_distilled_outputs_in_both_modes():
    m = tiny(distilled=True)
    p = perturb(m)
    assert p['dist'].shape == (1, 1, 32) and 'head_dist' in p
    assert p['Transformer']['posembed_input']['pos_embedding'].shape == (1, 2 + 16, 32)
    x = images((2,) + m.input_shape)
    tokens = m.apply({'params': p}, x, method=m.forward_features)
    cls = tokens[:, 0] @ p['head']['kernel'] + p['head']['bias']
    dist = tokens[:, 1] @ p['head_dist']['kernel'] + p['head_dist']['bias']
    assert rel_err(cls, dist) > 1e-2
    np.testing.assert_allclose(m.apply({'params': p}, x), (cls + dist) / 2, rtol=1e-5, atol=1e-6)
    a, b = m.apply({'params': p}, x, train=True)
    np.testing.assert_allclose(a, cls, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, dist, rtol=1e-5, atol=1e-6)
    feats = tiny(distilled=True, num_classes=0).apply(
        {'params': {k: v for k, v in p.items() if not k.startswith('head')}}, x)
    np.testing.assert_allclose(feats, (tokens[:, 0] + tokens[:, 1]) / 2, rtol=1e-5, atol=1e-6)


def test_vit1d_patch_embedding_is_a_strided_conv1d():
    m = vit_flax.create_model('vit1d_tiny_patch16_1024', num_classes=5, depth=2, in_chans=2)
    p = perturb(m)
    assert p['embedding']['kernel'].shape == (16, 2, 192)
    x = images((3, 1024, 2))
    assert m.apply({'params': p}, x).shape == (3, 5)
    # the embedding of patch j is the flattened window x[16j:16j+16] times the kernel
    emb = m.apply({'params': p}, x, method=lambda mod, x: mod.embedding(x))
    k = np.asarray(p['embedding']['kernel']).reshape(32, 192)
    manual = x.reshape(3, 64, 32) @ k + np.asarray(p['embedding']['bias'])
    np.testing.assert_allclose(emb, manual, rtol=1e-4, atol=1e-5)
    tokens = m.apply({'params': p}, x, method=m.forward_features)
    assert tokens.shape == (3, 65, 192)


def test_qk_scale_and_gelu_options():
    p = perturb(tiny())
    x = images((2, 32, 32, 3))
    base = tiny().apply({'params': p}, x)
    np.testing.assert_allclose(tiny(qk_scale=8 ** -0.5).apply({'params': p}, x), base, rtol=1e-5, atol=1e-6)
    assert rel_err(tiny(qk_scale=1.0).apply({'params': p}, x), base) > 1e-3
    tanh = tiny(gelu='tanh').apply({'params': p}, x)
    assert 0 < rel_err(tanh, base) < 1e-2
    with pytest.raises(ValueError, match='gelu'):
        tiny(gelu='fast').apply({'params': p}, x)


def test_no_qkv_bias():
    m = tiny(qkv_bias=False)
    p = vit_flax.summary.param_shapes(m)
    assert 'bias' not in p['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']['query']
    assert 'bias' in p['Transformer']['encoderblock_0']['MultiHeadDotProductAttention_0']['out']


def test_bf16_compute_keeps_float32_params():
    m = tiny(dtype=jnp.bfloat16)
    p = perturb(tiny())
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(vit_flax.summary.param_shapes(m)))
    x = images((2, 32, 32, 3))
    out = m.apply({'params': p}, x)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, tiny().apply({'params': p}, x)) < 5e-2


def test_remat_matches():
    """Rematerialised blocks give the same outputs and, in training, the same gradient of every leaf: the
    recomputed forward pass draws the dropout and drop-path masks of the first one."""
    p = perturb(tiny())
    x = images((2, 32, 32, 3))
    fwd = lambda m: jax.jit(lambda p: m.apply({'params': p}, x))(p)  # noqa: E731
    np.testing.assert_allclose(fwd(tiny(remat=True)), fwd(tiny()), rtol=1e-6)

    def grad(**kw):   # one compile per model, the dropout key an argument
        m = tiny(drop_rate=0.1, drop_path_rate=0.3, **kw)
        loss = lambda p, key: (m.apply({'params': p}, x, train=True, rngs={'dropout': key}) ** 2).sum()  # noqa: E731
        g = jax.jit(jax.grad(loss))
        return lambda seed=0: jax.tree_util.tree_leaves_with_path(g(p, jax.random.PRNGKey(seed)))

    plain = grad()
    ref, other_masks = plain(), plain(seed=1)
    assert max(rel_err(a, b) for (_, a), (_, b) in zip(other_masks, ref)) > 1e-2   # the masks change the gradient
    got = grad(remat=True)()
    assert [k for k, _ in got] == [k for k, _ in ref]
    # atol at the whole gradient's scale: the key bias's gradient is zero in exact arithmetic (softmax ignores a
    # shift along the keys), so that leaf holds rounding noise alone, which differs with the fusion order
    scale = max(float(np.abs(r).max()) for _, r in ref)
    for (path, g), (_, r) in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


def test_intermediates_are_returned():
    m = tiny()
    p = perturb(m)
    x = images((2, 32, 32, 3))
    logits, state = m.apply({'params': p}, x, mutable=['intermediates'])
    inter = state['intermediates']['Transformer']
    assert {'embed', 'block_0', 'block_1', 'block_2', 'encoded'} <= set(inter)
    tokens = m.apply({'params': p}, x, method=m.forward_features)
    np.testing.assert_array_equal(inter['encoded'][0], tokens)


def test_wrong_input_size_is_a_clear_error():
    m = tiny()
    with pytest.raises(ValueError, match=r'input shape \(48, 48, 3\)'):
        m.apply({'params': perturb(m)}, images((1, 48, 48, 3)))


def test_vit_flax_imports_neither_torch_nor_converters():
    import subprocess
    import sys
    code = 'import sys, vit_flax; vit_flax.create_model("swin_tiny_patch4_window7_224"); ' \
           'print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "converters")))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'
