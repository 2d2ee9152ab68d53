"""CaiT files both ways: Facebook's deit release files (`{'model': state_dict}`, DataParallel's `module.` keys) read as
timm's own `checkpoint_filter_fn` reads them and written back so that it reads them, timm's `.pth` / `.safetensors`
(strict load_state_dict in timm), the model's tree as `.npz`, `vit-flax convert` through the CLI, predict, and
detection that claims CaiT files and only them."""
import jax
import numpy as np
import pytest
import timm
import torch
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file
from timm.models.cait import checkpoint_filter_fn

import converters
import vit_flax
from converters import rules
from converters.checkpoint import match_model
from converters.families import FAMILIES, flax_family, torch_family
from converters.families.cait import FAMILY
from vit_flax.summary import param_shapes

from helpers import cli, images, rel_err, run_timm, state_np

jax.config.update('jax_default_matmul_precision', 'highest')

# two talking-heads blocks, the two class-attention blocks, width 48 (4 heads), 32 px, 10 classes: no registered size
OURS = dict(depth=2, embed_dim=48, num_heads=4, img_size=32, patch_size=8, num_classes=10)
X = images((2, 32, 32, 3))


@pytest.fixture(scope='module')
def release(tmp_path_factory):
    """A deit-style release file of a reduced CaiT (timm's module, perturbed, LayerScale moved off 1e-5): saved as
    deit's main.py saves it, the state_dict under 'model' beside the optimizer's and the epoch, keys under `module.`
    as a DataParallel run leaves them. Returns (path, timm's module, its state_dict)."""
    from helpers import perturb_timm
    model = vit_flax.create_model('cait_xxs24_224', **OURS)
    tm = perturb_timm(FAMILY.torch_model(model, 'cait_xxs24_224'))
    with torch.no_grad():
        for k, p in tm.named_parameters():
            if 'gamma_' in k:
                p.add_(0.5)
    path = tmp_path_factory.mktemp('deit') / 'XXS2_32.pth'
    torch.save({'model': {f'module.{k}': v for k, v in tm.state_dict().items()},
                'optimizer': {'state': {}, 'param_groups': []}, 'epoch': 399}, path)
    return path, tm, state_np(tm)


def test_a_deit_release_file_is_read_as_timms_filter_reads_it_and_predicts_timms_classes(release):
    """No model named: the family, the architecture off the shapes (talking heads give the head count), params equal
    to the rule table over timm's `checkpoint_filter_fn` of the file; `predict` gives timm's softmax."""
    from vit_flax_cli.predict import predict
    path, tm, state = release
    model, params, ck = converters.load_model(path, log=lambda s: None)
    assert (ck.family.name, ck.format) == ('cait', 'torch')
    assert (model.depth, model.depth_token_only, model.embed_dim, model.num_heads, model.num_classes,
            tuple(model.input_shape)) == (2, 2, 48, 4, 10, (32, 32, 3))
    filtered = checkpoint_filter_fn(torch.load(path, weights_only=True))
    want = rules.torch_to_flax({k: v.numpy() for k, v in filtered.items()}, FAMILY.rules(model))
    flat = flatten_dict(params, sep='/')
    assert set(flat) == set(want) and all(np.array_equal(np.asarray(flat[k]), want[k]) for k in want)
    probs = predict(model, params, X)
    err = rel_err(probs, torch.softmax(torch.from_numpy(run_timm(tm, X)), -1).numpy())
    assert err < 1e-5, err


def test_cli_release_to_npz_to_safetensors_and_facebook_layout_are_bit_exact(release, tmp_path):
    """`vit-flax convert` release .pth -> .npz (the model's tree) -> .safetensors: timm's state_dict bit for bit,
    which timm loads strictly; `--layout facebook` writes `{'model': state_dict}` that timm's filter reads back."""
    path, tm, state = release
    r = cli('convert', path, tmp_path / 'c.npz')
    assert r.returncode == 0, r.stderr
    with np.load(tmp_path / 'c.npz') as f:
        keys = set(f)
    assert {'patch_embed/kernel', 'pos_embedding', 'cls', 'encoder_norm/scale', 'head/kernel',
            'encoderblock_1/TalkingHeadsAttention_0/pre_softmax/kernel',
            'classblock_1/ClassAttention_0/query/kernel'} <= keys
    r = cli('convert', tmp_path / 'c.npz', tmp_path / 'back.safetensors')
    assert r.returncode == 0, r.stderr
    back = load_file(tmp_path / 'back.safetensors')
    assert set(back) == set(state) and all(back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k])
                                           for k in state)
    twin = timm.models.cait.Cait(**FAMILY.timm_kwargs(vit_flax.create_model('cait_xxs24_224', **OURS)))
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    r = cli('convert', tmp_path / 'back.safetensors', tmp_path / 'fb.pth', '--layout', 'facebook')
    assert r.returncode == 0, r.stderr
    saved = torch.load(tmp_path / 'fb.pth', weights_only=True)
    assert set(saved) == {'model'}
    again = checkpoint_filter_fn(saved)
    assert set(again) == set(state) and all(np.array_equal(again[k].numpy(), state[k]) for k in state)


