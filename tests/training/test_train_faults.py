"""Training under faults: corrupt checkpoints, non-finite updates, signals, kill -9, bad input (issue 10).

Every run is a real `train_flax.py` subprocess on test_train.py's tiny configuration (one block, 16px digits,
2 epochs of 22 steps, a checkpoint every 16 steps and at each epoch end: steps 16 22 32 44, keep 2 + best),
compared with an uninterrupted reference run. A fault at an exact point (an update that turns the
parameters into NaN, a kill while an asynchronous save is in flight or during validation) is injected by a
small wrapper that patches one function of `vit_train` before running its `main`; nothing in the trainer
knows about tests. The kill loop at random delays is `slow` (`make test-slow`; VIT_FLAX_TRAIN_KILLS kills).
"""
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import cli_process, xla_flags
from test_train import BASE, ROOT, STEPS, TRAIN, assert_same_params, latest, summary

SPE = 22  # steps per epoch


def made_by_test_train(tmp_path_factory, name: str, ready: str):
    """test_train.py's module fixture `name` of this pytest process, when that file ran first in it and
    finished it: one XLA cache for both files."""
    path = tmp_path_factory.getbasetemp() / f'{name}0'
    return path if (path / ready).exists() else None


@pytest.fixture(scope='module')
def env(tmp_path_factory):
    cache = made_by_test_train(tmp_path_factory, 'xla_cache', '') or tmp_path_factory.mktemp('xla_cache')
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_DISABLE_MOST_OPTIMIZATIONS='1', XLA_FLAGS=xla_flags(1))


def command(workdir, *args, patch=None):
    """argv of a training run; `patch` is Python run first in the child (a fault injected at a known point)."""
    argv = ['--workdir', str(workdir), *map(str, args)]
    if patch is None:
        return [sys.executable, TRAIN, *argv]
    code = f'import sys\n{patch}\nfrom vit_train import main\nsys.exit(main({argv!r}))'
    return [sys.executable, '-c', code]


def run(env, workdir, *args, expect=0, patch=None):
    r = subprocess.run(command(workdir, *args, patch=patch), capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=900)
    assert r.returncode == expect, f'exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    return r


# what orbax/tensorstore's threads print after a failed read of a corrupt array file (not ours; see CONTRACT-7)
NOISE = ('Traceback', 'Exception in callback', 'RuntimeError: Event loop is closed', 'During handling',
         'The above exception', ' ', '\t')


def errors(stderr: str):
    """stderr's lines without the noise of orbax's threads and without progress bars."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(NOISE) and '\r' not in line]


def steps_of(workdir):
    from converters.formats import training_ckpt
    return training_ckpt.list_steps(os.path.join(workdir, 'checkpoints'))


@pytest.fixture(scope='module')
def reference(env, made_once):
    """An uninterrupted run of BASE (never modified: tests copy it or compare with it): test_train.py's, one
    run per `make test` whichever pytest-xdist worker makes it."""
    return made_once('train-reference', lambda workdir: run(env, workdir, *BASE).stdout)[0]


def assert_same_state(reference, workdir):
    """Params bit-identical, and the optimizer state and step too (their checksums, recorded in meta)."""
    a, b = latest(reference), latest(workdir)
    assert_same_params(a, b)
    assert a.meta['checksums'] == b.meta['checksums']


def wait_for(path, proc, timeout=600):
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, f'the run ended before {path} appeared'


# ---------------------------------------------------------------- corrupt and half-written checkpoints

def _no_commit_record(step):
    os.remove(step / '_CHECKPOINT_METADATA')


def _meta_garbage(step):
    (step / 'meta' / 'metadata').write_bytes(b'{"format": "vit-flax-train", \x00 garbage')


def _meta_missing(step):
    os.remove(step / 'meta' / 'metadata')


def _params_truncated(step):
    for f in (step / 'params' / 'd').iterdir():
        f.write_bytes(f.read_bytes()[:7])


def _bit_flipped(item):
    def flip(step):
        """One bit of the item's largest array file flipped: orbax restores it without a word."""
        files = [p for p in (step / item).rglob('*') if p.is_file()]
        f = max(files, key=lambda p: p.stat().st_size)
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x10
        f.write_bytes(bytes(data))
    return flip


