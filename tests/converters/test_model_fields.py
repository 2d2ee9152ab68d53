"""Model fields no array holds (norm eps, activation, a torch qkv's heads, input size...): recorded in a `.npz`'s zip
comment and a `.safetensors`' `__metadata__` and read back by vit-flax; said on stderr where a `.pth` has no room
(issue 34, converters/model_fields.py).

Judged by transformers: a ViT (layer_norm_eps 1e-12), a CLIP (quick_gelu) and a Swin (tanh GELU, 32 px) read
from their folders, written as each format, read back and written as transformers folders again, compute what
the source computes bit for bit (before this, the .npz route lost the eps / activation / size: 2e-6 to 5e-3
relative). The files stay what np.load, timm's `_load_weights` and `load_checkpoint`, and safetensors' own
loader read. No Flax compile: the fields are compared on the model, the outputs in torch.
"""
import json
import struct
import zipfile

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import vit_flax
from converters import model_fields, pipeline
from converters.errors import ConversionError
from vit_flax.summary import param_shapes

from helpers import cli, hf_model, hf_output, hf_strict_load, images, init_like

pytest.importorskip('transformers')

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)
SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
# id: (class, config class, config, output, the field the arrays alone get wrong)
CASES = {
    'ViT-eps1e-12': ('ViTForImageClassification', 'ViTConfig', dict(TINY, num_labels=3), 'logits', 'norm_eps'),
    'CLIP-quick_gelu': ('CLIPVisionModel', 'CLIPVisionConfig', dict(TINY, hidden_act='quick_gelu'), 'pooler_output',
                        'act_layer'),
    'Swin-tanh-32px': ('SwinForImageClassification', 'SwinConfig', dict(SWIN, num_labels=3, hidden_act='gelu_pytorch_tanh'),
                       'logits', 'gelu'),
}


def _source(tmp_path, case):
    cls, config_cls, config, field, _ = CASES[case]
    ref = hf_model(cls, config_cls, **config)
    ref.save_pretrained(str(tmp_path / 'hf'))
    model, params, _ = pipeline.load_model(tmp_path / 'hf', log=lambda s: None)
    return ref, model, flatten_dict(params, sep='/')


def _fields(model):
    return model_fields.record(model)


@pytest.mark.parametrize('case', list(CASES))
def test_a_transformers_model_through_npz_and_safetensors_and_back_to_transformers_computes_the_source_bit_for_bit(
        tmp_path, case):
    cls, _, _, field, lost = CASES[case]
    ref, model, flat = _source(tmp_path, case)
    x = images((2, 32, 32, 3))
    want = hf_output(ref, x, field)
    for ext in ('npz', 'safetensors'):
        path = tmp_path / f'm.{ext}'
        pipeline.write_flat(flat, model, path)
        said = []
        back, params, ck = pipeline.load_model(path, log=said.append)
        assert _fields(back) == _fields(model), ext
        note = next(s for s in said if 'model fields recorded' in s)   # said, with what the arrays alone give
        assert f'{lost}={getattr(model, lost)!r} (the arrays alone: ' in note, note
        pipeline.write_transformers(flatten_dict(params, sep='/'), back, tmp_path / ext, log=lambda s: None)
        got = hf_output(hf_strict_load(cls, tmp_path / ext), x, field)
        np.testing.assert_array_equal(got, want, err_msg=ext)


