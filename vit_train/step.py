"""The jitted train and eval steps. State is one pytree: {'params', 'opt_state', 'step'}.

Losses are sums weighted per example (weight 0 for padding and unreadable images) divided by the batch's
total weight, so gradient accumulation over micro-batches gives the gradient of the whole batch.
"""
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from . import erasing, optim


def normalize(images, mean, std):
    """uint8 NHWC -> float32 (x / 255 - mean) / std, on the device."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) / 255.0 - mean) / std


def _logits(model, params, x, train, rng=None):
    out = model.apply({'params': params}, x, train=train, rngs={'dropout': rng} if train else None)
    if isinstance(out, tuple):  # DeiT distilled in training, no teacher: timm's non-distilled mode averages
        out = (out[0] + out[1]) / 2
    return out.astype(jnp.float32)


def make_train_step(model, tx, trainable, *, mean, std, label_smoothing=0.0, grad_accum=1, seed=0, erase_mode=None):
    """step(state, batch, lr) -> (state, metrics). `tx` is the update direction (optim.make), scaled by the
    learning rate `lr`. Only keys in `trainable` get gradients and updates; the other params are passed
    through untouched (bit-identical). `erase_mode` (const, rand, pixel): fill the batch's 'erase' boxes of the
    normalised images (timm's RandomErasing, `vit_train.erasing`)."""
    trainable = frozenset(trainable)
    base_key = jax.random.PRNGKey(seed)

    def loss_sum(train_p, frozen_p, batch, rng):
        params = unflatten_dict({**train_p, **frozen_p}, sep='/')
        x = normalize(batch['image'], mean, std)
        if erase_mode:
            x = erasing.erase(x, batch['erase'], batch['erase_seed'], erase_mode)
        logits = _logits(model, params, x, True, rng)
        labels = optax.smooth_labels(jax.nn.one_hot(batch['label'], logits.shape[-1]), label_smoothing)
        w = batch['weight']
        ce = optax.softmax_cross_entropy(logits, labels)
        correct = (logits.argmax(-1) == batch['label']) * w
        return (ce * w).sum(), correct.sum()

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state, batch, lr):
        flat = flatten_dict(state['params'], sep='/')
        train_p = {k: v for k, v in flat.items() if k in trainable}
        frozen_p = {k: v for k, v in flat.items() if k not in trainable}
        rng = jax.random.fold_in(base_key, state['step'])
        if grad_accum == 1:
            (lsum, correct), grads = grad_fn(train_p, frozen_p, batch, rng)
        else:
            # micro-batch a takes rows a, a+A, ...: every device contributes equally to each micro-batch
            micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape((-1, grad_accum) + x.shape[1:]), 0, 1), batch)

            def body(carry, mb_i):
                mb, i = mb_i
                (l, c), g = grad_fn(train_p, frozen_p, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (l, c, g)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, train_p))
            (lsum, correct, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
        wsum = batch['weight'].sum()
        grads = jax.tree.map(lambda g: g / jnp.maximum(wsum, 1.0), grads)
        train_p, opt_state = optim.apply(tx, grads, state['opt_state'], train_p, lr)
        params = unflatten_dict({**frozen_p, **train_p}, sep='/')
        # a finite loss can still give non-finite params (an overflowing update): the loop checks both
        # before it saves, so no checkpoint ever holds a NaN
        finite = jnp.all(jnp.stack([jnp.isfinite(v).all() for v in jax.tree.leaves(train_p)]))
        metrics = dict(loss=lsum / jnp.maximum(wsum, 1.0), correct=correct, count=wsum,
                       unreadable=batch['unreadable'].sum(), params_finite=finite)
        return dict(params=params, opt_state=opt_state, step=state['step'] + 1), metrics

    return step


def make_eval_step(model, *, mean, std):
    """eval(params, batch) -> sums of loss (plain cross-entropy), correct, weight, unreadable."""
    def step(params, batch):
        logits = _logits(model, params, normalize(batch['image'], mean, std), False)
        w = batch['weight']
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
        return dict(loss=(ce * w).sum(), correct=((logits.argmax(-1) == batch['label']) * w).sum(), count=w.sum(),
                    unreadable=batch['unreadable'].sum())
    return step
