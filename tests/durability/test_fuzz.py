"""Fuzzing every checkpoint reader and `vit-flax convert`/`inspect` (harness and tables: fuzzing.py).

`make test` runs bounded, derandomized examples per reader and mutation, and the failures found so far
(`test_fixed_failures_stay_fixed`, hypothesis `@example`s); `make fuzz` (VIT_FLAX_FUZZ=long) 10,000 random
examples per file reader (its mutation drawn per example), 1,000 per directory reader.
A reader added to fuzzing.READERS is fuzzed here with no change to this file. A new command goes in
COMMANDS below (argv from the mutant's path and an output stem): it then runs in-process over mutants
of every file reader, and SUBPROCESS_CASES can name it for a check in a real process.
"""
import json
import os
import shutil
import time

import numpy as np
import pytest
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

from durability import fuzzing as fz
from converters import pipeline
from converters import formats
from converters.formats.durable import PREFIX
from converters.errors import ConversionError
from helpers import cli, cli_process

# ci: each reader x mutation; long: each reader, its mutation drawn per example (one count per reader)
CASES = [(name, None) for name in fz.READERS] if fz.LONG else \
    [(name, m) for name, r in fz.READERS.items() for m in r.mutations]
_serial = iter(range(10 ** 9))


@pytest.fixture(scope='module', autouse=True)
def _report_counts():
    os.makedirs(fz.WORKDIR, exist_ok=True)   # (pytest-xdist may come back to this module on a worker)
    yield
    fz.write_counts()
    shutil.rmtree(fz.WORKDIR, ignore_errors=True)


def fresh(ext: str) -> str:
    """A new path per case: a previous case's arrays may still map the previous file."""
    return os.path.join(fz.WORKDIR, f'case{next(_serial)}{ext}')


def write(path: str, blob: bytes) -> str:
    with open(path, 'wb') as f:
        f.write(blob)
    return path


def _as_numpy(t):
    import torch
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(fz.ml_dtypes.bfloat16)
    return t.numpy()


@pytest.mark.parametrize('reader,mutation', CASES, ids=[f'{r}-{m}' if m else r for r, m in CASES])
def test_reader_refuses_or_reads(reader, mutation):
    r = fz.READERS[reader]
    valid = r.valid()

    @settings(max_examples=fz.target() if fz.LONG else fz.examples(r.examples))
    @given(st.data())
    def run(data):
        t0 = time.process_time()
        m = mutation or data.draw(st.sampled_from(r.mutations))
        path = write(fresh(r.ext), fz.MUTATIONS[m](data.draw, valid))
        result = fz.check_outcome(reader, r.read, path)
        if m == 'torch_objects' and reader == 'torch' and not isinstance(result, ConversionError):
            # a legal file must read back exactly as torch itself reads it
            expected = fz._cache['last_torch_objects']
            assert sorted(result) == sorted(expected)
            for k, t in expected.items():
                np.testing.assert_array_equal(result[k], _as_numpy(t), err_msg=k)
        os.remove(path)
        fz.charge(reader, t0)
    run()


@pytest.fixture(scope='module')
def orbax_dir():
    path = os.path.join(fz.WORKDIR, 'orbax-valid')
    fz.orbax_valid_dir(path)
    return path


@settings(max_examples=fz.dir_target() if fz.LONG else fz.ORBAX_EXAMPLES)
@given(st.data())
def test_orbax_dir_refused_or_read(orbax_dir, data):
    t0 = time.process_time()
    path = fresh('')
    shutil.copytree(orbax_dir, path)
    fz.mutate_dir(data.draw, path)
    fz.check_outcome('orbax', fz.decode, path, trace=False)
    shutil.rmtree(path)
    fz.charge('orbax', t0)


@pytest.fixture(scope='module')
def model_folder():
    path = os.path.join(fz.WORKDIR, 'folder-valid')
    fz.model_folder_valid(path)
    return path


def read_folder_and_preprocessing(path):
    """What `predict` reads of a model folder: the model, its preprocessing and class names."""
    from vit_flax_cli import predict
    ck = pipeline.read_checkpoint(path)
    return ck.model, predict.data_config(ck, ck.model), predict.class_names(ck, ck.model)


