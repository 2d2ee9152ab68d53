"""`hf-hub:ORG/NAME[@REV]` through huggingface_hub (converters/formats/hf_hub.py), with no network.

- which files of a repo are fetched: config.json, preprocessor_config.json and one set of weights, safetensors
  first, then shards, pytorch_model.bin, Flax msgpack, open_clip files; never the whole repo;
- offline (HF_HUB_OFFLINE=1): fake caches laid out as huggingface_hub lays them out (blobs, snapshot symlinks,
  refs), found through HF_HUB_CACHE; @REV as a branch and as a commit; a repo or revision not cached;
- online, with huggingface_hub's own calls stood in for: what is asked of it, and its errors as one line.
"""
import os
import sys

import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from helpers import fake_hub, perturb, rel_err, run_flax

import vit_flax
from converters import pipeline
from converters.errors import ConversionError
from converters.formats import hf_hub

ARCH = dict(img_size=32, patch_size=8, depth=1, num_classes=3)
GOOGLE_VIT = ['.gitattributes', 'README.md', 'config.json', 'flax_model.msgpack', 'model.safetensors',
              'preprocessor_config.json', 'pytorch_model.bin', 'tf_model.h5']


def test_only_the_config_and_one_set_of_weights_are_fetched_safetensors_first():
    assert hf_hub.wanted(GOOGLE_VIT) == ['config.json', 'preprocessor_config.json', 'model.safetensors']
    no_safe = [f for f in GOOGLE_VIT if f != 'model.safetensors']
    assert hf_hub.wanted(no_safe) == ['config.json', 'preprocessor_config.json', 'pytorch_model.bin']
    assert hf_hub.wanted(['config.json', 'flax_model.msgpack', 'tf_model.h5']) == ['config.json', 'flax_model.msgpack']
    sharded = ['config.json', 'model.safetensors.index.json', 'model-00001-of-00002.safetensors',
               'model-00002-of-00002.safetensors', 'pytorch_model.bin.index.json', 'pytorch_model-00001-of-00002.bin',
               'onnx/model.safetensors']
    assert hf_hub.wanted(sharded) == ['config.json', 'model.safetensors.index.json',
                                      'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    assert hf_hub.wanted(sharded[:1] + sharded[4:6]) == ['config.json', 'pytorch_model.bin.index.json',
                                                         'pytorch_model-00001-of-00002.bin']
    open_clip = ['open_clip_config.json', 'open_clip_model.safetensors', 'open_clip_pytorch_model.bin', 'README.md']
    assert hf_hub.wanted(open_clip) == ['open_clip_config.json', 'open_clip_model.safetensors']
    assert hf_hub.wanted(['README.md', 'tf_model.h5', 'config.json']) == []


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE, offline; HF_HOME pointing elsewhere (HF_HUB_CACHE wins)."""
    cache = tmp_path / 'hub-cache'
    cache.mkdir()
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(cache))
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'not-here'))
    return cache


def _timm_folder(path, seed):
    model = vit_flax.create_model('vit_tiny_patch16_224', **ARCH)
    params = perturb(model, seed)
    pipeline.write_model_folder(flatten_dict(params, sep='/'), model, 'vit_tiny_patch16_224', path,
                                pretrained_cfg=dict(interpolation='bicubic', crop_pct=0.9, crop_mode='center',
                                                    mean=[0.5] * 3, std=[0.5] * 3), log=lambda s: None)
    return model, params


def test_offline_a_branch_and_a_commit_resolve_in_the_cache_named_by_hf_hub_cache(offline_cache, tmp_path):
    model, main = _timm_folder(tmp_path / 'main', 0)
    _, v1 = _timm_folder(tmp_path / 'v1', 1)
    repo = fake_hub(offline_cache, tmp_path / 'main', 'someone/tiny-vit', commit='1' * 40, refs=('main',))
    fake_hub(offline_cache, tmp_path / 'v1', repo, commit='2' * 40, refs=('v1',))
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    for spec, want in ((f'hf-hub:{repo}', main), (f'hf-hub:{repo}@v1', v1), (f'hf-hub:{repo}@{"2" * 40}', v1),
                       (f'hf-hub:{repo}@{"1" * 40}', main)):
        m, params, ck = pipeline.load_model(spec, log=lambda s: None)
        assert ck.kind == 'timm-folder' and ck.source == spec and ck.pretrained_cfg['crop_pct'] == 0.9
        assert rel_err(run_flax(m, params, x), run_flax(model, want, x)) < 1e-6, spec
    snap = hf_hub.resolve(f'hf-hub:{repo}@v1')
    assert snap == os.path.join(offline_cache, 'models--someone--tiny-vit', 'snapshots', '2' * 40)


def test_offline_a_repo_or_revision_not_in_the_cache_is_one_line_naming_it(offline_cache, tmp_path):
    _timm_folder(tmp_path / 'm', 0)
    repo = fake_hub(offline_cache, tmp_path / 'm', 'someone/tiny-vit')
    for spec in ('hf-hub:someone/absent', f'hf-hub:{repo}@v9', f'hf-hub:{repo}@{"b" * 40}'):
        with pytest.raises(ConversionError) as e:
            pipeline.load_model(spec, log=lambda s: None)
        msg = str(e.value)
        assert msg.startswith(f'{spec}: not in the local Hugging Face cache ({offline_cache})') and '\n' not in msg
        assert 'HF_HUB_OFFLINE is set' in msg and '`hf download ' in msg
    # a cached snapshot holding no weights (a download of config.json alone)
    fake_hub(offline_cache, tmp_path / 'm', 'someone/config-only', only=['config.json'])
    with pytest.raises(ConversionError, match=r'^hf-hub:someone/config-only: someone/config-only holds no weights '
                                              r'vit-flax reads .*it has config.json\)$'):
        pipeline.load_model('hf-hub:someone/config-only')


class _Hub:
    """huggingface_hub's two calls, stood in for: the repo listing an online Hub gives, and what is asked."""

    def __init__(self, listing, snap, error=None):
        self.listing, self.snap, self.error, self.calls = listing, snap, error, []

    def list_repo_files(self, repo, revision=None, **kw):
        self.calls.append(('list', repo, revision))
        if self.error is not None:
            raise self.error
        return self.listing

    def snapshot_download(self, repo, **kw):
        self.calls.append(('download', repo, kw))
        return self.snap


