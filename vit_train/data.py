"""Data sets (digits, CIFAR-10/100, image folders), WZMIAOMIAO's split, image transforms, the grain pipeline.

Images travel as uint8 HWC arrays; normalisation happens on the device, inside the jitted step. Every
element is a dict {'image', 'label', 'weight', 'unreadable'}: an image that cannot be decoded becomes a
zero image of weight 0 (it takes no part in the loss or the accuracy) and is counted, so an unreadable
file never stops a run and never changes which examples the other rows of a batch hold.

Nothing here imports the models or jax: grain's worker processes import this module. The converters modules
it uses, `converters.preprocess` (the eval resize and crop predict uses too) and
`converters.formats.restricted_pickle` (the CIFAR batches), import only numpy and Pillow.
"""
import bz2
import gzip
import hashlib
import io
import lzma
import os
import random
import sys
import tarfile
import threading
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from converters.errors import ConversionError
from converters.formats import restricted_pickle
from converters.formats.images import check_declared_size
from converters.preprocess import resize_and_crop

from .errors import TrainError

DATASETS = ('digits', 'cifar10', 'cifar100', 'folder', 'packed', 'hf')
IMAGE_EXTS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'lanczos')


# ---------------------------------------------------------------- sources (random access, picklable)

class ArraySource:
    """In-memory uint8 images (N, H, W[, C]) and their labels."""

    def __init__(self, images: np.ndarray, labels: Sequence[int]):
        self.images, self.labels = images, np.asarray(labels, np.int32)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {'image': self.images[i], 'label': int(self.labels[i])}


class FileSource:
    """Image files decoded on read (in the pipeline's workers)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]):
        self.paths, self.labels = list(paths), np.asarray(labels, np.int32)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return {'path': self.paths[i], 'label': int(self.labels[i])}


class Padded:
    """`source` followed by padding elements up to `length` (a whole number of evaluation batches)."""

    def __init__(self, source, length: int):
        self.source, self.length = source, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.source[i] if i < len(self.source) else {'pad': True, 'label': 0}


@dataclass
class Dataset:
    name: str
    class_names: List[str]
    train: object
    val: object
    path: Optional[str] = None


# ---------------------------------------------------------------- WZMIAOMIAO's split

def wzmiaomiao_split(per_class: Sequence[Sequence], val_rate: float):
    """WZMIAOMIAO's `read_split_data` rule: `random.seed(0)`, then for each class in order a
    `random.sample` of int(n * val_rate) of its sorted items goes to validation. Returns
    (train, val) as lists of (item, class index) in class order, items in sorted order."""
    rnd = random.Random(0)  # the same stream as random.seed(0) followed by module-level random.sample
    train, val = [], []
    for c, items in enumerate(per_class):
        items = sorted(items)
        chosen = set(rnd.sample(items, k=int(len(items) * val_rate)))
        for it in items:
            (val if it in chosen else train).append((it, c))
    return train, val


def _split_source(train, val, make):
    return (make([i for i, _ in train], [c for _, c in train]),
            make([i for i, _ in val], [c for _, c in val]))


# ---------------------------------------------------------------- digits (embedded)

def _digits_arrays():
    """(images (1797, 8, 8) in 0..16, labels): scikit-learn's digits.csv.gz read directly, as load_digits
    reads it, without importing scikit-learn itself (seconds of start-up for every run)."""
    import importlib.util
    spec = importlib.util.find_spec('sklearn')
    csv = os.path.join(spec.submodule_search_locations[0], 'datasets', 'data', 'digits.csv.gz') if spec else ''
    if os.path.isfile(csv):
        table = np.loadtxt(csv, delimiter=',')
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images, d.target


def digits(val_split: float) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (grey levels 0..16 scaled to 0..255), split by WZMIAOMIAO's rule."""
    raw, target = _digits_arrays()
    images = np.round(raw * (255 / 16)).astype(np.uint8)
    per_class = [np.flatnonzero(target == c).tolist() for c in range(10)]
    train, val = wzmiaomiao_split(per_class, val_split)
    tr, va = _split_source(train, val, lambda idx, lab: ArraySource(images[idx], lab))
    return Dataset('digits', [str(c) for c in range(10)], tr, va)


