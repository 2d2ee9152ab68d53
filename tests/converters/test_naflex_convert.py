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
    LayerScale), timm's logits (SigLIP's), and the file written back (.safetensors and .pth) holds timm's keys, dtypes and
    bits, which timm loads strictly."""
    path, model, tm = timm_file(tmp_path, name, ext)
    ours, params, ck = converters.load_model(path, num_heads=4)
    assert (ck.family.name, ck.model_name, ck.layout) == ('naflex', name, 'timm')
    assert (ours.depth, ours.embed_dim, ours.global_pool, ours.pos_embed, ours.reg_tokens, ours.class_token) == \
        (2, 32, model.global_pool, model.pos_embed, model.reg_tokens, model.class_token)
    if name == 'naflexvit_base_patch16_siglip':   # one compile: the logits of the others are test_naflex.py's
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


# ---------------------------------------------------------------- big_vision's own NaFlex ViT as the client

from reference import big_vision_naflex_vit as big_vision   # noqa: E402

# big_vision's NaFlex config, reduced: width 32, two blocks, 4 heads, MLP 64, a 4x4 table gathered on a 16x16 grid
# (`learn_2d(16)`), the MAP head, 10 classes; patches of 8 px
BV = dict(width=32, depth=2, num_heads=4, mlp_dim=64, pool_type='map', posemb='learn_2d(16)', nposemb=4)
SIZES = [(24, 64), (64, 24), (40, 40)]


@pytest.fixture(scope='module')
def bv_batch():
    from vit_flax.models.naflex import naflex_inputs
    rng = np.random.default_rng(3)
    return naflex_inputs([rng.standard_normal(s + (3,)).astype(np.float32) for s in SIZES], 8, 40)


def bv_image(b):
    """big_vision's model input: (patches, ptype (1 patch, 0 padding), yabs, xabs)."""
    return (b['patches'], b['patch_valid'].astype(np.int32), b['patch_coord'][..., 0], b['patch_coord'][..., 1])


_BV_APPLY = jax.jit(lambda p, image: big_vision.Model(10, **BV).apply({'params': p}, image)[0])


def bv_params(seed=0):
    """Params of big_vision's model drawn on its own tree's shapes (jax.eval_shape of its init)."""
    b = dict(patches=np.zeros((1, 4, 192), np.float32), patch_valid=np.ones((1, 4), bool),
             patch_coord=np.zeros((1, 4, 2), np.int32))
    shapes = jax.eval_shape(lambda: big_vision.Model(10, **BV).init(jax.random.PRNGKey(0), bv_image(b)))['params']
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (rng.standard_normal(s.shape) * 0.3).astype(np.float32), shapes)


def test_big_visions_npz_is_the_models_own_tree_and_computes_big_visions_logits(tmp_path, bv_batch):
    """A file as big_vision writes its params (the tree flattened, '/'-joined keys), read with no model named: the
    SigLIP 2 NaFlex architecture (tanh GELU, bilinear antialiased resize) off its shapes, the tree bit for bit, and
    big_vision's logits on three aspect ratios in one batch. Under big_vision's `params/img/` (a SigLIP 2 two-tower
    checkpoint) it is read the same."""
    params = bv_params()
    flat = flatten_dict(params, sep='/')
    np.savez(tmp_path / 'bv.npz', **flat)
    model, ours, ck = converters.load_model(tmp_path / 'bv.npz', num_heads=4)
    assert (ck.family.name, ck.model_name, ck.layout) == ('naflex', 'naflexvit_base_patch16_siglip', 'flax')
    got = flatten_dict(ours, sep='/')
    assert set(got) == set(flat) and all(np.array_equal(got[k], flat[k]) for k in flat)
    want = np.asarray(_BV_APPLY(params, bv_image(bv_batch)))
    fn = jax.jit(lambda p, a, c, v: model.apply({'params': p}, a, patch_coord=c, patch_valid=v))
    err = rel_err(np.asarray(fn(ours, bv_batch['patches'], bv_batch['patch_coord'], bv_batch['patch_valid'])), want)
    assert err < 1e-5, err
    np.savez(tmp_path / 'two_tower.npz', **{f'params/img/{k}': v for k, v in flat.items()},
             **{'params/txt/Embed_0/embedding': np.zeros((8, 4), np.float32)})
    _, again, ck = converters.load_model(tmp_path / 'two_tower.npz', num_heads=4)
    assert ck.layout == 'big_vision' and set(flatten_dict(again, sep='/')) == set(flat)
    print(f'\nBIG_VISION naflex: ours on its file {err:.2e}')


