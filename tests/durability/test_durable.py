"""Writes are atomic and durable: killed, failing or full-disk writers never damage an existing output."""
import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import cli, cli_process, timm_model
from converters import formats
from converters.formats.durable import PREFIX, atomic_output, clean_stale
from converters.errors import ConversionError

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = int(os.environ.get('VIT_FLAX_KILLS', '8'))   # per format; `make fuzz` raises it


@pytest.fixture(scope='module')
def tiny_pth(tmp_path_factory):
    """A realistic source: timm's ViT-Ti/16 state_dict (22 MB)."""
    path = tmp_path_factory.mktemp('kill') / 'tiny.pth'
    torch.save(timm_model('vit_tiny_patch16_224').state_dict(), path)
    return path


def temps(folder):
    return [n for n in os.listdir(folder) if n.startswith(PREFIX)]


def test_killed_writer_leaves_old_or_new_never_a_mix(tiny_pth, tmp_path):
    """SIGKILL at random points of npz, torch and safetensors writes (one process forks the writers)."""
    outs = [tmp_path / f'out{ext}' for ext in ('.npz', '.pth', '.safetensors')]
    p = subprocess.run([sys.executable, os.path.join(HERE, 'kill_writer.py'), tiny_pth, str(KILLS), '0', *outs],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    counts = [json.loads(line) for line in p.stdout.strip().splitlines()]
    assert len(counts) == 3
    for c in counts:
        print(c)
        assert c['kills'] == KILLS and c['old'] + c['new'] == c['trials'], c
        assert c['temp_left'] >= 1, f'no kill landed inside a write: the test proves nothing ({c})'
        assert c['max_temps'] <= 1 and c['temps_after_next_write'] == 0, c


@pytest.mark.parametrize('out', [pytest.param('o.npz', marks=pytest.mark.slow), 'ckpt'])
def test_killed_cli_conversion_keeps_the_old_output(tiny_pth, tmp_path, out):
    """The whole command, killed at a random point of its write (orbax folders too), then run again. The
    runs that are not killed (the old output, the rerun that cleans up) run in this process: a process costs
    seconds of start-up, and what they show is what is on disk."""
    dst = tmp_path / out
    assert cli('convert', tiny_pth, dst).returncode == 0
    before = np.array(formats.read_file(str(dst))['cls'])
    rng = np.random.default_rng(1)
    mid_write = 0
    for _ in range(int(os.environ.get('VIT_FLAX_CLI_KILLS', '1'))):
        p = cli_process('convert', tiny_pth, dst, '--force', '--num-classes', '7', wait=False)
        while p.poll() is None and not temps(tmp_path):
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.3))
        mid_write += p.poll() is None and bool(temps(tmp_path))
        p.kill()
        p.wait()
        got = formats.read_file(str(dst))
        assert np.array_equal(got['cls'], before)
        assert got['head/bias'].shape in ((1000,), (7,))
    assert mid_write, 'no kill landed inside a write: the test proves nothing'
    r = cli('convert', tiny_pth, dst, '--force')
    assert r.returncode == 0, r.stderr
    assert temps(tmp_path) == [], 'the next run must clean up after a killed one'