# ---------------------------------------------------------------- image folders

def _image_files(folder: str) -> List[str]:
    return [os.path.join(folder, f) for f in os.listdir(folder)
            if os.path.splitext(f)[1].lower() in IMAGE_EXTS and not f.startswith('.')]


def _class_dirs(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith('.'))


def folder(root: str, val_split: float) -> Dataset:
    """`root/<class>/*.jpg` split by WZMIAOMIAO's rule, or `root/train/<class>/` with `root/val/<class>/`."""
    if not os.path.isdir(root):
        raise TrainError(f'{root}: no such data directory')
    if all(os.path.isdir(os.path.join(root, s)) for s in ('train', 'val')):
        classes = _class_dirs(os.path.join(root, 'train'))
        extra = sorted(set(_class_dirs(os.path.join(root, 'val'))) - set(classes))
        if extra:
            raise TrainError(f'{root}/val: class folder {extra[0]!r} has no counterpart in {root}/train')
        sides = []
        for side in ('train', 'val'):
            items = [(p, c) for c, name in enumerate(classes)
                     if os.path.isdir(os.path.join(root, side, name))
                     for p in sorted(_image_files(os.path.join(root, side, name)))]
            sides.append(items)
        train, val = sides
    else:
        classes = _class_dirs(root)
        train, val = wzmiaomiao_split([_image_files(os.path.join(root, c)) for c in classes], val_split)
    if not classes:
        raise TrainError(f'{root}: no class sub-folders (expected {root}/<class>/*.jpg or train/ and val/)')
    for side, items in (('training', train), ('validation', val)):
        if not items:
            raise TrainError(f'{root}: no {side} images ({", ".join(IMAGE_EXTS)}; --val-split {val_split})')
    tr, va = _split_source(train, val, FileSource)
    return Dataset('folder', classes, tr, va, root)


# ---------------------------------------------------------------- CIFAR archives

# What a CIFAR archive may unpack to. The real ones: cifar-10-python 178 MB (its largest member, a data batch,
# 31 MB), cifar-10-binary 184 MB (6 x 30,730,000 bytes), cifar-100-python 161 MB (`train` 155 MB),
# cifar-100-binary 184 MB (`train.bin` 153,700,000 bytes). More is not CIFAR, and reading it (a gzip bomb, a tar
# header that lies) would only exhaust memory.
MAX_ARCHIVE = 200_000_000
MAX_MEMBER = 160_000_000
_CHUNK = 1 << 16
# what tarfile, gzip, bz2 and lzma raise on a damaged archive (OSError covers gzip's BadGzipFile)
_ARCHIVE_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)
_COMPRESSED = ((b'\x1f\x8b', gzip.open), (b'BZh', bz2.open), (b'\xfd7zXZ\x00', lzma.open))


def _why(e: BaseException) -> str:
    if isinstance(e, tarfile.ReadError) and 'could not be opened' in str(e):  # one line per method tried
        return 'neither tar nor tar.gz, tar.bz2 or tar.xz'
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0][:200]}' if text else type(e).__name__


def unpacked_size(path: str) -> int:
    """The bytes a (compressed) tar archive unpacks to, decompressed once in 64 KiB pieces to its end, where
    gzip checks its CRC-32 and length (bz2 its block CRCs, xz its check): a damaged stream is refused here,
    before any member is trusted, and one that unpacks to more than MAX_ARCHIVE is refused as soon as it does,
    holding no more than a piece in memory."""
    with open(path, 'rb') as f:
        magic = f.read(6)
    opener = next((o for m, o in _COMPRESSED if magic.startswith(m)), None)
    if opener is None:
        return os.path.getsize(path)
    total = 0
    try:
        with opener(path, 'rb') as stream:
            while True:
                piece = stream.read(_CHUNK)
                if not piece:
                    return total
                total += len(piece)
                if total > MAX_ARCHIVE:
                    raise TrainError(f'{path}: unpacks to more than {MAX_ARCHIVE:,} bytes, more than a CIFAR '
                                     f'archive holds')
    except _ARCHIVE_ERRORS as e:
        raise TrainError(f'{path}: damaged archive ({_why(e)})') from None


