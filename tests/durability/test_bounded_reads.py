"""Allocation bounded by what exists (issue 40): a few bytes that declare a size never make a reader allocate it.

Each case is a file that once made (or could make) a reader allocate far more than the file justifies; the
reader must refuse it in one line naming the file, with a tracemalloc peak under 1 MB + 4x the file's size.
"""
import ast
import gzip
import io
import os
import pickle
import struct
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest

from durability import fuzzing as fz
from converters.errors import ConversionError
from converters.formats import restricted_pickle, torch_pickle
from vit_train import data
from vit_train.errors import TrainError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def peak_of(fn, *args):
    """(result or the exception raised, tracemalloc's peak in bytes)."""
    tracemalloc.start()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - the caller asserts which
        out = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out, peak


def bound(path) -> int:
    return (1 << 20) + 4 * os.path.getsize(path)


def flipped_cifar() -> bytes:
    """The issue's file: the fuzzer's valid CIFAR-10 archive with bit 6 of byte 242 flipped (45,882 bytes):
    data_batch_1's opcode becomes LONG_BINPUT 139143180 (and the gzip CRC no longer matches)."""
    out = bytearray(fz.valid_cifar())
    out[242] ^= 1 << 6
    return bytes(out)


def test_the_issue_archive_with_one_flipped_bit_is_refused_before_anything_is_unpickled(tmp_path):
    path = tmp_path / 'cifar-10-python.tar.gz'
    path.write_bytes(flipped_cifar())
    assert 40_000 < os.path.getsize(path) < 50_000
    err, peak = peak_of(data.cifar, str(path), 'cifar10')
    assert isinstance(err, TrainError), err
    assert str(err) == f'{path}: damaged archive (BadGzipFile: CRC check failed 0xd3542dfb != 0xa718fbe7)'
    assert peak < bound(path), peak   # was 2,226,597,144 bytes