def _empty_step(step):
    shutil.rmtree(step)
    step.mkdir()


CORRUPTIONS = dict(no_commit_record=_no_commit_record, meta_garbage=_meta_garbage, meta_missing=_meta_missing,
                   params_truncated=_params_truncated, params_bit_flipped=_bit_flipped('params'),
                   empty_step=_empty_step)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', CORRUPTIONS)
def test_reader_skips_a_corrupt_latest_step_with_a_warning(reference, tmp_path, how):
    workdir = tmp_path / 'w'
    shutil.copytree(reference, workdir)
    CORRUPTIONS[how](workdir / 'checkpoints' / str(STEPS))
    warnings = []
    ck = latest(workdir, log=warnings.append)
    assert ck.step == 32
    assert len(warnings) == 1 and f'checkpoints/{STEPS}' in warnings[0] and '\n' not in warnings[0], warnings
    if how == 'params_bit_flipped':
        assert 'does not match its recorded checksum' in warnings[0], warnings


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_fuzzed_latest_step_is_skipped_or_read_exactly(reference):
    """One file of the newest step deleted, cut, flipped, emptied or replaced (the fuzz harness' orbax
    mutations, `make fuzz` for more): the reader returns that step's exact params or the step before's,
    or says in one line that nothing is readable; never other values."""
    import tempfile
    import time
    import numpy as np
    from durability import fuzzing as fz
    from hypothesis import given, settings, strategies as st
    from converters.formats import training_ckpt
    from converters.errors import ConversionError
    expected = {s: training_ckpt.select(reference, s).flat for s in (32, STEPS)}
    # what a reader needs of a workdir: the checkpoints and the class names (not the logs, nor an XLA cache)
    needed = shutil.ignore_patterns('events.out.tfevents.*', 'xla_cache', 'summary.json')

    def check(workdir):
        try:
            ck = training_ckpt.select(workdir, 'latest', log=lambda m: None)
        except ConversionError as e:
            assert '\n' not in str(e)
            return
        assert ck.step in expected and ck.flat.keys() == expected[ck.step].keys()
        assert all(np.array_equal(ck.flat[k], v) for k, v in expected[ck.step].items())

    @settings(max_examples=fz.dir_target() if fz.LONG else 12)
    @given(st.data())
    def case(data):
        t0 = time.process_time()
        with tempfile.TemporaryDirectory() as tmp:  # (test_fuzz.py removes fz.WORKDIR when it ends)
            workdir = os.path.join(tmp, 'w')
            shutil.copytree(reference, workdir, ignore=needed)
            fz.mutate_dir(data.draw, os.path.join(workdir, 'checkpoints', str(STEPS)))
            fz.COUNTS['training-checkpoint'] += 1
            try:
                check(workdir)
            except BaseException:
                fz.FAILURES['training-checkpoint'] += 1
                raise
        fz.charge('training-checkpoint', t0)
    try:
        case()
    finally:
        fz.write_counts(only=['training-checkpoint'])


