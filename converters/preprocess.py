"""Evaluation preprocessing in timm's vocabulary (`pretrained_cfg`), done with Pillow and numpy.

`transform(cfg)` computes what `timm.data.create_transform(**resolve_data_config(...))` computes at eval
time (torchvision's Resize of the shorter side to input/crop_pct with the named PIL filter, CenterCrop,
ToTensor, Normalize), as an NHWC float32 array for Flax, with no torch in the way.

Where the preprocessing comes from (`data_config`): what the checkpoint records (a training run's meta, a
timm config.json, a transformers folder's preprocessor_config.json: `from_hf`), else a default by kind of file: Google `.npz` weights were trained on [-1, 1] pixels
(mean = std = 0.5); a bare PyTorch file gets the normalisation of timm's default weights for its family;
resizing follows WZMIAOMIAO's Resize(256)/CenterCrop(224) (crop_pct 0.875, bilinear) scaled to the model.
"""
import io
import math
import os
from typing import Dict, Optional, Tuple

import numpy as np

from .errors import ConversionError, first_line

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
WZMIAOMIAO_CROP_PCT, WZMIAOMIAO_INTERPOLATION = 0.875, 'bilinear'   # Resize(256) / CenterCrop(224)
FIELDS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'lanczos', 'box', 'hamming')
CROP_MODES = ('center', 'squash')
# where an odd margin puts the centre crop: torchvision's CenterCrop rounds (timm), transformers' center_crop floors
CROP_OFFSETS = ('round', 'floor')
HF_PREPROCESSOR = 'preprocessor_config.json'
# PIL's resampling codes, as transformers' image processors record them (PILImageResampling)
PIL_FILTERS = {0: 'nearest', 1: 'lanczos', 2: 'bilinear', 3: 'bicubic', 4: 'box', 5: 'hamming'}


def family_default(model_name: str) -> Tuple[tuple, tuple, str]:
    """(mean, std, why): the normalisation of timm's default pretrained weights for the model's family."""
    if model_name.startswith(('deit', 'swin', 'resmlp', 'gmixer', 'cait')):
        return IMAGENET + (f"timm's default for {model_name.split('_')[0]} weights (ImageNet mean/std)",)
    if model_name.startswith(('mixer', 'gmlp')):
        return HALF + (f"timm's default for {model_name.split('_')[0]} weights (0.5/0.5, i.e. [-1, 1])",)
    return HALF + ("timm's default for ViT weights (0.5/0.5, i.e. [-1, 1])",)


def default_config(model, model_name: str, fmt: str) -> Tuple[dict, str]:
    """(pretrained_cfg, why) for a checkpoint that records no preprocessing."""
    if fmt == 'torch' or fmt == 'safetensors':
        mean, std, why = family_default(model_name)
    else:
        (mean, std), why = HALF, ("Google's convention for .npz weights (mean/std 0.5)" if fmt == 'npz'
                                  else 'mean/std 0.5, WZMIAOMIAO\'s choice')
    h, w = input_hw(model)
    cfg = dict(input_size=[3, h, w], interpolation=WZMIAOMIAO_INTERPOLATION, crop_pct=WZMIAOMIAO_CROP_PCT, crop_mode='center',
               mean=list(mean), std=list(std))
    return cfg, f'{why}; resize/crop as WZMIAOMIAO\'s Resize(256)/CenterCrop(224) (crop_pct 0.875, bilinear)'


def input_hw(model) -> Tuple[int, int]:
    return tuple(int(v) for v in model.input_shape[:2])


