"""The fuzz harness for the checkpoint readers and the `vit-flax` command (hypothesis).

Two tables say what is fuzzed:
- READERS: name -> Reader(ext, read, valid, mutations). `read(path)` is the function under test,
  `valid()` the bytes of a small good file (a tiny ViT written by the project or by torch itself),
  `mutations` the generators that turn those bytes into bad ones.
- MUTATIONS: name -> generator `(draw, valid: bytes) -> bytes` (`draw` is hypothesis' `data.draw`).
Every case must end in a ConversionError whose message is one line naming the file, or in a read whose
arrays the file's bytes can back; anything else fails and hypothesis shrinks it to a minimal file:
another exception type, an allocation bigger than the file justifies (traced with tracemalloc), or code
run from a pickle (a marker file that must never appear).

The training data readers are READERS too: CIFAR archives (`cifar`, the trainer's TrainError standing for
ConversionError) and image decoding (`image-jpeg`, `image-png`: never an error, an unreadable row instead).

To fuzz a new reader: add `READERS['x'] = Reader('.x', read_x, valid_x, GENERIC + ('x_lies',))` and, if
it has a structure worth lying about, a generator in MUTATIONS. A new command goes in COMMANDS
(test_fuzz.py runs every command over mutants of every reader, in-process and in a subprocess).

Profiles (env VIT_FLAX_FUZZ): `ci` (default, `make test`: derandomized, each reader x mutation a few
examples) and `long` (`make fuzz`: random, failures kept in .hypothesis/ to replay): every file reader
`target()` examples (10,000; $VIT_FLAX_FUZZ_TARGET), its mutation drawn per example, and the directory
readers (orbax, training checkpoints) `dir_target()` (1,000; $VIT_FLAX_FUZZ_DIR_TARGET). Cases tried and
cases failed are counted per reader (COUNTS, FAILURES) and added to $VIT_FLAX_FUZZ_COUNTS (JSON; several
pytest-xdist workers add to it under a lock) when that is set; `python tests/durability/fuzz_table.py FILE`
prints it as a table.

Cost: a case is a mutation made in this process and a read in this process (a few ms for the file
readers; each example's CPU time is charged to its reader, `charge`, and the table prints examples per CPU
second); the registry search that detection makes (~0.1 s) is shared between mutants that declare the same
architecture (`memo_match_model`); real processes are kept to the few cases that need one.
"""
import atexit
import io
import json
import os
import pickle
import shutil
import struct
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import ml_dtypes
import numpy as np
import torch  # noqa: F401  (imported here, not inside a traced read: its import is not the reader's allocation)
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from converters import pipeline, formats, sources
from converters.errors import ConversionError

PROFILE = os.environ.get('VIT_FLAX_FUZZ', 'ci')
SCALE = {'ci': 1, 'long': 25}[PROFILE]
_common = dict(deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)
settings.register_profile('ci', derandomize=True, database=None, **_common)
settings.register_profile('long', **_common)
settings.load_profile(PROFILE)

COUNTS: Counter = Counter()
FAILURES: Counter = Counter()
CPU: Counter = Counter()   # this process' CPU seconds per reader: whole examples (mutation, read, checks)
WORKDIR = tempfile.mkdtemp(prefix='vit-flax-fuzz-')
atexit.register(shutil.rmtree, WORKDIR, ignore_errors=True)   # every process that imports this file makes one
MARKER = os.path.join(WORKDIR, 'PICKLE-CODE-RAN')
ALLOC_SLACK = 32 << 20


def examples(n: int) -> int:
    return n * SCALE


def target() -> int:
    """Examples per file reader in the long profile (make fuzz)."""
    return int(os.environ.get('VIT_FLAX_FUZZ_TARGET', '10000'))


def dir_target() -> int:
    """Examples per directory reader (orbax, training checkpoints) in the long profile."""
    return int(os.environ.get('VIT_FLAX_FUZZ_DIR_TARGET', '1000'))


LONG = PROFILE == 'long'


# ---------------------------------------------------------------- the tiny model and its valid files

TINY = dict(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2, mlp_ratio=2.0, num_classes=3)
TINY_NAME = 'vit_tiny_patch16_224'
_cache: Dict[str, object] = {}


def tiny():
    """(model, flat Flax params with every value perturbed) of a 1-block ViT of 1083 parameters."""
    if 'tiny' not in _cache:
        import vit_flax
        from flax.traverse_util import flatten_dict
        from vit_flax.summary import param_shapes
        model = vit_flax.create_model(TINY_NAME, **TINY)
        rng = np.random.default_rng(0)
        flat = {k: rng.standard_normal(v.shape).astype(np.float32)
                for k, v in flatten_dict(param_shapes(model), sep='/').items()}
        _cache['tiny'] = model, flat
    return _cache['tiny']


def _written(ext: str, **kw) -> bytes:
    key = ext + repr(sorted(kw.items()))
    if key not in _cache:
        model, flat = tiny()
        os.makedirs(WORKDIR, exist_ok=True)   # (test_fuzz.py removes it when its module ends)
        path = os.path.join(WORKDIR, f'valid{len(_cache)}{ext}')
        pipeline.write_flat(flat, model, path, force=True, **kw)
        with open(path, 'rb') as f:
            _cache[key] = f.read()
        os.remove(path)
    return _cache[key]


