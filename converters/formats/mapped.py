"""Checkpoint bytes, memory-mapped and bounds-checked before anything is allocated.

Readers here never trust a size a file declares: every array's extent is checked against the bytes that
really back it (a zip member, a safetensors data section) before a view is made, so a header declaring
10^12 elements is refused with one line instead of allocated. Arrays of uncompressed members are
read-only views of one `mmap` of the file: nothing is read until used, and `release` hands the pages of
an array that has been consumed back to the kernel (the view stays valid: touching it again reads the
file), which keeps a conversion's resident memory near the size of what it has produced.
"""
import io
import json
import mmap
import os
import struct
import tokenize
import zipfile
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

import ml_dtypes
import numpy as np

from ..errors import ConversionError, first_line

_byte_bounds = getattr(getattr(np.lib, 'array_utils', np), 'byte_bounds')   # numpy 2 moved it
PAGE = mmap.PAGESIZE
CHUNK = 16 << 20
# deflate never expands more than ~1032:1; a member declaring more than that is lying about its size
DEFLATE_MAX_RATIO = 1032
SAFETENSORS_MAX_HEADER = 100 << 20   # the safetensors library's own limit
NPY_MAX_HEADER = 10000               # numpy's default max_header_size

SAFETENSORS_DTYPES = {
    'BOOL': np.dtype(np.bool_), 'U8': np.dtype(np.uint8), 'I8': np.dtype(np.int8), 'U16': np.dtype(np.uint16),
    'I16': np.dtype(np.int16), 'U32': np.dtype(np.uint32), 'I32': np.dtype(np.int32), 'U64': np.dtype(np.uint64),
    'I64': np.dtype(np.int64), 'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16),
    'F32': np.dtype(np.float32), 'F64': np.dtype(np.float64), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2)}


def machine_memory() -> int:
    try:
        return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dtype.itemsize


def check_shape(shape, where: str) -> tuple:
    """A shape numpy can hold, even empty: dimensions below 2**48 whose non-zero product stays below 2**56
    (numpy refuses (2**40, 2**40, 0) too). Whether the file backs its bytes is checked separately."""
    ok = len(shape) <= 32 and all(type(s) is int and 0 <= s < 1 << 48 for s in shape)
    if not ok or nbytes([max(s, 1) for s in shape], np.dtype(np.uint8)) >= 1 << 56:
        raise ConversionError(f'{where}: impossible shape {tuple(shape)!r}')
    return tuple(shape)


# ---------------------------------------------------------------- the mapped file and page release