def check_folder_read(model, pre, names):
    """A read folder is consistent: the weights' 2x2 patch grid (8 px, patches of 4), three classes, and
    preprocessing at the model's input size, which is timm's: `timm.create_model(architecture, **model_args)`
    takes `model_args.img_size` over `pretrained_cfg.input_size` (`kwargs.setdefault`), so a config.json
    saying img_size=9 over 8-px weights (the same 2x2 grid: 9 // 4 = 2) is a 9-px model in timm too, on which
    timm's own data config (8 px, from pretrained_cfg) then fails; ours preprocesses at 9 and says so."""
    from vit_flax.models.layers import to_tuple
    assert len(names) == 3
    assert tuple(model.grid_size) == (2, 2), model.grid_size
    assert pre['input_size'] == [3, *to_tuple(model.img_size, 2)], (pre, model.img_size)


@settings(max_examples=fz.target() if fz.LONG else 40)
@given(st.data())
def test_model_folder_config_refused_or_read(model_folder, data):
    """config.json that lies (and mangled bytes): one line naming the folder, or a consistent read."""
    t0 = time.process_time()
    path = fresh('')
    shutil.copytree(model_folder, path)
    cfg = os.path.join(path, 'config.json')
    with open(cfg, 'rb') as f:
        valid = f.read()
    mutation = data.draw(st.sampled_from(fz.GENERIC + ('config_lies',)))
    write(cfg, fz.MUTATIONS[mutation](data.draw, valid))
    result = fz.check_outcome('timm-folder', read_folder_and_preprocessing, path)
    if not isinstance(result, ConversionError):
        model, (pre, _), (names, _) = result
        check_folder_read(model, pre, names)
    shutil.rmtree(path)
    fz.charge('timm-folder', t0)


@pytest.mark.parametrize('fmt', ['PNG', 'JPEG', 'GIF'])
def test_image_refused_or_read(fmt):
    """predict's image input: a one-line error naming the file, or the model's input array."""
    from converters import preprocess
    cfg = preprocess.resolve(None, type('M', (), {'input_shape': (8, 8, 3)})(), 'cfg')
    valid = fz.valid_image(fmt)

    @settings(max_examples=fz.target() if fz.LONG else 25)
    @given(st.data())
    def run(data):
        t0 = time.process_time()
        path = write(fresh('.' + fmt.lower()), fz.MUTATIONS[data.draw(st.sampled_from(fz.GENERIC))](data.draw, valid))
        # (no allocation bound: a few bytes may declare a large image; Pillow's own limit applies)
        result = fz.check_outcome(f'image-{fmt}', lambda p: preprocess.load_image(p, cfg), path, trace=False)
        if not isinstance(result, ConversionError):
            assert result.shape == (8, 8, 3) and result.dtype == np.float32
        os.remove(path)
        fz.charge(f'image-{fmt}', t0)
    run()


def test_valid_files_read_back_exactly(orbax_dir):
    """The harness' base files are good: what the mutations start from reads, and reads right."""
    model, flat = fz.tiny()
    for name in ('npz', 'torch', 'safetensors'):
        r = fz.READERS[name]
        assert isinstance(fz.check_outcome(name, r.read, write(fresh(r.ext), r.valid())), dict)
    for r in (fz.READERS['decode-npz'], fz.READERS['decode-torch'], fz.READERS['decode-safetensors']):
        ck = fz.decode(write(fresh(r.ext), r.valid()))
        assert sorted(ck.flat) == sorted(flat)
        for k in flat:
            np.testing.assert_array_equal(ck.flat[k], flat[k])
    ck = fz.decode(orbax_dir)
    np.testing.assert_array_equal(ck.flat['head/kernel'], flat['head/kernel'])
    r = fz.READERS['cifar']
    assert fz.check_outcome('cifar', r.read, write(fresh(r.ext), r.valid()))['train'].shape == (10, 32, 32, 3)
    for name in ('image-jpeg', 'image-png'):
        r = fz.READERS[name]
        assert fz.check_outcome(name, r.read, write(fresh(r.ext), r.valid()))['unreadable'] == 0


# ---------------------------------------------------------------- the command, in-process and for real

COMMANDS = {
    'inspect': lambda src, out: ['inspect', src],
    'convert-npz': lambda src, out: ['convert', src, out + '.npz'],
    'convert-pth': lambda src, out: ['convert', src, out + '.pth'],
    'convert-safetensors': lambda src, out: ['convert', src, out + '.safetensors'],
    'convert-orbax': lambda src, out: ['convert', src, out],
    'convert-timm-folder': lambda src, out: ['convert', src, out, '--format', 'timm-folder'],
    'predict': lambda src, out: ['predict', src, image_file()],
}