def torch_state():
    model, flat = tiny()
    return pipeline.to_torch_state(flat, model)


def valid_torch_by_torch() -> bytes:
    """A timm-layout file written by torch itself, wrapped as training scripts do, with non-tensor extras."""
    if 'torch' not in _cache:
        import argparse
        import torch
        sd = {k: torch.from_numpy(np.array(v)) for k, v in torch_state().items()}
        buf = io.BytesIO()
        torch.save({'model': sd, 'epoch': 3, 'args': argparse.Namespace(lr=0.1)}, buf)
        _cache['torch'] = buf.getvalue()
    return _cache['torch']


def valid_legacy_torch() -> bytes:
    if 'legacy' not in _cache:
        import torch
        buf = io.BytesIO()
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in torch_state().items()}, buf,
                   _use_new_zipfile_serialization=False)
        _cache['legacy'] = buf.getvalue()
        torch.load(io.BytesIO(_cache['legacy']), weights_only=True)   # torch's first load builds caches (~30 MB)
    return _cache['legacy']


# ---------------------------------------------------------------- generic mutations (any format)

def m_empty(draw, valid):
    return b''


def m_truncate(draw, valid):
    return valid[:draw(st.integers(0, len(valid) - 1))]


def m_bitflip(draw, valid):
    out = bytearray(valid)
    # half the flips land in the first 4 KiB, where the headers and most of the structure live
    for _ in range(draw(st.integers(1, 8))):
        hi = len(out) - 1 if draw(st.booleans()) else min(len(out) - 1, 4095)
        i = draw(st.integers(0, hi))
        out[i] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def m_random(draw, valid):
    return draw(st.binary(max_size=4096))


def m_splice(draw, valid):
    a = draw(st.integers(0, len(valid)))
    b = draw(st.integers(a, min(len(valid), a + 256)))
    return valid[:a] + draw(st.binary(max_size=64)) + valid[b:]


def m_magic_then_random(draw, valid):
    return valid[:draw(st.integers(1, 64))] + draw(st.binary(max_size=2048))


GENERIC = ('empty', 'truncate', 'bitflip', 'random', 'splice', 'magic_then_random')


# ---------------------------------------------------------------- zip archives (npz, torch)

def zip_bytes(members, compress=zipfile.ZIP_STORED) -> bytes:
    """An archive of (name, bytes) members, duplicates allowed (zipfile warns, then writes them)."""
    import warnings
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with zipfile.ZipFile(buf, 'w', compress) as z:
            for name, data in members:
                z.writestr(name, data)
    return buf.getvalue()


def unzip(data: bytes):
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def patch_zip_sizes(data: bytes, index: int, usize=None, csize=None, offset=None, flags=None, method=None) -> bytes:
    """Overwrite fields of the index-th central-directory entry (and its local header): the archive lies."""
    out = bytearray(data)
    pos = -1
    for _ in range(index + 1):
        pos = out.find(b'PK\x01\x02', pos + 1)
        if pos < 0:
            return bytes(out)
    local = struct.unpack_from('<I', out, pos + 42)[0]
    for value, cd_off, lh_off, fmt in ((flags, 8, 6, '<H'), (method, 10, 8, '<H'), (csize, 20, 18, '<I'),
                                       (usize, 24, 22, '<I'), (offset, 42, None, '<I')):
        if value is None:
            continue
        struct.pack_into(fmt, out, pos + cd_off, value)
        if lh_off is not None and out[local:local + 4] == b'PK\x03\x04':
            struct.pack_into(fmt, out, local + lh_off, value)
    return bytes(out)


def m_zip_lies(draw, valid):
    """Archives whose directory lies: sizes, offsets, methods, flags, duplicate or foreign members."""
    members = unzip(valid)
    kind = draw(st.sampled_from(['usize', 'csize', 'offset', 'flags', 'method', 'duplicate', 'extra_member',
                                 'drop_member', 'deflate', 'deflate_lie']))
    i = draw(st.integers(0, len(members) - 1))
    big = draw(st.sampled_from([0, 1, 2 ** 31, 2 ** 32 - 2, 10 ** 9]))
    if kind == 'usize':
        return patch_zip_sizes(valid, i, usize=big)
    if kind == 'csize':
        return patch_zip_sizes(valid, i, csize=big)
    if kind == 'offset':
        return patch_zip_sizes(valid, i, offset=draw(st.sampled_from([0, 1, len(valid), big])))
    if kind == 'flags':
        return patch_zip_sizes(valid, i, flags=draw(st.sampled_from([1, 8, 0xFFFF])))
    if kind == 'method':
        return patch_zip_sizes(valid, i, method=draw(st.sampled_from([1, 12, 14, 99])))
    if kind == 'duplicate':
        return zip_bytes(members + [(members[i][0], draw(st.sampled_from([members[i][1], b'', b'x' * 10])))])
    if kind == 'extra_member':
        name = draw(st.sampled_from(['readme.txt', 'x.npy', '../evil.npy', 'a/b/c.npy', 'data.pkl', '']))
        return zip_bytes(members + [(name or 'noname', draw(st.binary(max_size=256)))])
    if kind == 'drop_member':
        return zip_bytes(members[:i] + members[i + 1:])
    if kind == 'deflate':
        return zip_bytes(members, zipfile.ZIP_DEFLATED)
    deflated = zip_bytes(members, zipfile.ZIP_DEFLATED)
    return patch_zip_sizes(deflated, i, usize=draw(st.sampled_from([2 ** 32 - 2, 10 ** 9, 1, 0])))


