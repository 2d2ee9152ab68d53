"""A run whose workdir and packed data are gs:// URLs: the same run as on a local disk, resumed exactly, its
reports, checkpoints and listings in the bucket and nothing on the local disk.

The bucket is tmp_path/gcs, served at the three places a run meets gs:// (there is no network here):
- etils.epath (our files, orbax's folders and metadata, grain's iterator state): its fsspec backend gets a
  file system rooted at tmp_path/gcs in place of gcsfs;
- orbax's arrays (tensorstore): the kvstore spec orbax builds for a gs:// path (`get_kvstore_for_gcs`, the
  `gcs` driver) is replaced by tensorstore's `file` driver on the same folder, and orbax's
  hierarchical-namespace probe (a google-cloud-storage call) answers "no";
- array_record's own GCS reader (shards): the gs:// shard paths are handed to it as the files in the folder.
What this leaves untested is the real GCS client code of gcsfs, tensorstore and array_record.

Nothing may go through os.path: with the working directory set to tmp_path, a `gs:` folder appearing there
would be a URL taken for a local path.
"""
import json
import os

import numpy as np
import pytest

import vit_train
from converters.formats import paths, training_ckpt
from vit_train import pack, records

from test_data_records import RUN, flat, make_folder


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    import grain
    from etils.epath import backend
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem
    from orbax.checkpoint._src.path import gcs_utils
    root = tmp_path / 'gcs'
    root.mkdir()

    class FakeGCS(DirFileSystem):
        protocol = ('gs', 'gcs')

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            return path[len('gs://'):] if path.startswith('gs://') else path

    fs = FakeGCS(path=str(root), fs=LocalFileSystem())
    local = lambda p: str(root / p[len('gs://'):]) if os.fspath(p).startswith('gs://') else p  # noqa: E731
    monkeypatch.setattr(backend.fsspec_backend, '_get_filesystem', lambda name: fs)
    monkeypatch.setattr(gcs_utils, 'get_kvstore_for_gcs', lambda p: {'driver': 'file', 'path': local(p)})
    monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda p: False)
    ar = grain.sources.ArrayRecordDataSource
    monkeypatch.setattr(grain.sources, 'ArrayRecordDataSource', lambda ps: ar([local(p) for p in ps]))
    monkeypatch.chdir(tmp_path)
    return root


def test_a_gs_workdir_and_gs_shards_train_report_and_resume_exactly_past_a_damaged_step(tmp_path, bucket):
    folder = make_folder(str(tmp_path / 'flowers'))
    pack.pack(folder, 'gs://bucket/flowers', shards=2, progress=False)
    url = 'gs://bucket/run'
    run = dict(RUN, epochs=1, save_every=2, keep=10, log_every=1, data_path='gs://bucket/flowers', workdir=url)
    a = vit_train.train(run)
    fa = flat(a.params)
    assert a.workdir == url and not os.path.exists(tmp_path / 'gs:')

    # the workdir in the bucket holds what a local one holds
    run_dir = bucket / 'bucket' / 'run'
    names = set(os.listdir(run_dir))
    assert {'checkpoints', 'class_indices.json', 'summary.json', 'metrics.jsonl'} <= names
    assert any(n.startswith('events.out.tfevents') for n in names)
    assert json.loads((run_dir / 'class_indices.json').read_text()) == {'0': 'daisy', '1': 'rose', '2': 'tulip'}
    lines = [json.loads(x) for x in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    steps = training_ckpt.list_steps(paths.join(url, 'checkpoints'))
    assert [r['step'] for r in lines] == list(range(1, steps[-1] + 1)) and len(steps) == 2
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert summary['history'] == a.history and summary['workdir'] == url

    # checkpoints found and read through the URL (what `vit-flax convert gs://bucket/run x.npz` reads)
    assert training_ckpt.is_training_checkpoint(url)
    ck = training_ckpt.select(url, 'latest', log=lambda m: None)
    assert ck.step == steps[-1] and ck.path == f'{url}/checkpoints/{steps[-1]}'
    assert all(np.array_equal(ck.flat[k], fa[k]) for k in fa)
    from converters import pipeline   # what --weights gs://bucket/run (fine-tuning) and `vit-flax convert` read
    got = flat(pipeline.load_params(url, RUN['model'], img_size=16, patch_size=8, depth=1, num_classes=3,
                                    log=lambda m: None))
    assert all(np.array_equal(got[k], fa[k]) for k in fa)

    # the last step damaged: set aside in the bucket, the run resumes mid-epoch from the one before, the same end
    (run_dir / 'checkpoints' / str(steps[-1]) / 'meta' / 'metadata').write_text('{')
    b = vit_train.train(run)
    assert all(np.array_equal(fa[k], v) for k, v in flat(b.params).items())
    assert sorted(os.listdir(run_dir / 'checkpoints')) == sorted(map(str, steps)) + [f'{steps[-1]}.corrupt']
    assert [r['step'] for r in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines())] == \
        [r['step'] for r in lines]
    assert not os.path.exists(tmp_path / 'gs:')


def test_url_paths_never_meet_os_path(bucket):
    assert paths.resolve('gs://b/run/') == 'gs://b/run' and paths.join('gs://b/run', 'x', 'y') == 'gs://b/run/x/y'
    assert paths.dirname('gs://b/run/x') == 'gs://b/run' and paths.basename('gs://b/run/x') == 'x'
    paths.makedirs('gs://b/run/a/b')
    paths.write_text('gs://b/run/a/b/f.json', '{}')
    paths.write_bytes('gs://b/run/a/g', b'\x00')
    assert paths.isdir('gs://b/run/a') and paths.isfile('gs://b/run/a/g') and paths.read_text('gs://b/run/a/b/f.json') == '{}'
    paths.move('gs://b/run/a', 'gs://b/run/c')   # a folder: each file copied, the source deleted
    assert sorted(paths.listdir('gs://b/run')) == ['c'] and paths.listdir('gs://b/run/c/b') == ['f.json']
    assert not os.path.exists('gs:') and (bucket / 'b' / 'run' / 'c' / 'g').read_bytes() == b'\x00'


def test_a_url_data_path_must_be_packed_and_a_scheme_array_record_cannot_read_is_one_line(bucket):
    from vit_train import data
    from vit_train.errors import TrainError
    with pytest.raises(TrainError, match=r'gs://bucket/none/dataset.json: not a readable dataset.json'):
        data.load('folder', 'gs://bucket/none', 0.2)
    with pytest.raises(TrainError, match=r'--data-path gs://bucket/x: --dataset hf reads a local path; pack it'):
        data.load('hf', 'gs://bucket/x', 0.2)
    assert records.is_url('gs://b') and not os.path.exists('gs:')


def test_a_url_workdir_whose_file_system_is_not_installed_is_one_line_before_anything_runs(tmp_path, monkeypatch):
    from vit_train import config
    from vit_train.errors import TrainError
    pytest.importorskip('fsspec')
    if __import__('importlib').util.find_spec('s3fs'):
        pytest.skip('s3fs is installed')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainError, match=r'^--workdir s3://b/run: cannot be reached \(ImportError: .*s3fs'):
        config.resolve(config.build_parser().parse_args(['--workdir', 's3://b/run']))
    assert not os.listdir(tmp_path)
