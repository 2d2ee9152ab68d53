"""softmax(q k^T + bias) v: one entry point (`dot_product_attention`), named implementations per backend.

Every model takes the field `attn_impl` and passes it here as `impl`. The implementations:

| impl        | what runs                                                        | bias/mask | where it can run          |
|-------------|------------------------------------------------------------------|-----------|---------------------------|
| 'manual_grad' | the formula, hand-written derivatives (below);                 | yes       | anywhere (CPU's default)  |
|             | 'autodiff' under active attention dropout                        |           |                           |
| 'autodiff'  | the formula, JAX autodiff; the only path that applies dropout    | yes       | anywhere                  |
| 'xla'       | jax.nn.dot_product_attention(implementation='xla')               | yes       | anywhere                  |
| 'cudnn'     | jax.nn.dot_product_attention(implementation='cudnn'): cuDNN's    | yes       | CUDA GPU, bf16/fp16,      |
|             | fused (flash) kernel; sequences padded to an even length when a  |           | head dim <= 128, % 8 == 0 |
|             | bias is given (cuDNN's rule for a bias in training), padded keys |           |                           |
|             | masked through key_value_seq_lengths, padded queries dropped     |           |                           |
| 'pallas'    | jax.experimental.pallas.ops.tpu.flash_attention (it takes an     | yes       | TPU; head dim <= 128 or   |
|             | additive bias, splash attention does not), sequences padded to   |           | a multiple of 128         |
|             | its 128 block, padded keys masked through segment ids            |           |                           |
| 'splash'    | jax.experimental.pallas.ops.tpu.splash_attention (block-sparse   | no        | TPU; head dim as 'pallas' |
|             | flash attention, vmapped over the batch): q pre-scaled, sequences|           |                           |
|             | padded to its 128 block, padded keys masked by segment ids       |           |                           |
| 'auto'      | `choose_impl`: CPU 'manual_grad' (exactly what ran before 'auto' |           |                           |
|             | existed), GPU 'cudnn' for bf16/fp16 (else 'xla'), TPU for        |           |                           |
|             | sequences >= PALLAS_MIN_SEQ 'splash' (with a bias or mask:       |           |                           |
|             | 'pallas', which takes one), shorter 'xla'; other backends 'xla'  |           |                           |

Old names, accepted with a DeprecationWarning for one release: 'reference' and 'fused' (its name until 'auto')
are 'manual_grad', the same kernel; 'plain' is 'autodiff'. The two agree to float32 rounding in values and
gradients (tests/models/test_fast_paths.py), so a config that says an old name computes what it did.

'auto' falls back, with one warning per distinct case and process, where its backend's kernel cannot take
the case (a head dim cuDNN or the Pallas kernel does not take); an explicit 'cudnn' or 'pallas' that cannot
take the case is a ModelConfigError naming why. With attention dropout active (training, nonzero rate) every
impl runs 'autodiff' (warning once for 'xla', 'cudnn', 'pallas': their kernels apply no dropout).

Lowered for XLA:CPU, 'manual_grad' attends over two halves of the queries when there are more than
CPU_QUERY_SPLIT_ABOVE (256) of them and nothing differentiates it (inference): the same values, ~1.36x the
speed of a bf16 DINOv3 ViT-B/16 forward (261 tokens); `_query_halves` says why.

Shapes: q (..., Nq, Dh), k and v (..., Nk, Dh) with the same leading dims (batch, then heads or
windows x heads: Swin passes (B, nW, heads, N, Dh)); `bias` float, broadcastable to (..., Nq, Nk), added
to the float32 logits (Swin's relative position bias plus its -100 shift mask); `mask` bool, broadcastable
likewise, True where a key is attended. `scale` None means q is already scaled (the models scale q
before the product, as timm does); else the logits are multiplied by it. The kernels see the leading dims
as (first, product of the rest): batch and "heads", so a bias broadcast over the batch stays broadcast.

Numerics (the bf16 policy for attention, see ops/matmul.py for the matmul's): operands in the compute
dtype (bf16 under bf16), both products accumulated in float32, logits, bias and softmax in float32 (as
timm's SDPA under autocast), the probabilities rounded to v's dtype for the second product; the output
in v's dtype. cuDNN adds the bias in the compute dtype (jax rounds it to q's dtype), the one difference.
"""
import contextlib
import contextvars
import math
import warnings
from typing import Callable, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from .matmul import matmul, row_major