# ---------------------------------------------------------------- .npz

_NPZ_DTYPES = ['f4', 'f2', 'f8', 'bf16', 'i4', 'i8', 'u1', '?', 'c8', 'c16', '<U3', 'S2', 'V4', '>f4', 'O']


def _np_array(draw, shape, dtype):
    n = int(np.prod(shape))
    if dtype == 'O':
        return np.array([_Evil()] * max(n, 1), dtype=object)[:n].reshape(shape)
    if dtype == 'bf16':
        return np.asarray(draw(st.lists(st.floats(width=32), min_size=n, max_size=n)), np.float32) \
            .astype(ml_dtypes.bfloat16).reshape(shape)
    dt = np.dtype(dtype)
    if dt.kind in 'US':
        return np.full(shape, 'ab', dt)
    if dt.kind == 'V':
        return np.zeros(shape, dt)
    if dt.kind in 'fc':
        vals = draw(st.lists(st.sampled_from([0.0, 1.5, -2.0, np.nan, np.inf, -np.inf]), min_size=n, max_size=n))
        return np.asarray(vals, np.float64).astype(dt).reshape(shape)
    return np.ones(shape, dt)


def npz_bytes(arrays) -> bytes:
    members = []
    for k, v in arrays:
        m = io.BytesIO()
        np.lib.format.write_array(m, np.asarray(v), allow_pickle=True)   # object arrays pickle _Evil
        members.append((k + '.npy', m.getvalue()))
    return zip_bytes(members)


def m_npz_arrays(draw, valid):
    """The tiny ViT's arrays with keys renamed or dropped, ranks, dtypes and values changed, arrays added."""
    _, flat = tiny()
    from converters.families import vit as vit_family
    arrays = list(vit_family.flax_to_npz(flat, 'released').items())
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(arrays) - 1))
        k, v = arrays[i]
        what = draw(st.sampled_from(['rank', 'dtype', 'rename', 'drop', 'add', 'nonfinite', 'shape']))
        if what == 'rank':
            arrays[i] = (k, v.reshape(v.shape + (1,)) if draw(st.booleans()) or not v.size else v.reshape(-1)[0])
        elif what == 'dtype':
            dt = draw(st.sampled_from(_NPZ_DTYPES))
            arrays[i] = (k, _np_array(draw, v.shape if v.size < 64 else (2,), dt))
        elif what == 'rename':
            arrays[i] = (draw(st.sampled_from(['foo', 'embedding/kernel', 'cls', 'params/cls', 'Transformer',
                                               'head/kernel/x', 'pos_embedding', 'a' * 300, 'é/ü'])), v)
        elif what == 'drop':
            del arrays[i]
        elif what == 'add':
            shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
            arrays.append((draw(st.sampled_from(['x', 'Transformer/encoderblock_1/LayerNorm_0/scale', 'dist',
                                                 'head_dist/kernel', 'pre_logits/kernel'])),
                           _np_array(draw, shape, draw(st.sampled_from(_NPZ_DTYPES)))))
        elif what == 'nonfinite':
            w = np.array(v, np.float32) if v.dtype.kind in 'fiub' else np.ones(v.shape, np.float32)
            if w.size:
                w.reshape(-1)[draw(st.integers(0, w.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
            arrays[i] = (k, w)
        else:
            arrays[i] = (k, np.zeros(tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=3))), np.float32))
        if not arrays:
            break
    return npz_bytes(arrays)


def npy_header(shape, descr='<f4', fortran=False, version=1) -> bytes:
    d = repr({'descr': descr, 'fortran_order': fortran, 'shape': shape}).encode('latin1')
    if version == 1:
        pad = -(10 + len(d) + 1) % 64
        return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(d) + pad + 1) + d + b' ' * pad + b'\n'
    pad = -(12 + len(d) + 1) % 64
    return b'\x93NUMPY\x02\x00' + struct.pack('<I', len(d) + pad + 1) + d + b' ' * pad + b'\n'


