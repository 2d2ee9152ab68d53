"""Parity against real vit-pytorch releases, old ones included (their files differ in keys, shapes and computation).

Only one vit-pytorch can be installed at a time, so this reads releases unpacked beside each other:

    for v in 0.6.8 0.7.0 0.40.2 1.2.0 1.6.0 1.16.0 1.26.11; do
        pip download -q vit-pytorch==$v --no-deps -d releases/$v && (cd releases/$v && unzip -oq *.whl)
    done
    python benchmarks/vit_pytorch_releases.py releases

For each release and pool ('cls', 'mean'): its `ViT` (dim 96, depth 2, heads 4, dim_head 32, every weight
perturbed) -> its state_dict on disk -> Flax (layout detected; heads and, before 1.16, pool passed as the
user would) -> max relative logit error; then the Flax params written back in the detected layout must
load into a fresh model of that release with strict=True and equal the original bit for bit.
"""
import argparse
import importlib.util
import os
import sys
import tempfile

import jax
import numpy as np
import torch
from flax.traverse_util import flatten_dict

from converters import pipeline

CFG = dict(image_size=80, patch_size=16, num_classes=7, dim=96, depth=2, heads=4, dim_head=32, mlp_dim=160)


def load_release(root: str, version: str):
    pkg = os.path.join(root, version, 'vit_pytorch')
    path = next(p for p in (os.path.join(pkg, 'vit.py'), os.path.join(pkg, 'vit_pytorch.py')) if os.path.exists(p))
    spec = importlib.util.spec_from_file_location(f'vit_pytorch_{version.replace(".", "_")}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('root', help='a folder of unpacked releases, one sub-folder per version')
    a = p.parse_args()
    jax.config.update('jax_default_matmul_precision', 'highest')
    versions = sorted(os.listdir(a.root), key=lambda v: tuple(int(x) for x in v.split('.')))
    x = np.random.default_rng(0).standard_normal((2, 80, 80, 3)).astype(np.float32)
    worst, failed = {}, False
    print(f'{"release":<9} {"pool":<5} {"layout":<17} {"rel. error":>10}  round trip')
    with tempfile.TemporaryDirectory() as d:
        for version in versions:
            vit = load_release(a.root, version).ViT
            for pool in ('cls', 'mean'):
                torch.manual_seed(0)
                ref = vit(**CFG, pool=pool).eval()
                with torch.no_grad():
                    for prm in ref.parameters():
                        prm.add_(torch.randn(prm.shape) * 0.02)
                    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()
                path = os.path.join(d, f'{version}-{pool}.pth')
                torch.save(ref.state_dict(), path)
                model, params, ck = pipeline.load_model(path, heads=CFG['heads'], pool=pool, log=lambda s: None)
                y = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x))
                err = float(np.abs(y - want).max() / np.abs(want).max())
                back = {k: torch.from_numpy(v) for k, v in
                        pipeline.to_torch_state(flatten_dict(params, sep='/'), model, ck.layout).items()}
                vit(**CFG, pool=pool).load_state_dict(back, strict=True)
                exact = all(torch.equal(back[k], v) for k, v in ref.state_dict().items())
                failed |= not exact or err > 1e-4
                worst[ck.layout] = max(worst.get(ck.layout, 0.0), err)
                print(f'{version:<9} {pool:<5} {ck.layout:<17} {err:10.2e}  {"bit-exact" if exact else "DIFFERS"}')
    for layout, err in worst.items():
        print(f'worst {layout:<17} {err:.2e}')
    return int(failed)


if __name__ == '__main__':
    sys.exit(main())
