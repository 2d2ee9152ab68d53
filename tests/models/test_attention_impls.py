"""The attention implementations (ops/attention.py) compute what 'manual_grad' computes, and 'auto' picks per backend.

Runs on CPU: 'xla' against 'manual_grad' (values and gradients, with and without bias and masks, odd sequence
lengths), the cuDNN path's padding and masking run with jax's 'xla' kernel, the Pallas flash kernel in
interpret mode, `choose_impl` with faked backends, whole tiny ViT and Swin models with attn_impl='xla'.
"""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vit_flax
from vit_flax.errors import ModelConfigError
from vit_flax.ops import attention as A

from helpers import images, perturb, rel_err

SHAPE = (2, 3, 13, 8)   # (batch, heads, an odd sequence length, head dim)


def qkv(shape=SHAPE, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))


def bias_and_mask(kind, n=SHAPE[-2], seed=1):
    rng = np.random.default_rng(seed)
    bias = jnp.asarray(rng.standard_normal((3, n, n)), jnp.float32) if 'bias' in kind else None   # over heads
    mask = None
    if 'mask' in kind:   # every query keeps its own key: no row is all masked
        keep = (rng.random((2, 1, n, n)) > 0.4) | np.eye(n, dtype=bool)
        mask = jnp.asarray(keep)
    return bias, mask


def loss_and_grads(fn, q, k, v, bias):
    """(value, d/dq, d/dk, d/dv[, d/dbias]) of a random projection of fn's output."""
    ct = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape[:-1] + v.shape[-1:]), jnp.float32)
    args = (q, k, v) + (() if bias is None else (bias,))
    f = lambda *a: (fn(*a).astype(jnp.float32) * ct).sum()
    value, grads = jax.value_and_grad(f, argnums=tuple(range(len(args))))(*args)
    return (value,) + grads


def assert_close(got, want, tol):
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < tol, rel_err(g, w)


# ---------------------------------------------------------------- 'xla' and the padded path against 'manual_grad'

@pytest.mark.parametrize('kind', ['plain', 'bias', 'mask', 'bias+mask'])
@pytest.mark.parametrize('dtype,tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_xla_matches_reference_values_and_gradients(kind, dtype, tol):
    q, k, v = qkv(dtype=dtype)
    bias, mask = bias_and_mask(kind)
    run = lambda impl: loss_and_grads(lambda *a: A.dot_product_attention(*a[:3], a[3] if len(a) > 3 else None,
                                                                       mask, impl=impl), q, k, v, bias)
    want = run('manual_grad')
    assert_close(run('xla'), want, tol)
    assert_close(run('autodiff'), want, tol)


@pytest.mark.parametrize('kind', ['plain', 'bias+mask'])
@pytest.mark.parametrize('multiple', [2, 64])
def test_cudnn_padding_path_masks_the_padded_keys_and_drops_the_padded_queries(kind, multiple):
    """The padding 'cudnn' runs (sequences padded, padded keys masked by key_value_seq_lengths, padded query
    rows sliced off), run with jax's 'xla' kernel: values and gradients (bias's too) those of the unpadded
    sequence, an odd length padded to `multiple`."""
    q, k, v = qkv()
    bias, mask = bias_and_mask(kind)
    padded = lambda *a: A.jax_attention(*a[:3], a[3] if len(a) > 3 else None, mask, implementation='xla',
                                        seq_multiple=multiple)
    want = loss_and_grads(lambda *a: A.dot_product_attention(*a[:3], a[3] if len(a) > 3 else None, mask,
                                                             impl='manual_grad'), q, k, v, bias)
    assert_close(loss_and_grads(padded, q, k, v, bias), want, 1e-5)


def test_padded_keys_would_change_the_result_if_they_were_not_masked():
    """The test above can fail: the same padding with the key lengths left out attends to the zero keys."""
    q, k, v = qkv()
    pad = lambda t: jnp.pad(t, ((0, 0), (0, 0), (0, 3), (0, 0)))
    out = jax.nn.dot_product_attention(*(pad(t).transpose(0, 2, 1, 3) for t in (q, k, v)), scale=1.0,
                                       implementation='xla').transpose(0, 2, 1, 3)[:, :, :13]
    assert rel_err(out, A.dot_product_attention(q, k, v, impl='manual_grad')) > 1e-2


def test_leading_dims_broadcast_bias_and_a_scale_as_swin_passes_them():
    """Swin's shifted windows: q (B, nW, heads, N, Dh), bias (nW, heads, N, N) broadcast over the batch;
    an explicit `scale` equals pre-scaled q."""
    q, k, v = qkv((2, 4, 3, 9, 8))
    bias = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3, 9, 9)), jnp.float32)
    want = loss_and_grads(lambda *a: A.dot_product_attention(a[0] * 0.3, *a[1:], impl='manual_grad'), q, k, v, bias)
    for impl in ('xla', 'manual_grad', 'autodiff'):
        got = loss_and_grads(lambda *a: A.dot_product_attention(*a, scale=0.3, impl=impl), q, k, v, bias)
        assert_close(got, want, 1e-5)


