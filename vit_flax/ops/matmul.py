"""The matmul of every model (`matmul`), and the bf16 matmul policy that picks its low-precision kernel.

Float32 operands take XLA's plain dot (the reference). Low-precision (bf16) operands take the fast path,
`_low_precision_einsum`: float32 accumulation, one rounding, and a custom VJP that rounds the cotangent to
bf16 (as autocast's backward does), so that each gradient is again a product of two bf16 operands
accumulated in float32 (its reference: JAX's autodiff of the same forward). The policy picks its kernel:
'native' keeps the operands bf16 in the forward AND the backward pass (no mixed f32 x bf16 dot), the
default where the hardware has bf16 dot instructions (GPU, TPU, x86 with AMX or AVX512_BF16, ARM with
BF16); 'float32' widens them to float32 first (the same products and float32 accumulation, on XLA:CPU's
faster float32 GEMM), the default on a CPU without them (AVX2 only: XLA's bf16 GEMM converts tile by
tile and runs slower than its float32 GEMM).

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


@partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _low_precision_einsum(spec, a, b, out_dtype, widen):
    if widen:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(out_dtype)


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