def m_npy_header_lies(draw, valid):
    """Members whose .npy header declares shapes the data cannot back (10^12 elements...), bad headers."""
    members = unzip(valid)
    i = draw(st.integers(0, len(members) - 1))
    name, data = members[i]
    kind = draw(st.sampled_from(['huge', 'overflow', 'negative', 'descr', 'syntax', 'long', 'fortran', 'v2', 'zero']))
    body = data[128:] if len(data) > 128 else b''
    if kind == 'huge':
        hdr = npy_header(draw(st.sampled_from([(10 ** 12,), (10 ** 6, 10 ** 6), (2 ** 40, 4), (4, 2 ** 31)])))
    elif kind == 'overflow':
        hdr = npy_header((2 ** 62, 2 ** 62, 2 ** 62))
    elif kind == 'negative':
        hdr = npy_header((-1, 4))
    elif kind == 'descr':
        hdr = npy_header((2,), descr=draw(st.sampled_from(['|O', '<f16', 'xyz', '<U1000000', "[('a','<f4')]", '|V8'])))
    elif kind == 'syntax':
        hdr = b'\x93NUMPY\x01\x00' + struct.pack('<H', 40) + draw(st.sampled_from(
            [b'{' * 39 + b'\n', b"{'descr': '<f4'" + b' ' * 24 + b'\n', b'(' * 39 + b'\n', b'x' * 39 + b'\n']))
    elif kind == 'long':
        hdr = b'\x93NUMPY\x02\x00' + struct.pack('<I', draw(st.sampled_from([2 ** 31, 10 ** 6, 20000])))
    elif kind == 'fortran':
        hdr = npy_header((3, 4), fortran=True)
    elif kind == 'v2':
        hdr = npy_header((len(body) // 4,), version=2)
    else:
        hdr = npy_header(draw(st.sampled_from([(0, 10 ** 18), (2 ** 40, 2 ** 40, 0), (0, 2 ** 30, 2 ** 30)])))
    members[i] = (name, hdr + body)
    return zip_bytes(members)


# ---------------------------------------------------------------- .safetensors

def st_bytes(header, data: bytes, length=None) -> bytes:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack('<Q', len(blob) if length is None else length) + blob + data


def m_safetensors_lies(draw, valid):
    """Headers that lie: offsets past the end or overlapping, huge shapes, unknown dtypes, bad JSON..."""
    (n,) = struct.unpack('<Q', valid[:8])
    header, data = json.loads(valid[8:8 + n]), valid[8 + n:]
    names = [k for k in header if k != '__metadata__']
    k = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(['offsets', 'overlap', 'shape', 'dtype', 'fields', 'metadata', 'length', 'json',
                                 'deep', 'not_object', 'duplicate', 'gap', 'trailing']))
    if kind == 'offsets':
        header[k]['data_offsets'] = draw(st.sampled_from([[0, len(data) + 4], [len(data), len(data) + 8], [8, 4],
                                                          [-4, 4], [0, 2 ** 64], ['0', '4'], [0], [0.0, 4.0]]))
    elif kind == 'overlap':
        other = draw(st.sampled_from(names))
        header[k]['data_offsets'] = list(header[other]['data_offsets'])
    elif kind == 'shape':
        header[k]['shape'] = draw(st.sampled_from([[10 ** 12], [10 ** 6, 10 ** 6], [2 ** 64], [-1], [1.5], 'abc',
                                                   [True], [], [0], [2 ** 62, 2 ** 62]]))
    elif kind == 'dtype':
        header[k]['dtype'] = draw(st.sampled_from(['F128', 'f32', '', 'C64', 'STR', 7, None, 'F8_E4M3']))
    elif kind == 'fields':
        header[k] = draw(st.sampled_from([{}, {'dtype': 'F32'}, [], 'x', {**header[k], 'extra': 1}]))
    elif kind == 'metadata':
        header['__metadata__'] = draw(st.sampled_from([[], 'x', {'a': 1}, None]))
    elif kind == 'length':
        return st_bytes(header, data, draw(st.sampled_from([2 ** 63, 2 ** 64 - 1, n + 10 ** 6, 0, 1, n - 1])))
    elif kind == 'json':
        return st_bytes(draw(st.binary(max_size=64)) + b' ' * 8, data)
    elif kind == 'deep':
        return st_bytes(b'[' * 100000 + b']' * 100000, data)
    elif kind == 'not_object':
        return st_bytes(draw(st.sampled_from([b'[]', b'1', b'"x"', b'null'])), data)
    elif kind == 'duplicate':
        blob = json.dumps(header).encode()
        entry = json.dumps({k: header[k]})[1:-1].encode()
        return st_bytes(blob[:-1] + b', ' + entry + b'}', data)
    elif kind == 'gap':
        return st_bytes(header, data + b'\0' * 8)
    else:
        data = data[:-draw(st.integers(1, min(len(data), 64)))]
    return st_bytes(header, data)


# ---------------------------------------------------------------- torch files

class _Evil:
    """Pickles to a call that would create the marker file if anything ever ran it."""

    def __init__(self, how='system'):
        self.how = how

    def __reduce__(self):
        if self.how == 'system':
            return os.system, (f'touch {MARKER}',)
        if self.how == 'open':
            return open, (MARKER, 'w')
        if self.how == 'exec':
            return exec, (f'open({MARKER!r}, "w")',)
        if self.how == 'eval':
            return eval, (f'open({MARKER!r}, "w")',)
        import subprocess
        return subprocess.call, (['touch', MARKER],)


def _raw_evil_pickles():
    """Hand-made pickles reaching code through each opcode that can call: REDUCE, INST, OBJ, NEWOBJ, BUILD."""
    cmd = f'touch {MARKER}'.encode()
    return [b"cos\nsystem\n(S'" + cmd + b"'\ntR.",                       # GLOBAL + REDUCE, protocol 0
            b"(S'" + cmd + b"'\nios\nsystem\n.",                          # INST
            b"(cos\nsystem\nS'" + cmd + b"'\no.",                         # OBJ
            b"\x80\x04\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(cmd)]) + cmd + b"\x85R.",  # STACK_GLOBAL
            b"\x80\x02csubprocess\nPopen\n)\x81}b.",                        # NEWOBJ then BUILD
            b"\x80\x02cbuiltins\ngetattr\ncos\nsystem\n\x85R."]           # getattr games


def torch_zip_members(valid: bytes):
    members = unzip(valid)
    prefix = next(n for n, _ in members if n.endswith('/data.pkl'))[:-len('data.pkl')]
    return members, prefix


def _replace(members, name, data):
    return [(n, data if n == name else d) for n, d in members]


def m_torch_records(draw, valid):
    """A torch zip whose storage records are the wrong size, missing, renamed; byteorder or data.pkl broken."""
    members, prefix = torch_zip_members(valid)
    records = [n for n, _ in members if n.startswith(prefix + 'data/')]
    r = draw(st.sampled_from(records))
    data = dict(members)[r]
    kind = draw(st.sampled_from(['short', 'long', 'empty', 'drop', 'rename', 'byteorder', 'no_pkl', 'two_pkl',
                                 'pkl_truncated', 'pkl_bitflip']))
    if kind == 'short':
        return zip_bytes(_replace(members, r, data[:draw(st.integers(0, max(len(data) - 1, 0)))]))
    if kind == 'long':
        return zip_bytes(_replace(members, r, data + bytes(draw(st.integers(1, 64)))))
    if kind == 'empty':
        return zip_bytes(_replace(members, r, b''))
    if kind == 'drop':
        return zip_bytes([(n, d) for n, d in members if n != r])
    if kind == 'rename':
        return zip_bytes([(n + 'x' if n == r else n, d) for n, d in members])
    if kind == 'byteorder':
        return zip_bytes(_replace(members, prefix + 'byteorder', draw(st.sampled_from([b'big', b'junk', b'']))))
    pkl = prefix + 'data.pkl'
    if kind == 'no_pkl':
        return zip_bytes([(n, d) for n, d in members if n != pkl])
    if kind == 'two_pkl':
        return zip_bytes(members + [('other/data.pkl', dict(members)[pkl])])
    p = dict(members)[pkl]
    if kind == 'pkl_truncated':
        return zip_bytes(_replace(members, pkl, p[:draw(st.integers(0, len(p) - 1))]))
    return zip_bytes(_replace(members, pkl, m_bitflip(draw, p)))


def m_torch_evil(draw, valid):
    """data.pkl replaced by pickles that try to run code (the marker file must never appear)."""
    members, prefix = torch_zip_members(valid)
    if draw(st.booleans()):
        p = draw(st.sampled_from(_raw_evil_pickles()))
    else:
        evil = _Evil(draw(st.sampled_from(['system', 'open', 'exec', 'eval', 'subprocess'])))
        obj = draw(st.sampled_from([evil, {'model': evil}, {'blocks.0.x': evil, 'epoch': 1},
                                    {'model': {'a': [1, {'b': evil}]}}, {evil: 1}]))
        p = pickle.dumps(obj, protocol=draw(st.sampled_from([0, 1, 2, 4, 5])))
    return zip_bytes(_replace(members, prefix + 'data.pkl', p))


def m_torch_pickle_garbage(draw, valid):
    """data.pkl made of random opcodes, absurd memo indices, frames and lengths."""
    members, prefix = torch_zip_members(valid)
    kind = draw(st.sampled_from(['random', 'memo', 'frame', 'bytes8', 'bytearray8', 'persid', 'deep', 'ext',
                                 'globals']))
    if kind == 'random':
        p = b'\x80\x02' + draw(st.binary(max_size=512))
    elif kind == 'memo':
        p = b'\x80\x02N' + b'r' + struct.pack('<I', draw(st.sampled_from([2 ** 26, 2 ** 30, 2 ** 32 - 1]))) + b'.'
    elif kind == 'frame':
        p = b'\x80\x04\x95' + struct.pack('<Q', 2 ** 40) + b'N.'
    elif kind == 'bytes8':
        p = b'\x80\x04\x8e' + struct.pack('<Q', 2 ** 40) + b'xx.'
    elif kind == 'bytearray8':
        p = b'\x80\x05\x96' + struct.pack('<Q', 2 ** 33) + b'xx.'
    elif kind == 'persid':
        pid = draw(st.sampled_from([('storage',), ('storage', 1, '0', 'cpu', 5), ('x', 1, 2, 3, 4),
                                    ('storage', None, 0, 'cpu', -1)]))
        p = b'\x80\x02' + pickle.dumps(pid, protocol=2)[2:-1] + b'Q.'
    elif kind == 'deep':
        p = b'\x80\x02' + b']' * 100000 + b'.'
    elif kind == 'globals':   # a stand-in class per distinct unknown global: a bounded number
        p = b'\x80\x02(' + b''.join(b'cm%d\nx\n' % i for i in range(draw(st.sampled_from([10, 5000])))) + b'l.'
    else:
        p = b'\x80\x02\x82\x01.'
    return zip_bytes(_replace(members, prefix + 'data.pkl', p))


def m_torch_objects(draw, valid):
    """Real torch.save files of odd but legal state: dtypes, views, shared storages, extras, wrappers."""
    import torch
    sd = {}
    for i in range(draw(st.integers(1, 5))):
        dt = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int8, torch.bool, torch.complex64, torch.uint8]))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        t = (torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) * 0.5).to(dt)
        view = draw(st.sampled_from(['plain', 'T', 'slice', 'expand', 'param']))
        if view == 'T' and t.ndim >= 2:
            t = t.permute(*reversed(range(t.ndim)))   # what .T does, which torch deprecates beyond 2-D
        elif view == 'slice' and t.ndim >= 1 and t.shape[0] > 1:
            t = t[1:]
        elif view == 'expand' and t.ndim == 1 and t.numel() == 1:
            t = t.expand(3)
        elif view == 'param' and dt.is_floating_point:
            t = torch.nn.Parameter(t)
        sd[f'k{i}'] = t
    extras = draw(st.sampled_from([{}, {'epoch': 3}, {'cfg': {'a': [1, 2]}}, {'name': 'x', 'f': 1.5}]))
    wrap = draw(st.sampled_from([None, 'model', 'state_dict', 'module']))
    obj = {**({wrap: sd} if wrap else sd), **extras}
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=draw(st.booleans()))
    _cache['last_torch_objects'] = sd
    return buf.getvalue()