ATTN_IMPLS = ('auto', 'manual_grad', 'autodiff', 'xla', 'cudnn', 'pallas', 'splash')
# old names (module docstring): accepted, with a DeprecationWarning, for one release
ALIASES = {'reference': 'manual_grad', 'fused': 'manual_grad', 'plain': 'autodiff'}
AttnImpl = Literal[ATTN_IMPLS + tuple(ALIASES)]   # the models' field type
PALLAS_BLOCK = 128       # the TPU flash kernel's minimum block (its MIN_BLOCK_SIZE)
PALLAS_MIN_SEQ = 512     # 'auto' on TPU: shorter sequences take 'xla' (one padded 128 block is mostly padding)
CUDNN_HEAD_DIM_MAX = 128  # 256 on Hopper and later; 128 holds on every card cuDNN's flash kernel runs on
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)   # jax's and the Pallas kernel's large negative logit
# 'manual_grad' lowered for XLA:CPU with more queries than this runs as two halves of the queries (None: never).
# XLA:CPU gives q k^T, the softmax and p v one YNNPACK fusion; past 256 queries that fusion runs on one thread at
# ~2.4x the CPU time (ViT-B/16 shapes, 8 x 12 heads, bf16: 256 queries 6.7 ms on 1.9 cores, 261 queries 29.7 ms
# on 1.06; float32 likewise). Two halves are two fusions the runtime runs side by side: see `_query_halves`.
CPU_QUERY_SPLIT_ABOVE: Optional[int] = 256
_warned = set()
_TARGET_BACKEND = contextvars.ContextVar('vit_flax_attention_target_backend', default=None)


_BATCH_MESH = contextvars.ContextVar('vit_flax_attention_batch_mesh', default=None)


@contextlib.contextmanager
def batch_mesh(mesh):
    """Inside the block (while a step is traced), the Pallas kernels run per device under shard_map over
    `mesh`, the batch split over all its axes (how vit_train splits it): XLA cannot partition a Mosaic kernel
    itself ("Mosaic kernels cannot be automatically partitioned")."""
    token = _BATCH_MESH.set(mesh)
    try:
        yield
    finally:
        _BATCH_MESH.reset(token)


def _per_device(fn, *args):
    """fn(*args), under shard_map over the batch (dim 0 of every array in args, pytrees and None included, and of
    the output) when a `batch_mesh` with more than one device is set and divides the batch; else as is."""
    mesh = _BATCH_MESH.get()
    if mesh is None or mesh.size == 1 or args[0].shape[0] % mesh.size:
        return fn(*args)
    from jax.sharding import PartitionSpec as P
    spec = P(tuple(mesh.axis_names))
    given = [i for i, a in enumerate(args) if a is not None]   # a None (no bias) travels outside the map

    def body(*arrays):
        full = list(args)
        for i, a in zip(given, arrays):
            full[i] = a
        return fn(*full)
    specs = tuple(spec for _ in given)
    try:
        mapped = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec, check_vma=False)
    except TypeError:   # jax before check_vma
        mapped = jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=spec, check_rep=False)
    return mapped(*[args[i] for i in given])


@contextlib.contextmanager
def target_backend(backend: Optional[str]):
    """Inside the block, 'auto' chooses for `backend` ('tpu', 'gpu', 'cpu') instead of jax.default_backend():
    what a program traced here to be compiled for another platform (a TPU, from a CPU host) needs."""
    token = _TARGET_BACKEND.set(backend)
    try:
        yield
    finally:
        _TARGET_BACKEND.reset(token)


def lowering_backend() -> str:
    """The platform the program being traced is for: `target_backend`'s inside its block, else
    jax.default_backend(). What a fast path chosen per platform at trace time reads (ops.layernorm's users)."""
    return _TARGET_BACKEND.get() or jax.default_backend()


def check_impl(impl: str) -> str:
    """`impl` with old names mapped (module docstring; a DeprecationWarning once per name and process); a
    ModelConfigError for a name that is none."""
    if impl in ALIASES:
        if impl not in _warned:
            _warned.add(impl)
            warnings.warn(f"attn_impl={impl!r} is deprecated: it is {ALIASES[impl]!r} (the same computation)",
                          DeprecationWarning, stacklevel=3)
        return ALIASES[impl]
    if impl not in ATTN_IMPLS:
        old = ', '.join(f'{k!r} for {v!r}' for k, v in ALIASES.items())
        raise ModelConfigError(f"attn_impl must be one of {', '.join(map(repr, ATTN_IMPLS))} (old names: {old}), "
                               f"got {impl!r}")
    return impl


