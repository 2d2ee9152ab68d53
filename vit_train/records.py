"""Packed data sets: ArrayRecord shards + `dataset.json`, and Hugging Face `datasets` folders / Parquet files.

A packed data set is a folder (a local path or a URL epath reads, e.g. gs://bucket/imagenet; training reads
shards from a local path or gs://, which array_record opens itself):

    dataset.json                              the manifest, written last: its presence means "complete"
    train-00000-of-00004.array_record ...     records of the training split, in the split's order
    val-00000-of-00001.array_record ...       records of the validation split

`dataset.json` = {"format": "vit-flax-packed", "version": 1, "origin": "folder" | "cifar10" | "cifar100" | "hf",
"source": SRC as given, "class_names": [...], "record": "VFR1", "splits": {"train": {"count": n, "shards":
[{"path": name relative to the folder, "count": records, "bytes": size, "sha256": hex}, ...]}, "val": {...}},
"skipped": [names of unreadable inputs left out]}.

Each record (ArrayRecord, group_size 1, so any record is read alone) is one image, serialised as

    b'VFR1' | label: int32 LE | kind: uint8 | name length: uint16 LE | name: UTF-8 | [kind 1: h, w, c: uint16 LE] | payload

kind 0: the payload is the image file's bytes exactly as stored (JPEG, PNG, ...: never re-encoded), decoded by
Pillow in the pipeline as the file itself would be; kind 1: raw uint8 pixels of shape (h, w, c) in HWC order
(CIFAR, which has no file per image). `name` says where the image came from (`cat/001.jpg`, `train[17]`), for
warnings. The records of a split are in the order the un-packed data set lists them, so a run from the shards
is the run from the source, bit for bit.

Nothing here imports jax: grain's worker processes unpickle the sources.
"""
import hashlib
import io
import json
import os
import struct
import sys
from typing import List, Optional, Sequence

import numpy as np

from .errors import TrainError

MANIFEST = 'dataset.json'
FORMAT, VERSION, RECORD = 'vit-flax-packed', 1, 'VFR1'
MAGIC = RECORD.encode()
_HEAD = struct.Struct('<4siBH')        # magic, label, kind, name length
_SHAPE = struct.Struct('<HHH')
ENCODED, RAW = 0, 1
SPLITS = ('train', 'val')
RECORDS_PER_SHARD = 10_000             # --shards 0 (auto): about this many records a shard


# ---------------------------------------------------------------- paths (local or URL)

def epath(p):
    from etils import epath as ep
    return ep.Path(p)


def is_url(p) -> bool:
    return '://' in os.fspath(p)


def has_manifest(path) -> bool:
    if not path:
        return False
    try:
        return (epath(path) / MANIFEST).exists()
    except Exception:  # noqa: BLE001 - an unknown scheme, no access: not a packed data set
        return False


# ---------------------------------------------------------------- records

def encode_record(label: int, payload: bytes, name: str = '', shape: Optional[Sequence[int]] = None) -> bytes:
    """One record (see the module docstring); `shape` (h, w, c) makes it a raw-pixel record."""
    nm = name.encode('utf-8')[:65535]
    head = _HEAD.pack(MAGIC, int(label), RAW if shape is not None else ENCODED, len(nm)) + nm
    if shape is not None:
        head += _SHAPE.pack(*(int(s) for s in shape))
    return head + bytes(payload)


def decode_record(raw: bytes) -> dict:
    """{'label', 'name'} and 'encoded' (file bytes) or 'image' (uint8 HWC); ValueError for a malformed record."""
    if len(raw) < _HEAD.size:
        raise ValueError(f'{len(raw)} bytes, shorter than a record header')
    magic, label, kind, n = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise ValueError(f'not a {RECORD} record (starts with {magic!r})')
    at = _HEAD.size + n
    name = bytes(raw[_HEAD.size:at]).decode('utf-8', 'replace')
    if kind == ENCODED:
        return {'label': label, 'name': name, 'encoded': bytes(raw[at:])}
    if kind == RAW:
        h, w, c = _SHAPE.unpack_from(raw, at)
        at += _SHAPE.size
        if len(raw) - at != h * w * c:
            raise ValueError(f'{len(raw) - at} pixel bytes for a {h}x{w}x{c} image')
        arr = np.frombuffer(raw, np.uint8, h * w * c, at).reshape(h, w, c)
        return {'label': label, 'name': name, 'image': arr[..., 0] if c == 1 else arr}
    raise ValueError(f'unknown record kind {kind}')


