"""The augmentation in the training pipeline: timm's create_transform order on the host (crop + flip, policy,
jitter, erasing boxes), repeated augmentation (RepeatAugSampler's semantics) over processes and resumption,
the erasing fill on the device, and the flags' one-line refusals."""
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_train import augment as A, data, erasing
from vit_train.errors import TrainError

N, B = 45, 9  # 5 steps per epoch
MEAN = (0.485, 0.456, 0.406)


def _source():
    rng = np.random.default_rng(0)
    return data.ArraySource(rng.integers(0, 256, (N, 12, 12, 3), dtype=np.uint8), np.arange(N))


def _pipeline(aug=None, repeats=0, batch=B, process_index=0, process_count=1, **kw):
    tf = data.TrainTransform(16, 'bilinear', (0.5, 1.0), hflip=True, augment=aug)
    return data.train_iterator(_source(), tf, batch=batch, seed=3, aug_repeats=repeats, process_index=process_index,
                               process_count=process_count, **kw)


def _aug(aa='rand-m9-mstd0.5-inc1', cj=0.4, reprob=0.25, recount=1):
    return A.TrainAugment(aa, cj, reprob, recount, 16, MEAN, 'bilinear')


def test_the_transform_is_crop_flip_then_timms_policy_on_the_elements_seed():
    """Element by element: the plain pipeline's crop and flip, then the policy given the seeds TrainAugment draws
    from the same per-element Generator after them (so the plain crop is a prefix of the augmented one)."""
    aug = _aug(reprob=1.0, recount=2)
    plain, augmented = next(_pipeline()), next(_pipeline(aug))
    assert augmented['erase'].shape == (B, 2, 4) and augmented['erase_seed'].dtype == np.uint32
    assert (augmented['erase'][:, 0, 2] > 0).all()            # reprob 1: every image has a box
    assert np.array_equal(plain['label'], augmented['label'])
    assert not np.array_equal(plain['image'], augmented['image'])
    # re-derive image 0 by hand: the grain Generator of its position, the crop + flip, then the policy
    from PIL import Image
    tf = data.TrainTransform(16, 'bilinear', (0.5, 1.0), hflip=True)
    import grain
    seen = []
    ds = (grain.MapDataset.source(_source()).shuffle(seed=3)[:45].repeat(None)
          .random_map(lambda rec, rng: seen.append((rec['label'], tf.image(Image.fromarray(rec['image']), rng), rng))
                      or 0, seed=3))
    ds[0]
    label, cropped, rng = seen[0]
    assert label == plain['label'][0] and np.array_equal(np.asarray(cropped), plain['image'][0])
    img, extras = aug(cropped, rng)
    assert np.array_equal(np.asarray(img), augmented['image'][0])
    assert np.array_equal(extras['erase'], augmented['erase'][0])


