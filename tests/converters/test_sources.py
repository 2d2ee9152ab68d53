"""The read path as a table of sources (converters/sources.py) and the one options object (LoadOptions).

Each way a checkpoint arrives is picked by its own source, in the documented order; `read_checkpoint` calls
one source's `read` once and is never re-entered (a timm folder, an hf-hub name and a Flax-msgpack folder
used to read through `read_checkpoint` two or three times); LoadOptions gives what the old keywords give,
and a keyword passed beside it wins.
"""
import json

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import fake_hub, perturb

import vit_flax
from converters import LoadOptions, pipeline, sources
from converters.checkpoint import ReadRequest

NAME = 'vit_tiny_patch16_224'
ARCH = dict(img_size=32, depth=2, num_classes=4)   # named in every read: a .pth records no head count
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('sources')
    model = vit_flax.create_model(NAME, **ARCH)
    params = perturb(model, 3)
    flat = flatten_dict(params, sep='/')
    pipeline.write_flat(flat, model, str(root / 'w.npz'), **QUIET)
    pipeline.write_flat(flat, model, str(root / 'w.pth'), **QUIET)
    pipeline.write_model_folder(flat, model, NAME, str(root / 'timm'),
                                pretrained_cfg=dict(interpolation='bicubic', crop_pct=0.9, crop_mode='center',
                                                                mean=[0.5] * 3, std=[0.5] * 3), **QUIET)
    pipeline.write_transformers(flat, model, str(root / 'hf'), **QUIET)
    msgpack = root / 'msgpack'   # matched by its files alone: config.json with a model_type, Flax weights only
    msgpack.mkdir()
    (msgpack / 'config.json').write_text(json.dumps({'model_type': 'vit'}))
    (msgpack / 'flax_model.msgpack').write_bytes(b'')
    return dict(root=root, model=model, params=params)


def test_the_sources_are_tried_in_the_documented_order():
    assert [s.name for s in sources.SOURCES] == ['training workdir', 'hf-hub name', 'Flax msgpack folder',
                                                'transformers folder', 'timm folder', 'file']
    numbered = [l for l in sources.__doc__.splitlines() if l[:1].isdigit()]
    assert len(numbered) == len(sources.SOURCES)
    for i, (line, source) in enumerate(zip(numbered, sources.SOURCES), 1):
        assert line.startswith(f'{i}. {source.name}  '), line


def test_each_way_a_checkpoint_arrives_is_picked_by_its_own_source(tiny):
    root = tiny['root']
    picked = {k: sources.pick(str(p)).name for k, p in (
        ('npz', root / 'w.npz'), ('pth', root / 'w.pth'), ('timm', root / 'timm'), ('hf', root / 'hf'),
        ('msgpack', root / 'msgpack'), ('hub', 'hf-hub:someone/tiny-vit'))}
    assert picked == {'npz': 'file', 'pth': 'file', 'timm': 'timm folder', 'hf': 'transformers folder',
                      'msgpack': 'Flax msgpack folder', 'hub': 'hf-hub name'}


@pytest.fixture
def calls(monkeypatch):
    """How often read_checkpoint (pipeline's and the sources') and each source's read are entered."""
    seen = []

    def count(owner, name, label):
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: (seen.append(label), real(*a, **k))[1])
    count(pipeline, 'read_checkpoint', 'pipeline.read_checkpoint')
    count(sources, 'read_checkpoint', 'sources.read_checkpoint')
    for cls in (sources.HubName, sources.TimmFolder, sources.TransformersFolder, sources.File):
        count(cls, 'read', cls.name)
    return seen


@pytest.mark.parametrize('what,want', [
    ('w.pth', ['file']),
    ('timm', ['timm folder', 'file']),   # the folder's weight file read by the file source, directly
    ('hf', ['transformers folder']),
    ('hub', ['hf-hub name', 'timm folder', 'file']),
])
def test_one_read_enters_read_checkpoint_once_and_each_source_once(tiny, calls, what, want, tmp_path, monkeypatch):
    path = str(tiny['root'] / what)
    if what == 'hub':
        cache = tmp_path / 'cache'
        monkeypatch.setenv('HF_HUB_OFFLINE', '1')
        monkeypatch.setenv('HF_HUB_CACHE', str(cache))
        path = 'hf-hub:' + fake_hub(cache, tiny['root'] / 'timm', 'someone/tiny-vit')
    model, params, ck = pipeline.load_model(path, NAME, depth=2, **QUIET)
    assert calls == ['pipeline.read_checkpoint', 'sources.read_checkpoint'] + want
    assert model == tiny['model'].clone(norm_eps=model.norm_eps)   # transformers' config.json records its eps
    for k, v in flatten_dict(tiny['params']).items():
        np.testing.assert_allclose(flatten_dict(params)[k], v, rtol=1e-6, atol=1e-7, err_msg=str(k))
    if what in ('timm', 'hub'):
        assert ck.kind == 'timm-folder' and ck.source == path


def test_a_step_outside_a_training_workdir_is_refused_before_anything_is_read(tiny, calls):
    with pytest.raises(Exception, match=r'w\.npz: a step is chosen only in a training workdir'):
        pipeline.load_model(str(tiny['root'] / 'w.npz'), NAME, depth=2, step=3, **QUIET)
    assert calls == ['pipeline.read_checkpoint', 'sources.read_checkpoint']


def test_load_options_give_what_the_keywords_give_and_a_keyword_beside_them_wins(tiny):
    path = str(tiny['root'] / 'w.npz')
    said_kw, said_opt = [], []
    m1, p1, _ = pipeline.load_model(path, head_init='fresh', log=said_kw.append, num_classes=7, img_size=48)
    m2, p2, _ = pipeline.load_model(path, options=LoadOptions(head_init='fresh', log=said_opt.append),
                                    num_classes=7, img_size=48)
    assert m1 == m2 and said_kw == said_opt and any('7 classes' in s for s in said_kw)
    for a, b in zip(flatten_dict(p1).values(), flatten_dict(p2).values()):
        np.testing.assert_array_equal(a, b)
    assert np.abs(p1['head']['kernel']).max() > 0   # 'fresh': timm's init, not zeros
    _, p3, _ = pipeline.load_model(path, options=LoadOptions(head_init='fresh', **QUIET), head_init='zeros',
                                   num_classes=7)
    assert not np.any(p3['head']['kernel'])
    p4 = pipeline.load_params(path, NAME, options=LoadOptions(cast=True, **QUIET), **ARCH)
    for a, b in zip(flatten_dict(p4).values(), flatten_dict(tiny['params']).values()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match='options must be a converters.pipeline.LoadOptions'):
        pipeline.load_model(path, options={'head_init': 'fresh'})


def test_the_read_request_is_one_object_every_source_takes(tiny):
    ck = sources.read_checkpoint(str(tiny['root'] / 'timm'), ReadRequest(str(tiny['root'] / 'timm')))
    assert ck.model_name == NAME and ck.kind == 'timm-folder' and ck.detected
