"""Hugging Face transformers folders: what config.json says (eps, activations, labels), sharded and .bin files,
bad input refused in one line by the CLI, and what transformers cannot hold refused on write.
(Every class both ways: test_transformers.py.)"""
import json
import os

import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from converters import pipeline
from converters.errors import ConversionError

from helpers import cli, hf_model, hf_output, hf_strict_load, images, rel_err, run_flax

pytest.importorskip('transformers')

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


def _saved(tmp_path, name, cls='ViTForImageClassification', config_cls='ViTConfig', **config):
    folder = tmp_path / name
    base = TINY if not cls.startswith('Swin') else {}
    hf_model(cls, config_cls, **{**base, **config}).save_pretrained(str(folder))
    return folder


def test_vit_config_eps_and_activations_are_built_into_the_model(tmp_path):
    """ViT's layer_norm_eps defaults to 1e-12 (timm 1e-6); CLIP's quick_gelu, SigLIP's tanh GELU: each built in
    (the override said on stderr) and written back into config.json as it was."""
    for cls, config_cls, cfg, want in [
            ('ViTForImageClassification', 'ViTConfig', dict(num_labels=3), dict(norm_eps=1e-12, activation='exact')),
            ('CLIPVisionModel', 'CLIPVisionConfig', {}, dict(norm_eps=1e-5, activation='quick_gelu', pre_norm=True)),
            ('SiglipVisionModel', 'SiglipVisionConfig', {}, dict(norm_eps=1e-6, activation='tanh'))]:
        folder = _saved(tmp_path, cls, cls, config_cls, **cfg)
        notes = []
        model, params, ck = pipeline.load_model(folder, log=notes.append)
        assert {k: getattr(model, k) for k in want} == want
        if cls.startswith('ViT'):   # timm's registered ViT has 1e-6: the override is said
            assert any('model_type vit' in n and 'norm_eps=1e-12' in n for n in notes), notes
        pipeline.write_transformers(flatten_dict(params, sep='/'), model, tmp_path / f'{cls}.out', log=lambda s: None)
        written = json.loads((tmp_path / f'{cls}.out' / 'config.json').read_text())
        original = json.loads((folder / 'config.json').read_text())
        assert written['layer_norm_eps'] == original['layer_norm_eps']
        assert written['hidden_act'] == original['hidden_act']


def test_convert_reads_and_writes_through_the_cli_with_class_names_from_id2label(tmp_path):
    labels = {0: 'cat', 1: 'dog', 2: 'owl'}
    folder = _saved(tmp_path, 'in', id2label=labels, label2id={v: k for k, v in labels.items()})
    model, params, ck = pipeline.load_model(folder, log=lambda s: None)
    assert ck.class_names == ['cat', 'dog', 'owl']
    r = cli('convert', folder, tmp_path / 'out', '--format', 'transformers')
    assert r.returncode == 0, r.stderr
    assert 'model_type vit (ViTForImageClassification) is vit_' in r.stderr and 'norm_eps=1e-12' in r.stderr
    back = hf_strict_load('ViTForImageClassification', tmp_path / 'out')
    assert back.config.id2label == labels


def test_sharded_and_pytorch_bin_folders_read_as_the_single_file(tmp_path):
    import torch
    ref = hf_model('ViTForImageClassification', 'ViTConfig', **TINY, num_labels=3)
    x = images((2, 32, 32, 3))
    y = hf_output(ref, x, 'logits')
    ref.save_pretrained(str(tmp_path / 'sharded'), max_shard_size='20KB')
    names = os.listdir(tmp_path / 'sharded')
    assert 'model.safetensors.index.json' in names and sum(n.endswith('.safetensors') for n in names) > 2
    model, params, _ = pipeline.load_model(tmp_path / 'sharded', log=lambda s: None)
    assert rel_err(run_flax(model, params, x), y) < 1e-5
    (tmp_path / 'bin').mkdir()
    (tmp_path / 'bin' / 'config.json').write_text((tmp_path / 'sharded' / 'config.json').read_text())
    torch.save(ref.state_dict(), tmp_path / 'bin' / 'pytorch_model.bin')
    _, params_bin, ck = pipeline.load_model(tmp_path / 'bin', log=lambda s: None)
    assert ck.format == 'torch'
    assert all(np.array_equal(v, flatten_dict(params, sep='/')[k]) for k, v in flatten_dict(params_bin, sep='/').items())


def _refused(r, *words):
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = r.stderr.strip()
    assert '\n' not in line and 'Traceback' not in line, line
    for w in words:
        assert w in line, line
    return line


