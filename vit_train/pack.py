"""`vit-flax data pack SRC DST`: an image folder, CIFAR archives or a Hugging Face datasets folder / Parquet
files into ArrayRecord shards + dataset.json (the format: `records`' docstring).

Each split is written in the order the un-packed data set lists it (a folder: `data.folder`'s order and
split; CIFAR: the archive's; hf: `records.load_hf`'s), cut into contiguous shards. Every image is opened and
decoded once (threads) so that an unreadable one is left out and named once; the stored bytes are the file's
own (never re-encoded). dataset.json is written last, through a rename: a pack that is killed leaves shards but
no dataset.json, which nothing reads as a data set.
"""
import io
import json
import math
import os
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

from . import data, records
from .errors import TrainError

ORIGINS = ('folder', 'cifar10', 'cifar100', 'hf')
# group_size 1: any record reads alone (grain's random access); uncompressed: JPEG/PNG bytes do not shrink, and
# reading skips a decompression per record
WRITER_OPTIONS = 'group_size:1,uncompressed'
_OURS = ('.array_record', '.array_record.tmp', records.MANIFEST, records.MANIFEST + '.tmp')


def detect(src: str) -> str:
    """The kind of SRC: hf (a .parquet, a save_to_disk folder or a folder of .parquet), cifar10 / cifar100
    (an archive or directory `data.cifar` reads), else folder."""
    if records.has_manifest(src):
        raise TrainError(f'{src}: already a packed data set ({records.MANIFEST})')
    if src.endswith('.parquet') or any(os.path.exists(os.path.join(src, f)) for f in ('dataset_dict.json', 'state.json')):
        return 'hf'
    if os.path.isdir(src) and any(f.endswith('.parquet') for _, _, fs in os.walk(src) for f in fs):
        return 'hf'
    low = os.path.basename(os.path.normpath(src)).lower()
    if os.path.isfile(src) or 'cifar' in low:
        for which in (('cifar100', 'cifar10') if '100' in low else ('cifar10', 'cifar100')):
            try:
                data.cifar(src, which)
                return which
            except TrainError as e:
                last = e
        raise last
    return 'folder'


def _check_dst(dst, force: bool):
    """Refuse a non-empty DST without --force, and with it anything but a packed data set (a typo must not
    delete a folder of other files); with --force, the old dataset.json goes first, then its shards."""
    p = records.epath(dst)
    if not p.exists():
        p.mkdir(parents=True, exist_ok=True)
        return p
    if not p.is_dir():
        raise TrainError(f'{dst}: exists and is not a directory')
    names = [c.name for c in p.iterdir()]
    if not names:
        return p
    if not force:
        raise TrainError(f'{dst}: not empty ({len(names)} entries); pass --force to replace the packed data set there')
    foreign = [n for n in names if not n.endswith(_OURS)]
    if foreign:
        raise TrainError(f'{dst}: holds {foreign[0]!r}, not a packed data set; refusing to replace it even with --force')
    if records.MANIFEST in names:
        (p / records.MANIFEST).unlink()
    for n in names:
        if n != records.MANIFEST and (p / n).exists():
            (p / n).unlink()
    return p


def _items(kind: str, src: str, val_split: float, image_column: str, label_column: str):
    """(class names, {split: (count, reader(i) -> (label, payload, name, shape))})."""
    if kind == 'folder':
        ds = data.folder(os.path.abspath(src), val_split)
        root = os.path.abspath(src)

        def reader(source):
            def read(i):
                path = source.paths[i]
                with open(path, 'rb') as f:
                    return int(source.labels[i]), f.read(), os.path.relpath(path, root), None
            return read
    elif kind in ('cifar10', 'cifar100'):
        ds = data.cifar(src, kind)
        ds.train.split, ds.val.split = 'train', 'test'

        def reader(source):
            def read(i):
                img = source.images[i]
                return int(source.labels[i]), img.tobytes(), f'{source.split}[{i}]', img.shape + (() if img.ndim == 3 else (1,))
            return read
    else:
        names, tr, va = records.load_hf(src, image_column, label_column, val_split)
        ds = data.Dataset('hf', names, tr, va, src)

        def reader(source):
            def read(i):
                r = source[i]
                return r['label'], r.get('encoded'), r.get('name') or r.get('bad'), None
            return read
    return ds.class_names, {'train': (len(ds.train), reader(ds.train)), 'val': (len(ds.val), reader(ds.val))}


