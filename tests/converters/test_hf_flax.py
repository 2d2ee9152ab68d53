"""transformers' former Flax checkpoints (`flax_model.msgpack`) read into Flax, against transformers' torch ViT.

The msgpack trees are built the way `FlaxViTModel` / `FlaxViTForImageClassification` named their params (the
Flax classes are gone from transformers 5): from a perturbed torch `ViTModel` / `ViTForImageClassification`,
kernel = weight.T, conv kernel (p,p,C,D) = weight.permute(2,3,1,0), q/k/v kernels (D, heads*hd), written with
`flax.serialization.msgpack_serialize`. Read as a transformers folder, as a bare .msgpack with config.json
beside it, and without config.json (transformers' ViT defaults); outputs compared within 1e-5 relative.
"""
import json

import numpy as np
import pytest
from flax.serialization import msgpack_serialize
from helpers import cli, flax_vit_tree, hf_vit, images, rel_err, run_flax, run_hf, write_hf_flax

from converters import pipeline
from converters.errors import ConversionError
from converters.formats import hf_flax

@pytest.mark.parametrize('cls,cfg,out', [
    ('ViTModel', {}, 'pooler_output'),
    ('ViTForImageClassification', dict(num_labels=5, layer_norm_eps=1e-3, hidden_act='gelu_pytorch_tanh',
                                       id2label={i: f'class{i}' for i in range(5)}), 'logits')],
    ids=['FlaxViTModel', 'FlaxViTForImageClassification'])
def test_a_flax_model_msgpack_reads_into_flax_with_the_torch_models_outputs(tmp_path, cls, cfg, out):
    tm, config = hf_vit(cls, **cfg)
    x = images((2, 32, 32, 3))
    want = run_hf(tm, x, out)
    folder = tmp_path / 'folder'
    write_hf_flax(tm, config, folder)
    bare = write_hf_flax(tm, config, tmp_path / 'bare', name='weights.msgpack')
    for src in (folder, bare):
        model, params, ck = pipeline.load_model(src, log=lambda s: None)
        assert (ck.kind, ck.format, ck.layout, ck.source) == ('transformers', 'msgpack', 'hf_flax', str(src))
        assert model.norm_eps == config.layer_norm_eps and model.depth == 2 and model.num_heads == 4
        assert model.activation == ('gelu_tanh' if cls != 'ViTModel' else 'exact')
        err = rel_err(run_flax(model, params, x), want)
        assert err < 1e-5, (src, err)
    if cls == 'ViTModel':
        assert model.num_classes == 0 and model.representation_size == 32 and ck.class_names is None
    else:
        assert model.num_classes == 5 and ck.class_names == [f'class{i}' for i in range(5)]


def test_without_config_json_transformers_vit_defaults_apply(tmp_path):
    tm, config = hf_vit(hidden_size=128, num_attention_heads=2, intermediate_size=64, num_hidden_layers=1)
    path = write_hf_flax(tm, config, tmp_path, with_config=False)
    model, params, ck = pipeline.load_model(path, log=lambda s: None)
    assert model.norm_eps == 1e-12 and model.num_heads == 2   # heads: hidden size / 64
    assert any('no config.json beside it' in n for n in ck.notes)
    x = images((1, 32, 32, 3), seed=3)
    assert rel_err(run_flax(model, params, x), run_hf(tm, x, 'pooler_output')) < 1e-5


BAD_CONFIG = {
    'hidden_size': (dict(hidden_size=64), 'hidden_size 64, but the weights of'),
    'num_hidden_layers': (dict(num_hidden_layers=3), 'num_hidden_layers 3, but the weights of'),
    'model_type': (dict(model_type='bert'), "model_type 'bert': flax_model.msgpack is read for ViT"),
    'hidden_act': (dict(hidden_act='relu6'), "hidden_act 'relu6' is not one vit-flax computes"),
    'heads': (dict(num_attention_heads=5), 'is not divisible by num_attention_heads 5'),
    'eps': (dict(layer_norm_eps='small'), "layer_norm_eps 'small' is not a valid value"),
}


@pytest.mark.parametrize('case', BAD_CONFIG, ids=list(BAD_CONFIG))
def test_a_config_json_that_disagrees_with_the_weights_is_one_line_naming_the_field(tmp_path, case):
    tm, config = hf_vit(num_hidden_layers=1)
    write_hf_flax(tm, config, tmp_path / 'f')
    cfg = json.loads((tmp_path / 'f' / 'config.json').read_text())
    change, needle = BAD_CONFIG[case]
    (tmp_path / 'f' / 'config.json').write_text(json.dumps({**cfg, **change}))
    p = cli('convert', tmp_path / 'f', tmp_path / 'out.npz')
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(f'vit-flax: error: {tmp_path / "f" / "config.json"}: ') and needle in last, last
    assert not (tmp_path / 'out.npz').exists()


def test_damaged_or_foreign_msgpack_files_are_refused_in_one_line(tmp_path):
    tm, config = hf_vit(num_hidden_layers=1)
    path = write_hf_flax(tm, config, tmp_path / 'f')
    data = open(path, 'rb').read()
    (tmp_path / 'cut.msgpack').write_bytes(data[:len(data) // 2])
    with pytest.raises(ConversionError, match=r'cut.msgpack: not a Flax msgpack file'):
        pipeline.read_checkpoint(tmp_path / 'cut.msgpack')
    tree = flax_vit_tree(tm)
    tree['encoder']['layer']['0']['extra'] = {'kernel': np.zeros((2, 2), np.float32)}
    (tmp_path / 'extra.msgpack').write_bytes(msgpack_serialize(tree))
    with pytest.raises(ConversionError, match=r"unexpected key 'encoder/layer/0/extra/kernel' for a FlaxViTModel"):
        pipeline.read_checkpoint(tmp_path / 'extra.msgpack')
    (tmp_path / 'ints.msgpack').write_bytes(msgpack_serialize({'a': np.arange(3)}))
    with pytest.raises(ConversionError, match=r"ints.msgpack: 'a' is a ndarray of int64, not a float array"):
        pipeline.read_checkpoint(tmp_path / 'ints.msgpack')
    p = cli('convert', tmp_path / 'f', tmp_path / 'out.msgpack')
    assert p.returncode == 1 and 'is read, not written' in p.stderr.strip().splitlines()[-1], p.stderr
    assert not (tmp_path / 'out.msgpack').exists()