@pytest.mark.parametrize('edit,words', [
    (dict(model_type='bert'), ("model_type 'bert'",)),
    (dict(hidden_size=48), ('hidden_size', 'embed_dim=48', 'embed_dim=32')),
    (dict(intermediate_size=96), ('intermediate_size', 'mlp_dim=96')),
    (dict(num_hidden_layers=3), ('num_hidden_layers=3', '2 blocks')),
    (dict(image_size=48), ('image_size',)),
    (dict(id2label={'0': 'a', '1': 'b'}), ('id2label', '2 labels', '3 rows')),
    (dict(hidden_act='relu'), ("hidden_act='relu'",)),
    (dict(hidden_size='wide'), ("hidden_size='wide'",)),
    (dict(patch_size=0), ('patch_size=0',)),
    (dict(layer_norm_eps=-1), ('layer_norm_eps=-1',)),
    (dict(qkv_bias=False), ('qkv_bias',)),
], ids=['bert', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'image_size', 'id2label', 'hidden_act',
        'hidden_size-type', 'patch_size-zero', 'eps-negative', 'qkv_bias'])
def test_a_config_json_the_weights_contradict_is_refused_naming_the_file_and_field(tmp_path, edit, words):
    folder = _saved(tmp_path, 'vit', num_labels=3)
    cfg = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**cfg, **edit}))
    _refused(cli('convert', folder, tmp_path / 'out.safetensors'), str(folder / 'config.json'), *words)
    assert not (tmp_path / 'out.safetensors').exists()


def test_a_missing_shard_is_refused_naming_it(tmp_path):
    ref = hf_model('ViTForImageClassification', 'ViTConfig', **TINY, num_labels=3)
    ref.save_pretrained(str(tmp_path / 'sharded'), max_shard_size='20KB')
    shard = sorted(n for n in os.listdir(tmp_path / 'sharded') if n.endswith('.safetensors'))[1]
    os.remove(tmp_path / 'sharded' / shard)
    _refused(cli('convert', tmp_path / 'sharded', tmp_path / 'out', '--format', 'transformers'),
             'model.safetensors.index.json', shard)
    assert not (tmp_path / 'out').exists()


def _random_params(model, seed=0):
    """Flat params of the model's shapes, no init compiled: norm scales 1 and everything else 0, plus seeded
    N(0, 0.05) noise everywhere (as `perturb` moves an initialised tree)."""
    from vit_flax.summary import param_shapes
    rng = np.random.default_rng(seed)
    return {k: (float(k.endswith('scale')) + 0.05 * rng.standard_normal(v.shape)).astype(np.float32)
            for k, v in flatten_dict(param_shapes(model), sep='/').items()}


def test_what_transformers_cannot_hold_is_refused_on_write_naming_it(tmp_path):
    import vit_flax
    small = dict(embed_dim=32, depth=1, num_heads=2, img_size=32, patch_size=8)
    for name, over, words in [
            ('vit_base_patch16_clip_224', dict(num_classes=16), 'a head bias'),
            ('vit_base_patch16_224', dict(num_classes=3, init_values=1e-5), 'LayerScale'),
            ('deit_base_distilled_patch16_224', dict(num_classes=3, reg_tokens=2), 'register tokens'),
            ('vit_base_patch16_224', dict(num_classes=3, qk_norm=True), 'q/k norms'),
            ('vit_base_patch16_224', dict(num_classes=3, global_pool='avg'), 'pooling')]:
        model = vit_flax.create_model(name, **small, **over)
        with pytest.raises(ConversionError, match=words):
            pipeline.write_transformers(_random_params(model), model, tmp_path / 'out', log=lambda s: None)
        assert not (tmp_path / 'out').exists()
    pipeline.save_params(_random_params(model), tmp_path / 'avg.npz', name, **small, **over)
    _refused(cli('convert', tmp_path / 'avg.npz', tmp_path / 'out', '--format', 'transformers'), 'pooling')
    assert not (tmp_path / 'out').exists()


def test_a_transformers_folder_loads_into_a_named_model_as_train_weights_does(tmp_path):
    """`load_params` (train_flax.py --weights) takes a transformers folder like any checkpoint, a new head
    replacing the file's when num_classes is given."""
    folder = _saved(tmp_path, 'vit', num_labels=3)
    _, _, ck = pipeline.load_model(folder, log=lambda s: None)
    over = {k: getattr(ck.model, k) for k in ('embed_dim', 'depth', 'num_heads', 'img_size', 'patch_size',
                                              'mlp_dim', 'norm_eps')}
    params = pipeline.load_params(folder, ck.model_name, num_classes=5, log=lambda s: None, **over)
    assert params['head']['kernel'].shape == (32, 5)
    np.testing.assert_array_equal(params['cls'], ck.flat['cls'])


