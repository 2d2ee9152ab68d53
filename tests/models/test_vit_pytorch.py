"""lucidrains' vit-pytorch as a client: the real `vit_pytorch.ViT` (installed), and its older releases' files.

The older releases are not installable beside the current one, so their state_dicts are built from a real
current model the way those releases name and shape them (read in their wheels: 0.6.8, 0.7.0, 0.40.2,
1.2.0, 1.6.0, 1.16.0), and their forward computation from the current model's own modules.
"""
import re

import numpy as np
import pytest
import torch
import vit_pytorch
from einops import repeat
from flax.traverse_util import flatten_dict

import vit_flax
from converters import pipeline
from converters.families import vit_pytorch as vit_pytorch_family
from converters.errors import ConversionError

from helpers import cli, images, perturb_timm, rel_err, run_flax, run_timm, state_np

TOL = 1e-4
# inner width heads * dim_head = 128 differs from dim = 96, as vit-pytorch allows
CFG = dict(image_size=64, patch_size=16, num_classes=7, dim=96, depth=2, heads=4, dim_head=32, mlp_dim=160)



def real(seed=0, **kw):
    torch.manual_seed(seed)
    return perturb_timm(vit_pytorch.ViT(**{**CFG, **kw}), seed)


@pytest.fixture(scope='module')
def x():
    return images((2, 64, 64, 3))


@pytest.mark.parametrize('pool', ['cls', 'mean'])
def test_current_release_parity_round_trip_strict(pool, x, tmp_path):
    ref = real(pool=pool)
    torch.save(ref.state_dict(), tmp_path / 'vp.pth')
    model, params, ck = pipeline.load_model(tmp_path / 'vp.pth', heads=4)
    assert ck.layout == 'vit-pytorch' and isinstance(model, vit_flax.LucidViT)
    assert (model.dim, model.depth, model.heads, model.dim_head, model.mlp_dim, model.pool, model.patch_size_tuple,
            model.img_size, model.num_classes) == (96, 2, 4, 32, 160, pool, (16, 16), 64, 7)
    assert rel_err(run_flax(model, params, x), run_timm(ref, x)) < TOL
    pipeline.write_flat(flatten_dict(params, sep='/'), model, tmp_path / 'f.npz')
    m2, p2, ck2 = pipeline.load_model(tmp_path / 'f.npz')  # a Flax file records the heads
    assert (m2.heads, m2.dim_head) == (4, 32)
    pipeline.write_flat(flatten_dict(p2, sep='/'), m2, tmp_path / 'back.pth')
    sd = torch.load(tmp_path / 'back.pth', weights_only=True)
    fresh = vit_pytorch.ViT(**CFG, pool=pool)
    fresh.load_state_dict(sd, strict=True)  # under mean pooling: the empty (0, dim) cls_token too
    want = state_np(ref)
    assert set(sd) == set(want) and all(np.array_equal(sd[k].numpy(), v) for k, v in want.items())


def test_heads_come_from_the_caller_or_a_named_model(x, tmp_path):
    ref = real()
    torch.save(ref.state_dict(), tmp_path / 'vp.pth')
    with pytest.raises(ConversionError, match=r'heads x dim_head = 128.*--set heads=H'):
        pipeline.read_checkpoint(tmp_path / 'vp.pth')
    for arch in (dict(heads=4), dict(dim_head=32), dict(heads=4, dim_head=32)):
        assert (pipeline.read_checkpoint(tmp_path / 'vp.pth', arch=arch).model.heads) == 4
    with pytest.raises(ConversionError, match='does not divide'):
        pipeline.read_checkpoint(tmp_path / 'vp.pth', arch=dict(heads=5))
    # the wrong split is not caught by any shape: it changes the logits, which is why it is never guessed
    m8, p8, _ = pipeline.load_model(tmp_path / 'vp.pth', heads=8)
    assert rel_err(run_flax(m8, p8, x), run_timm(ref, x)) > 1e-3
    # CLI: with the flag the error names, the conversion goes through
    r = cli('convert', tmp_path / 'vp.pth', tmp_path / 'o.npz', '--set', 'heads=4')
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / 'o.npz')['Transformer/layers_0/attn/query/kernel'].shape == (96, 4, 32)


def test_registered_configuration_detected_with_its_split_said_out_loud(tmp_path):
    name = 'lucid_vit_tiny_patch16_224'
    m = vit_flax.create_model(name)
    ref = real(image_size=224, num_classes=1000, dim=m.dim, depth=m.depth, heads=m.heads, dim_head=m.dim_head,
               mlp_dim=m.mlp_dim)
    assert vit_flax.count_params(m) == sum(p.numel() for p in ref.parameters())
    torch.save(ref.state_dict(), tmp_path / 'vp.pth')
    logs = []
    model, params, ck = pipeline.load_model(tmp_path / 'vp.pth', log=logs.append)
    assert ck.model_name == name
    assert all(getattr(model, f) == getattr(m, f) for f in vit_pytorch_family.CORE + ('img_size', 'pool'))
    assert logs == [f'heads=3, dim_head=64 from {name}: a fused to_qkv records only heads x dim_head = 192; '
                    'pass heads=H to choose another split']
    back = pipeline.to_torch_state(flatten_dict(params, sep='/'), model)
    assert all(np.array_equal(back[k], v) for k, v in state_np(ref).items())


def test_no_output_projection_when_one_head_is_as_wide_as_the_model(x, tmp_path):
    ref = real(heads=1, dim_head=96)  # vit-pytorch's to_out is Identity: nothing to read the heads from
    torch.save(ref.state_dict(), tmp_path / 'vp.pth')
    model, params, _ = pipeline.load_model(tmp_path / 'vp.pth')
    assert (model.heads, model.dim_head, model.project_out) == (1, 96, False)
    assert rel_err(run_flax(model, params, x), run_timm(ref, x)) < TOL