def test_a_lying_memo_index_is_refused_by_the_walk_even_when_the_archive_is_not_compressed(tmp_path):
    """The same damaged stream with no CRC to catch it: a plain tar (and an extracted directory)."""
    blob = flipped_cifar()
    assert blob[3] == 0   # no optional gzip header fields: the deflate stream starts at byte 10
    raw = zlib.decompressobj(-15).decompress(blob[10:])   # gzip's payload, its CRC not checked
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        members = {os.path.basename(m.name): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    path = tmp_path / 'cifar.tar'
    path.write_bytes(fz.tar_bytes(members, 'w'))
    err, peak = peak_of(data.cifar, str(path), 'cifar10')
    assert isinstance(err, TrainError) and str(err) == \
        f'{path}: data_batch_1: not a readable pickle (memo index 139143180 at opcode 32)', err
    assert peak < bound(path), peak
    folder = tmp_path / 'x' / fz.CIFAR_DIR
    folder.mkdir(parents=True)
    for name, blob in members.items():
        (folder / name).write_bytes(blob)
    err, peak = peak_of(data.cifar, str(tmp_path / 'x'), 'cifar10')
    assert isinstance(err, TrainError) and 'memo index 139143180' in str(err), err
    assert peak < bound(folder / 'data_batch_1'), peak


def test_an_archive_that_unpacks_past_the_cap_is_refused_as_it_unpacks(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'MAX_ARCHIVE', 4 << 20)
    path = tmp_path / 'bomb.tar.gz'
    path.write_bytes(gzip.compress(bytes(64 << 20)))   # 64 MB of zeros in ~65 KB
    err, peak = peak_of(data.cifar, str(path), 'cifar10')
    assert isinstance(err, TrainError) and str(err) == \
        f'{path}: unpacks to more than 4,194,304 bytes, more than a CIFAR archive holds', err
    assert peak < bound(path), peak


def test_a_member_larger_than_the_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(data, 'MAX_MEMBER', 1000)
    path = tmp_path / 'c.tar'
    path.write_bytes(fz.valid_cifar())
    with pytest.raises(TrainError, match=r'c\.tar: data_batch_1 is \d,\d{3} bytes, more than a CIFAR file holds '
                                         r'\(1,000 at most\)$'):
        data.cifar(str(path), 'cifar10')


def test_the_caps_hold_the_real_archives():
    """CIFAR-10's python archive unpacks to ~178 MB, CIFAR-100's to ~161 MB, the binary ones to ~184 MB;
    the largest member is CIFAR-100's train batch (50,000 x 3,072 pixel bytes + labels and names)."""
    assert 184_440_000 < data.MAX_ARCHIVE <= 220_000_000
    assert 50_000 * 3074 < data.MAX_MEMBER < data.MAX_ARCHIVE


@pytest.mark.parametrize('op', [b'r' + struct.pack('<I', 139143180), b'j' + struct.pack('<I', 139143180), b'p139143180\n', b'g139143180\n'])
def test_every_memo_opcode_with_an_absurd_index_is_refused_by_both_readers(op, tmp_path):
    """LONG_BINPUT / LONG_BINGET / PUT / GET: the plain loader and torch's loader share the walk."""
    blob = b'\x80\x02]' + op + b'.'
    err, peak = peak_of(restricted_pickle.load_plain, blob)
    assert isinstance(err, restricted_pickle.Malformed) and 'memo index 139143180' in str(err), err
    assert peak < 1 << 20
    members, prefix = fz.torch_zip_members(fz._written('.pth'))
    path = tmp_path / 'm.pth'
    path.write_bytes(fz.zip_bytes(fz._replace(members, prefix + 'data.pkl', blob)))
    err, peak = peak_of(fz.formats.read_torch, str(path))
    assert isinstance(err, ConversionError) and 'memo index 139143180' in str(err), err
    assert peak < bound(path), peak


def test_plain_pickles_read_and_code_never_runs(tmp_path):
    marker = tmp_path / 'ran'
    arrays = {b'data': np.arange(12, dtype=np.uint8).reshape(2, 6), b'f': np.array([1.5, -2], '>f8')}
    got = restricted_pickle.load_plain(pickle.dumps(arrays, protocol=2))
    np.testing.assert_array_equal(got[b'data'], arrays[b'data'])
    np.testing.assert_array_equal(got[b'f'], [1.5, -2])
    got = restricted_pickle.load_plain(pickle.dumps(arrays, protocol=5))
    np.testing.assert_array_equal(got[b'data'], arrays[b'data'])

    class Evil:
        def __reduce__(self):
            return os.system, (f'touch {marker}',)
    with pytest.raises(restricted_pickle.Refused, match=r'refused to load (posix|os|nt)\.system'):
        restricted_pickle.load_plain(pickle.dumps([Evil()], protocol=2))
    # an array whose shape asks for more than its bytes: refused before anything is allocated
    lie = pickle.dumps(np.zeros(4, np.uint8), protocol=2).replace(b'K\x04\x85', b'J\x00\x00\x00\x40\x85')
    with pytest.raises(restricted_pickle.Malformed, match='does not match its 4 bytes'):
        restricted_pickle.load_plain(lie)
    assert not marker.exists()


def test_there_is_one_restricted_unpickler():
    """No module subclasses pickle.Unpickler but restricted_pickle; torch's loader and the CIFAR reader use it."""
    subclasses = []
    for pkg in ('vit_flax', 'converters', 'vit_train', 'vit_flax_cli'):
        for root, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith('.py'):
                    tree = ast.parse(open(os.path.join(root, f)).read())
                    subclasses += [os.path.relpath(os.path.join(root, f), ROOT) for n in ast.walk(tree)
                                   if isinstance(n, ast.ClassDef)
                                   and any(ast.unparse(b) in ('pickle.Unpickler', 'Unpickler') for b in n.bases)]
    assert subclasses == ['converters/formats/restricted_pickle.py'], subclasses
    assert issubclass(torch_pickle._Unpickler, restricted_pickle.RestrictedUnpickler)


# ---------------------------------------------------------------- the other readers (issue 40, part 2)

def test_a_deflated_member_declaring_1000x_its_bytes_takes_what_it_holds_not_what_it_declares(tmp_path):
    """zip (npz, torch): a member may declare up to deflate's 1032:1 of its compressed bytes; the output
    buffer grows with what really decompresses, so a lie costs what the file holds, not 1000x it."""
    body = np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8)   # incompressible
    buf = io.BytesIO()
    np.savez_compressed(buf, a=body)
    blob = bytearray(buf.getvalue())
    lie = 100_000_000
    # the central directory's uncompressed size of the one member (and its local header's): 100 MB
    cd = blob.rindex(b'PK\x01\x02')
    blob[cd + 24:cd + 28] = struct.pack('<I', lie)
    blob[22:26] = struct.pack('<I', lie)
    path = tmp_path / 'lie.npz'
    path.write_bytes(bytes(blob))
    err, peak = peak_of(fz.formats.read_npz, str(path))
    assert isinstance(err, ConversionError) and str(err) == \
        f"{path}: member 'a.npy' does not decompress to the {lie} bytes it declares (corrupt archive)", err
    assert peak < bound(path), peak   # was 100 MB
    # an honest member compressed 1000:1 still reads
    path = tmp_path / 'zeros.npz'
    np.savez_compressed(path, a=np.zeros(4_000_000, np.uint8))
    assert fz.formats.read_npz(str(path))['a'].sum() == 0