class _Files:
    """Read members of an extracted CIFAR directory or of the downloaded .tar.gz, by base name. A member is read
    only after the archive's checksum is verified (unpacked_size) and only when its declared size is within the
    archive's real unpacked size and MAX_MEMBER; a file of an extracted directory only up to MAX_MEMBER."""

    def __init__(self, path: str, candidates: Sequence[str]):
        self.path, self.tar, self.names = path, None, {}
        if os.path.isfile(path):
            unpacked = unpacked_size(path)
            try:
                self.tar = tarfile.open(path)
                members = self.tar.getmembers()  # reads the whole archive: a cut one fails here
            except _ARCHIVE_ERRORS as e:
                raise TrainError(f'{path}: not a readable tar archive ({_why(e)})') from None
            for m in members:
                if m.isfile():
                    if m.offset_data + m.size > unpacked:
                        raise TrainError(f'{path}: member {m.name[:100]} declares {m.size:,} bytes at offset '
                                         f'{m.offset_data:,}, past the archive\'s {unpacked:,} unpacked bytes')
                    self.names.setdefault(os.path.basename(m.name), m)
        elif os.path.isdir(path):
            for d in [path] + [os.path.join(path, c) for c in candidates]:
                if os.path.isdir(d):
                    for f in os.listdir(d):
                        if os.path.isfile(os.path.join(d, f)):
                            self.names.setdefault(f, os.path.join(d, f))
        else:
            raise TrainError(f'{path}: no such file or directory')

    def has(self, name: str) -> bool:
        return name in self.names

    def where(self, name: str) -> str:
        return f'{self.path}: {name}'

    def read(self, name: str) -> bytes:
        if name not in self.names:
            raise TrainError(f'{self.where(name)} not found')
        ref = self.names[name]
        size = ref.size if self.tar else os.path.getsize(ref)
        if size > MAX_MEMBER:
            raise TrainError(f'{self.where(name)} is {size:,} bytes, more than a CIFAR file holds '
                             f'({MAX_MEMBER:,} at most)')
        try:
            if self.tar:
                raw = self.tar.extractfile(ref).read(size)
            else:
                with open(ref, 'rb') as f:   # (read(n) allocates n bytes up front: n is the real size)
                    raw = f.read(size + 1)
        except _ARCHIVE_ERRORS as e:
            raise TrainError(f'{self.where(name)} does not read ({_why(e)})') from None
        if len(raw) != size:   # a file that grew or a member cut short
            raise TrainError(f'{self.where(name)} does not read ({len(raw):,} bytes, {size:,} declared)')
        return raw


def _records(raw: bytes, label_bytes: int, where: str):
    size = label_bytes + 3072
    if len(raw) % size:
        raise TrainError(f'{where}: {len(raw)} bytes is not a whole number of {size}-byte CIFAR records')
    rec = np.frombuffer(raw, np.uint8).reshape(-1, size)
    return rec[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, label_bytes - 1].astype(np.int32)


def _names(raw: bytes) -> List[str]:
    return [line.strip() for line in raw.decode('utf-8', 'replace').splitlines() if line.strip()]