class MappedFile:
    """A read-only map of a whole file; `view` makes bounds-checked array views into it."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, 'rb') as f:
                self.size = os.fstat(f.fileno()).st_size
                if self.size == 0:
                    raise ConversionError(f'{path}: empty file')
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise ConversionError(f'{path}: no such file') from None
        except IsADirectoryError:
            raise ConversionError(f'{path}: is a directory') from None
        except (OSError, ValueError) as e:   # permissions, a FIFO or device that cannot be mapped
            raise ConversionError(f'{path}: cannot read ({first_line(e)})') from None

    def bytes(self, offset: int, length: int) -> bytes:
        self.check(offset, length, 'read')
        return self.mm[offset:offset + length]

    def check(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ConversionError(f'{self.path}: {what} at bytes {offset}..{offset + length} '
                                  f'lies past the end of the file ({self.size} bytes)')

    def view(self, offset: int, dtype, shape, what: str, order: str = 'C') -> np.ndarray:
        dtype = np.dtype(dtype)
        self.check(offset, nbytes(shape, dtype), what)
        return np.ndarray(tuple(shape), dtype, buffer=self.mm, offset=offset, order=order)


class MapReader(io.RawIOBase):
    """A file object over a MappedFile whose reads never allocate more than the file holds.

    (`open(...).read(n)` allocates n bytes before reading: a pickle declaring a 2**40-byte string would
    make a library that trusts it ask for that much.)
    """

    def __init__(self, mf: MappedFile):
        super().__init__()
        self.mf, self.pos = mf, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        self.pos = max(0, {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.mf.size}[whence] + offset)
        return self.pos

    def read(self, n=-1):
        end = self.mf.size if n is None or n < 0 else min(self.mf.size, self.pos + n)
        out = self.mf.mm[self.pos:end] if self.pos < end else b''
        self.pos += len(out)
        return out

    def readinto(self, b):
        data = self.read(len(memoryview(b).cast('B')))
        memoryview(b).cast('B')[:len(data)] = data
        return len(data)

    def readline(self, limit=-1):
        end = self.mf.mm.find(b'\n', self.pos)
        end = self.mf.size if end < 0 else end + 1
        if limit is not None and limit >= 0:
            end = min(end, self.pos + limit)
        return self.read(end - self.pos)


def _mapping_of(a):
    """The mmap an array is a view of, or None (then the memory is private and must not be released)."""
    obj = a
    for _ in range(64):
        if isinstance(obj, mmap.mmap):
            return obj
        if isinstance(obj, memoryview):
            obj = obj.obj
        else:
            obj = getattr(obj, 'base', None)
        if obj is None:
            return None
    return None


def detach(a: np.ndarray) -> np.ndarray:
    """`a` itself when it owns its memory, else a private copy (and the file pages it viewed are released)."""
    if not isinstance(a, np.ndarray) or _mapping_of(a) is None:
        return a
    out = np.array(a)
    release(a)
    return out


def release(*arrays) -> None:
    """Drop the resident pages behind arrays that are views of a read-only file map.

    Only memory proven to belong to a live read-only file mapping is touched (private memory would be
    zeroed by MADV_DONTNEED); the arrays stay valid, reading them again faults the pages back in.
    """
    for a in arrays:
        if not isinstance(a, np.ndarray) or a.size == 0:
            continue
        mm = _mapping_of(a)
        if mm is None or mm.closed or not hasattr(mm, 'madvise'):
            continue
        base = np.frombuffer(mm, np.uint8).ctypes.data
        lo, hi = _byte_bounds(a)
        start = (lo - base) // PAGE * PAGE
        end = min(len(mm), -(-(hi - base) // PAGE) * PAGE)
        if 0 <= start < end:
            try:
                mm.madvise(mmap.MADV_DONTNEED, start, end - start)
            except OSError:
                pass


# ---------------------------------------------------------------- zip archives (.npz, torch files)

def not_an_archive(mf: MappedFile, error: Exception = None) -> str:
    """What a file that does not read as a zip archive is, in a user's words: cut short, a Git LFS pointer,
    an HTML page, some other text, or bytes of another kind (its first ones shown)."""
    head = mf.bytes(0, min(mf.size, 512))
    if head.startswith(b'PK\x03\x04') or head.startswith(b'PK\x05\x06'):
        if isinstance(error, zipfile.BadZipFile) and 'not a zip file' in str(error).lower():
            return (f'truncated: it begins as a zip archive, but the directory a zip file ends with is missing '
                    f'({mf.size:,} bytes; a download or copy cut short?)')
        return f'a damaged zip archive ({first_line(error)})' if error else 'a damaged zip archive'
    return what_else(mf) or f'binary data that is not a zip archive (it begins with bytes {head[:8].hex(" ")})'


def what_else(mf: MappedFile) -> Optional[str]:
    """A file that is plainly something other than a checkpoint, in words: a Git LFS pointer, an HTML page
    or other text; None for binary data."""
    head = mf.bytes(0, min(mf.size, 512))
    if head.startswith(b'version https://git-lfs'):
        return 'a Git LFS pointer, not the file itself (run `git lfs pull` where it came from, or download it)'
    if head.lstrip().lower().startswith((b'<!doctype html', b'<html')):
        return 'an HTML page, not a checkpoint (a failed or redirected download?)'
    decoded = head.decode('utf-8', errors='replace').rstrip('\ufffd')   # a character the 512 bytes cut in two
    if decoded.strip() and all(c.isprintable() or c in '\r\n\t' for c in decoded):
        return f'a text file (it begins {decoded.strip().splitlines()[0][:40]!r})'
    return None
    return f'not a zip archive (it begins with bytes {head[:8].hex(" ")})'


class ZipMember:
    """One member of a checked archive: where its data lies and how it is stored."""

    def __init__(self, info: zipfile.ZipInfo, data_offset: int):
        self.info = info
        self.name = info.filename
        self.offset = data_offset
        self.size = info.file_size
        self.stored = info.compress_type == zipfile.ZIP_STORED


class ZipArchive:
    """A zip file's members, after checking what its directory declares against the file itself.

    Refused: duplicate names, encryption, compression other than stored/deflate, local headers or data
    past the end of the file, and uncompressed sizes a member could not hold. CRCs are checked as members
    are read (`data`), so a bit flip anywhere in an archive is reported, not converted.
    """

    def __init__(self, mf: MappedFile, what: str):
        self.mf, self.path = mf, mf.path
        try:
            with zipfile.ZipFile(mf.mm) as z:   # reads the directory only; the map stays open
                infos = z.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError, struct.error,
                NotImplementedError, UnicodeDecodeError) as e:
            raise ConversionError(f'{self.path}: not a readable {what}: {not_an_archive(mf, e)}') from None
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ConversionError(f'{self.path}: the archive holds member {dup!r} twice')
        self.members: Dict[str, ZipMember] = {}
        for info in infos:
            self.members[info.filename] = self._check(info)

    def _check(self, info: zipfile.ZipInfo) -> ZipMember:
        name, path = info.filename, self.path
        if info.flag_bits & 0x1:
            raise ConversionError(f'{path}: member {name!r} is encrypted')
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ConversionError(f'{path}: member {name!r} uses unsupported compression {info.compress_type}')
        header = self.mf.bytes(info.header_offset, 30) if info.header_offset + 30 <= self.mf.size else None
        if header is None or header[:4] != b'PK\x03\x04':
            raise ConversionError(f'{path}: member {name!r}: no local header at byte {info.header_offset} '
                                  f'(truncated or corrupt archive)')
        name_len, extra_len = struct.unpack('<HH', header[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        self.mf.check(offset, info.compress_size, f'member {name!r}')
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
            raise ConversionError(f'{path}: member {name!r} is stored uncompressed but declares {info.file_size} '
                                  f'bytes in {info.compress_size}')
        if info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
            raise ConversionError(f'{path}: member {name!r} declares {info.file_size} bytes, more than '
                                  f'{info.compress_size} compressed bytes can hold')
        return ZipMember(info, offset)

    def data(self, m: ZipMember) -> np.ndarray:
        """The member's bytes as a uint8 array (a view of the map when stored), after its CRC is checked."""
        if m.stored:
            view = self.mf.view(m.offset, np.uint8, (m.size,), f'member {m.name!r}')
            crc = 0
            for lo in range(0, m.size, CHUNK):
                crc = zlib.crc32(view[lo:lo + CHUNK], crc)
            release(view)
            if crc != m.info.CRC:
                raise ConversionError(f'{self.path}: member {m.name!r} fails its CRC check (corrupt file)')
            return view
        if m.size > machine_memory():
            raise ConversionError(f'{self.path}: member {m.name!r} declares {m.size} bytes, more than this '
                                  f'machine\'s memory')
        # The output grows with what really decompresses (doubling, up to the declared size), not with what the
        # directory declares: a member declaring 1032x its compressed bytes and holding little takes little.
        out = np.empty(min(m.size, 4 * m.info.compress_size + (1 << 16)), np.uint8)
        src = self.mf.view(m.offset, np.uint8, (m.info.compress_size,), f'member {m.name!r}')
        d, got, pos, crc = zlib.decompressobj(-zlib.MAX_WBITS), 0, 0, 0
        try:
            while not d.eof:
                if d.unconsumed_tail:
                    buf = d.unconsumed_tail
                elif pos < src.size:
                    buf, pos = src[pos:pos + CHUNK], pos + CHUNK
                else:
                    break
                piece = d.decompress(buf, m.size - got + 1)
                if got + len(piece) > m.size:
                    break
                if got + len(piece) > out.size:
                    grown = np.empty(min(m.size, max(2 * out.size, got + len(piece))), np.uint8)
                    grown[:got] = out[:got]
                    out = grown
                out[got:got + len(piece)] = np.frombuffer(piece, np.uint8)
                crc = zlib.crc32(piece, crc)
                got += len(piece)
        except zlib.error as e:
            raise ConversionError(f'{self.path}: member {m.name!r} cannot be decompressed ({first_line(e)})') from None
        finally:
            release(src)
        if not d.eof or got != m.size:
            raise ConversionError(f'{self.path}: member {m.name!r} does not decompress to the {m.size} bytes '
                                  f'it declares (corrupt archive)')
        if crc != m.info.CRC:
            raise ConversionError(f'{self.path}: member {m.name!r} fails its CRC check (corrupt file)')
        return out