class PackedSource:
    """One split of a packed data set, random access: grain's ArrayRecordDataSource over its shards, each
    record decoded to {'encoded' | 'image', 'label', 'name'}. A record that does not parse comes out as
    {'bad': where, 'label': 0} (the transform turns it into a weight-0 row and names it once per run).
    Picklable (grain's workers reopen the shards)."""

    def __init__(self, paths: Sequence[str], counts: Sequence[int], labels: Optional[Sequence[int]] = None):
        self.paths, self.counts = [os.fspath(p) for p in paths], list(counts)
        self.offsets = np.cumsum([0] + self.counts)
        self._src = None
        self.labels = labels

    def __len__(self):
        return int(self.offsets[-1])

    def __getstate__(self):
        return dict(self.__dict__, _src=None)

    def _source(self):
        if self._src is None:
            import grain
            self._src = grain.sources.ArrayRecordDataSource(self.paths)
        return self._src

    def where(self, i: int) -> str:
        s = int(np.searchsorted(self.offsets, i, side='right')) - 1
        return f'{self.paths[s]} record {i - int(self.offsets[s])}'

    def __getitem__(self, i):
        i = int(i)
        try:
            rec = decode_record(self._source()[i])
        except Exception as e:  # noqa: BLE001 - array_record raises plain errors for a damaged chunk
            return {'bad': f'{self.where(i)} ({type(e).__name__}: {str(e)[:200]})', 'label': 0}
        rec['name'] = f'{self.where(i)} ({rec["name"]})'
        return rec


# ---------------------------------------------------------------- reading dataset.json

def read_manifest(path) -> dict:
    p = epath(path) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except Exception as e:  # noqa: BLE001 - OSError, bad JSON, a URL scheme whose file system is not installed
        raise TrainError(f'{p}: not a readable {MANIFEST} ({type(e).__name__}: {e})') from None
    if not isinstance(m, dict) or m.get('format') != FORMAT or m.get('record') != RECORD:
        raise TrainError(f'{p}: not a {FORMAT} manifest (format {m.get("format") if isinstance(m, dict) else None!r})')
    if m.get('version', 0) > VERSION:
        raise TrainError(f'{p}: version {m["version"]} is newer than this reader ({VERSION})')
    return m


