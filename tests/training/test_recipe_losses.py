"""The step's losses equal timm's (the real timm.loss code): SoftTargetCrossEntropy on mixed targets,
LabelSmoothingCrossEntropy on smoothed hard targets, BinaryCrossEntropy with smoothing and a target threshold."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from vit_train import mixup, step

B, C = 6, 7


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(0, 3, (B, C)).astype(np.float32), rng.integers(0, C, B)


def _ours(logits, targets, **kw):
    return float(step.loss_per_example(jnp.asarray(logits), jnp.asarray(targets), **kw).mean())


def test_soft_target_cross_entropy_on_mixed_targets():
    logits, labels = _data()
    t = mixup_target(torch.from_numpy(labels), C, 0.7, 0.1)
    want = SoftTargetCrossEntropy()(torch.from_numpy(logits), t).item()
    assert _ours(logits, t.numpy()) == pytest.approx(want, rel=1e-6)


def test_smoothed_hard_targets_are_label_smoothing_cross_entropy():
    logits, labels = _data()
    want = LabelSmoothingCrossEntropy(0.1)(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    t = mixup.one_hot_smoothed(jnp.asarray(labels), C, 0.1)
    assert _ours(logits, t) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize('smoothing,thresh', [(0.0, None), (0.1, None), (0.0, 0.2), (0.1, 0.05)])
def test_bce_is_timms_binary_cross_entropy(smoothing, thresh):
    logits, labels = _data()
    t = mixup_target(torch.from_numpy(labels), C, 0.6, smoothing)          # dense targets as with mixing
    want = BinaryCrossEntropy(target_threshold=thresh)(torch.from_numpy(logits), t).item()
    assert _ours(logits, t.numpy(), bce=True, bce_threshold=thresh) == pytest.approx(want, rel=1e-6)
    # index targets: timm smooths them itself (the same on/off values as the CE path)
    want = BinaryCrossEntropy(smoothing=smoothing, target_threshold=thresh)(
        torch.from_numpy(logits), torch.from_numpy(labels)).item()
    t = mixup.one_hot_smoothed(jnp.asarray(labels), C, smoothing)
    assert _ours(logits, t, bce=True, bce_threshold=thresh) == pytest.approx(want, rel=1e-6)
