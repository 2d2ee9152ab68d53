"""Predict, export and timm model folders (issue 8), against timm itself.

- folders written by timm's own `save_for_hf` read into Flax (logits within 1e-4 relative);
- folders we write loaded by `timm.create_model('local-dir:...', pretrained=True)` with the same predictions;
- our Pillow/numpy preprocessing against timm's eval transform (`create_transform(**data_config)`);
- `vit-flax predict` on image files the tests write, against timm on timm's transform of the same files;
- training workdirs exported and loaded strictly by timm and WZMIAOMIAO's vit_model.py (tests/reference/);
- `hf-hub:` names resolved from a fake Hugging Face cache, offline; config.json files that lie.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import assert_ranks_as, cli, cli_process, fake_hub, images, perturb, rel_err, run_flax, run_timm, timm_model
from flax.traverse_util import flatten_dict, unflatten_dict
from PIL import Image

import vit_flax
from converters import pipeline, preprocess
from converters.errors import ConversionError

ARCH = dict(img_size=32, patch_size=8, depth=2)   # a vit_tiny_patch16_224 timm also builds
NAMES = ['daisy', 'dandelion', 'roses', 'sunflowers', 'tulips']


def one_line_error(p, *needles):
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert 'Traceback' not in p.stderr and p.stdout == '', p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith('vit-flax: error: ') and sum(l.startswith('vit-flax: error') for l in lines) == 1
    for n in needles:
        assert n in lines[-1], lines[-1]


def save_for_hf(model, folder, **kw):
    from timm.models import save_for_hf as timm_save
    timm_save(model, str(folder), **kw)
    return folder


# ---------------------------------------------------------------- timm's folders -> Flax

@pytest.mark.parametrize('name,kw,safe', [
    ('vit_tiny_patch16_224', dict(ARCH, num_classes=5, global_pool='avg', class_token=False, fc_norm=False), False),
    ('swin_tiny_patch4_window7_224', dict(img_size=32, window_size=4, embed_dim=24, depths=(1, 1),
                                          num_heads=(2, 4), num_classes=5), True)])
def test_folder_saved_by_timm_reads_into_flax(tmp_path, name, kw, safe):
    tm = timm_model(name, **kw)
    folder = save_for_hf(tm, tmp_path / 'm', model_config={'label_names': NAMES}, safe_serialization=safe)
    # timm records the architecture untagged; a hub folder often carries its pretrained tag
    cfg = json.loads((folder / 'config.json').read_text())
    cfg['architecture'] += '.augreg_in21k_ft_in1k'
    (folder / 'config.json').write_text(json.dumps(cfg))
    model, params, ck = pipeline.load_model(folder)
    assert (ck.kind, ck.model_name, ck.class_names) == ('timm-folder', name, NAMES)
    assert os.path.basename(ck.path) == ('model.safetensors' if safe else 'pytorch_model.bin')
    assert model.input_shape[:2] == (32, 32)
    x = images((2, 32, 32, 3))
    assert rel_err(run_flax(model, params, x, train=False), run_timm(tm, x)) < 1e-4
    # and back to a folder of ours, which timm loads as the same model
    pipeline.write_model_folder(flatten_dict(params, sep='/'), model, ck.model_name, tmp_path / 'ours',
                           pretrained_cfg=ck.pretrained_cfg, class_names=ck.class_names)
    import timm
    again = timm.create_model(f'local-dir:{tmp_path / "ours"}', pretrained=True).eval()
    assert again.pretrained_cfg['label_names'] == NAMES and again.pretrained_cfg['interpolation'] == 'bicubic'
    assert rel_err(run_timm(again, x), run_timm(tm, x)) < 1e-6


# ---------------------------------------------------------------- our folders -> timm

def test_our_folder_loads_in_timm_with_the_same_predictions(tmp_path):
    import timm
    model = vit_flax.create_model('vit_tiny_patch16_224', num_classes=5, **ARCH)
    flat = flatten_dict(perturb(model), sep='/')
    npz = tmp_path / 'w.npz'
    pipeline.save_params(unflatten_dict(flat, sep='/'), npz, 'vit_tiny_patch16_224',
                    num_classes=5, **ARCH)
    p = cli('convert', npz, tmp_path / 'folder', '--format', 'timm-folder', '--model', 'vit_tiny_patch16_224',
            '--set', 'depth=2', '--set', 'patch_size=8')
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / 'folder' / 'config.json').read_text())
    assert cfg['architecture'] == 'vit_tiny_patch16_224' and cfg['num_classes'] == 5 and cfg['num_features'] == 192
    assert cfg['model_args'] == {'num_classes': 5, 'img_size': 32, 'patch_size': 8, 'depth': 2}
    pc = cfg['pretrained_cfg']   # Google .npz weights: mean/std 0.5; WZMIAOMIAO's crop (0.875, bilinear)
    assert (pc['input_size'], pc['mean'], pc['crop_pct'], pc['interpolation']) == ([3, 32, 32], [.5] * 3, .875, 'bilinear')
    tm = timm.create_model(f'local-dir:{tmp_path / "folder"}', pretrained=True).eval()
    x = images((8, 32, 32, 3), seed=1)
    yt = run_timm(tm, x)
    yf = run_flax(model, unflatten_dict(flat, sep='/'), x, train=False)
    assert rel_err(yf, yt) < 1e-4
    for i, (f, t) in enumerate(zip(yf, yt)):   # the same top class, up to ties within the 1e-4 both may be off by
        assert_ranks_as([f.argmax()], t, ties=2e-4 * np.abs(yt).max(), what=f'image {i}')
    # read back: the same architecture, preprocessing and weights
    model2, params2, ck = pipeline.load_model(tmp_path / 'folder')
    assert model2.img_size == 32 and model2.depth == 2 and ck.pretrained_cfg['crop_pct'] == 0.875
    assert rel_err(run_flax(model2, params2, x, train=False), yt) < 1e-4


# ---------------------------------------------------------------- preprocessing = timm's eval transform

def _test_images():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (53, 71, 3), dtype=np.uint8))
    return {'rgb-wide': rgb, 'rgb-tall': rgb.transpose(Image.Transpose.ROTATE_90),
            'grey': Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8)),
            'rgba': Image.fromarray(rng.integers(0, 256, (30, 45, 4), dtype=np.uint8)),
            'palette': rgb.convert('P'), 'small': rgb.resize((9, 12))}


@pytest.mark.parametrize('cfg', [
    dict(input_size=(3, 32, 32), interpolation='bilinear', crop_pct=0.875, crop_mode='center'),
    dict(input_size=(3, 24, 24), interpolation='bicubic', crop_pct=0.9, crop_mode='center'),
    dict(input_size=(3, 28, 28), interpolation='nearest', crop_pct=1.0, crop_mode='center'),
    dict(input_size=(3, 20, 20), interpolation='lanczos', crop_pct=0.95, crop_mode='squash'),
    dict(input_size=(3, 16, 24), interpolation='bicubic', crop_pct=0.875, crop_mode='center'),
    dict(input_size=(3, 40, 40), interpolation='bilinear', crop_pct=1.25, crop_mode='center')],
    ids=lambda c: f"{c['input_size'][1]}x{c['input_size'][2]}-{c['interpolation']}-{c['crop_pct']}-{c['crop_mode']}")
def test_preprocessing_matches_timm_eval_transform(cfg):
    from timm.data import create_transform
    cfg = dict(cfg, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    tf = create_transform(**cfg, is_training=False)
    ours = preprocess.resolve(dict(cfg, input_size=list(cfg['input_size'])), type('M', (), dict(
        input_shape=cfg['input_size'][1:] + (3,)))(), 'cfg')
    for name, img in _test_images().items():
        want = tf(img.convert('RGB')).permute(1, 2, 0).numpy()
        got = preprocess.transform(img, ours)
        assert got.shape == want.shape and got.dtype == np.float32, name
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0, err_msg=name)


# ---------------------------------------------------------------- vit-flax predict on image files

def write_images(folder):
    from sklearn.datasets import load_digits
    d = load_digits()
    paths = []
    for i, (fmt, mode) in enumerate([('JPEG', 'RGB'), ('PNG', 'RGB'), ('PNG', 'L'), ('PNG', 'RGBA'), ('JPEG', 'L')]):
        a = (d.images[i] * 16).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(a).resize((37 + i, 41), Image.BILINEAR).convert(mode)
        path = folder / f'img{i}.{fmt.lower().replace("jpeg", "jpg")}'
        img.save(path, fmt)
        paths.append(path)
    return paths


@pytest.fixture(scope='module')
def timm_folder(tmp_path_factory):
    """A timm folder saved by timm (bicubic, crop 0.9, ImageNet mean/std: not the defaults) and its model."""
    tmp = tmp_path_factory.mktemp('predict')
    tm = timm_model('vit_tiny_patch16_224', num_classes=5, **ARCH)
    folder = save_for_hf(tm, tmp / 'folder', model_config={'label_names': NAMES}, safe_serialization=True,
                         data_config=dict(input_size=(3, 32, 32), interpolation='bicubic', crop_pct=0.9,
                                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)))
    return tm, folder, write_images(tmp)


def test_predict_images_matches_timm_on_its_own_transform(timm_folder):
    import timm
    from timm.data import create_transform, resolve_data_config
    tm, folder, paths = timm_folder
    p = cli('predict', folder, *paths, '--top-k', '5', '--json')
    assert p.returncode == 0, p.stderr
    assert 'bicubic' in p.stderr and 'crop_pct 0.9' in p.stderr and 'class names: recorded in' in p.stderr
    out = json.loads(p.stdout)
    loaded = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    tf = create_transform(**resolve_data_config({}, model=loaded))
    with torch.no_grad():
        want = torch.softmax(tm(torch.stack([tf(Image.open(q).convert('RGB')) for q in paths])), -1).numpy()
    assert [r['image'] for r in out['predictions']] == [str(q) for q in paths]
    for r, w in zip(out['predictions'], want):
        probs = [t['prob'] for t in r['top_k']]
        assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-5
        assert_ranks_as([t['index'] for t in r['top_k']], w, ties=2e-5, what=r['image'])   # timm's order, up to ties
        assert [t['label'] for t in r['top_k']] == [NAMES[t['index']] for t in r['top_k']]
        np.testing.assert_allclose(probs, np.sort(w)[::-1], atol=1e-5)


def test_predict_text_output_top_k_and_classes_file(timm_folder, tmp_path):
    _, folder, paths = timm_folder
    (tmp_path / 'classes.json').write_text(json.dumps({str(i): f'c{i}' for i in range(5)}, indent=4))
    p = cli('predict', folder, paths[2], '--top-k', '2', '--classes', tmp_path / 'classes.json')
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == str(paths[2]) and len(lines) == 3
    (p1, n1), (p2, n2) = (l.split()[:2] for l in lines[1:])
    assert float(p1) >= float(p2) and n1.startswith('c') and n2.startswith('c')


def test_predict_bad_images_fail_in_one_line(timm_folder, tmp_path):
    _, folder, paths = timm_folder
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 not really a jpeg')
    (tmp_path / 'notes.txt').write_text('hello')
    for bad, needle in [(tmp_path / 'missing.png', 'no such image file'), (tmp_path / 'broken.jpg', 'image'),
                        (tmp_path, 'is a directory'), (tmp_path / 'notes.txt', 'notes.txt: not an image')]:
        p = cli('predict', folder, bad)
        one_line_error(p, str(bad), needle)
        assert 'model:' not in p.stderr   # refused before the checkpoint was read


def test_predict_reports_each_bad_image_and_predicts_the_others(timm_folder, tmp_path):
    _, folder, paths = timm_folder
    shutil.copy(paths[0], tmp_path / 'cut.jpg')
    with open(tmp_path / 'cut.jpg', 'r+b') as f:   # a header that reads, data that does not: found at decoding
        f.truncate(200)
    bad = [tmp_path / 'missing.png', tmp_path / 'cut.jpg']
    p = cli('predict', folder, paths[0], bad[0], paths[1], bad[1], '--top-k', '1')
    assert p.returncode == 1, p.stderr
    out = p.stdout.splitlines()
    assert out[0::2] == [str(paths[0]), str(paths[1])] and len(out) == 4
    errors = [l for l in p.stderr.splitlines() if l.startswith('vit-flax: error: ')]
    assert errors == [f'vit-flax: error: {bad[0]}: no such image file',
                      next(l for l in errors if l.startswith(f'vit-flax: error: {bad[1]}: unreadable image'))]
    assert '2 of 4 images predicted' in p.stderr and 'Traceback' not in p.stderr
    j = cli('predict', folder, paths[0], bad[0], '--json')
    assert j.returncode == 1
    rows = json.loads(j.stdout)['predictions']
    assert [r['image'] for r in rows] == [str(paths[0]), str(bad[0])]
    assert 'top_k' in rows[0] and rows[1]['error'] == f'{bad[0]}: no such image file'
    both = cli('predict', folder, bad[0], tmp_path / 'also_missing.png')
    assert both.returncode == 1 and both.stdout == '' and 'model:' not in both.stderr
    assert both.stderr.count('vit-flax: error: ') == 2


def test_missing_preprocessing_fields_take_timms_defaults(timm_folder, tmp_path):
    import timm
    from timm.data import resolve_data_config
    from vit_flax_cli.predict import data_config
    _, folder, _ = timm_folder
    shutil.copytree(folder, tmp_path / 'f')
    cfg = json.loads((folder / 'config.json').read_text())
    cfg['pretrained_cfg'] = {'input_size': [3, 32, 32], 'crop_pct': 0.95}
    (tmp_path / 'f' / 'config.json').write_text(json.dumps(cfg))
    model, _, ck = pipeline.load_model(tmp_path / 'f')
    ours, _ = data_config(ck, model)
    want = resolve_data_config({}, model=timm.create_model(f'local-dir:{tmp_path / "f"}', pretrained=True))
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in want.items()} == preprocess.config_for_json(ours)


def test_predict_from_safetensors_never_imports_torch(timm_folder):
    _, folder, paths = timm_folder
    code = ('import sys; from vit_flax_cli.cli import main; rc = main(["predict", sys.argv[1], sys.argv[2]]); '
            'assert rc == 0 and "torch" not in sys.modules and "timm" not in sys.modules, sorted(sys.modules)')
    p = subprocess.run([sys.executable, '-c', code, str(folder), str(paths[0])], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == str(paths[0]) and len(p.stdout.splitlines()) == 6


# ---------------------------------------------------------------- training workdirs

def make_workdir(root, model_name, overrides, steps, class_names):
    """A training workdir as vit_train writes it (orbax params + meta items), without training."""
    import orbax.checkpoint as ocp
    from converters.formats import training_ckpt as tc
    ckdir = os.path.join(root, tc.CHECKPOINTS_DIR)
    mgr = ocp.CheckpointManager(ckdir)
    for step, (flat, val_acc) in steps.items():
        meta = {k: None for k in tc.META_FIELDS}
        meta.update(format=tc.FORMAT, version=tc.VERSION, model=model_name, model_overrides=overrides,
                    num_classes=overrides['num_classes'], class_names=class_names, dtype='float32', epoch=step,
                    step=step, val_acc=val_acc, pretrained_cfg=dict(
                        input_size=[3, 32, 32], interpolation='bicubic', crop_pct=1.0, crop_mode='center',
                        mean=[0.5] * 3, std=[0.5] * 3))
        mgr.save(step, args=ocp.args.Composite(**{tc.PARAMS: ocp.args.StandardSave(unflatten_dict(flat, sep='/')),
                                                  tc.META: ocp.args.JsonSave(meta)}))
    mgr.wait_until_finished()
    mgr.close()
    tc.write_class_indices(os.path.join(root, tc.CLASS_INDICES), class_names)
    return root


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp('run')
    overrides = dict(ARCH, num_classes=5)
    model = vit_flax.create_model('vit_tiny_patch16_224', **overrides)
    flat = lambda seed: flatten_dict(perturb(model, seed), sep='/')
    steps = {10: (flat(1), 64 / 71), 20: (flat(2), 0.5)}   # best 10, latest 20
    return make_workdir(str(root / 'flowers'), 'vit_tiny_patch16_224', overrides, steps, NAMES), model, steps


@pytest.mark.parametrize('step', [None, pytest.param('latest', marks=pytest.mark.slow)])
def test_workdir_exported_loads_strictly_in_timm_and_wzmiaomiaos_vit_model(workdir, tmp_path, step):
    import timm
    from reference import wzmiaomiao
    root, model, steps = workdir
    out = tmp_path / 'out.pth'
    p = cli('convert', root, out, *(['--step', step] if step else []))
    assert p.returncode == 0, p.stderr
    if step is None:   # the accuracy as the epoch lines print it, not 0.9014084507042254
        assert 'training checkpoint step 10 (epoch' in p.stderr and 'val_acc 0.9014)' in p.stderr, p.stderr
    flat = steps[20 if step else 10][0]
    assert json.loads((tmp_path / 'class_indices.json').read_text()) == {str(i): n for i, n in enumerate(NAMES)}
    state = torch.load(out, weights_only=True)
    tm = timm.create_model('vit_tiny_patch16_224', num_classes=5, **ARCH).eval()
    tm.load_state_dict(state, strict=True)
    sm = wzmiaomiao.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3, num_classes=5).eval()
    sm.load_state_dict(state, strict=True)
    x = images((2, 32, 32, 3), seed=3)
    yf = run_flax(model, unflatten_dict(flat, sep='/'), x, train=False)
    assert rel_err(yf, run_timm(tm, x)) < 1e-4 and rel_err(yf, run_timm(sm, x)) < 1e-4


def test_workdir_to_timm_folder_and_predict(workdir, tmp_path):
    import timm
    root, model, steps = workdir
    p = cli('convert', root, tmp_path / 'tf', '--format', 'timm-folder', '--step', '20')
    assert p.returncode == 0, p.stderr
    cfg = json.loads((tmp_path / 'tf' / 'config.json').read_text())
    assert cfg['label_names'] == NAMES and cfg['pretrained_cfg']['interpolation'] == 'bicubic'
    tm = timm.create_model(f'local-dir:{tmp_path / "tf"}', pretrained=True).eval()
    x = images((3, 32, 32, 3), seed=4)
    assert rel_err(run_flax(model, unflatten_dict(steps[20][0], sep='/'), x, train=False), run_timm(tm, x)) < 1e-4
    img = write_images(tmp_path)[1]
    a, b = (cli('predict', src, img, '--json', *extra) for src, extra in
            [(root, ('--step', '20')), (tmp_path / 'tf', ())])
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    pa, pb = (json.loads(r.stdout)['predictions'][0]['top_k'] for r in (a, b))
    assert [t['label'] for t in pa] == [t['label'] for t in pb]
    np.testing.assert_allclose([t['prob'] for t in pa], [t['prob'] for t in pb], atol=1e-6)
    one_line_error(cli('convert', root, tmp_path / 'x.pth', '--step', '15'), 'no finalized checkpoint step 15')


# ---------------------------------------------------------------- the Hugging Face cache

def test_hf_hub_names_resolve_from_the_local_cache_offline(timm_folder, tmp_path, monkeypatch):
    tm, folder, paths = timm_folder
    repo = fake_hub(tmp_path / 'hf' / 'hub', folder)
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')   # no network in tests: huggingface_hub reads its cache
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    monkeypatch.delenv('HUGGINGFACE_HUB_CACHE', raising=False)
    p = cli('convert', f'hf-hub:{repo}', tmp_path / 'o.pth')
    assert p.returncode == 0, p.stderr
    state = torch.load(tmp_path / 'o.pth', weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in tm.state_dict().items())
    assert json.loads((tmp_path / 'class_indices.json').read_text())['4'] == NAMES[4]
    p = cli('predict', f'hf-hub:{repo}@{"a" * 40}', paths[0], '--top-k', '1')
    assert p.returncode == 0 and p.stdout.splitlines()[1].split()[1] in NAMES, p.stderr
    # a real process, told where the cache is by $HF_HOME alone
    env = dict(os.environ, HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1')
    env.pop('HF_HUB_CACHE', None)
    one_line_error(cli_process('convert', 'hf-hub:timm/vit_small_patch16_224.not_cached', tmp_path / 'n.pth', env=env),
                   'hf-hub:timm/vit_small_patch16_224.not_cached: not in the local Hugging Face cache',
                   str(tmp_path / 'hf' / 'hub'), 'HF_HUB_OFFLINE is set')
    one_line_error(cli('predict', 'hf-hub:nothing', paths[0]), 'expected hf-hub:ORG/NAME')
    miss = cli('convert', 'hf-hub:timm/vit_small_patch16_224.gone@v2', tmp_path / 'n.pth')
    one_line_error(miss, '`hf download timm/vit_small_patch16_224.gone --revision v2`')   # huggingface_hub's CLI
    assert 'huggingface-cli' not in miss.stderr
    assert not os.path.exists(tmp_path / 'n.pth')


# ---------------------------------------------------------------- config.json files that lie

LIES = {
    'not JSON': (lambda c: '{"architecture": ', 'not valid JSON'),
    'a list': (lambda c: '[1, 2]', 'not an object'),
    'no architecture': (lambda c: {k: v for k, v in c.items() if k != 'architecture'}, 'no "architecture"'),
    'unknown architecture': (lambda c: dict(c, architecture='resnet50'), "architecture 'resnet50' is not a model"),
    'another family': (lambda c: dict(c, architecture='swin_tiny_patch4_window7_224'), 'is a SwinTransformer'),
    'num_classes': (lambda c: dict(c, num_classes=7), 'num_classes 7, but the weights\' head has 5 classes'),
    'num_classes type': (lambda c: dict(c, num_classes='five'), "num_classes 'five'"),
    'model_args depth': (lambda c: dict(c, model_args=dict(c['model_args'], depth=3)), 'depth'),
    'model_args patch 0': (lambda c: dict(c, model_args=dict(c['model_args'], patch_size=0)), 'patch_size'),
    'pool': (lambda c: dict(c, model_args=dict(c['model_args'], global_pool='max')), "global_pool='max'"),
    'pretrained_cfg': (lambda c: dict(c, pretrained_cfg=[1]), 'pretrained_cfg is a list'),
    'img_size': (lambda c: dict(c, model_args=dict(c['model_args'], img_size=64)), 'position table is for 32'),
    'labels': (lambda c: dict(c, label_names=7), 'label_names'),
}


@pytest.mark.parametrize('lie', sorted(LIES))
def test_config_json_that_lies_is_one_line_error(timm_folder, tmp_path, lie):
    _, folder, paths = timm_folder
    bad = tmp_path / 'bad'
    shutil.copytree(folder, bad)
    change, needle = LIES[lie]
    new = change(json.loads((folder / 'config.json').read_text()))
    (bad / 'config.json').write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ConversionError) as e:
        pipeline.load_model(bad)
    assert needle in str(e.value) and '\n' not in str(e.value) and 'bad' in str(e.value), str(e.value)
    if lie == 'not JSON':   # and the command: one line, nothing written
        one_line_error(cli('convert', bad, tmp_path / 'o.npz'), 'config.json: not valid JSON')
        assert sorted(os.listdir(tmp_path)) == ['bad']


def test_missing_weights_and_tagged_model_names(tmp_path, timm_folder):
    _, folder, _ = timm_folder
    bad = tmp_path / 'noweights'
    os.makedirs(bad)
    shutil.copy(folder / 'config.json', bad / 'config.json')
    with pytest.raises(ConversionError, match='no weights in the model folder'):
        pipeline.load_model(bad)
    m = vit_flax.create_model('vit_base_patch16_224.augreg2_in21k_ft_in1k', depth=1)
    assert m.embed_dim == 768 and m.depth == 1
