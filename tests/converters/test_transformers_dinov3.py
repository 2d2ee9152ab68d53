"""transformers' `DINOv3ViTModel` folders both ways, judged by transformers 5 itself (the Eva family's table).

Each folder is saved by `DINOv3ViTModel.save_pretrained` from a tiny config with every parameter moved off its
init (seeded randn * 0.02), read with `pipeline.load_model` (config.json decides the Eva: DINOv3 RoPE with
`rope_theta`, q/v biases, LayerScale, registers, the GELU or gated MLP), and written back with
`pipeline.write_transformers`, which `DINOv3ViTModel.from_pretrained` loads with no missing, unexpected or
mismatched keys. One Flax compile: the gated case with registers (last_hidden_state = our tokens unpooled,
pooler_output = our output, the class token after the final norm); the GELU case without q/v biases goes
through the tables only (the written folder's outputs against the one read).
"""
import json

import numpy as np
import pytest

from converters import pipeline
from flax.traverse_util import flatten_dict

from helpers import hf_model, hf_output, hf_strict_load, images, rel_err, run_flax

pytest.importorskip('transformers')

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


def _read(ref, folder, spelling='hub'):
    ref.save_pretrained(str(folder), save_original_format=spelling == 'hub')
    said = []
    model, params, ck = pipeline.load_model(folder, log=said.append)
    assert ck.kind == 'transformers' and 'DINOv3ViTModel' in ck.layout
    return model, flatten_dict(params, sep='/'), said


def test_a_gated_dinov3_with_registers_reads_into_flax_and_writes_back_what_transformers_loads_strictly(tmp_path):
    ref = hf_model('DINOv3ViTModel', 'DINOv3ViTConfig', num_register_tokens=2, use_gated_mlp=True, hidden_act='silu',
                   rope_theta=50.0, layer_norm_eps=1e-6, **TINY)
    x = images((2, 32, 32, 3))
    tokens, pooled = hf_output(ref, x, 'last_hidden_state'), hf_output(ref, x, 'pooler_output')
    model, flat, said = _read(ref, tmp_path / 'hub')
    assert model.reg_tokens == 2 and model.mlp_layer == 'swiglu' and model.rope_temperature == 50.0
    assert model.norm_eps == 1e-6 and model.global_pool == 'token' and model.num_classes == 0
    assert any('mask_token' in s for s in said)
    _, internal, _ = _read(ref, tmp_path / 'internal', 'internal')   # transformers 5's own spelling: the same tree
    assert internal.keys() == flat.keys() and all(np.array_equal(internal[k], v) for k, v in flat.items())
    from flax.traverse_util import unflatten_dict
    params = unflatten_dict(flat, sep='/')
    got = run_flax(model.clone(global_pool=''), params, x)   # no pooling: every token after the final norm
    err_tokens = rel_err(got, tokens)
    err_pooled = rel_err(got[:, 0], pooled)   # our output with global_pool='token' (the model read) is this row
    assert err_tokens < 1e-5 and err_pooled < 1e-5, (err_tokens, err_pooled)
    logs = []
    assert pipeline.write_transformers(flat, model, tmp_path / 'out', log=logs.append) == 'DINOv3ViTModel'
    back = hf_strict_load('DINOv3ViTModel', tmp_path / 'out')
    err_write = rel_err(hf_output(back, x, 'last_hidden_state'), tokens)
    assert err_write < 1e-5
    cfg = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert cfg['use_gated_mlp'] and cfg['num_register_tokens'] == 2 and cfg['rope_theta'] == 50.0
    print(f'\nHF-ERRORS DINOv3ViTModel: read tokens {err_tokens:.2e}, pooled {err_pooled:.2e}, write {err_write:.2e}')


def test_a_gelu_dinov3_without_qv_biases_round_trips_through_our_tables_bit_exact(tmp_path):
    ref = hf_model('DINOv3ViTModel', 'DINOv3ViTConfig', query_bias=False, value_bias=False, **TINY)
    model, flat, _ = _read(ref, tmp_path / 'hub')
    assert not model.qkv_bias and model.mlp_layer == 'mlp' and model.reg_tokens == 0
    pipeline.write_transformers(flat, model, tmp_path / 'out', log=lambda s: None)
    back = hf_strict_load('DINOv3ViTModel', tmp_path / 'out')
    want = {k: v for k, v in ref.state_dict().items()}
    for k, v in back.state_dict().items():
        assert np.array_equal(v.numpy(), want[k].numpy()) or k.endswith('mask_token'), k


@pytest.mark.parametrize('change, message', [
    (dict(key_bias=True), 'key_bias=true'),
    (dict(use_gated_mlp=True, hidden_act='gelu'), "hidden_act='gelu'"),
    (dict(mlp_bias=False), 'mlp_bias=false'),
])
def test_a_config_our_eva_cannot_compute_is_refused_naming_the_field(tmp_path, change, message):
    ref = hf_model('DINOv3ViTModel', 'DINOv3ViTConfig', **TINY, **change)
    ref.save_pretrained(str(tmp_path))
    with pytest.raises(pipeline.ConversionError, match=message):
        pipeline.load_model(tmp_path, log=lambda s: None)


def test_a_model_with_a_head_or_absolute_positions_is_refused_by_dinov3vitmodel(tmp_path):
    import vit_flax
    for name, why in (('vit_small_patch16_dinov3', None), ('eva02_tiny_patch14_224', 'cannot hold')):
        model = vit_flax.create_model(name, depth=1)
        flat = {k: np.zeros(v.shape, np.float32) for k, v in flatten_dict(
            __import__('jax').eval_shape(lambda: model.init(__import__('jax').random.PRNGKey(0),
                                                            np.zeros((1,) + model.input_shape, np.float32)))['params'],
            sep='/').items()}
        if why is None:
            assert pipeline.write_transformers(flat, model, tmp_path / name, log=lambda s: None) == 'DINOv3ViTModel'
        else:
            with pytest.raises(pipeline.ConversionError, match=why):
                pipeline.write_transformers(flat, model, tmp_path / name, log=lambda s: None)