@pytest.mark.parametrize('name,over,cls,field', [
    ('vit_base_patch16_224', dict(num_classes=0), 'ViTForImageClassification', 'logits'),   # num_labels 0: identity
    ('deit_base_patch16_224', dict(num_classes=0, reg_tokens=1), 'DeiTForImageClassification', 'logits'),
    ('vit_small_patch14_reg4_dinov2', dict(img_size=28, patch_size=14), 'Dinov2WithRegistersModel', 'pooler_output'),
    ('vit_base_patch16_siglip_gap_224', {}, 'SiglipVisionModel', 'last_hidden_state'),
], ids=['vit-headless', 'deit-one-register', 'timm-dinov2-reg4', 'siglip-gap'])
def test_timm_named_models_are_written_as_the_transformers_class_that_computes_them(tmp_path, name, over, cls, field):
    """Models that never came from transformers (timm's names) written out: the class follows the model and
    computes what the Flax model does (a headless ViT's pooled token is an identity classifier's logits; timm's
    register DINOv2 has its class position folded into the token, written back as a zero row)."""
    import vit_flax
    from flax.traverse_util import unflatten_dict
    model = vit_flax.create_model(name, **{**dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8), **over})
    flat = _random_params(model)
    params = unflatten_dict(flat, sep='/')
    assert pipeline.write_transformers(flat, model, tmp_path / 'out', log=lambda s: None) == cls
    x = images((2,) + tuple(model.input_shape))
    y = run_flax(model, params, x, **({'method': 'forward_features'} if field == 'last_hidden_state' else {}))
    assert rel_err(hf_output(hf_strict_load(cls, tmp_path / 'out'), x, field), y) < 1e-5


def test_a_transformers_repo_in_the_offline_hub_cache_reads_through_hf_hub(tmp_path, monkeypatch):
    """`hf-hub:ORG/NAME` naming a transformers repo (google/vit-*, facebook/dinov2-*, ...) in a fake cache
    (huggingface_hub's layout, offline) reads as its folder does."""
    commit = 'a' * 40
    repo = tmp_path / 'hub' / 'models--google--vit-tiny-test'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    snap = _saved(tmp_path, 'snap', num_labels=3)
    (repo / 'snapshots').mkdir()
    snap.rename(repo / 'snapshots' / commit)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    ck = pipeline.read_checkpoint('hf-hub:google/vit-tiny-test', log=lambda s: None)
    assert ck.kind == 'transformers' and ck.model.norm_eps == 1e-12 and ck.source == 'hf-hub:google/vit-tiny-test'


@pytest.mark.parametrize('cls', ['Swinv2ForImageClassification', 'Swinv2Model'])
def test_swinv2_key_table_maps_transformers_to_timm_both_ways_with_the_same_outputs(cls):
    """No vit-flax Swin V2 yet: the table is judged by timm's SwinTransformerV2 and transformers' Swinv2, a
    perturbed transformers model's weights loaded strictly into timm (same logits / pooled features) and back."""
    import timm
    import torch
    from converters import hf_transformers, rules
    from helpers import state_np
    heads = dict(num_labels=3) if cls.endswith('Classification') else {}
    ref = hf_model(cls, 'Swinv2Config', image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                   window_size=4, **heads)
    tm = timm.create_model('swinv2_tiny_window8_256', pretrained=False, img_size=32, patch_size=2, embed_dim=16,
                           depths=(2, 2), num_heads=(2, 4), window_size=4, num_classes=3 if heads else 0).eval()
    table = hf_transformers.table(type('M', (), dict(depths=(2, 2), num_classes=3 if heads else 0)), cls, 'hub')
    hf = state_np(ref)
    timm_state = rules.torch_to_flax(hf, table)
    missing, unexpected = tm.load_state_dict({k: torch.from_numpy(v) for k, v in timm_state.items()}, strict=False)
    assert not unexpected and all(k.endswith(('relative_coords_table', 'relative_position_index', 'k_bias'))
                                  for k in missing), missing
    x = images((2, 32, 32, 3))
    from helpers import run_timm
    y = hf_output(ref, x, 'logits' if heads else 'pooler_output')
    assert rel_err(run_timm(tm, x), y) < 1e-5
    back = rules.flax_to_torch(timm_state, table)
    assert back.keys() == hf.keys() and all(np.array_equal(back[k], v) for k, v in hf.items())


