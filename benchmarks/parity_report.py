"""Worst parity error per model against timm, over every layout a model can be stored in.

    python benchmarks/parity_report.py [--models ...] [--batch 2]

For each model: timm with every weight perturbed -> each layout on disk (timm .pth; Google npz released,
linen, big_vision for ViT; Microsoft .pth for Swin) -> Flax, float32, same input; prints max relative
logit error (max |flax - timm| / max |timm|) per layout and the worst.
"""
import argparse
import os
import tempfile

import jax
import numpy as np
import torch
from flax.traverse_util import flatten_dict

from converters import pipeline

DEFAULT = ['vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224', 'vit_small_patch32_224',
           'vit_base_patch32_384', 'deit_tiny_distilled_patch16_224', 'deit_base_distilled_patch16_384',
           'swin_tiny_patch4_window7_224', 'swin_base_patch4_window12_384']


def main():
    import timm
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--models', nargs='+', default=DEFAULT)
    p.add_argument('--batch', type=int, default=2)
    a = p.parse_args()
    jax.config.update('jax_default_matmul_precision', 'highest')
    print(f'{"model":<34} {"layout":<12} {"rel. error":>10}')
    with tempfile.TemporaryDirectory() as d:
        for name in a.models:
            tm = timm.create_model(name, pretrained=False).eval()
            g = torch.Generator().manual_seed(0)
            with torch.no_grad():
                for prm in tm.parameters():
                    prm.add_(torch.randn(prm.shape, generator=g) * 0.02)
            src = os.path.join(d, 'timm.pth')
            torch.save(tm.state_dict(), src)
            model, params, _ = pipeline.load_model(src, name, cast=False)
            flat = flatten_dict(params, sep='/')
            x = np.random.default_rng(0).standard_normal((a.batch,) + tuple(model.input_shape)).astype(np.float32)
            with torch.no_grad():
                ref = tm(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
            files = {'timm .pth': src}
            if 'embedding/kernel' in flat:
                for layout in ('released', 'linen', 'big_vision'):
                    if layout == 'big_vision' and model.distilled:
                        continue
                    files[layout] = os.path.join(d, f'{layout}.npz')
                    pipeline.write_flat(flat, model, files[layout], layout=layout, force=True)
            else:
                files['microsoft'] = os.path.join(d, 'ms.pth')
                pipeline.write_flat(flat, model, files['microsoft'], layout='microsoft', force=True)
            worst = 0.0
            for layout, path in files.items():
                m, prm, _ = pipeline.load_model(path, name, log=lambda s: None)
                y = np.asarray(jax.jit(lambda p, x: m.apply({'params': p}, x, train=False))(prm, x))
                err = float(np.abs(y - ref).max() / np.abs(ref).max())
                worst = max(worst, err)
                print(f'{name:<34} {layout:<12} {err:10.2e}')
            print(f'{name:<34} {"WORST":<12} {worst:10.2e}', flush=True)


if __name__ == '__main__':
    main()
