"""The lean install (no torch, `make test-lean`): what works without torch, and how what needs it refuses.

This module imports no torch at its top, so it runs in the lean venv; the tests whose bodies import torch
or timm compare the torch-free code with torch itself and run in the full venv only (tests/conftest.py
marks them `torch`). In the full venv, `hidden('torch', ...)` makes torch unimportable inside a test, so
the torch-free paths are checked there too.
"""
import io
import json
import os
import re
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

import vit_flax
from converters import pipeline
from converters.formats import torch_zip
from converters.formats.torch import read_torch, write_torch
from converters.resample import interp_matrix, resample_pos_embed, resize_grid
from helpers import WITHOUT_TORCH, cli, hidden, rel_err, run_flax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TORCH = __import__('importlib.util').util.find_spec('torch') is not None
TINY = dict(depth=1, num_classes=10)


def random_params(model, seed=0):
    """Parameters of `model` drawn by numpy on its shapes (no init to compile)."""
    import jax
    shapes = jax.eval_shape(lambda: vit_flax.init_params(model))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp('lean')
    model = vit_flax.create_model('vit_tiny_patch16_224', **TINY)
    params = random_params(model)
    pipeline.save_params(params, d / 'w.npz', 'vit_tiny_patch16_224', **TINY)
    return dict(dir=d, model=model, params=params)


def flat(params):
    from flax.traverse_util import flatten_dict
    return {k: np.asarray(v) for k, v in flatten_dict(params, sep='/').items()}


ARGS = ('--model', 'vit_tiny_patch16_224', '--set', 'depth=1', '--num-classes', '10')


# ---------------------------------------------------------------- every torch-free flow

def test_npz_safetensors_orbax_pth_and_timm_folder_round_trip_bit_exactly_without_torch(tiny):
    d, want = tiny['dir'], flat(tiny['params'])
    with hidden(*WITHOUT_TORCH):
        chain = [d / 'w.npz', d / 'w.safetensors', d / 'w_orbax', d / 'w.pth', d / 'w2.npz']
        for src, dst in zip(chain, chain[1:]):
            r = cli('convert', src, dst, *ARGS)
            assert r.returncode == 0, r.stderr
        r = cli('convert', d / 'w.pth', d / 'folder', '--format', 'timm-folder', *ARGS)
        assert r.returncode == 0, r.stderr
        for path in chain[1:] + [d / 'folder']:
            _, params, _ = pipeline.load_model(path, 'vit_tiny_patch16_224', **TINY)
            got = flat(params)
            assert got.keys() == want.keys(), path
            for k in want:
                assert np.array_equal(got[k], want[k]), (path, k)
        assert sys.modules['torch'] is None   # nothing went round the block: torch stayed unimportable


def test_the_model_computes_the_same_logits_from_a_round_tripped_file(tiny):
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    with hidden(*WITHOUT_TORCH):
        path = tiny['dir'] / 'logits.pth'
        pipeline.save_params(tiny['params'], path, 'vit_tiny_patch16_224', **TINY)
        params = pipeline.load_params(path, 'vit_tiny_patch16_224', log=lambda s: None, **TINY)
    a, b = run_flax(tiny['model'], tiny['params'], x), run_flax(tiny['model'], params, x)
    assert a.shape == (1, 10) and np.array_equal(a, b)


