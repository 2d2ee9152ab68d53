"""Where a ViT training step spends its time, part by part, in Flax/XLA against PyTorch (timm's modules).

    make bench-parts                                  # ViT-S/16 shapes, batch 16, 3 rounds
    python benchmarks/parts_vs_torch.py --dim 768 --heads 12 --batch 8 --rounds 5
    python benchmarks/parts_vs_torch.py --dtype bfloat16       # the bf16 step's parts

Each part is run forward + backward (the input's and the weights' gradients, as a training step needs
them) on random float32 data: a whole pre-norm block, its attention half and its MLP half (LayerNorm
included, residual added), the attention core alone (softmax(q k^T) v over (B, H, N, Dh): ours against
torch's scaled_dot_product_attention), one batched q k^T product (forward only), one linear layer of each MLP shape and
one LayerNorm. The rate columns are the parts' matmul FLOPs per second. As in bench_vs_timm.py, each
framework runs in its own process, alternated over rounds, and a round's time is the fastest of the
timed calls (the parts are short, so the minimum is the least disturbed figure); the table gives the
median over rounds. A ratio below 1 is where Flax loses.

`--dtype bfloat16` runs each part as the bf16 training step does: Flax's modules with `dtype=bfloat16` (float32
params, residual stream and LayerNorm; the project's bf16 GEMM path), the attention core and q k^T on bf16 heads;
timm's modules under `torch.autocast('cpu', bfloat16)` (the forward; the backward follows autocast's casts), the
attention core as scaled_dot_product_attention on bf16 heads. The linear layers are then each framework's dense
layer (Flax: the project's `Dense`, bias included; torch: nn.Linear).
"""
import argparse
import json
import os
import statistics
import sys

import numpy as np

from bench_vs_timm import spawn, timed_calls  # this folder: the same process and timing rules
PARTS = ['block', 'attention half', 'mlp half', 'attention core', 'q k^T (batched)', 'linear d->4d',
         'linear 4d->d', 'layernorm']


def fastest(fn, iters: int, budget: float) -> float:
    return min(timed_calls(fn, iters, warmup=1, budget=budget)[1])


def flops(a) -> dict:
    """Matmul FLOPs of each part's forward + backward (3x the forward's for the layers, whose weight
    and input gradients are both taken)."""
    m, d, n = a.batch * a.tokens, a.dim, a.tokens
    attn_core = 2 * 2 * a.batch * n * n * d  # q k^T and p v
    lin = 2 * m * d * 4 * d
    attn_half = 3 * (2 * m * d * 3 * d + 2 * m * d * d) + 3 * attn_core
    mlp_half = 3 * 2 * lin
    return {'block': attn_half + mlp_half, 'attention half': attn_half, 'mlp half': mlp_half,
            'attention core': 3 * attn_core, 'q k^T (batched)': attn_core / 2,
            'linear d->4d': 3 * lin, 'linear 4d->d': 3 * lin, 'layernorm': 0}