# ---------------------------------------------------------------- Pallas (TPU flash attention) in interpret mode

def _interpret_mode():
    try:
        from jax.experimental.pallas import tpu as pltpu
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except ImportError as e:
        pytest.skip(f'this jax has no Pallas TPU flash attention: {e}')
    if not hasattr(pltpu, 'force_tpu_interpret_mode'):
        pytest.skip(f'jax {jax.__version__} has no pallas.tpu.force_tpu_interpret_mode: the TPU kernel cannot run on CPU')
    return pltpu.force_tpu_interpret_mode()


@pytest.mark.parametrize('kind,shape', [('bias+mask', SHAPE), ('bias', (2, 4, 3, 9, 8))])
def test_pallas_flash_kernel_in_interpret_mode_matches_reference(kind, shape):
    """jax's TPU flash kernel run by the Pallas interpreter on CPU: odd lengths padded to its 128 block and
    masked by segment ids, the bias given in full (Swin's window layout too), values and gradients."""
    q, k, v = qkv(shape)
    bias, mask = bias_and_mask(kind, shape[-2])
    if len(shape) == 5:
        bias = jnp.asarray(np.random.default_rng(2).standard_normal((4, 3, 9, 9)), jnp.float32)
    want = loss_and_grads(lambda *a: A.dot_product_attention(*a[:3], a[3] if len(a) > 3 else None, mask,
                                                             impl='manual_grad'), q, k, v, bias)
    with _interpret_mode():
        got = loss_and_grads(lambda *a: A.pallas_attention(*a[:3], a[3] if len(a) > 3 else None, mask), q, k, v, bias)
    assert_close(got, want, 1e-5)


# ---------------------------------------------------------------- what 'auto' chooses, per faked backend

BF16, F32 = jnp.bfloat16, jnp.float32


@pytest.mark.parametrize('backend,dtype,seq,head_dim,bias,want', [
    ('cpu', F32, 197, 64, False, 'manual_grad'),      # exactly what ran on CPU before 'auto'
    ('cpu', BF16, 49, 32, True, 'manual_grad'),
    ('gpu', BF16, 197, 64, False, 'cudnn'),
    ('cuda', jnp.float16, 49, 32, True, 'cudnn'),   # Swin: bias and mask go to cuDNN as its bias
    ('gpu', F32, 197, 64, False, 'xla'),            # no fused float32 kernel: xla, not a fallback
    ('tpu', BF16, 1370, 64, False, 'splash'),       # DINOv2 at 518: no bias, splash attention
    ('tpu', BF16, 197, 64, False, 'xla'),           # shorter than PALLAS_MIN_SEQ
    ('tpu', BF16, 1370, 64, True, 'pallas'),        # a bias or mask: the flash kernel, which takes one
    ('rocm', BF16, 197, 64, False, 'xla'),
    ('METAL', BF16, 197, 64, False, 'xla'),
])
def test_auto_picks_per_backend_and_dtype(backend, dtype, seq, head_dim, bias, want):
    assert A.choose_impl(backend, dtype, seq, head_dim, has_bias=bias, has_mask=bias) == A.Choice(want)