def test_swin_in_microsofts_wrapped_layout_round_trips_without_torch(tmp_path):
    kw = dict(depths=(2, 2), num_heads=(3, 6), num_classes=5)
    model = vit_flax.create_model('swin_tiny_patch4_window7_224', **kw)
    params = random_params(model, seed=4)
    with hidden(*WITHOUT_TORCH):
        pipeline.save_params(params, tmp_path / 'ms.pth', 'swin_tiny_patch4_window7_224', layout='microsoft', **kw)
        raw = read_torch(tmp_path / 'ms.pth')
        back = pipeline.load_params(tmp_path / 'ms.pth', 'swin_tiny_patch4_window7_224', log=lambda s: None, **kw)
    with zipfile.ZipFile(tmp_path / 'ms.pth') as z:
        assert z.read('archive/data.pkl').startswith(b'\x80\x02}q\x00X\x05\x00\x00\x00model')   # {'model': ...}
    # Microsoft's: patch merging at the end of stage 0 (timm's at the start of stage 1), the masks buffered
    assert 'layers.0.downsample.reduction.weight' in raw and 'layers.1.downsample.reduction.weight' not in raw
    assert 'layers.0.blocks.1.attn_mask' in raw
    want, got = flat(params), flat(back)
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_predict_from_safetensors_without_torch(tiny, tmp_path):
    from PIL import Image
    img = tmp_path / 'a.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    with hidden(*WITHOUT_TORCH):
        pipeline.save_params(tiny['params'], tmp_path / 'w.safetensors', 'vit_tiny_patch16_224', **TINY)
        r = cli('predict', tmp_path / 'w.safetensors', img, '--json', '--top-k', '3',
                '--model', 'vit_tiny_patch16_224', '--set', 'depth=1', '--set', 'num_classes=10')
    assert r.returncode == 0, r.stderr
    top = json.loads(r.stdout)['predictions'][0]['top_k']
    probs = [t['prob'] for t in top]
    assert len(top) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


@pytest.mark.skipif(HAVE_TORCH, reason='the lean venv only: make test trains in tests/training')
def test_training_on_digits_lowers_the_loss_and_exports_to_safetensors(tmp_path):
    wd = tmp_path / 'run'
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'train_flax.py'), '--workdir', str(wd), '--depth', '1',
                        '--batch-size', '64', '--epochs', '2', '--lr', '3e-3'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    history = json.loads((wd / 'summary.json').read_text())['history']
    assert [h['epoch'] for h in history] == [1, 2] and history[1]['train_loss'] < history[0]['train_loss']
    assert history[1]['val_acc'] > 0.2   # ten classes: chance is 0.1
    r = cli('convert', wd, tmp_path / 'best.safetensors')
    assert r.returncode == 0, r.stderr
    assert 'torch' not in sys.modules


# ---------------------------------------------------------------- .pth written without torch

STATE = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3), 'b16': np.ones((2, 2), ml_dtypes.bfloat16),
         'half': np.full((3,), 0.5, np.float16), 'count': np.array(7, np.int64), 'mask': np.ones((1, 2), bool),
         'f8': np.ones(4, ml_dtypes.float8_e4m3fn), 'u16': np.arange(3, dtype=np.uint16),
         'big': np.arange(70000, dtype=np.int32), 'be': np.arange(3, dtype='>f4')}


def test_torch_free_pth_reads_back_bit_exactly_with_aligned_records(tmp_path):
    path = tmp_path / 'x.pth'
    write_torch(STATE, path, use_torch=False)
    back = read_torch(path)
    assert back.keys() == STATE.keys()
    for k, v in STATE.items():
        assert back[k].dtype == v.dtype.newbyteorder('=') and back[k].shape == v.shape
        assert np.array_equal(back[k].astype(np.float64), v.astype(np.float64)), k
    data = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack('<HH', data[info.header_offset + 26:info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
        assert z.read('archive/version') == b'3\n' and z.read('archive/byteorder') == b'little'


def _torch_tensor(torch, a):
    a = np.array(a, a.dtype.newbyteorder('='), order='C')   # (np.ascontiguousarray would make 0-d 1-d)
    views = {np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
             np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn)}
    if a.dtype in views:
        as_int, dt = views[a.dtype]
        return torch.from_numpy(a.view(as_int)).view(dt)
    return torch.from_numpy(a)


@pytest.mark.parametrize('n_keys,wrap', [(0, None), (1, None), (1001, None), (3, 'model')])
def test_torch_free_pth_pickle_and_records_equal_torch_saves(n_keys, wrap):
    import torch
    state = dict(STATE) if n_keys == 3 else {}
    state.update({f'k{i}': np.full((i % 3 + 1,), i, np.float32) for i in range(n_keys)})
    ours = io.BytesIO()
    torch_zip.write_zip(state, ours, wrap)
    ref = io.BytesIO()
    tensors = {k: _torch_tensor(torch, v) for k, v in state.items()}
    torch.save({wrap: tensors} if wrap else tensors, ref)
    a, b = zipfile.ZipFile(ours), zipfile.ZipFile(ref)
    assert a.namelist() == b.namelist()
    for name in b.namelist():
        if not name.endswith('serialization_id'):
            assert a.read(name) == b.read(name), name
    ours.seek(0)
    loaded = torch.load(ours, weights_only=True)
    loaded = loaded[wrap] if wrap else loaded
    assert list(loaded) == list(state)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_torch_saves_own_float8_and_uint16_files_read_without_torch(tmp_path):
    import torch
    state = {k: STATE[k] for k in ('f8', 'u16', 'b16')}
    torch.save({k: _torch_tensor(torch, v) for k, v in state.items()}, tmp_path / 't.pth')
    with hidden(*WITHOUT_TORCH):
        back = read_torch(tmp_path / 't.pth')
    for k, v in state.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k].view(np.uint8), v.view(np.uint8)), k