def test_a_named_model_of_another_architecture_is_refused(tmp_path):
    folder = _saved(tmp_path, 'vit', num_labels=3)
    _refused(cli('convert', folder, tmp_path / 'out.npz', '--model', 'vit_small_patch16_224'),
             'config.json', 'embed_dim=32', 'vit_small_patch16_224 has embed_dim=384')


def test_a_named_model_of_another_family_is_refused_before_its_overrides_are_applied(tmp_path):
    """--model naming a ViT for a Swin folder, with ViT fields set (--set depth=2): the family is refused in one
    line, not the fields."""
    folder = _saved(tmp_path, 'swin', 'SwinModel', 'SwinConfig', image_size=32, patch_size=2, embed_dim=16,
                    depths=[2, 2], num_heads=[2, 4], window_size=4)
    with pytest.raises(ConversionError, match='holds a swin checkpoint, but vit_base_patch16_224 is a VisionTransformer'):
        pipeline.read_checkpoint(folder, 'vit_base_patch16_224', dict(depth=2), log=lambda s: None)


def test_a_swin_config_json_with_another_window_is_refused_naming_window_size(tmp_path):
    folder = _saved(tmp_path, 'swin', 'SwinForImageClassification', 'SwinConfig', image_size=32, patch_size=2,
                    embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=3)
    cfg = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**cfg, 'window_size': 2}))
    _refused(cli('convert', folder, tmp_path / 'out.npz'), 'config.json', 'window_size')


def test_a_swinv2_config_json_without_a_pretrained_window_per_stage_is_refused_naming_them(tmp_path):
    folder = _saved(tmp_path, 'swinv2', 'Swinv2Model', 'Swinv2Config', image_size=32, patch_size=2, embed_dim=16,
                    depths=[2, 2], num_heads=[2, 4], window_size=4)
    cfg = json.loads((folder / 'config.json').read_text())
    for value in ([4], [1, -1], 'x'):
        (folder / 'config.json').write_text(json.dumps({**cfg, 'pretrained_window_sizes': value}))
        _refused(cli('convert', folder, tmp_path / 'out.npz'), 'config.json', f'pretrained_window_sizes={value!r}')


def test_any_config_field_of_any_json_type_is_read_or_refused_in_one_line(tmp_path):
    """Every field of a ViT's config.json set to values of other JSON types: read (the field is unused or the
    value fits) or refused with one ConversionError line, never another exception."""
    folder = _saved(tmp_path, 'vit', num_labels=3)
    cfg = json.loads((folder / 'config.json').read_text())
    for key in cfg:
        for value in ('x', -1, [], None):
            (folder / 'config.json').write_text(json.dumps({**cfg, key: value}))
            try:
                pipeline.read_checkpoint(folder, log=lambda s: None)
            except ConversionError as e:
                assert '\n' not in str(e)


@pytest.mark.parametrize('name,over,not_this', [
    ('vit_base_patch16_clip_quickgelu_224', dict(num_classes=0), 'vit_base_patch16_clip_224'),   # OpenAI's CLIP
    ('vit_so400m_patch14_siglip_384', {}, 'vit_so400m_patch14_siglip_378'),   # 27x27 patches of 14 either way
], ids=['clip-quick_gelu', 'siglip-384'])
def test_what_config_json_records_beside_the_shapes_picks_the_registered_name_that_has_it(name, over, not_this):
    """The pipeline's matcher ranks registered names by what config.json records beside the shapes too (eps,
    activation, input size): the name whose fields a Hub folder's config.json states is the one read, not another
    of the same sizes given them as overrides."""
    import vit_flax
    from converters import hf_transformers
    from converters.families import family_of
    from vit_flax.summary import param_shapes
    model = vit_flax.create_model(name, **over)
    cls = hf_transformers.target_class(model)
    cfg = hf_transformers.config_for(model, cls)
    want = hf_transformers.arch_from_config(cfg['model_type'], cfg, cls, 'config.json', model.num_classes)
    zeros = {k: np.broadcast_to(np.float32(0), v.shape) for k, v in flatten_dict(param_shapes(model), sep='/').items()}
    family = family_of(model)
    shapes = family.config_from_flax(zeros)
    assert family.core(vit_flax.create_model(not_this)) == family.core(model)   # the sizes cannot tell them apart
    got, read = hf_transformers.registered_model(family, shapes, want, 'config.json')
    assert got == name and read == model
