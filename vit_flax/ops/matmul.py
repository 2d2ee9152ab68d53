"""The matmul of every model (`matmul`), and the bf16 matmul policy that picks its low-precision kernel.

Float32 operands take XLA's plain dot (the reference). Low-precision (bf16) operands take the fast path,
`_low_precision_einsum`: float32 accumulation, one rounding, and a custom VJP that rounds the cotangent to
bf16 (as autocast's backward does), so that each gradient is again a product of two bf16 operands
accumulated in float32 (its reference: JAX's autodiff of the same forward). The policy picks its kernel:
'native' keeps the operands bf16 in the forward AND the backward pass (no mixed f32 x bf16 dot), the
default where the hardware has bf16 dot instructions (GPU, TPU, x86 with AMX or AVX512_BF16, ARM with
BF16); 'float32' widens them to float32 first (the same products and float32 accumulation, on XLA:CPU's
faster float32 GEMM), the default on a CPU without them (AVX2 only: XLA's bf16 GEMM converts tile by
tile and runs slower than its float32 GEMM). On the native path every product is written as a dot that
XLA:CPU keeps in bf16 (`_gemm_einsum`: the lhs contracted on its last axes, a row-major copy where a
transpose is needed): any other bf16 dot XLA:CPU widens to float32 on converted copies of both operands,
which is what the weight gradients and attention's backward products did (benchmarks/README.md).

The bf16 policy per backend, in one table (`BF16_POLICY`; `bf16_policy(backend)` gives a row, the bench
prints it). Everything not named a matmul operand is what timm keeps under torch.autocast(bfloat16):

| backend                                 | matmul operands         | attention ('auto')             |
|-----------------------------------------|-------------------------|--------------------------------|
| GPU (CUDA)                              | bf16 ('native')         | 'cudnn' (fused kernel)         |
| TPU                                     | bf16 ('native')         | 'splash' (N >= 512), else 'xla' |
| CPU with bf16 dots (AMX, AVX512_BF16, ARM BF16) | bf16 ('native') | 'manual_grad'                  |
| CPU without them (AVX2 only)            | widened to float32 ('float32') | 'manual_grad'           |

On every backend: float32 accumulation of every matmul (one rounding of its output), logits, bias and
softmax in float32, the residual stream in float32 (timm's is: its float32 position embedding promotes it),
norms, GELU and the position embedding computed in float32, each rounding its output to the compute dtype
where a matmul reads it (branch activations are bf16 between matmuls).

`policy()` resolves it once, at first use, from the environment variable VIT_FLAX_BF16_MATMUL
(native|float32; read once, at that first use, never again), else the backend and /proc/cpuinfo, and
caches it. `set_policy(value)` overrides it explicitly (None: back to the resolved default);
`using_policy(value)` does so for a `with` block. It is read while tracing: a function jitted before a
change keeps the kernel it was traced with.
"""
import contextlib
import functools
import os
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp

BF16_MATMUL_ENV = 'VIT_FLAX_BF16_MATMUL'
POLICIES = ('native', 'float32')
_BF16_CPU_FLAGS = {'avx512_bf16', 'amx_bf16', 'bf16'}  # x86 (AVX512_BF16, AMX) and aarch64 (FEAT_BF16)
_override: Optional[str] = None


def _check(value: str, source: str) -> str:
    if value not in POLICIES:
        raise ValueError(f'{source} must be native or float32, got {value!r}')
    return value


@functools.lru_cache(maxsize=None)
def _cpu_has_bf16() -> Optional[bool]:
    try:
        with open('/proc/cpuinfo') as f:
            lines = [l for l in f if l.startswith(('flags', 'Features'))]
    except OSError:
        return None
    return bool(lines) and bool(_BF16_CPU_FLAGS & set(lines[0].split(':', 1)[-1].split()))