def test_checksums_are_the_same_on_the_devices_and_in_numpy_and_catch_one_bit():
    import jax
    import numpy as np
    from converters.formats import training_ckpt
    from vit_train.checkpoint import checksum_record, device_checksums
    rng = np.random.default_rng(0)
    state = dict(params={'a': {'kernel': rng.standard_normal((3, 5)).astype(np.float32)},
                         'b': rng.standard_normal(7).astype(np.float32)},
                 opt_state=(np.int32(12), {'mu': rng.standard_normal((2, 2, 2)).astype(np.float32)}),
                 step=np.int32(44))
    got = checksum_record(jax.device_get(jax.jit(device_checksums)(state)))
    assert got['params'] == {'a/kernel': training_ckpt.checksum(state['params']['a']['kernel']),
                             'b': training_ckpt.checksum(state['params']['b'])}
    assert got['train_state']["['step']"] == 44 and got['train_state']["['opt_state'][0]"] == 12
    b = state['params']['b']
    flipped, swapped = b.copy(), b.copy()
    flipped.view(np.uint32)[3] ^= 1
    swapped[[1, 2]] = swapped[[2, 1]]
    assert len({training_ckpt.checksum(x) for x in (b, flipped, swapped)}) == 3


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_trainer_skips_a_step_with_a_flipped_bit_and_ends_bit_identical(env, reference, tmp_path):
    """A bit flipped in the optimizer state: it restores without error, and only its checksum tells."""
    workdir = tmp_path / 'w'
    shutil.copytree(reference, workdir)
    _bit_flipped('train_state')(workdir / 'checkpoints' / str(STEPS))
    r = run(env, workdir, *BASE)
    warn = [line for line in errors(r.stderr) if line.startswith('warning: checkpoint')]
    assert len(warn) == 1 and f'step {STEPS} is unusable' in warn[0], warn
    assert re.search(r"/train_state: \['opt_state'\].* does not match its recorded checksum", warn[0]), warn
    assert 'resumed from the checkpoint of step 32 of 44 (epoch 2 of 2, step 10 of 22 in it)' in r.stdout, r.stdout
    assert_same_state(reference, workdir)
    assert summary(workdir)['val_acc'] == summary(reference)['val_acc']


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_no_usable_checkpoint_is_an_error_unless_fresh_start(env, reference, tmp_path):
    workdir = tmp_path / 'w'
    shutil.copytree(reference, workdir)
    _no_commit_record(workdir / 'checkpoints' / str(STEPS))
    (workdir / 'checkpoints' / '32' / 'data' / 'process_0-of-1.json').write_text('{"not": grain')
    r = run(env, workdir, *BASE, expect=1)
    last = errors(r.stderr)[-1]
    assert last.startswith('train_flax.py: error: ') and 'no usable checkpoint' in last and '--fresh-start' in last
    assert '44.corrupt' in last and '32.corrupt' in last
    assert steps_of(workdir) == []
    r = run(env, workdir, *BASE, expect=1)           # the next rerun does not quietly start over either
    assert 'no usable checkpoint' in r.stderr
    r = run(env, workdir, *BASE[:4], '--epochs', '1', *BASE[6:], '--fresh-start')
    assert 'resumed' not in r.stdout and steps_of(workdir) == [16, SPE]
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['16', '22', '32.corrupt', '44.corrupt']


def test_resume_with_a_state_of_another_shape_is_an_error_not_a_corrupt_step(env, reference, tmp_path):
    """--clip-grad 0 drops the clipping state from the optimizer state: the checkpoint would not restore into
    it, and was set aside as corrupt (both steps, then a silent start from scratch)."""
    workdir = tmp_path / 'w'
    shutil.copytree(reference, workdir)
    r = run(env, workdir, *BASE[:4], '--epochs', '3', *BASE[6:], '--clip-grad', '0', expect=1)
    assert errors(r.stderr) == [f'train_flax.py: error: {workdir} holds a run with gradient_clipping=True, this '
                                f'command has gradient_clipping=False; use the same flags to resume it, or another '
                                f'--workdir'], r.stderr
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['32', '44']


# ---------------------------------------------------------------- non-finite updates

NAN_LR_AT = """
import vit_train.optim as optim
_schedule = optim.schedule
def schedule(*a):
    f = _schedule(*a)
    return lambda s: float('nan') if s == {step} else f(s)
optim.schedule = schedule
"""


def test_nan_update_at_an_epoch_end_never_reaches_a_checkpoint(env, tmp_path):
    """The loss of the epoch's last update is finite (it is computed before the update) but the update makes
    every parameter NaN: the epoch-end save must not happen, and the run must say where it stopped."""
    workdir = tmp_path / 'nan'
    r = run(env, workdir, *BASE, expect=3, patch=NAN_LR_AT.format(step=SPE - 1))
    last = errors(r.stderr)[-1]
    assert last == (f'train_flax.py: error: non-finite parameters after the update at step {SPE} (epoch 1); stopped. '
                    f'Last good checkpoint: step 16 in {workdir}/checkpoints'), last
    assert steps_of(workdir) == [16]
    from converters.formats import training_ckpt
    import numpy as np
    assert all(np.isfinite(v).all() for v in training_ckpt.select(workdir, 'latest').flat.values())
    assert not (workdir / 'summary.json').exists()  # no epoch was reported with NaN figures


