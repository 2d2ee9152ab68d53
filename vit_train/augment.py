"""timm's image augmentations on the host (in grain's workers): RandAugment, AutoAugment, 3-Augment, AugMix,
ColorJitter and the random draws of RandomErasing, pixel for pixel and draw for draw as timm 1.0.

`OPS[name](img, magnitude, sign=1, **hparams)` is timm's `NAME_TO_OP[name]` applied with `LEVEL_TO_ARG[name]`
(timm.data.auto_augment): a PIL image in, a PIL image out, made by the same Pillow calls with the same
arguments. `magnitude` is timm's 0-10 scale (f = magnitude / 10; the policies clip it, an op does not);
`sign` is the sign timm draws for the ops it negates (Rotate, ShearX/Y, Translate*, the *Increasing enhance ops):
-1 where timm's `random.random() > 0.5`. hparams: `translate_const` (pixels at f = 1, default 250),
`translate_pct` (default 0.45), `img_mean` (the fill of geometric ops, default (128, 128, 128)) and
`interpolation` ('bilinear', 'bicubic', ... or a PIL constant; default bicubic, timm's when none is passed).

Where timm breaks, ours does what timm did before it broke (said per op): Pillow 13 (the one installed here)
refuses `ImageOps.posterize(img, bits)` for bits < 1, which timm's Posterize at magnitudes 0-2 and PosterizeIncreasing
at 10 ask for; older Pillow returned an all-black image (the mask ~(2**(8-bits)-1) clears every bit), so ours
does. A greyscale ('L') image with a 3-tuple fill makes Pillow raise inside timm's geometric ops; ours fills
with that colour's luma (Pillow's own RGB->L conversion of it). The training pipeline converts to RGB before
augmenting (as timm's loader does), so neither case changes what a timm run would see.

Randomness: a policy takes a `random.Random` (timm's draws from the `random` module: gates, magnitude noise,
signs, interpolation, sub-policy choice) and a `numpy.random.RandomState` (timm's draws from `np.random`: the
RandAugment op choice, AugMix's weights) and draws from them in timm's order, so a policy given
Random(s)/RandomState(s) gives the image timm gives after `random.seed(s); np.random.seed(s)`. The pipeline
derives s per element from grain's seeded per-element Generator (`TrainAugment`), so a resumed run and a run over
several processes see the same pixels.

Nothing here imports jax or torch: grain's worker processes import this module.
"""
import math
import random
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

LEVEL_DENOM = 10.0
FILL = (128, 128, 128)
HPARAMS_DEFAULT = dict(translate_const=250, img_mean=FILL)
BILINEAR, BICUBIC = Image.Resampling.BILINEAR, Image.Resampling.BICUBIC
RANDOM_INTERPOLATION = (BILINEAR, BICUBIC)
_INTERP_NAMES = {'nearest': Image.Resampling.NEAREST, 'bilinear': BILINEAR, 'bicubic': BICUBIC,
                 'lanczos': Image.Resampling.LANCZOS, 'box': Image.Resampling.BOX, 'hamming': Image.Resampling.HAMMING}


class AugmentError(ValueError):
    """A policy string or augmentation value that is refused (one line naming the token)."""


def pil_interpolation(value):
    """'bilinear' / 'bicubic' / ... or a PIL resampling constant -> the PIL constant."""
    if isinstance(value, str):
        if value not in _INTERP_NAMES:
            raise AugmentError(f'interpolation {value!r} is not one of {", ".join(_INTERP_NAMES)}')
        return _INTERP_NAMES[value]
    return value


# ---------------------------------------------------------------- the ops (Pillow calls as timm makes them)

def _fill(img, hp):
    fill = hp.get('img_mean', FILL)
    if img.mode == 'L' and isinstance(fill, (tuple, list)) and len(fill) == 3:
        # timm raises here (Pillow: "color must be int or single-element tuple"); the colour's luma instead
        fill = Image.new('RGB', (1, 1), tuple(int(c) for c in fill)).convert('L').getpixel((0, 0))
    return fill


def _affine(img, coeffs, hp):
    return img.transform(img.size, Image.AFFINE, coeffs, resample=pil_interpolation(hp.get('interpolation', BICUBIC)),
                         fillcolor=_fill(img, hp))


def _f(magnitude):
    return magnitude / LEVEL_DENOM


def auto_contrast(img, magnitude=0, sign=1, **hp):
    """ImageOps.autocontrast (no argument)."""
    return ImageOps.autocontrast(img)


def equalize(img, magnitude=0, sign=1, **hp):
    """ImageOps.equalize (no argument)."""
    return ImageOps.equalize(img)


def invert(img, magnitude=0, sign=1, **hp):
    """ImageOps.invert (no argument)."""
    return ImageOps.invert(img)


