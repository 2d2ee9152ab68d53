"""Training / fine-tuning with optax, data parallel over every device with jax.sharding, orbax checkpoints.

    python train_flax.py                                   # embedded default: a small ViT on sklearn digits
    python train_flax.py --model vit_base_patch16_224 --init ViT-B_16.npz --img-size 224 --steps 500

`--init` takes any checkpoint `converters.load_params` reads (npz, pth, safetensors, orbax); the head is
replaced when `--num-classes` differs (logged). The batch is sharded over a 1-D 'data' mesh of all devices
(set XLA_FLAGS=--xla_force_host_platform_device_count=8 to try it on one CPU); params stay replicated.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import vit_flax


def digits(img_size: int, seed: int = 0):
    """scikit-learn's 8x8 digits, upscaled (nearest) to img_size, 3 channels in [-1, 1]; 80/20 split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    reps = -(-img_size // 8)
    x = np.kron(d.images / 16.0, np.ones((reps, reps)))[:, :img_size, :img_size]
    x = (np.repeat(x[..., None], 3, -1) * 2 - 1).astype(np.float32)
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    return (x[idx[:cut]], d.target[idx[:cut]]), (x[idx[cut:]], d.target[idx[cut:]])


def make_train_step(model, tx, label_smoothing: float):
    def loss_fn(params, x, y, rng):
        logits = model.apply({'params': params}, x, train=True, rngs={'dropout': rng})
        if isinstance(logits, tuple):  # DeiT distilled in training: without a teacher both heads learn y
            logits = (logits[0] + logits[1]) / 2
        labels = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), label_smoothing)
        return optax.softmax_cross_entropy(logits.astype(jnp.float32), labels).mean()

    def step(params, opt_state, x, y, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return step


def evaluate(model, params, x, y, batch: int = 256) -> float:
    fwd = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False).argmax(-1))
    hits = sum(int((np.asarray(fwd(params, x[i:i + batch])) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    return hits / len(x)


def train(args) -> dict:
    over = dict(num_classes=args.num_classes, img_size=args.img_size, drop_path_rate=args.drop_path)
    if args.patch_size:
        over['patch_size'] = args.patch_size
    if args.depth:
        over['depth'] = args.depth
    if args.bf16:
        over['dtype'] = jnp.bfloat16
    model = vit_flax.create_model(args.model, **over)
    if args.init:
        from converters import load_params
        params = load_params(args.init, args.model, **{k: v for k, v in over.items() if k != 'dtype'})
        params = jax.tree_util.tree_map(jnp.asarray, params)
    else:
        params = vit_flax.init_params(model, jax.random.PRNGKey(args.seed))

    mesh = Mesh(np.array(jax.devices()), ('data',))
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
    if args.batch % len(jax.devices()):
        raise SystemExit(f'--batch {args.batch} must divide over {len(jax.devices())} devices')
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps // 10), args.steps)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=args.weight_decay))
    params = jax.device_put(params, replicated)
    opt_state = jax.device_put(tx.init(params), replicated)
    step = jax.jit(make_train_step(model, tx, args.label_smoothing),
                   in_shardings=(replicated, replicated, sharded, sharded, replicated),
                   out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))

    (xtr, ytr), (xte, yte) = digits(args.img_size, args.seed)
    rng = np.random.default_rng(args.seed)
    key = jax.random.PRNGKey(args.seed)
    losses, t0 = [], time.perf_counter()
    for i in range(args.steps):
        idx = rng.integers(0, len(xtr), args.batch)
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, xtr[idx], ytr[idx], sub)
        losses.append(float(loss))
        if args.log_every and (i % args.log_every == 0 or i == args.steps - 1):
            print(f'step {i:4d}  loss {losses[-1]:.4f}')
    seconds = time.perf_counter() - t0
    result = dict(steps=args.steps, first_loss=losses[0], final_loss=float(np.mean(losses[-5:])),
                  test_accuracy=evaluate(model, params, xte, yte), devices=len(jax.devices()),
                  seconds=round(seconds, 2))
    if args.out:
        import orbax.checkpoint as ocp
        ocp.PyTreeCheckpointer().save(os.path.abspath(args.out), {'params': params}, force=True)
        result['checkpoint'] = args.out
    return result


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='vit_tiny_patch16_224')
    p.add_argument('--init', help='checkpoint to fine-tune from (any format converters reads)')
    p.add_argument('--img-size', type=int, default=32)
    p.add_argument('--patch-size', type=int, default=8, help='0 keeps the model\'s own')
    p.add_argument('--depth', type=int, default=4, help='0 keeps the model\'s own')
    p.add_argument('--num-classes', type=int, default=10)
    p.add_argument('--steps', type=int, default=300)
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--lr', type=float, default=5e-4)
    p.add_argument('--weight-decay', type=float, default=0.05)
    p.add_argument('--label-smoothing', type=float, default=0.0)
    p.add_argument('--drop-path', type=float, default=0.0)
    p.add_argument('--bf16', action='store_true', help='bfloat16 compute (params and optimizer stay float32)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', help='orbax checkpoint directory for the final params')
    p.add_argument('--log-every', type=int, default=50)
    return p.parse_args(argv)


if __name__ == '__main__':
    print(json.dumps(train(parse())))