def image_file() -> str:
    path = os.path.join(fz.WORKDIR, 'image.png')
    if not os.path.exists(path):
        write(path, fz.valid_image())
    return path
FILE_READERS = ('npz', 'torch', 'safetensors')


def outputs_left(folder: str, out: str):
    return [n for n in os.listdir(folder) if n.startswith(os.path.basename(out)) or n.startswith(PREFIX)]


def check_command_result(rc: int, stderr: str, argv, src: str, out: str):
    """0 with a readable output, or 1 with one line naming the file and nothing written."""
    folder = os.path.dirname(out)
    lines = stderr.strip().splitlines()
    assert 'Traceback' not in stderr, stderr
    if rc == 0:
        if argv[0] == 'convert':
            formats.read_file(os.path.join(argv[2], 'model.safetensors') if '--format' in argv else argv[2])
        return
    assert rc == 1, (rc, stderr)
    errors = [l for l in lines if l.startswith('vit-flax: error: ')]
    assert len(errors) == 1 and errors[0] == lines[-1], stderr
    assert os.path.basename(src) in errors[0] or os.path.basename(argv[2]) in errors[0], errors[0]
    assert not outputs_left(folder, out), os.listdir(folder)


def mutant_command(data, reader, mutation, command):
    """(argv, src, out): `command` run on a mutant of `reader`'s valid file, into a fresh empty folder."""
    r = fz.READERS[reader]
    src = write(fresh(r.ext), fz.MUTATIONS[mutation](data.draw, r.valid()))
    out_dir = fresh('.out')
    os.mkdir(out_dir)
    out = os.path.join(out_dir, 'o')
    return COMMANDS[command](src, out), src, out


@settings(max_examples=fz.target() if fz.LONG else 60)
@given(st.data())
def test_command_in_process(data):
    t0 = time.process_time()
    reader = data.draw(st.sampled_from(FILE_READERS))
    mutation = data.draw(st.sampled_from(fz.READERS[reader].mutations))
    argv, src, out = mutant_command(data, reader, mutation, data.draw(st.sampled_from(sorted(COMMANDS))))
    fz.COUNTS[f'vit-flax {argv[0]}'] += 1
    r = cli(*argv)
    check_command_result(r.returncode, r.stderr, argv, src, out)
    assert not os.path.exists(fz.MARKER)
    shutil.rmtree(os.path.dirname(out))
    fz.charge(f'vit-flax {argv[0]}', t0)


# One real process per reader in `make test` (each costs an interpreter start); `make fuzz` runs more.
SUBPROCESS_CASES = [('npz', 'truncate', 'convert-pth'), ('torch', 'torch_evil', 'convert-npz'),
                    pytest.param('safetensors', 'safetensors_lies', 'inspect', marks=pytest.mark.slow),
                    pytest.param('npz', 'npy_header_lies', 'convert-orbax', marks=pytest.mark.slow)]


@pytest.mark.parametrize('reader,mutation,command', SUBPROCESS_CASES)
def test_command_in_a_real_process(reader, mutation, command, tmp_path):
    @settings(max_examples=5 if fz.LONG else 1)   # (an interpreter start each: seconds)
    @given(st.data())
    def run(data):
        argv, src, out = mutant_command(data, reader, mutation, command)
        fz.COUNTS[f'vit-flax {argv[0]} (process)'] += 1
        p = cli_process(*argv)
        check_command_result(p.returncode, p.stderr, argv, src, out)
        assert not os.path.exists(fz.MARKER)
    run()


def test_orbax_dir_with_corrupt_data_in_a_real_process(orbax_dir, tmp_path):
    """tensorstore reports a damaged chunk from several threads; the command still says one line."""
    broken = tmp_path / 'ckpt'
    shutil.copytree(orbax_dir, broken)
    for root, _, files in os.walk(broken / 'd'):
        for f in files:
            with open(os.path.join(root, f), 'r+b') as fh:
                fh.truncate(8)
    p = cli_process('convert', broken, tmp_path / 'o.npz')
    assert p.returncode == 1 and p.stderr.count('\n') == 1, p.stderr
    assert p.stderr.startswith('vit-flax: error: ') and 'ckpt: not a readable orbax checkpoint' in p.stderr
    assert sorted(os.listdir(tmp_path)) == ['ckpt']


