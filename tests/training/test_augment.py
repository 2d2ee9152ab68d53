"""vit_train.augment against timm's own code (timm.data.auto_augment, timm.data.random_erasing, torchvision's
ColorJitter): every op pixel for pixel, the policies draw for draw on the same seeds, and the op choice, the
magnitude noise and the erasing boxes against the distributions timm's code defines (statistical tests that a
wrong op list, a missing inc1 or a wrong box rule fails)."""
import math
import random
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

import timm.data.auto_augment as ta
from timm.data.random_erasing import RandomErasing
from torchvision.transforms import functional as TF

from vit_train import augment as A

RS = np.random.RandomState(0)
RGB = Image.fromarray(RS.randint(0, 256, (20, 24, 3), dtype=np.uint8))
GREY = Image.fromarray(RS.randint(0, 256, (20, 24), dtype=np.uint8))
IMAGENET_FILL = (124, 116, 104)  # round(255 * IMAGENET_DEFAULT_MEAN), what create_transform passes


def chi_square_p(observed, expected):
    """p-value of Pearson's chi-square statistic (scipy's survival function of chi2 with len - 1 dof)."""
    from scipy.stats import chisquare
    observed, expected = np.asarray(observed, float), np.asarray(expected, float)
    return chisquare(observed, expected * observed.sum() / expected.sum()).pvalue


def timm_op(name, img, magnitude, sign, hp, seed=3):
    """timm's AugmentOp at prob 1, no noise, its sign draw forced; 'black' where Pillow refuses timm's call."""
    op = ta.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hp)
    random.seed(seed)
    with mock.patch('random.random', return_value=0.9 if sign < 0 else 0.1):
        try:
            return np.asarray(op(img))
        except ValueError as e:
            assert 'bits must be between' in str(e)  # Pillow 13's posterize(img, 0)
            return 'black'


@pytest.mark.parametrize('name', sorted(ta.NAME_TO_OP))
def test_every_op_equals_timms_pixel_for_pixel(name):
    assert set(A.OPS) == set(ta.NAME_TO_OP) == set(ta.LEVEL_TO_ARG)
    refused = 0
    for img, fill in ((RGB, IMAGENET_FILL), (GREY, (120,))):
        for interp in ('bilinear', 'bicubic'):
            hp = dict(translate_const=10, img_mean=fill, interpolation=A.pil_interpolation(interp), translate_pct=0.45)
            for m in (0, 1, 5, 9, 10):
                for sign in (1, -1):
                    ref = timm_op(name, img, m, sign, hp)
                    u = random.Random(3).random()  # GaussianBlurRand's radius draw after random.seed(3)
                    ours = np.asarray(A.OPS[name](img, m, sign, u=u, **hp))
                    where = f'{name} {img.mode} {interp} m{m} sign {sign}'
                    if isinstance(ref, str):  # the documented stand-in: all black, as Pillow < 13 gave
                        refused += 1
                        assert ours.shape == np.asarray(img).shape and not ours.any(), where
                    else:
                        assert ours.dtype == ref.dtype and np.array_equal(ours, ref), where
    if name in ('Posterize', 'PosterizeIncreasing'):
        assert refused, 'timm was expected to break on Pillow 13 here'
    else:
        assert not refused


def test_ops_change_the_image_and_the_sign_matters():
    for name in A.SIGNED:
        hp = dict(interpolation='bilinear', translate_const=5)
        assert not np.array_equal(np.asarray(A.OPS[name](RGB, 9, 1, **hp)), np.asarray(A.OPS[name](RGB, 9, -1, **hp)))


def test_greyscale_with_an_rgb_fill_uses_its_luma_where_timm_raises():
    hp = dict(img_mean=IMAGENET_FILL, interpolation=A.BILINEAR)
    with pytest.raises(TypeError):
        ta.rotate(GREY, 30, fillcolor=IMAGENET_FILL, resample=A.BILINEAR)
    luma = Image.new('RGB', (1, 1), IMAGENET_FILL).convert('L').getpixel((0, 0))
    ours = A.OPS['Rotate'](GREY, 10, 1, **hp)
    assert np.array_equal(np.asarray(ours), np.asarray(GREY.rotate(30, resample=A.BILINEAR, fillcolor=luma)))