BF16_POLICY = {   # the table above; attention's 'auto' choice is ops/attention.choose_impl's
    'gpu': dict(matmul='native', accumulate='float32', attention='cudnn', softmax='float32', residual='float32',
                norms='float32'),
    'tpu': dict(matmul='native', accumulate='float32', attention='pallas (N >= 512) / xla', softmax='float32',
                residual='float32', norms='float32'),
    'cpu-bf16': dict(matmul='native', accumulate='float32', attention='manual_grad', softmax='float32',
                     residual='float32', norms='float32'),
    'cpu': dict(matmul='float32', accumulate='float32', attention='manual_grad', softmax='float32',
                residual='float32', norms='float32'),
}


def bf16_policy(backend: str, cpu_has_bf16: Optional[bool] = None) -> dict:
    """The BF16_POLICY row for `backend` ('cpu', 'gpu'/'cuda', 'tpu'; others take the GPU row);
    `cpu_has_bf16` (default: read /proc/cpuinfo; unreadable counts as having them) picks the CPU row."""
    backend = backend.lower()
    if backend == 'cpu':
        has = _cpu_has_bf16() if cpu_has_bf16 is None else cpu_has_bf16
        return BF16_POLICY['cpu' if has is False else 'cpu-bf16']
    return BF16_POLICY['tpu' if backend == 'tpu' else 'gpu']


@functools.lru_cache(maxsize=None)
def _resolved() -> str:
    forced = os.environ.get(BF16_MATMUL_ENV, '').lower()
    if forced:
        return _check(forced, BF16_MATMUL_ENV)
    return bf16_policy(jax.default_backend())['matmul']


def policy() -> str:
    """'native' or 'float32': the explicit `set_policy` value, else the one resolved at first use."""
    return _override if _override is not None else _resolved()


def set_policy(value: Optional[str]) -> None:
    """Use `value` ('native' | 'float32') from now on; None goes back to the resolved default."""
    global _override
    _override = None if value is None else _check(value, 'the bf16 matmul policy')


@contextlib.contextmanager
def using_policy(value: Optional[str]):
    """`set_policy(value)` for the duration of a `with` block, then the previous setting again."""
    previous = _override
    set_policy(value)
    try:
        yield
    finally:
        set_policy(previous)


def _expand(spec: str, a, b):
    """(lhs, rhs, out) index strings of a two-operand einsum, '...' replaced by letters of their own."""
    ins, out = spec.split('->')
    sa, sb = ins.split(',')
    if '...' in spec:
        spare = [c for c in 'ABCDEFGHIJKLMNOPQRSTUVWXYZ' if c not in spec]
        n = max(a.ndim - len(sa.replace('...', '')), b.ndim - len(sb.replace('...', '')))
        lead = ''.join(spare[:n])
        fill = lambda s, nd: s.replace('...', lead[n - (nd - len(s.replace('...', ''))):])
        sa, sb, out = fill(sa, a.ndim), fill(sb, b.ndim), out.replace('...', lead)
    return sa, sb, out


def _lhs_ready(s: str, batch: str, contract: str) -> bool:
    """An operand whose batch axes lead and whose contracted axes trail: the lhs a GEMM library reads as
    (batch, rows, k) without a transposed copy."""
    return set(s[:len(batch)]) == set(batch) and set(s[len(s) - len(contract):]) == set(contract)


def row_major(t):
    """`t` (a transpose) as a row-major copy that XLA cannot fold back into the dot that reads it: a
    transpose is converted to HLO as a layout change (a column-major view), and XLA:CPU widens a bf16 dot
    whose operand is column-major; flattened, it must be written out row-major, and the barrier keeps the
    flatten and the reshape back from cancelling.

    XLA:CPU only: lowered for any other platform (a TPU, deviceless here too, or a GPU) it is the identity.
    There the flatten of a batch-sharded operand cannot keep its sharding through the barrier, so GSPMD
    all-gathered every weight gradient's activation over the data axis (108 all-gathers in a ViT-B/16
    step on v5e:2x2; the remat step at 256 per chip needed >= 16.5 GiB instead of 6.3, docs/XLA.md)."""
    return jax.lax.platform_dependent(
        t, cpu=lambda v: jax.lax.optimization_barrier(v.reshape(-1)).reshape(v.shape), default=lambda v: v)