class Choice(NamedTuple):
    impl: str                      # what runs
    fallback: Optional[str] = None  # why it is not what was asked for ('auto' fallbacks and dropout), else None


def _low_precision(dtype) -> bool:
    return jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _cudnn_refusal(dtype, head_dim) -> Optional[str]:
    if not _low_precision(dtype):
        return f'cuDNN attention takes bf16/fp16 operands, not {jnp.dtype(dtype).name}'
    if head_dim > CUDNN_HEAD_DIM_MAX or head_dim % 8:
        return f'cuDNN attention takes a head dim <= {CUDNN_HEAD_DIM_MAX} and a multiple of 8, not {head_dim}'
    return None


def _pallas_refusal(head_dim) -> Optional[str]:
    if head_dim > PALLAS_BLOCK and head_dim % PALLAS_BLOCK:
        return f'the Pallas flash kernel takes a head dim <= {PALLAS_BLOCK} or a multiple of it, not {head_dim}'
    return None


def choose_impl(backend: str, dtype, seq_len: int, head_dim: int, has_bias: bool = False,
                has_mask: bool = False, has_dropout: bool = False, impl: str = 'auto') -> Choice:
    """What runs for `impl` on `backend` ('cpu' | 'gpu' | 'cuda' | 'rocm' | 'tpu' | ...) with these operands.

    Pure (no device queries): the module docstring's rules. Every implementation but 'splash' takes a bias
    and a mask: with either, 'auto' on a TPU takes 'pallas' instead. Raises ModelConfigError for an explicit
    kernel that cannot run here.
    """
    impl = check_impl(impl)
    backend = backend.lower()
    gpu = backend in ('gpu', 'cuda')
    if has_dropout:
        if impl in ('auto', 'manual_grad', 'autodiff'):
            return Choice('autodiff')
        return Choice('autodiff', f"attn_impl={impl!r} applies no attention dropout: the plain formula runs while "
                               f"dropout is active")
    if impl == 'cudnn':
        why = ('cuDNN attention runs on a CUDA GPU, not on backend ' + repr(backend)) if not gpu else \
            _cudnn_refusal(dtype, head_dim)
        if why:
            raise ModelConfigError(f"attn_impl='cudnn': {why}")
    if impl == 'pallas':
        why = ('the Pallas flash kernel runs on a TPU, not on backend ' + repr(backend)) if backend != 'tpu' else \
            _pallas_refusal(head_dim)
        if why:
            raise ModelConfigError(f"attn_impl='pallas': {why}")
    if impl == 'splash':
        why = ('splash attention runs on a TPU, not on backend ' + repr(backend)) if backend != 'tpu' else \
            _pallas_refusal(head_dim)
        if why is None and (has_bias or has_mask):
            why = "splash attention takes no additive bias or mask here (use 'pallas' or 'xla')"
        if why:
            raise ModelConfigError(f"attn_impl='splash': {why}")
    if impl != 'auto':
        return Choice(impl)
    if backend == 'cpu':
        return Choice('manual_grad')
    if gpu:
        if not _low_precision(dtype):
            return Choice('xla')   # float32: no fused kernel; not a fallback
        why = _cudnn_refusal(dtype, head_dim)
        return Choice('xla', why) if why else Choice('cudnn')
    if backend == 'tpu':
        if seq_len < PALLAS_MIN_SEQ:
            return Choice('xla')
        why = _pallas_refusal(head_dim)
        return Choice('xla', why) if why else Choice('pallas' if has_bias or has_mask else 'splash')
    return Choice('xla')


def _warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def dot_product_attention(q, k, v, bias=None, mask=None, scale: Optional[float] = None, impl: str = 'auto',
                          dropout: Optional[Callable] = None, backend: Optional[str] = None):
    """softmax(scale q k^T + bias, masked) v over (..., N, Dh) arrays (module docstring: shapes, numerics).

    `dropout` (applied to the attention weights) is given only when it can drop something; `impl` as in the
    module docstring; `backend` (default: `target_backend`'s, else jax.default_backend()) only for what `choose_impl` decides.
    """
    choice = choose_impl(backend or lowering_backend(), jnp.result_type(q, k, v), k.shape[-2], q.shape[-1],
                         bias is not None, mask is not None, dropout is not None, impl)
    if choice.fallback:
        _warn_once(f'attention: {choice.fallback}; using {choice.impl!r}')
    if choice.impl in ('manual_grad', 'autodiff'):
        if scale is not None:
            q = (q * jnp.asarray(scale, jnp.float32)).astype(q.dtype)
        bias = _mask_as_bias(bias, mask)
        if choice.impl == 'autodiff':
            return plain_attention(q, k, v, bias, dropout)
        exact = jnp.finfo(jnp.result_type(q, k, v)).bits >= 32
        return (_attention_f32 if exact else _attention)(q, k, v, bias)
    if choice.impl == 'pallas':
        return pallas_attention(q, k, v, bias, mask, scale)
    if choice.impl == 'splash':
        return splash_attention(q, k, v, scale)
    return jax_attention(q, k, v, bias, mask, scale, implementation=choice.impl,
                         seq_multiple=2 if (choice.impl == 'cudnn' and bias is not None) else 1)


