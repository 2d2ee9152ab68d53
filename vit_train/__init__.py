"""Training and fine-tuning for vit_flax models: grain data pipelines, optax, jax.sharding (data + FSDP,
multi-process) and resumable orbax checkpoints in the format `converters.formats.training_ckpt` reads.

`main(argv)` is the command line (`train_flax.py`, `vit-flax train`); `train(config)` and `train_iter(config)`
are the same run from Python (a notebook), with `TrainConfig` for the flags:

    result = vit_train.train(vit_train.TrainConfig(epochs=2, depth=1, workdir='runs/demo'),
                             on_epoch=lambda r: print(r['epoch'], r['val_acc']))
    result.params, result.state, result.history, result.workdir, result.model
    for record in vit_train.train_iter(dict(epochs=2, workdir='runs/demo2')): ...   # one record per epoch

This module stays light: grain's worker processes import `vit_train.data` and must not pay for jax or the
models (TrainConfig, TrainResult and TrainError are imported on first use).
"""
import contextlib
import os
import signal
import sys
import threading
import traceback

__all__ = ['main', 'train', 'train_iter', 'TrainConfig', 'TrainResult', 'TrainError', 'NonFiniteLoss', 'Interrupted']


def __getattr__(name):
    if name == 'TrainConfig':
        from .config import TrainConfig
        return TrainConfig
    if name == 'TrainResult':
        from .loop import TrainResult
        return TrainResult
    if name in ('TrainError', 'NonFiniteLoss', 'Interrupted'):
        from . import errors
        return getattr(errors, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


@contextlib.contextmanager
def _signals_handled():
    """SIGINT and SIGTERM raise Interrupted inside the block (after an in-flight save) when it runs in the main
    thread; the handlers before it are put back after."""
    from .errors import on_signal
    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = [signal.signal(s, on_signal) for s in handled]
    try:
        yield
    finally:
        for s, h in zip(handled, previous):
            signal.signal(s, h)


class TrainRun:
    """The iterator `train_iter` returns: each `next()` trains one more epoch and gives its record (what
    summary.json holds after it, less `history`: epoch, epochs, step, train_loss, train_acc, val_loss, val_acc,
    best_val_acc, learning_rate, images_per_sec, ...). When it is exhausted, `result` holds the TrainResult
    (None before). `close()` (or leaving a `with` block) stops early: in-flight saves finish, the workdir
    resumes from the last checkpoint. SIGINT/SIGTERM handlers are installed only while an epoch runs."""

    def __init__(self, config):
        from .config import from_python
        from .loop import run_iter
        self.result = None
        self._gen = run_iter(_python_errors(from_python, config))

    def __iter__(self):
        return self

    def __next__(self):
        if self._gen is None:
            raise StopIteration
        try:
            with _signals_handled():
                return _python_errors(next, self._gen)
        except StopIteration as stop:
            self.result, self._gen = stop.value, None
            raise StopIteration from None
        except BaseException:
            self._gen = None
            raise

    def close(self):
        if self._gen is not None:
            with _signals_handled():
                self._gen.close()
            self._gen = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _python_errors(fn, *a):
    """fn(*a), with the converters' and the models' bad-input errors raised as TrainError (same message), so a
    caller catches one class for bad input."""
    from converters.errors import ConversionError
    from vit_flax.errors import ModelConfigError
    from .errors import TrainError
    try:
        return fn(*a)
    except (ConversionError, ModelConfigError) as e:
        raise TrainError(str(e)) from e


def train_iter(config) -> TrainRun:
    """Start the run `config` describes (a TrainConfig, or a dict of its fields; see `train`) and return an
    iterator over its epochs' records; its `result` is the TrainResult once the run is done."""
    return TrainRun(config)


def train(config, on_epoch=None):
    """Train as `python train_flax.py` does with the flags `config` holds, in this process; returns a
    `TrainResult` (params, state, history, workdir, model, best_val_acc).

    `config`: a `TrainConfig`, or a dict of its fields (the rest default; an unknown key is a TrainError naming
    it and the close matches). `on_epoch(record)` is called after each epoch with its record (see TrainRun).
    Rerunning on the same workdir resumes (or returns at once when the run is finished), as the command line.
    Errors are exceptions: TrainError for bad input (NonFiniteLoss, a subclass, for a NaN/Inf loss), Interrupted
    (a KeyboardInterrupt) for SIGINT/SIGTERM. Nothing of the process is left changed: the signal handlers,
    absl's verbosity and jax's config are as before (jax's compilation cache is the caller's to set)."""
    run = TrainRun(config)
    try:
        for record in run:
            if on_epoch is not None:
                on_epoch(record)
    finally:
        run.close()
    return run.result


def main(argv=None, prog=None) -> int:
    """Run the training command; returns the exit status: 0 done, 1 bad input, 2 usage, 3 non-finite loss,
    70 an internal error (one line; `--debug` shows the traceback), 130 SIGINT, 143 SIGTERM."""
    from converters.errors import ConversionError, first_line, quiet_unraisable
    from vit_flax.errors import ModelConfigError
    from .errors import Interrupted, NonFiniteLoss, TrainError
    from .loop import run
    name = prog or 'train_flax.py'
    argv = sys.argv[1:] if argv is None else list(argv)

    unraisablehook = quiet_unraisable(argv)
    try:
        with _signals_handled():
            return run(argv, prog)
    except Interrupted as e:
        print(f'{name}: {e}', file=sys.stderr)
        return e.code
    except NonFiniteLoss as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        return 3
    except (TrainError, ConversionError, ModelConfigError) as e:   # a model refusing its config is bad input too
        print(f'{name}: error: {e}', file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - anything else is our bug: say so in one line, never as bad input
        if '--debug' in argv:
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(f'{name}: internal error: {type(e).__name__}: {first_line(e)} (at {os.path.basename(where.filename)}:'
              f'{where.lineno}; rerun with --debug for the traceback)', file=sys.stderr)
        return 70
    finally:
        sys.unraisablehook = unraisablehook
