"""Packed data sets (`vit-flax data pack`, ArrayRecord shards + dataset.json) and Hugging Face datasets folders /
Parquet files: the same images, in the same order, as the folder they came from, so the same run bit for bit;
each process reads only its share; bad shards, records and columns are one line.

Images are tiny (20-29 x 24 px, JPEG and PNG); the runs are one-block 16 px ViTs of a few steps, in this
process (vit_train.train), so the file costs a few compiles.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import vit_train
from vit_train import data, feed, pack, records
from vit_train.errors import TrainError

from helpers import cli_process, xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLASSES = ('daisy', 'rose', 'tulip')


def make_folder(root, per_class=8, seed=0, layout='classes'):
    """root/<class>/NN.{jpg,png} (or root/train|val/<class>/...): noise around a per-class grey level."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            side = ('val' if i % 4 == 3 else 'train') if layout == 'splits' else ''
            d = os.path.join(root, side, name)
            os.makedirs(d, exist_ok=True)
            a = (np.full((20 + i, 24, 3), 70 * c) + rng.integers(0, 60, (20 + i, 24, 3))).astype(np.uint8)
            Image.fromarray(a).save(os.path.join(d, f'{i:02d}.png' if i % 2 else f'{i:02d}.jpg'))
    return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_folder(str(tmp_path_factory.mktemp('flowers')))


@pytest.fixture(scope='module')
def packed(folder, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp('packed') / 'ds')
    pack.pack(folder, dst, shards=3, progress=False)
    return dst


def pipeline(source, process_index=0, process_count=1, batch=6, **kw):
    tf = data.TrainTransform(16, 'bilinear', (0.3, 1.0), hflip=True)
    return data.train_iterator(source, tf, batch=batch, seed=5, process_index=process_index,
                               process_count=process_count, **kw)


def assert_same_batches(a, b, steps):
    for s in range(steps):
        x, y = next(a), next(b)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=f'{k} at step {s}')


# ---------------------------------------------------------------- the record format and the pack

def test_a_record_holds_the_file_bytes_as_stored_or_raw_pixels():
    jpeg = b'\xff\xd8\xff\xe0 any bytes at all'
    r = records.decode_record(records.encode_record(7, jpeg, 'rose/01.jpg'))
    assert r == {'label': 7, 'name': 'rose/01.jpg', 'encoded': jpeg}
    px = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    r = records.decode_record(records.encode_record(2, px.tobytes(), 'train[4]', px.shape))
    np.testing.assert_array_equal(r['image'], px)
    raw = records.encode_record(1, jpeg)
    assert raw[:4] == b'VFR1' and int.from_bytes(raw[4:8], 'little') == 1 and raw.endswith(jpeg)
    for bad in (b'VFR', b'XXXX' + raw[4:], records.encode_record(2, b'\0' * 5, 'x', (2, 3, 3))):
        with pytest.raises(ValueError):
            records.decode_record(bad)


def test_pack_writes_each_split_in_the_folders_order_with_its_checksums(folder, packed):
    from array_record.python.array_record_module import ArrayRecordReader
    ds = data.folder(folder, 0.2)
    m = json.loads(open(os.path.join(packed, 'dataset.json')).read())
    assert m['class_names'] == list(CLASSES) and m['origin'] == 'folder' and m['skipped'] == []
    for split, src in (('train', ds.train), ('val', ds.val)):
        info = m['splits'][split]
        assert info['count'] == len(src) and len(info['shards']) == 3
        got = []
        for s in info['shards']:
            path = os.path.join(packed, s['path'])
            with open(path, 'rb') as f:
                raw = f.read()
            assert s['sha256'] == hashlib.sha256(raw).hexdigest() and s['bytes'] == len(raw)
            reader = ArrayRecordReader(path)
            assert reader.num_records() == s['count']
            got += [records.decode_record(r) for r in reader.read_all()]
            reader.close()
        assert [(r['encoded'], r['label']) for r in got] == \
            [(open(p, 'rb').read(), int(l)) for p, l in zip(src.paths, src.labels)]   # the bytes as stored