def _query_halves(attend, q, k, v, bias):
    """attend(q, k, v, bias), or on XLA:CPU with more than CPU_QUERY_SPLIT_ABOVE queries, attend over each half of
    the queries (the bias's rows with them when it has a query axis) and the halves concatenated: every query row
    is computed as before (softmax is per row), so the values are the same. Used only in the undifferentiated
    primal of the 'manual_grad' kernels: their derivative rules stay whole, so gradients are unchanged (split,
    k's and v's gradients would become sums of two partial products, each rounded in bf16). Other platforms lower
    `attend` whole."""
    nq = q.shape[-2]
    if CPU_QUERY_SPLIT_ABOVE is None or nq <= CPU_QUERY_SPLIT_ABOVE:
        return attend(q, k, v, bias)

    def halves(q, k, v, bias):
        cut = (nq + 1) // 2
        rows = lambda t, a, b: t if t is None or t.ndim < 2 or t.shape[-2] == 1 else t[..., a:b, :]  # noqa: E731
        return jnp.concatenate([attend(q[..., a:b, :], k, v, rows(bias, a, b)) for a, b in ((0, cut), (cut, nq))],
                               axis=-2)
    return jax.lax.platform_dependent(q, k, v, bias, cpu=halves, default=attend)


def _mask_as_bias(bias, mask):
    """A bool mask folded into the additive bias (MASK_VALUE where False), as the kernels do it."""
    if mask is None:
        return bias
    extra = jnp.where(mask, jnp.float32(0), jnp.float32(MASK_VALUE))
    return extra if bias is None else bias + extra


# ---------------------------------------------------------------- the kernels of jax.nn and Pallas

def _as_batch_heads(x, lead):
    """(..., A, B) broadcastable to lead + (A, B) -> (b, prod(lead[1:]), A, B), b = lead[0] or 1 (kept
    broadcast when x does not vary over the first leading dim)."""
    x = jnp.asarray(x)
    x = x.reshape((1,) * (len(lead) + 2 - x.ndim) + x.shape)
    first = lead[0] if lead and x.shape[0] != 1 else 1
    x = jnp.broadcast_to(x, (first,) + tuple(lead[1:]) + x.shape[-2:])
    return x.reshape((first, math.prod(lead[1:])) + x.shape[-2:])


def _split_lead(q, k, v):
    lead = q.shape[:-2]
    if not lead:
        lead = (1,)
    to4 = lambda t: t.reshape((lead[0] if len(q.shape) > 2 else 1, math.prod(lead[1:])) + t.shape[-2:])
    return lead, to4(q), to4(k), to4(v)


def _pad_axis(x, axis, to):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, to - x.shape[axis])
    return jnp.pad(x, pad) if to != x.shape[axis] else x