def _hub_error(name, message):
    from huggingface_hub import errors
    cls = getattr(errors, name)
    e = cls.__new__(cls)
    Exception.__init__(e, message)
    return e


def test_online_the_listing_picks_what_huggingface_hub_downloads(tmp_path, monkeypatch):
    import huggingface_hub
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.delenv('TRANSFORMERS_OFFLINE', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'c'))
    hub = _Hub(GOOGLE_VIT, str(tmp_path / 'snap'))
    monkeypatch.setattr(huggingface_hub.HfApi, 'list_repo_files', lambda self, *a, **k: hub.list_repo_files(*a, **k))
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', hub.snapshot_download)
    assert hf_hub.resolve('hf-hub:google/vit-base-patch16-224@refs/pr/3') == str(tmp_path / 'snap')
    (_, repo, rev), (_, repo2, kw) = hub.calls
    assert (repo, rev, repo2) == ('google/vit-base-patch16-224', 'refs/pr/3', repo)
    assert kw == dict(revision='refs/pr/3', cache_dir=str(tmp_path / 'c'), local_files_only=False,
                      allow_patterns=['config.json', 'preprocessor_config.json', 'model.safetensors'])
    for name, needle in (('RepositoryNotFoundError', 'the Hub has no repo google/vit-base-patch16-224 (or it is private'),
                         ('RevisionNotFoundError', "the Hub has no revision 'refs/pr/3'"),
                         ('GatedRepoError', 'google/vit-base-patch16-224 is gated: accept its terms')):
        hub.error = _hub_error(name, 'HTTP 404 ...\nmore lines')
        with pytest.raises(ConversionError) as e:
            hf_hub.resolve('hf-hub:google/vit-base-patch16-224@refs/pr/3')
        assert str(e.value).startswith(f'hf-hub:google/vit-base-patch16-224@refs/pr/3: {needle}'), str(e.value)
    # the Hub unreachable: the cache is read instead, and a miss says why
    hub.error, hub.calls = OSError('[Errno 101] Network is unreachable'), []
    (tmp_path / 'snap').mkdir()
    for f in ('config.json', 'pytorch_model.bin'):   # what an earlier download left in the cache
        (tmp_path / 'snap' / f).write_text('{}')
    hf_hub.resolve('hf-hub:google/vit-base-patch16-224')
    assert [c[2]['local_files_only'] for c in hub.calls[1:]] == [True, True]
    assert hub.calls[-1][2]['allow_patterns'] == ['config.json', 'pytorch_model.bin']
    monkeypatch.setattr(huggingface_hub, 'snapshot_download',
                        lambda *a, **k: (_ for _ in ()).throw(_hub_error('LocalEntryNotFoundError', 'x')))
    with pytest.raises(ConversionError, match=r'not in the local Hugging Face cache .* and the Hub cannot be '
                                              r'reached \(OSError: \[Errno 101\] Network is unreachable\)'):
        hf_hub.resolve('hf-hub:google/vit-base-patch16-224')


def test_names_that_are_no_repo_are_refused_before_huggingface_hub_is_asked():
    for spec in ('hf-hub:nothing', 'hf-hub:a/b/c', 'hf-hub:../x', 'hf-hub:a/b@../../etc', 'hf-hub:a/b@/abs'):
        with pytest.raises(ConversionError, match=r'expected hf-hub:ORG/NAME\[@REVISION\]'):
            hf_hub.parse(spec)
    assert hf_hub.parse('hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k') == \
        ('timm/vit_base_patch16_224.augreg2_in21k_ft_in1k', 'main')


def test_huggingface_hub_is_imported_only_when_a_name_is_resolved():
    import subprocess
    code = ('import sys, vit_flax, converters.pipeline, converters.formats.timm_folder, vit_flax_cli.cli; '
            'print("huggingface_hub" in sys.modules)')
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == 'False', out.stderr
