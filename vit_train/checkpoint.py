"""Writing and resuming training checkpoints: the orbax CheckpointManager side of `converters.formats.training_ckpt`.

Saves are asynchronous: `save` blocks only while the arrays are copied off the devices, then orbax writes
in a background thread and finalizes the step by renaming its temporary directory, then deletes the steps the
policy no longer keeps (the newest `--keep` plus the best by validation accuracy).

What a kill (-9, a lost host) may leave, and what the next run does with it (the kill contract):
- a save in flight: no step, only a `*.orbax-checkpoint-tmp-*` directory, removed when the next run starts;
  the step is lost and the next run trains it again (bit-identical: the data order is in the checkpoint);
- a save committed but its pruning not done (killed between orbax's rename and its deletions): one extra old
  step, whole or partly deleted, beside the ones the policy keeps. Harmless: the next run resumes from the
  newest committed step that restores, then prunes to the policy (`prune`) before it trains a step.
Never: a committed step deleted that the policy keeps, or a half-written step taken for a committed one.
"""
import contextlib
import re
import time
from typing import Callable

import absl.logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from converters.formats import paths, training_ckpt as fmt
from converters.errors import ConversionError, first_line

from .errors import TrainError



@contextlib.contextmanager
def quiet_orbax():
    """absl's verbosity at ERROR for the block (orbax narrates every save at INFO/WARNING), then as before:
    a run from Python leaves the caller's logging as it found it."""
    previous = absl.logging.get_verbosity()
    absl.logging.set_verbosity(absl.logging.ERROR)
    try:
        yield
    finally:
        absl.logging.set_verbosity(previous)


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Checkpoints:
    def __init__(self, workdir: str, keep: int):
        self.keep = keep
        # orbax wants absolute paths; a URL (gs://bucket/run) it takes as an etils.epath
        self.root = paths.join(paths.resolve(workdir), fmt.CHECKPOINTS_DIR)
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=keep),
            ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m['val_acc'], n=1,
                                          keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda m: m['val_acc'], best_mode='max',
            enable_async_checkpointing=True, cleanup_tmp_directories=True, create=True)
        try:
            self.manager = ocp.CheckpointManager(paths.epath(self.root), options=options)
        except OSError as e:  # not writable after all (a read-only file system; root ignores permissions)
            raise TrainError(f'--workdir {workdir}: cannot create {self.root} ({type(e).__name__}: {e})') from None
        except ImportError as e:  # gs:// without gcsfs (etils) or google-cloud-storage (orbax)
            raise TrainError(f'--workdir {workdir}: {type(e).__name__}: {first_line(e)} (a gs:// workdir needs '
                             f'pip install gcsfs google-cloud-storage)') from None

    def steps(self):
        return fmt.list_steps(self.root)

    def save(self, step: int, state: dict, data_iter, meta: dict) -> float:
        """Start an asynchronous save; returns the seconds the caller was blocked."""
        fmt.check_meta(meta, 'meta to save')
        t0 = time.perf_counter()
        acc = fmt.score(meta)   # the better of the raw weights and the EMA ranks the step for keep-best
        items = {fmt.PARAMS: ocp.args.StandardSave(state['params']),
                 fmt.TRAIN_STATE: ocp.args.StandardSave({'opt_state': state['opt_state'], 'step': state['step']}),
                 fmt.DATA: _grain_save(data_iter),
                 fmt.META: ocp.args.JsonSave(meta)}
        if 'ema' in state:
            items[fmt.EMA] = ocp.args.StandardSave(state['ema'])
        args = ocp.args.Composite(**items)
        with self._save_errors():  # also the previous save's, which this one waits for
            self.manager.save(step, args=args, metrics={'val_acc': acc} if acc is not None else None, force=True)
        return time.perf_counter() - t0

    def resume(self, abstract_state: dict, make_data_iter: Callable, check: Callable[[dict], None],
               log: Callable[[str], None], checksums: Callable[[dict], dict] = None):
        """Restore the newest readable step: (state, data iterator, meta), or None when there is none.

        `make_data_iter(meta)` returns (a fresh iterator, restore_its_state: bool); `check(meta)` raises when
        the checkpoint belongs to another run; `checksums(state)` gives the restored state's checksum record,
        compared with the one in meta (when it has one). A step that does not restore, or does not match its
        checksums, is moved aside to `<step>.corrupt` with a warning, and the one before it is tried."""
        for step in reversed(self.steps()):
            try:
                meta = fmt.read_meta(self.root, step)
            except ConversionError as e:
                self._set_aside(step, str(e), log)
                continue
            check(meta)  # another run's checkpoint is an error, not a corrupt step
            it, restore_data = make_data_iter(meta)
            items = {fmt.PARAMS: ocp.args.StandardRestore(abstract_state['params']),
                     fmt.TRAIN_STATE: ocp.args.StandardRestore(
                         {'opt_state': abstract_state['opt_state'], 'step': abstract_state['step']})}
            if restore_data:
                items[fmt.DATA] = _grain_restore(it)
            if 'ema' in abstract_state:
                items[fmt.EMA] = ocp.args.StandardRestore(abstract_state['ema'])
            try:
                r = self.manager.restore(step, args=ocp.args.Composite(**items))
                state = dict(params=r[fmt.PARAMS], opt_state=r[fmt.TRAIN_STATE]['opt_state'],
                             step=r[fmt.TRAIN_STATE]['step'])
                if 'ema' in abstract_state:
                    state['ema'] = r[fmt.EMA]
                if checksums and meta.get('checksums'):
                    got = checksums(state)
                    for item in (fmt.PARAMS, fmt.TRAIN_STATE) + ((fmt.EMA,) if 'ema' in state else ()):
                        fmt.check_checksums(got[item], meta['checksums'].get(item), f'{self.root}/{step}/{item}')
            except ConversionError as e:
                self._set_aside(step, str(e), log)
                close_iterator(it)
                continue
            except Exception as e:  # noqa: BLE001 - orbax, tensorstore and grain raise many types
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
                self._set_aside(step, f'{self.root}/{step}: does not restore ({type(e).__name__}: {msg})', log)
                close_iterator(it)
                continue
            self.prune(log)
            return state, it, meta
        return None

    def kept(self):
        """The committed steps the policy keeps: the newest `keep`, and the best by val_acc (orbax's metrics)."""
        steps = sorted(self.manager.all_steps())
        keep = set(steps[-self.keep:])
        best = self.manager.best_step()
        return keep | ({best} if best is not None else set())

    def prune(self, log: Callable[[str], None]) -> list:
        """Delete the steps the policy does not keep: what a run killed between a save's commit and orbax's
        pruning left behind (see the module docstring). Called after a resume, before any training step;
        returns the steps deleted. The step resumed from is the newest, which the policy always keeps."""
        self.manager.reload()
        extra = [s for s in sorted(self.manager.all_steps()) if s not in self.kept()]
        for step in extra:
            self.manager.delete(step)
        if extra:
            log(f'checkpoints: removed step{"s" * (len(extra) > 1)} {", ".join(map(str, extra))}, beyond --keep '
                f'{self.keep} and the best (left by an interrupted run)')
        return extra

    def set_aside(self):
        """Names of the steps moved aside as unusable, by this run or an earlier one."""
        pattern = re.compile(r'\d+' + re.escape(fmt.CORRUPT_SUFFIX) + r'\d*')
        return sorted(n for n in paths.listdir(self.root) if pattern.fullmatch(n))

    def _set_aside(self, step: int, why: str, log) -> None:
        log(f'warning: checkpoint step {step} is unusable: {why}; falling back to the one before it')
        src = paths.join(self.root, str(step))
        if jax.process_index() == 0 and paths.isdir(src):
            dst, n = src + fmt.CORRUPT_SUFFIX, 1
            while paths.exists(dst):
                dst, n = f'{src}{fmt.CORRUPT_SUFFIX}{n}', n + 1
            paths.move(src, dst)
            log(f'warning: moved it to {dst}')
        _sync(f'set_aside_{step}')
        self.manager.reload()

    def wait(self) -> None:
        with self._save_errors():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._save_errors():
            self.manager.close()

    @contextlib.contextmanager
    def _save_errors(self):
        """A save that failed in orbax's thread (a full disk, a vanished file system) surfaces at the next
        save or wait: say so in one line (exit 1), naming what a rerun resumes from."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
            steps = self.steps()
            raise TrainError(f'{self.root}: saving a checkpoint failed ({type(e).__name__}: {first_line(e)}); '
                             f'the last complete checkpoint is ' + (f'step {steps[-1]}' if steps else 'none')) from None


def device_checksums(state: dict) -> dict:
    """Every array's checksum (`converters.formats.training_ckpt.checksum`), computed where the arrays live: jit it
    with the state's shardings. Returns {'params': tree, 'train_state': tree} of uint32 scalars."""
    def one(x):
        x = x.reshape(-1)
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32) if x.dtype.itemsize == 4 else x.astype(jnp.uint32)
        return jnp.sum(bits * (jnp.arange(x.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)
    out = {fmt.PARAMS: jax.tree.map(one, state['params']),
           fmt.TRAIN_STATE: jax.tree.map(one, {'opt_state': state['opt_state'], 'step': state['step']})}
    if 'ema' in state:
        out[fmt.EMA] = jax.tree.map(one, state['ema'])
    return out


def checksum_record(sums: dict) -> dict:
    """device_checksums' output (fetched) as the meta record: flat '/'-joined param keys, tree paths for the rest."""
    from flax.traverse_util import flatten_dict
    paths = jax.tree_util.tree_flatten_with_path(sums[fmt.TRAIN_STATE])[0]
    out = {fmt.PARAMS: {k: int(v) for k, v in flatten_dict(sums[fmt.PARAMS], sep='/').items()},
           fmt.TRAIN_STATE: {jax.tree_util.keystr(p): int(v) for p, v in paths}}
    if fmt.EMA in sums:
        out[fmt.EMA] = {k: int(v) for k, v in flatten_dict(sums[fmt.EMA], sep='/').items()}
    return out


def _grain_save(it):
    import grain
    return grain.checkpoint.CheckpointSave(it)


def _grain_restore(it):
    import grain
    return grain.checkpoint.CheckpointRestore(it)


def close_iterator(it) -> None:
    if hasattr(it, 'close'):  # grain's multiprocess prefetch holds worker processes
        it.close()
    drain_shared_memory_deletes()


def drain_shared_memory_deletes() -> None:
    """Wait for grain's pending unlinks of batches' shared memory. grain hands a dropped batch's segment to a
    thread pool (`SharedMemoryArray.enable_async_del`); a run stopped by Ctrl-C exits before that pool has run,
    and multiprocessing's resource tracker then unlinks the segments itself with a warning printed after the
    run's one-line message ('There appear to be 16 leaked shared_memory objects'). Later drops unlink at once."""
    import gc
    import sys
    shm = getattr(sys.modules.get('grain._src.python.ipc.shared_memory_array'), 'SharedMemoryArray', None)
    pool = getattr(shm, '_del_thread_pool', None)
    if pool is None:
        return
    gc.collect()   # batches held by reference cycles (a traceback's frames) are dropped now, into the pool
    shm._del_thread_pool = None
    pool.close()
    pool.join()