def test_what_we_write_big_visions_loader_reads_into_our_logits(tmp_path, bv_batch):
    """Our SigLIP 2 NaFlex params (timm's, perturbed, read through the rule table) saved as .npz: big_vision's
    `load_params` and its model compute our logits on the mixed-aspect batch."""
    kw = dict(depth=2, embed_dim=32, num_heads=4, mlp_dim=64, patch_size=8, pos_embed_grid_size=(4, 4),
              num_classes=10, img_size=32)
    name = 'naflexvit_base_patch16_siglip'
    model = vit_flax.create_model(name, **kw)
    from converters import rules
    from flax.traverse_util import unflatten_dict
    tm = perturb_timm(FAMILY.torch_model(model, name), scale=0.3)
    params = unflatten_dict(rules.torch_to_flax(state_np(tm), FAMILY.rules(model)), sep='/')
    converters.save_params(params, tmp_path / 'ours.npz', name, **kw)
    theirs = np.asarray(_BV_APPLY(big_vision.load_params(str(tmp_path / 'ours.npz')), bv_image(bv_batch)))
    fn = jax.jit(lambda p, a, c, v: model.apply({'params': p}, a, patch_coord=c, patch_valid=v))
    ours = np.asarray(fn(params, bv_batch['patches'], bv_batch['patch_coord'], bv_batch['patch_valid']))
    err = rel_err(theirs, ours)
    assert err < 1e-5, err
    print(f'\nBIG_VISION naflex: big_vision on our file {err:.2e}')


def test_cli_predict_takes_each_image_at_its_aspect_ratio(tmp_path):
    """`vit-flax predict` on a wide and a tall image with a NaFlex .pth: each resized (no crop) to the largest
    patch multiple within the model's budget at its aspect ratio and predicted in one padded batch; the
    probabilities are timm's softmax on the same resized, normalised image (standard mode, its own grid)."""
    import json
    from PIL import Image
    from vit_flax.models.naflex import size_for_sequence
    path, model, tm = timm_file(tmp_path, 'naflexvit_base_patch16_siglip')
    rng = np.random.default_rng(5)
    paths = []
    for i, (h, w) in enumerate([(40, 120), (100, 30)]):
        p = tmp_path / f'im{i}.png'
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    sets = [a for k, v in REDUCED.items() for a in ('--set', f'{k}={",".join(map(str, v)) if isinstance(v, tuple) else v}')]
    r = cli('predict', path, *paths, '--json', '--top-k', '10', '--model', 'naflexvit_base_patch16_siglip', *sets,
            '--set', 'max_seq_len=24')
    assert r.returncode == 0, r.stderr
    assert 'aspect ratio in at most 24 patches' in r.stderr
    got = json.loads(r.stdout)['predictions']
    cfg = json.loads(r.stdout)['preprocessing']
    for p, pred in zip(paths, got):
        img = Image.open(p).convert('RGB')
        h, w = size_for_sequence(img.size[1], img.size[0], 8, 24)
        assert (h // 8) * (w // 8) <= 24 and (h > w) == (img.size[1] > img.size[0])
        x = np.asarray(img.resize((w, h), getattr(Image, cfg['interpolation'].upper())), np.uint8).astype(np.float32) / 255
        x = (x - np.asarray(cfg['mean'], np.float32)) / np.asarray(cfg['std'], np.float32)
        want = torch.softmax(torch.from_numpy(run_timm(tm, x[None])), -1).numpy()[0]
        probs = np.zeros(10)
        for t in pred['top_k']:
            probs[t['index']] = t['prob']
        assert np.abs(probs - want).max() < 1e-5, np.abs(probs - want).max()