@pytest.mark.parametrize('backend,head_dim,why', [
    ('gpu', 12, 'cuDNN attention takes a head dim <= 128 and a multiple of 8, not 12'),
    ('gpu', 160, 'cuDNN attention takes a head dim <= 128 and a multiple of 8, not 160'),
    ('tpu', 192, 'the Pallas flash kernel takes a head dim <= 128 or a multiple of it, not 192'),
])
def test_auto_falls_back_to_xla_where_the_kernel_cannot_take_the_case(backend, head_dim, why):
    assert A.choose_impl(backend, BF16, 1370, head_dim) == A.Choice('xla', why)


def test_auto_fallback_warns_once_per_case_and_still_computes_the_formula(monkeypatch):
    monkeypatch.setattr(A, '_warned', set())
    q, k, v = qkv((2, 3, 13, 12), BF16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        outs = [A.dot_product_attention(q, k, v, backend='gpu') for _ in range(3)]   # faked: xla runs on CPU
    assert [str(w.message) for w in caught] == [
        "attention: cuDNN attention takes a head dim <= 128 and a multiple of 8, not 12; using 'xla'"]
    assert rel_err(outs[0], A.dot_product_attention(q, k, v, impl='manual_grad')) < 1e-2


@pytest.mark.parametrize('impl,backend,dtype,message', [
    ('cudnn', 'cpu', BF16, "attn_impl='cudnn': cuDNN attention runs on a CUDA GPU, not on backend 'cpu'"),
    ('cudnn', 'gpu', F32, "attn_impl='cudnn': cuDNN attention takes bf16/fp16 operands, not float32"),
    ('pallas', 'gpu', BF16, "attn_impl='pallas': the Pallas flash kernel runs on a TPU, not on backend 'gpu'"),
])
def test_an_explicit_kernel_that_cannot_run_is_a_config_error(impl, backend, dtype, message):
    with pytest.raises(ModelConfigError, match=f'^{message}$'.replace('(', r'\(').replace(')', r'\)')):
        A.choose_impl(backend, dtype, 197, 64, impl=impl)


def test_attention_dropout_runs_the_plain_formula_whatever_the_impl():
    for impl in ('auto', 'manual_grad', 'autodiff'):
        assert A.choose_impl('gpu', BF16, 197, 64, has_dropout=True, impl=impl) == A.Choice('autodiff')
    choice = A.choose_impl('gpu', BF16, 197, 64, has_dropout=True, impl='cudnn')
    assert choice.impl == 'autodiff' and 'applies no attention dropout' in choice.fallback


def test_old_names_map_to_the_kernels_they_named_with_a_deprecation_warning(monkeypatch):
    monkeypatch.setattr(A, '_warned', set())
    for old, new in (('fused', 'manual_grad'), ('reference', 'manual_grad'), ('plain', 'autodiff')):
        with pytest.warns(DeprecationWarning, match=f"attn_impl={old!r} is deprecated: it is {new!r}"):
            assert A.check_impl(old) == new
        assert A.choose_impl('cpu', F32, 5, 8, impl=old) == A.Choice(new)
    assert A.choose_impl('cpu', F32, 5, 8) == A.Choice('manual_grad')
    with pytest.raises(ModelConfigError, match="got 'flash'$"):
        A.check_impl('flash')


def test_bf16_policy_table_native_operands_on_accelerators_and_cpus_with_bf16_dots():
    from vit_flax.ops import matmul as mm
    gpu, tpu, cpu_bf16, cpu = (mm.bf16_policy(*a) for a in (('gpu',), ('tpu',), ('cpu', True), ('cpu', False)))
    assert [r['matmul'] for r in (gpu, tpu, cpu_bf16, cpu)] == ['native', 'native', 'native', 'float32']
    assert all(r['accumulate'] == r['softmax'] == r['residual'] == r['norms'] == 'float32'
               for r in (gpu, tpu, cpu_bf16, cpu))
    assert gpu['attention'] == A.choose_impl('gpu', BF16, 197, 64).impl
    assert cpu['attention'] == cpu_bf16['attention'] == A.choose_impl('cpu', BF16, 197, 64).impl


# ---------------------------------------------------------------- whole models: 'xla' against 'manual_grad'

MODELS = [
    # 9 tokens (an odd count), and the MAP head's cross-attention: 1 probe query against 9 keys
    ('vit_tiny_patch16_224', dict(img_size=24, patch_size=8, depth=2, global_pool='map', class_token=False)),
    ('swin_tiny_patch4_window7_224', dict(img_size=32, depths=(2,), num_heads=(3,), window_size=4)),   # shifted
]


@pytest.mark.parametrize('name,kw', MODELS)
def test_whole_model_with_xla_attention_equals_reference(name, kw):
    """Same parameter tree, the same loss and gradients to float32 rounding: ViT (odd token count, the MAP
    head's cross-attention) and Swin (relative position bias, shifted-window mask)."""
    ref, xla = (vit_flax.create_model(name, attn_impl=impl, num_classes=5, **kw) for impl in ('manual_grad', 'xla'))
    params = perturb(ref)
    assert jax.tree_util.tree_structure(vit_flax.summary.param_shapes(xla)) == jax.tree_util.tree_structure(params)
    x = images((2,) + ref.input_shape)
    run = lambda m: jax.jit(jax.value_and_grad(lambda p: (m.apply({'params': p}, x) ** 2).mean()))(params)
    (l1, g1), (l2, g2) = run(ref), run(xla)
    assert rel_err(l2, l1) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(g1)):   # some leaves' are ~1e-9
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('bias_rows', [None, 1, 'all'])
def test_more_than_256_queries_run_as_two_halves_on_cpu_with_the_same_values_and_gradients(monkeypatch, dtype,
                                                                                            bias_rows):
    # XLA:CPU runs the fused q k^T / softmax / p v of more than 256 queries on one thread at ~2.4x the CPU time;
    # 'manual_grad' then attends over each half of the queries in inference. Values are the whole kernel's bit for
    # bit, derivatives come from the whole kernel's rules (gradients and forward mode unchanged).
    q, k, v = qkv((1, 2, 261, 8), dtype)
    bias = None if bias_rows is None else jnp.asarray(
        np.random.default_rng(3).standard_normal((2, 261 if bias_rows == 'all' else 1, 261)), jnp.float32)
    def run():   # a new function each time: jit's trace cache does not see the module flag
        attend = lambda q, k, v, bias=None: A.dot_product_attention(q, k, v, bias, impl='manual_grad')  # noqa: E731
        dots = jax.jit(attend).lower(q, k, v, bias).as_text().count('stablehlo.dot_general')
        return jax.jit(attend)(q, k, v, bias), loss_and_grads(attend, q, k, v, bias), dots, attend
    monkeypatch.setattr(A, 'CPU_QUERY_SPLIT_ABOVE', None)
    whole, whole_grads, whole_dots, _ = run()
    monkeypatch.setattr(A, 'CPU_QUERY_SPLIT_ABOVE', 256)
    got, got_grads, got_dots, attend = run()
    assert (whole_dots, got_dots) == (2, 4)   # lowered for the CPU: one q k^T and p v, or two of each
    assert got.dtype == dtype and np.array_equal(np.asarray(got, np.float32), np.asarray(whole, np.float32))
    for a, b in zip(got_grads, whole_grads):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    if dtype == jnp.float32:   # forward mode through the custom JVP still works
        t = jax.jvp(lambda q: attend(q, k, v, bias), (q,), (jnp.ones_like(q),))[1]
        assert t.shape == q.shape and bool(jnp.isfinite(t).all())
    # 256 queries or fewer: one kernel, as before
    q2, k2, v2 = qkv((1, 2, 256, 8), dtype)
    assert jax.jit(attend).lower(q2, k2, v2, None).as_text().count('stablehlo.dot_general') == 2