def test_the_files_read_as_before_by_np_load_timm_and_safetensors(tmp_path):
    import safetensors
    import timm
    import torch
    from safetensors.torch import load_file
    from timm.models.vision_transformer import _load_weights
    from converters.families import family_of
    _, model, flat = _source(tmp_path, 'ViT-eps1e-12')
    npz, st = tmp_path / 'm.npz', tmp_path / 'm.safetensors'
    pipeline.write_flat(flat, model, npz)
    pipeline.write_flat(flat, model, st)
    with zipfile.ZipFile(npz) as z:
        assert z.comment.startswith(b'vit_flax.model={') and b'"norm_eps":1e-12' in z.comment
    with np.load(npz, allow_pickle=False) as f:   # Google's loaders (vit_jax checkpoint.load, big_vision npload)
        google = dict(f)
    assert google.keys() == set(pipeline.formats.read_npz(str(npz)))
    with safetensors.safe_open(str(st), 'np') as f:
        meta = f.metadata()
    assert meta['format'] == 'pt' and json.loads(meta['vit_flax.model'])['fields']['norm_eps'] == 1e-12
    state = load_file(str(st))
    tm = family_of(model).torch_model(model, 'vit_base_patch8_224')
    timm.models.load_checkpoint(tm, str(st), strict=True)   # timm reads our safetensors...
    _load_weights(tm2 := family_of(model).torch_model(model, 'vit_base_patch8_224'), str(npz))   # ...and npz
    for k, v in tm2.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0, msg=k)


def test_a_pth_says_which_fields_a_reader_will_take_otherwise_and_the_set_flags_read_it_as_written(tmp_path):
    _source(tmp_path, 'CLIP-quick_gelu')
    r = cli('convert', tmp_path / 'hf', tmp_path / 'm.pth')
    assert r.returncode == 0, r.stderr
    warning = next(line for line in r.stderr.splitlines() if line.startswith('warning: ') and 'm.pth' in line)
    for part in ('num_heads unknown (this model: 2)', "norm_eps=1e-06 (this model: 1e-05)",
                 "act_layer=None (this model: 'quick_gelu')",
                 '--set num_heads=2 --set norm_eps=1e-05 --set act_layer=quick_gelu'):
        assert part in warning, (part, warning)
    flags = warning.split('read it with ')[1].split(' (or')[0].split()
    r = cli('convert', tmp_path / 'm.pth', tmp_path / 'back.npz', *flags)
    assert r.returncode == 0, r.stderr
    folder, _, _ = pipeline.load_model(tmp_path / 'hf', log=lambda s: None)
    back, _, _ = pipeline.load_model(tmp_path / 'back.npz', log=lambda s: None)
    assert _fields(back) == _fields(folder)


# ---------------------------------------------------------------- bad records: one line naming the file and key

def _tiny_vit_files(tmp_path):
    model = vit_flax.create_model('vit_tiny_patch16_224', img_size=32, depth=1, norm_eps=1e-12, num_classes=3)
    flat = {k: np.full(v.shape, 0.01, np.float32) for k, v in flatten_dict(param_shapes(model), sep='/').items()}
    for ext in ('npz', 'safetensors'):
        pipeline.write_flat(flat, model, tmp_path / f'm.{ext}', log=lambda s: None)
    return model


def _set_npz_record(path, text: bytes):
    with zipfile.ZipFile(path, 'a') as z:
        z.comment = text


def _set_safetensors_record(path, text: str):
    data = path.read_bytes()
    (n,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + n])
    header['__metadata__']['vit_flax.model'] = text
    blob = json.dumps(header).encode()
    blob += b' ' * (-len(blob) % 8)
    path.write_bytes(struct.pack('<Q', len(blob)) + blob + data[8 + n:])


def _record(**fields):
    good = {'module': 'VisionTransformer', 'fields': {'norm_eps': 1e-12}}
    good.update(fields)
    return json.dumps(good)