def test_a_legacy_torch_file_declaring_storages_larger_than_itself_is_refused_before_torch_allocates(tmp_path,
                                                                                                     monkeypatch):
    """torch's legacy loader allocates each storage at its declared size before reading it: a 19 KB file
    declaring 2e9 floats had it ask for 8 GB (tracemalloc cannot see torch's allocator: torch.load must
    not be reached at all)."""
    import torch
    buf = io.BytesIO()
    torch.save({'w': torch.arange(4660, dtype=torch.float32)}, buf, _use_new_zipfile_serialization=False)
    valid = buf.getvalue()
    i = valid.index(b'M\x34\x12N')   # BININT2 4660 then None: the storage's element count in its persistent id
    path = tmp_path / 'legacy.pth'
    path.write_bytes(valid[:i] + b'J' + struct.pack('<i', 2_000_000_000) + valid[i + 3:])
    monkeypatch.setattr(torch, 'load', lambda *a, **k: pytest.fail('torch.load reached'))
    with pytest.raises(ConversionError, match=r'legacy\.pth: its pickle declares 8,000,000,000 bytes of storages, '
                                              r'the file holds 18,\d{3} after it \(corrupt or truncated'):
        fz.formats.read_torch(str(path))
    monkeypatch.undo()
    path.write_bytes(valid)
    np.testing.assert_array_equal(fz.formats.read_torch(str(path))['w'], np.arange(4660, dtype=np.float32))