# ---------------------------------------------------------------- older releases

def old_state(ref, layout):
    """`ref`'s weights as the given older release saves them (keys and shapes read in its wheel)."""
    sd = state_np(ref)
    if layout == 'vit-pytorch':
        return sd
    sd = {k: v[None] if k in ('cls_token', 'pos_embedding') else v for k, v in sd.items()}  # (1, n, dim)
    if layout == 'vit-pytorch-1.16':
        return sd
    out = {}  # PreNorm(dim, fn) wrappers (<= 1.2), and mlp_head = Sequential(LayerNorm, Linear)
    for k, v in sd.items():
        k = re.sub(r'^(transformer\.layers\.\d+)\.0\.(to_qkv|to_out)', r'\1.0.fn.\2', k)
        k = re.sub(r'^(transformer\.layers\.\d+)\.1\.net\.0\.', r'\1.1.norm.', k)
        k = re.sub(r'^(transformer\.layers\.\d+)\.1\.net\.1\.', r'\1.1.fn.net.0.', k)
        k = re.sub(r'^(transformer\.layers\.\d+)\.1\.net\.4\.', r'\1.1.fn.net.3.', k)
        k = re.sub(r'^transformer\.norm\.', 'mlp_head.0.', k)
        k = re.sub(r'^mlp_head\.(weight|bias)$', r'mlp_head.1.\1', k)
        out[k] = v
    if layout in ('vit-pytorch-0.7', 'vit-pytorch-0.6'):  # inside Residual(PreNorm(...)) as well
        out = {re.sub(r'^(transformer\.layers\.\d+\.[01])\.(norm|fn)\.', r'\1.fn.\2.', k): v for k, v in out.items()}
    if layout == 'vit-pytorch-0.6':
        out = {re.sub(r'^to_patch_embedding\.1\.', 'patch_to_embedding.', k): v for k, v in out.items()}
    return out


def old_forward(ref, img, pool, final_norm):
    """What releases < 1.16 compute: the class token is kept under pool='mean' and averaged in; up to 1.2 the
    final LayerNorm (`mlp_head.0`) norms the pooled vector instead of the tokens."""
    with torch.no_grad():
        x = ref.to_patch_embedding(torch.from_numpy(img).permute(0, 3, 1, 2).contiguous())
        x = torch.cat((repeat(ref.cls_token, 'n d -> b n d', b=x.shape[0]), x), dim=1) + ref.pos_embedding
        for attn, ff in ref.transformer.layers:
            x = attn(x) + x
            x = ff(x) + x
        if final_norm == 'tokens':
            x = ref.transformer.norm(x)
        x = x.mean(dim=1) if pool == 'mean' else x[:, 0]
        if final_norm == 'pooled':
            x = ref.transformer.norm(x)
        return ref.mlp_head(x).numpy()


def without_patch_norms(ref):
    """Releases before 1.0 embed patches with the Linear alone: the real model with its patch LayerNorms removed."""
    ref.to_patch_embedding = torch.nn.Sequential(ref.to_patch_embedding[0], ref.to_patch_embedding[2])
    return ref


# (layout, release read, pool, patch LayerNorms?, where the final norm sits)
OLD = [('vit-pytorch-1.16', '1.6.0', 'mean', True, 'tokens'),
       ('vit-pytorch-1.2', '1.2.0', 'cls', True, 'pooled'),
       ('vit-pytorch-1.2', '0.40.2', 'mean', False, 'pooled'),
       ('vit-pytorch-0.7', '0.7.0', 'mean', False, 'pooled'),
       ('vit-pytorch-0.6', '0.6.8', 'cls', False, 'pooled')]


@pytest.mark.parametrize('layout,release,pool,patch_norm,final_norm', OLD, ids=[f'{o[1]}-{o[2]}' for o in OLD])
def test_older_release_layouts(layout, release, pool, patch_norm, final_norm, x, tmp_path):
    ref = real()  # pool='cls' builds the class token those releases always have
    if not patch_norm:
        ref = without_patch_norms(ref)
    want = old_forward(ref, x, pool, final_norm)
    state = old_state(ref, layout)
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / 'old.pth')
    logs = []
    model, params, ck = pipeline.load_model(tmp_path / 'old.pth', log=logs.append, heads=4,
                                       **({'pool': 'mean'} if pool == 'mean' else {}))
    assert ck.layout == layout
    assert (model.pool, model.patch_norm, model.final_norm) == (pool, patch_norm, final_norm)
    assert model.has_class_token
    assert any('pool' in s for s in logs) == (pool == 'cls')  # the file cannot say: told unless given
    assert rel_err(run_flax(model, params, x), want) < TOL
    # written back in the same layout: the same keys and bits
    back = pipeline.to_torch_state(flatten_dict(params, sep='/'), model, layout)
    assert set(back) == set(state) and all(np.array_equal(back[k], v) for k, v in state.items())


def test_layouts_that_cannot_hold_the_model_are_refused(tmp_path):
    ref = real()
    torch.save(ref.state_dict(), tmp_path / 'vp.pth')
    model, params, _ = pipeline.load_model(tmp_path / 'vp.pth', heads=4)
    with pytest.raises(ConversionError, match='no transformer.norm'):
        pipeline.to_torch_state(flatten_dict(params, sep='/'), model, 'vit-pytorch-1.2')
    with pytest.raises(ConversionError, match='has no torch layout'):
        pipeline.to_torch_state(flatten_dict(params, sep='/'), model, 'microsoft')
    assert vit_pytorch_family.FAMILY.detect_layout(state_np(ref)) == 'vit-pytorch'
