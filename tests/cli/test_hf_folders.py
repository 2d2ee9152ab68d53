"""transformers folders in `predict`, `parity` and `train_flax.py --weights` (issue 19), against transformers.

- preprocessor_config.json read as transformers' own PIL image processors compute (ViT, DeiT, CLIP, BiT, the old
  feature extractors): our Pillow/numpy transform against theirs on the same images;
- `vit-flax predict HF_DIR` takes that preprocessing and the id2label names, and agrees with transformers' model
  run on transformers' preprocessing of the same image files;
- `vit-flax parity HF_DIR`: transformers' model beside Flax, block by block;
- `train_flax.py --weights HF_DIR` fine-tunes from it.
The folders hold `flax_model.msgpack` (tests/converters/test_hf_flax.py builds them from torch models); a folder
with torch weights takes the same paths once the transformers reader reads it.
"""
import json
import os

import numpy as np
import pytest
from helpers import cli, images, rel_err, xla_flags
from PIL import Image

from converters import preprocess
from converters.errors import ConversionError

PREPROCESSORS = {
    'vit': ('ViTImageProcessorPil', dict(do_resize=True, size={'height': 32, 'width': 32}, resample=2,
                                         do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)),
    'deit': ('DeiTImageProcessorPil', dict(size={'height': 37, 'width': 37}, crop_size={'height': 32, 'width': 32},
                                           do_center_crop=True, resample=3, image_mean=[0.485, 0.456, 0.406],
                                           image_std=[0.229, 0.224, 0.225])),
    'clip': ('CLIPImageProcessorPil', dict(size={'shortest_edge': 35}, crop_size={'height': 32, 'width': 32},
                                           do_center_crop=True, resample=3, do_convert_rgb=True,
                                           image_mean=[0.48145466, 0.4578275, 0.40821073],
                                           image_std=[0.26862954, 0.26130258, 0.27577711])),
    'bit-lanczos': ('BitImageProcessorPil', dict(size={'shortest_edge': 41}, crop_size={'height': 32, 'width': 32},
                                                 do_center_crop=True, resample=1, image_mean=[0.4, 0.5, 0.6],
                                                 image_std=[0.3, 0.2, 0.25])),
    'old-feature-extractor': ('ViTImageProcessorPil', dict(size=32, resample=0, image_mean=[0.5, 0.4, 0.3],
                                                           image_std=[0.2, 0.3, 0.4],
                                                           feature_extractor_type='ViTFeatureExtractor')),
}


def _test_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8))
    return [rgb, rgb.transpose(Image.Transpose.ROTATE_90), rgb.resize((40, 47)),
            Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)).convert('RGB')]


class _Model:   # the input shape is all preprocess.resolve asks of a model
    input_shape = (32, 32, 3)


@pytest.mark.parametrize('case', PREPROCESSORS, ids=list(PREPROCESSORS))
def test_preprocessor_config_computes_what_transformers_pil_image_processor_computes(tmp_path, case):
    import transformers
    cls, pp = PREPROCESSORS[case]
    (tmp_path / 'preprocessor_config.json').write_text(json.dumps(dict(pp, image_processor_type=cls[:-3])))
    theirs = getattr(transformers, cls).from_pretrained(str(tmp_path))
    cfg = preprocess.resolve(preprocess.read_hf_preprocessor(str(tmp_path)), _Model(), 'test')
    for img in _test_images():
        want = theirs(images=img, return_tensors='np')['pixel_values'][0].transpose(1, 2, 0)
        got = preprocess.transform(img, cfg)
        assert got.shape == want.shape == (32, 32, 3)
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f'{case} {img.size}')


@pytest.mark.parametrize('change,needle', [
    (dict(rescale_factor=1 / 127.5), 'rescale_factor'), (dict(do_resize=False), 'do_resize false'),
    (dict(resample=7), 'resample 7 is not a PIL filter'), (dict(size={'height': 0, 'width': 3}), 'size'),
    (dict(size={'shortest_edge': 32, 'longest_edge': 64}), 'a longest edge is not supported'),
    (dict(image_mean=[0.5, 0.5]), 'mean [0.5, 0.5] is not a list of 3 numbers')])
