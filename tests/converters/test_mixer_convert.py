"""MLP-Mixer files both ways: Google's `.npz` with vit_jax's own `MlpMixer` (vendored, tests/reference/) as the client
that reads what we write and writes what we read, timm's `.pth` / `.safetensors` (strict load_state_dict in timm),
Facebook's ResMLP layout against timm's own checkpoint_filter_fn, and `vit-flax convert` through the CLI."""
import types

import jax
import numpy as np
import pytest
import torch
from flax.training.checkpoints import convert_pre_linen
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors.numpy import load_file
from timm.models.mlp_mixer import checkpoint_filter_fn

import converters
import vit_flax
from converters import rules
from converters.errors import ConversionError
from converters.families.mixer import FAMILY, facebook_to_timm, timm_to_facebook

from helpers import cli, images, perturb, perturb_timm, rel_err, run_flax, run_timm, state_np
from reference import vit_jax_models_mixer as vit_jax

jax.config.update('jax_default_matmul_precision', 'highest')

# vit_jax's Mixer config, reduced: 32 px, 8 px patches (16 tokens), width 32, two blocks, 10 classes
GOOGLE = dict(num_classes=10, num_blocks=2, hidden_dim=32, tokens_mlp_dim=16, channels_mlp_dim=128)
OURS = dict(num_classes=10, num_blocks=2, embed_dim=32, img_size=32, patch_size=8)
X = images((2, 32, 32, 3))


def google_model():
    return vit_jax.MlpMixer(patches=types.SimpleNamespace(size=(8, 8)), **GOOGLE)


def google_params(seed=0):
    """Params of vit_jax's MlpMixer drawn on its own tree's shapes (jax.eval_shape of its init), moved off init."""
    shapes = jax.eval_shape(lambda: google_model().init(jax.random.PRNGKey(0), X, train=False))['params']
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32), shapes)


def google_save(params, path):
    """A file as Google's are: the flattened tree, keys joined by '/' (`np.savez`)."""
    np.savez(path, **flatten_dict(params, sep='/'))


def google_load(path):
    """vit_jax's `checkpoint.load` (its gfile read aside): np.load, the tree recovered from '/' keys, and
    flax's `convert_pre_linen`."""
    with np.load(path, allow_pickle=False) as f:
        return convert_pre_linen(unflatten_dict(dict(f), sep='/'))


_GOOGLE_APPLY = jax.jit(lambda p, x: google_model().apply({'params': p}, x, train=False))   # compiled once


def google_apply(params):
    return np.asarray(_GOOGLE_APPLY(params, X))


@pytest.fixture(scope='module')
def google_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('google') / 'Mixer-T_8.npz'
    params = google_params()
    google_save(params, path)
    return path, params, google_apply(params)


def test_a_google_mixer_npz_is_the_models_own_tree_and_computes_vit_jax_logits(google_file):
    """The file read with no model named: the tree as it is (bit for bit), the architecture off its shapes, a note
    that it records no activation; with vit_jax's tanh GELU the logits are vit_jax's."""
    path, params, want = google_file
    notes = []
    model, ours, ck = converters.load_model(path, log=notes.append, act_layer='gelu_tanh')
    assert (ck.format, ck.layout, ck.family.name) == ('npz', 'flax', 'mixer')
    assert (model.num_blocks, model.embed_dim, model.mlp_dims, model.num_classes) == (2, 32, (16, 128), 10)
    flat, theirs = flatten_dict(ours, sep='/'), flatten_dict(params, sep='/')
    assert set(flat) == set(theirs) and all(np.array_equal(flat[k], theirs[k]) for k in flat)
    err = rel_err(run_flax(model, ours, X), want)
    assert err < 1e-5, err
    exact, _, _ = converters.load_model(path, log=notes.append)
    assert exact.act_layer == 'gelu' and any('records no activation' in n and 'gelu_tanh' in n for n in notes)