# ---------------------------------------------------------------- .npz

def _npy_header(buf: bytes, where: str):
    """(dtype, shape, fortran_order, header length) of the .npy bytes at the start of `buf`."""
    f = io.BytesIO(buf)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=NPY_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=NPY_MAX_HEADER)
        elif version == (3, 0):
            shape, fortran, dtype = np.lib.format._read_array_header(f, version, max_header_size=NPY_MAX_HEADER)
        else:
            raise ValueError(f'unsupported .npy version {version}')
    except (ValueError, TypeError, SyntaxError, tokenize.TokenError, RecursionError, MemoryError, EOFError,
            struct.error) as e:   # numpy's header parser: literal_eval and tokenize on untrusted text
        raise ConversionError(f'{where}: not a valid .npy header ({first_line(e)})') from None
    return dtype, shape, fortran, f.tell()


def npz_dtype(dtype: np.dtype, where: str) -> np.dtype:
    if dtype.hasobject:
        raise ConversionError(f'{where}: holds Python objects (dtype {dtype}); refused: loading them '
                              f'would unpickle code')
    if dtype.kind == 'V' and dtype.itemsize == 2 and dtype.fields is None:
        return np.dtype(ml_dtypes.bfloat16)  # numpy has no bfloat16: such arrays are saved as 2-byte void
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind == 'V':
        raise ConversionError(f'{where}: unsupported dtype {dtype} (structured or raw bytes)')
    return dtype


