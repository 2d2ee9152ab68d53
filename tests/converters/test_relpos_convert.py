"""ViT-RelPos files both ways: timm's `.pth` / `.safetensors` (strict load_state_dict in timm) read with the
architecture detected and written back bit for bit, our `.npz` (the model's tree) through `vit-flax convert`,
a timm folder saved by timm's own `save_for_hf` predicted on as timm predicts, and detection that claims these
files and only these (BEiT, Swin, Swin V2, ViT, Eva and Mixer files are not ours, ours not theirs)."""
import json
import os
import tempfile

import jax
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image
from safetensors.numpy import load_file

import converters
import vit_flax
from converters import rules
from converters.checkpoint import match_model
from converters.errors import ConversionError
from converters.families import flax_family, torch_family
from converters.families.relpos import FAMILY, torch_shapes_of_flax

from helpers import cli, images, perturb_timm, rel_err, run_flax, run_timm, state_np

jax.config.update('jax_default_matmul_precision', 'highest')

REDUCED = dict(depth=2, embed_dim=32, num_heads=2, img_size=32, patch_size=8, num_classes=10)
X = images((2, 32, 32, 3))
FIELDS = ('rel_pos_type', 'shared_rel_pos', 'class_token', 'fc_norm', 'global_pool', 'block_fn', 'qkv_bias',
          'qk_norm', 'rel_pos_hidden', 'depth', 'embed_dim', 'num_heads', 'num_classes')


def timm_twin(name, **extra):
    model = vit_flax.create_model(name, **{**REDUCED, **extra})
    return model, perturb_timm(FAMILY.torch_model(model, name), scale=0.1)


def meta_state(name, **kw):
    with torch.device('meta'):
        return timm.create_model(name, **kw).state_dict()


@pytest.mark.parametrize('name,extra', [
    ('vit_relpos_small_patch16_rpn_224', {}), ('vit_srelpos_small_patch16_224', {}),
    ('vit_relpos_medium_patch16_cls_224', {}), ('vit_relpos_base_patch16_clsgap_224', {}),
    ('vit_relpos_base_patch16_plus_240', dict(rel_pos_type='bias', img_size=40)),
    ('vit_relpos_small_patch16_224', dict(rel_pos_type='mlp_swin', qk_norm=True))],
    ids=['res_post', 'shared-mlp', 'cls-token', 'cls-gap', 'bias-40px', 'mlp_swin-qk_norm'])
def test_timm_safetensors_read_with_no_name_and_written_back_bit_exact(name, extra, tmp_path):
    """timm's state_dict as .safetensors -> our params, the architecture detected off the keys and shapes (a bias
    table's rows give its 40 px grid) -> .safetensors again: the same keys, dtypes and bits, loaded strictly by
    timm."""
    from safetensors.torch import save_file
    model, tm = timm_twin(name, **extra)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, tmp_path / 'timm.safetensors')
    notes = []
    got, params, ck = converters.load_model(tmp_path / 'timm.safetensors', log=notes.append)
    assert ck.family is FAMILY   # (the name: any registration of this architecture; sizes are overrides)
    assert [getattr(got, k) for k in FIELDS] == [getattr(model, k) for k in FIELDS]
    if model.rel_pos_type == 'bias':   # an MLP's file records no grid (the registered size is taken)
        assert got.grid_size == model.grid_size == (5, 5)
    assert any('residual post-norm' in n for n in notes) == (model.block_fn == 'res_post')
    converters.save_params(params, tmp_path / 'back.safetensors', ck.model_name, **{**REDUCED, **extra})
    a, b = state_np(tm), load_file(tmp_path / 'back.safetensors')
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in b.items()}, strict=True)