def sha256_of(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with epath(path).open('rb') as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def verify_shards(root, manifest: dict, how: str = 'sha256', threads: int = 0) -> None:
    """Every shard named in the manifest exists, has its size and (how='sha256') its checksum; else one
    TrainError naming the first shard at fault. The hashes run in parallel threads (hashlib frees the GIL)."""
    from concurrent.futures import ThreadPoolExecutor
    root = epath(root)
    shards = [s for split in manifest['splits'].values() for s in split['shards']]
    for s in shards:
        p = root / s['path']
        try:
            size = p.stat().length
        except (OSError, FileNotFoundError):
            raise TrainError(f'{p}: shard named in {root / MANIFEST} is missing') from None
        if size != s['bytes']:
            raise TrainError(f'{p}: {size:,} bytes, {root / MANIFEST} says {s["bytes"]:,} (a damaged or cut shard)')
    if how != 'sha256':
        return
    threads = threads or max(1, min(16, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        for s, got in zip(shards, pool.map(lambda s: sha256_of(root / s['path']), shards)):
            if got != s['sha256']:
                raise TrainError(f'{root / s["path"]}: sha256 {got[:16]}... differs from {root / MANIFEST}\'s '
                                 f'{s["sha256"][:16]}... (a damaged shard; pack it again)')


def load_packed(path, verify: str = 'sha256'):
    """(class names, train PackedSource, val PackedSource, manifest) of a packed data set, checked first."""
    m = read_manifest(path)
    verify_shards(path, m, verify)
    if is_url(path) and not os.fspath(path).startswith('gs://'):   # (array_record's own GCS reader)
        raise TrainError(f'{path}: its shards check out, but array_record reads local files and gs:// only: copy '
                         f'them to one of those (or mount the bucket) and pass that as --data-path')
    root = epath(path)
    out = []
    for split in SPLITS:
        sh = m['splits'].get(split, {'shards': []})['shards']
        out.append(PackedSource([os.fspath(root / s['path']) for s in sh], [s['count'] for s in sh]))
    return m['class_names'], out[0], out[1], m


# ---------------------------------------------------------------- Hugging Face datasets folders and Parquet

VAL_NAMES = ('validation', 'val', 'valid', 'test')


def _pa():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise TrainError('--dataset hf needs pyarrow (pip install pyarrow)') from None
    import pyarrow
    return pyarrow


class HFSource:
    """Rows of Arrow (`save_to_disk`) or Parquet files, random access: {'encoded', 'label', 'name'}.

    `files` is [(path, kind 'arrow'|'parquet', [rows per block])]; a block is a Parquet row group (read whole,
    image column only, a few cached) or a whole memory-mapped Arrow file. `labels` are read up front (one
    column). `rows` (optional) picks and orders rows by global index (a split made by --val-split)."""

    def __init__(self, files, image_column: str, labels, rows=None):
        self.files, self.image_column = files, image_column
        self.blocks = [(f, b) for f, (_, _, sizes) in enumerate(files) for b in range(len(sizes))]
        self.block_offsets = np.cumsum([0] + [n for _, _, sizes in files for n in sizes])
        self.file_first_block = np.cumsum([0] + [len(sizes) for _, _, sizes in files])
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        all_labels = np.asarray(labels, np.int32)
        self.labels = all_labels if rows is None else all_labels[self.rows]
        self._cache = {}

    def __getstate__(self):
        return dict(self.__dict__, _cache={})

    def __len__(self):
        return len(self.labels)

    def _block(self, k):
        if k not in self._cache:
            pa = _pa()
            f, b = self.blocks[k]
            path, kind, _ = self.files[f]
            if kind == 'parquet':
                col = pa.parquet.ParquetFile(path).read_row_group(b, columns=[self.image_column]).column(0)
            else:
                col = _arrow_table(path).column(self.image_column)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[k] = col
        return self._cache[k]

    def __getitem__(self, i):
        i = int(i)
        g = int(self.rows[i]) if self.rows is not None else i
        k = int(np.searchsorted(self.block_offsets, g, side='right')) - 1
        path = self.files[self.blocks[k][0]][0]
        where = f'{path} row {g - int(self.block_offsets[self.file_first_block[self.blocks[k][0]]])}'
        v = self._block(k)[g - int(self.block_offsets[k])].as_py()
        if isinstance(v, dict):
            v = v.get('bytes')
        if not isinstance(v, (bytes, bytearray)):
            return {'bad': f'{where} (no image bytes in column {self.image_column!r})', 'label': int(self.labels[i])}
        return {'encoded': bytes(v), 'label': int(self.labels[i]), 'name': where}


def _arrow_table(path):
    pa = _pa()
    with pa.memory_map(path) as src:
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(src).read_all()


def _features_class_names(features: dict, column: str):
    f = (features or {}).get(column)
    if isinstance(f, dict) and f.get('_type') == 'ClassLabel' and f.get('names'):
        return list(f['names'])
    return None


def _split_of(path: str) -> Optional[str]:
    """'train' or one of VAL_NAMES from a file's or folder's name (train-00000-of-00002.parquet,
    data/validation/...); None when the name says no split."""
    for part in reversed(os.path.normpath(path).split(os.sep)):
        low = part.lower()
        for name in ('train',) + VAL_NAMES:
            if low == name or low.startswith(name + '-') or low.startswith(name + '_') or low.startswith(name + '.'):
                return name
    return None


def _pick_splits(groups: dict) -> dict:
    """{'train': ..., 'val': ...} from splits by name: validation before val, valid, test (a set with both a
    validation and a test split validates on the first); or {None: everything} when no name says train."""
    if 'train' not in groups:
        return {None: [f for fs in groups.values() for f in fs]}
    val = next((n for n in VAL_NAMES if n in groups), None)
    return {'train': groups['train'], 'val': groups[val]} if val else {'train': groups['train']}


def _hf_files(path: str):
    """{'train': [...], 'val': [...]} or {None: [...]} of (path, kind) and the features dict (or None)."""
    if os.path.isfile(path):
        if not path.endswith('.parquet'):
            raise TrainError(f'{path}: not a Parquet file or a datasets folder')
        return {None: [(path, 'parquet')]}, None
    if not os.path.isdir(path):
        raise TrainError(f'{path}: no such file or directory')
    if os.path.isfile(os.path.join(path, 'dataset_dict.json')):   # DatasetDict.save_to_disk
        with open(os.path.join(path, 'dataset_dict.json')) as f:
            splits = json.load(f).get('splits', [])
        named = {s.lower(): s for s in splits}
        if 'train' not in named:
            raise TrainError(f'{path}: a datasets folder without a train split (splits: {", ".join(splits)})')
        out, feats = {}, None
        for side, name in (('train', 'train'), ('val', next((n for n in VAL_NAMES if n in named), None))):
            if name:
                out[side], feats = _saved_dataset(os.path.join(path, named[name]))
        return out, feats
    if os.path.isfile(os.path.join(path, 'state.json')):          # Dataset.save_to_disk
        files, feats = _saved_dataset(path)
        return {None: files}, feats
    found = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if f.endswith('.parquet'))
    if not found:
        raise TrainError(f'{path}: no *.parquet files and no datasets folder (dataset_dict.json or state.json)')
    groups = {}
    for f in found:
        groups.setdefault(_split_of(os.path.relpath(f, path)), []).append((f, 'parquet'))
    return _pick_splits(groups), None


def _saved_dataset(folder: str):
    with open(os.path.join(folder, 'state.json')) as f:
        state = json.load(f)
    feats = None
    info = os.path.join(folder, 'dataset_info.json')
    if os.path.isfile(info):
        with open(info) as f:
            feats = json.load(f).get('features')
    return [(os.path.join(folder, d['filename']), 'arrow') for d in state['_data_files']], feats


def _read_meta(files, label_column: str, image_column: str):
    """[(path, kind, block sizes)], the labels column (as a list) and the HF features found in the files."""
    pa = _pa()
    out, labels, feats = [], [], None
    for path, kind in files:
        if kind == 'parquet':
            try:
                pf = pa.parquet.ParquetFile(path)
            except (OSError, pa.ArrowException) as e:
                raise TrainError(f'{path}: not a readable Parquet file ({e})') from None
            names = pf.schema_arrow.names
            meta = pf.schema_arrow.metadata or {}
            if b'huggingface' in meta:
                feats = json.loads(meta[b'huggingface']).get('info', {}).get('features')
            sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
            read = lambda: pf.read(columns=[label_column]).column(0)  # noqa: E731
        else:
            table = _arrow_table(path)
            names, sizes = table.column_names, [table.num_rows]
            read = lambda: table.column(label_column)  # noqa: E731
        missing = [c for c, flag in ((image_column, '--image-column'), (label_column, '--label-column'))
                   if c not in names]
        if missing:
            raise TrainError(f'{path}: no column {missing[0]!r} (--image-column {image_column}, --label-column '
                             f'{label_column}); its columns: {", ".join(names)}')
        out.append((path, kind, sizes))
        labels.extend(read().to_pylist())
    return out, labels, feats


def load_hf(path: str, image_column: str, label_column: str, val_split: float):
    """(class names, train HFSource, val HFSource). Splits: the datasets folder's (train, and the first of
    validation / val / valid / test), Parquet files named by split (train-*.parquet, data/validation/...), else
    (one set, or a train split alone) WZMIAOMIAO's split of it by label (--val-split). Class names: the label column's ClassLabel names, else the sorted labels."""
    from .data import wzmiaomiao_split
    groups, feats = _hf_files(os.path.abspath(path))
    read = {side: _read_meta(files, label_column, image_column) for side, files in groups.items()}
    feats = feats or next((r[2] for r in read.values() if r[2]), None)
    names = _features_class_names(feats, label_column)
    values = sorted({v for r in read.values() for v in r[1]}, key=lambda v: (str(type(v)), v))
    if names is None:
        if all(isinstance(v, (int, np.integer)) for v in values):
            names = [str(c) for c in range(int(max(values)) + 1)] if values else []
        else:
            names = [str(v) for v in values]
    index = {v: (int(v) if isinstance(v, (int, np.integer)) else names.index(str(v))) for v in values}
    for side, (files, labels, _) in read.items():
        bad = [v for v in labels if not 0 <= index[v] < len(names)]
        if bad:
            raise TrainError(f'{path}: label {bad[0]!r} outside the {len(names)} class names')
    conv = {side: (files, [index[v] for v in labels]) for side, (files, labels, _) in read.items()}
    if 'train' in conv and 'val' not in conv:   # a train split alone is cut as a one-split set
        conv = {None: conv['train']}
    if None in conv:
        files, labels = conv[None]
        per_class = [[i for i, l in enumerate(labels) if l == c] for c in range(len(names))]
        train, val = wzmiaomiao_split(per_class, val_split)
        return (names, HFSource(files, image_column, labels, [i for i, _ in train]),
                HFSource(files, image_column, labels, [i for i, _ in val]))
    return (names, HFSource(*conv['train'][:1], image_column, conv['train'][1]),
            HFSource(*conv['val'][:1], image_column, conv['val'][1]))


def warn(msg: str) -> None:
    print(msg, file=sys.stderr)