def cifar(path: str, which: str) -> Dataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from the binary or the python version; test split = validation."""
    ten = which == 'cifar10'
    dirs = ('cifar-10-batches-bin', 'cifar-10-batches-py') if ten else ('cifar-100-binary', 'cifar-100-python')
    files = _Files(path, dirs)
    bin_train = [f'data_batch_{i}.bin' for i in range(1, 6)] if ten else ['train.bin']
    py_train = [f'data_batch_{i}' for i in range(1, 6)] if ten else ['train']
    if all(files.has(n) for n in bin_train):
        label_bytes = 1 if ten else 2  # CIFAR-100 records are <coarse><fine><pixels>
        parts = [_records(files.read(n), label_bytes, files.where(n)) for n in bin_train + ['test_batch.bin' if ten else 'test.bin']]
        names = _names(files.read('batches.meta.txt' if ten else 'fine_label_names.txt'))
        split = [parts[:-1], parts[-1:]]
    elif all(files.has(n) for n in py_train):
        label_key = 'labels' if ten else 'fine_labels'
        split = [[_py_batch(files.read(n), label_key, files.where(n)) for n in names_]
                 for names_ in (py_train, ['test_batch' if ten else 'test'])]
        meta_name, names_key = ('batches.meta', 'label_names') if ten else ('meta', 'fine_label_names')
        names = meta_names(files.read(meta_name), names_key, files.where(meta_name))
    else:
        raise TrainError(f'{path}: no {which} archive here (expected the binary or python version: '
                         f'{dirs[0]}/ or {dirs[1]}/, extracted or as the downloaded .tar.gz)')
    tr, va = (ArraySource(np.concatenate([x for x, _ in s]), np.concatenate([y for _, y in s])) for s in split)
    n = len(names)
    for src in (tr, va):
        if len(src) and (src.labels.min() < 0 or src.labels.max() >= n):
            raise TrainError(f'{path}: label {int(src.labels.max())} outside the {n} class names')
    return Dataset(which, names, tr, va, os.path.abspath(path))


def _text_keys(d, where: str):
    if not isinstance(d, dict):
        raise TrainError(f'{where}: not a CIFAR python batch (a {type(d).__name__}, not a dict)')
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def meta_names(raw: bytes, key: str, where: str) -> List[str]:
    names = _text_keys(safe_unpickle(raw, where), where).get(key)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, (bytes, str)) for n in names):
        raise TrainError(f'{where}: not a CIFAR meta file (no list of {key})')
    return [n.decode('utf-8', 'replace') if isinstance(n, bytes) else n for n in names]


def _py_batch(raw: bytes, label_key: str, where: str):
    d = _text_keys(safe_unpickle(raw, where), where)
    try:
        data = np.asarray(d['data'], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        labels = np.asarray(d[label_key], np.int32).reshape(-1)
    except (KeyError, ValueError, TypeError, OverflowError) as e:
        raise TrainError(f'{where}: not a CIFAR python batch ({type(e).__name__}: {e})') from None
    if len(labels) != len(data):
        raise TrainError(f'{where}: {len(data)} images but {len(labels)} labels')
    return data, labels


# ---------------------------------------------------------------- a pickle reader that runs no code

def safe_unpickle(raw: bytes, where: str = 'pickle'):
    """Unpickle plain data only (dicts, lists, tuples, bytes, str, numbers, numeric numpy arrays), with the
    project's one restricted unpickler (converters.formats.restricted_pickle: the stream is walked first, absurd
    memo indices refused, then any global other than numpy's array rebuilding is refused before anything runs:
    the CIFAR python batches need nothing more). `encoding='bytes'` reads the Python 2 originals."""
    try:
        return restricted_pickle.load_plain(raw, encoding='bytes')
    except restricted_pickle.Malformed as e:
        raise TrainError(f'{where}: not a readable pickle ({e})') from None
    except ConversionError as e:
        raise TrainError(f'{where}: {e}') from None


# ---------------------------------------------------------------- choosing a data set

def load(name: str, path: Optional[str], val_split: float, image_column: str = 'image',
         label_column: str = 'label', verify: str = 'sha256') -> Dataset:
    """The data set `--dataset name --data-path path` names. 'packed' (or a folder holding a dataset.json):
    ArrayRecord shards (`vit_train.records`), checked against their manifest first (`verify`: sha256 or size);
    'hf': a datasets folder or Parquet files with `image_column` and `label_column`."""
    from . import records
    if name == 'digits':
        return digits(val_split)
    if not path:
        raise TrainError(f'--dataset {name} needs --data-path')
    if records.is_url(path) and name in ('folder', 'packed'):   # a pod reads shards, not a bucket of JPEGs
        if name == 'folder' and not records.has_manifest(path):
            records.read_manifest(path)   # (its one line: no dataset.json, no file system for the scheme, ...)
        name = 'packed'
    elif records.is_url(path):
        raise TrainError(f'--data-path {path}: --dataset {name} reads a local path; pack it (vit-flax data pack '
                         f'SRC DST) and pass the packed folder, which may be a URL')
    if name == 'packed' or (name == 'folder' and records.has_manifest(path)):
        names, tr, va, m = records.load_packed(path, verify)
        return Dataset('packed', names, tr, va, path if records.is_url(path) else os.path.abspath(path))
    if name == 'hf':
        names, tr, va = records.load_hf(path, image_column, label_column, val_split)
        return Dataset('hf', names, tr, va, os.path.abspath(path))
    if name == 'folder':
        return folder(os.path.abspath(path), val_split)
    return cifar(path, name)


# ---------------------------------------------------------------- transforms

def _pil(name: str):
    from PIL import Image
    return {'nearest': Image.NEAREST, 'bilinear': Image.BILINEAR, 'bicubic': Image.BICUBIC,
            'lanczos': Image.LANCZOS}[name]


def random_resized_crop(h: int, w: int, scale, ratio, rng: np.random.Generator):
    """(top, left, height, width) of an Inception-style crop: area fraction in `scale`, log-uniform aspect
    ratio in `ratio`, ten tries, then the largest centred crop within the ratio range."""
    area = h * w
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(*log_ratio)))
        cw, ch = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


_WARNED = set()  # unreadable files already reported by this process
_WARNED_LOCK = threading.Lock()  # the pipeline's reader threads share the set


def first_report(path: str, warned_dir: Optional[str] = None) -> bool:
    """True the first time `path` is reported as unreadable: in this process and, with `warned_dir` (a directory
    the run shares with its grain worker processes, which have sets of their own), in any of them: its marker
    file there is created exclusively, so exactly one process wins."""
    with _WARNED_LOCK:
        if path in _WARNED:
            return False
        _WARNED.add(path)
    if warned_dir is None:
        return True
    try:
        os.close(os.open(os.path.join(warned_dir, hashlib.sha1(path.encode()).hexdigest()),
                         os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:  # no marker can be written: warn once per process rather than not at all
        pass
    return True



def _read_bytes(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()

class _Transform:
    """Decode (or take) the image, then `self.image(...)`; unreadable images become weight-0 zeros, each file
    warned about once per process, or once per run with `warned_dir` (see `first_report`)."""

    def __init__(self, size: int, interpolation: str, warned_dir: Optional[str] = None):
        self.size, self.interpolation, self.warned_dir = size, interpolation, warned_dir

    def _open(self, rec):
        from PIL import Image
        if 'image' in rec:
            return Image.fromarray(rec['image'])
        if 'bad' in rec:   # a packed record that does not parse (vit_train.records)
            if first_report(rec['bad'], self.warned_dir):
                print(f'warning: skipped unreadable record {rec["bad"]}', file=sys.stderr)
            return None
        # a file, or a packed record's / Parquet row's encoded bytes: decoded alike, the same pixels
        name = rec['name'] if 'encoded' in rec else rec['path']
        try:
            # decoded from memory: Pillow's chunk reads ask a file object for the length a chunk declares, and
            # a buffered file allocates that much before finding the file shorter (make fuzz: a 440-byte PNG
            # took 67 MB); a BytesIO returns what it holds
            raw = rec['encoded'] if 'encoded' in rec else _read_bytes(rec['path'])
            with Image.open(io.BytesIO(raw)) as im:
                check_declared_size(im, name, len(raw))   # before decoding allocates what the header declares
                im.load()
                return im.convert('RGB') if im.mode != 'RGB' else im.copy()
        except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
            if first_report(name, self.warned_dir):
                print(f'warning: skipped unreadable image {name} ({type(e).__name__}: {e})', file=sys.stderr)
            return None

    def _out(self, img, label, weight=1.0, unreadable=0):
        if img is None:
            arr = np.zeros((self.size, self.size, 3), np.uint8)
        else:
            arr = np.asarray(img.convert('RGB') if img.mode != 'RGB' else img, np.uint8)
        return {'image': arr, 'label': np.int32(label), 'weight': np.float32(weight),
                'unreadable': np.int32(unreadable)}

    def apply(self, rec, rng):
        if rec.get('pad'):
            return dict(self._out(None, 0, weight=0.0), **self.no_extras())
        img = self._open(rec)
        if img is None:
            return dict(self._out(None, rec['label'], weight=0.0, unreadable=1), **self.no_extras())
        img = self.image(img, rng)
        img, extras = img if isinstance(img, tuple) else (img, {})  # (image, per-element arrays such as boxes)
        return dict(self._out(img, rec['label']), **extras)

    def no_extras(self) -> dict:
        """The per-element arrays `image` adds, as they are for a padding or unreadable row."""
        return {}


class TrainTransform(_Transform):
    """RandomResizedCrop(size, scale) + horizontal flip (p=0.5), as WZMIAOMIAO's training transform, then
    `augment` (a `vit_train.augment.TrainAugment`: the --aa policy, or --color-jitter without one, and
    --reprob's erasing boxes), in timm's create_transform(is_training=True) order; normalisation and the
    erasing fill happen on the device. With erasing each element also carries 'erase' (int32 (recount, 4)
    boxes) and 'erase_seed' (uint32)."""

    def __init__(self, size, interpolation, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=True, warned_dir=None,
                 augment=None):
        super().__init__(size, interpolation, warned_dir)
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.augment = augment if augment is not None and augment.active else None

    def no_extras(self):
        if self.augment is None or not self.augment.reprob:
            return {}
        return dict(erase=np.zeros((self.augment.recount, 4), np.int32), erase_seed=np.uint32(0))

    def image(self, img, rng):
        from PIL import Image
        top, left, ch, cw = random_resized_crop(img.height, img.width, self.scale, self.ratio, rng)
        img = img.resize((self.size, self.size), _pil(self.interpolation), box=(left, top, left + cw, top + ch))
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if self.augment is not None:
            return self.augment(img, rng)
        return img

    def __call__(self, rec, rng):  # grain's random_map signature
        return self.apply(rec, rng)


class EvalTransform(_Transform):
    """timm's eval resize and crop (`converters.preprocess.resize_and_crop`, the one `predict` uses): the
    short side to int(size / crop_pct), then CenterCrop(size); WZMIAOMIAO's Resize(256) + CenterCrop(224) is
    crop_pct 0.875 (timm's `crop_mode='center'`). Normalisation happens on the device."""

    def __init__(self, size, interpolation, crop_pct=0.875, warned_dir=None):
        super().__init__(size, interpolation, warned_dir)
        self.crop_pct = crop_pct

    def image(self, img, rng=None):
        return resize_and_crop(img, dict(input_size=(3, self.size, self.size), crop_pct=self.crop_pct,
                                         crop_mode='center', interpolation=self.interpolation))

    def __call__(self, rec):  # grain's map signature
        return self.apply(rec, None)


# ---------------------------------------------------------------- the grain pipeline

def _grain():
    import grain
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags; we do not use absl.app
        flags.FLAGS.mark_as_parsed()
    return grain


def _ignore_sigint(worker_index: int, worker_count: int) -> None:
    """Ctrl-C reaches the whole process group: the main process stops the run (and these workers with it);
    a worker must not print a KeyboardInterrupt traceback of its own."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class RepeatEach:
    """Each element of a grain MapDataset `repeats` times in a row (timm's RepeatAugSampler order: an image's
    copies are neighbours, each augmented on its own by the random map downstream). Epoch-aware as grain's own
    datasets: index e * len + i reads the parent's epoch e (e * parent_len + i // repeats)."""

    @staticmethod
    def make(parent, repeats: int):
        grain = _grain()

        class _RepeatEach(grain.MapDataset):
            def __init__(self, parent, repeats):
                super().__init__(parent)
                self._repeats, self._plen = repeats, len(parent)

            def __len__(self):
                return self._plen * self._repeats

            def __str__(self):
                return f'RepeatEach({self._repeats})'

            def __getitem__(self, index):
                if isinstance(index, slice):
                    return self.slice(index)
                epoch, i = divmod(index, self._plen * self._repeats)
                return self._parent[epoch * self._plen + i // self._repeats]

        return _RepeatEach(parent, repeats)


def train_iterator(source, transform: TrainTransform, *, batch: int, seed: int, process_index: int,
                   process_count: int, workers: int = 0, start_step: int = 0, aug_repeats: int = 0,
                   read_ahead: Optional[int] = None):
    """An endless grain iterator of this process's share of each global training batch.

    Each epoch is a fresh shuffle (grain reshuffles per epoch) cut to whole global batches; global batch k
    is the shuffled positions [k*batch, (k+1)*batch) and process p yields rows [p*b, (p+1)*b) of it
    (b = batch / process_count), so any number of processes sees the same global batches in the same
    order. Augmentation is seeded by the element's position, so it is the same too. `start_step` skips
    ahead without reading (the iterator state, restored instead, does the same).

    `aug_repeats` > 1 (timm's --aug-repeats, RepeatAugSampler): each epoch's shuffle has every image repeated
    that many times in a row, each copy augmented independently, and is cut to the same whole batches as
    without repeats (the epoch length is kept, so an epoch sees about len/aug_repeats distinct images). The
    batch is a multiple of aug_repeats (config checks), so an image's copies share one global batch, as the
    copies timm's sampler deals out to the ranks do.

    The slice to this process's batches comes last and grain's MapDataset is lazy, so a process reads and
    decodes only its own rows (a packed set's records, a folder's files): nothing of the other processes'.
    `read_ahead`: batches grain's reader threads prepare ahead (default twice the threads; 0: none, each
    batch read when asked for)."""
    grain = _grain()
    steps_per_epoch = len(source) // batch
    if steps_per_epoch == 0:
        raise TrainError(f'{len(source)} training images are fewer than one batch of {batch}')
    local = batch // process_count
    ds = grain.MapDataset.source(source).shuffle(seed=seed % 2 ** 32)
    if aug_repeats > 1:
        ds = RepeatEach.make(ds, aug_repeats)
    ds = (ds[:steps_per_epoch * batch]
          .repeat(None).random_map(transform, seed=seed % 2 ** 32)
          .batch(local, drop_remainder=True)[process_index::process_count])
    if start_step:
        ds = ds[start_step:]
    threads = max(1, min(8, os.cpu_count() or 1))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=2 * threads if read_ahead is None else read_ahead))
    if workers:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers), worker_init_fn=_ignore_sigint)
    return iter(it)


def eval_batches(source, transform: EvalTransform, *, batch: int, process_index: int, process_count: int):
    """This process's rows of every global evaluation batch; the last batch is padded with weight-0 rows."""
    grain = _grain()
    n = -(-len(source) // batch) * batch
    local = batch // process_count
    ds = (grain.MapDataset.source(Padded(source, n)).map(transform)
          .batch(local, drop_remainder=True)[process_index::process_count])
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, min(8, os.cpu_count() or 1))))