def test_cli_google_npz_to_timm_pth_and_back_is_bit_exact_and_both_clients_agree(google_file, tmp_path):
    """`vit-flax convert` .npz -> .pth -> .npz: timm loads the .pth strictly and computes what our model computes
    with timm's GELU; the .npz written back holds the source's arrays bit for bit, and vit_jax's loader reads
    it into logits equal to vit_jax's on the source."""
    path, params, want = google_file
    r = cli('convert', path, tmp_path / 'timm.pth')
    assert r.returncode == 0, r.stderr
    model = vit_flax.create_model('mixer_s16_224', **OURS)
    tm = FAMILY.torch_model(model, 'mixer_s16_224').eval()
    tm.load_state_dict(torch.load(tmp_path / 'timm.pth', weights_only=True), strict=True)
    err = rel_err(run_flax(model, params, X), run_timm(tm, X))
    assert err < 1e-5, err
    r = cli('convert', tmp_path / 'timm.pth', tmp_path / 'back.npz')
    assert r.returncode == 0, r.stderr
    with np.load(path) as a, np.load(tmp_path / 'back.npz') as b:
        assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert rel_err(google_apply(google_load(tmp_path / 'back.npz')), want) == 0


def test_what_we_write_vit_jax_reads_into_our_logits(tmp_path):
    """Our params (a ResMLP-free Mixer, perturbed) saved as .npz: vit_jax's loader and model compute our logits
    (our model with vit_jax's tanh GELU)."""
    model = vit_flax.create_model('mixer_s16_224', act_layer='gelu_tanh', **OURS)
    params = perturb(model, scale=0.3)
    converters.save_params(params, tmp_path / 'ours.npz', 'mixer_s16_224', act_layer='gelu_tanh', **OURS)
    err = rel_err(google_apply(google_load(tmp_path / 'ours.npz')), run_flax(model, params, X))
    assert err < 1e-5, err


@pytest.mark.parametrize('name,extra', [('gmixer_12_224', {}), ('resmlp_12_224', {}), ('gmlp_ti16_224', {}),
                                        ('mixer_s32_224', dict(stem_norm=True))])
def test_timm_safetensors_read_and_written_bit_exact_for_each_block_kind(name, extra, tmp_path):
    """timm's state_dict as .safetensors -> our params (architecture detected, no name given) -> .safetensors
    again: the same keys, dtypes and bits, which timm loads strictly (timm's `stem_norm` too)."""
    from safetensors.torch import save_file
    model = vit_flax.create_model(name, **OURS, **extra)
    tm = perturb_timm(FAMILY.torch_model(model, name))
    save_file({k: v.contiguous() for k, v in tm.state_dict().items()}, tmp_path / 'timm.safetensors')
    got, params, ck = converters.load_model(tmp_path / 'timm.safetensors', log=lambda s: None)
    fields = ('block_layer', 'mlp_layer', 'norm_layer', 'act_layer', 'stem_norm')
    assert [getattr(got, k) for k in fields] == [getattr(model, k) for k in fields]
    converters.save_params(params, tmp_path / 'back.safetensors', ck.model_name, **{
        k: getattr(got, k) for k in ('num_blocks', 'embed_dim', 'img_size', 'patch_size', 'num_classes', 'stem_norm')})
    a, b = state_np(tm), load_file(tmp_path / 'back.safetensors')
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in b.items()}, strict=True)


def test_facebook_resmlp_layout_is_what_timms_checkpoint_filter_reads(tmp_path):
    """Facebook's ResMLP keys (deit's resmlp_models.py) written from timm's: timm's own checkpoint_filter_fn maps
    them back to timm's state_dict bit for bit; ours reads them as timm's filter does; `--layout facebook`."""
    model = vit_flax.create_model('resmlp_12_224', **OURS)
    tm = perturb_timm(FAMILY.torch_model(model, 'resmlp_12_224'))
    state = state_np(tm)
    fb = timm_to_facebook(state)
    assert 'blocks.0.attn.weight' in fb and 'blocks.0.gamma_1' in fb and fb['norm.alpha'].shape == (32,)
    assert FAMILY.detect_layout(fb) == 'facebook'
    for back in (checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in fb.items()}, tm), facebook_to_timm(fb)):
        assert set(back) == set(state) and all(np.array_equal(np.asarray(back[k]), state[k]) for k in state)
    torch.save({k: torch.from_numpy(v) for k, v in fb.items()}, tmp_path / 'fb.pth')
    _, params, ck = converters.load_model(tmp_path / 'fb.pth', log=lambda s: None)
    assert ck.layout == 'facebook'
    flat = flatten_dict(params, sep='/')
    assert all(np.array_equal(flat[k], v) for k, v in rules.torch_to_flax(state, FAMILY.rules(model)).items())
    r = cli('convert', tmp_path / 'fb.pth', tmp_path / 'fb2.pth', '--layout', 'facebook')
    assert r.returncode == 0, r.stderr
    again = torch.load(tmp_path / 'fb2.pth', weights_only=True)
    assert set(again) == set(fb) and all(np.array_equal(again[k].numpy(), fb[k]) for k in fb)