def resolve(recorded: Optional[dict], model, where: str) -> dict:
    """A complete, checked config: `recorded` (timm's pretrained_cfg vocabulary) on top of the defaults
    timm's `resolve_data_config` uses for missing fields (bicubic, crop_pct 0.875, center, ImageNet
    mean/std), the input size the model's own."""
    if recorded is not None and not isinstance(recorded, dict):
        raise ConversionError(f'{where}: pretrained_cfg is a {type(recorded).__name__}, not an object')
    rec = dict(recorded or {})
    h, w = input_hw(model)
    cfg = dict(input_size=[3, h, w], interpolation=rec.get('interpolation') or 'bicubic',
               crop_pct=rec.get('crop_pct') or 0.875, crop_mode=rec.get('crop_mode') or 'center',
               mean=rec.get('mean', IMAGENET[0]), std=rec.get('std', IMAGENET[1]))
    if cfg['interpolation'] not in INTERPOLATIONS:
        raise ConversionError(f'{where}: interpolation {cfg["interpolation"]!r} is not one of {", ".join(INTERPOLATIONS)}')
    if cfg['crop_mode'] not in CROP_MODES:
        raise ConversionError(f'{where}: crop_mode {cfg["crop_mode"]!r} is not supported (only {", ".join(CROP_MODES)})')
    pct = cfg['crop_pct']
    if isinstance(pct, bool) or not isinstance(pct, (int, float)) or not 0.05 <= pct <= 4:
        raise ConversionError(f'{where}: crop_pct {pct!r} is not a number in [0.05, 4]')
    for k in ('mean', 'std'):
        v = cfg[k]
        if not isinstance(v, (list, tuple)) or len(v) != 3 or \
                not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
            raise ConversionError(f'{where}: {k} {v!r} is not a list of 3 numbers')
        cfg[k] = [float(x) for x in v]
    if not all(cfg['std']):
        raise ConversionError(f'{where}: std {cfg["std"]} holds a zero')
    if rec.get('crop_offset', 'round') not in CROP_OFFSETS:
        raise ConversionError(f'{where}: crop_offset {rec["crop_offset"]!r} is not one of {", ".join(CROP_OFFSETS)}')
    if rec.get('crop_offset') == 'floor':
        cfg['crop_offset'] = 'floor'
    size = rec.get('input_size')
    if size is not None and (not isinstance(size, (list, tuple)) or list(size)[-2:] != [h, w]):
        cfg['note'] = f'recorded input_size {size} differs from the model\'s {h}x{w}: the model\'s is used'
    return cfg


def describe(cfg: dict) -> str:
    h, w = cfg['input_size'][1:]
    scale = _scale_size(cfg)
    mean = ', '.join(f'{x:g}' for x in cfg['mean'])
    std = ', '.join(f'{x:g}' for x in cfg['std'])
    resize = f'resize shorter side to {scale[0]}' if cfg['crop_mode'] == 'center' and scale[0] == scale[1] \
        else f'resize to {scale[0]}x{scale[1]}'
    floor = ', offset floored as transformers' if cfg.get('crop_offset') == 'floor' else ''
    return (f'{resize} ({cfg["interpolation"]}), centre crop {h}x{w} (crop_pct {cfg["crop_pct"]:g}{floor}), '
            f'mean ({mean}), std ({std})')


def _scale_size(cfg) -> Tuple[int, int]:
    h, w = cfg['input_size'][1:]
    return math.floor(h / cfg['crop_pct']), math.floor(w / cfg['crop_pct'])


def _filter(name: str):
    from PIL import Image
    return {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC,
            'lanczos': Image.LANCZOS, 'box': Image.BOX, 'hamming': Image.HAMMING}[name]


def _resize_shorter(img, size: int, resample):
    """torchvision's Resize(int) on a PIL image: shorter side to `size`, the other truncated, same ratio."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img if (new_w, new_h) == (w, h) else img.resize((new_w, new_h), resample)


def _resize_keep_ratio(img, size: Tuple[int, int], resample):
    """timm's ResizeKeepRatio (longest=0) for a non-square target: the shorter side fits, ratio kept."""
    w, h = img.size
    ratio = min(h / size[0], w / size[1])
    new_h, new_w = round(h / ratio), round(w / ratio)
    return img.resize((new_w, new_h), resample)


def _center_crop(img, h: int, w: int, offset: str = 'round'):
    """torchvision's CenterCrop (zero padding where the image is smaller, as PIL's crop gives); `offset='floor'`:
    transformers' center_crop, which puts an odd margin's extra pixel at the bottom/right."""
    iw, ih = img.size
    top, left = int(round((ih - h) / 2.0)), int(round((iw - w) / 2.0))
    if offset == 'floor' and ih >= h and iw >= w:
        top, left = (ih - h) // 2, (iw - w) // 2
    if ih < h or iw < w:   # torchvision pads symmetrically first, then crops
        pad_t, pad_l = (h - ih) // 2 if ih < h else 0, (w - iw) // 2 if iw < w else 0
        top, left = (0 if ih < h else top) - pad_t, (0 if iw < w else left) - pad_l
    return img.crop((left, top, left + w, top + h))