def read_npz(path: str) -> Dict[str, np.ndarray]:
    mf = MappedFile(path)
    if mf.bytes(0, min(6, mf.size)) == b'\x93NUMPY':
        raise ConversionError(f'{path}: a single .npy array, not an .npz archive of named arrays')
    z = ZipArchive(mf, '.npz file')
    out = {}
    for name, m in z.members.items():
        if not name.endswith('.npy'):
            raise ConversionError(f'{path}: member {name!r} is not a .npy array')
        where = f'{path}: array {name[:-4]!r}'
        data = z.data(m)
        dtype, shape, fortran, hlen = _npy_header(bytes(data[:NPY_MAX_HEADER + 64]), where)
        dtype = npz_dtype(dtype, where)
        shape = check_shape(shape, where)
        need = nbytes(shape, dtype)
        if hlen + need > m.size:
            raise ConversionError(f'{where}: declares shape {shape} {dtype} ({need} bytes), but its member '
                                  f'holds {max(m.size - hlen, 0)}')
        body = data[hlen:hlen + need]
        out[name[:-4]] = np.ndarray(shape, dtype, buffer=body, order='F' if fortran else 'C') if need else \
            np.zeros(shape, dtype)
    return out


# ---------------------------------------------------------------- .safetensors

def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f'name {next(k for k in keys if keys.count(k) > 1)!r} appears twice')
    return dict(pairs)