def test_timm_loads_a_torch_free_pth_strictly_and_computes_the_flax_logits(tiny, tmp_path):
    import timm
    import torch
    with hidden(*WITHOUT_TORCH):
        pipeline.save_params(tiny['params'], tmp_path / 'w.pth', 'vit_tiny_patch16_224', **TINY)
    tm = timm.create_model('vit_tiny_patch16_224', pretrained=False, **TINY).eval()
    tm.load_state_dict(torch.load(tmp_path / 'w.pth', weights_only=True), strict=True)
    x = np.random.default_rng(2).standard_normal((1, 224, 224, 3)).astype(np.float32)
    with torch.no_grad():
        want = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert rel_err(run_flax(tiny['model'], tiny['params'], x), want) < 1e-4


# ---------------------------------------------------------------- resampling without torch

SIZES = [(7, 12), (14, 24), (24, 14), (13, 23), (16, 7), (3, 17), (20, 3), (1, 4), (4, 1), (37, 11), (9, 9)]


@pytest.mark.parametrize('mode,antialias', [('bicubic', True), ('bicubic', False), ('bilinear', False),
                                            ('bilinear', True)])
def test_numpy_interpolation_equals_torchs_interpolate(mode, antialias):
    import torch
    import torch.nn.functional as F
    rng = np.random.default_rng(0)
    for (h, H), (w, W) in zip(SIZES, SIZES[::-1]):
        if antialias and W == 1:
            continue   # torch 2.14's antialiased kernel gives an output 1 wide every row equal to its first
        g = rng.standard_normal((h, w, 5)).astype(np.float32)
        want = F.interpolate(torch.from_numpy(g).permute(2, 0, 1)[None], size=(H, W), mode=mode,
                             antialias=antialias, align_corners=False)[0].permute(1, 2, 0).numpy()
        got = resize_grid(g, (H, W), mode, antialias, use_torch=False)
        assert got.shape == want.shape and rel_err(got, want) < 5e-6, (mode, antialias, (h, w), (H, W))


def test_position_resampling_without_torch_keeps_prefix_tokens_and_constant_grids():
    pe = np.concatenate([np.full((1, 1, 4), 7.0), np.full((1, 14 * 14, 4), 0.25)], axis=1).astype(np.float32)
    with hidden(*WITHOUT_TORCH):
        for method in ('bicubic', 'bilinear'):
            out = resample_pos_embed(pe, (24, 20), 1, method=method)
            assert out.shape == (1, 1 + 24 * 20, 4) and np.array_equal(out[:, :1], pe[:, :1])
            np.testing.assert_allclose(out[:, 1:], 0.25, rtol=1e-6)   # the weights of every row sum to 1
    for args in [(14, 24, 'bicubic', True), (24, 14, 'bicubic', True), (14, 24, 'bicubic', False),
                 (24, 14, 'bilinear', False)]:
        np.testing.assert_allclose(interp_matrix(*args).sum(axis=1), 1.0, rtol=1e-12)
    assert np.array_equal(interp_matrix(9, 9, 'bicubic', False), np.eye(9))


def test_swin_bias_tables_resize_without_torch_as_torch_does(tmp_path):
    from converters.families import swin as swin_family
    table = np.random.default_rng(3).standard_normal((169, 3)).astype(np.float32)
    with_torch = swin_family.resize_relative_bias_table(table, 12)
    with hidden(*WITHOUT_TORCH):
        without = swin_family.resize_relative_bias_table(table, 12)
    assert without.shape == (529, 3) and rel_err(without, with_torch) < 5e-6
    with pytest.raises(Exception, match=re.escape("--bias-resize timm needs timm")):
        with hidden(*WITHOUT_TORCH):
            swin_family.resize_relative_bias_table(table, 12, method='timm')