def test_a_preprocessor_config_vit_flax_cannot_follow_is_one_line_naming_the_field(tmp_path, change, needle):
    path = tmp_path / 'preprocessor_config.json'
    path.write_text(json.dumps({**PREPROCESSORS['vit'][1], **change}))
    with pytest.raises(ConversionError) as e:
        preprocess.resolve(preprocess.read_hf_preprocessor(str(tmp_path)), _Model(), str(path))
    assert str(e.value).startswith(str(path)) and needle in str(e.value), str(e.value)


# ---------------------------------------------------------------- a transformers folder, end to end

NAMES = ['cat', 'dog', 'owl', 'fox', 'elk']


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
    """A folder as a Hub ViT repo holds it: flax_model.msgpack, config.json (id2label, eps 1e-12 by default),
    preprocessor_config.json (DeiT's resize 37 -> centre crop 32, bicubic, ImageNet mean/std); image files."""
    from helpers import hf_vit, write_hf_flax
    d = tmp_path_factory.mktemp('hf')
    tm, config = hf_vit('ViTForImageClassification', num_labels=5, id2label=dict(enumerate(NAMES)),
                        label2id={n: i for i, n in enumerate(NAMES)})
    config.architectures = ['ViTForImageClassification']   # what save_pretrained records
    write_hf_flax(tm, config, d / 'vit')
    cls, pp = PREPROCESSORS['deit']
    (d / 'vit' / 'preprocessor_config.json').write_text(json.dumps(dict(pp, image_processor_type=cls[:-3])))
    paths = []
    for i, img in enumerate(_test_images()):
        paths.append(str(d / f'img{i}.png'))
        img.save(paths[-1])
    return tm, d / 'vit', paths


def test_predict_on_a_transformers_folder_follows_its_preprocessor_config_and_labels(hf_folder):
    import torch
    import transformers
    tm, folder, paths = hf_folder
    p = cli('predict', folder, *paths, '--top-k', '5', '--json')
    assert p.returncode == 0, p.stderr
    assert f'({folder / "preprocessor_config.json"})' in p.stderr and f'recorded in {folder}' in p.stderr, p.stderr
    out = json.loads(p.stdout)
    assert out['preprocessing']['crop_mode'] == 'squash' and out['preprocessing']['interpolation'] == 'bicubic'
    proc = transformers.DeiTImageProcessorPil.from_pretrained(str(folder))
    x = proc(images=[Image.open(q).convert('RGB') for q in paths], return_tensors='pt')['pixel_values']
    with torch.no_grad():
        want = torch.softmax(tm(x).logits, -1).numpy()
    for pred, row in zip(out['predictions'], want):
        got = {t['label']: t['prob'] for t in pred['top_k']}
        assert set(got) == set(NAMES)
        np.testing.assert_allclose([got[n] for n in NAMES], row, atol=1e-5)


def test_parity_runs_transformers_own_model_on_the_folder_block_by_block(hf_folder, tmp_path):
    _, folder, _ = hf_folder
    p = cli('parity', folder)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f'against transformers {folder}' in p.stdout and 'PASS' in p.stdout
    labels = [line.split()[0] + (' ' + line.split()[1] if line.startswith('block') else '')
              for line in p.stdout.splitlines()[2:-1]]
    assert labels == ['embed', 'block 0', 'block 1', 'logits'], p.stdout   # no last_hidden_state in *ForImage*
    worst = max(float(line.split()[-1]) for line in p.stdout.splitlines()[2:-1])
    assert worst < 1e-5, p.stdout
    # a Flax model that computes otherwise (timm's eps instead of transformers' 1e-12 ... and a wrong activation)
    p = cli('parity', folder, '--set', 'act_layer=quick_gelu')
    assert p.returncode == 1 and 'FAIL: first divergence at block 0' in p.stdout, p.stdout


