"""NaFlex ViT files both ways: timm's naflexvit `.pth` / `.safetensors` (read with no model named, written back bit
for bit, loaded strictly by timm), our `.npz` (big_vision's tree), detection that claims only NaFlex files, and
`vit-flax convert` through the CLI."""
import jax
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file

import converters
import vit_flax
from converters.errors import ConversionError
from converters.families import FAMILIES, flax_family, torch_family
from converters.families.naflex import FAMILY

from helpers import cli, images, perturb_timm, rel_err, run_flax, run_timm, state_np

jax.config.update('jax_default_matmul_precision', 'highest')

REDUCED = dict(depth=2, embed_dim=32, num_heads=4, patch_size=8, pos_embed_grid_size=(4, 4), img_size=32,
               num_classes=10)
X = images((2, 32, 48, 3))   # a 4x6 grid: the 4x4 table resized


def timm_file(tmp_path, name, ext='.pth'):
    model = vit_flax.create_model(name, **REDUCED)
    tm = perturb_timm(FAMILY.torch_model(model, name))
    path = tmp_path / f'{name}{ext}'
    if ext == '.pth':
        torch.save(tm.state_dict(), path)
    else:
        from safetensors.torch import save_file
        save_file(tm.state_dict(), str(path))
    return path, model, tm


@pytest.mark.parametrize('name,ext', [('naflexvit_base_patch16_siglip', '.pth'),
                                      ('naflexvit_base_patch16_parfac_gap', '.safetensors'),
                                      ('naflexvit_base_patch16_radio_v3', '.pth')])
def test_timm_file_read_with_no_name_is_its_model_and_written_back_bit_exact(name, ext, tmp_path):
    """The architecture off the shapes (the registered name whose parts fit: pooling, prefix tokens, table kind,
    LayerScale), timm's logits, and the file written back (.safetensors and .pth) holds timm's keys, dtypes and
    bits, which timm loads strictly."""
    path, model, tm = timm_file(tmp_path, name, ext)
    ours, params, ck = converters.load_model(path, num_heads=4)
    assert (ck.family.name, ck.model_name, ck.layout) == ('naflex', name, 'timm')
    assert (ours.depth, ours.embed_dim, ours.global_pool, ours.pos_embed, ours.reg_tokens, ours.class_token) == \
        (2, 32, model.global_pool, model.pos_embed, model.reg_tokens, model.class_token)
    err = rel_err(run_flax(ours, params, X), run_timm(tm, X))
    assert err < 1e-5, err
    state = state_np(tm)
    converters.save_params(params, tmp_path / 'back.safetensors', name, **REDUCED)
    back = load_file(str(tmp_path / 'back.safetensors'))
    assert set(back) == set(state) and all(back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k])
                                           for k in state)
    converters.save_params(params, tmp_path / 'back.pth', name, **REDUCED)
    fresh = FAMILY.torch_model(model, name)
    fresh.load_state_dict(torch.load(tmp_path / 'back.pth', weights_only=True), strict=True)


def test_cli_pth_to_npz_to_pth_is_bit_exact(tmp_path):
    """`vit-flax convert` .pth -> .npz (big_vision's tree: a 2-D `embedding/kernel`, `pos_embedding` (gh, gw, D))
    -> .pth: the arrays of the source, bit for bit."""
    path, model, tm = timm_file(tmp_path, 'naflexvit_base_patch16_map')
    for src, dst in ((path, tmp_path / 'a.npz'), (tmp_path / 'a.npz', tmp_path / 'b.pth')):
        r = cli('convert', src, dst, '--model', 'naflexvit_base_patch16_map', *[
            a for k, v in REDUCED.items() for a in ('--set', f'{k}={",".join(map(str, v)) if isinstance(v, tuple) else v}')])
        assert r.returncode == 0, r.stderr
    with np.load(tmp_path / 'a.npz') as f:
        assert f['embedding/kernel'].shape == (8 * 8 * 3, 32) and f['pos_embedding'].shape == (4, 4, 32)
    a, b = state_np(tm), torch.load(tmp_path / 'b.pth', weights_only=True)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k].numpy()) for k in a)


def test_detection_claims_naflex_files_only_and_no_other_family_claims_them():
    """NaFlex's timm keys (`embeds.proj`) and tree (a 2-D `embedding/kernel`) are claimed by the NaFlex family and
    by no other; a timm SigLIP ViT (`patch_embed.proj`, the same blocks and MAP head) and its Flax tree (a conv
    `embedding/kernel`) by the ViT family, not NaFlex."""
    name = 'naflexvit_base_patch16_siglip'
    model = vit_flax.create_model(name, **REDUCED)
    state = state_np(FAMILY.torch_model(model, name))
    flat = {k: np.zeros(v.shape, np.float32) for k, v in flatten_dict(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), X[:1]))['params'], sep='/').items()}
    assert [f.name for f in FAMILIES if f.detect_torch(state)] == ['naflex']
    assert [f.name for f in FAMILIES if f.detect_flax(flat)] == ['naflex']
    assert torch_family(state, 'x.pth') is FAMILY and flax_family(flat) is FAMILY
    vit = timm.create_model('vit_base_patch16_siglip_224', pretrained=False, depth=1, embed_dim=32, num_heads=4,
                            img_size=32)
    vit_state = state_np(vit)
    vit_model = vit_flax.create_model('vit_base_patch16_siglip_224', depth=1, embed_dim=32, num_heads=4, img_size=32)
    vit_flat = {k: np.zeros(v.shape, np.float32) for k, v in flatten_dict(jax.eval_shape(
        lambda: vit_model.init(jax.random.PRNGKey(0), images((1, 32, 32, 3))))['params'], sep='/').items()}
    assert not FAMILY.detect_torch(vit_state) and not FAMILY.detect_flax(vit_flat)
    assert torch_family(vit_state, 'v.pth').name == 'vit' and flax_family(vit_flat).name == 'vit'


def test_a_file_of_another_naflex_shape_is_refused_in_one_line(tmp_path):
    path, _, _ = timm_file(tmp_path, 'naflexvit_base_patch16_siglip')
    with pytest.raises(ConversionError, match='depth'):
        converters.load_params(path, 'naflexvit_base_patch16_siglip', **dict(REDUCED, depth=3))
