"""Declared sizes never allocated, non-finite weights, internal errors, closed pipes, conversion memory."""
import io
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
import zipfile

import numpy as np
import pytest

from durability import fuzzing as fz
from converters import pipeline
from converters import formats
from converters.errors import ConversionError
from helpers import cli, cli_process


def _npz_declaring(n):
    return fz.zip_bytes([('embedding/kernel.npy', fz.npy_header((n,)) + b'\0' * 64)])


def _safetensors_declaring(n):
    return fz.st_bytes({'w': {'dtype': 'F32', 'shape': [n], 'data_offsets': [0, 4 * n]}}, b'\0' * 64)


def _torch_declaring(n):
    """A real torch file whose pickle declares a storage of n elements (its record holds 4)."""
    import torch
    buf = io.BytesIO()
    torch.save({'w': torch.zeros(1)}, buf)
    members, prefix = fz.torch_zip_members(buf.getvalue())
    pkl = dict(members)[prefix + 'data.pkl']
    # ('storage', FloatStorage, '0', 'cpu', 1): the element count is the BININT1 1 that closes the tuple
    huge = pkl.replace(b'K\x01t', b'\x8a\x05' + n.to_bytes(5, 'little') + b't', 1)
    assert huge != pkl
    return fz.zip_bytes(fz._replace(members, prefix + 'data.pkl', huge))


def _zip_member_declaring(n):
    return fz.patch_zip_sizes(fz.zip_bytes([('a.npy', fz.npy_header((4,)) + b'\0' * 16)], zipfile.ZIP_DEFLATED),
                              0, usize=n)


@pytest.mark.parametrize('ext,make', [('.npz', _npz_declaring), ('.safetensors', _safetensors_declaring),
                                      ('.pth', _torch_declaring), ('.npz', _zip_member_declaring)],
                         ids=['npy-header', 'safetensors-header', 'torch-storage', 'zip-directory'])
@pytest.mark.parametrize('n', [10 ** 12, 2 ** 30])
def test_declared_huge_arrays_are_refused_before_any_allocation(tmp_path, ext, make, n):
    n = min(n, 2 ** 32 - 2) if make is _zip_member_declaring else n
    path = tmp_path / f'huge{ext}'
    path.write_bytes(make(n))
    tracemalloc.start()
    with pytest.raises(ConversionError) as e:
        formats.read_file(str(path))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20, f'allocated {peak} bytes for a {path.stat().st_size}-byte file'
    assert 'huge' in str(e.value) and '\n' not in str(e.value)


def test_nonfinite_weights_are_refused_unless_allowed(tmp_path):
    model, flat = fz.tiny()
    bad = dict(flat)
    bad['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'] = flat[
        'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'].copy()
    bad['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'][0, :3] = [np.nan, np.inf, -np.inf]
    src = tmp_path / 'nan.npz'
    pipeline.write_flat(bad, model, str(src))
    r = cli('convert', src, tmp_path / 'o.pth')
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'MlpBlock_0/Dense_0/kernel' in r.stderr, r.stderr
    assert '3 non-finite' in r.stderr, r.stderr
    assert not (tmp_path / 'o.pth').exists()
    r = cli('inspect', src)
    assert r.returncode == 0
    assert "WARNING: 1 key(s) hold NaN/Inf values, first 'Transformer/encoderblock_0/MlpBlock_0" in r.stdout
    r = cli('convert', src, tmp_path / 'o.npz', '--allow-nonfinite')
    assert r.returncode == 0 and 'warning:' in r.stderr and 'kept as they are' in r.stderr
    got = formats.read_npz(str(tmp_path / 'o.npz'))['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel']
    np.testing.assert_array_equal(got, bad['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'])
    with pytest.raises(ConversionError, match='non-finite'):
        pipeline.load_params(str(src), fz.TINY_NAME, **fz.TINY)
    assert np.isnan(pipeline.load_params(str(src), fz.TINY_NAME, allow_nonfinite=True, log=lambda m: None, **fz.TINY)
                    ['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel'][0, 0])


def test_registry_errors_are_one_clean_line(tmp_path):
    model, flat = fz.tiny()
    pipeline.write_flat(flat, model, str(tmp_path / 't.npz'))
    r = cli('convert', tmp_path / 't.npz', tmp_path / 'o.pth', '--model', 'vit_nope')
    err = r.stderr
    assert r.returncode == 1
    assert err == "vit-flax: error: unknown model 'vit_nope'; `vit-flax list` shows every name\n"
    r = cli('summary', 'vit_nope')
    assert r.returncode == 1 and r.stderr.startswith("vit-flax: error: unknown model 'vit_nope'")
    assert r.stderr.count('\n') == 1


