"""Predict with any checkpoint the converters read: its model, its preprocessing, its class names.

    model, params, ck = pipeline.load_model(CKPT)           # a file, model folder, hf-hub:NAME or training workdir
    cfg, why = data_config(ck, model)                  # what the checkpoint records, else a default (said)
    x = np.stack([preprocess.load_image(p, cfg) for p in paths])
    probs = predict(model, params, x)                  # softmax, float32
    top = top_k(probs, 5, class_names(ck, model, classes_json))

A NaFlex model (`native_aspect(model)`) takes each image at its own aspect ratio instead: `load_native` resizes
it (the recorded interpolation and mean/std, no crop) to the largest size of patches that fits the model's
`max_seq_len`, and `predict_naflex` pads every batch to that budget (one compiled shape).
"""
import os
from typing import List, Optional, Tuple

import numpy as np

from converters import preprocess
from converters.errors import ConversionError
from converters.formats import timm_folder, training_ckpt


def data_config(ck, model) -> Tuple[dict, str]:
    """(complete preprocessing config, where it came from) for a checkpoint `read_checkpoint` read."""
    hf = preprocess.hf_preprocessor_of(ck)   # a transformers folder's preprocessor_config.json
    if hf is not None:
        return preprocess.resolve(hf[0], model, hf[1]), hf[1]
    if ck.pretrained_cfg is not None:
        where = {'training': f'recorded in the training checkpoint {ck.path}',
                 'timm-folder': f'the pretrained_cfg of {ck.source}'}.get(ck.kind, ck.source)
        return preprocess.resolve(ck.pretrained_cfg, model, where), where
    cfg, why = preprocess.default_config(model, ck.model_name, ck.format)
    return preprocess.resolve(cfg, model, ck.path), f'{ck.path} records no preprocessing: {why}'


def class_names(ck, model, classes: Optional[str] = None) -> Tuple[List[str], str]:
    """(one name per class, where they came from): `classes` (WZMIAOMIAO's class_indices.json), the
    checkpoint's own names, a class_indices.json beside a checkpoint file, else the indices."""
    n = model.num_classes
    if classes:
        names, where = timm_folder.read_class_indices(classes), classes
    elif ck.class_names:
        names, where = ck.class_names, f'recorded in {ck.source or ck.path}'
    else:
        beside = os.path.join(os.path.dirname(os.path.abspath(ck.path)), training_ckpt.CLASS_INDICES)
        if ck.kind == 'file' and os.path.isfile(beside):
            names, where = timm_folder.read_class_indices(beside), beside
        else:
            return [str(i) for i in range(n)], 'none recorded: class indices'
    if len(names) > n:
        raise ConversionError(f'{where}: {len(names)} class names, but the model has {n} classes')
    return list(names) + [str(i) for i in range(len(names), n)], where


def predict(model, params, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Softmax probabilities (float32) of NHWC images `x`, in batches of `batch` (one compiled shape)."""
    import jax
    import jax.numpy as jnp
    fn = jax.jit(lambda p, x: jax.nn.softmax(model.apply({'params': p}, x, train=False).astype(jnp.float32), -1))
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        pad = batch - len(chunk) if len(x) > batch else 0
        y = fn(params, np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]) if pad else chunk)
        out.append(np.asarray(y)[:len(chunk)])
    return np.concatenate(out)


def native_aspect(model) -> bool:
    """Whether `model` takes images at their own aspect ratio (a NaFlex ViT: patches, coordinates, a mask)."""
    return type(model).__name__ == 'NaFlexVit'


def load_native(path: str, cfg: dict, model) -> np.ndarray:
    """One image as (H, W, 3) float32 at its aspect ratio: resized with `cfg`'s interpolation to the largest
    multiple of the patch filling at most `model.max_seq_len` patches (big_vision's and transformers' search),
    then `cfg`'s mean/std; nothing cropped."""
    from vit_flax.models.naflex import size_for_sequence
    return preprocess.load_image_resized(
        path, cfg, lambda h, w: size_for_sequence(h, w, model.patch_size, model.max_seq_len))


def predict_naflex(model, params, images: List[np.ndarray], batch: int = 32) -> np.ndarray:
    """Softmax probabilities (float32) of images of any sizes (multiples of the patch), in batches of `batch`
    each padded to `model.max_seq_len` patches: one compiled shape for all."""
    import jax
    import jax.numpy as jnp
    from vit_flax.models.naflex import naflex_inputs
    fn = jax.jit(lambda p, a, c, v: jax.nn.softmax(
        model.apply({'params': p}, a, patch_coord=c, patch_valid=v).astype(jnp.float32), -1))
    out = []
    for i in range(0, len(images), batch):
        chunk = list(images[i:i + batch])
        n = len(chunk)
        if len(images) > batch:   # every batch the same shape: pad with copies of the first image
            chunk += [chunk[0]] * (batch - n)
        b = naflex_inputs(chunk, model.patch_size, model.max_seq_len)
        out.append(np.asarray(fn(params, b['patches'], b['patch_coord'], b['patch_valid']))[:n])
    return np.concatenate(out)


def top_k(probs: np.ndarray, k: int, names: List[str]) -> List[List[Tuple[int, str, float]]]:
    """Per image, the k most probable classes (index, name, probability), most probable first
    (ties: the lower index first, as a stable sort gives)."""
    k = min(k, probs.shape[-1])
    order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
    return [[(int(i), names[i], float(p[i])) for i in row] for row, p in zip(order, probs)]