# ---------------------------------------------------------------- failures found so far, checked on every commit

def _flipped_cifar() -> bytes:
    """Issue 40: one bit of the gzip stream (byte 242, bit 6) turns an opcode of data_batch_1 into
    LONG_BINPUT 139143180; the C unpickler grew its memo to that index: 2.2 GB for a 45 KB file."""
    out = bytearray(fz.valid_cifar())
    out[242] ^= 1 << 6
    return bytes(out)


def _cifar_memo_lie_plain_tar() -> bytes:
    """The same batch in an uncompressed tar: no CRC to catch it, the pickle walk must."""
    import io
    import tarfile
    import zlib
    raw = zlib.decompressobj(-15).decompress(_flipped_cifar()[10:])
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        members = {os.path.basename(m.name): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
    return fz.tar_bytes(members, 'w')


def _torch_memo_lie() -> bytes:
    import struct
    members, prefix = fz.torch_zip_members(fz.valid_torch_by_torch())
    return fz.zip_bytes(fz._replace(members, prefix + 'data.pkl',
                                    b'\x80\x02]r' + struct.pack('<I', 139143180) + b'.'))


def _npz_deflate_lie() -> bytes:
    """A deflated member declaring 100 MB (within deflate's 1032:1 of its 100 KB): the output was allocated
    at the declared size before anything decompressed."""
    import io
    import struct
    buf = io.BytesIO()
    np.savez_compressed(buf, a=np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8))
    blob = bytearray(buf.getvalue())
    cd = blob.rindex(b'PK\x01\x02')
    blob[cd + 24:cd + 28] = struct.pack('<I', 100_000_000)
    blob[22:26] = struct.pack('<I', 100_000_000)
    return bytes(blob)


def _npz_head_kernel_without_bias() -> bytes:
    """make fuzz (57fca2b): half a head was a KeyError in adapt (a traceback)."""
    import io
    _, flat = fz.tiny()
    buf = io.BytesIO()
    np.savez(buf, **{k: v for k, v in flat.items() if k != 'head/bias'})
    return buf.getvalue()


@settings(phases=[Phase.explicit], deadline=None)
@given(reader=st.sampled_from(sorted(fz.READERS)), blob=st.binary())
@example(reader='cifar', blob=_flipped_cifar())
@example(reader='cifar', blob=_cifar_memo_lie_plain_tar())
@example(reader='torch', blob=_torch_memo_lie())
@example(reader='decode-torch', blob=_torch_memo_lie())
@example(reader='npz', blob=_npz_deflate_lie())
@example(reader='decode-npz', blob=_npz_head_kernel_without_bias())
def test_fixed_failures_stay_fixed(reader, blob):
    """Each file once failed the property (an allocation far beyond its size, a traceback): now it is read,
    or refused in one line naming it, within the allocation bound."""
    r = fz.READERS[reader]
    fz.check_outcome(reader, r.read, write(fresh(r.ext), blob))


def _folder_config(**model_args) -> bytes:
    """The fuzzer's valid timm folder's config.json with `model_args` changed."""
    path = fresh('')
    fz.model_folder_valid(path)
    with open(os.path.join(path, 'config.json')) as f:
        cfg = json.load(f)
    shutil.rmtree(path)
    cfg['model_args'].update(model_args)
    return json.dumps(cfg).encode()


@settings(phases=[Phase.explicit], deadline=None)
@given(config=st.binary())
@example(config=_folder_config(img_size=9))    # make fuzz (issue 40): read as timm builds it, a 9-px model
@example(config=_folder_config(img_size=10))
@example(config=_folder_config(img_size=12))   # a 3x3 grid over the weights' 2x2: refused
def test_fixed_folder_failures_stay_fixed(model_folder, config):
    """config.json files found by `make fuzz`: refused in one line naming the folder, or read consistently."""
    path = fresh('')
    shutil.copytree(model_folder, path)
    write(os.path.join(path, 'config.json'), config)
    result = fz.check_outcome('timm-folder', read_folder_and_preprocessing, path)
    if not isinstance(result, ConversionError):
        model, (pre, _), (names, _) = result
        check_folder_read(model, pre, names)
