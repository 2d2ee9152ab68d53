"""The jitted train and eval steps. State is one pytree: {'params', 'opt_state', 'step'} and, with a weight
EMA, 'ema' (a params tree).

Inside the train step, in timm's order: the uint8 batch becomes (x / 255 - mean) / std (float32 NHWC);
random erasing fills the boxes the host drew (`vit_train.erasing`, with --reprob); mixup/cutmix
(`vit_train.mixup`, timm's semantics, its own random stream) mixes it and gives soft targets, or the targets
are the one-hot labels smoothed as timm's (on = 1 - e + e/C, off = e/C); then the forward pass, the loss, the
update, the EMA.

Losses are sums weighted per example (weight 0 for padding and unreadable images) divided by the batch's
total weight, so gradient accumulation over micro-batches gives the gradient of the whole batch:
- softmax cross-entropy on soft targets, sum_c -t_c log_softmax(z)_c (timm's SoftTargetCrossEntropy; with
  hard targets and smoothing it is timm's LabelSmoothingCrossEntropy);
- `bce=True`: timm's BinaryCrossEntropy, the mean over classes of BCE-with-logits per example (so the batch
  mean is timm's mean over B x C), targets binarised t > threshold when one is given.
"""
import jax
import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

from . import ema as ema_mod
from . import erasing, optim
from . import mixup as mixing


def normalize(images, mean, std):
    """uint8 NHWC -> float32 (x / 255 - mean) / std, on the device."""
    return standardize(to_unit(images), mean, std)


def to_unit(images):
    """uint8 -> float32 in [0, 1]."""
    return images.astype(jnp.float32) / 255.0


def standardize(x, mean, std):
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return (x - mean) / std


def _logits(model, params, x, train, rng=None):
    out = model.apply({'params': params}, x, train=train, rngs={'dropout': rng} if train else None)
    if isinstance(out, tuple):  # DeiT distilled in training, no teacher: timm's non-distilled mode averages
        out = (out[0] + out[1]) / 2
    return out.astype(jnp.float32)


def make_prepare(num_classes, *, mean, std, smoothing=0.0, mix=None, seed=0, erase_mode=None):
    """prepare(batch, step) -> (images float32 NHWC, normalised, after erasing and mixing; targets (B,
    num_classes)): what the model is given, and what it is asked to predict, in timm's order: normalise, random
    erasing (`erase_mode` const/rand/pixel fills the batch's 'erase' boxes, `vit_train.erasing`), then
    mixup/cutmix (`mix`: a mixup.MixupConfig or None) on the step's own stream. Mixing (a blend with weights
    summing to 1, or a paste) commutes with the per-channel normalisation; erasing must come before it so that
    a blended or pasted image carries its partner's erased boxes, as in timm. `denormalize` gives back [0, 1]."""
    def prepare(batch, step):
        x = normalize(batch['image'], mean, std)
        if erase_mode:
            x = erasing.erase(x, batch['erase'], batch['erase_seed'], erase_mode)
        if mix is None:
            return x, mixing.one_hot_smoothed(batch['label'], num_classes, smoothing)
        x, targets, _ = mixing.apply(mixing.mix_key(seed, step), mix, x, batch['label'])
        return x, targets
    return prepare


def denormalize(x, mean, std):
    """The inverse of `standardize`: normalised images back to [0, 1] units (erased pixels' noise may lie
    outside)."""
    return x * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def loss_per_example(logits, targets, bce=False, bce_threshold=None):
    if not bce:
        return -(targets * jax.nn.log_softmax(logits)).sum(-1)
    if bce_threshold is not None:
        targets = (targets > bce_threshold).astype(logits.dtype)
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean(-1)


def make_train_step(model, tx, trainable, *, mean, std, label_smoothing=0.0, grad_accum=1, seed=0, mix=None,
                    bce=False, bce_threshold=None, lr_scales=None, ema=False, erase_mode=None):
    """step(state, batch, lr, ema_weight=0.) -> (state, metrics). `tx` is the update direction (optim.make),
    scaled by the learning rate `lr` (times `lr_scales[key]` per parameter with layer decay). Only keys in
    `trainable` get gradients and updates; the other params are passed through untouched (bit-identical).
    With `ema`, state['ema'] is lerped towards the new params with `ema_weight` (1 - decay, from the host).
    `erase_mode` (const, rand, pixel): fill the batch's 'erase' boxes of the normalised images before mixing
    (timm's RandomErasing, `vit_train.erasing`; see `make_prepare`)."""
    trainable = frozenset(trainable)
    base_key = jax.random.PRNGKey(seed)
    num_classes = model.num_classes
    prepare = make_prepare(num_classes, mean=mean, std=std, smoothing=label_smoothing, mix=mix, seed=seed,
                           erase_mode=erase_mode)

    def loss_sum(train_p, frozen_p, batch, rng):
        params = unflatten_dict({**train_p, **frozen_p}, sep='/')
        logits = _logits(model, params, batch['x'], True, rng)
        w = batch['weight']
        loss = loss_per_example(logits, batch['targets'], bce, bce_threshold)
        correct = (logits.argmax(-1) == batch['label']) * w
        return (loss * w).sum(), correct.sum()

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def step(state, batch, lr, ema_weight=0.0):
        flat = flatten_dict(state['params'], sep='/')
        train_p = {k: v for k, v in flat.items() if k in trainable}
        frozen_p = {k: v for k, v in flat.items() if k not in trainable}
        rng = jax.random.fold_in(base_key, state['step'])
        x, targets = prepare(batch, state['step'])
        batch = dict(x=x, targets=targets, label=batch['label'], weight=batch['weight'],
                     unreadable=batch['unreadable'])
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
        grad_norm = optax.tree.norm(grads)
        train_p, opt_state = optim.apply(tx, grads, state['opt_state'], train_p, lr, lr_scales)
        params = unflatten_dict({**frozen_p, **train_p}, sep='/')
        # a finite loss can still give non-finite params (an overflowing update): the loop checks both
        # before it saves, so no checkpoint ever holds a NaN
        finite = jnp.all(jnp.stack([jnp.isfinite(v).all() for v in jax.tree.leaves(train_p)]))
        metrics = dict(loss=lsum / jnp.maximum(wsum, 1.0), correct=correct, count=wsum,
                       unreadable=batch['unreadable'].sum(), params_finite=finite, grad_norm=grad_norm)
        new = dict(params=params, opt_state=opt_state, step=state['step'] + 1)
        if ema:
            new['ema'] = ema_mod.lerp(state['ema'], params, jnp.asarray(ema_weight, jnp.float32))
        return new, metrics

    return step


def make_eval_step(model, *, mean, std):
    """eval(params, batch) -> sums of loss (plain cross-entropy), correct (top-1), correct5 (top-5), weight,
    unreadable."""
    def step(params, batch):
        logits = _logits(model, params, normalize(batch['image'], mean, std), False)
        w = batch['weight']
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
        k = min(5, logits.shape[-1])
        top5 = (jax.lax.top_k(logits, k)[1] == batch['label'][:, None]).any(-1)
        return dict(loss=(ce * w).sum(), correct=((logits.argmax(-1) == batch['label']) * w).sum(),
                    correct5=(top5 * w).sum(), count=w.sum(), unreadable=batch['unreadable'].sum())
    return step