def jax_attention(q, k, v, bias=None, mask=None, scale=None, implementation='xla', seq_multiple: int = 1):
    """jax.nn.dot_product_attention over this module's layout, sequences padded to `seq_multiple`.

    Padding (what 'cudnn' needs with a bias; any `implementation` takes it, so the CPU tests run it with
    'xla'): q, k, v, bias and mask are zero-padded (mask False) along both sequence axes, the padded keys
    are masked out by key_value_seq_lengths and the padded query rows (zeros) are sliced off.
    """
    lead, q4, k4, v4 = _split_lead(q, k, v)
    nq, nk = q4.shape[-2], k4.shape[-2]
    tq, tk = (-(-n // seq_multiple) * seq_multiple for n in (nq, nk))
    btnh = lambda t, n: _pad_axis(t.transpose(0, 2, 1, 3), 1, n)     # (B, H, N, D) -> (B, N', H, D)
    qp, kp, vp = btnh(q4, tq), btnh(k4, tk), btnh(v4, tk)
    pad2 = lambda t: _pad_axis(_pad_axis(t, 2, tq), 3, tk)
    b4 = None if bias is None else pad2(_as_batch_heads(bias, lead).astype(jnp.float32))
    m4 = None if mask is None else pad2(_as_batch_heads(mask, lead))
    lengths = {}
    if (tq, tk) != (nq, nk):
        batch = qp.shape[0]
        lengths = dict(query_seq_lengths=jnp.full((batch,), nq, jnp.int32),
                       key_value_seq_lengths=jnp.full((batch,), nk, jnp.int32))
    out = jax.nn.dot_product_attention(qp, kp, vp, b4, m4, scale=1.0 if scale is None else scale,
                                       implementation=implementation, **lengths)
    return out[:, :nq].transpose(0, 2, 1, 3).reshape(q.shape[:-1] + v.shape[-1:])


def pallas_attention(q, k, v, bias=None, mask=None, scale=None, block: int = PALLAS_BLOCK):
    """jax's TPU flash attention (Pallas) over this module's layout: sequences padded to `block`, padded keys
    masked by segment ids (real tokens 1, padding 0: a real query sees only real keys), a bool mask folded
    into the bias, the bias given in full (the kernel takes no broadcast one). On CPU it runs under
    `jax.experimental.pallas.tpu.force_tpu_interpret_mode()` (the tests)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    lead, q4, k4, v4 = _split_lead(q, k, v)
    nq, nk = q4.shape[-2], k4.shape[-2]
    tq, tk = (-(-n // block) * block for n in (nq, nk))
    qp, kp, vp = _pad_axis(q4, 2, tq), _pad_axis(k4, 2, tk), _pad_axis(v4, 2, tk)
    bias = _mask_as_bias(bias, mask)
    ab = None
    if bias is not None:
        ab = jnp.broadcast_to(_as_batch_heads(bias, lead).astype(jnp.float32), q4.shape[:2] + (nq, nk))
        ab = _pad_axis(_pad_axis(ab, 2, tq), 3, tk)
    segments = None
    if (tq, tk) != (nq, nk):
        ids = lambda n, t: jnp.broadcast_to((jnp.arange(t) < n).astype(jnp.int32), (q4.shape[0], t))
        segments = fa.SegmentIds(q=ids(nq, tq), kv=ids(nk, tk))
    sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                          block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
                          block_k_major_dq=block, block_k_dq=block, block_q_dq=block)
    kernel = lambda q_, k_, v_, ab_, seg_: fa.flash_attention(  # noqa: E731
        q_, k_, v_, ab_, seg_, sm_scale=1.0 if scale is None else scale, block_sizes=sizes)
    out = _per_device(kernel, qp, kp, vp, ab, segments)   # per device: XLA cannot partition a Mosaic kernel
    return out[:, :, :nq].reshape(q.shape[:-1] + v.shape[-1:]).astype(v.dtype)


def splash_attention(q, k, v, scale=None, block: int = PALLAS_BLOCK, interpret: Optional[bool] = None):
    """jax's TPU splash attention (Pallas) over this module's layout, no bias or mask: q scaled first (the
    kernel does not scale), q/k/v as (batch, heads, N, Dh) with the kernel vmapped over the batch, sequences
    zero-padded to `block` with segment ids (real tokens 1, padding 0) so a real query sees only real keys,
    the padded rows sliced off. Forward and backward are the kernel's (dq and dkv kernels, all blocks
    `block`). `interpret` None: the Pallas interpreter when jax runs on the CPU and no `target_backend` is
    set (the tests), the compiled kernel otherwise (a TPU, or a deviceless compile for one)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    if interpret is None:
        interpret = jax.default_backend() == 'cpu' and _TARGET_BACKEND.get() is None
    lead, q4, k4, v4 = _split_lead(q, k, v)
    heads, nq, nk = q4.shape[1], q4.shape[-2], k4.shape[-2]
    tq, tk = (-(-n // block) * block for n in (nq, nk))
    if scale is not None:
        q4 = (q4 * jnp.asarray(scale, jnp.float32)).astype(q4.dtype)
    qp, kp, vp = _pad_axis(q4, 2, tq), _pad_axis(k4, 2, tk), _pad_axis(v4, 2, tk)
    mask = sm.MultiHeadMask([sm.FullMask((tq, tk)) for _ in range(heads)])
    sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                          block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    segments = None
    if (tq, tk) != (nq, nk):
        segments = sk.SegmentIds(q=(jnp.arange(tq) < nq).astype(jnp.int32), kv=(jnp.arange(tk) < nk).astype(jnp.int32))
    # a bf16 kernel's matmuls are bf16 on the MXU: under jax_default_matmul_precision='highest' (set by some
    # test suites) Mosaic would be asked for fp32 contraction of bf16 operands and refuse ("Bad lhs type")
    precision = 'default' if _low_precision(qp.dtype) else None
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        out = _per_device(jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segments)), qp, kp, vp)
    return out[:, :, :nq].reshape(q.shape[:-1] + v.shape[-1:]).astype(v.dtype)


# ---------------------------------------------------------------- 'autodiff' and 'manual_grad'

def plain_attention(q, k, v, bias=None, dropout: Optional[Callable] = None):
    """The plain formula, differentiated by JAX; `dropout` (or None) on the attention weights."""
    weights = jax.nn.softmax(_attention_logits(q, k, bias), axis=-1)
    return matmul('...qk,...kd->...qd', (weights if dropout is None else dropout(weights)).astype(v.dtype), v)


reference_attention = plain_attention   # its name before attn_impl='reference' named the hand-written path


def _attention_logits(q, k, bias):
    logits = matmul('...qd,...kd->...qk', q, k, out_dtype=jnp.float32)
    return logits if bias is None else logits + bias


def _attention_probs(q, k, bias):
    logits = _attention_logits(q, k, bias)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    return e / jnp.sum(e, axis=-1, keepdims=True)  # jax.nn.softmax's formula


# 'manual_grad': the same forward formula with the derivatives written out. Autodiff of softmax makes XLA:CPU
# materialise the broadcast normaliser and run extra passes over the N x N array; these keep the
# probabilities as the one saved N x N array. Float32 gets a JVP (forward mode, jax.jvp and Hessian-vector
# products keep working; reverse mode is its transpose); low precision gets a VJP, as `matmul`'s own
# low-precision path does.

def _attention_f32_whole(q, k, v, bias):
    return matmul('...qk,...kd->...qd', _attention_probs(q, k, bias), v)


@jax.custom_jvp
def _attention_f32(q, k, v, bias):
    return _query_halves(_attention_f32_whole, q, k, v, bias)   # the JVP below (and so every derivative) is whole


@_attention_f32.defjvp
def _attention_f32_jvp(primals, tangents):
    (q, k, v, bias), (dq, dk, dv, dbias) = primals, tangents
    p = _attention_probs(q, k, bias)
    ds = matmul('...qd,...kd->...qk', dq, k) + matmul('...qd,...kd->...qk', q, dk)
    if bias is not None:
        ds = ds + dbias
    dp = p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))
    return (matmul('...qk,...kd->...qd', p, v),
            matmul('...qk,...kd->...qd', dp, v) + matmul('...qk,...kd->...qd', p, dv))


