"""The device mesh ('data', 'fsdp'), the FSDP rule for parameters and optimizer state, and global batches.

The batch is split over both mesh axes. With fsdp > 1 every large tensor is split over 'fsdp' along its
largest dimension that divides evenly (big_vision's rule); small tensors, and those with no such
dimension, are replicated. XLA inserts the all-gathers and reduce-scatters this implies.
"""
from typing import Dict, Tuple

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .errors import TrainError

AXES = ('data', 'fsdp')
BATCH_AXES = AXES
FSDP_MIN_SIZE = 2 ** 16  # elements; smaller tensors are replicated (their all-gather costs more than it saves)


def parse_mesh(text: str, num_devices: int) -> Dict[str, int]:
    """'data=N,fsdp=M' -> {'data': N, 'fsdp': M}; an axis left out (or -1) takes the remaining devices."""
    given = {}
    for part in filter(None, (text or '').replace(' ', '').split(',')):
        name, _, value = part.partition('=')
        if name not in AXES:
            raise TrainError(f'--mesh {text!r}: unknown axis {name!r} (axes: data, fsdp)')
        try:
            given[name] = int(value)
        except ValueError:
            raise TrainError(f'--mesh {text!r}: {name} wants an integer, got {value!r}') from None
        if given[name] == 0 or given[name] < -1:
            raise TrainError(f'--mesh {text!r}: {name} must be positive (or -1 for the rest)')
    fsdp = given.get('fsdp', 1)
    sizes = {'data': given.get('data', 1 if fsdp == -1 else -1), 'fsdp': fsdp}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise TrainError(f'--mesh {text!r}: only one axis may take the remaining devices')
    fixed = int(np.prod([v for v in sizes.values() if v != -1]))
    if free:
        if num_devices % fixed:
            raise TrainError(f'--mesh {text!r}: {num_devices} devices do not split into {fixed}')
        sizes[free[0]] = num_devices // fixed
    if sizes['data'] * sizes['fsdp'] != num_devices:
        raise TrainError(f'--mesh {text!r} uses {sizes["data"] * sizes["fsdp"]} devices, but there are {num_devices}')
    return sizes


def make_mesh(sizes: Dict[str, int], devices=None) -> Mesh:
    """The ('data', 'fsdp') mesh over `devices` (default: every device; a TPU topology's compile-only
    devices for vit_train.plan)."""
    # Auto axes: XLA propagates the shardings through the model (jax >= 0.7 defaults make_mesh to Explicit)
    return jax.make_mesh((sizes['data'], sizes['fsdp']), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                         **({} if devices is None else dict(devices=devices)))


def fsdp_spec(shape: Tuple[int, ...], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
    """Shard the largest dimension divisible by `fsdp` (the earlier one on a tie), if the tensor is large."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for d in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[d] % fsdp == 0:
            spec = [None] * len(shape)
            spec[d] = 'fsdp'
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh, min_size: int = FSDP_MIN_SIZE):
    """NamedShardings for every leaf of a tree of arrays (or ShapeDtypeStructs) by the FSDP rule."""
    fsdp = mesh.shape['fsdp']
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, sharding: NamedSharding) -> dict:
    """This process's rows -> global arrays split over the mesh (rows of process p follow those of p-1)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def put(tree, shardings):
    """Host numpy tree -> global arrays with `shardings` (each process holds the same host values)."""
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda idx: np.asarray(x)[idx]),
                        tree, shardings)


def describe(params) -> str:
    """'k of n tensors sharded over fsdp (x% of the parameters)', from the arrays' actual shardings."""
    leaves = jax.tree.leaves(params)
    split = [x for x in leaves if any(a is not None for a in x.sharding.spec)]
    total = sum(x.size for x in leaves)
    frac = sum(x.size for x in split) / max(total, 1)
    return f'{len(split)} of {len(leaves)} param tensors sharded over fsdp ({100 * frac:.1f}% of the parameters)'