# ---------------------------------------------------------------- signals

SIGNAL_AT_SAVE = """
import os, signal, orbax.checkpoint as ocp
_save = ocp.CheckpointManager.save
def save(self, step, *a, **k):
    if step == {step}:
        os.kill(os.getpid(), signal.{sig})  # arrives inside the save: the save must still start whole
    return _save(self, step, *a, **k)
ocp.CheckpointManager.save = save
"""


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_sigterm_then_sigint_then_resume_ends_bit_identical(env, reference, tmp_path):
    """SIGTERM from outside once a checkpoint exists, then SIGINT at the start of a save (injected: the moment an
    outside signal hits only by chance); each run ends after its in-flight save, naming it."""
    workdir = tmp_path / 'sig'
    for sig, code, inside_save in ((signal.SIGTERM, 143, False), (signal.SIGINT, 130, True)):
        after = min(s for s in (16, SPE, 32, 2 * SPE) if s > max(steps_of(workdir), default=0))
        patch = SIGNAL_AT_SAVE.format(step=after, sig=sig.name) if inside_save else None
        proc = subprocess.Popen(command(workdir, *BASE, patch=patch), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if not inside_save:
            wait_for(workdir / 'checkpoints' / str(after) / '_CHECKPOINT_METADATA', proc)
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == code, (proc.returncode, err[-3000:])
        last = errors(err)[-1]
        m = re.fullmatch(rf'train_flax.py: interrupted by {sig.name} after step (\d+) of {STEPS} \((.*)\); last '
                         rf'complete checkpoint: step (\d+) \((.*)\) in {re.escape(str(workdir))}/checkpoints; rerun '
                         rf'the same command to resume', last)
        assert m, last
        assert 'Traceback' not in err
        stopped, saved = int(m.group(1)), int(m.group(3))
        assert saved == steps_of(workdir)[-1] >= after and stopped >= saved
        # each step placed in its epoch as the epoch lines count (epoch 1 ends at step 22)
        from vit_train.report import place
        assert (m.group(2), m.group(4)) == (place(stopped, SPE, 2), place(saved, SPE, 2)), last
        if inside_save:
            assert steps_of(workdir)[-1] == after  # the save the signal interrupted was finished, not dropped
        assert not [n for n in os.listdir(workdir / 'checkpoints') if 'tmp' in n]  # the in-flight save finished
    r = run(env, workdir, *BASE)
    assert 'resumed from the checkpoint of step' in r.stdout
    assert_same_state(reference, workdir)


@pytest.mark.slow  # grain's worker processes each import jax: ~30 s of start-up here
def test_ctrl_c_to_the_process_group_with_grain_workers_is_one_line(env, tmp_path):
    """A terminal's Ctrl-C reaches every process of the group: the workers stay quiet, the run says one line."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in 'abc':
        (tmp_path / 'data' / c).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / 'data' / c / f'{i}.png')
    workdir = tmp_path / 'w'
    proc = subprocess.Popen(command(workdir, '--model', 'vit_tiny_patch16_224', '--depth', 1, '--img-size', 16,
                                    '--patch-size', 8, '--batch-size', 16,
                                    '--epochs', 20, '--save-every', 3, '--data-path', tmp_path / 'data', '--workers', 2),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for(workdir / 'checkpoints' / '3' / '_CHECKPOINT_METADATA', proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-3000:]
    assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
    assert len(errors(err)) == 1 and 'interrupted by SIGINT after step' in err, err[-3000:]


# ---------------------------------------------------------------- kill -9

KILL_DURING_SAVE = """
import os, signal
from vit_train import checkpoint
_save = checkpoint.Checkpoints.save
def save(self, step, *a, **k):
    t = _save(self, step, *a, **k)
    if step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)  # the asynchronous write has started, not finished
    return t