def run_jax(a) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vit_flax.models.layers import Dense, MlpBlock
    from vit_flax.models.vit import Encoder1DBlock, MultiHeadDotProductAttention
    from vit_flax.ops.attention import dot_product_attention

    rng = np.random.default_rng(0)
    b, n, d, h = a.batch, a.tokens, a.dim, a.heads
    dt = jnp.bfloat16 if a.dtype == 'bfloat16' else jnp.float32
    x = jnp.asarray(rng.standard_normal((b, n, d), np.float32))

    class AttnHalf(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.LayerNorm(epsilon=1e-6)(x)
            return x + MultiHeadDotProductAttention(num_heads=h, dtype=dt)(y)

    class MlpHalf(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + MlpBlock(4 * d, dtype=dt)(nn.LayerNorm(epsilon=1e-6)(x))

    def module_part(module, inp):
        params = jax.tree.map(lambda t: t + 0.01, module.init(jax.random.PRNGKey(0), inp))
        out = jax.eval_shape(module.apply, params, inp)
        ct = jnp.asarray(rng.standard_normal(out.shape, np.float32)).astype(out.dtype)

        def fwd_bwd(p, x):
            y, pullback = jax.vjp(module.apply, p, x)
            return y, pullback(ct)
        f = jax.jit(fwd_bwd)
        return lambda: jax.block_until_ready(f(params, inp))

    def fn_part(fn, *args):
        out = jax.eval_shape(fn, *args)
        ct = jnp.asarray(rng.standard_normal(out.shape, np.float32)).astype(out.dtype)

        def fwd_bwd(*args):
            y, pullback = jax.vjp(fn, *args)
            return y, pullback(ct)
        f = jax.jit(fwd_bwd)
        return lambda: jax.block_until_ready(f(*args))

    heads = [jnp.asarray(rng.standard_normal((b, h, n, d // h), np.float32)).astype(dt) for _ in range(3)]
    x2 = jnp.asarray(rng.standard_normal((b * n, d), np.float32))
    x4 = jnp.asarray(rng.standard_normal((b * n, 4 * d), np.float32))
    w = jnp.asarray(rng.standard_normal((d, 4 * d), np.float32) * 0.05)
    qk = jax.jit(lambda q, k: jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32))
    if dt == jnp.bfloat16:   # the model's dense layers (bias in float32, one rounding), inputs as a block hands them
        linears = {'linear d->4d': module_part(Dense(4 * d, dtype=dt), x2.astype(dt)),
                   'linear 4d->d': module_part(Dense(d, dtype=dt), x4.astype(dt))}
    else:
        linears = {'linear d->4d': fn_part(lambda x, w: x @ w, x2, w),
                   'linear 4d->d': fn_part(lambda x, w: x @ w.T, x4, w)}
    parts = {
        'block': module_part(Encoder1DBlock(num_heads=h, mlp_dim=4 * d, dtype=dt), x),
        'attention half': module_part(AttnHalf(), x),
        'mlp half': module_part(MlpHalf(), x),
        'attention core': fn_part(lambda q, k, v: dot_product_attention(q, k, v), *heads),
        'q k^T (batched)': lambda: qk(heads[0], heads[1]).block_until_ready(),
        **linears,
        'layernorm': module_part(nn.LayerNorm(epsilon=1e-6), x),
    }
    return {k: fastest(fn, a.iters, a.budget) for k, fn in parts.items()}


def run_torch(a) -> dict:
    import torch
    import torch.nn.functional as F
    from timm.models.vision_transformer import Attention, Block, Mlp

    torch.manual_seed(0)
    b, n, d, h = a.batch, a.tokens, a.dim, a.heads
    bf16 = a.dtype == 'bfloat16'
    x = torch.randn(b, n, d, requires_grad=True)

    class AttnHalf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.attn = torch.nn.LayerNorm(d, eps=1e-6), Attention(d, h, qkv_bias=True)

        def forward(self, x):
            return x + self.attn(self.norm(x))

    class MlpHalf(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.mlp = torch.nn.LayerNorm(d, eps=1e-6), Mlp(d, 4 * d)

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    def part(fn, *args, params=()):
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            out = fn(*args)
        ct = torch.randn(out.shape).to(out.dtype)

        def call():
            for t in (*args, *params):
                t.grad = None  # as zero_grad(set_to_none=True): no accumulation into old gradients
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
                y = fn(*args)
            y.backward(ct)
        return call

    def module_part(module, inp):
        return part(module, inp, params=list(module.parameters()))

    heads = [torch.randn(b, h, n, d // h).to(torch.bfloat16 if bf16 else torch.float32).requires_grad_()
             for _ in range(3)]
    x2 = torch.randn(b * n, d, requires_grad=True)
    x4 = torch.randn(b * n, 4 * d, requires_grad=True)
    w = (torch.randn(d, 4 * d) * 0.05).requires_grad_()

    def qk():
        with torch.no_grad():
            torch.matmul(heads[0], heads[1].transpose(-1, -2))
    if bf16:   # each framework's dense layer under its bf16 rules: nn.Linear under autocast
        linears = {'linear d->4d': module_part(torch.nn.Linear(d, 4 * d), x2.detach().bfloat16().requires_grad_()),
                   'linear 4d->d': module_part(torch.nn.Linear(4 * d, d), x4.detach().bfloat16().requires_grad_())}
    else:
        linears = {'linear d->4d': part(lambda x, w: x @ w, x2, w),
                   'linear 4d->d': part(lambda x, w: x @ w.t(), x4, w)}
    parts = {
        'block': module_part(Block(d, h, qkv_bias=True), x),
        'attention half': module_part(AttnHalf(), x),
        'mlp half': module_part(MlpHalf(), x),
        'attention core': part(F.scaled_dot_product_attention, *heads),
        'q k^T (batched)': qk,
        **linears,
        'layernorm': module_part(torch.nn.LayerNorm(d, eps=1e-6), x),
    }
    return {k: fastest(fn, a.iters, a.budget) for k, fn in parts.items()}


def measure(framework: str, a) -> dict:
    result = spawn(['--worker', framework, '--batch', a.batch, '--dim', a.dim, '--heads', a.heads,
                    '--tokens', a.tokens, '--iters', a.iters, '--budget', a.budget, '--dtype', a.dtype],
                   timeout=60 + 2 * len(PARTS) * a.budget, script=__file__)
    if 'error' in result:
        sys.exit(f'{framework} worker failed: {result["error"]}')
    return result


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not a positive integer')
    return int(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--batch', type=positive, default=16)
    ap.add_argument('--dim', type=positive, default=384, help='embed dim (ViT-S 384, ViT-B 768)')
    ap.add_argument('--heads', type=positive, default=6)
    ap.add_argument('--tokens', type=positive, default=197)
    ap.add_argument('--rounds', type=positive, default=3)
    ap.add_argument('--iters', type=positive, default=15)
    ap.add_argument('--budget', type=float, default=10.0, help='seconds per part per process')
    ap.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32',
                    help="bfloat16: Flax's dtype=bfloat16 against timm under autocast")
    ap.add_argument('--worker', choices=['jax', 'torch'], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.dim % a.heads:
        ap.error(f'--dim {a.dim} is not divisible by --heads {a.heads}')
    if a.worker:
        print(json.dumps((run_jax if a.worker == 'jax' else run_torch)(a)))
        return
    results = {'jax': [], 'torch': []}
    for r in range(a.rounds):
        for fw in (('jax', 'torch') if r % 2 == 0 else ('torch', 'jax')):
            results[fw].append(measure(fw, a))
    fl = flops(a)
    print(f'{os.cpu_count()} CPU cores; {a.dtype}; x ({a.batch}, {a.tokens}, {a.dim}), {a.heads} heads; '
          f'forward + backward; {a.rounds} round(s), each framework in its own process, alternated')
    print(f'{"part":18s} {"flax ms":>8s} {"torch ms":>9s} {"flax/torch speed":>17s} {"flax GFLOP/s":>13s} {"torch GFLOP/s":>14s}')
    for part in PARTS:
        tj = statistics.median(r[part] for r in results['jax'])
        tt = statistics.median(r[part] for r in results['torch'])
        gj, gt = (f'{fl[part] / t / 1e9:.0f}' if fl[part] else '-' for t in (tj, tt))
        print(f'{part:18s} {tj * 1e3:8.2f} {tt * 1e3:9.2f} {tt / tj:17.2f} {gj:>13s} {gt:>14s}')


if __name__ == '__main__':
    main()