def resize_and_crop(img, cfg: dict):
    """timm's eval resize and crop of one RGB PIL image (a PIL image of `cfg['input_size']`): the scale
    `input_size / crop_pct`, then a centre crop ('center'), or a plain resize ('squash')."""
    h, w = cfg['input_size'][1:]
    scale = _scale_size(cfg)
    resample = _filter(cfg['interpolation'])
    if cfg['crop_mode'] == 'squash':
        img = img.resize((scale[1], scale[0]), resample) if img.size != (scale[1], scale[0]) else img
    elif scale[0] == scale[1]:
        img = _resize_shorter(img, scale[0], resample)
    else:
        img = _resize_keep_ratio(img, scale, resample)
    return _center_crop(img, h, w, cfg.get('crop_offset', 'round'))


def transform(img, cfg: dict) -> np.ndarray:
    """One PIL image -> (H, W, 3) float32, as timm's eval transform (then NCHW -> NHWC)."""
    img = img.convert('RGB')   # greyscale, palette, RGBA (alpha dropped, as timm's loaders do)
    x = np.asarray(resize_and_crop(img, cfg), dtype=np.uint8).astype(np.float32) / np.float32(255)
    return (x - np.asarray(cfg['mean'], np.float32)) / np.asarray(cfg['std'], np.float32)


def load_image(path: str, cfg: dict) -> np.ndarray:
    """Read one image file and transform it; a missing or unreadable file is a one-line error naming it."""
    return _read_image(path, lambda img: (img.load(), transform(img, cfg))[1])


def load_image_resized(path: str, cfg: dict, size_of) -> np.ndarray:
    """Read one image and resize it, no crop, to `size_of(height, width)` -> (H, W) with `cfg`'s interpolation,
    then `cfg`'s mean/std: (H, W, 3) float32 (a NaFlex model's input at the image's own aspect ratio)."""
    def use(img):
        img = img.convert('RGB')
        h, w = size_of(img.size[1], img.size[0])
        x = np.asarray(img.resize((w, h), _filter(cfg['interpolation'])), dtype=np.uint8).astype(np.float32) / np.float32(255)
        return (x - np.asarray(cfg['mean'], np.float32)) / np.asarray(cfg['std'], np.float32)
    return _read_image(path, use)


def check_image(path: str) -> None:
    """What can be known of an image file without decoding it (it exists, is a file, Pillow recognises its
    header): a one-line ConversionError naming it, before anything slow is loaded. Damage inside the image
    data shows only when `load_image` decodes it."""
    _read_image(path, lambda img: None)


def _read_image(path: str, use):
    import warnings
    from PIL import Image, UnidentifiedImageError
    from .formats.images import check_declared_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with open(path, 'rb') as f:   # from memory: a buffered file allocates what a chunk declares
                raw = f.read()
            with Image.open(io.BytesIO(raw)) as img:
                check_declared_size(img, path, len(raw))   # before decoding allocates what the header declares
                return use(img)
    except FileNotFoundError:
        raise ConversionError(f'{path}: no such image file') from None
    except IsADirectoryError:
        raise ConversionError(f'{path}: is a directory, not an image') from None
    except UnidentifiedImageError:
        raise ConversionError(f'{path}: not an image Pillow can read') from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ConversionError(f'{path}: image too large ({first_line(e)})') from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:   # truncated or corrupt data, permissions
        raise ConversionError(f'{path}: unreadable image ({type(e).__name__}: {first_line(e)})') from None


def config_for_json(cfg: Dict) -> Dict:
    return {k: cfg[k] for k in FIELDS}


# ---------------------------------------------------------------- transformers' image processors

def _hw(size, key: str, where: str):
    """(h, w) of a transformers size: {'height', 'width'}, an int (square), or None."""
    if isinstance(size, dict) and 'height' in size and 'width' in size:
        h, w = size['height'], size['width']
    elif type(size) is int:
        h = w = size
    else:
        raise ConversionError(f'{where}: {key} {size!r} is not {{"height", "width"}} or a size')
    if not all(type(v) is int and 0 < v <= 1 << 16 for v in (h, w)):
        raise ConversionError(f'{where}: {key} {size!r} is not a positive size')
    return h, w


def _pct(crop: int, scale: int) -> float:
    """crop / scale, nudged down until timm's floor(crop / crop_pct) gives `scale` back."""
    pct = crop / scale
    while math.floor(crop / pct) < scale:
        pct = math.nextafter(pct, 0)
    return pct