def test_cli_pth_to_npz_and_back_is_bit_exact_and_the_npz_computes_timms_logits(tmp_path):
    """`vit-flax convert` .pth -> .npz (our tree) -> .pth: the .npz read back (no name; the image size given, which
    an MLP's file does not record) computes timm's logits (1e-5 relative), and the .pth written back is the source
    bit for bit."""
    model, tm = timm_twin('vit_relpos_medium_patch16_cls_224')
    torch.save(tm.state_dict(), tmp_path / 'timm.pth')
    r = cli('convert', tmp_path / 'timm.pth', tmp_path / 'ours.npz')
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / 'ours.npz') as f:
        assert 'blocks_0/attn/rel_pos/mlp/Dense_0/kernel' in f and 'cls_token' in f and 'blocks_1/ls2/scale' in f
    got, params, ck = converters.load_model(tmp_path / 'ours.npz', log=lambda s: None, img_size=32)
    assert (ck.format, ck.family, ck.model_name) == ('npz', FAMILY, 'vit_relpos_medium_patch16_cls_224')
    err = rel_err(run_flax(got, params, X), run_timm(tm, X))
    assert err < 1e-5, err
    r = cli('convert', tmp_path / 'ours.npz', tmp_path / 'back.pth')
    assert r.returncode == 0, r.stderr
    a, b = state_np(tm), torch.load(tmp_path / 'back.pth', weights_only=True)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k].numpy()) for k in a)


def test_predict_on_a_folder_timm_saved_matches_timm(tmp_path):
    """A reduced ViT-RelPos saved by timm's own `save_for_hf` (config.json's model_args, 10 classes): `vit-flax
    predict` on image files gives timm's probabilities on timm's own eval transform of the same files."""
    from timm.data import create_transform, resolve_data_config
    from timm.models import save_for_hf
    kw = {k: v for k, v in REDUCED.items()}
    tm = perturb_timm(timm.create_model('vit_relpos_base_patch16_clsgap_224', **kw), scale=0.1)
    save_for_hf(tm, str(tmp_path / 'folder'), safe_serialization=True,
                data_config=dict(input_size=(3, 32, 32), interpolation='bicubic', crop_pct=0.9, mean=(0.5,) * 3,
                                 std=(0.5,) * 3))
    paths = []
    for i in range(2):
        arr = (np.random.default_rng(i).random((40, 48, 3)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(tmp_path / f'{i}.png')
        paths.append(tmp_path / f'{i}.png')
    p = cli('predict', tmp_path / 'folder', *paths, '--top-k', '3', '--json')
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    loaded = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=loaded))
    with torch.no_grad():
        want = torch.softmax(tm(torch.stack([tf(Image.open(q).convert('RGB')) for q in paths])), -1).numpy()
    for r, w in zip(out['predictions'], want):
        np.testing.assert_allclose([t['prob'] for t in r['top_k']], np.sort(w)[::-1][:3], atol=1e-5)


def test_every_registration_is_detected_from_its_timm_state_dict():
    """No name given: each of the 14 timm state_dicts (shapes only, on the meta device) is this family's and picks
    its own name."""
    for name in timm.list_models(module='vision_transformer_relpos'):
        state = meta_state(name)
        assert torch_family(state, name) is FAMILY, name
        cfg = dict(FAMILY.config_from_torch(state), img_size_hint=None)
        cfg, _, _ = FAMILY.resolve(cfg, None, 'timm', None, name)
        assert match_model(FAMILY, cfg, name)[0] == name


