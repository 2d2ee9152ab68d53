"""Mixup/CutMix on the device equal timm's Mixup (timm.data.mixup, the real code) for the same lambda and box,
in every mode; the draws follow timm's distributions; the targets are timm's mixup_target with smoothing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from timm.data import mixup as tm

from vit_train import mixup

B, H, W, C, K = 8, 12, 10, 3, 5


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((B, H, W, C), dtype=np.float32), rng.integers(0, K, B)


def _timm(cfg, x, labels, params, boxes, monkeypatch):
    """timm's Mixup on the NCHW copy of x with its parameter draws replaced by `params` and its boxes by `boxes`
    (taken in the order timm asks for them)."""
    queue = list(boxes)

    def box(*a, **k):
        return tuple(int(v) for v in queue.pop(0))
    monkeypatch.setattr(tm, 'rand_bbox', box)
    monkeypatch.setattr(tm, 'rand_bbox_minmax', box)
    m = tm.Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, cutmix_minmax=cfg.cutmix_minmax,
                 prob=cfg.prob, switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.label_smoothing,
                 num_classes=K)
    monkeypatch.setattr(m, '_params_per_batch', lambda: params)
    monkeypatch.setattr(m, '_params_per_elem', lambda n: params)
    xt, yt = m(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(labels))
    return xt.numpy().transpose(0, 2, 3, 1), yt.numpy()


CASES = {
    'batch-mixup': ('batch', [0.3], [False], None),
    'batch-cutmix': ('batch', [0.55], [True], None),
    'batch-cutmix-clipped': ('batch', [0.2], [True], None),     # a box cut by the border: lam corrected
    'batch-minmax': ('batch', [0.7], [True], (0.2, 0.8)),
    'batch-off': ('batch', [1.0], [False], None),
    'pair': ('pair', [0.3, 1.0, 0.6, 0.45], [False, True, True, False], None),
    'elem': ('elem', [0.3, 1.0, 0.6, 0.45, 0.9, 0.25, 0.5, 0.7], [False, True, True, False, True, False, True, True],
             None),
    'elem-minmax': ('elem', [0.3, 0.5, 0.6, 0.45, 0.9, 1.0, 0.5, 0.7], [True] * 8, (0.3, 0.9)),
}


@pytest.mark.parametrize('case', list(CASES))
def test_images_and_targets_equal_timm_for_the_same_lambda_and_box(case, monkeypatch):
    mode, lam, use, minmax = CASES[case]
    cfg = mixup.MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, cutmix_minmax=minmax, mode=mode,
                            label_smoothing=0.1, num_classes=K)
    x, labels = _batch()
    rng = np.random.default_rng(1)
    boxes = []
    for i in range(len(lam)):
        yl, xl = rng.integers(0, H - 2), rng.integers(0, W - 2)
        yh, xh = (H, W) if case == 'batch-cutmix-clipped' else \
            (rng.integers(yl + 1, H + 1), rng.integers(xl + 1, W + 1))
        boxes.append((yl, yh, xl, xh))
    lam_np, use_np = np.float32(lam), np.array(use)
    params = (float(lam_np[0]), bool(use_np[0])) if mode == 'batch' else (lam_np.copy(), use_np.copy())
    want_x, want_y = _timm(cfg, x, labels, params, [b for b, u, lm in zip(boxes, use, lam) if u and lm != 1],
                           monkeypatch)
    got_x, got_y, _ = mixup.mix(jnp.asarray(x), jnp.asarray(labels), cfg, jnp.asarray(lam_np), jnp.asarray(use_np),
                                jnp.asarray(np.array(boxes, np.int32)))
    np.testing.assert_allclose(np.asarray(got_x), want_x, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_y), want_y, rtol=0, atol=1e-6)
    assert not np.array_equal(want_x, x) or case == 'batch-off'      # something was mixed (the test can fail)


def test_mixup_target_is_timms():
    labels = np.array([0, 3, 4, 1])
    for lam in (1.0, 0.7):
        want = tm.mixup_target(torch.from_numpy(labels), K, lam, 0.1).numpy()
        np.testing.assert_allclose(np.asarray(mixup.mixup_target(jnp.asarray(labels), K, lam, 0.1)), want, atol=1e-7)


def test_draws_follow_timms_distributions():
    """Over 4000 batch-mode draws: applied with prob, cutmix with switch_prob, lambda ~ Beta(alpha, alpha) per
    method, and the box of a cut is int(H sqrt(1 - lam)) high before clipping."""
    cfg = mixup.MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.3, num_classes=K)
    keys = jax.random.split(jax.random.PRNGKey(0), 4000)
    lam, use, box = jax.jit(jax.vmap(lambda k: mixup.draw(k, cfg, 1, 64, 64)))(keys)   # one compilation
    lam, use, box = np.asarray(lam)[:, 0], np.asarray(use)[:, 0], np.asarray(box)[:, 0]
    applied = lam != 1
    assert abs(applied.mean() - 0.7) < 0.03
    assert abs(use[applied].mean() - 0.3) < 0.03
    from scipy import stats
    assert stats.kstest(lam[applied & use], 'beta', args=(1.0, 1.0)).pvalue > 1e-3
    assert stats.kstest(lam[applied & ~use], 'beta', args=(0.8, 0.8)).pvalue > 1e-3
    inner = applied & use & (box[:, 0] > 0) & (box[:, 1] < 64)
    assert inner.sum() > 100
    np.testing.assert_array_equal(box[inner, 1] - box[inner, 0], (64 * np.sqrt(1 - lam[inner])).astype(int))


def test_minmax_boxes_lie_in_their_range():
    cfg = mixup.MixupConfig(cutmix_minmax=(0.25, 0.75), mixup_alpha=0.0, num_classes=K)
    lam, use, box = jax.jit(lambda k: mixup.draw(k, cfg, 2000, 40, 40))(jax.random.PRNGKey(3))
    box = np.asarray(box)
    h, w = box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]
    assert np.asarray(use).all() and h.min() == 10 and h.max() == 29 and w.min() == 10 and box[:, 1].max() <= 40
