"""attn_impl='splash' (jax's Pallas splash attention, ops/attention.py): equal to 'manual_grad' in values and
gradients when the Pallas interpreter runs the kernel on CPU (padded sequences included), chosen by 'auto' on a
TPU where no bias or mask is given, and compiled for v5e and v6e without a TPU (skipped without libtpu)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_flax.errors import ModelConfigError
from vit_flax.ops import attention as A

from helpers import rel_err

pytest.importorskip('jax.experimental.pallas.ops.tpu.splash_attention')


def qkv(shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(3))


def loss_and_grads(fn, q, k, v):
    ct = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape[:-1] + v.shape[-1:]), jnp.float32)
    f = lambda *a: (fn(*a).astype(jnp.float32) * ct).sum()  # noqa: E731
    value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
    return (value,) + grads


@pytest.mark.parametrize('shape,dtype,tol', [
    ((2, 3, 13, 8), jnp.float32, 1e-5),      # one 128 block, 115 padded keys masked by segment ids
    ((1, 2, 197, 64), jnp.float32, 1e-5),    # ViT-B/16's 197 tokens: two blocks, the second mostly padding
    ((1, 2, 197, 64), jnp.bfloat16, 2e-2),
])
def test_splash_in_interpret_mode_equals_reference_values_and_gradients(shape, dtype, tol):
    q, k, v = qkv(shape, dtype)
    scale = shape[-1] ** -0.5
    want = loss_and_grads(lambda *a: A.dot_product_attention(*a, scale=scale, impl='manual_grad'), q, k, v)
    got = loss_and_grads(lambda *a: A.splash_attention(*a, scale=scale, interpret=True), q, k, v)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert rel_err(g, w) < tol, rel_err(g, w)


def test_padded_keys_are_masked_not_attended():
    q, k, v = qkv((1, 1, 13, 8))
    got = A.splash_attention(q, k, v, interpret=True)
    # with the padding attended, each row would also weigh 115 zero keys (logit 0) and their zero values
    probs = jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k), -1)
    assert rel_err(got, jnp.einsum('bhqk,bhkd->bhqd', probs, v)) < 1e-5


def test_dot_product_attention_runs_splash_for_a_tpu_and_interprets_it_on_cpu():
    q, k, v = qkv((2, 2, 9, 16))
    got = A.dot_product_attention(q, k, v, impl='splash', backend='tpu')
    assert rel_err(got, A.dot_product_attention(q, k, v, impl='manual_grad')) < 1e-5


def test_auto_on_tpu_takes_splash_without_a_bias_and_the_flash_kernel_with_one():
    assert A.choose_impl('tpu', jnp.bfloat16, 1370, 64) == A.Choice('splash')
    assert A.choose_impl('tpu', jnp.bfloat16, 1370, 64, has_bias=True) == A.Choice('pallas')
    assert A.choose_impl('tpu', jnp.bfloat16, 197, 64) == A.Choice('xla')   # shorter than PALLAS_MIN_SEQ


@pytest.mark.parametrize('backend,bias,says', [
    ('cpu', False, "splash attention runs on a TPU, not on backend 'cpu'"),
    ('tpu', True, 'splash attention takes no additive bias or mask'),
])
def test_an_explicit_splash_that_cannot_run_is_a_config_error(backend, bias, says):
    with pytest.raises(ModelConfigError, match=says):
        A.choose_impl(backend, jnp.bfloat16, 1370, 64, has_bias=bias, impl='splash')


@pytest.mark.parametrize('target', ['tpu:v5e:2x2', 'tpu:v6e:2x2'])
def test_a_vit_with_splash_compiles_for_v5e_and_v6e_without_a_tpu(target, tmp_path):
    from vit_train import config, plan
    if not plan.have_libtpu():
        pytest.skip("needs libtpu: pip install 'vit-flax-tools[tpu]' (make test-tpu)")
    plan.quiet_libtpu_env()
    # 96 px, 4 px patches: 577 tokens (>= PALLAS_MIN_SEQ, so 'auto' would pick splash too), padded to 640
    args = config.resolve(config.from_python(dict(model='vit_tiny_patch16_224', batch_size=8, dtype='bfloat16',
                                                  workdir='/tmp/vit-flax-splash-test-unused')))
    extra = dict(img_size=96, patch_size=4, depth=1, embed_dim=128, num_heads=2, attn_impl='auto')
    for train in (False, True):
        # at jax's default precision, as a run: under the suite's 'highest' (tests/conftest.py) Mosaic refuses the
        # bf16 backward kernels ('Bad lhs type': fp32 contraction of bf16 operands), a known limitation
        with jax.default_matmul_precision('default'):
            p = plan.plan(args, target, 10, train=train, extra=extra, dump=str(tmp_path / str(train)))
        assert p['fits']
        hlo = open(os.path.join(tmp_path, str(train), 'optimized_hlo.txt')).read()
        assert 'tpu_custom_call' in hlo   # the Pallas (Mosaic) kernels, not XLA's attention
        # Pallas kernels carry no cost: XLA's count falls short of the analytic one by the attention matmuls
        assert p['flops'] < p['model_flops']