# ---------------------------------------------------------------- orbax directories (mutated on disk)

def orbax_valid_dir(path: str) -> None:
    model, flat = tiny()
    formats.write_orbax(flat, path, force=True)


def mutate_dir(draw, path: str) -> None:
    """Delete, truncate, flip, empty or replace one file (or delete a folder) of an orbax checkpoint."""
    import shutil
    files = sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    dirs = sorted(os.path.join(r, d) for r, ds, _ in os.walk(path) for d in ds)
    kind = draw(st.sampled_from(['delete', 'truncate', 'bitflip', 'empty', 'random', 'rmdir', 'json']))
    if kind == 'rmdir' and dirs:
        shutil.rmtree(draw(st.sampled_from(dirs)))
        return
    f = draw(st.sampled_from(files))
    if kind == 'delete':
        os.remove(f)
        return
    with open(f, 'rb') as fh:
        data = fh.read()
    if kind == 'truncate':
        data = data[:draw(st.integers(0, max(len(data) - 1, 0)))]
    elif kind == 'bitflip' and data:
        data = m_bitflip(draw, data)
    elif kind == 'empty':
        data = b''
    elif kind == 'json':   # JSON of the wrong shape, for _METADATA above all
        data = draw(st.sampled_from([b'{}', b'[]', b'null', b'{"tree_metadata": 1}', b'{', b'"x"',
                                     b'{"tree_metadata": {"x": 1}}', b'{"tree_metadata": {"a": {"key_metadata": 5}}}',
                                     b'{"tree_metadata": {"a": {"key_metadata": [{"key": 1, "key_type": 9}]}}}',
                                     b'{"tree_metadata": {}, "use_zarr3": 5}']))
    else:
        data = draw(st.binary(max_size=512))
    with open(f, 'wb') as fh:
        fh.write(data)