def test_an_internal_error_is_not_dressed_up_as_bad_input(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyError('a bug of ours, not a missing key of the file')
    monkeypatch.setattr(pipeline, 'read_checkpoint', boom)
    r = cli('inspect', tmp_path / 'x.npz')
    assert r.returncode == 70 and r.stderr.count('\n') == 1, r.stderr
    assert r.stderr.startswith("vit-flax: internal error: KeyError: 'a bug of ours") and '--debug' in r.stderr
    with pytest.raises(KeyError):
        cli('inspect', tmp_path / 'x.npz', '--debug')
    with pytest.raises(KeyError):
        cli('--debug', 'inspect', tmp_path / 'x.npz')


def test_internal_error_and_debug_in_a_real_process(tmp_path):
    code = textwrap.dedent('''
        import sys, converters.pipeline as pipeline
        def boom(*a, **k): raise ZeroDivisionError('division by zero')
        pipeline.read_checkpoint = boom
        from vit_flax_cli.cli import run
        sys.argv = ['vit-flax', *sys.argv[1:]]
        run()''')
    p = subprocess.run([sys.executable, '-c', code, 'inspect', tmp_path / 'x.npz'], capture_output=True, text=True)
    assert p.returncode == 70 and p.stdout == '' and p.stderr.count('\n') == 1, p.stderr
    assert 'internal error: ZeroDivisionError: division by zero' in p.stderr and 'Traceback' not in p.stderr
    p = subprocess.run([sys.executable, '-c', code, 'inspect', tmp_path / 'x.npz', '--debug'],
                       capture_output=True, text=True)
    assert p.returncode == 1 and 'Traceback (most recent call last)' in p.stderr and 'boom' in p.stderr


def test_closed_pipes_end_quietly():
    # the reader is gone before anything is written: `vit-flax list | true`
    p = cli_process('list', wait=False, text=False)
    p.stdout.close()
    assert p.wait() == 141 and p.stderr.read() == b''
    # the reader takes one line and leaves: `vit-flax list | head -1`
    p = cli_process('list', 'vit*', wait=False, text=False)
    assert p.stdout.readline().startswith(b'vit')
    p.stdout.close()
    assert p.wait() in (0, 141) and p.stderr.read() == b''


MEMORY_CHILD = textwrap.dedent('''
    import json, os, resource, sys, tempfile
    import numpy as np, vit_flax
    import converters, converters.pipeline, vit_flax_cli.cli, torch, jax
    # the same conversion on a 1-block ViT first: code paths faulted in before the baseline is taken
    tiny = vit_flax.create_model('vit_tiny_patch16_224', img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)
    flat = {k: np.ones(v.shape, np.float32) for k, v in
            converters.pipeline.flatten_dict(vit_flax.summary.param_shapes(tiny), sep='/').items()}
    warm = tempfile.mkdtemp()
    converters.pipeline.write_flat(flat, tiny, os.path.join(warm, 't.npz'))
    vit_flax_cli.cli.main(['convert', os.path.join(warm, 't.npz'), os.path.join(warm, 't.pth')])
    converters.load_params(os.path.join(warm, 't.pth'), 'vit_tiny_patch16_224', img_size=8, patch_size=4,
                           embed_dim=8, depth=1, num_heads=2)
    base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    if sys.argv[1] == 'convert':
        vit_flax_cli.cli.main(['convert', sys.argv[2], sys.argv[3], '--force'])
    else:
        converters.load_params(sys.argv[2], sys.argv[3])
    print(json.dumps(dict(base=base, peak=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))''')


# slow (make test-slow, make fuzz): the figure is right alone (1.08x) but the default suite on a loaded
# machine measured 1.50x and 2.78x in this child process. Likely cause: under memory pressure the kernel
# drops the child's resident library pages (torch and jax map ~1 GB), so the baseline reads low and their
# faulting back in counts as the conversion's. `make memory` reports the ViT-L/H figures.
@pytest.mark.slow
@pytest.mark.parametrize('direction', ['convert', 'load'])
def test_conversion_memory_stays_near_one_copy_of_the_weights(tmp_path, direction):
    """ViT-B/16 (346 MB): what a conversion adds to the process peaks near one copy of the weights.

    (The whole-process figures for ViT-L/16 and ViT-H/14 against 1.5x the file size: `make memory`.)
    Before streaming and page release, npz -> pth added ~2x the file.
    """
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..', 'benchmarks'))
    from convert_memory import write_random_npz
    npz = str(tmp_path / 'b.npz')
    write_random_npz('vit_base_patch16_224', npz)
    size = os.path.getsize(npz)
    pth = str(tmp_path / 'b.pth')
    if direction == 'load':   # from a torch file: its transposed weights are where the copies were
        assert cli('convert', npz, pth).returncode == 0
    args = ('convert', npz, pth) if direction == 'convert' else ('load', pth, 'vit_base_patch16_224')
    p = subprocess.run([sys.executable, '-c', MEMORY_CHILD, *args], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    m = json.loads(p.stdout.strip().splitlines()[-1])
    added = (m['peak'] - m['base']) / size
    print(direction, f'adds {added:.2f}x the file size')
    assert added < 1.3, f'{direction} added {added:.2f}x the {size}-byte file to the process'


def test_hand_written_formats_match_the_libraries(tmp_path):
    """Our streaming writers and mapped readers against numpy, safetensors and torch themselves."""
    import ml_dtypes
    import torch
    from safetensors.numpy import load_file, save_file
    from safetensors.torch import save_file as save_torch
    rng = np.random.default_rng(0)
    arrays = {'w': rng.standard_normal((5, 7)).astype(np.float32).T, 'h': np.arange(6, dtype=np.float16),
              'b': rng.standard_normal(9).astype(ml_dtypes.bfloat16), 'i': np.arange(4, dtype=np.int64),
              'm': np.array([True, False]), 'e': np.zeros((0, 3), np.float32), 's': np.float64(2.5)}
    formats.write_safetensors(arrays, str(tmp_path / 'a.safetensors'))
    lib = load_file(str(tmp_path / 'a.safetensors'))
    for k, v in arrays.items():
        assert lib[k].dtype == v.dtype and np.array_equal(lib[k], v), k
    save_file({k: np.array(v, order='C') for k, v in arrays.items() if k != 'b'}, str(tmp_path / 'lib.safetensors'))
    save_torch({'b': torch.from_numpy(arrays['b'].view(np.int16)).view(torch.bfloat16)},
               str(tmp_path / 'bf.safetensors'))
    ours = {**formats.read_safetensors(str(tmp_path / 'lib.safetensors')), **formats.read_safetensors(str(tmp_path / 'bf.safetensors'))}
    for k, v in arrays.items():
        assert ours[k].dtype == v.dtype and np.array_equal(ours[k], v), k
    formats.write_npz(arrays, str(tmp_path / 'a.npz'))
    with np.load(tmp_path / 'a.npz') as z:
        for k, v in arrays.items():
            got = z[k].view(ml_dtypes.bfloat16) if k == 'b' else z[k]
            assert np.array_equal(got, v), k
    formats.write_torch(arrays, str(tmp_path / 'a.pth'))
    sd = torch.load(tmp_path / 'a.pth', weights_only=True, mmap=True)
    assert sd['b'].dtype == torch.bfloat16 and sd['w'].is_contiguous()
    got = formats.read_torch(str(tmp_path / 'a.pth'))
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and np.array_equal(got[k], v), k


@pytest.mark.parametrize('stray', [{'head_dist/kernel': np.zeros((8, 3), np.float32)},
                                   {'head/kernel': np.zeros((8, 3), np.float32), 'head/bias': np.zeros((), np.float32)}])
def test_half_a_head_is_named_not_crashed_on(tmp_path, stray):
    """Found by `make fuzz`: a head kernel without its bias (or a 0-d bias) was a KeyError in adapt()."""
    model, flat = fz.tiny()
    from converters.families import vit as vit_family
    arrays = {**vit_family.flax_to_npz(flat, 'released'), **stray}
    (tmp_path / 'h.npz').write_bytes(fz.npz_bytes(list(arrays.items())))
    r = cli('convert', tmp_path / 'h.npz', tmp_path / 'o.npz')
    assert r.returncode == 1 and r.stderr.count('\n') == 1 and 'h.npz' in r.stderr and 'head' in r.stderr, r.stderr