def test_parity_refuses_a_folder_transformers_does_not_load_strictly(hf_folder, tmp_path):
    import shutil
    _, folder, _ = hf_folder
    shutil.copytree(folder, tmp_path / 'f')
    cfg = json.loads((tmp_path / 'f' / 'config.json').read_text())
    (tmp_path / 'f' / 'config.json').write_text(json.dumps(dict(cfg, architectures=['ViTModel'])))
    p = cli('parity', tmp_path / 'f')
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert 'transformers ViTModel does not load it strictly: ' in p.stderr.strip().splitlines()[-1], p.stderr


def test_train_fine_tunes_from_a_transformers_folder_with_its_normalisation(tmp_path):
    import subprocess
    import sys
    from helpers import hf_vit, write_hf_flax
    tm, config = hf_vit('ViTForImageClassification', hidden_size=192, num_attention_heads=3, intermediate_size=768,
                        num_hidden_layers=1, num_labels=4)
    config.architectures = ['ViTForImageClassification']
    write_hf_flax(tm, config, tmp_path / 'vit')
    pp = dict(PREPROCESSORS['vit'][1], image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    (tmp_path / 'vit' / 'preprocessor_config.json').write_text(json.dumps(pp))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, 'train_flax.py', '--model', 'vit_tiny_patch16_224', '--weights',
                        str(tmp_path / 'vit'), '--img-size', '16', '--patch-size', '8', '--depth', '1',
                        '--epochs', '1', '--batch-size', '64', '--workdir', str(tmp_path / 'run')],
                       cwd=root, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, PYTHONPATH=root, XLA_FLAGS=xla_flags(1)))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert 'head: 4 -> 10 classes' in out and 'pos_embedding: grid (4, 4) -> (2, 2)' in out, out[-3000:]
    assert 'the weights were trained with LayerNorm eps 1e-12, vit_tiny_patch16_224 computes 1e-06' in out
    from converters.formats import training_ckpt
    ck = training_ckpt.select(str(tmp_path / 'run'), 'latest', log=lambda m: None)
    assert ck.meta['weights']['format'] == 'msgpack' and ck.meta['weights']['normalization'] == 'preprocessor_config'
    assert ck.meta['pretrained_cfg']['mean'] == [0.4, 0.45, 0.5] and ck.meta['pretrained_cfg']['std'] == [0.2, 0.25, 0.3]


def test_parity_of_a_headless_vit_compares_the_final_norm_and_the_pooler_output(tmp_path):
    from helpers import hf_vit, write_hf_flax
    tm, config = hf_vit('ViTModel', seed=2)
    config.architectures = ['ViTModel']
    write_hf_flax(tm, config, tmp_path / 'm')
    p = cli('parity', tmp_path / 'm', '--batch', '1')
    assert p.returncode == 0, p.stdout + p.stderr
    rows = p.stdout.splitlines()[2:-1]
    assert [r.split()[0] for r in rows][-2:] == ['norm', 'pooler_output'] and len(rows) == 5, p.stdout
    assert max(float(r.split()[-1]) for r in rows) < 1e-5, p.stdout


def test_a_transformers_repo_in_the_offline_hub_cache_predicts_as_its_folder(hf_folder, tmp_path, monkeypatch):
    from helpers import fake_hub
    _, folder, paths = hf_folder
    repo = fake_hub(tmp_path / 'hub', folder, 'google/vit-tiny-fake', commit='c' * 40)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
    a, b = (cli('predict', src, paths[0], '--json') for src in (folder, f'hf-hub:{repo}'))
    assert a.returncode == 0 and b.returncode == 0, b.stderr
    snap = tmp_path / 'hub' / 'models--google--vit-tiny-fake' / 'snapshots' / ('c' * 40)
    assert f'({snap / "preprocessor_config.json"})' in b.stderr, b.stderr
    assert json.loads(a.stdout)['predictions'] == json.loads(b.stdout)['predictions']