POLICIES = ['rand-m9-mstd0.5-inc1', 'rand-m9-n3-mstd0.5', 'rand-m7-n2-p1.0-mstd101', 'rand-m15-mmax15-n2',
            'rand-m9-mstd0.5-tweights', 'rand-m10-n3-t3aw', 'rand-m10-n1-t3a-inc1', 'rand-m5-p0.3',
            'original', 'originalr', 'v0', 'v0r-mstd0.5', '3a', 'augmix-m3-w3', 'augmix-m5-w2-d2-b1-a0.5']


@pytest.mark.parametrize('text', POLICIES)
@pytest.mark.parametrize('interp', [None, 'bicubic'])
def test_policies_draw_for_draw_equal_to_timm_on_the_same_seeds(text, interp):
    """timm's transform after random.seed(s) and np.random.seed(s) against ours given Random(s) and
    RandomState(s): the same image for every seed (images where Pillow 13 makes timm raise are skipped; without
    an interpolation the geometric ops draw one, as timm's default 'random')."""
    hp = dict(translate_const=int(24 * 0.45), img_mean=IMAGENET_FILL)
    if interp:
        hp['interpolation'] = A.pil_interpolation(interp)
    if text.startswith('rand'):
        theirs = ta.rand_augment_transform(text, dict(hp))
    elif text.startswith('augmix'):
        theirs = ta.augment_and_mix_transform(text, dict(hp, translate_pct=0.3))
    else:
        theirs = ta.auto_augment_transform(text, dict(hp))
    ours = A.parse_policy(text, dict(hp))
    compared = changed = 0
    for s in range(60):
        random.seed(s)
        np.random.seed(s)
        try:
            ref = np.asarray(theirs(RGB))
        except ValueError:
            continue
        got = np.asarray(ours(RGB, random.Random(s), np.random.RandomState(s)))
        assert np.array_equal(got, ref), f'{text} seed {s}'
        compared += 1
        changed += not np.array_equal(got, np.asarray(RGB))
    assert compared >= 50 and changed >= 10, (compared, changed)


def _counts(names, keys):
    return [names.count(k) for k in keys]


@pytest.mark.parametrize('text,expected', [('rand-m9-mstd0.5-inc1', A.RAND_INCREASING_TRANSFORMS),
                                           ('rand-m9-mstd0.5', A.RAND_TRANSFORMS),
                                           ('rand-m9-t3a', A.RAND_3A)])
def test_rand_op_choice_follows_timms_list(text, expected):
    """Ops chosen from our policy with independent seeds, counted per name: uniform over timm's list (chi-square
    p > 1e-4); the same counts tested against the other list (inc0 vs inc1) or a list missing an op fail."""
    policy = A.parse_policy(text)
    assert [op.name for op in policy.ops] == list(ta.rand_augment_transform(text, {}).ops[i].name
                                                  for i in range(len(policy.ops)))
    rng = np.random.default_rng(0)
    names = []
    for _ in range(1500):
        names += policy.choose(np.random.RandomState(int(rng.integers(2 ** 32))))
    keys = sorted(set(expected))
    counts = _counts(names, keys)
    assert set(names) == set(expected)
    assert chi_square_p(counts, [expected.count(k) for k in keys]) > 1e-4
    for wrong in (A.RAND_TRANSFORMS, A.RAND_INCREASING_TRANSFORMS, expected[:-1]):
        if wrong == expected:
            continue
        keys_w = sorted(set(wrong) | set(names))
        expect_w = [max(wrong.count(k), 1e-9) for k in keys_w]
        assert chi_square_p(_counts(names, keys_w), expect_w) < 1e-6, wrong


@pytest.mark.parametrize('text', ['3a', 'original', 'v0'])
def test_autoaugment_sub_policies_are_timms_and_chosen_uniformly(text):
    ours = A.parse_policy(text)
    theirs = ta.auto_augment_transform(text, {})
    assert [[(o.name, o.prob, o.magnitude) for o in sp] for sp in ours.policy] == \
        [[(o.name, o.prob, o.magnitude) for o in sp] for sp in theirs.policy]
    rng = np.random.default_rng(4)
    picks = [tuple(ours.choose(random.Random(int(rng.integers(2 ** 32))))) for _ in range(3000)]
    index = {tuple(o.name for o in sp): i for i, sp in enumerate(ours.policy)}
    counts = np.bincount([index[p] for p in picks], minlength=len(ours.policy))
    distinct = sorted(set(index.values()))  # identical sub-policies (v0/original repeat some) share an index
    assert chi_square_p(counts[distinct], [sum(index[tuple(o.name for o in sp)] == i for sp in ours.policy)
                                           for i in distinct]) > 1e-4


