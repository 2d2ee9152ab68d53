"""Optimizer, learning-rate schedule, and the two masks: which parameters train, which decay.

Parameters are handled as a flat dict keyed by '/'-joined paths ('Transformer/encoderblock_0/.../kernel'),
the same keys the converters use; the optimizer only ever sees the trainable ones.
"""
import math
from typing import Dict

import jax
import optax

from .errors import TrainError

OPTIMIZERS = ('sgd', 'adamw')
# What --freeze-layers leaves trainable: WZMIAOMIAO's scripts train only `head` and `pre_logits` (and DeiT's second head).
HEAD_KEYS = ('head', 'head_dist', 'pre_logits')


def is_trainable(key: str, freeze: bool) -> bool:
    return not freeze or key.split('/', 1)[0] in HEAD_KEYS


def decays(key: str) -> bool:
    """Weight decay on Dense/Conv kernels only, as big_vision does. In these models that is exactly timm's
    rule: no decay on biases, norm scales, position embeddings, cls/dist tokens, the MAP probe and Swin's
    relative-position bias tables; nor on Swin V2's position-bias MLP (`cpb_mlp`), its `logit_scale` and
    q/v biases (timm's and Microsoft's `no_weight_decay_keywords`)."""
    return key.rsplit('/', 1)[-1] == 'kernel' and '/cpb_mlp/' not in key


def trainable_keys(flat: Dict, freeze: bool):
    keys = sorted(k for k in flat if is_trainable(k, freeze))
    if not keys:
        raise TrainError('--freeze-layers: the model has no head or pre_logits to train (num_classes=0?)')
    return keys


def schedule(lr: float, lrf: float, warmup_steps: int, total_steps: int):
    """lr_at(step) for update number `step` (0-based): linear warmup to `lr` over `warmup_steps` updates, then
    WZMIAOMIAO's cosine from `lr` down to `lr * lrf` at the last update (per update, not per epoch). Plain
    Python: the rate is an argument of the compiled step, so a new --lr, --epochs or warmup recompiles nothing."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        t = min((step - warmup_steps) / max(total_steps - warmup_steps - 1, 1), 1.0)
        return lr * lrf + (lr - lr * lrf) * 0.5 * (1 + math.cos(math.pi * t))
    return lr_at


def make(name: str, weight_decay: float, decay_mask: Dict[str, bool], momentum: float = 0.9,
         clip_grad: float = 0.0) -> optax.GradientTransformation:
    """The update direction before the learning rate (`apply` scales it by -lr), as optax composes them:
    sgd: L2 weight decay added to the gradient, then momentum (PyTorch's SGD weight_decay, as WZMIAOMIAO's scripts);
    adamw: Adam, then decoupled weight decay (scaled by the learning rate with the rest).
    `decay_mask` is keyed like the params."""
    if name == 'sgd':
        tx = optax.chain(optax.add_decayed_weights(weight_decay, mask=decay_mask),
                         optax.trace(decay=momentum) if momentum else optax.identity())
    elif name == 'adamw':
        tx = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(weight_decay, mask=decay_mask))
    else:
        raise TrainError(f'--optimizer {name!r}: choose one of {", ".join(OPTIMIZERS)}')
    return optax.chain(optax.clip_by_global_norm(clip_grad), tx) if clip_grad else tx


def apply(tx, grads, opt_state, params, lr, lr_scales=None):
    """One update with learning rate `lr` (a traced scalar): params - lr * direction; with `lr_scales` (flat
    key -> multiplier, layer-wise decay) params - lr * scale * direction, as timm's per-group lr (the whole
    direction, AdamW's decoupled weight decay included, is scaled)."""
    updates, opt_state = tx.update(grads, opt_state, params)
    if lr_scales is None:
        updates = jax.tree.map(lambda u: -lr * u, updates)
    else:
        updates = {k: -(lr * lr_scales[k]) * u for k, u in updates.items()}
    return optax.apply_updates(params, updates), opt_state