def test_orbax_metadata_declaring_more_than_its_files_can_hold_is_refused_before_tensorstore_allocates(
        tmp_path, monkeypatch):
    """tensorstore allocates what the metadata declares: a few KB of checkpoint declaring 16 GB of arrays
    (under a 24 GB machine's memory, the one check there was) is refused; an all-zero array, which orbax's
    zstd packs ~18,000:1, still reads."""
    import jax
    import orbax.checkpoint as ocp
    from converters.formats import orbax as orbax_format
    path = tmp_path / 'zeros'
    fz.formats.write_orbax({'a/kernel': np.zeros((2048, 2048), np.float32)}, str(path))
    assert orbax_format.directory_bytes(str(path)) < 8 * 2048 * 2048 // 1000
    assert fz.formats.read_orbax(str(path))['a/kernel'].shape == (2048, 2048)
    real = ocp.PyTreeCheckpointer.metadata

    def lying(self, p):   # the metadata a flipped shape in the array's zarr.json would give
        meta = real(self, p)
        meta = getattr(getattr(meta, 'item_metadata', None), 'tree', None) or meta
        return jax.tree_util.tree_map(
            lambda m: type('M', (), {'shape': (1 << 20, 1 << 12), 'dtype': np.dtype(np.float32)})(), meta)
    monkeypatch.setattr(ocp.PyTreeCheckpointer, 'metadata', lying)
    monkeypatch.setattr(fz.formats.mapped, 'machine_memory', lambda: 24 << 30)
    monkeypatch.setattr(ocp.PyTreeCheckpointer, 'restore', lambda *a, **k: pytest.fail('restore reached'))
    with pytest.raises(ConversionError, match=r'zeros: the metadata declares 17,179,869,184 bytes of arrays, more '
                                              r'than its [\d,]+ bytes on disk can hold \(32768:1 at most'):
        fz.formats.read_orbax(str(path))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB and whose data is a few hundred bytes of zeros."""
    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0))
            + chunk(b'IDAT', zlib.compress(bytes(30000))) + chunk(b'IEND', b''))


def test_an_image_declaring_more_than_its_bytes_can_hold_is_not_decoded(tmp_path):
    """Pillow allocates the declared image before it decodes: a 440-byte PNG took 33.5 MB in the trainer's
    decoding (make fuzz). Refused for predict in one line; a weight-0 unreadable row for the trainer."""
    from converters import preprocess
    from converters.formats import images
    path = tmp_path / 'big.png'
    path.write_bytes(_png_declaring(4000, 4000))
    cfg = preprocess.resolve(None, type('M', (), {'input_shape': (8, 8, 3)})(), 'cfg')
    peak_of(preprocess.load_image, str(path), cfg)   # (Pillow's plugins imported outside the measure)
    err, peak = peak_of(preprocess.load_image, str(path), cfg)
    assert isinstance(err, ConversionError) and str(err) == (
        f'{path}: declares a 4000x4000 image (48,000,000 bytes decoded) in {os.path.getsize(path)} bytes of file: '
        f'more than any image format packs (corrupt header?)'), err
    assert peak < bound(path), peak
    peak_of(fz.read_image, str(path))
    row, peak = peak_of(fz.read_image, str(path))
    assert int(row['unreadable']) == 1 and float(row['weight']) == 0, row
    assert peak < bound(path), peak
    # an honest image compressed as far as PNG goes (all black) still reads
    from PIL import Image
    black = tmp_path / 'black.png'
    Image.new('RGB', (3000, 3000)).save(black)
    assert 3000 * 3000 * 3 > images.MAX_RATIO * os.path.getsize(black) / 10   # packed > 825:1
    assert preprocess.load_image(str(black), cfg).shape == (8, 8, 3)


def test_a_configuration_the_model_refuses_at_setup_is_one_line_naming_the_file(tmp_path):
    """make fuzz: an npz whose arrays make detection pick a distilled ViT with global_pool 'avg' ended in
    the model's own message (no file named) from `convert`."""
    from converters.families import vit as vit_family
    from helpers import cli
    _, flat = fz.tiny()
    arrays = dict(vit_family.flax_to_npz(flat, 'released'))
    arrays['Transformer/encoder_norm/bias'] = np.array(0.0, np.float32)
    arrays['foo'] = arrays.pop('cls')
    arrays['dist'] = np.array(0.0, np.float32)
    src = tmp_path / 'case.npz'
    np.savez(src, **arrays)
    r = cli('convert', src, tmp_path / 'o.npz')
    errors = [line for line in r.stderr.splitlines() if line.startswith('vit-flax: error: ')]
    assert r.returncode == 1 and errors == [r.stderr.strip().splitlines()[-1]], r.stderr
    assert errors[0] == f'vit-flax: error: {src}: a distilled model reads the class and distillation tokens: ' \
                        f'global_pool must be token', r.stderr
    assert os.listdir(tmp_path) == ['case.npz']


def test_an_image_chunk_declaring_more_bytes_than_the_file_holds_is_not_allocated(tmp_path):
    """Pillow reads a PNG chunk by asking the file object for its declared length, and a buffered file
    allocates that length before finding the file shorter: make fuzz's 440-byte PNG (IDAT declaring 64 MiB)
    took 67 MB in the trainer's decoding. Images are decoded from their bytes in memory, which hold what
    the file holds."""
    from PIL import Image
    from converters import preprocess
    buf = io.BytesIO()
    Image.new('RGB', (10, 12), (200, 30, 40)).save(buf, 'PNG')
    png = bytearray(buf.getvalue())
    at = png.index(b'IDAT') - 4
    png[at:at + 4] = struct.pack('>I', 67109247)   # the fuzzed file's IDAT length
    path = tmp_path / 'lying.png'
    path.write_bytes(bytes(png))
    peak_of(fz.read_image, str(path))   # (Pillow's plugins imported outside the measure)
    row, peak = peak_of(fz.read_image, str(path))   # Pillow decodes what the chunk really holds
    assert row['image'].shape == (8, 8, 3) and peak < bound(path), peak
    cfg = preprocess.resolve(None, type('M', (), {'input_shape': (8, 8, 3)})(), 'cfg')
    peak_of(preprocess.load_image, str(path), cfg)
    out, peak = peak_of(preprocess.load_image, str(path), cfg)
    assert (isinstance(out, ConversionError) and str(path) in str(out)) or out.shape == (8, 8, 3), out
    assert peak < bound(path), peak
