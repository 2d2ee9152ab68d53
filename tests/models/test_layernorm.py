"""models.layers.LayerNorm against flax's nn.LayerNorm (the reference it replaces): the same tree, the same values bit
for bit, the same gradients; its low-precision path (ops.layernorm, a custom VJP) leaves no activation-sized
broadcast of the scale in a compiled backward, and float32 keeps flax's own code (forward mode)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import perturb
from vit_flax.models.layers import LayerNorm
from vit_flax.ops import layernorm as layernorm_op


def _perturbed(module, x, seed=1):
    """The module's init moved off it (scales off 1, biases off 0) by helpers.perturb."""
    return perturb(module.init(jax.random.PRNGKey(0), x), seed=seed, scale=0.3)


def _value_and_grads(module, params, x, w):
    loss = lambda p, x: jnp.sum(module.apply(p, x).astype(jnp.float32) * w)   # noqa: E731
    return jax.jit(lambda p, x: (module.apply(p, x), jax.grad(loss, (0, 1))(p, x)))(params, x)


@pytest.mark.parametrize('shape', [(5, 96), (2, 7, 96), (2, 3, 5, 40)])
@pytest.mark.parametrize('x_dtype', [jnp.float32, jnp.bfloat16])
def test_bf16_layernorm_gives_flax_values_bit_for_bit_and_its_gradients(shape, x_dtype):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 1, x_dtype)
    w = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ref, ours = nn.LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16), LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)
    params = _perturbed(ref, x)
    assert jax.tree.structure(ours.init(jax.random.PRNGKey(0), x)) == jax.tree.structure(params)
    (y_ref, g_ref), (y, g) = _value_and_grads(ref, params, x, w), _value_and_grads(ours, params, x, w)
    assert y.dtype == y_ref.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    (gp_ref, gx_ref), (gp, gx) = g_ref, g
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gp_ref)):   # float32 gradients of the float32 params
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=5e-7 * float(np.abs(b).max()))
    gx, gx_ref = np.asarray(gx, np.float32), np.asarray(gx_ref, np.float32)
    # the input's gradient in x's dtype: float32 to ~1e-7 of its largest, a bf16 one to its last bit
    tol = 5e-7 if x_dtype == jnp.float32 else 2 ** -7
    np.testing.assert_allclose(gx, gx_ref, rtol=0, atol=tol * float(np.abs(gx_ref).max()))


def test_float32_layernorm_is_flax_own_and_keeps_forward_mode():
    x = jnp.asarray(np.random.RandomState(0).standard_normal((3, 8, 32)), jnp.float32)
    ref, ours = nn.LayerNorm(epsilon=1e-5), LayerNorm(epsilon=1e-5)
    params = _perturbed(ref, x)
    t = jnp.ones_like(x)
    out, tan = jax.jvp(lambda x: ours.apply(params, x), (x,), (t,))
    want_out, want_tan = jax.jvp(lambda x: ref.apply(params, x), (x,), (t,))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(want_out))
    np.testing.assert_array_equal(np.asarray(tan), np.asarray(want_tan))


def test_a_layernorm_other_than_the_plain_one_runs_flax_code():
    x = jnp.asarray(np.random.RandomState(0).standard_normal((2, 6, 16)), jnp.float32)
    for kw in (dict(use_bias=False), dict(reduction_axes=(-2, -1), feature_axes=-1), dict(use_fast_variance=False)):
        ref, ours = nn.LayerNorm(dtype=jnp.bfloat16, **kw), LayerNorm(dtype=jnp.bfloat16, **kw)
        params = _perturbed(ref, x)
        jaxpr = str(jax.make_jaxpr(lambda p, x: ours.apply(p, x))(params, x))
        assert 'custom_vjp' not in jaxpr, kw   # (the plain one's forward shows its custom_vjp_call: the next test)
        np.testing.assert_array_equal(np.asarray(ours.apply(params, x), np.float32),
                                      np.asarray(ref.apply(params, x), np.float32))


def _scale_broadcasts(enabled: bool) -> int:
    """Broadcasts of a (D,) vector to the (B, N, D) activation in the compiled bf16 backward of two stacked norms."""
    x = jnp.asarray(np.random.RandomState(0).standard_normal((4, 50, 64)), jnp.float32)

    class Two(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = LayerNorm(dtype=jnp.bfloat16)(x).astype(jnp.float32)
            return LayerNorm(dtype=jnp.bfloat16)(x + jnp.tanh(h)).astype(jnp.float32)
    model = Two()
    params = _perturbed(model, x)
    saved, layernorm_op.ENABLED = layernorm_op.ENABLED, enabled
    try:
        grad = jax.jit(jax.grad(lambda p, x: jnp.sum(model.apply(p, x) ** 2), (0, 1)))
        text = grad.lower(params, x).compile().as_text()
    finally:
        layernorm_op.ENABLED = saved
    entry = text[text.index('\nENTRY'):]   # top-level instructions: arrays the program writes to memory
    return len(re.findall(r'= f32\[4,50,64\]\{[^}]*\} (?:broadcast\(|fusion\([^)]*\), kind=kLoop, '
                          r'calls=%wrapped_broadcast)', entry))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="XLA:CPU's fusion of the backward's reductions")
def test_bf16_backward_writes_no_activation_sized_broadcast_of_the_scale():
    assert _scale_broadcasts(enabled=False) > 0    # JAX's derivative of flax's formula on XLA:CPU
    assert _scale_broadcasts(enabled=True) == 0


def test_a_program_for_a_tpu_keeps_flax_layernorm():
    """The fast path is for XLA:CPU only: traced for a TPU (a deviceless compile from this host sets the target),
    a bf16 LayerNorm is flax's, whose derivative TPU fusions take without writing the broadcast."""
    from vit_flax.ops.attention import target_backend
    x = jnp.asarray(np.random.RandomState(0).standard_normal((2, 6, 16)), jnp.float32)
    ours = LayerNorm(dtype=jnp.bfloat16)
    params = _perturbed(nn.LayerNorm(dtype=jnp.bfloat16), x)
    trace = lambda: str(jax.make_jaxpr(lambda p: ours.apply(p, x))(params))  # noqa: E731
    with target_backend('tpu'):
        assert 'custom_vjp' not in trace()
    assert 'custom_vjp' in trace()
