"""benchmarks/hlo_breakdown.py groups what XLA compiled by kind: one tiny program per kind, compiled here, lands in
its group with the right count, bytes and (for a dot) operand dtypes and FLOPs."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('hlo_breakdown', os.path.join(ROOT, 'benchmarks', 'hlo_breakdown.py'))
hb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hb)

X = jax.ShapeDtypeStruct((64, 128), jnp.float32)


def groups(fn, *specs):
    text = jax.jit(fn).lower(*specs).compile().as_text()
    return {g: r for g, r in hb.breakdown(text)['groups'].items() if r['count']}


def test_a_dot_is_counted_with_its_operand_dtypes_and_flops():
    w = jax.ShapeDtypeStruct((128, 256), jnp.float32)
    got = groups(lambda x, w: jnp.dot(x, w), X, w)
    assert set(got) == {'dot'} and got['dot']['count'] == 1
    assert got['dot']['flops'] == 2 * 64 * 256 * 128
    assert list(got['dot']['detail']) == ['f32 x f32 -> f32']
    assert got['dot']['bytes'] == 4 * (64 * 128 + 128 * 256 + 64 * 256)   # operands read + output written


@pytest.mark.parametrize('fn,group,detail', [
    (lambda x: x.astype(jnp.bfloat16), 'convert', 'f32 -> bf16'),
    (lambda x: jnp.transpose(x) + 0, 'transpose', None),
    (lambda x: jnp.exp(x) * 2, 'elementwise', 'f32'),
    (lambda x: x.sum(1), 'reduction', 'f32'),
])
def test_each_kind_lands_in_its_group(fn, group, detail):
    got = groups(fn, X)
    assert list(got) == [group], got
    if detail:
        assert list(got[group]['detail']) == [detail]


def test_shape_bytes_reads_arrays_and_tuples():
    assert hb.shape_bytes('f32[16,197,384]{2,1,0}') == 16 * 197 * 384 * 4
    assert hb.shape_bytes('(bf16[2,3]{1,0}, s32[])') == 2 * 3 * 2 + 4


@pytest.mark.xla_passes
def test_every_dot_is_found_inside_its_fusion_with_its_shapes_and_timed_alone():
    # a batched bf16 attention product and a plain projection, each inside XLA:CPU's fusions with other ops
    q = jax.ShapeDtypeStruct((2, 3, 16, 8), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((8, 24), jnp.bfloat16)

    def fn(q, w):
        s = jnp.einsum('bhnd,bhmd->bhnm', q, q, preferred_element_type=jnp.float32)
        y = jnp.dot(q.reshape(-1, 8), w, preferred_element_type=jnp.float32)
        return jax.nn.softmax(s).sum() + jnp.tanh(y).sum()
    text = jax.jit(fn).lower(q, w).compile().as_text()
    assert 'fusion' in text
    dots = hb.dot_shapes(text)
    assert dict(dots) == {
        ('bf16', (2, 3, 16, 8), 'bf16', (2, 3, 16, 8), 'f32', (((3,), (3,)), ((0, 1), (0, 1)))): 1,
        ('bf16', (96, 8), 'bf16', (8, 24), 'f32', (((1,), (0,)), ((), ()))): 1}, dots
    rows = hb.time_dots(text, repeats=2)
    assert sorted(fl for _, _, _, fl in rows) == sorted([2 * 96 * 24 * 8, 2 * 2 * 3 * 16 * 16 * 8])
    assert all(n == 1 and ms > 0 for n, _, ms, _ in rows)
    assert '2 dots, 0.0 GFLOP' in hb.render_dots(rows)