def _checked(read, i):
    """(label, payload, name, shape, error or None): the image decodes as training will decode it."""
    try:
        label, payload, name, shape = read(i)
    except OSError as e:
        return 0, None, f'item {i}', None, f'{type(e).__name__}: {e}'
    if payload is None:
        return label, None, name, None, 'no image bytes'
    if shape is None:
        from PIL import Image
        try:
            with Image.open(io.BytesIO(payload)) as im:
                im.load()
        except Image.UnidentifiedImageError:
            return label, None, name, None, 'not an image Pillow reads'
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
            return label, None, name, None, f'{type(e).__name__}: {e}'
    return label, payload, name, shape, None


def pack(src: str, dst: str, *, shards: int = 0, force: bool = False, kind: str = None, val_split: float = 0.2,
         image_column: str = 'image', label_column: str = 'label', threads: int = 0, progress: bool = True,
         log=print) -> dict:
    """Pack SRC into DST; returns the manifest (also written to DST/dataset.json)."""
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm import tqdm
    kind = kind or detect(src)
    if kind not in ORIGINS:
        raise TrainError(f'--dataset {kind}: one of {", ".join(ORIGINS)}')
    class_names, splits = _items(kind, src, val_split, image_column, label_column)
    out = _check_dst(dst, force)
    local = not records.is_url(dst)
    threads = threads or max(1, min(16, os.cpu_count() or 1))
    total = sum(n for n, _ in splits.values())
    manifest = dict(format=records.FORMAT, version=records.VERSION, record=records.RECORD, origin=kind,
                    source=os.path.abspath(src) if not records.is_url(src) else src, class_names=class_names,
                    splits={}, skipped=[])
    bar = tqdm(total=total, desc=f'pack {os.path.basename(os.path.normpath(src))}', unit='img', file=sys.stderr,
               disable=None if progress else True)   # None: only on a terminal
    staging = None if local else tempfile.mkdtemp(prefix='vit-flax-pack-')
    try:
        with ThreadPoolExecutor(threads) as pool:
            for split, (n, read) in splits.items():
                k = min(shards, n) if shards else max(1, math.ceil(n / records.RECORDS_PER_SHARD))
                k = max(k, 1)
                shard_list = []
                for s in range(k):
                    lo, hi = n * s // k, n * (s + 1) // k
                    name = f'{split}-{s:05d}-of-{k:05d}.array_record'
                    path = os.path.join(staging, name) if staging else os.fspath(out / name)
                    w = ArrayRecordWriter(path, WRITER_OPTIONS)
                    count = 0
                    for start in range(lo, hi, 256):
                        for label, payload, iname, shape, err in pool.map(lambda i: _checked(read, i),
                                                                          range(start, min(hi, start + 256))):
                            bar.update()
                            if err:
                                manifest['skipped'].append(iname)
                                bar.write(f'warning: skipped unreadable image {iname} ({err})', file=sys.stderr)
                                continue
                            w.write(records.encode_record(label, payload, iname, shape))
                            count += 1
                    w.close()
                    if staging:
                        with open(path, 'rb') as f, (out / name).open('wb') as g:
                            shutil.copyfileobj(f, g, 1 << 22)
                        os.remove(path)
                    shard_list.append(dict(path=name, count=count, bytes=(out / name).stat().length,
                                           sha256=records.sha256_of(out / name)))
                manifest['splits'][split] = dict(count=sum(s['count'] for s in shard_list), shards=shard_list)
    finally:
        bar.close()
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    _write_manifest(out, manifest)
    return manifest


def _write_manifest(out, manifest: dict) -> None:
    """dataset.json via a temporary and a rename (fsynced locally): it appears whole or not at all."""
    text = json.dumps(manifest, indent=1)
    final = out / records.MANIFEST
    if records.is_url(out):
        tmp = out / (records.MANIFEST + '.tmp')
        tmp.write_text(text)
        tmp.rename(final)
        return
    tmp = os.fspath(final) + '.tmp'
    for name in os.listdir(os.fspath(out)):   # the shards' bytes reach the disk before the manifest names them
        if name.endswith('.array_record'):
            fd = os.open(os.path.join(os.fspath(out), name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    with open(tmp, 'w') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.fspath(final))
    fd = os.open(os.fspath(out), os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
