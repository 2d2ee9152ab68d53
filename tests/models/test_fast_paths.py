"""The speed-motivated code paths compute what the references compute: attention, GELU, patch embedding,
the bf16 matmul policy and its backward, nn.scan over the blocks and its checkpoint layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax.traverse_util import flatten_dict, unflatten_dict

import converters
import vit_flax
from converters import pipeline
from converters import scan
from converters.families import vit as vit_family
from vit_flax.models import layers
from vit_flax.ops import activations, attention, matmul as mm

from helpers import cli, images, perturb, rel_err, run_flax, run_timm, timm_model

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=4, num_classes=7)


def random_params(model, seed=0):
    """Params of `model`'s shapes drawn at random (norm scales around 1): no init to compile, nothing at zero."""
    rng = np.random.default_rng(seed)
    draw = lambda path, l: ((path[-1].key == 'scale') + 0.1 * rng.standard_normal(l.shape)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, vit_flax.summary.param_shapes(model))


def stacked(params):
    return unflatten_dict(scan.stack_blocks(flatten_dict(params, sep='/')), sep='/')


@pytest.fixture(params=['native', 'float32'])
def path(request):
    """Each bf16 matmul path in turn, set explicitly (`ops.matmul.using_policy`) for the test's duration."""
    with mm.using_policy(request.param):
        yield request.param


# ---------------------------------------------------------------- attention, GELU, patch embedding

def test_attention_matches_torch_sdpa_with_bias_and_broadcast_batch_dims():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 4, 10, 8)).astype(np.float32) for _ in range(3))
    bias = rng.standard_normal((3, 4, 10, 10)).astype(np.float32)  # broadcast over the leading batch dim
    ours = attention.dot_product_attention(jnp.asarray(q) * 8 ** -0.5, k, v, bias)
    ref = F.scaled_dot_product_attention(*map(torch.from_numpy, (q, k, v)), attn_mask=torch.from_numpy(bias))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bias_shape', [None, (3, 4, 10, 10), (1, 4, 1, 10)])
def test_attention_gradients_match_torch_autograd(bias_shape):
    """The hand-written VJP (`attention._attention`) against PyTorch's autograd of the same formula, for q, k, v
    and a bias broadcast over batch, head or query axes (Swin's relative position bias and mask)."""
    rng = np.random.default_rng(1)
    q, k, v, ct = (rng.standard_normal((2, 3, 4, 10, 8)).astype(np.float32) for _ in range(4))
    bias = None if bias_shape is None else rng.standard_normal(bias_shape).astype(np.float32)
    args = [q, k, v] + ([] if bias is None else [bias])
    fn = lambda q, k, v, *b: attention.dot_product_attention(q * 8 ** -0.5, k, v, *b)
    out, vjp = jax.vjp(fn, *map(jnp.asarray, args))
    ours = vjp(jnp.asarray(ct))
    tq, tk, tv, *tb = (torch.from_numpy(a).requires_grad_() for a in args)
    logits = (tq * 8 ** -0.5) @ tk.transpose(-1, -2) + (tb[0] if tb else 0)
    ref = torch.softmax(logits, -1) @ tv
    ref.backward(torch.from_numpy(ct))
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=1e-5, atol=1e-5)
    for got, want in zip(ours, [t.grad.numpy() for t in (tq, tk, tv, *tb)]):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_attention_forward_mode_matches_autodiff_of_softmax():
    """Float32 attention keeps forward mode (jax.jvp, Hessian-vector products): its JVP against autodiff
    of jax.nn.softmax over the same logits."""
    rng = np.random.default_rng(2)
    primals = [jnp.asarray(rng.standard_normal((2, 4, 10, 8)), jnp.float32) for _ in range(3)]
    tangents = [jnp.asarray(rng.standard_normal((2, 4, 10, 8)), jnp.float32) for _ in range(3)]
    ref = lambda q, k, v: jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k), axis=-1) @ v
    out, tan = jax.jvp(lambda q, k, v: attention.dot_product_attention(q, k, v), primals, tangents)
    want_out, want_tan = jax.jvp(ref, primals, tangents)
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tan, want_tan, rtol=1e-4, atol=1e-5)