def rotate(img, magnitude, sign=1, **hp):
    """img.rotate(sign * 30f degrees) about the centre, no expand, filled with img_mean."""
    return img.rotate(sign * _f(magnitude) * 30.0, resample=pil_interpolation(hp.get('interpolation', BICUBIC)),
                      fillcolor=_fill(img, hp))


def _posterize_bits(img, bits):
    if bits >= 8:
        return img
    if bits < 1:
        # Pillow 13 refuses bits < 1 (timm raises); older Pillow's mask cleared every bit: all black
        return img.point([0] * 256 * len(img.getbands())) if img.mode in ('L', 'RGB') else ImageOps.posterize(img, 1)
    return ImageOps.posterize(img, bits)


def posterize(img, magnitude, sign=1, **hp):
    """Keep int(4f) bits (TF EfficientNet's; 0 bits, magnitudes 0-2, is all black as Pillow < 13 gave)."""
    return _posterize_bits(img, int(_f(magnitude) * 4))


def posterize_increasing(img, magnitude, sign=1, **hp):
    """Keep 4 - int(4f) bits (0 bits, magnitude 10, is all black as Pillow < 13 gave)."""
    return _posterize_bits(img, 4 - int(_f(magnitude) * 4))


def posterize_original(img, magnitude, sign=1, **hp):
    """Keep int(4f) + 4 bits (the AutoAugment paper's)."""
    return _posterize_bits(img, int(_f(magnitude) * 4) + 4)


def _solarize_thresh(magnitude):
    return min(256, int(_f(magnitude) * 256))


def solarize(img, magnitude, sign=1, **hp):
    """Invert pixels >= min(256, int(256f))."""
    return ImageOps.solarize(img, _solarize_thresh(magnitude))


def solarize_increasing(img, magnitude, sign=1, **hp):
    """Invert pixels >= 256 - min(256, int(256f))."""
    return ImageOps.solarize(img, 256 - _solarize_thresh(magnitude))


def solarize_add(img, magnitude, sign=1, **hp):
    """Pixels < 128 get + min(128, int(110f)), clipped at 255 (L and RGB; other modes unchanged)."""
    add = min(128, int(_f(magnitude) * 110))
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    if img.mode == 'RGB':
        return img.point(lut * 3)
    return img.point(lut) if img.mode == 'L' else img


def _enhancer(cls, increasing):
    def op(img, magnitude, sign=1, **hp):
        if increasing:
            factor = max(0.1, 1.0 + sign * _f(magnitude) * 0.9)
        else:
            factor = _f(magnitude) * 1.8 + 0.1
        return cls(img).enhance(factor)
    what = f'max(0.1, 1 + sign * 0.9f)' if increasing else '1.8f + 0.1 (never negated)'
    op.__doc__ = f'ImageEnhance.{cls.__name__} with factor {what}.'
    return op


def shear_x(img, magnitude, sign=1, **hp):
    """Affine (1, k, 0, 0, 1, 0), k = sign * 0.3f."""
    return _affine(img, (1, sign * _f(magnitude) * 0.3, 0, 0, 1, 0), hp)


def shear_y(img, magnitude, sign=1, **hp):
    """Affine (1, 0, 0, k, 1, 0), k = sign * 0.3f."""
    return _affine(img, (1, 0, 0, sign * _f(magnitude) * 0.3, 1, 0), hp)


def translate_x(img, magnitude, sign=1, **hp):
    """out(x, y) = in(x + t, y), t = sign * f * translate_const pixels."""
    t = sign * _f(magnitude) * float(hp.get('translate_const', 250))
    return _affine(img, (1, 0, t, 0, 1, 0), hp)


def translate_y(img, magnitude, sign=1, **hp):
    """out(x, y) = in(x, y + t), t = sign * f * translate_const pixels."""
    t = sign * _f(magnitude) * float(hp.get('translate_const', 250))
    return _affine(img, (1, 0, 0, 0, 1, t), hp)


def translate_x_rel(img, magnitude, sign=1, **hp):
    """out(x, y) = in(x + t, y), t = sign * f * translate_pct * width."""
    t = sign * _f(magnitude) * hp.get('translate_pct', 0.45) * img.size[0]
    return _affine(img, (1, 0, t, 0, 1, 0), hp)


def translate_y_rel(img, magnitude, sign=1, **hp):
    """out(x, y) = in(x, y + t), t = sign * f * translate_pct * height."""
    t = sign * _f(magnitude) * hp.get('translate_pct', 0.45) * img.size[1]
    return _affine(img, (1, 0, 0, 0, 1, t), hp)


def _minmax(magnitude, lo, hi):
    return max(lo, min(hi, lo + (hi - lo) * _f(magnitude)))