def read_safetensors(path: str) -> Dict[str, np.ndarray]:
    mf = MappedFile(path)
    if mf.size < 8:
        raise ConversionError(f'{path}: {mf.size} bytes, too short for a .safetensors header')
    (n,) = struct.unpack('<Q', mf.bytes(0, 8))
    if n > mf.size - 8:
        other = what_else(mf)
        if other or n > SAFETENSORS_MAX_HEADER or mf.bytes(8, 1) != b'{':
            raise ConversionError(f'{path}: not a .safetensors file: {other or "no JSON header after the length"}')
        raise ConversionError(f'{path}: truncated: the .safetensors header declares {n:,} bytes, the file holds '
                              f'{mf.size:,} (a download or copy cut short?)')
    if n > SAFETENSORS_MAX_HEADER:
        raise ConversionError(f'{path}: header length {n} is over the {SAFETENSORS_MAX_HEADER}-byte limit')
    try:
        header = json.loads(mf.bytes(8, n).decode('utf-8'), object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConversionError(f'{path}: the .safetensors header is not valid JSON ({first_line(e)})') from None
    if not isinstance(header, dict):
        raise ConversionError(f'{path}: the .safetensors header is a {type(header).__name__}, not an object')
    start, data_len = 8 + n, mf.size - 8 - n
    spans: List[Tuple[int, int, str]] = []
    out = {}
    for key, entry in header.items():
        if key == '__metadata__':
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ConversionError(f'{path}: __metadata__ must map names to strings')
            continue
        where = f'{path}: tensor {key!r}'
        if not isinstance(entry, dict) or set(entry) != {'dtype', 'shape', 'data_offsets'}:
            raise ConversionError(f'{where}: entry must hold exactly dtype, shape and data_offsets')
        dtype, shape, offsets = entry['dtype'], entry['shape'], entry['data_offsets']
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise ConversionError(f'{where}: unsupported dtype {dtype!r}')
        if not isinstance(shape, list):
            raise ConversionError(f'{where}: shape {shape!r} is not a list')
        shape = check_shape(shape, where)
        if (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] and offsets[1] > data_len):
            raise ConversionError(f'{path}: truncated: tensor {key!r} ends at byte {offsets[1]:,} of the data, the '
                                  f'file holds {data_len:,} bytes of data (a download or copy cut short?)')
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_len):
            raise ConversionError(f'{where}: data_offsets {offsets!r} lie outside the data section '
                                  f'({data_len} bytes)')
        dt = SAFETENSORS_DTYPES[dtype]
        need = nbytes(shape, dt)
        if offsets[1] - offsets[0] != need:
            raise ConversionError(f'{where}: shape {shape} {dtype} needs {need} bytes, data_offsets span '
                                  f'{offsets[1] - offsets[0]}')
        spans.append((offsets[0], offsets[1], key))
        out[key] = mf.view(start + offsets[0], dt, shape, where) if need else np.zeros(shape, dt)
    end = 0
    for lo, hi, key in sorted(spans):
        if lo != end:
            raise ConversionError(f'{path}: tensor {key!r} starts at byte {lo} of the data section, expected '
                                  f'{end} ({"overlapping" if lo < end else "a gap between"} tensors)')
        end = hi
    if end != data_len:
        raise ConversionError(f'{path}: the tensors cover {end} bytes of a {data_len}-byte data section')
    return out


def iter_chunks(a: np.ndarray) -> Iterator[np.ndarray]:
    """`a`'s bytes in C order as uint8 arrays of about CHUNK bytes (a strided array is copied a block at a time)."""
    if a.ndim == 0 or a.size == 0:
        if a.size:
            yield np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        return
    row = max(a[0].nbytes, 1)
    step = max(CHUNK // row, 1)
    for lo in range(0, a.shape[0], step):
        yield np.ascontiguousarray(a[lo:lo + step]).reshape(-1).view(np.uint8)
