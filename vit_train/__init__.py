"""Training and fine-tuning for vit_flax models: grain data pipelines, optax, jax.sharding (data + FSDP,
multi-process) and resumable orbax checkpoints in the format `converters.training_ckpt` reads.

`main(argv)` is the command line (`train_flax.py`, `vit-flax train`). This module stays light: grain's
worker processes import `vit_train.data` and must not pay for jax or the models.
"""
import sys


def main(argv=None, prog=None) -> int:
    """Run the training command; returns the exit status (1: bad input, 3: non-finite loss)."""
    from converters.errors import ConversionError
    from .errors import NonFiniteLoss, TrainError
    from .loop import run
    name = prog or 'train_flax.py'
    try:
        return run(argv, prog)
    except NonFiniteLoss as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        return 3
    except (TrainError, ConversionError) as e:
        print(f'{name}: error: {e}', file=sys.stderr)
        return 1