def test_repeats_hold_each_image_n_times_in_a_row_augmented_apart_and_keep_the_epoch():
    it = _pipeline(_aug(), repeats=3)
    epoch = [next(it) for _ in range(N // B)]
    labels = np.concatenate([b['label'] for b in epoch])
    images = np.concatenate([b['image'] for b in epoch])
    assert len(labels) == N // B * B                            # the epoch length is kept
    groups = labels.reshape(-1, 3)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == len(groups)  # copies in a row, distinct
    copies = images.reshape(-1, 3, *images.shape[1:])
    assert all(not np.array_equal(c[0], c[1]) and not np.array_equal(c[1], c[2]) for c in copies)
    nxt = np.concatenate([next(it)['label'] for _ in range(N // B)]).reshape(-1, 3)[:, 0]
    assert set(nxt) != set(groups[:, 0])                        # the next epoch: another shuffle


def test_repeats_and_erasing_are_the_same_over_two_processes_and_after_resume():
    aug = _aug(reprob=0.5, recount=3)
    one = _pipeline(aug, 3, batch=18)  # 2 processes want a batch they split evenly: 18 rows (9 each)
    two = [_pipeline(aug, 3, batch=18, process_index=p, process_count=2) for p in range(2)]
    for step in range(5):  # across the epoch boundary (2 steps per epoch)
        b = next(one)
        halves = [next(t) for t in two]
        for k in b:
            np.testing.assert_array_equal(b[k], np.concatenate([h[k] for h in halves]), err_msg=f'{k} {step}')
    state = one.get_state()
    want = [next(one) for _ in range(2)]
    fresh = _pipeline(aug, 3, batch=18)
    fresh.set_state(state)
    skipped = _pipeline(aug, 3, batch=18, start_step=5)
    for w in want:
        for other in (next(fresh), next(skipped)):
            for k in w:
                np.testing.assert_array_equal(w[k], other[k], err_msg=k)


def test_padding_and_unreadable_rows_carry_empty_boxes():
    tf = data.TrainTransform(16, 'bilinear', augment=_aug(reprob=1.0, recount=2))
    row = tf({'pad': True, 'label': 0}, np.random.default_rng(0))
    assert row['erase'].shape == (2, 4) and not row['erase'].any() and row['weight'] == 0


def test_device_fill_writes_the_boxes_and_nothing_else():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 10, 12, 3)), jnp.float32)
    boxes = np.zeros((3, 2, 4), np.int32)
    boxes[0, 0] = (2, 3, 4, 5)
    boxes[1, 0], boxes[1, 1] = (0, 0, 3, 3), (1, 1, 3, 3)   # overlapping: the second over the first
    seeds = np.array([1, 2, 3], np.uint32)
    inside = np.zeros((3, 10, 12), bool)
    inside[0, 2:6, 3:8] = True
    inside[1, 0:3, 0:3] = inside[1, 1:4, 1:4] = True
    for mode in A.REMODES:
        y = np.asarray(jax.jit(lambda a, b, s: erasing.erase(a, b, s, mode))(x, boxes, seeds))
        assert np.array_equal(y[~inside], np.asarray(x)[~inside]), mode
        filled = y[0, 2:6, 3:8]
        if mode == 'const':
            assert not y[inside].any()
        elif mode == 'rand':
            assert (filled == filled[:1, :1]).all() and len(set(filled[0, 0])) == 3
            assert (y[1, 1:4, 1:4] == y[1, 1, 1]).all()
        else:
            assert len(np.unique(filled)) == filled.size
        np.testing.assert_array_equal(y, np.asarray(erasing.erase(x, boxes, seeds, mode)))   # seeded
    big = np.asarray(erasing.erase(jnp.zeros((64, 16, 16, 3)), np.tile([[0, 0, 16, 16]], (64, 1, 1)).astype(np.int32),
                                   np.arange(64, dtype=np.uint32), 'pixel'))
    assert abs(big.mean()) < 0.02 and abs(big.std() - 1) < 0.02   # N(0, 1) per pixel, as timm's normal_()


def _resolve(tmp_path, *argv):
    from vit_train import config
    return config.resolve(config.build_parser().parse_args([*argv, '--workdir', str(tmp_path / 'w')]))


@pytest.mark.parametrize('argv,msg', [
    (('--aa', 'rand-m9-bogus'), "--aa rand-m9-bogus: unknown token 'bogus'"),
    (('--aa', 'rand-m12'), "--aa rand-m12: token 'm12': magnitude 12 is outside [0, 10]"),
    (('--aa', 'v1'), "--aa v1: unknown policy 'v1'"),
    (('--reprob', '1.5'), '--reprob wants a probability in [0, 1], got 1.5'),
    (('--color-jitter', '-0.1'), '--color-jitter wants a number >= 0'),
    (('--recount', '0'), '--recount wants an integer >= 1, got 0'),
    (('--aug-repeats', '3', '--batch-size', '64'), '--aug-repeats 3: --batch-size 64 is not a multiple of it')])
def test_bad_augmentation_flags_are_one_line_naming_flag_and_token(tmp_path, argv, msg):
    with pytest.raises(TrainError) as e:
        _resolve(tmp_path, *argv)
    assert str(e.value).startswith(msg) and '\n' not in str(e.value)


def test_defaults_are_timms(tmp_path):
    a = _resolve(tmp_path, '--dataset', 'cifar10', '--data-path', str(tmp_path))
    assert (a.aa, a.color_jitter, a.reprob, a.remode, a.recount, a.aug_repeats) == (None, 0.4, 0.0, 'pixel', 1, 0)
    assert _resolve(tmp_path).color_jitter == 0.0    # digits: no jitter, as no flip


def test_the_command_line_refuses_a_bad_policy_with_exit_1(tmp_path, capsys):
    from vit_train import main
    assert main(['--aa', 'rand-m9-x1', '--workdir', str(tmp_path / 'w')]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and "unknown token 'x1'" in err and not (tmp_path / 'w').exists()


def test_the_pipeline_travels_to_grain_worker_processes():
    """grain's worker processes get the dataset through cloudpickle: the repeated, augmented pipeline comes back
    whole and gives the same elements (the worker run itself is test_train_units' slow test)."""
    import cloudpickle
    import grain
    tf = data.TrainTransform(16, 'bilinear', (0.5, 1.0), augment=_aug(reprob=1.0))
    ds = data.RepeatEach.make(grain.MapDataset.source(_source()).shuffle(seed=3), 3)[:45].repeat(None).random_map(
        tf, seed=3)
    copy = cloudpickle.loads(cloudpickle.dumps(ds))
    for i in (0, 1, 2, 44, 45, 100):
        a, b = ds[i], copy[i]
        assert all(np.array_equal(a[k], b[k]) for k in a), i


@pytest.mark.slow  # spawning grain's worker processes (each imports jax) takes ~30 s on the shared machine
def test_worker_processes_give_the_same_augmented_batches():
    threads, procs = _pipeline(_aug(reprob=0.5), 3), _pipeline(_aug(reprob=0.5), 3, workers=2)
    try:
        for _ in range(3):
            a, b = next(threads), next(procs)
            for k in a:
                np.testing.assert_array_equal(a[k], np.asarray(b[k]), err_msg=k)
    finally:
        procs.close()