def test_bf16_attention_gradients_are_autodiffs(path):
    """bf16 attention's hand-written VJP against JAX autodiff of the same steps (jax.nn.softmax and `matmul`,
    whose own VJP rounds each cotangent to bf16): the same numbers, a broadcast bias included."""
    rng = np.random.default_rng(3)
    q, k, v, ct = (jnp.asarray(rng.standard_normal((2, 3, 4, 10, 8)), jnp.bfloat16) for _ in range(4))
    bias = jnp.asarray(rng.standard_normal((3, 1, 10, 10)), jnp.float32)

    def ref(q, k, v, bias):
        logits = mm.matmul('...qd,...kd->...qk', q, k, out_dtype=jnp.float32) + bias
        return mm.matmul('...qk,...kd->...qd', jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
    got = jax.vjp(attention.dot_product_attention, q, k, v, bias)[1](ct)
    want = jax.vjp(ref, q, k, v, bias)[1](ct)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name,kw,drop', [
    ('vit_tiny_patch16_224', dict(img_size=32, depth=2, global_pool='map', class_token=False), 'attn_drop_rate'),
    ('swin_tiny_patch4_window7_224', dict(img_size=32, depths=(2,), num_heads=(3,), window_size=4), 'attn_drop_rate'),
    # vit-pytorch's attention calls the same kernel as ViT's (ops/attention.py): `make test-slow`
    pytest.param('lucid_vit_tiny_patch16_224', dict(img_size=32, depth=2), 'dropout', marks=pytest.mark.slow),
])
def test_attn_impl_autodiff_computes_what_manual_grad_computes(name, kw, drop):
    """attn_impl='autodiff' (the formula, JAX's derivatives; once 'plain') against 'manual_grad' (the
    hand-written derivatives, CPU's 'auto', once 'reference' and 'fused'): the same params, close values and
    gradients; with attention dropout active both run the plain formula: equal bits."""
    fused, ref = (vit_flax.create_model(name, attn_impl=impl, **kw) for impl in ('manual_grad', 'autodiff'))
    params, x = random_params(fused), images((2, 32, 32, 3))
    run = lambda m, p, **a: jax.jit(jax.value_and_grad(lambda p: (m.apply({'params': p}, x, **a) ** 2).mean()))(p)
    (l1, g1), (l2, g2) = run(fused, params), run(ref, params)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)
    train = dict(train=True, rngs={'dropout': jax.random.PRNGKey(0)})
    dropped = [run(m.clone(**{drop: 0.2}), params, **train)[0] for m in (fused, ref)]
    assert dropped[0] == dropped[1] != l1
    with pytest.raises(ValueError, match="^attn_impl must be one of 'auto', 'manual_grad', 'autodiff', .* got 'flash'"):
        vit_flax.init_params(fused.clone(attn_impl='flash'))


def test_bf16_matmul_policy_is_explicit_and_resolved_once(monkeypatch):
    resolved = mm.policy()
    assert resolved in ('native', 'float32')
    monkeypatch.setenv(mm.BF16_MATMUL_ENV, 'native' if resolved == 'float32' else 'float32')
    assert mm.policy() == resolved  # the environment variable was read once, at first use
    with mm.using_policy('native'):
        assert mm.policy() == 'native'
        with mm.using_policy('float32'):
            assert mm.policy() == 'float32'
        assert mm.policy() == 'native'
    assert mm.policy() == resolved
    with pytest.raises(ValueError, match="must be native or float32, got 'bf16'"):
        mm.set_policy('bf16')
    assert mm.policy() == resolved