def test_pack_refuses_a_non_empty_dst_and_force_replaces_only_a_packed_set(folder, tmp_path, capsys):
    from vit_flax_cli.cli import main
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'notes.txt').write_text('mine')
    for force in ([], ['--force']):
        assert main(['data', 'pack', folder, str(tmp_path / 'other'), *force]) == 1
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and str(tmp_path / 'other') in err, err
    assert (tmp_path / 'other' / 'notes.txt').read_text() == 'mine'
    dst = str(tmp_path / 'p')
    assert main(['data', 'pack', folder, dst, '--shards', '2']) == 0
    assert main(['data', 'pack', folder, dst]) == 1 and 'pass --force' in capsys.readouterr().err
    assert main(['data', 'pack', folder, dst, '--shards', '1', '--force']) == 0
    assert sorted(os.listdir(dst)) == ['dataset.json', 'train-00000-of-00001.array_record',
                                       'val-00000-of-00001.array_record']


def test_pack_leaves_an_unreadable_image_out_and_names_it_once(tmp_path, capsys):
    src = make_folder(str(tmp_path / 'f'), per_class=4)
    with open(os.path.join(src, 'rose', 'zz.jpg'), 'wb') as f:
        f.write(b'\xff\xd8 not really a jpeg')
    m = pack.pack(src, str(tmp_path / 'p'), progress=False)
    err = capsys.readouterr().err
    assert m['skipped'] == ['rose/zz.jpg'] and err.count('zz.jpg') == 1, err
    assert m['splits']['train']['count'] + m['splits']['val']['count'] == 12


def test_a_killed_pack_leaves_nothing_that_reads_as_a_data_set(tmp_path):
    src = make_folder(str(tmp_path / 'f'), per_class=6, layout='splits')
    os.mkfifo(os.path.join(src, 'train', 'tulip', 'zz.jpg'))   # reading it blocks: the pack is stopped there
    dst = tmp_path / 'p'
    p = cli_process('data', 'pack', src, dst, '--shards', '3', wait=False, cwd=ROOT)
    try:
        deadline = time.time() + 120
        while not any(n.endswith('.array_record') for n in (os.listdir(dst) if dst.exists() else ())):
            assert time.time() < deadline and p.poll() is None, p.communicate()
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGKILL)
        p.communicate()
    assert p.returncode == -signal.SIGKILL
    assert not records.has_manifest(dst) and not any('dataset.json' in n for n in os.listdir(dst))
    with pytest.raises(TrainError):
        data.load('folder', str(dst), 0.2)      # no dataset.json: a folder without classes, not a data set


def test_cifar_packs_as_raw_pixels_and_reads_back_as_the_archive(tmp_path):
    rng = np.random.default_rng(3)
    d = tmp_path / 'cifar-10-batches-bin'
    d.mkdir()
    for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
        n = 4
        rec = np.concatenate([rng.integers(0, 10, (n, 1)), rng.integers(0, 256, (n, 3072))], 1).astype(np.uint8)
        (d / name).write_bytes(rec.tobytes())
    (d / 'batches.meta.txt').write_text('\n'.join(f'class{i}' for i in range(10)) + '\n')
    m = pack.pack(str(d), str(tmp_path / 'p'), progress=False)
    assert m['origin'] == 'cifar10' and (m['splits']['train']['count'], m['splits']['val']['count']) == (20, 4)
    a, b = data.load('cifar10', str(d), 0.2), data.load('folder', str(tmp_path / 'p'), 0.2)
    assert b.class_names == a.class_names
    assert all(np.array_equal(b.train[i]['image'], a.train.images[i]) and b.train[i]['label'] == a.train.labels[i]
               for i in range(20))
    assert_same_batches(pipeline(a.train, batch=4), pipeline(b.train, batch=4), steps=6)
    from vit_train import config   # packed CIFAR gets CIFAR's defaults: the 32 px ViT-S/4, crop 1.0, no workers
    r = config.resolve(config.build_parser().parse_args(['--data-path', str(tmp_path / 'p'),
                                                          '--workdir', str(tmp_path / 'w')]))
    assert (r.dataset, r.img_size, r.patch_size, r.crop_pct, r.workers) == ('packed', 32, 4, 1.0, 0)


# ---------------------------------------------------------------- reading: the same batches