@jax.custom_vjp
def _attention(q, k, v, bias):   # what runs undifferentiated (inference); the VJP's forward and backward are whole
    return _query_halves(lambda q, k, v, bias: _attention_fwd(q, k, v, bias)[0], q, k, v, bias)


def _attention_fwd(q, k, v, bias):
    p = _attention_probs(q, k, bias)
    return matmul('...qk,...kd->...qd', p.astype(v.dtype), v), (q, k, v, p, bias)


def _attention_bwd(res, do):
    """What autodiff would give for the forward above, `matmul`'s low-precision VJP included (each
    cotangent rounded to its operand's dtype before the product, accumulated in float32)."""
    q, k, v, p, bias = res
    # `do` usually arrives as a transposed view (the models' head merge): written out row-major here, or
    # XLA:CPU would run the dp product as a float32 GEMM on widened copies (see matmul.row_major)
    pc, do = p.astype(v.dtype), row_major(do.astype(v.dtype))
    dv = matmul('...qk,...qd->...kd', pc, do, out_dtype=v.dtype)
    dp = matmul('...qd,...kd->...qk', do, v, out_dtype=pc.dtype).astype(jnp.float32)
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))
    dsc = ds.astype(q.dtype)
    dq = matmul('...qk,...kd->...qd', dsc, k, out_dtype=q.dtype)
    dk = matmul('...qk,...qd->...kd', dsc, q, out_dtype=k.dtype)
    return dq, dk, dv, None if bias is None else _sum_to_shape(ds, bias.shape).astype(bias.dtype)


def _sum_to_shape(x, shape):
    """x summed over the axes that broadcasting `shape` to x.shape added or stretched."""
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True).reshape(shape) if axes else x


_attention.defvjp(_attention_fwd, _attention_bwd)