def test_gelu_exact_matches_torch_values_and_gradient():
    x = np.linspace(-9, 9, 2001, dtype=np.float32)
    xt = torch.from_numpy(x).requires_grad_()
    F.gelu(xt).sum().backward()
    # (the far negative tail differs by < 1e-6 absolute: the erf approximations saturate at different points)
    np.testing.assert_allclose(activations.gelu_exact(x), F.gelu(torch.from_numpy(x)).numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: activations.gelu_exact(x).sum())(x), xt.grad.numpy(), rtol=1e-5,
                               atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)  # bf16 in, bf16 out, computed in float32 like PyTorch: within one bf16 ulp
    ref = F.gelu(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    np.testing.assert_allclose(np.asarray(activations.gelu_exact(xb), np.float32), ref, rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize('shape,patch', [((1, 15, 11, 3), (7, 5)), ((2, 50, 2), (8,))])
def test_patch_conv_is_the_strided_convolution_values_and_grads(shape, patch):
    x = images(shape)
    mod = layers.PatchConv(6, patch)
    params = perturb(mod.init(jax.random.PRNGKey(0), x)['params'])
    conv = layers.nn.Conv(6, patch, strides=patch, padding='VALID')  # same params, same init
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
        conv.init(jax.random.PRNGKey(0), x)['params'])
    run = lambda m: jax.jit(jax.value_and_grad(lambda p: (m.apply({'params': p}, x) ** 2).sum()))(params)
    (l1, g1), (l2, g2) = run(mod), run(conv)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(mod.apply({'params': params}, x), conv.apply({'params': params}, x), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize('ours,flax_ref,shape', [
    (layers.Dense(6), layers.nn.Dense(6), (2, 3, 5)),
    (layers.dense_general(6, (-2, -1), jnp.float32, kernel_init=layers.nn.initializers.xavier_uniform()),
     layers.nn.DenseGeneral(6, axis=(-2, -1), kernel_init=layers.nn.initializers.xavier_uniform()), (2, 3, 4, 5)),
    (layers.ProjectionParams((4, 5)), layers.nn.DenseGeneral((4, 5), kernel_init=layers.nn.initializers.xavier_uniform()),
     (2, 7)),
])
def test_dense_layers_have_flax_params_and_init(ours, flax_ref, shape):
    x = images(shape)
    args = (shape[-1],) if isinstance(ours, layers.ProjectionParams) else (x,)
    p = ours.init(jax.random.PRNGKey(3), *args)['params']
    ref = flax_ref.init(jax.random.PRNGKey(3), x)['params']
    assert jax.tree_util.tree_map(np.shape, p) == jax.tree_util.tree_map(np.shape, ref)
    for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_array_equal(a, b)
    if not isinstance(ours, layers.ProjectionParams):
        p = perturb(p)
        np.testing.assert_allclose(ours.apply({'params': p}, x), flax_ref.apply({'params': p}, x), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bf16

def test_bf16_matmul_gradients_are_bf16_products_accumulated_in_float32(path):
    rng = np.random.default_rng(0)
    a, b = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((6, 300), (300, 5)))
    ct = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    out, vjp = jax.vjp(lambda a, b: mm.matmul('mk,kn->mn', a, b, out_dtype=jnp.float32), a, b)
    da, db = vjp(ct)
    assert out.dtype == jnp.float32 and da.dtype == db.dtype == jnp.bfloat16
    f64 = lambda t: np.asarray(t, np.float64)
    ct16 = f64(ct.astype(jnp.bfloat16))  # the cotangent rounded to bf16 first, as autocast's backward does
    np.testing.assert_allclose(f64(out), f64(a) @ f64(b), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(da), ct16 @ f64(b).T, rtol=8e-3, atol=1e-2)
    np.testing.assert_allclose(f64(db), f64(a).T @ ct16, rtol=8e-3, atol=1e-2)
    # every matmul of the forward and backward takes operands of one dtype: bf16 on the native path (no
    # mixed f32 x bf16 dot, which XLA would widen to a float32 GEMM), float32 on the widened one
    jaxpr = jax.make_jaxpr(jax.grad(lambda a, b: mm.matmul('mk,kn->mn', a, b, out_dtype=jnp.float32).sum(),
                                    argnums=(0, 1)))(a, b)
    dots = {tuple(str(v.aval.dtype) for v in e.invars) for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general'}
    assert dots == {('bfloat16', 'bfloat16') if path == 'native' else ('float32', 'float32')}, dots


def all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, 'jaxpr', sub)
                if hasattr(inner, 'eqns'):
                    yield from all_eqns(inner)


def bf16_errors(name, kw, tm, x, path):
    """(flax bf16 vs flax f32, timm autocast bf16 vs timm f32) relative errors of the logits."""
    torch.save(tm.state_dict(), path)
    params = pipeline.load_params(path, name, **kw)
    f32 = run_flax(vit_flax.create_model(name, **kw), params, x)
    bf16 = vit_flax.create_model(name, dtype=jnp.bfloat16, **kw)
    ours = np.asarray(jax.jit(lambda p, x: bf16.apply({'params': p}, x))(params, x), np.float32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        yt = tm(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).float().numpy()
    return rel_err(ours, f32), rel_err(yt, run_timm(tm, x))


@pytest.mark.xla_passes  # the error of the program a user runs (fused, each op's rounding as XLA leaves it)
@pytest.mark.parametrize('name,kw,bound', [
    ('vit_small_patch16_224', dict(img_size=64, depth=3), 3e-2),
    ('swin_tiny_patch4_window7_224', dict(img_size=56, depths=(2, 2), num_heads=(3, 6)), 3e-2),
])
def test_bf16_logits_error_is_small_and_no_worse_than_timm_autocast(name, kw, bound, tmp_path):
    torch.manual_seed(0)  # timm's own init draws from the global generator
    tm = timm_model(name, **kw)
    ours, timm_err = bf16_errors(name, kw, tm, images((2, kw['img_size'], kw['img_size'], 3)), tmp_path / 'm.pth')
    print(name, 'bf16 logits rel err: flax', ours, 'timm autocast', timm_err)
    assert 0 < ours < bound and ours < 2 * timm_err, (ours, timm_err)


# ---------------------------------------------------------------- nn.scan

def test_scanned_blocks_compute_what_the_unrolled_blocks_compute():
    unrolled = vit_flax.VisionTransformer(**TINY)
    scanned = vit_flax.VisionTransformer(scan_blocks=True, remat=True, remat_policy='dots_saveable', **TINY)
    params = random_params(unrolled)
    sp = stacked(params)
    shapes = flatten_dict(vit_flax.summary.param_shapes(scanned), sep='/')
    assert {k: v.shape for k, v in flatten_dict(sp, sep='/').items()} == {k: v.shape for k, v in shapes.items()}
    assert shapes['Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel'].shape == (3, 32, 4, 8)
    x = images((2, 32, 32, 3))
    run = lambda m, p: jax.jit(jax.value_and_grad(lambda p: (m.apply({'params': p}, x) ** 2).sum()))(p)
    (l1, g1), (l2, g2) = run(unrolled, params), run(scanned, sp)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(stacked(g1))):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
    inter = lambda m, p: jax.jit(lambda p: m.apply({'params': p}, x, mutable=['intermediates'])[1])(p)
    np.testing.assert_allclose(inter(scanned, sp)['intermediates']['Transformer']['block_1'][0],
                               inter(unrolled, params)['intermediates']['Transformer']['block_1'][0], rtol=1e-5, atol=1e-6)


def test_scanned_drop_path_rates_still_increase_per_block():
    m = vit_flax.VisionTransformer(scan_blocks=True, drop_path_rate=0.5, **dict(TINY, img_size=16))
    params = random_params(m)
    inter = jax.jit(lambda p: m.apply({'params': p}, images((64, 16, 16, 3)), train=True, mutable=['intermediates'],
                                      rngs={'dropout': jax.random.PRNGKey(0)})[1])(params)
    t = {k: np.asarray(v[0]) for k, v in inter['intermediates']['Transformer'].items()}
    dropped = [float(np.mean(np.all(t[f'block_{i}'] == prev, axis=(1, 2))))
               for i, prev in enumerate([t['embed'], t['block_0'], t['block_1']])]
    # block 0 never drops (rate 0); block 2 (rate 0.5) drops both branches of a quarter of the samples
    assert dropped[0] == 0 and 0.1 < dropped[2] < 0.45, dropped


def test_checkpoints_move_between_scanned_and_unrolled_models(tmp_path):
    name, kw = 'vit_tiny_patch16_224', dict(img_size=64, depth=3)
    tm = timm_model(name, **kw)
    torch.save(tm.state_dict(), tmp_path / 'timm.pth')
    x = images((2, 64, 64, 3))
    y = run_timm(tm, x)
    # an unrolled torch file into a scanned model
    params = converters.load_params(tmp_path / 'timm.pth', name, scan_blocks=True, **kw)
    assert params['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']['kernel'].shape == (3, 192, 768)
    scanned = vit_flax.create_model(name, scan_blocks=True, **kw)
    assert rel_err(run_flax(scanned, params, x), y) < 1e-4
    # a scanned Flax tree to torch and to a scanned big_vision npz (Google's key names, stacked)
    converters.save_params(params, tmp_path / 'back.pth', name, scan_blocks=True, **kw)
    back = torch.load(tmp_path / 'back.pth', weights_only=True)
    assert set(back) == set(tm.state_dict()) and all(torch.equal(back[k], v) for k, v in tm.state_dict().items())
    converters.save_params(params, tmp_path / 'scan.npz', name, layout='big_vision', scan_blocks=True, **kw)
    z = np.load(tmp_path / 'scan.npz')
    assert z['params/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel'].shape == (3, 192, 3, 64)
    assert not any('encoderblock_' in k for k in z.files)
    # the scanned npz reads back as a scanned model, converts to an unrolled torch file, and unrolls on demand
    model, p, ck = pipeline.load_model(tmp_path / 'scan.npz')
    assert model.scan_blocks and ck.layout == 'big_vision' and rel_err(run_flax(model, p, x), y) < 1e-4
    r = cli('convert', tmp_path / 'scan.npz', tmp_path / 'unrolled.npz', '--layout', 'linen', '--no-scan-blocks')
    assert r.returncode == 0, r.stderr
    assert 'Transformer/encoderblock_2/MlpBlock_0/Dense_1/kernel' in np.load(tmp_path / 'unrolled.npz').files
    back = timm_model(name, **kw)  # big_vision folds the cls row of pos_embed into cls: same function
    back.load_state_dict({k: torch.from_numpy(v) for k, v in pipeline.to_torch_state(flatten_dict(p, sep='/'), model).items()})
    assert rel_err(run_timm(back, x), y) < 1e-4


def test_unknown_remat_policy_is_a_clear_error():
    m = vit_flax.VisionTransformer(remat=True, remat_policy='dots_savable', **TINY)
    with pytest.raises(ValueError, match='unknown remat_policy .*dots_saveable'):
        vit_flax.init_params(m)



def bf16_train_step_and_specs():
    """(make_step() -> vit_train's train step of a bf16 TINY ViT, (state, batch, lr) ShapeDtypeStructs)."""
    from vit_train import optim, step as train_step
    model = vit_flax.VisionTransformer(dtype=jnp.bfloat16, **TINY)
    params = vit_flax.summary.param_shapes(model)
    flat = flatten_dict(params, sep='/')
    tx = optim.make('adamw', 0.05, {k: optim.decays(k) for k in flat})
    state = dict(params=params, opt_state=jax.eval_shape(tx.init, flat), step=jax.ShapeDtypeStruct((), jnp.int32))
    batch = dict(image=jax.ShapeDtypeStruct((4, 32, 32, 3), jnp.uint8), label=jax.ShapeDtypeStruct((4,), jnp.int32),
                 weight=jax.ShapeDtypeStruct((4,), jnp.float32), unreadable=jax.ShapeDtypeStruct((4,), jnp.int32))
    make = lambda: train_step.make_train_step(model, tx, list(flat), mean=(0.5,) * 3, std=(0.5,) * 3)
    return make, (state, batch, jax.ShapeDtypeStruct((), jnp.float32))


def test_vit_train_bf16_step_stays_on_one_matmul_path():
    """vit_train's step (forward, backward, AdamW) of a bf16 model: every matmul, the backward's included,
    takes operands of one dtype (bf16 on the native path, float32 widened on the other), never a mixed
    f32 x bf16 dot that XLA would run as a float32 GEMM on converted copies."""
    make, specs = bf16_train_step_and_specs()
    for path, want in (('native', 'bfloat16'), ('float32', 'float32')):
        with mm.using_policy(path):  # (read at trace time: a fresh step function each)
            jaxpr = jax.make_jaxpr(make())(*specs)
        eqns = [e for e in all_eqns(jaxpr.jaxpr) if e.primitive.name == 'dot_general']
        dots = [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns if min(v.aval.ndim for v in e.invars) > 1]
        # (3 blocks x (qkv, logits, weights x v, out, 2 MLP) + patch embedding + head) x (forward, 2 gradients)
        assert len(dots) == (3 * 6 + 2) * 3 and set(dots) == {(want, want)}, (path, sorted(set(dots)))
        # and, in a program for XLA:CPU, the LayerNorms' backward row sums against their float32 scale
        # (ops.layernorm): 2 per norm, 7 norms
        row_sums = [tuple(str(v.aval.dtype) for v in e.invars) for e in eqns if min(v.aval.ndim for v in e.invars) == 1]
        want_sums = 2 * 7 if jax.default_backend() == 'cpu' else 0
        assert len(row_sums) == want_sums and set(row_sums) <= {('float32', 'float32')}, (path, sorted(set(row_sums)))


@pytest.mark.xla_passes  # the widening of bf16 dots happens in XLA's passes
@pytest.mark.skipif(jax.default_backend() != 'cpu' or not mm._cpu_has_bf16(),
                    reason='XLA:CPU runs bf16 GEMMs only on a CPU with bf16 dot instructions')
def test_vit_train_bf16_step_compiles_to_bf16_gemms_only():
    """What XLA:CPU compiles, not only what JAX traces: on the native path every dot of the bf16 training step
    (forward, weight and input gradients, attention's four products) multiplies bf16 by bf16. XLA widens
    to float32 any bf16 dot whose lhs is not contracted on its last axis or whose operand is a transposed
    view (a weight gradient md,me->de, attention's dV and dK, the dP product on the merged heads'
    cotangent), converting both operands and running the float32 GEMM: ViT-S/16's step had 86 such dots."""
    import re
    make, specs = bf16_train_step_and_specs()
    with mm.using_policy('native'):
        hlo = jax.jit(make()).lower(*specs).compile().as_text()
    # instruction names are unique in a module: (dtype, the number of axes longer than 1)
    shape = {n: (t, sum(int(x) > 1 for x in d.split(',') if x))
             for n, t, d in re.findall(r'%([\w.\-]+) = (\w+)\[([\d,]*)\]', hlo)}
    dots = re.findall(r' dot\(%([\w.\-]+), %([\w.\-]+)\)', hlo)
    pairs = [(shape[a][0], shape[b][0]) for a, b in dots if min(shape[a][1], shape[b][1]) > 1]
    # 3 blocks x 6 products x 3 (forward, 2 gradients), the patch embedding's forward and weight gradient, the
    # head's 3: XLA may fold or split a few, but every one it keeps is bf16
    assert len(pairs) >= 50 and set(pairs) == {('bf16', 'bf16')}, sorted(set(pairs))
    # the rest are the LayerNorms' float32 row sums against their scale (a vector): matrix-vector products
    assert {(shape[a][0], shape[b][0]) for a, b in dots if min(shape[a][1], shape[b][1]) <= 1} <= {('f32', 'f32')}