def test_what_we_write_timm_loads_and_we_read_back_bit_exact(tmp_path):
    """Our params (drawn on the model's shapes, moved off init) saved as .pth: timm loads them strictly; read back
    with no name they are the same arrays."""
    from helpers import perturb
    model = vit_flax.create_model('cait_xxs24_224', **OURS, global_pool='avg')
    params = perturb(model, scale=0.3)
    converters.save_params(params, tmp_path / 'ours.pth', 'cait_xxs24_224', global_pool='avg', **OURS)
    tm = FAMILY.torch_model(model, 'cait_xxs24_224')
    tm.load_state_dict(torch.load(tmp_path / 'ours.pth', weights_only=True), strict=True)
    _, got, ck = converters.load_model(tmp_path / 'ours.pth', log=lambda s: None)
    a, b = flatten_dict(params, sep='/'), flatten_dict(got, sep='/')
    assert set(a) == set(b) and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a)


def test_every_registration_is_detected_from_its_timm_state_dict():
    """No name given: each of the 10 timm state_dicts (shapes only, on the meta device) picks its own name (the 224
    and 384 px twins told apart by the position table's rows). timm builds one block; the others, identical, are
    its keys renumbered up to the depth timm's registered function passes (`test_cait.timm_entrypoint_args`)."""
    from unittest import mock
    for name in timm.list_models(module='cait'):
        with mock.patch('timm.models.cait._create_cait', lambda variant, pretrained=False, **kw: kw):
            depth = timm.models.cait.__dict__[name]()['depth']
        with torch.device('meta'):
            one = timm.create_model(name, depth=1).state_dict()
        state = {**one, **{k.replace('blocks.0.', f'blocks.{i}.', 1): v for i in range(1, depth)
                           for k, v in one.items() if k.startswith('blocks.0.')}}
        cfg = dict(FAMILY.config_from_torch(state), img_size_hint=None)
        assert match_model(FAMILY, cfg, name)[0] == name


# one small timm model per family whose keys come near CaiT's: ViT, DeiT (distilled), DeiT III (LayerScale, gamma
# in old files), BEiT, EVA-02
OTHERS = ['vit_tiny_patch16_224', 'deit_tiny_distilled_patch16_224', 'deit3_small_patch16_224',
          'beit_base_patch16_224', 'eva02_tiny_patch14_224']


def test_cait_files_are_claimed_by_cait_only_and_cait_claims_no_other_familys():
    """A CaiT state_dict and Flax tree go to the CaiT family (first in FAMILIES among those that would read a
    `patch_embed.proj`); ViT, DeiT, DeiT III, BEiT and EVA-02 files go to theirs, CaiT's detection refusing each,
    and their Flax trees are not taken for a CaiT's (nor ours for theirs)."""
    with torch.device('meta'):
        cait = timm.create_model('cait_xxs24_224', depth=1).state_dict()
    assert torch_family(cait, 'c.pth') is FAMILY
    tree = flatten_dict(param_shapes(vit_flax.create_model('cait_xxs24_224', **OURS)), sep='/')
    assert flax_family(tree) is FAMILY
    assert [f.name for f in FAMILIES if f is not FAMILY and f.detect_flax(tree)] == []
    for name in OTHERS:
        with torch.device('meta'):
            state = timm.create_model(name, depth=1).state_dict()
        assert not FAMILY.detect_torch(state) and torch_family(state, name) is not FAMILY, name
    for name in ('vit_tiny_patch16_224', 'beit_base_patch16_224', 'eva02_tiny_patch14_224'):
        other = flatten_dict(param_shapes(vit_flax.create_model(name, depth=1)), sep='/')
        assert not FAMILY.detect_flax(other) and flax_family(other) is not FAMILY, name


def test_a_cait_file_loaded_at_another_size_resamples_its_position_table_and_says_so(release):
    """`load_params` to a 48 px copy: the 4x4 table (no class row) resampled to 6x6, said in one line."""
    path, _, state = release
    notes = []
    params = converters.load_params(path, 'cait_xxs24_224', log=notes.append, **dict(OURS, img_size=48))
    assert params['pos_embedding'].shape == (1, 36, 48)
    assert any('pos_embedding: grid (4, 4) -> (6, 6)' in n for n in notes), notes


def test_a_timm_folder_of_a_cait_loads_in_timm_local_dir_with_the_files_weights(release, tmp_path):
    """`--format timm-folder`: config.json's model_args hold what differs from the detected name (timm's entrypoints let
    them override its sizes), and timm's `local-dir:` builds the file's model holding its arrays bit for bit."""
    path, _, state = release
    r = cli('convert', path, tmp_path / 'folder', '--format', 'timm-folder')
    assert r.returncode == 0, r.stderr
    tm = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True)
    got = state_np(tm)
    assert type(tm).__name__ == 'Cait' and tm.pretrained_cfg['first_conv'] == 'patch_embed.proj'
    assert set(got) == set(state) and all(np.array_equal(got[k], state[k]) for k in state)