def desaturate(img, magnitude, sign=1, **hp):
    """ImageEnhance.Color(1 - d), d = 0.5 + 0.5f clamped to [0.5, 1] (10: greyscale)."""
    d = _minmax(magnitude, 0.5, 1.0)
    return ImageEnhance.Color(img).enhance(min(1.0, max(0.0, 1.0 - d)))


def gaussian_blur(img, magnitude, sign=1, **hp):
    """GaussianBlur(radius 0.1 + 1.9f, clamped to [0.1, 2])."""
    return img.filter(ImageFilter.GaussianBlur(radius=_minmax(magnitude, 0.1, 2.0)))


def gaussian_blur_rand(img, magnitude, sign=1, u=0.5, **hp):
    """GaussianBlur(radius ~ U(0.1, 2 f')), f' = f clamped to [0, 1]; `u` in [0, 1) is the uniform draw
    (timm's `random.uniform(0.1, 2 f')` is 0.1 + (2 f' - 0.1) * random())."""
    f = _minmax(magnitude, 0.0, 1.0)
    return img.filter(ImageFilter.GaussianBlur(radius=0.1 + (2.0 * f - 0.1) * u))


OPS = {
    'AutoContrast': auto_contrast,
    'Equalize': equalize,
    'Invert': invert,
    'Rotate': rotate,
    'Posterize': posterize,
    'PosterizeIncreasing': posterize_increasing,
    'PosterizeOriginal': posterize_original,
    'Solarize': solarize,
    'SolarizeIncreasing': solarize_increasing,
    'SolarizeAdd': solarize_add,
    'Color': _enhancer(ImageEnhance.Color, False),
    'ColorIncreasing': _enhancer(ImageEnhance.Color, True),
    'Contrast': _enhancer(ImageEnhance.Contrast, False),
    'ContrastIncreasing': _enhancer(ImageEnhance.Contrast, True),
    'Brightness': _enhancer(ImageEnhance.Brightness, False),
    'BrightnessIncreasing': _enhancer(ImageEnhance.Brightness, True),
    'Sharpness': _enhancer(ImageEnhance.Sharpness, False),
    'SharpnessIncreasing': _enhancer(ImageEnhance.Sharpness, True),
    'ShearX': shear_x,
    'ShearY': shear_y,
    'TranslateX': translate_x,
    'TranslateY': translate_y,
    'TranslateXRel': translate_x_rel,
    'TranslateYRel': translate_y_rel,
    'Desaturate': desaturate,
    'GaussianBlur': gaussian_blur,
    'GaussianBlurRand': gaussian_blur_rand,
}
# the ops whose argument timm negates at random (one `random.random()` per call, even at magnitude 0)
SIGNED = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel',
                    'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing', 'SharpnessIncreasing'})
# the ops that draw their interpolation (`random.choice((BILINEAR, BICUBIC))`) when hparams name none
GEOMETRIC = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY', 'TranslateXRel', 'TranslateYRel'})

# ---------------------------------------------------------------- op lists (timm's, in timm's order)

RAND_TRANSFORMS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'SolarizeAdd', 'Color',
                   'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']
RAND_INCREASING_TRANSFORMS = ['AutoContrast', 'Equalize', 'Invert', 'Rotate', 'PosterizeIncreasing',
                              'SolarizeIncreasing', 'SolarizeAdd', 'ColorIncreasing', 'ContrastIncreasing',
                              'BrightnessIncreasing', 'SharpnessIncreasing', 'ShearX', 'ShearY', 'TranslateXRel',
                              'TranslateYRel']
RAND_3A = ['SolarizeIncreasing', 'Desaturate', 'GaussianBlur']
RAND_WEIGHTED_3A = {'SolarizeIncreasing': 6, 'Desaturate': 6, 'GaussianBlur': 6, 'Rotate': 3, 'ShearX': 2,
                    'ShearY': 2, 'PosterizeIncreasing': 1, 'AutoContrast': 1, 'ColorIncreasing': 1,
                    'SharpnessIncreasing': 1, 'ContrastIncreasing': 1, 'BrightnessIncreasing': 1, 'Equalize': 1,
                    'Invert': 1}
RAND_WEIGHTED_0 = {'Rotate': 3, 'ShearX': 2, 'ShearY': 2, 'TranslateXRel': 1, 'TranslateYRel': 1,
                   'ColorIncreasing': .25, 'SharpnessIncreasing': 0.25, 'AutoContrast': 0.25,
                   'SolarizeIncreasing': .05, 'SolarizeAdd': .05, 'ContrastIncreasing': .05,
                   'BrightnessIncreasing': .05, 'Equalize': .05, 'PosterizeIncreasing': 0.05, 'Invert': 0.05}
