"""transformers' `Siglip2VisionModel` and `Siglip2Model` (its vision half) folders both ways, judged by transformers
5 itself (the NaFlex family's table).

Each folder is saved by `save_pretrained` from a tiny config with every parameter moved off its init (seeded
randn * 0.02), read with `pipeline.load_model` (config.json decides: `num_patches` the square table, the tanh GELU,
the MAP head), and written back with `pipeline.write_transformers`, which `Siglip2VisionModel.from_pretrained`
loads with no missing, unexpected or mismatched keys. One Flax compile: a batch of a wide, a tall and a square
image padded to one budget, against transformers' pooler_output on the same patches, mask and spatial shapes.
"""
import jax
import numpy as np
import pytest
import torch
from flax.traverse_util import flatten_dict, unflatten_dict

from converters import pipeline
from vit_flax.models.naflex import naflex_inputs

from helpers import hf_model, hf_strict_load, rel_err

transformers = pytest.importorskip('transformers')
jax.config.update('jax_default_matmul_precision', 'highest')

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_patches=16,
            patch_size=8)
SIZES = [(24, 64), (64, 24), (40, 40)]


@pytest.fixture(scope='module')
def batch():
    rng = np.random.default_rng(1)
    b = naflex_inputs([rng.standard_normal(s + (3,)).astype(np.float32) for s in SIZES], 8, 40)
    b['spatial_shapes'] = np.asarray([(h // 8, w // 8) for h, w in SIZES])
    return b


def hf_pooled(model, b):
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(b['patches']),
                     pixel_attention_mask=torch.from_numpy(b['patch_valid']).long(),
                     spatial_shapes=torch.from_numpy(b['spatial_shapes']).long()).pooler_output.numpy()


def test_a_siglip2_vision_model_reads_into_flax_and_writes_back_what_transformers_loads_strictly(tmp_path, batch):
    """Read: the registered SigLIP 2 NaFlex name with the folder's sizes, transformers' pooled output on three
    aspect ratios in one jitted call within 1e-5 relative; written back: the same arrays bit for bit, loaded
    strictly, its outputs the source's."""
    ref = hf_model('Siglip2VisionModel', 'Siglip2VisionConfig', **TINY)
    ref.save_pretrained(str(tmp_path / 'hub'))
    model, params, ck = pipeline.load_model(tmp_path / 'hub', log=lambda s: None)
    assert ck.kind == 'transformers' and 'Siglip2VisionModel' in ck.layout
    assert ck.model_name == 'naflexvit_base_patch16_siglip'
    assert (model.act_layer, tuple(model.pos_embed_grid_size), model.global_pool, model.mlp_hidden) == \
        ('gelu_tanh', (4, 4), 'map', 64)
    fn = jax.jit(lambda p, a, c, v: model.apply({'params': p}, a, patch_coord=c, patch_valid=v))
    ours = np.asarray(fn(params, batch['patches'], batch['patch_coord'], batch['patch_valid']))
    want = hf_pooled(ref, batch)
    err = rel_err(ours, want)
    assert err < 1e-5, err
    flat = flatten_dict(params, sep='/')
    assert pipeline.write_transformers(flat, model, tmp_path / 'out', log=lambda s: None) == 'Siglip2VisionModel'
    back = hf_strict_load('Siglip2VisionModel', tmp_path / 'out')
    src = ref.state_dict()
    assert all(np.array_equal(v.numpy(), src[k].numpy()) for k, v in back.state_dict().items())
    assert rel_err(hf_pooled(back, batch), want) == 0
    print(f'\nHF-ERRORS Siglip2VisionModel: mixed-aspect batch pooled {err:.2e}')


def test_the_vision_half_of_a_siglip2_model_is_read_and_the_text_tower_left_out(tmp_path, batch):
    """A full Siglip2Model folder: its `vision_model.` keys read (the text tower's said and left out), the same
    tree as its vision half saved alone."""
    torch.manual_seed(0)
    cfg = transformers.Siglip2Config(
        vision_config=TINY, text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=64, vocab_size=64, max_position_embeddings=16))
    full = transformers.Siglip2Model(cfg).eval()
    with torch.no_grad():
        for p in full.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    full.save_pretrained(str(tmp_path / 'full'))
    said = []
    model, params, ck = pipeline.load_model(tmp_path / 'full', log=said.append)
    assert 'Siglip2Model' in ck.layout and model.depth == 2
    assert any('outside the vision tower' in s for s in said)
    vision = transformers.Siglip2VisionModel(transformers.Siglip2VisionConfig(**TINY)).eval()
    vision.load_state_dict(full.vision_model.state_dict())   # transformers 5: no `vision_model` wrapper
    vision.save_pretrained(str(tmp_path / 'vision'))
    _, alone, _ = pipeline.load_model(tmp_path / 'vision', log=lambda s: None)
    a, b = flatten_dict(params, sep='/'), flatten_dict(alone, sep='/')
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_what_siglip2_cannot_hold_is_refused_in_one_line(tmp_path):
    import vit_flax
    model = vit_flax.create_model('naflexvit_base_patch16_gap', depth=1)   # registers, LayerScale, bicubic
    flat = {k: np.zeros(v.shape, np.float32) for k, v in flatten_dict(jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32)))['params'], sep='/').items()}
    with pytest.raises(pipeline.ConversionError, match='cannot hold'):
        pipeline.write_transformers(flat, model, tmp_path / 'x', log=lambda s: None)