def test_a_mixer_file_cannot_be_loaded_at_another_token_count(google_file):
    path, _, _ = google_file
    with pytest.raises(ConversionError, match='token-mixing weights are sized for a'):
        converters.load_params(path, 'mixer_s16_224', log=lambda s: None, **dict(OURS, img_size=64))


def test_a_timm_folder_of_a_mixer_timms_entrypoint_cannot_build_is_refused_before_writing(tmp_path):
    """timm's mlp_mixer entrypoints fix their sizes and blocks: a folder whose model_args change them would not
    load (timm raises on a repeated keyword), so writing one is refused in one line and nothing is written."""
    model = vit_flax.create_model('resmlp_12_224', **OURS)
    converters.save_params(perturb(model), tmp_path / 'r.safetensors', 'resmlp_12_224', **OURS)
    r = cli('convert', tmp_path / 'r.safetensors', tmp_path / 'folder', '--format', 'timm-folder')
    assert r.returncode == 1 and 'Traceback' not in r.stderr, r.stderr
    # (the file's patch 8 is resmlp_big_24_224's: the name detected)
    assert r.stderr.strip().splitlines()[-1] == (
        "vit-flax: error: timm's resmlp_big_24_224 fixes embed_dim, num_blocks itself: a timm folder cannot "
        'describe this model (embed_dim=32, num_blocks=2); write a .pth or .safetensors instead')
    assert not (tmp_path / 'folder').exists()


@pytest.mark.slow   # 30 blocks compiled and loaded in timm (~30 s here)
def test_a_timm_folder_of_a_registered_mixer_loads_in_timm_local_dir(tmp_path):
    import timm
    over = dict(num_classes=10, img_size=32)
    model = vit_flax.create_model('gmlp_ti16_224', **over)
    params = perturb(model)
    converters.save_params(params, tmp_path / 'g.safetensors', 'gmlp_ti16_224', **over)
    r = cli('convert', tmp_path / 'g.safetensors', tmp_path / 'folder', '--format', 'timm-folder')
    assert r.returncode == 0, r.stderr
    tm = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True).eval()
    x = images((2, 32, 32, 3))
    assert tm.pretrained_cfg['first_conv'] == 'stem.proj'
    assert rel_err(run_flax(model, params, x), run_timm(tm, x)) < 1e-5


def test_a_big_vision_mixer_checkpoint_is_read_from_under_params(google_file, tmp_path):
    """big_vision's `mlp_mixer.py` (the same tree) saves its training state with the params under `params/` beside
    the optimizer's: the tree is read from there, the rest left out."""
    path, params, _ = google_file
    with np.load(path) as f:
        arrays = {**{f'params/{k}': v for k, v in f.items()}, 'opt/0/mu/stem/kernel': f['stem/kernel']}
    np.savez(tmp_path / 'bv.npz', **arrays)
    _, ours, ck = converters.load_model(tmp_path / 'bv.npz', log=lambda s: None)
    assert ck.layout == 'big_vision'
    flat, theirs = flatten_dict(ours, sep='/'), flatten_dict(params, sep='/')
    assert set(flat) == set(theirs) and all(np.array_equal(flat[k], theirs[k]) for k in flat)


def test_a_transformers_folder_of_a_mixer_is_refused_in_one_line(tmp_path):
    model = vit_flax.create_model('gmlp_ti16_224', **OURS)
    converters.save_params(perturb(model), tmp_path / 'g.safetensors', 'gmlp_ti16_224', **OURS)
    r = cli('convert', tmp_path / 'g.safetensors', tmp_path / 'hf', '--format', 'transformers')
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        'vit-flax: error: transformers has no class for a MlpMixer; write .pth, .safetensors or .npz instead')
    assert not (tmp_path / 'hf').exists()


def test_every_registration_is_detected_from_its_timm_state_dict():
    """No name given: each of the 15 timm state_dicts (shapes only, on the meta device) picks its own name."""
    import timm
    from converters.checkpoint import match_model
    for name in timm.list_models(module='mlp_mixer'):
        with torch.device('meta'):
            state = timm.create_model(name).state_dict()
        cfg = dict(FAMILY.config_from_torch(state), img_size_hint=None)
        assert match_model(FAMILY, cfg, name)[0] == name