checkpoint.Checkpoints.save = save
"""

KILL_DURING_VALIDATION = """
import os, signal
from vit_train import loop
def evaluate(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)
loop.evaluate = evaluate
"""


RECORD_AFTER_RESUME = """
import json
from vit_train import checkpoint
_resume = checkpoint.Checkpoints.resume
def resume(self, *a, **k):
    r = _resume(self, *a, **k)
    with open({out!r}, 'w') as f:
        json.dump(self.steps(), f)  # what the workdir holds once the run has resumed, before it trains a step
    return r
checkpoint.Checkpoints.resume = resume
"""


def killed(env, workdir, patch):
    r = subprocess.run(command(workdir, *BASE, patch=patch), cwd=ROOT, env=env, capture_output=True, timeout=900)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]


def kept(steps):
    """The trainer's policy (--keep 2 plus the best by val_acc) on this schedule: the newest two, and step 22,
    the only validated step before the run's last (16 and 32 are mid-epoch saves, without val_acc)."""
    steps = sorted(steps)
    return sorted(set(steps[-2:]) | ({SPE} & set(steps)))


def may_leave(committed, in_flight=None):
    """Every workdir the kill contract (vit_train/checkpoint.py) allows after a kill, given the steps committed
    before it and the save in flight when it came: the in-flight save lost or committed; of the committed
    steps, those the policy keeps, plus at most one older step whose deletion was pending."""
    out = []
    for c in ([committed, committed + [in_flight]] if in_flight else [committed]):
        out.append(kept(c))
        out += [sorted(kept(c) + [s]) for s in c if s not in kept(c)]
    return out