def from_hf(pp: dict, where: str) -> dict:
    """A transformers `preprocessor_config.json` (ViT/DeiT/CLIP/BiT/SigLIP/ConvNeXt image processors and the
    older feature extractors) in timm's pretrained_cfg vocabulary, computing what the PIL image processor
    computes: resize (`size`: {'height', 'width'} squashes, {'shortest_edge'} keeps the aspect ratio; an int is
    square unless a centre crop follows), centre crop (`do_center_crop`, `crop_size`; transformers floors the
    offset), rescale by 1/255, normalise (`image_mean`, `image_std`), PIL filter `resample`. What it cannot
    express (another rescale factor, no resize, a longest edge) is refused in one line naming the field."""
    if not isinstance(pp, dict):
        raise ConversionError(f'{where}: a JSON {type(pp).__name__}, not an object')
    resample = pp.get('resample', 2)
    if resample not in PIL_FILTERS:
        raise ConversionError(f'{where}: resample {resample!r} is not a PIL filter (0-5)')
    if pp.get('do_rescale', True) and abs(float(pp.get('rescale_factor', 1 / 255)) - 1 / 255) > 1e-9:
        raise ConversionError(f'{where}: rescale_factor {pp["rescale_factor"]!r}: only 1/255 is supported')
    if not pp.get('do_rescale', True) or not pp.get('do_resize', True):
        key = 'do_rescale' if not pp.get('do_rescale', True) else 'do_resize'
        raise ConversionError(f'{where}: {key} false is not supported (vit-flax resizes and rescales to [0, 1])')
    size = pp.get('size', 224)
    crop = pp.get('do_center_crop', False) and pp.get('crop_size') is not None
    if isinstance(size, dict) and set(size) - {'shortest_edge'} and 'shortest_edge' in size:
        raise ConversionError(f'{where}: size {size!r}: a longest edge is not supported')
    shortest = size.get('shortest_edge') if isinstance(size, dict) else (size if type(size) is int and crop else None)
    if isinstance(size, dict) and 'shortest_edge' in size and not (type(shortest) is int and shortest > 0):
        raise ConversionError(f'{where}: size {size!r} is not a positive size')
    if shortest is not None and not crop and pp.get('crop_pct') is not None:   # ConvNeXt: shortest/crop_pct, crop
        h = w = shortest
        pct, mode = float(pp['crop_pct']), 'center'
    elif shortest is not None:
        h, w = _hw(pp['crop_size'], 'crop_size', where) if crop else (shortest, shortest)
        if h != w:
            raise ConversionError(f'{where}: crop_size {pp["crop_size"]!r} after a shortest_edge resize: only '
                                  f'square crops are supported')
        pct, mode = _pct(min(h, w), shortest), 'center'
    else:
        sh, sw = _hw(size, 'size', where)
        h, w = _hw(pp['crop_size'], 'crop_size', where) if crop else (sh, sw)
        if crop and sh * w != sw * h:
            raise ConversionError(f'{where}: size {size!r} and crop_size {pp["crop_size"]!r} differ in aspect')
        pct, mode = _pct(h, sh) if crop else 1.0, 'squash'
    normalize = pp.get('do_normalize', True)
    mean = pp.get('image_mean', list(IMAGENET[0])) if normalize else [0.0] * 3
    std = pp.get('image_std', list(IMAGENET[1])) if normalize else [1.0] * 3
    return dict(input_size=[3, h, w], interpolation=PIL_FILTERS[resample], crop_pct=pct, crop_mode=mode,
                mean=mean, std=std, crop_offset='floor')


def read_hf_preprocessor(folder: str) -> Optional[dict]:
    """`from_hf` of `folder`'s preprocessor_config.json, or None when it has none."""
    path = os.path.join(folder, HF_PREPROCESSOR)
    if not os.path.isfile(path):
        return None
    from .formats.timm_folder import load_json
    return from_hf(load_json(path), path)


def hf_preprocessor_of(ck) -> Optional[Tuple[dict, str]]:
    """(recorded cfg, where) from the preprocessor_config.json of the transformers folder checkpoint `ck` was read
    from (the folder named, or the one holding its weights), None when there is none (or `ck` records its own:
    a training run's meta, a timm folder's pretrained_cfg)."""
    if ck.kind in ('training', 'timm-folder'):
        return None
    source = getattr(ck, 'source', None)
    folder = source if source and os.path.isdir(source) else os.path.dirname(os.path.abspath(ck.path))
    recorded = ck.pretrained_cfg if ck.kind == 'transformers' and ck.pretrained_cfg else read_hf_preprocessor(folder)
    return None if recorded is None else (recorded, os.path.join(folder, HF_PREPROCESSOR))