@pytest.mark.parametrize('ext,text,needle', [
    ('npz', '{"module": "VisionTransformer", "fields": {', 'not valid JSON'),
    ('npz', _record(fields={'norm_eps': 1e-12, 'depth_of_field': 3}), "field 'depth_of_field'"),
    ('npz', _record(fields={'norm_eps': 'tiny'}), "field 'norm_eps'"),
    ('npz', _record(module='SwinTransformer'), "module 'SwinTransformer'"),
    ('safetensors', _record(fields={'act_layer': 'relu'}), "field 'act_layer'"),
    ('safetensors', _record(fields={'num_heads': 0}), "field 'num_heads'"),
    ('safetensors', '[1, 2]', 'not an object'),
])
def test_a_corrupt_or_unknown_record_is_one_line_naming_the_file_and_key(tmp_path, ext, text, needle):
    _tiny_vit_files(tmp_path)
    path = tmp_path / f'm.{ext}'
    if ext == 'npz':
        _set_npz_record(path, b'vit_flax.model=' + text.encode())
    else:
        _set_safetensors_record(path, text)
    with pytest.raises(ConversionError) as e:
        pipeline.load_model(path, log=lambda s: None)
    msg = str(e.value)
    assert msg.startswith(f'{path}: ') and 'vit_flax.model' in msg and needle in msg and '\n' not in msg, msg
    r = cli('convert', path, tmp_path / 'out.pth')
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [f'vit-flax: error: {msg}'], r.stderr
    assert not (tmp_path / 'out.pth').exists()


def test_a_comment_or_metadata_of_another_tool_is_left_alone_and_a_caller_set_field_wins(tmp_path):
    _tiny_vit_files(tmp_path)
    _set_npz_record(tmp_path / 'm.npz', b'written by some other tool')
    assert pipeline.load_model(tmp_path / 'm.npz', log=lambda s: None)[0].norm_eps == 1e-6   # the registered one
    model, _, _ = pipeline.load_model(tmp_path / 'm.safetensors', log=lambda s: None, norm_eps=1e-5)
    assert model.norm_eps == 1e-5 and model.num_heads == 3


def test_load_params_into_a_named_model_that_computes_otherwise_says_which_recorded_field_differs(tmp_path):
    _tiny_vit_files(tmp_path)
    said = []
    pipeline.load_params(tmp_path / 'm.npz', 'vit_tiny_patch16_224', img_size=32, depth=1, num_classes=3,
                         log=said.append)
    warning = next(s for s in said if s.startswith('warning: '))
    assert 'norm_eps=1e-12' in warning and 'vit_tiny_patch16_224 norm_eps=1e-06' in warning, warning
    said.clear()
    pipeline.load_params(tmp_path / 'm.npz', 'vit_tiny_patch16_224', img_size=32, depth=1, num_classes=3,
                         norm_eps=1e-12, log=said.append)
    assert not any(s.startswith('warning: ') for s in said), said


# the newest families: one reduced model each with fields away from the name's defaults that no array shows
NEW_FAMILIES = {
    'relpos': ('vit_relpos_small_patch16_224', dict(depth=1, img_size=48), dict(norm_eps=1e-5)),
    'cait': ('cait_xxs24_224', dict(depth=1, depth_token_only=1, img_size=32), dict(norm_eps=1e-5)),
    'swinv2_cr': ('swinv2_cr_tiny_224', dict(depths=(1,), num_heads=(3,), img_size=32, window_size=4),
                  dict(norm_eps=1e-6, gelu='tanh')),
    'naflex': ('naflexvit_base_patch16_siglip', dict(depth=1, embed_dim=32, num_heads=2, img_size=32, patch_size=8,
                                                     pos_embed_grid_size=(4, 4)),
               dict(norm_eps=1e-5, act_layer='gelu', max_seq_len=12)),
}


@pytest.mark.parametrize('ext', ['npz', 'safetensors'])
@pytest.mark.parametrize('family', list(NEW_FAMILIES))
def test_the_newest_families_record_their_fields_and_read_them_back(tmp_path, family, ext):
    name, size, fields = NEW_FAMILIES[family]
    model = vit_flax.create_model(name, **size, **fields)
    path = tmp_path / f'm.{ext}'
    pipeline.save_params(init_like(model), str(path), name, **size, **fields)
    got, _, _ = pipeline.load_model(str(path), log=lambda m: None)
    assert {k: getattr(got, k) for k in fields} == fields
    assert {k: getattr(got, k) for k in fields} != {k: getattr(vit_flax.create_model(name), k) for k in fields}
