"""Training and fine-tuning for vit_flax models: grain data pipelines, optax, jax.sharding (data + FSDP,
multi-process) and resumable orbax checkpoints in the format `converters.formats.training_ckpt` reads.

`main(argv)` is the command line (`train_flax.py`, `vit-flax train`). This module stays light: grain's
worker processes import `vit_train.data` and must not pay for jax or the models.
"""
import os
import signal
import sys
import threading
import traceback


def main(argv=None, prog=None) -> int:
    """Run the training command; returns the exit status: 0 done, 1 bad input, 2 usage, 3 non-finite loss,
    70 an internal error (one line; `--debug` shows the traceback), 130 SIGINT, 143 SIGTERM."""
    from converters.errors import ConversionError, first_line, quiet_unraisable
    from vit_flax.errors import ModelConfigError
    from .errors import Interrupted, NonFiniteLoss, TrainError, on_signal
    from .loop import run
    name = prog or 'train_flax.py'
    argv = sys.argv[1:] if argv is None else list(argv)

    handled = (signal.SIGINT, signal.SIGTERM) if threading.current_thread() is threading.main_thread() else ()
    previous = [signal.signal(s, on_signal) for s in handled]
    unraisablehook = quiet_unraisable(argv)
    try:
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
        for s, h in zip(handled, previous):
            signal.signal(s, h)
        sys.unraisablehook = unraisablehook