def limited_cli(limit, *args):
    """`vit-flax ARGS` in a process whose writes past `limit` bytes fail with EFBIG (RLIMIT_FSIZE). The limit is
    set by the child itself, not by a preexec_fn: that would make subprocess fork this multithreaded process
    (JAX's threads) rather than spawn, which is unsafe and warned about."""
    script = ('import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (%d, %d)); '
              'sys.argv[0] = "vit-flax"; runpy.run_module("vit_flax_cli", run_name="__main__", alter_sys=True)'
              % (limit, limit))
    return subprocess.Popen([sys.executable, '-c', script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize('out', [pytest.param(o, marks=pytest.mark.slow) for o in ('o.npz', 'o.pth', 'o.safetensors')]
                         + ['ckpt'])
def test_disk_full_half_way_keeps_the_old_output(tiny_pth, tmp_path, out):
    """A real failed write (RLIMIT_FSIZE: as a full disk, the writer's write() fails half-way); the old output
    is written in this process."""
    dst = tmp_path / out
    assert cli('convert', tiny_pth, dst).returncode == 0
    old = {k: np.array(v) for k, v in formats.read_file(str(dst)).items()}
    p = limited_cli(4 << 20, 'convert', tiny_pth, dst, '--force', '--num-classes', '7')
    assert p.wait() == 1, p.stderr.read()
    err = p.stderr.read().strip().splitlines()   # the head surgery is reported first, then the one error
    assert [l for l in err if 'vit-flax' in l] == err[-1:] and err[-1].startswith('vit-flax: error: '), err
    assert not [l for l in err if 'Traceback' in l], err  # orbax's threads' ignored exceptions stay quiet
    assert f'{out}: cannot write' in err[-1], err
    got = formats.read_file(str(dst))
    assert sorted(got) == sorted(old) and all(np.array_equal(got[k], old[k]) for k in old)
    assert temps(tmp_path) == []


@pytest.mark.parametrize('writer', ['npz', 'torch', 'safetensors'])
def test_writer_failing_half_way(tmp_path, monkeypatch, writer):
    """A patched write() that raises ENOSPC after some bytes: old file untouched, no temporary left."""
    dst = tmp_path / f'out.{ {"torch": "pth"}.get(writer, writer) }'
    arrays = {f'w{i}': np.full((256, 256), i, np.float32) for i in range(8)}
    getattr(formats, f'write_{writer}')(arrays, str(dst))
    before = dst.read_bytes()
    import builtins
    real_open = builtins.open

    class Failing:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(memoryview(b).cast('B'))
            if self.n > 600_000:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    def failing_open(path, mode='r', *a, **k):
        f = real_open(path, mode, *a, **k)
        return Failing(f) if 'w' in mode and PREFIX in str(path) else f
    monkeypatch.setattr(builtins, 'open', failing_open)
    if writer == 'torch':   # torch's C++ zip writer does not go through Python's open(): fail after it wrote
        real_save = torch.save

        def failing_save(obj, f, *a, **k):
            real_save(obj, f, *a, **k)
            raise RuntimeError('[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing '
                               'file data/3: file write failed')
        monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(ConversionError, match='cannot write'):
        getattr(formats, f'write_{writer}')({k: v + 1 for k, v in arrays.items()}, str(dst), force=True)
    assert dst.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [dst.name]


def test_stale_temporaries_are_cleaned_but_a_live_writers_is_not(tmp_path):
    stale = tmp_path / (PREFIX + 'dead1234')
    stale.mkdir()
    (stale / 'half.npz').write_bytes(b'PK\x03\x04 half')
    live = tmp_path / (PREFIX + 'live5678')
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)        # as a writer still running holds it
    try:
        formats.write_npz({'a': np.ones(3, np.float32)}, str(tmp_path / 'o.npz'))
        assert not stale.exists() and live.exists()
    finally:
        os.close(fd)
    assert clean_stale(str(tmp_path)) == [str(live)]
    assert sorted(os.listdir(tmp_path)) == ['o.npz']


def test_every_write_is_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: (synced.append(os.readlink(f'/proc/self/fd/{fd}')), real_fsync(fd))[1])
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, 'replace', lambda a, b: (renamed.append((len(synced), str(b))), real_replace(a, b))[1])
    dst = tmp_path / 'o.safetensors'
    formats.write_safetensors({'a': np.ones(3, np.float32)}, str(dst))
    (n_before, target), = renamed
    assert target == str(dst)
    assert any(p.endswith('/o.safetensors') and PREFIX in p for p in synced[:n_before]), synced   # the data
    assert synced[n_before:] == [str(tmp_path)], synced                                            # the rename


def test_force_swaps_a_folder_in_one_step(tmp_path, monkeypatch):
    """An existing orbax folder stays whole until the instant the new one takes its name."""
    from converters.formats import durable
    dst = tmp_path / 'ckpt'
    dst.mkdir()
    (dst / '_METADATA').write_text('old')
    seen = []
    real = durable._exchange
    monkeypatch.setattr(durable, '_exchange', lambda a, b: (seen.append((a, b)), real(a, b))[1])
    with atomic_output(str(dst), force=True) as tmp:
        os.mkdir(tmp)
        with open(os.path.join(tmp, '_METADATA'), 'w') as f:
            f.write('new')
        assert (dst / '_METADATA').read_text() == 'old'
    assert seen and seen[0][1] == str(dst) and (dst / '_METADATA').read_text() == 'new'
    assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_no_output_without_force_and_no_temporary_on_refusal(tmp_path):
    dst = tmp_path / 'o.npz'
    dst.write_bytes(b'precious')
    with pytest.raises(ConversionError, match='exists; pass --force'):
        formats.write_npz({'a': np.ones(2)}, str(dst))
    with pytest.raises(ConversionError, match='cannot hold dtype'):
        formats.write_safetensors({'a': np.ones(2, np.complex64)}, str(tmp_path / 'c.safetensors'))
    assert sorted(os.listdir(tmp_path)) == ['o.npz'] and dst.read_bytes() == b'precious'