def test_weighted_sets_choose_without_replacement_by_timms_weights():
    policy = A.parse_policy('rand-n1-tweights')
    names, probs = ta._get_weighted_transforms(ta._RAND_WEIGHTED_0)
    chosen = []
    rng = np.random.default_rng(1)
    for _ in range(4000):
        chosen += policy.choose(np.random.RandomState(int(rng.integers(2 ** 32))))
    assert chi_square_p(_counts(chosen, list(names)), probs) > 1e-4
    picks = A.parse_policy('rand-n3-t3aw').choose(np.random.RandomState(0))
    assert len(set(picks)) == 3


def _magnitudes(policy_text, n=4000, name='Rotate'):
    """The magnitudes our policy gives a Rotate (read back from its angle) over independent seeds."""
    policy = A.parse_policy(policy_text, dict(interpolation=A.BILINEAR))
    op = next(o for o in policy.ops if o.name == name)
    got = []
    rng = np.random.default_rng(2)
    with mock.patch.object(op, 'fn', lambda img, m, sign=1, **hp: got.append(m)):
        for _ in range(n):
            op(RGB, random.Random(int(rng.integers(2 ** 32))))
    return np.array(got)


def test_magnitude_noise_follows_timms_distribution():
    """m9 mstd0.5: gauss(9, 0.5) clipped to [0, 10]; p0.5: half the calls skip; mstd > 100: U(0, m)."""
    from scipy import stats
    m = _magnitudes('rand-m9-mstd0.5-p1.0')
    assert m.max() <= 10 and stats.kstest(m[m < 10], stats.truncnorm(-18, 2, loc=9, scale=0.5).cdf).pvalue > 1e-4
    assert abs((m == 10).mean() - stats.norm.sf(2)) < 0.01
    half = _magnitudes('rand-m9-mstd0.5')
    assert abs(len(half) / 4000 - 0.5) < 0.04
    uni = _magnitudes('rand-m7-mstd101-p1.0')
    assert stats.kstest(uni, stats.uniform(0, 7).cdf).pvalue > 1e-4
    assert set(_magnitudes('rand-m9-p1.0', n=50)) == {9}
    # and timm's own draws, from its AugmentOp on the global stream, fall in the same distribution
    op = ta.AugmentOp('Rotate', prob=1.0, magnitude=9, hparams=dict(magnitude_std=0.5, img_mean=(0, 0, 0),
                                                                      interpolation=A.BILINEAR))
    seen = []
    with mock.patch.object(op, 'level_fn', lambda level, hp: (seen.append(level), 0)[1:]):
        random.seed(5)
        for _ in range(3000):
            op(RGB)
    assert stats.ks_2samp(np.array(seen), m).pvalue > 1e-4


@pytest.mark.parametrize('bad,why', [
    ('rand-m9-foo', "unknown token 'foo'"), ('rand-m11', "token 'm11': magnitude 11 is outside [0, 10]"),
    ('rand-m9-w0', "unknown token 'w0'"), ('rand-m9.5', "token 'm9.5' wants an integer"),
    ('rand-p1.5', "token 'p1.5': the probability"), ('rand-tfoo', "unknown transform set 'tfoo'"),
    ('randaug-m9', "unknown policy 'randaug'"), ('v0-m3', "unknown token 'm3'"), ('rand-m40-mmax40', 'at most 30')])
def test_bad_policy_strings_are_one_line_naming_the_token(bad, why):
    with pytest.raises(A.AugmentError) as e:
        A.parse_policy(bad)
    assert why in str(e.value) and '\n' not in str(e.value) and str(e.value).startswith(f'--aa {bad}')