AUGMIX_TRANSFORMS = ['AutoContrast', 'ColorIncreasing', 'ContrastIncreasing', 'BrightnessIncreasing',
                     'SharpnessIncreasing', 'Equalize', 'Rotate', 'PosterizeIncreasing', 'SolarizeIncreasing',
                     'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel']


def _aa_policy(name: str):
    """timm's AutoAugment sub-policies: [[(op, prob, magnitude), ...], ...]."""
    p = 'PosterizeIncreasing' if name.endswith('r') else None
    if name in ('v0', 'v0r'):
        post = p or 'Posterize'
        return [
            [('Equalize', 0.8, 1), ('ShearY', 0.8, 4)], [('Color', 0.4, 9), ('Equalize', 0.6, 3)],
            [('Color', 0.4, 1), ('Rotate', 0.6, 8)], [('Solarize', 0.8, 3), ('Equalize', 0.4, 7)],
            [('Solarize', 0.4, 2), ('Solarize', 0.6, 2)], [('Color', 0.2, 0), ('Equalize', 0.8, 8)],
            [('Equalize', 0.4, 8), ('SolarizeAdd', 0.8, 3)], [('ShearX', 0.2, 9), ('Rotate', 0.6, 8)],
            [('Color', 0.6, 1), ('Equalize', 1.0, 2)], [('Invert', 0.4, 9), ('Rotate', 0.6, 0)],
            [('Equalize', 1.0, 9), ('ShearY', 0.6, 3)], [('Color', 0.4, 7), ('Equalize', 0.6, 0)],
            [(post, 0.4, 6), ('AutoContrast', 0.4, 7)], [('Solarize', 0.6, 8), ('Color', 0.6, 9)],
            [('Solarize', 0.2, 4), ('Rotate', 0.8, 9)], [('Rotate', 1.0, 7), ('TranslateYRel', 0.8, 9)],
            [('ShearX', 0.0, 0), ('Solarize', 0.8, 4)], [('ShearY', 0.8, 0), ('Color', 0.6, 4)],
            [('Color', 1.0, 0), ('Rotate', 0.6, 2)], [('Equalize', 0.8, 4), ('Equalize', 0.0, 8)],
            [('Equalize', 1.0, 4), ('AutoContrast', 0.6, 2)], [('ShearY', 0.4, 7), ('SolarizeAdd', 0.6, 7)],
            [(post, 0.8, 2), ('Solarize', 0.6, 10)], [('Solarize', 0.6, 8), ('Equalize', 0.6, 1)],
            [('Color', 0.8, 6), ('Rotate', 0.4, 5)]]
    if name in ('original', 'originalr'):
        post = p or 'PosterizeOriginal'
        return [
            [(post, 0.4, 8), ('Rotate', 0.6, 9)], [('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)],
            [('Equalize', 0.8, 8), ('Equalize', 0.6, 3)], [(post, 0.6, 7), (post, 0.6, 6)],
            [('Equalize', 0.4, 7), ('Solarize', 0.2, 4)], [('Equalize', 0.4, 4), ('Rotate', 0.8, 8)],
            [('Solarize', 0.6, 3), ('Equalize', 0.6, 7)], [(post, 0.8, 5), ('Equalize', 1.0, 2)],
            [('Rotate', 0.2, 3), ('Solarize', 0.6, 8)], [('Equalize', 0.6, 8), (post, 0.4, 6)],
            [('Rotate', 0.8, 8), ('Color', 0.4, 0)], [('Rotate', 0.4, 9), ('Equalize', 0.6, 2)],
            [('Equalize', 0.0, 7), ('Equalize', 0.8, 8)], [('Invert', 0.6, 4), ('Equalize', 1.0, 8)],
            [('Color', 0.6, 4), ('Contrast', 1.0, 8)], [('Rotate', 0.8, 8), ('Color', 1.0, 2)],
            [('Color', 0.8, 8), ('Solarize', 0.8, 7)], [('Sharpness', 0.4, 7), ('Invert', 0.6, 8)],
            [('ShearX', 0.6, 5), ('Equalize', 1.0, 9)], [('Color', 0.4, 0), ('Equalize', 0.6, 3)],
            [('Equalize', 0.4, 7), ('Solarize', 0.2, 4)], [('Solarize', 0.6, 5), ('AutoContrast', 0.6, 5)],
            [('Invert', 0.6, 4), ('Equalize', 1.0, 8)], [('Color', 0.6, 4), ('Contrast', 1.0, 8)],
            [('Equalize', 0.8, 8), ('Equalize', 0.6, 3)]]
    if name == '3a':
        return [[('Solarize', 1.0, 5)], [('Desaturate', 1.0, 10)], [('GaussianBlurRand', 1.0, 10)]]
    raise AugmentError(f'unknown AutoAugment policy {name!r}')


AA_POLICIES = ('original', 'originalr', 'v0', 'v0r', '3a')

# ---------------------------------------------------------------- one op as a policy applies it


class AugmentOp:
    """timm's AugmentOp: gate (random() > prob skips; only when prob < 1), magnitude noise (gauss(m, mstd), or
    uniform(0, m) for mstd = inf), clip to [0, mmax or 10], sign, interpolation: drawn in that order from `pyrng`."""

    def __init__(self, name: str, prob: float = 0.5, magnitude: float = 10, hparams: Optional[dict] = None):
        hparams = dict(HPARAMS_DEFAULT if hparams is None else hparams)
        self.name, self.fn, self.prob, self.magnitude = name, OPS[name], prob, magnitude
        self.mstd = hparams.pop('magnitude_std', 0)
        self.mmax = hparams.pop('magnitude_max', None)
        self.hparams = {k: v for k, v in hparams.items()
                        if k in ('translate_const', 'translate_pct', 'img_mean', 'interpolation')}
        self.hparams.setdefault('img_mean', FILL)

    def __call__(self, img, pyrng: random.Random):
        if self.prob < 1.0 and pyrng.random() > self.prob:
            return img
        m = self.magnitude
        if self.mstd > 0:
            m = pyrng.uniform(0, m) if self.mstd == float('inf') else pyrng.gauss(m, self.mstd)
        m = max(0.0, min(m, self.mmax or LEVEL_DENOM))
        kw = dict(self.hparams)
        sign = -1 if self.name in SIGNED and pyrng.random() > 0.5 else 1
        if self.name in GEOMETRIC and 'interpolation' not in kw:
            kw['interpolation'] = pyrng.choice(RANDOM_INTERPOLATION)
        if self.name == 'GaussianBlurRand':
            kw['u'] = pyrng.random()
        return self.fn(img, m, sign, **kw)

    def __repr__(self):
        return f'{self.name}(p={self.prob}, m={self.magnitude}, mstd={self.mstd}, mmax={self.mmax})'


# ---------------------------------------------------------------- policies and their strings

def _split(token: str):
    """timm's key/value split: the key is everything before the first digit."""
    parts = re.split(r'(\d.*)', token)
    return (parts[0], parts[1]) if len(parts) >= 2 else (token, None)


def _num(kind, text, token, where):
    try:
        return kind(text)
    except ValueError:
        raise AugmentError(f'{where}: token {token!r} wants {"an integer" if kind is int else "a number"} '
                           f'after {token[:len(token) - len(text)]!r}') from None


class RandAugment:
    """timm's RandAugment: n ops chosen per image by `nprng.choice` (with replacement; weighted sets without),
    each applied as `AugmentOp`."""

    def __init__(self, ops: List[AugmentOp], n: int = 2, weights=None):
        self.ops, self.n, self.weights = ops, n, weights

    def __call__(self, img, pyrng, nprng):
        idx = nprng.choice(len(self.ops), self.n, replace=self.weights is None, p=self.weights)
        for i in idx:
            img = self.ops[i](img, pyrng)
        return img

    def choose(self, nprng):
        """The op names one image gets (the draw __call__ makes first); for tests and statistics."""
        return [self.ops[i].name for i in nprng.choice(len(self.ops), self.n, replace=self.weights is None,
                                                        p=self.weights)]


class AutoAugment:
    """timm's AutoAugment: one sub-policy per image by `pyrng.choice`, its ops applied in order."""

    def __init__(self, policy: List[List[AugmentOp]]):
        self.policy = policy

    def __call__(self, img, pyrng, nprng=None):
        for op in pyrng.choice(self.policy):
            img = op(img, pyrng)
        return img

    def choose(self, pyrng):
        """The sub-policy (its op names) one image gets (the draw __call__ makes first); for tests."""
        return [op.name for op in pyrng.choice(self.policy)]


class AugMix:
    """timm's AugMixAugment (basic, or blended with b1): chain weights ~ Dirichlet(alpha), blend ~ Beta(alpha,
    alpha), depth U{1,2,3} when d < 1, ops chosen with replacement: all from `nprng`; the ops' draws from `pyrng`."""

    def __init__(self, ops, alpha=1.0, width=3, depth=-1, blended=False):
        self.ops, self.alpha, self.width, self.depth, self.blended = ops, alpha, width, depth, blended

    def _chain(self, img, pyrng, nprng):
        depth = self.depth if self.depth > 0 else nprng.randint(1, 4)
        for i in nprng.choice(len(self.ops), depth, replace=True):
            img = self.ops[i](img, pyrng)
        return img

    def __call__(self, img, pyrng, nprng):
        ws = np.float32(nprng.dirichlet([self.alpha] * self.width))
        m = np.float32(nprng.beta(self.alpha, self.alpha))
        if self.blended:
            ws = ws * m
            cump, rws = 1.0, []
            for w in ws[::-1]:
                a = w / cump
                cump *= (1 - a)
                rws.append(a)
            orig = img.copy()
            for w in np.array(rws[::-1], dtype=np.float32):
                img = Image.blend(img, self._chain(orig, pyrng, nprng), w)
            return img
        mixed = np.zeros_like(img, dtype=np.float32)
        for w in ws:
            mixed += w * np.asarray(self._chain(img, pyrng, nprng), dtype=np.float32)
        np.clip(mixed, 0, 255.0, out=mixed)
        return Image.blend(img, Image.fromarray(mixed.astype(np.uint8)), m)


def policy_hparams(img_size: int, mean: Sequence[float], interpolation=None) -> dict:
    """The hparams timm's create_transform gives the policies: translate_const int(0.45 * size), img_mean
    round(255 * mean), and the interpolation unless it is 'random' (then each geometric op draws one)."""
    hp = dict(translate_const=int(img_size * 0.45), img_mean=tuple(min(255, round(255 * x)) for x in mean))
    if interpolation and interpolation != 'random':
        hp['interpolation'] = pil_interpolation(interpolation)
    return hp


def parse_policy(text: str, hparams: Optional[dict] = None, where: str = '--aa'):
    """A policy from timm's string: `rand-<tokens>` (m, n, p, mstd, mmax, inc, t), `augmix-<tokens>` (m, w, d,
    a, b, mstd), or an AutoAugment name (original, originalr, v0, v0r, 3a) with an optional `mstd` token.

    Stricter than timm, which ignores a token without a digit and clips an out-of-range magnitude silently: an
    unknown token, a value that does not parse, a magnitude outside [0, mmax] (mmax defaults to 10),
    a probability outside [0, 1] or an unknown transform set is an AugmentError naming the token."""
    hp = dict(HPARAMS_DEFAULT if hparams is None else hparams)
    parts = text.split('-')
    head, tokens = parts[0], parts[1:]
    if head == 'rand':
        return _parse_rand(text, tokens, hp, where)
    if head == 'augmix':
        return _parse_augmix(text, tokens, hp, where)
    if head in AA_POLICIES:
        for tok in tokens:
            key, val = _split(tok)
            if key != 'mstd' or val is None:
                raise AugmentError(f'{where} {text}: unknown token {tok!r} (an AutoAugment policy takes only mstd<float>)')
            mstd = _num(float, val, tok, f'{where} {text}')
            if mstd < 0:
                raise AugmentError(f'{where} {text}: token {tok!r}: the magnitude std must be >= 0')
            hp.setdefault('magnitude_std', mstd)
        return AutoAugment([[AugmentOp(*a, hparams=hp) for a in sp] for sp in _aa_policy(head)])
    raise AugmentError(f'{where} {text}: unknown policy {head!r} (rand-..., augmix-..., {", ".join(AA_POLICIES)})')


def _parse_rand(text, tokens, hp, where):
    w = f'{where} {text}'
    m, n, p, inc, tset, mtok = 10, 2, 0.5, False, None, None
    for tok in tokens:
        if tok.startswith('t'):
            tset = tok[1:]
            if tset not in ('weights', '3a', '3aw'):
                raise AugmentError(f'{w}: unknown transform set {tok!r} (tweights, t3a, t3aw)')
            continue
        key, val = _split(tok)
        if val is None:
            raise AugmentError(f'{w}: unknown token {tok!r}')
        if key == 'mstd':
            mstd = _num(float, val, tok, w)
            if mstd < 0:
                raise AugmentError(f'{w}: token {tok!r}: the magnitude std must be >= 0')
            hp.setdefault('magnitude_std', float('inf') if mstd > 100 else mstd)
        elif key == 'mmax':
            hp.setdefault('magnitude_max', _num(int, val, tok, w))
        elif key == 'inc':
            inc = bool(_num(int, val, tok, w))
        elif key == 'm':
            m, mtok = _num(int, val, tok, w), tok
        elif key == 'n':
            n = _num(int, val, tok, w)
            if n < 0:
                raise AugmentError(f'{w}: token {tok!r}: the number of ops must be >= 0')
        elif key == 'p':
            p = _num(float, val, tok, w)
            if not 0 <= p <= 1:
                raise AugmentError(f'{w}: token {tok!r}: the probability must be in [0, 1]')
        else:
            raise AugmentError(f'{w}: unknown token {tok!r} (m, n, p, mstd, mmax, inc, t)')
    mmax = hp.get('magnitude_max') or LEVEL_DENOM
    if mmax > 30:
        raise AugmentError(f'{w}: token mmax{mmax:g}: the magnitude clip must be at most 30')
    if not 0 <= m <= mmax:
        raise AugmentError(f'{w}: token {mtok!r}: magnitude {m} is outside [0, {mmax:g}]'
                           + (' (add mmax<M> to go past 10, as timm does)' if m > mmax == LEVEL_DENOM else ''))
    names = {'weights': RAND_WEIGHTED_0, '3aw': RAND_WEIGHTED_3A, '3a': RAND_3A}.get(
        tset, RAND_INCREASING_TRANSFORMS if inc else RAND_TRANSFORMS)
    weights = None
    if isinstance(names, dict):
        names, weights = list(names), np.array(list(names.values()), dtype=np.float64)
        weights = weights / weights.sum()
        if n > len(names):
            raise AugmentError(f'{w}: n{n} ops without replacement from a set of {len(names)}')
    return RandAugment([AugmentOp(name, prob=p, magnitude=m, hparams=hp) for name in names], n, weights)


def _parse_augmix(text, tokens, hp, where):
    w = f'{where} {text}'
    m, width, depth, alpha, blended = 3, 3, -1, 1.0, False
    hp.setdefault('translate_pct', 0.3)
    for tok in tokens:
        key, val = _split(tok)
        if val is None:
            raise AugmentError(f'{w}: unknown token {tok!r}')
        if key == 'mstd':
            hp.setdefault('magnitude_std', _num(float, val, tok, w))
        elif key == 'm':
            m = _num(int, val, tok, w)
            if not 0 <= m <= 10:
                raise AugmentError(f'{w}: token {tok!r}: magnitude {m} is outside [0, 10]')
        elif key == 'w':
            width = _num(int, val, tok, w)
        elif key == 'd':
            depth = _num(int, val, tok, w)
        elif key == 'a':
            alpha = _num(float, val, tok, w)
        elif key == 'b':
            blended = bool(_num(int, val, tok, w))
        else:
            raise AugmentError(f'{w}: unknown token {tok!r} (m, w, d, a, b, mstd)')
    if width < 1 or alpha <= 0:
        raise AugmentError(f'{w}: the chain width must be >= 1 and alpha > 0')
    hp.setdefault('magnitude_std', float('inf'))
    return AugMix([AugmentOp(name, prob=1.0, magnitude=m, hparams=hp) for name in AUGMIX_TRANSFORMS],
                  alpha, width, depth, blended)


# ---------------------------------------------------------------- ColorJitter (torchvision's, on PIL images)

def adjust_hue(img, hue_factor: float):
    """torchvision's PIL adjust_hue: H of HSV shifted by uint8(int32(hue * 255)), wrapping; L images unchanged."""
    if img.mode in ('L', '1', 'I', 'F'):
        return img
    h, s, v = img.convert('HSV').split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.int32(hue_factor * 255).astype(np.uint8)
    return Image.merge('HSV', (Image.fromarray(np_h, 'L'), s, v)).convert(img.mode)


class ColorJitter:
    """torchvision's ColorJitter(brightness, contrast, saturation, hue) on PIL images, as timm's create_transform
    builds it from `--color-jitter x` ((x, x, x), no hue): a random order of the four adjustments, factors
    U(max(0, 1 - x), 1 + x) (hue U(-h, h)), drawn in the order brightness, contrast, saturation, hue. The
    draws come from `pyrng` (torchvision's come from torch's generator): same distribution, same Pillow calls."""

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        def rng_(x, center=1.0, lo=0.0):
            return None if not x else (max(lo, center - x), center + x)
        self.ranges = (rng_(brightness), rng_(contrast), rng_(saturation), (-hue, hue) if hue else None)

    def params(self, pyrng: random.Random):
        order = list(range(4))
        pyrng.shuffle(order)
        return order, [None if r is None else pyrng.uniform(*r) for r in self.ranges]

    def __call__(self, img, pyrng):
        order, factors = self.params(pyrng)
        return self.apply(img, order, factors)

    @staticmethod
    def apply(img, order, factors):
        b, c, s, h = factors
        for i in order:
            if i == 0 and b is not None:
                img = ImageEnhance.Brightness(img).enhance(b)
            elif i == 1 and c is not None:
                img = ImageEnhance.Contrast(img).enhance(c)
            elif i == 2 and s is not None:
                img = ImageEnhance.Color(img).enhance(s)
            elif i == 3 and h is not None:
                img = adjust_hue(img, h)
        return img


# ---------------------------------------------------------------- RandomErasing's boxes

REMODES = ('const', 'rand', 'pixel')


def erase_boxes(pyrng: random.Random, height: int, width: int, probability: float, max_count: int = 1,
                min_count: int = 1, min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                max_aspect: Optional[float] = None) -> np.ndarray:
    """timm's RandomErasing._erase draws, in its order from `pyrng`: skip when random() > probability; count =
    randint(min_count, max_count) (no draw when they are equal); per box up to 10 attempts of target area
    U(min_area, max_area) * H * W / count and aspect exp(U(log min_aspect, log max_aspect)), h = round(sqrt(
    area * aspect)), w = round(sqrt(area / aspect)), accepted when w < W and h < H, then top = randint(0, H - h),
    left = randint(0, W - w). Returns int32 (max_count, 4) rows (top, left, h, w); unused rows are zeros (an empty
    box). The fill (0, or N(0, 1) per box and channel, or per pixel, in normalised space) is drawn where the
    image is normalised (`vit_train.erasing`), as timm's prefetcher does on the GPU."""
    boxes = np.zeros((max(1, max_count), 4), np.int32)
    if pyrng.random() > probability:
        return boxes
    log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))
    area = height * width
    count = min_count if min_count == max_count else pyrng.randint(min_count, max_count)
    for k in range(count):
        for _ in range(10):
            target = pyrng.uniform(min_area, max_area) * area / count
            aspect = math.exp(pyrng.uniform(*log_aspect))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = pyrng.randint(0, height - h)
                left = pyrng.randint(0, width - w)
                boxes[k] = (top, left, h, w)
                break
    return boxes


