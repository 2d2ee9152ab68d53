"""transformers' `BeitModel` / `BeitForImageClassification` folders both ways, judged by transformers 5 itself
(the Beit family's table; the Hub key spelling, what `save_pretrained` writes by default).

Each folder is saved from a tiny config with every parameter moved off its init (seeded randn * 0.02), read with
`pipeline.load_model` and written back with `pipeline.write_transformers`, which the same class loads with no
missing, unexpected or mismatched keys. One Flax compile (the classifier with a relative position bias per block,
mean pooling with its norm); BeitModel with a shared bias, absolute positions and class-token pooling goes through
the tables only (the written folder's outputs against the one read).
"""
import numpy as np
import pytest
from flax.traverse_util import flatten_dict, unflatten_dict

from converters import pipeline

from helpers import hf_model, hf_output, hf_strict_load, images, rel_err, run_flax

pytest.importorskip('transformers')

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


def _read(ref, folder):
    ref.save_pretrained(str(folder))
    model, params, ck = pipeline.load_model(folder, log=lambda s: None)
    assert ck.kind == 'transformers'
    return model, flatten_dict(params, sep='/')


def test_a_beit_classifier_reads_into_flax_and_writes_back_what_transformers_loads_strictly(tmp_path):
    ref = hf_model('BeitForImageClassification', 'BeitConfig', num_labels=3, use_relative_position_bias=True, **TINY)
    x = images((2, 32, 32, 3))
    want = hf_output(ref, x, 'logits')
    model, flat = _read(ref, tmp_path / 'hub')
    assert model.use_rel_pos_bias and model.use_fc_norm and model.num_classes == 3 and model.norm_eps == 1e-12
    err_read = rel_err(run_flax(model, unflatten_dict(flat, sep='/'), x), want)
    assert err_read < 1e-5, err_read
    written = pipeline.write_transformers(flat, model, tmp_path / 'out', log=lambda s: None)
    assert written == 'BeitForImageClassification'
    err_write = rel_err(hf_output(hf_strict_load('BeitForImageClassification', tmp_path / 'out'), x, 'logits'), want)
    assert err_write < 1e-5
    print(f'\nHF-ERRORS BeitForImageClassification: read {err_read:.2e}, write {err_write:.2e}')


def test_a_beit_model_with_shared_bias_and_token_pooling_round_trips_bit_exact(tmp_path):
    ref = hf_model('BeitModel', 'BeitConfig', use_shared_relative_position_bias=True, use_mean_pooling=False,
                   use_absolute_position_embeddings=True, **TINY)
    model, flat = _read(ref, tmp_path / 'hub')
    assert model.use_shared_rel_pos_bias and model.use_abs_pos_emb and model.global_pool == 'token'
    assert pipeline.write_transformers(flat, model, tmp_path / 'out', log=lambda s: None) == 'BeitModel'
    back = hf_strict_load('BeitModel', tmp_path / 'out')
    want = ref.state_dict()
    for k, v in back.state_dict().items():
        assert np.array_equal(v.numpy(), want[k].numpy()), k