def test_color_jitter_is_torchvisions_for_the_same_order_and_factors():
    for order, factors in (([0, 1, 2, 3], [1.3, 0.7, 1.2, 0.1]), ([3, 2, 1, 0], [0.6, 1.4, 0.8, -0.2]),
                           ([1, 3, 0, 2], [1.0, 1.1, None, 0.45])):
        ref = RGB
        for i in order:
            if factors[i] is not None:
                ref = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue][i](ref, factors[i])
        assert np.array_equal(np.asarray(A.ColorJitter.apply(RGB, order, factors)), np.asarray(ref))
    cj = A.parse_color_jitter(0.4)
    draws = [cj.params(random.Random(s)) for s in range(2000)]
    b = np.array([f[0] for _, f in draws])
    assert b.min() >= 0.6 and b.max() <= 1.4 and abs(b.mean() - 1) < 0.02 and all(f[3] is None for _, f in draws)
    firsts = np.bincount([o[0] for o, _ in draws], minlength=4)
    assert chi_square_p(firsts, [1, 1, 1, 1]) > 1e-4


def timm_boxes(seed, h, w, p, count):
    """timm's RandomErasing after random.seed(seed): the boxes it writes, in order, as (top, left, h, w)."""
    random.seed(seed)
    boxes = []

    def record(self, key, value):
        _, ys, xs = key
        boxes.append((ys.start, xs.start, ys.stop - ys.start, xs.stop - xs.start))
    with mock.patch.object(torch.Tensor, '__setitem__', record):
        RandomErasing(probability=p, mode='const', max_count=count, device='cpu')(torch.ones(3, h, w))
    return boxes


@pytest.mark.parametrize('count', [1, 3])
def test_erasing_boxes_are_timms_for_the_same_seed(count):
    for s in range(300):
        ours = A.erase_boxes(random.Random(s), 32, 28, 0.6, max_count=count)
        theirs = timm_boxes(s, 32, 28, 0.6, count)
        got = [tuple(int(v) for v in b) for b in ours if b[2]]
        assert got == theirs, s
        assert ours.shape == (count, 4)


def test_erasing_boxes_follow_timms_distribution():
    """Box areas (as a fraction of the image) and aspect ratios over independent seeds: areas U(0.02, 1/3) up to
    rounding, log-aspect U(log 0.3, log 1/0.3) up to the rejections; a p of 0.25 erases a quarter of the images."""
    from scipy import stats
    rng = np.random.default_rng(3)
    boxes = np.array([A.erase_boxes(random.Random(int(rng.integers(2 ** 32))), 224, 224, 1.0)[0] for _ in range(4000)])
    area = boxes[:, 2] * boxes[:, 3] / 224 ** 2
    assert stats.kstest(area, stats.uniform(0.02, 1 / 3 - 0.02).cdf).statistic < 0.03
    la = np.log(boxes[:, 2] / boxes[:, 3])
    assert abs(la.mean()) < 0.05 and np.abs(la).max() <= math.log(1 / 0.3) + 0.1
    quarter = [A.erase_boxes(random.Random(int(rng.integers(2 ** 32))), 32, 32, 0.25)[0, 2] > 0 for _ in range(4000)]
    assert abs(np.mean(quarter) - 0.25) < 0.025
    # the same distribution as timm's boxes on other seeds (two-sample KS)
    theirs = np.array([timm_boxes(s, 224, 224, 1.0, 1)[0] for s in range(10_000, 11_500)])
    assert stats.ks_2samp(theirs[:, 2] * theirs[:, 3] / 224 ** 2, area).pvalue > 1e-4


def test_train_augment_is_a_function_of_the_element_seed_only():
    aug = A.TrainAugment('rand-m9-mstd0.5-inc1', 0.4, 0.25, 1, 24, (0.485, 0.456, 0.406), 'bicubic')
    a = aug(RGB, np.random.default_rng(7))
    b = aug(RGB, np.random.default_rng(7))
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0])) and np.array_equal(a[1]['erase'], b[1]['erase'])
    assert aug.jitter is None  # timm drops the jitter when a policy is on ...
    assert A.TrainAugment('3a', 0.3, 0, 1, 24, (0.5,) * 3).jitter is not None  # ... except for 3a
    # turning erasing on leaves the policy's pixels as they were
    plain = A.TrainAugment('rand-m9-mstd0.5-inc1', 0.4, 0, 1, 24, (0.485, 0.456, 0.406), 'bicubic')
    c = plain(RGB, np.random.default_rng(7))
    assert np.array_equal(np.asarray(a[0]), np.asarray(c[0])) and c[1] == {}
    grey = aug(GREY, np.random.default_rng(7))[0]
    assert grey.mode == 'RGB'