ROUNDS = int(os.environ.get('VIT_FLAX_KILL_ROUNDS', '1'))


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('round_', range(ROUNDS))
def test_kill_9_mid_save_and_mid_validation_then_resume_bit_identical(env, reference, tmp_path, round_):
    """The kill contract, at three kills (a save in flight at an epoch end, one mid-epoch, validation):

    - after each kill the workdir holds what `may_leave` allows: of the steps committed so far, those the
      policy keeps (--keep 2 and the best), plus at most one older step whose pruning was pending, the save
      in flight lost or committed (which one is timing: the test accepts either, it asserts no timing);
    - the next run resumes from the newest step left, and prunes to the policy before it trains;
    - the run resumed to the end is bit-identical to an uninterrupted one, validation figures included.
    VIT_FLAX_KILL_ROUNDS=n repeats it n times on one reference run.
    """
    workdir, committed, seen = tmp_path / 'k', [], []

    def after_kill(in_flight):
        left = steps_of(workdir)
        seen.append(left)
        assert left in may_leave(committed, in_flight), (left, committed, in_flight)
        committed[:] = sorted(set(committed) | set(left))
        return left

    killed(env, workdir, KILL_DURING_SAVE.format(step=SPE))         # epoch-end save (22) in flight
    committed.append(16)
    after_kill(SPE)
    # resumes from 16 or 22: commits 22 if it was lost, then 32's save is in flight
    killed(env, workdir, KILL_DURING_SAVE.format(step=32))
    if SPE not in committed:
        committed.append(SPE)
    left = after_kill(32)
    # in epoch 2's validation: 32's save, when it was lost, is redone and may be in flight again
    killed(env, workdir, KILL_DURING_VALIDATION)
    left = after_kill(None if 32 in left else 32)
    record = tmp_path / 'after-resume.json'
    r = run(env, workdir, *BASE, patch=RECORD_AFTER_RESUME.format(out=str(record)))
    newest = max(left)
    assert f'resumed from the checkpoint of step {newest} of 44' in r.stdout, r.stdout
    print(f'steps left by the three kills: {seen}')
    assert json.loads(record.read_text()) == kept(left)                # pruned before the first step trained
    if kept(left) != left:
        assert 'beyond --keep 2 and the best (left by an interrupted run)' in r.stderr, r.stderr[-2000:]
    assert_same_state(reference, workdir)
    ref, got = summary(reference), summary(workdir)
    assert [h['val_loss'] for h in got['history']] == [h['val_loss'] for h in ref['history']]


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_kill_9_at_random_delays_then_resume_bit_identical(env, reference, tmp_path):
    """VIT_FLAX_TRAIN_KILLS runs (default 6) killed one after another, each at a random delay after it starts
    its epochs (class_indices.json rewritten: start-up is slow and uneven on a shared machine), then a rerun
    to the end: the final params must be bit-identical to the reference and the validation figures equal."""
    kills = int(os.environ.get('VIT_FLAX_TRAIN_KILLS', '6'))
    workdir, rng, record = tmp_path / 'k', random.Random(int(os.environ.get('VIT_FLAX_KILL_SEED', '0'))), []
    started, window = workdir / 'class_indices.json', 4.0
    for _ in range(kills):
        before, progress = started.stat().st_mtime_ns if started.exists() else None, steps_of(workdir)
        proc = subprocess.Popen(command(workdir, *BASE), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        while proc.poll() is None and (started.stat().st_mtime_ns if started.exists() else None) == before:
            time.sleep(0.02)
        delay = rng.uniform(0.0, window)
        time.sleep(delay)
        if proc.poll() is not None:
            break  # finished before the kill: the remaining kills would find nothing to do
        proc.kill()
        proc.wait()
        record.append((round(delay, 1), steps_of(workdir)))
        # no progress: this machine is slower than the window assumed; progress: aim earlier again
        window = window * 1.5 if record[-1][1] == progress else max(2.0, window / 1.5)
    print(f'kills: {len(record)} (delay s, steps after): {record}')
    assert len({tuple(s) for _, s in record}) > 1, 'no kill came after a checkpoint: the test proved nothing'
    r = run(env, workdir, *BASE)
    assert 'resumed' in r.stdout or 'already finished' in r.stdout
    assert_same_state(reference, workdir)
    got, ref = summary(workdir), summary(reference)
    assert got['val_acc'] == ref['val_acc'] and got['val_loss'] == ref['val_loss']
    assert not [n for n in os.listdir(workdir / 'checkpoints') if not n.isdigit()]


# ---------------------------------------------------------------- bad input to the training command

def test_workdir_that_is_a_file_fails_in_one_line(env, tmp_path):
    (tmp_path / 'f').write_text('not a directory')
    r = run(env, tmp_path / 'f', '--epochs', '1', expect=1)
    assert r.stderr.strip() == f'train_flax.py: error: --workdir {tmp_path}/f: {tmp_path}/f is a file, not a directory'
    # vit-flax train: the same exit status and line, under its own name
    r = cli_process('train', '--workdir', tmp_path / 'f' / 'run', env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 1 and r.stderr.strip() == (f'vit-flax train: error: --workdir {tmp_path}/f/run: '
                                                      f'{tmp_path}/f is a file, not a directory'), r.stderr


def test_bad_workdir_and_mesh_are_refused_before_anything_is_written(tmp_path):
    from vit_train import config, main
    from vit_train.errors import TrainError
    parser = config.build_parser()
    ro = tmp_path / 'ro'
    ro.mkdir()
    os.chmod(ro, 0o555)
    if os.geteuid() != 0:  # root writes anyway; there the file-system error is caught where it happens
        with pytest.raises(TrainError, match='is not writable'):
            config.resolve(parser.parse_args(['--workdir', str(ro / 'run')]))
    assert main(['--workdir', str(tmp_path / 'm'), '--mesh', 'data=3', '--epochs', '1']) == 1
    assert not (tmp_path / 'm').exists()


def test_unexpected_error_is_one_line_with_a_debug_hint(tmp_path, capsys, monkeypatch):
    from vit_train import data, main

    def boom(*a):
        raise RuntimeError('something we did not expect\nsecond line')
    monkeypatch.setattr(data, 'load', boom)
    assert main(['--workdir', str(tmp_path / 'w')]) == 70
    err = capsys.readouterr().err.strip()
    assert err.startswith('train_flax.py: internal error: RuntimeError: something we did not expect (at ')
    assert err.endswith('rerun with --debug for the traceback)') and '\n' not in err
    with pytest.raises(RuntimeError):
        main(['--workdir', str(tmp_path / 'w'), '--debug'])
    assert not (tmp_path / 'w').exists()


def test_corrupt_images_become_counted_zero_weight_rows_named_once(tmp_path, capsys):
    """A truncated JPEG, a zero-byte file and a text file named .png: each a weight-0 row counted as
    unreadable (the run trains on; the count reaches the epoch line, summary.json and TensorBoard, see
    test_train's folder run), its name warned about once per process."""
    import numpy as np
    from PIL import Image
    from vit_train import data
    good = tmp_path / 'good.jpg'
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(good)
    bad = [tmp_path / 'cut.jpg', tmp_path / 'empty.jpg', tmp_path / 'text.png']
    bad[0].write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    bad[1].write_bytes(b'')
    bad[2].write_text('this is not a png\n')
    source = data.FileSource([str(p) for p in [good] + bad], [0, 1, 2, 3])
    tf = data.TrainTransform(8, 'bilinear')
    rows = [tf(source[i], np.random.default_rng(i)) for i in range(4)] + [tf(source[1], np.random.default_rng(9))]
    assert [int(r['unreadable']) for r in rows] == [0, 1, 1, 1, 1]
    assert [float(r['weight']) for r in rows] == [1, 0, 0, 0, 0]
    assert rows[0]['image'].shape == (8, 8, 3) and rows[0]['image'].any() and not rows[1]['image'].any()
    err = capsys.readouterr().err
    for p in bad:
        assert err.count(f'warning: skipped unreadable image {p} (') == 1, err


def test_an_unreadable_image_is_named_once_per_run_not_once_per_process(tmp_path, capsys):
    """grain's worker processes each remember only what they warned about themselves: a run with workers named a
    file once per worker that read it, and once more for the main process's evaluation. The trainer's transforms
    share a directory for the whole run (`warned_dir`): here two fresh processes, as grain's workers are, and this
    one read the same file, and it is named once."""
    import pickle
    from vit_train import data
    bad, warned = tmp_path / 'bad.jpg', tmp_path / 'warned'
    bad.write_bytes(b'\xff\xd8 not really a jpeg')
    warned.mkdir()
    code = ('import pickle, sys, numpy as np; tf = pickle.loads(sys.stdin.buffer.read()); '
            'assert tf({"path": sys.argv[1], "label": 0}, np.random.default_rng(0))["unreadable"] == 1')
    tf = pickle.dumps(data.TrainTransform(8, 'bilinear', warned_dir=str(warned)))
    workers = [subprocess.run([sys.executable, '-c', code, str(bad)], input=tf, capture_output=True, cwd=ROOT,
                              timeout=300) for _ in range(2)]
    assert [w.returncode for w in workers] == [0, 0], [w.stderr[-2000:] for w in workers]
    assert data.EvalTransform(8, 'bilinear', warned_dir=str(warned))({'path': str(bad), 'label': 0})['unreadable'] == 1
    said = ''.join(w.stderr.decode() for w in workers) + capsys.readouterr().err
    assert said.count(f'warning: skipped unreadable image {bad} (') == 1, said


def test_a_failed_save_is_one_line_naming_the_last_complete_checkpoint(reference, tmp_path, monkeypatch):
    """A full disk surfaces in orbax's thread, then at the next save or wait (found on a 4 MiB tmpfs: it was
    an 'internal error' with orbax's traceback)."""
    from vit_train.checkpoint import Checkpoints
    from vit_train.errors import TrainError
    shutil.copytree(reference, tmp_path / 'w')
    ck = Checkpoints(str(tmp_path / 'w'), 2)

    def full(*a, **k):
        raise ValueError('RESOURCE_EXHAUSTED: Failed to write 525083 bytes to file 7: No space left on device\nmore')
    monkeypatch.setattr(ck.manager, 'wait_until_finished', full)
    with pytest.raises(TrainError) as e:
        ck.wait()
    assert str(e.value) == (f'{tmp_path}/w/checkpoints: saving a checkpoint failed (ValueError: RESOURCE_EXHAUSTED: '
                            f'Failed to write 525083 bytes to file 7: No space left on device); the last complete '
                            f'checkpoint is step {STEPS}')
    monkeypatch.undo()
    ck.close()