# ---------------------------------------------------------------- what needs torch says so

def test_what_needs_torch_fails_in_one_line_naming_the_extra(tiny, tmp_path):
    legacy = tmp_path / 'legacy.pth'
    legacy.write_bytes(__import__('pickle').dumps(0x1950a86a20f9469cfc6c, protocol=2) + b'\0' * 64)
    with hidden(*WITHOUT_TORCH):
        runs = {'parity': cli('parity', tiny['dir'] / 'w.npz'),
                'legacy': cli('convert', legacy, tmp_path / 'out.npz')}
    for what, r in runs.items():
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 1 and len(lines) == 1 and not r.stdout, (what, r.stderr)
        assert "pip install 'vit-flax-tools[torch]'" in lines[0] and 'Traceback' not in r.stderr, (what, r.stderr)
    assert 'vit-flax parity needs torch, which is not installed here' in runs['parity'].stderr
    assert "legacy.pth: torch's legacy (pre-1.6, non-zip) format needs torch" in runs['legacy'].stderr
    assert not (tmp_path / 'out.npz').exists()


def test_install_hints_name_the_distribution_in_pyproject():
    """`vit-flax` on the package index is another project: every hint names ours, as pyproject does."""
    import tomllib
    from converters.optional import DISTRIBUTION, EXTRA
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, 'pyproject.toml'), 'rb') as f:
        assert tomllib.load(f)['project']['name'] == DISTRIBUTION != 'vit-flax'
    assert EXTRA == f"pip install '{DISTRIBUTION}[torch]'"
    for folder in ('vit_flax', 'converters', 'vit_train', 'vit_flax_cli'):
        for dirpath, _, files in os.walk(os.path.join(root, folder)):
            for name in files:
                if name.endswith('.py'):
                    with open(os.path.join(dirpath, name)) as f:
                        assert "'vit-flax[" not in f.read(), os.path.join(dirpath, name)


# ---------------------------------------------------------------- start-up

PROBE = ('import sys\nfrom vit_flax_cli.cli import main\n'
         'try:\n    code = main(sys.argv[1:])\nexcept SystemExit as e:\n    code = e.code\n'
         'heavy = sorted(m for m in ("jax", "jaxlib", "flax", "torch", "timm", "orbax") if m in sys.modules)\n'
         'print("HEAVY", heavy, file=sys.stderr)\nsys.exit(code)\n')


@pytest.mark.parametrize('args,rc', [(['--help'], 0), (['list'], 0), (['list', 'deit_*'], 0),
                                     (['list', 'vit_smal_patch16_224'], 1), (['convert', 'a.npz'], 2),
                                     (['summary', 'x', '--img-size', 'big'], 2)])
def test_help_list_and_usage_errors_answer_without_importing_jax_or_torch(args, rc):
    p = subprocess.run([sys.executable, '-c', PROBE, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == rc, p.stderr
    assert p.stderr.strip().splitlines()[-1] == 'HEAVY []', p.stderr
    if args[:1] == ['list']:
        assert p.stdout.split() == vit_flax.list_models(*args[1:])


def test_the_stored_name_list_is_current_and_equals_the_registry():
    from vit_flax_cli import names
    stored = names.read_list()
    assert stored is not None, 'vit_flax_cli/model_names.txt is stale: run `make names` (python -m vit_flax_cli.names)'
    assert stored == vit_flax.list_models()
    assert names.similar_models('vit_smal_patch16_224') == vit_flax.registry.similar_models('vit_smal_patch16_224')
    assert names.timm_names() == vit_flax.registry.timm_names()


def test_a_stale_name_list_is_ignored(tmp_path):
    from vit_flax_cli import names
    stale = tmp_path / 'names.txt'
    stale.write_text('# sources 0000\nnot_a_model\n')
    assert names.read_list(str(stale)) is None
    stale.write_text(f'# sources {names.sources_digest()}\nvit_a\nvit_b\n')
    assert names.read_list(str(stale)) == ['vit_a', 'vit_b']