def _gemm_einsum(spec: str, a, b):
    """jnp.einsum(spec, a, b) accumulated in float32 as ONE dot whose lhs has its contracted axes last
    (jnp.einsum picks its own operand order, so the dot is written out here).

    A weight gradient (md,me->de) or attention's dV and dK (...qk,...qd->...kd) contract the leading axis of
    both operands. XLA:CPU hands bf16 dots to its bf16 GEMM (YNNPACK) only with the lhs contracted on its
    last axes (the rhs may be either way round); any other bf16 dot it widens: both operands converted to
    float32 and multiplied at the float32 rate. Here the operand that already has that layout is the lhs;
    if neither has, the smaller one is transposed (one bf16 copy, half the bytes of one widening) and
    becomes the lhs. The same products, each exact in float32, accumulated in float32."""
    sa, sb, out = _expand(spec, a, b)
    batch = ''.join(c for c in sa if c in sb and c in out)
    contract = ''.join(c for c in sa if c in sb and c not in out)
    if not contract or any(a.shape[sa.index(c)] != b.shape[sb.index(c)] for c in batch):
        # an outer product, or batch axes broadcast against each other: einsum's own lowering
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
    if _lhs_ready(sa, batch, contract):
        (sl, lhs), (sr, rhs) = (sa, a), (sb, b)
    elif _lhs_ready(sb, batch, contract):
        (sl, lhs), (sr, rhs) = (sb, b), (sa, a)
    else:
        (sl, lhs), (sr, rhs) = ((sa, a), (sb, b)) if a.size <= b.size else ((sb, b), (sa, a))
        order = batch + ''.join(c for c in sl if c not in batch and c not in contract) + contract
        lhs, sl = row_major(jnp.transpose(lhs, [sl.index(c) for c in order])), order
    free_l = ''.join(c for c in sl if c not in batch and c not in contract)
    free_r = ''.join(c for c in sr if c not in batch and c not in contract)
    dims = (([sl.index(c) for c in contract], [sr.index(c) for c in contract]),
            ([sl.index(c) for c in batch], [sr.index(c) for c in batch]))
    y = jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)
    got = batch + free_l + free_r
    if got == out:
        return y
    # (the barrier keeps XLA from turning transpose(dot(l, r)) back into dot(r, l) with r non-canonical)
    return jnp.transpose(jax.lax.optimization_barrier(y), [got.index(c) for c in out])


@partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _low_precision_einsum(spec, a, b, out_dtype, widen):
    if widen:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)
    return _gemm_einsum(spec, a, b).astype(out_dtype)


def _low_precision_einsum_fwd(spec, a, b, out_dtype, widen):
    return _low_precision_einsum(spec, a, b, out_dtype, widen), (a, b)


def _low_precision_einsum_bwd(spec, out_dtype, widen, res, ct):
    # The cotangent is rounded to the operands' dtype (as autocast's backward does) and each gradient is a
    # product of two low-precision operands accumulated in float32, whichever kernel runs it.
    a, b = res
    (sa, sb), so = spec.split('->')[0].split(','), spec.split('->')[1]
    ct = ct.astype(a.dtype)
    return (_low_precision_einsum(f'{so},{sb}->{sa}', ct, b, a.dtype, widen),
            _low_precision_einsum(f'{sa},{so}->{sb}', a, ct, b.dtype, widen))


_low_precision_einsum.defvjp(_low_precision_einsum_fwd, _low_precision_einsum_bwd)


def matmul(spec: str, a, b, out_dtype=None):
    """`jnp.einsum(spec, a, b)` accumulated in float32, returned in `out_dtype` (default: the operands').

    `spec` names every index of an operand in the other operand or in the output (no traces or sums
    over one operand), so that its gradients are einsums of the same kind.
    """
    dtype = jnp.result_type(a, b)
    out_dtype = dtype if out_dtype is None else out_dtype
    if jnp.finfo(dtype).bits >= 32:
        return jnp.einsum(spec, a, b, preferred_element_type=dtype).astype(out_dtype)
    return _low_precision_einsum(spec, a.astype(dtype), b.astype(dtype), out_dtype, policy() == 'float32')