# ---------------------------------------------------------------- timm model folders and images

LABELS = ['a', 'b', 'c']


def model_folder_valid(path: str) -> None:
    """A timm model folder of the tiny model (config.json + model.safetensors), as `convert --format timm-folder`."""
    from converters import preprocess
    model, flat = tiny()
    cfg, _ = preprocess.default_config(model, TINY_NAME, 'npz')
    pipeline.write_model_folder(flat, model, TINY_NAME, path, pretrained_cfg=cfg, class_names=LABELS, force=True,
                           log=lambda msg: None)


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.integers(-2, 40),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
                  st.lists(st.integers(-3, 2 ** 40), max_size=4), st.lists(st.floats(), max_size=4),
                  st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                  st.sampled_from(['vit_base_patch16_224', 'swin_tiny_patch4_window7_224', 'vit_tiny_patch16_224.x',
                                   'lucid_vit_tiny', 'resnet50', 'avg', 'token', 'map', 'bicubic', 'border', '']))
_CONFIG_KEYS = {
    None: ('architecture', 'num_classes', 'num_features', 'label_names', 'labels', 'model_args', 'pretrained_cfg'),
    'model_args': ('img_size', 'patch_size', 'depth', 'num_classes', 'embed_dim', 'num_heads', 'global_pool',
                   'mlp_ratio', 'qkv_bias', 'class_token', 'act_layer', 'window_size', 'in_chans', 'posemb'),
    'pretrained_cfg': ('input_size', 'crop_pct', 'crop_mode', 'interpolation', 'mean', 'std', 'label_names'),
}


def m_config_lies(draw, valid):
    """A timm config.json whose fields lie: wrong names and types, absurd sizes, missing keys."""
    cfg = json.loads(valid)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(sorted(_CONFIG_KEYS, key=str)))
        d = cfg if where is None else cfg.get(where)
        if not isinstance(d, dict):
            continue
        k = draw(st.sampled_from(_CONFIG_KEYS[where]))
        if draw(st.integers(0, 3)) == 0:
            d.pop(k, None)
        else:
            d[k] = draw(_JUNK)
    return json.dumps(cfg).encode()


def valid_image(fmt: str = 'PNG') -> bytes:
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


