"""`make demo`: the main jobs end to end on an embedded default.

First the train -> export -> timm cycle: train a small ViT on scikit-learn's digits in Flax (`vit-flax train`),
export the best checkpoint as a timm model folder (`vit-flax convert RUN DIR --format timm-folder`), load
it with `timm.create_model('local-dir:DIR', pretrained=True)`, and check that timm (on timm's own eval
transform) and Flax (on ours) predict the same class for every validation image.

Then the converters: build a ViT in Flax, write it as a Google `.npz` (released layout), convert it to a PyTorch `.pth` with the
`vit-flax` command, load that into timm with `strict=True`, and print the parity table on real images
(scikit-learn's digits, upscaled to the model's input and scaled to [-1, 1] as Google's weights expect).
"""
import argparse
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np


def digits_batch(n: int, size: int) -> np.ndarray:
    from sklearn.datasets import load_digits
    d = load_digits()
    imgs = d.images[:n] / 16.0                                  # (n, 8, 8) in [0, 1]
    reps = -(-size // 8)
    imgs = np.kron(imgs, np.ones((reps, reps)))[:, :size, :size]
    x = np.repeat(imgs[..., None], 3, axis=-1) * 2.0 - 1.0       # NHWC, [-1, 1]
    return x.astype(np.float32), d.target[:n]


def perturbed_params(model, seed: int = 0):
    """Random weights on every leaf, so zero heads and unit norms cannot hide a wrong mapping: kernels
    N(0, 1/fan_in), norm scales 1 + N(0, 0.02), everything else N(0, 0.02); drawn by numpy on the model's
    parameter shapes (no init to compile)."""
    from vit_flax.summary import param_shapes
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if 'kernel' in name:
            return noise / np.float32(np.sqrt(max(1, int(np.prod(leaf.shape[:-1])))))
        return (1.0 if 'scale' in name else 0.0) + np.float32(0.02) * noise
    return jax.tree_util.tree_map_with_path(draw, param_shapes(model))


def vit_flax_cmd(*args):
    cmd = [sys.executable, '-m', 'vit_flax_cli', *map(str, args)]
    print('    $ vit-flax ' + ' '.join(map(str, args)), flush=True)
    subprocess.run(cmd, check=True)


def train_export_cycle(out: str, epochs: int) -> None:
    """Train on digits in Flax, export to a timm folder, and compare timm's and Flax's predictions."""
    import shutil
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    from converters import pipeline, preprocess
    from vit_flax_cli.predict import data_config, predict
    from vit_train.data import digits

    run, folder = os.path.join(out, 'digits-run'), os.path.join(out, 'digits-timm')
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    print(f'[A] train a small ViT on digits in Flax ({epochs} epochs):', flush=True)
    vit_flax_cmd('train', '--depth', 2, '--epochs', epochs, '--batch-size', 64, '--workdir', run)
    print('[B] export the best checkpoint as a timm model folder:', flush=True)
    vit_flax_cmd('convert', run, folder, '--format', 'timm-folder', '--force')

    model, params, ck = pipeline.load_model(run, log=lambda msg: None)
    cfg, _ = data_config(ck, model)
    val = digits(0.2).val
    imgs = [Image.fromarray(val[i]['image']) for i in range(len(val))]
    labels = np.array([val[i]['label'] for i in range(len(val))])
    yf = predict(model, params, np.stack([preprocess.transform(im, cfg) for im in imgs])).argmax(-1)

    tm = timm.create_model(f'local-dir:{os.path.abspath(folder)}', pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=tm))
    with torch.no_grad():
        yt = tm(torch.stack([tf(im.convert('RGB')) for im in imgs])).argmax(-1).numpy()
    same = int((yt == yf).sum())
    print(f'[C] timm loads the exported folder (timm.create_model(\'local-dir:{folder}\', pretrained=True)) and, '
          f'on timm\'s own eval transform, predicts the same class as Flax for {same} of {len(labels)} validation '
          f'images: the trained model survives export exactly. Accuracy: timm {(yt == labels).mean():.1%}, '
          f'Flax {(yf == labels).mean():.1%} ({time.perf_counter() - t:.0f}s)', flush=True)
    if same != len(labels):
        raise SystemExit('demo: timm and Flax disagree')
    picks = [int(np.flatnonzero(labels == c)[0]) for c in (3, 7)]
    files = [os.path.join(out, f'digit{labels[i]}.png') for i in picks]
    for i, f in zip(picks, files):
        imgs[i].save(f)
    print(f'[D] predict two image files (validation digits {" and ".join(str(labels[i]) for i in picks)}) with the '
          f'exported folder: its own preprocessing and class names, the two likeliest classes each:', flush=True)
    vit_flax_cmd('predict', folder, *files, '--top-k', 2)
    print(flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--model', default='vit_small_patch16_224')
    p.add_argument('--depth', type=int, help='blocks of the converted model (default: the model\'s own)')
    p.add_argument('--out', default='demo_out')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--epochs', type=int, default=3, help='training epochs of the digits cycle (0: skip it)')
    a = p.parse_args(argv)
    from converters.errors import ConversionError
    from converters.optional import require
    try:
        require('timm', 'the demo (it loads the results in timm)')
    except ConversionError as e:
        sys.exit(f'demo: {e}')
    os.makedirs(a.out, exist_ok=True)
    if a.epochs:
        train_export_cycle(a.out, a.epochs)

    import torch
    import timm
    import vit_flax
    from converters import save_params
    from vit_flax_cli.parity import compare, format_table

    os.makedirs(a.out, exist_ok=True)
    npz, pth = os.path.join(a.out, f'{a.model}.npz'), os.path.join(a.out, f'{a.model}.pth')
    arch = {} if a.depth is None else dict(depth=a.depth)
    model = vit_flax.create_model(a.model, **arch)
    s = vit_flax.summarize(a.model, **arch)
    print(f"[1] build {a.model} in Flax: {s['params']:,} params and {s['gmacs']:.2f} GMACs at "
          f"{tuple(s['input_shape'][1:])}, as timm counts them")

    params = perturbed_params(model)
    t = time.perf_counter()
    save_params(params, npz, a.model, force=True, **arch)
    print(f'[2] give it random weights (not pretrained: every tensor drawn at random, norms off 1 and biases off 0, '
          f'so that no zero or unit weight can hide a wrong mapping) and write them as a Google .npz, released '
          f'layout: {npz} '
          f'({os.path.getsize(npz) / 2**20:.1f} MiB, {time.perf_counter() - t:.1f}s)')

    cmd = [sys.executable, '-m', 'vit_flax_cli', 'convert', npz, pth, '--force']
    print('[3] convert the .npz to a PyTorch state_dict with the command line:\n    $ vit-flax ' + ' '.join(cmd[3:]))
    subprocess.run(cmd, check=True)

    tm = timm.create_model(a.model, pretrained=False, **arch)
    tm.load_state_dict(torch.load(pth, weights_only=True), strict=True)
    tm.eval()
    x, labels = digits_batch(a.batch, model.input_shape[0])
    with torch.no_grad():
        yt = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    yf = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, jnp.asarray(x)))
    agree = int((yt.argmax(-1) == yf.argmax(-1)).sum())
    diff = float(np.abs(yt - yf).max() / np.abs(yt).max())
    print(f'[4] timm loads {pth} with strict=True (every key and shape as timm names them). On {len(x)} digit '
          f'images timm and Flax pick the same class for {agree} of {len(x)}, their logits {diff:.1e} apart '
          f'(relative); the classes themselves mean nothing: the weights are random')
    print('[5] parity, block by block: how far Flax\'s activations are from timm\'s on that batch '
          '(PASS: every one within 1e-4, relative):')
    print(format_table(compare(model, params, a.model, x=x), tol=1e-4))


if __name__ == '__main__':
    main()