def test_detection_claims_relpos_files_and_no_other_familys():
    """timm state_dicts (meta) of the families with relative position tables or ViT keys: BEiT (per-block and
    shared tables), Swin, Swin V2, a ViT, an Eva, a Mixer: none is ours, and ours (a 'bias' table too, which
    Swin's and BEiT's detection would take) is claimed by no other family. The same for Flax trees."""
    from converters.families import FAMILIES
    others = {'beit_base_patch16_224': 'beit', 'beitv2_base_patch16_224': 'beit',
              'swin_tiny_patch4_window7_224': 'swin', 'swinv2_tiny_window8_256': 'swinv2',
              'vit_small_patch16_224': 'vit', 'eva02_tiny_patch14_224': 'eva', 'mixer_s16_224': 'mixer'}
    for name, fam in others.items():
        state = meta_state(name, **({'use_shared_rel_pos_bias': True, 'use_rel_pos_bias': False}
                                    if name.startswith('beitv2') else {}))
        assert not FAMILY.detect_torch(state), name
        assert torch_family(state, name).name == fam, name
    ours = [meta_state('vit_relpos_base_patch16_224', depth=1),
            meta_state('vit_relpos_base_patch16_cls_224', depth=1, rel_pos_type='bias'),
            meta_state('vit_srelpos_small_patch16_224', depth=1, rel_pos_type='bias')]
    for state in ours:
        assert FAMILIES.index(FAMILY) < min(FAMILIES.index(f) for f in FAMILIES if f is not FAMILY and (
            f.detect_torch(state) or f.detect_layout(state) != f.torch_layout) or f.name == 'vit')
        assert torch_family(state, 'x') is FAMILY
    for name in ('vit_relpos_base_patch16_224', 'vit_relpos_base_patch16_cls_224'):
        model = vit_flax.create_model(name, depth=1, rel_pos_type='bias')
        shapes = flatten_dict(vit_flax.summary.param_shapes(model), sep='/')
        assert flax_family(shapes) is FAMILY
        assert set(torch_shapes_of_flax(shapes)) == set(meta_state(name, depth=1, rel_pos_type='bias'))
    for name in ('beit_base_patch16_224', 'eva02_tiny_patch14_224'):
        shapes = flatten_dict(vit_flax.summary.param_shapes(vit_flax.create_model(name, depth=1)), sep='/')
        assert not FAMILY.detect_flax(shapes) and flax_family(shapes) is not FAMILY, name


def test_an_mlp_bias_loads_at_another_size_and_a_bias_table_is_refused():
    """The MLP fits any grid (its file records none): loaded for 48 px it computes timm's logits at 48 px from the
    same state_dict; a learned table fits only its own grid: asked for another size, a one-line error."""
    model, tm = timm_twin('vit_relpos_small_patch16_224')
    state = state_np(tm)
    with tempfile.TemporaryDirectory() as d:
        torch.save(tm.state_dict(), os.path.join(d, 'm.pth'))
        params = converters.load_params(os.path.join(d, 'm.pth'), 'vit_relpos_small_patch16_224',
                                        log=lambda s: None, **dict(REDUCED, img_size=48))
        big = vit_flax.create_model('vit_relpos_small_patch16_224', **dict(REDUCED, img_size=48))
        tm48 = FAMILY.torch_model(big, 'vit_relpos_small_patch16_224').eval()
        tm48.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        x = images((1, 48, 48, 3))
        assert rel_err(run_flax(big, params, x), run_timm(tm48, x)) < 1e-5
        bias, tb = timm_twin('vit_relpos_small_patch16_224', rel_pos_type='bias')
        torch.save(tb.state_dict(), os.path.join(d, 'b.pth'))
        with pytest.raises(ConversionError, match=r'relative position tables are sized for a \(4, 4\) patch grid'):
            converters.load_params(os.path.join(d, 'b.pth'), 'vit_relpos_small_patch16_224', log=lambda s: None,
                                   **dict(REDUCED, img_size=48, rel_pos_type='bias'))


def test_a_timm_folder_we_write_loads_in_timm_local_dir_bit_exact(tmp_path):
    """A file timm's registrations do not describe (a learned table with BEiT's class-token rows, 40 px: the rows
    give the grid) written as a timm folder: config.json's model_args rebuild it in timm (`local-dir:`), which
    loads the weights strictly, bit for bit, at the file's input size."""
    from safetensors.torch import save_file
    _, tm = timm_twin('vit_relpos_base_patch16_cls_224', rel_pos_type='bias', img_size=40)
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, tmp_path / 'b.safetensors')
    r = cli('convert', tmp_path / 'b.safetensors', tmp_path / 'folder', '--format', 'timm-folder')
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / 'folder' / 'config.json').read_text())
    assert cfg['model_args']['rel_pos_type'] == 'bias' and cfg['pretrained_cfg']['input_size'] == [3, 40, 40]
    again = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True)
    a, b = state_np(tm), state_np(again)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert again.global_pool == 'token' and again.patch_embed.grid_size == (5, 5)