# ---------------------------------------------------------------- the training augmentation (after crop + flip)

def parse_color_jitter(value, where='--color-jitter'):
    """timm's --color-jitter: one number x for (x, x, x) (brightness, contrast, saturation; no hue), or 3 or 4."""
    vals = [float(value)] * 3 if np.isscalar(value) else [float(v) for v in value]
    if len(vals) not in (3, 4) or any(v < 0 or not math.isfinite(v) for v in vals) or (len(vals) == 4 and vals[3] > 0.5):
        raise AugmentError(f'{where} {value}: wants numbers >= 0 (a hue at most 0.5)')
    return ColorJitter(*vals)


class TrainAugment:
    """timm's create_transform(is_training=True) between the flip and ToTensor: the `aa` policy, then ColorJitter
    when there is no policy (or the policy is 3a, where timm keeps it); and the erasing boxes. Picklable (grain's
    workers get a copy).

    `__call__(img, rng)` takes the element's numpy Generator (grain's per-element seeded one) and draws four
    32-bit seeds from it, always all four, in a fixed order (policy, jitter, erasing, erasing noise), so turning
    one augmentation on or off leaves the others' pixels as they were. Returns (RGB image, extras): extras is
    {} or, with erasing, {'erase': int32 (recount, 4) boxes, 'erase_seed': uint32 seed of the fill noise}."""

    def __init__(self, aa: Optional[str], color_jitter, reprob: float, recount: int, img_size: int,
                 mean: Sequence[float], interpolation='bilinear'):
        self.aa_text = aa
        self.policy = parse_policy(aa, policy_hparams(img_size, mean, interpolation)) if aa else None
        keep_jitter = not aa or '3a' in aa
        self.jitter = parse_color_jitter(color_jitter) if keep_jitter and color_jitter else None
        self.reprob, self.recount, self.size = reprob, recount, img_size

    @property
    def active(self):
        return bool(self.policy or self.jitter or self.reprob)

    def __call__(self, img, rng: np.random.Generator) -> Tuple[Image.Image, Dict[str, np.ndarray]]:
        s_aa, s_cj, s_er, s_noise = (int(x) for x in rng.integers(0, 2 ** 32 - 1, size=4, dtype=np.uint64))
        if img.mode != 'RGB':
            img = img.convert('RGB')  # timm's loader reads every image as RGB
        if self.policy is not None:
            img = self.policy(img, random.Random(s_aa), np.random.RandomState(s_aa))
        if self.jitter is not None:
            img = self.jitter(img, random.Random(s_cj))
        extras = {}
        if self.reprob:
            extras = dict(erase=erase_boxes(random.Random(s_er), self.size, self.size, self.reprob, self.recount),
                          erase_seed=np.uint32(s_noise))
        return img, extras


def describe(aa, color_jitter, reprob, remode, recount, aug_repeats) -> str:
    """The start-up line's account of the training augmentation."""
    parts = [f'--aa {aa}' if aa else 'no --aa policy']
    if color_jitter and (not aa or '3a' in aa):
        parts.append(f'color jitter {color_jitter:g}')
    elif color_jitter:
        parts.append('no color jitter (timm drops it under an --aa policy other than 3a)')
    parts.append(f'random erasing p={reprob:g} mode={remode} count 1-{recount}' if reprob else 'no random erasing')
    if aug_repeats > 1:
        parts.append(f'each image {aug_repeats} times in a row (--aug-repeats; an epoch sees 1/{aug_repeats} of '
                     f'the images)')
    return ', '.join(parts)