def test_shards_give_the_folders_batches_and_evaluation(folder, packed):
    a, b = data.load('folder', folder, 0.2), data.load('folder', packed, 0.2)
    assert b.name == 'packed' and b.class_names == list(CLASSES) and len(b.train) == len(a.train)
    assert_same_batches(pipeline(a.train), pipeline(b.train), steps=len(a.train) // 6 + 2)   # into epoch 2
    tf = data.EvalTransform(16, 'bilinear', 0.875)
    for x, y in zip(data.eval_batches(a.val, tf, batch=4, process_index=0, process_count=1),
                    data.eval_batches(b.val, tf, batch=4, process_index=0, process_count=1)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


class Logged(records.PackedSource):
    """A packed split that notes which records it was asked for."""
    def __init__(self, src):
        super().__init__(src.paths, src.counts)
        self.read = []

    def __getitem__(self, i):
        self.read.append(int(i))
        return super().__getitem__(i)


def test_each_process_reads_only_its_share_and_the_union_is_the_epoch(packed):
    _, train, _, _ = records.load_packed(packed)
    steps = len(train) // 6
    one, halves = Logged(train), [Logged(train) for _ in range(2)]
    single = pipeline(one, read_ahead=0)   # nothing read ahead of the batch asked for: the reads are exact
    parts = [pipeline(h, process_index=p, process_count=2, read_ahead=0) for p, h in enumerate(halves)]
    for s in range(steps):    # one epoch
        b = next(single)
        got = [next(p) for p in parts]
        for k in b:
            np.testing.assert_array_equal(b[k], np.concatenate([g[k] for g in got]), err_msg=f'{k} {s}')
    reads = [set(h.read) for h in halves]
    assert len(halves[0].read) == len(reads[0]) == len(halves[1].read) == len(reads[1]) == steps * 3
    assert not reads[0] & reads[1] and reads[0] | reads[1] == set(one.read)
    assert len(one.read) == steps * 6 == len(set(one.read))


def test_a_record_that_does_not_decode_is_a_zero_weight_row_named_once(tmp_path, capsys):
    from array_record.python.array_record_module import ArrayRecordWriter
    w = ArrayRecordWriter(str(tmp_path / 'x.array_record'), 'group_size:1')
    for r in (records.encode_record(0, b'not an image', 'a.jpg'), b'garbage', records.encode_record(1, b'\x89PNG')):
        w.write(r)
    w.close()
    src = records.PackedSource([str(tmp_path / 'x.array_record')], [3])
    tf = data.EvalTransform(8, 'bilinear', 1.0)
    for _ in range(2):
        rows = [tf(src[i]) for i in range(3)]
    assert [float(r['weight']) for r in rows] == [0, 0, 0] and [int(r['unreadable']) for r in rows] == [1, 1, 1]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all('x.array_record record' in e for e in err), err


def test_a_missing_or_damaged_shard_is_one_line_naming_it(packed, tmp_path):
    import shutil
    copy = str(tmp_path / 'c')
    shutil.copytree(packed, copy)
    shard = os.path.join(copy, 'train-00001-of-00003.array_record')
    raw = bytearray(open(shard, 'rb').read())
    raw[len(raw) // 2] ^= 1
    open(shard, 'wb').write(bytes(raw))
    with pytest.raises(TrainError, match='train-00001-of-00003.array_record: sha256') as e:
        data.load('folder', copy, 0.2)
    assert '\n' not in str(e.value)
    r = subprocess.run([sys.executable, 'train_flax.py', '--data-path', copy, '--workdir', str(tmp_path / 'w')],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)   # refused before any training
    assert r.returncode != 0 and r.stderr.count('\n') == 1 and 'train-00001-of-00003.array_record: sha256' in r.stderr, \
        r.stderr
    assert not os.path.exists(tmp_path / 'w' / 'checkpoints')
    data.load('packed', copy, 0.2, verify='size')    # the size check alone does not see a flipped bit
    os.remove(shard)
    with pytest.raises(TrainError, match='train-00001-of-00003.array_record: shard named in .* is missing'):
        data.load('packed', copy, 0.2, verify='size')


# ---------------------------------------------------------------- Hugging Face datasets / Parquet copies

def hf_copy(folder, tmp_path):
    """The folder as a datasets DatasetDict (Image + ClassLabel features), saved to disk and as Parquet."""
    import datasets
    ds = data.folder(folder, 0.2)
    feats = datasets.Features({'img': datasets.Image(), 'y': datasets.ClassLabel(names=list(CLASSES))})

    def part(src):
        return datasets.Dataset.from_dict(
            {'img': [{'bytes': open(p, 'rb').read(), 'path': None} for p in src.paths], 'y': [int(l) for l in src.labels]},
            features=feats)
    dd = datasets.DatasetDict(train=part(ds.train), validation=part(ds.val))
    dd.save_to_disk(str(tmp_path / 'saved'))
    os.makedirs(tmp_path / 'pq' / 'data')
    for split in dd:
        dd[split].to_parquet(str(tmp_path / 'pq' / 'data' / f'{split}-00000-of-00001.parquet'), batch_size=5)
    return ds


def test_a_datasets_folder_and_its_parquet_copy_give_the_folders_batches(folder, tmp_path):
    pytest.importorskip('datasets')
    ds = hf_copy(folder, tmp_path)
    for path in (tmp_path / 'saved', tmp_path / 'pq'):
        h = data.load('hf', str(path), 0.2, image_column='img', label_column='y')
        assert h.class_names == list(CLASSES) and (len(h.train), len(h.val)) == (len(ds.train), len(ds.val))
        assert_same_batches(pipeline(ds.train), pipeline(h.train), steps=len(ds.train) // 6 + 1)
        tf = data.EvalTransform(16, 'bilinear', 0.875)
        assert all(np.array_equal(tf(ds.val[i])['image'], tf(h.val[i])['image']) for i in range(len(ds.val)))
    with pytest.raises(TrainError, match=r"no column 'image' .*; its columns: img, y"):
        data.load('hf', str(tmp_path / 'pq'), 0.2, label_column='y')
    # and `data pack` of the Parquet copy packs the same records
    m = pack.pack(str(tmp_path / 'pq'), str(tmp_path / 'packed'), kind=None, image_column='img', label_column='y',
                  progress=False)
    assert m['origin'] == 'hf' and m['class_names'] == list(CLASSES)
    b = data.load('folder', str(tmp_path / 'packed'), 0.2)
    assert_same_batches(pipeline(ds.train), pipeline(b.train), steps=2)


def test_parquet_splits_by_name_prefer_validation_and_a_single_file_is_split_like_a_folder(folder, tmp_path):
    pa = pytest.importorskip('pyarrow')
    import pyarrow.parquet as pq
    ds = data.folder(folder, 0.25)
    paths = list(ds.train.paths) + list(ds.val.paths)
    names = [CLASSES[l] for l in list(ds.train.labels) + list(ds.val.labels)]   # string labels, no ClassLabel
    table = pa.table({'image': [{'bytes': open(p, 'rb').read(), 'path': p} for p in paths], 'label': names})
    pq.write_table(table, tmp_path / 'all.parquet', row_group_size=4)
    h = data.load('hf', str(tmp_path / 'all.parquet'), 0.25)
    assert h.class_names == list(CLASSES)
    # WZMIAOMIAO's rule on the rows by class, as data.folder applies it to the files
    assert sorted(h.train.labels.tolist()) == sorted(ds.train.labels.tolist()) and len(h.val) == len(ds.val)
    os.makedirs(tmp_path / 'named')
    for split, rows in (('train', table.slice(0, 10)), ('test', table.slice(10, 3)), ('validation', table.slice(13, 5))):
        pq.write_table(rows, tmp_path / 'named' / f'{split}-00000-of-00001.parquet')
    h = data.load('hf', str(tmp_path / 'named'), 0.25)
    assert (len(h.train), len(h.val)) == (10, 5)


# ---------------------------------------------------------------- the feed ahead of the devices

def test_device_feed_reads_ahead_and_saves_the_state_of_the_next_unused_batch(packed):
    _, train, _, _ = records.load_packed(packed)
    fed = feed.DeviceFeed(pipeline(train), lambda b: b['label'].copy(), depth=3)
    for _ in range(4):
        next(fed)
        fed.fill()
    assert len(fed.ring) == 3
    state = fed.get_state()
    want = [next(fed) for _ in range(3)]
    again = feed.DeviceFeed(pipeline(train), lambda b: b['label'].copy(), depth=3)
    again.set_state(state)
    assert all(np.array_equal(w, next(again)) for w in want)


# ---------------------------------------------------------------- whole runs

RUN = dict(model='vit_tiny_patch16_224', img_size=16, patch_size=8, depth=1, batch_size=6, epochs=2, workers=0,
           warmup_epochs=0.5)


def flat(params):
    from flax.traverse_util import flatten_dict
    return {k: np.asarray(v) for k, v in flatten_dict(params, sep='/').items()}


def test_runs_from_shards_and_from_parquet_are_the_folder_run_bit_for_bit_and_resume_exactly(folder, packed, tmp_path):
    a = vit_train.train(dict(RUN, data_path=folder, workdir=str(tmp_path / 'a')))
    b = vit_train.train(dict(RUN, data_path=packed, save_every=2, keep=10, workdir=str(tmp_path / 'b')))
    fa, fb = flat(a.params), flat(b.params)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    assert [h['train_loss'] for h in a.history] == [h['train_loss'] for h in b.history]
    assert all(h['data_wait_ms'] is not None for h in b.history)
    # resume from the mid-epoch-2 checkpoint (its saved iterator state): the same end
    import shutil
    from converters.formats import training_ckpt
    ck = os.path.join(tmp_path / 'b', 'checkpoints')
    steps = training_ckpt.list_steps(ck)
    mid = [s for s in steps if s % (len(data.load('folder', folder, 0.2).train) // 6)][-1]
    for s in steps:
        if s > mid:
            shutil.rmtree(os.path.join(ck, str(s)))
    c = vit_train.train(dict(RUN, data_path=packed, save_every=2, keep=10, workdir=str(tmp_path / 'b')))
    fc = flat(c.params)
    assert all(np.array_equal(fa[k], fc[k]) for k in fa)
    # and a Parquet copy of the folder (--dataset hf) is the same run again
    pytest.importorskip('datasets')
    hf_copy(folder, tmp_path)
    d = vit_train.train(dict(RUN, dataset='hf', data_path=str(tmp_path / 'pq'), image_column='img', label_column='y',
                             workdir=str(tmp_path / 'd')))
    fd = flat(d.params)
    assert all(np.array_equal(fa[k], fd[k]) for k in fa)


@pytest.mark.slow   # two processes with jax.distributed on loopback (~1 min here)
def test_two_processes_over_shards_match_one(packed, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    argv = [x for k, v in RUN.items() for x in (f'--{k.replace("_", "-")}', str(v))]
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    one = subprocess.run([sys.executable, 'train_flax.py', *argv, '--data-path', packed, '--workdir',
                          str(tmp_path / 'one')], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    procs = [cli_process('train', *argv, '--data-path', packed, '--workdir', tmp_path / 'two', '--coordinator',
                         f'127.0.0.1:{port}', '--num-processes', '2', '--process-id', i, wait=False, cwd=ROOT, env=env)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    from converters.formats import training_ckpt
    a, b = (training_ckpt.select(str(tmp_path / w), 'latest', log=lambda m: None) for w in ('one', 'two'))
    assert max(float(np.abs(a.flat[k] - b.flat[k]).max()) for k in a.flat) < 1e-3


# ---------------------------------------------------------------- URLs (a gs:// served from memory)

@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// through etils.epath's fsspec backend, served by an in-memory file system (no network)."""
    from fsspec.implementations.memory import MemoryFileSystem
    from etils.epath import backend

    class FakeGCS(MemoryFileSystem):
        protocol = ('gs', 'gcs')
        root_marker = ''
        store, pseudo_dirs = {}, ['']
    monkeypatch.setattr(backend.fsspec_backend, '_get_filesystem', lambda name: FakeGCS())
    return FakeGCS


def test_pack_to_a_url_and_check_its_shards_there(folder, packed, fake_gcs):
    from etils import epath
    url = 'gs://bucket/flowers'
    m = pack.pack(folder, url, shards=3, progress=False)
    assert not os.path.exists('gs:') and sorted(fake_gcs.store) == sorted(
        f'gs://bucket/flowers/{n}' for n in os.listdir(packed))
    local = json.loads(open(os.path.join(packed, 'dataset.json')).read())
    assert m['splits'] == local['splits']        # the same shards, byte for byte
    records.verify_shards(url, records.read_manifest(url))
    names, train, val, _ = records.load_packed(url)   # array_record opens gs:// shards itself (its GCS reader)
    assert names == list(CLASSES) and train.paths[0] == f'{url}/train-00000-of-00003.array_record'
    shard = epath.Path(url) / 'val-00002-of-00003.array_record'
    raw = bytearray(shard.read_bytes())
    raw[-100] ^= 4
    shard.write_bytes(bytes(raw))
    with pytest.raises(TrainError, match='gs://bucket/flowers/val-00002-of-00003.array_record: sha256'):
        records.load_packed(url)
    with pytest.raises(TrainError, match='pass --force'):
        pack.pack(folder, url, progress=False)
