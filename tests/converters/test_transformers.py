"""Hugging Face transformers folders both ways, judged by transformers itself.

Each class is built from a tiny config, every parameter moved off its init (seeded randn * 0.02), saved in both
key spellings (the Hub's, `save_pretrained`'s default, and transformers 5's own, `save_original_format=False`),
read into Flax (outputs within 1e-5 relative), then written back (`pipeline.write_transformers`, what
`vit-flax convert --format transformers` runs) and loaded by the class that holds the model with no missing,
unexpected or mismatched keys (same outputs). Config, files and bad input: test_transformers_files.py.
"""
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from converters import pipeline

from helpers import hf_model, hf_output, hf_strict_load, images, rel_err, run_flax

pytest.importorskip('transformers')

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)
DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
SWIN = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99,
            max_position_embeddings=16)

# id: (class, config class, config, output compared, the class we write, its output, the Flax call)
CASES = {
    'ViTModel': ('ViTModel', 'ViTConfig', TINY, 'pooler_output', None, None, None),
    'ViTForImageClassification': ('ViTForImageClassification', 'ViTConfig', dict(TINY, num_labels=3), 'logits',
                                  None, None, None),
    'ViTForImageClassification-noqkvbias': ('ViTForImageClassification', 'ViTConfig',
                                            dict(TINY, num_labels=3, qkv_bias=False, hidden_act='gelu_new'),
                                            'logits', None, None, None),
    'DeiTModel': ('DeiTModel', 'DeiTConfig', TINY, 'pooler_output', None, None, None),
    'DeiTForImageClassification': ('DeiTForImageClassification', 'DeiTConfig', dict(TINY, num_labels=3), 'logits',
                                   None, None, None),
    'DeiTForImageClassificationWithTeacher': ('DeiTForImageClassificationWithTeacher', 'DeiTConfig',
                                              dict(TINY, num_labels=3), 'logits', None, None, None),
    'Dinov2Model': ('Dinov2Model', 'Dinov2Config', DINO, 'pooler_output', None, None, None),
    'Dinov2Model-swiglu': ('Dinov2Model', 'Dinov2Config', dict(DINO, use_swiglu_ffn=True), 'pooler_output',
                           None, None, None),
    'Dinov2WithRegistersModel': ('Dinov2WithRegistersModel', 'Dinov2WithRegistersConfig',
                                 dict(DINO, num_register_tokens=2), 'last_hidden_state', None, None, 'features'),
    # the classifier reads [class token, mean of the patch tokens] (registers left out): global_pool='token_avg'
    'Dinov2ForImageClassification': ('Dinov2ForImageClassification', 'Dinov2Config', dict(DINO, num_labels=3),
                                     'logits', None, None, None),
    'Dinov2WithRegistersForImageClassification': ('Dinov2WithRegistersForImageClassification',
                                                  'Dinov2WithRegistersConfig',
                                                  dict(DINO, num_labels=3, num_register_tokens=2), 'logits', None,
                                                  None, None),
    'SiglipVisionModel': ('SiglipVisionModel', 'SiglipVisionConfig', TINY, 'pooler_output', None, None, None),
    'SiglipVisionModel-nohead': ('SiglipVisionModel', 'SiglipVisionConfig', dict(TINY, vision_use_head=False),
                                 'last_hidden_state', None, None, 'features'),
    'SiglipModel': ('SiglipModel', 'SiglipConfig', dict(vision_config=TINY, text_config=TEXT), 'pooler_output',
                    'SiglipVisionModel', 'pooler_output', None),
    'CLIPVisionModel': ('CLIPVisionModel', 'CLIPVisionConfig', TINY, 'pooler_output', None, None, None),
    'CLIPVisionModelWithProjection': ('CLIPVisionModelWithProjection', 'CLIPVisionConfig',
                                      dict(TINY, projection_dim=16), 'image_embeds', None, None, None),
    'CLIPModel': ('CLIPModel', 'CLIPConfig', dict(vision_config=TINY, text_config=TEXT, projection_dim=16),
                  'image_features', 'CLIPVisionModelWithProjection', 'image_embeds', None),
    'SwinForImageClassification': ('SwinForImageClassification', 'SwinConfig', dict(SWIN, num_labels=3), 'logits',
                                   None, None, None),
    'SwinModel': ('SwinModel', 'SwinConfig', SWIN, 'pooler_output', None, None, None),
    'Swinv2ForImageClassification': ('Swinv2ForImageClassification', 'Swinv2Config', dict(SWIN, num_labels=3),
                                     'logits', None, None, None),
    # the continuous bias scaled by the windows the weights were trained at, not each stage's own
    'Swinv2Model-pretrained-windows': ('Swinv2Model', 'Swinv2Config', dict(SWIN, pretrained_window_sizes=[3, 2]),
                                       'pooler_output', None, None, None),
    # the last stage no larger than the window: transformers and timm both take the whole stage, unshifted
    'SwinModel-stage-is-window': ('SwinModel', 'SwinConfig', dict(SWIN, patch_size=4), 'pooler_output', None, None,
                                  None),
}


def _flax(model, params, x, how):
    if how == 'features':
        return run_flax(model, params, x, method='forward_features')
    return run_flax(model, params, x)


def _save(ref, folder, spelling):
    ref.save_pretrained(str(folder), save_original_format=spelling == 'hub')
    return folder


@pytest.mark.parametrize('case', list(CASES))
def test_each_class_reads_into_flax_in_both_spellings_and_writes_back_what_it_loads_strictly(tmp_path, case):
    cls, config_cls, config, field, out_cls, out_field, how = CASES[case]
    ref = hf_model(cls, config_cls, **config)
    x = images((2, 32, 32, 3))
    y = hf_output(ref, x, field)
    errors, trees = {}, {}
    for spelling in ('hub', 'internal'):
        folder = _save(ref, tmp_path / spelling, spelling)
        model, params, ck = pipeline.load_model(folder, log=lambda s: None)
        assert ck.kind == 'transformers' and cls in ck.layout
        trees[spelling] = flatten_dict(params, sep='/')
        if spelling == 'hub':
            errors[spelling] = rel_err(_flax(model, params, x, how), y)
        else:   # the same tree, so the same outputs (one Flax compile per class keeps the file fast)
            assert trees['internal'].keys() == trees['hub'].keys()
            assert all(np.array_equal(trees['internal'][k], v) for k, v in trees['hub'].items())
            errors[spelling] = errors['hub']
        assert errors[spelling] < 1e-5, (spelling, errors[spelling])
    said = []
    written = pipeline.write_transformers(trees['hub'], model, tmp_path / 'out', log=said.append)
    assert written == (out_cls or cls) and said
    back = hf_strict_load(out_cls or cls, tmp_path / 'out')
    errors['write'] = rel_err(hf_output(back, x, out_field or field), y)
    assert errors['write'] < 1e-5
    print(f'\nHF-ERRORS {case}: read hub {errors["hub"]:.2e}, read internal {errors["internal"]:.2e}, '
          f'write {errors["write"]:.2e}')