MUTATIONS: Dict[str, Callable] = {
    'empty': m_empty, 'truncate': m_truncate, 'bitflip': m_bitflip, 'random': m_random, 'splice': m_splice,
    'magic_then_random': m_magic_then_random, 'zip_lies': m_zip_lies, 'npz_arrays': m_npz_arrays,
    'npy_header_lies': m_npy_header_lies, 'safetensors_lies': m_safetensors_lies,
    'torch_records': m_torch_records, 'torch_evil': m_torch_evil, 'torch_pickle_garbage': m_torch_pickle_garbage,
    'torch_objects': m_torch_objects, 'legacy': lambda draw, valid: m_bitflip(draw, valid_legacy_torch()),
    'legacy_truncate': lambda draw, valid: m_truncate(draw, valid_legacy_torch()),
    'config_lies': m_config_lies,
}


# ---------------------------------------------------------------- CIFAR archives (the trainer's reader)

CIFAR_DIR = 'cifar-10-batches-py'


def tar_bytes(members, mode='w:gz') -> bytes:
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, blob in members.items():
            info = tarfile.TarInfo(f'{CIFAR_DIR}/{name}')
            info.size = len(blob)
            t.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


def valid_cifar() -> bytes:
    """A CIFAR-10 python archive of 12 images, as the downloaded cifar-10-python.tar.gz lays it out."""
    rng = np.random.default_rng(0)

    def batch(n):
        return pickle.dumps({b'batch_label': b'b', b'labels': rng.integers(0, 10, n).tolist(),
                             b'data': rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                             b'filenames': [b'f.png'] * n}, protocol=2)
    members = {f'data_batch_{i}': batch(2) for i in range(1, 6)}
    members['test_batch'] = batch(2)
    members['batches.meta'] = pickle.dumps({b'label_names': [b'c%d' % i for i in range(10)],
                                            b'num_cases_per_batch': 2}, protocol=2)
    return tar_bytes(members)


def m_cifar_members(draw, valid):
    """One member of the archive lied about: code in its pickle, cut, flipped, random, the wrong kind of
    object, or missing; the archive written back compressed or plain."""
    import tarfile
    with tarfile.open(fileobj=io.BytesIO(valid)) as t:
        members = {os.path.basename(m.name): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    name = draw(st.sampled_from(sorted(members)))
    how = draw(st.sampled_from(['evil', 'truncate', 'bitflip', 'random', 'object', 'drop']))
    if how == 'evil':
        members[name] = draw(st.sampled_from(_raw_evil_pickles() + [pickle.dumps(_Evil(h), protocol=2) for h in
                                                                     ('system', 'open', 'exec', 'eval', 'call')]))
    elif how == 'drop':
        del members[name]
    elif how == 'object':
        members[name] = pickle.dumps(draw(st.sampled_from([
            [1, 2], {b'data': b'xx', b'labels': [1]}, {b'data': np.zeros((2, 3072), np.uint8), b'labels': [99, -1]},
            {b'data': np.zeros((2, 3072), np.uint8), b'labels': [[1, 2]]}, {b'label_names': 7},
            {b'data': np.zeros((3, 100), np.float64), b'labels': [1, 2, 3]}, {b'data': [b'a'], b'labels': [2 ** 70]}])),
            protocol=2)
    else:
        members[name] = MUTATIONS[how](draw, members[name])
    return tar_bytes(members, draw(st.sampled_from(['w:gz', 'w'])))


MUTATIONS['cifar_members'] = m_cifar_members


def read_cifar(path):
    """The trainer's CIFAR reader as a file reader: its bad-input error (TrainError) stands for ConversionError."""
    from vit_train import data
    from vit_train.errors import TrainError
    try:
        ds = data.cifar(path, 'cifar10')
    except TrainError as e:
        raise ConversionError(str(e)) from None
    return {'train': ds.train.images, 'val': ds.val.images}


def read_image(path):
    """The trainer's image decoding (a folder data set's file): never raises; a file it cannot decode is a
    zero image of weight 0 counted as unreadable."""
    from vit_train import data
    row = data.TrainTransform(8, 'bilinear')(data.FileSource([path], [0])[0], np.random.default_rng(0))
    assert row['image'].shape == (8, 8, 3) and int(row['unreadable']) == int(row['weight'] == 0), row
    return {k: np.asarray(v) for k, v in row.items()}


# ---------------------------------------------------------------- the table of readers

@dataclass
class Reader:
    ext: str
    read: Callable[[str], object]
    valid: Callable[[], bytes]        # None for directory formats
    mutations: Tuple[str, ...]
    examples: int = 30                # per mutation, in the ci profile


_match_memo: Dict[str, tuple] = {}


def memo_match_model(family, cfg, path, *args, **kwargs):
    """sources.match_model, memoised on everything but the path (its result is a pure function of the
    architecture a file declares; the search over the registry costs ~0.1 s, the file's parsing, which is
    what is fuzzed, milliseconds): a mutant declaring an architecture seen before gets the same model, or the
    same refusal naming its own path."""
    key = repr((family.name, sorted(cfg.items(), key=str), args, sorted(kwargs.items())))
    if key not in _match_memo:
        try:
            _match_memo[key] = ('ok', _match_model(family, cfg, '\0', *args, **kwargs))
        except ConversionError as e:
            _match_memo[key] = ('error', str(e))
    kind, value = _match_memo[key]
    if kind == 'error':
        raise ConversionError(value.replace('\0', path))
    return value


_match_model = sources.match_model


def decode(path):
    """The whole read path of `inspect`/`convert`: read, detect the layout and model, map to Flax."""
    model_name, arch = (TINY_NAME, {k: v for k, v in TINY.items() if k != 'num_classes'}) \
        if formats.file_format(path) in ('torch', 'safetensors') else (None, None)
    sources.match_model = memo_match_model   # (the name sources.read calls; pipeline's was never called)
    try:
        return pipeline.read_checkpoint(path, model_name, arch)
    finally:
        sources.match_model = _match_model


READERS: Dict[str, Reader] = {
    'npz': Reader('.npz', formats.read_npz, lambda: _written('.npz'),
                  GENERIC + ('zip_lies', 'npz_arrays', 'npy_header_lies')),
    'torch': Reader('.pth', formats.read_torch, valid_torch_by_torch,
                    GENERIC + ('zip_lies', 'torch_records', 'torch_evil', 'torch_pickle_garbage', 'torch_objects',
                               'legacy', 'legacy_truncate')),
    'safetensors': Reader('.safetensors', formats.read_safetensors, lambda: _written('.safetensors'),
                          GENERIC + ('safetensors_lies',)),
    'decode-npz': Reader('.npz', decode, lambda: _written('.npz'), ('bitflip', 'zip_lies', 'npz_arrays',
                                                                     'npy_header_lies'), examples=20),
    'decode-torch': Reader('.pth', decode, lambda: _written('.pth'), ('bitflip', 'torch_records', 'torch_objects'),
                           examples=20),
    'decode-safetensors': Reader('.safetensors', decode, lambda: _written('.safetensors'),
                                 ('bitflip', 'safetensors_lies'), examples=20),
    'cifar': Reader('.tar.gz', read_cifar, valid_cifar, GENERIC + ('cifar_members',), examples=15),
    'image-jpeg': Reader('.jpg', read_image, lambda: valid_image('JPEG'), GENERIC, examples=8),
    'image-png': Reader('.png', read_image, lambda: valid_image('PNG'), GENERIC, examples=8),
}
ORBAX_EXAMPLES = 15


# ---------------------------------------------------------------- the property

def file_size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    return os.path.getsize(path)


def check_outcome(name: str, fn, path: str, trace: bool = True):
    """Run fn(path): a ConversionError of one line naming the file, or a result; bounded allocation.

    `trace=False` for orbax: tensorstore's threads outlive a failed read, and stopping tracemalloc under
    them crashes the interpreter (its allocations are not traced anyway; its sizes are checked up front).
    """
    COUNTS[name] += 1
    try:
        return _check_outcome(name, fn, path, trace)
    except BaseException:
        FAILURES[name] += 1   # (hypothesis' shrinking replays a failure: each replay counts)
        raise


def _check_outcome(name: str, fn, path: str, trace: bool):
    size = file_size(path)
    if trace:
        tracemalloc.start()
    try:
        result = fn(path)
    except ConversionError as e:
        msg = str(e)
        assert '\n' not in msg and len(msg) < 600, msg
        assert os.path.basename(path.rstrip('/')) in msg, (path, msg)
        result = e
    finally:
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
    assert peak < ALLOC_SLACK + 4 * size, f'{name}: allocated {peak} bytes reading a {size}-byte file'
    assert not os.path.exists(MARKER), 'code in a pickle ran'
    if isinstance(result, dict):
        assert all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in result.items())
        assert not any(v.dtype.hasobject for v in result.values())
    return result


_flushed = [time.monotonic()]


def charge(name: str, since: float) -> None:
    """Add the CPU time since `since` (time.process_time(), taken when the example began) to `name`'s: the
    table's examples per CPU second, which a loaded machine's wall time hides. Every minute the counts so far
    are written (write_counts), so that a run stopped early still says how far each reader got."""
    CPU[name] += time.process_time() - since
    if time.monotonic() - _flushed[0] > 60:
        write_counts()
        _flushed[0] = time.monotonic()


def write_counts(only=None) -> None:
    """Add COUNTS and FAILURES (or their keys in `only`) to the JSON file named by $VIT_FLAX_FUZZ_COUNTS,
    {"examples": {reader: n}, "failures": {reader: n}, "cpu_seconds": {reader: s}}, under an exclusive lock (pytest-xdist's workers each
    add theirs)."""
    import fcntl
    out = os.environ.get('VIT_FLAX_FUZZ_COUNTS')
    if not out:
        return
    with open(out, 'a+') as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read()
        old = json.loads(text) if text.strip() else {}
        if not isinstance(old.get('examples'), dict):   # (an older file of plain counts)
            old = {'examples': {}, 'failures': {}}
        for table, counter in (('examples', COUNTS), ('failures', FAILURES), ('cpu_seconds', CPU)):
            old.setdefault(table, {})
            for k, v in counter.items():
                if only is None or k in only:
                    old[table][k] = old[table].get(k, 0) + v
        f.seek(0)
        f.truncate()
        json.dump(old, f, indent=1, sort_keys=True)
    for counter in (COUNTS, FAILURES, CPU):   # written: a second call must not add them again
        for k in list(counter):
            if only is None or k in only:
                del counter[k]
