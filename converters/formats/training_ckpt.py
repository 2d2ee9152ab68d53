"""The training checkpoint format (written by `vit_train`, read here): layout, metadata, and the reader.

On disk (`WORKDIR` is the training run's `--workdir`)::

    WORKDIR/
      checkpoints/                 an orbax CheckpointManager root
        <step>/                    one finalized step (the optimizer step count; plain decimal name)
          params/                  item `params`: the model's Flax param tree (StandardSave, float32)
          train_state/             item `train_state`: {'opt_state', 'step'} (StandardSave); its structure
                                   depends on the optimizer: readers other than the trainer ignore it
          data/                    item `data`: grain iterator state, `process_<i>-of-<n>.json` per process
          ema/                     item `ema` (runs with --model-ema only): the EMA of the params, the same tree
          meta/                    item `meta`: one JSON record (JsonSave), see META_FIELDS; with an EMA also
                                   `val_acc_ema` (None inside an epoch)
          metrics/                 orbax's own copy of {'val_acc'} that its keep-best policy ranks
          _CHECKPOINT_METADATA     orbax's commit record (a step without it is half-written: skipped)
        <step>.orbax-checkpoint-tmp-*   a save in flight or killed: never a step
        <step>.corrupt             a step the trainer could not restore, moved aside
      class_indices.json           {"0": "daisy", ...} as WZMIAOMIAO's scripts write it
      summary.json                 the last epoch's figures (rewritten each epoch)
      events.out.tfevents.*        TensorBoard scalars

A reader needs only `params` and `meta`: the params restore as host numpy on any number of devices
(whatever mesh wrote them), and the meta record rebuilds the model and its preprocessing with nothing
else beside it (`model_from_meta`).

Orbax keeps no checksum: a flipped bit in an array file restores silently. The trainer records one per
array in `meta['checksums']` (`checksum`: params by flat key, the optimizer state by tree path); `read_params`
checks the params against it when present (checkpoints written before it have none), the trainer both items.

Which step: `latest` is the highest finalized step; `best` is the step with the highest `val_acc`, or
`val_acc_ema` where the EMA did better (`score`; steps without one, saved mid-epoch, are never best), the
later step on a tie. `select(..., ema=True)` reads the `ema` item instead of `params`. A step whose `params` or
`meta` cannot be read, whose params do not match their checksums, or whose meta is not this format, is
skipped with a warning and the next candidate is used; a step asked for by number is never replaced.

The trainer keeps the last `--keep` steps and the best one; each epoch end is a step (plus every
`--save-every` steps when set).
"""
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import numpy as np
from flax.traverse_util import unflatten_dict

from .orbax import read_orbax
from . import paths
from ..errors import ConversionError

FORMAT = 'vit-flax-train'
VERSION = 1
CHECKPOINTS_DIR = 'checkpoints'
PARAMS, TRAIN_STATE, DATA, META = 'params', 'train_state', 'data', 'meta'
ITEMS = (PARAMS, TRAIN_STATE, DATA, META)
EMA = 'ema'   # optional item: the weight EMA (--model-ema), a params tree like `params`
CORRUPT_SUFFIX = '.corrupt'
COMMIT_RECORD = '_CHECKPOINT_METADATA'
CLASS_INDICES = 'class_indices.json'
SUMMARY = 'summary.json'

# Every meta record holds these keys (values may be None where noted in CONTRACT: val_* on mid-epoch steps,
# weights when trained from scratch).
META_FIELDS = (
    'format', 'version',
    'model', 'model_overrides', 'num_classes', 'class_names', 'dtype',
    'pretrained_cfg',                       # timm's vocabulary, see PRETRAINED_CFG_FIELDS
    'epoch', 'step', 'steps_per_epoch', 'epochs',
    'train_loss', 'train_acc', 'val_loss', 'val_acc', 'best_val_acc',
    'weights',                              # None or {'path', 'format', 'normalization'}
    'dataset', 'num_processes', 'data_workers', 'config',
)
PRETRAINED_CFG_FIELDS = ('input_size', 'interpolation', 'crop_pct', 'crop_mode', 'mean', 'std')


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


def check_meta(meta: dict, where: str = 'meta') -> dict:
    """Raise ConversionError unless `meta` is a complete record of this format (the writer calls it too)."""
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
        raise ConversionError(f'{where}: not a {FORMAT} metadata record')
    if meta.get('version') != VERSION:
        raise ConversionError(f'{where}: {FORMAT} version {meta.get("version")!r}; this reader knows {VERSION}')
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise ConversionError(f'{where}: metadata lacks {", ".join(missing)}')
    sums = meta.get('checksums')  # optional: {'params': {flat key: int}, 'train_state': {path: int}}
    if sums is not None and not (isinstance(sums, dict) and all(
            isinstance(v, dict) and all(isinstance(c, int) for c in v.values()) for v in sums.values())):
        raise ConversionError(f'{where}: checksums is not a record of integers')
    cfg = meta['pretrained_cfg']
    missing = [k for k in PRETRAINED_CFG_FIELDS if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ConversionError(f'{where}: pretrained_cfg lacks {", ".join(missing)}')
    return meta


# ---------------------------------------------------------------- locating checkpoints

def checkpoint_root(path: str):
    """(root, step or None) for a workdir, its `checkpoints/` directory, or one step directory in it."""
    path = paths.resolve(str(path).rstrip('/'))
    if paths.isdir(paths.join(path, CHECKPOINTS_DIR)):
        return paths.join(path, CHECKPOINTS_DIR), None
    name = paths.basename(path)
    if name.isdigit() and paths.isdir(paths.join(path, META)):
        return paths.dirname(path), int(name)
    return path, None


def is_training_checkpoint(path: str) -> bool:
    """True for a training workdir, its checkpoints root, or a step in it (an existing step, or none yet)."""
    root, step = checkpoint_root(path)
    if step is not None:
        return True
    return any(n.isdigit() and paths.isdir(paths.join(root, n, META)) for n in paths.listdir(root))


def list_steps(root: str) -> List[int]:
    """Finalized steps under an orbax root, ascending (in-flight `*.orbax-checkpoint-tmp-*` excluded)."""
    import orbax.checkpoint as ocp
    return sorted(ocp.utils.checkpoint_steps(paths.epath(root))) if paths.isdir(root) else []


def step_dir(root: str, step: int) -> str:
    return paths.join(root, str(step))


# ---------------------------------------------------------------- reading one step

def read_meta(root: str, step: int) -> dict:
    commit = paths.join(step_dir(root, step), COMMIT_RECORD)
    if not paths.isfile(commit):  # orbax writes it before it renames the step into place
        raise ConversionError(f'{commit}: missing: a half-written or half-copied step')
    path = paths.join(step_dir(root, step), META)
    try:
        import orbax.checkpoint as ocp
        meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(paths.epath(path))
    except Exception as e:  # noqa: BLE001 - orbax/json raise many types; all mean "unreadable"
        raise ConversionError(f'{path}: unreadable metadata ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""})') from None
    return check_meta(meta, path)


def checksum(a: np.ndarray) -> int:
    """An array's checksum as the trainer records it (`vit_train.checkpoint.checksums`, computed on the
    devices): sum over elements of bits[i] * (2i + 1) mod 2**32, bits = the element's 32-bit pattern (others
    cast to uint32). Modular sums do not depend on the order of the additions, so any sharding and any
    reader give the same number; orbax keeps no checksum of its own, and a flipped bit in an array file
    otherwise restores silently."""
    a = np.ascontiguousarray(a).reshape(-1)
    bits = a.view(np.uint32) if a.dtype.itemsize == 4 else a.astype(np.uint32)
    weights = np.arange(bits.size, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    return int(np.sum(bits * weights, dtype=np.uint32))


def check_checksums(got: Dict[str, int], recorded: Optional[Dict[str, int]], where: str) -> None:
    """Raise ConversionError unless `got` (key -> checksum) is `recorded` (None: nothing recorded)."""
    if recorded is None:
        return
    if sorted(got) != sorted(recorded):
        raise ConversionError(f'{where}: the arrays are not the ones recorded in meta (checksums of other keys)')
    for k in sorted(got):
        if got[k] != recorded[k]:
            raise ConversionError(f'{where}: {k} does not match its recorded checksum (a damaged array file)')


def read_params(root: str, step: int, meta: Optional[dict] = None, item: str = PARAMS) -> Dict[str, np.ndarray]:
    """The flat ('/'-joined) param tree of one step (`item` 'ema' for the weight EMA), as host numpy whatever
    mesh wrote it; checked against the checksums in `meta` when it has them."""
    path = paths.join(step_dir(root, step), item)
    if item == EMA and not paths.isdir(path):
        raise ConversionError(f'{step_dir(root, step)}: no EMA weights in this checkpoint (the run had no '
                              f'--model-ema)')
    flat = read_orbax(path)
    check_checksums({k: checksum(v) for k, v in flat.items()}, ((meta or {}).get('checksums') or {}).get(item), path)
    return flat


def has_ema(path: str) -> bool:
    """Whether a step directory holds the weight EMA."""
    return paths.isdir(paths.join(path, EMA))


def score(meta: dict):
    """What `best` ranks a step by: the better of val_acc and val_acc_ema (None inside an epoch)."""
    accs = [a for a in (meta.get('val_acc'), meta.get('val_acc_ema')) if isinstance(a, (int, float)) and
            math.isfinite(a)]
    return max(accs) if accs else None


@dataclass
class TrainCheckpoint:
    path: str                       # the step directory
    step: int
    meta: dict
    flat: Dict[str, np.ndarray]     # flat Flax params, host numpy
    ema: bool = False               # flat is the weight EMA (the `ema` item), not the raw params

    @property
    def params(self):
        return unflatten_dict(self.flat, sep='/')


def _candidates(root: str, which: str, log) -> List[int]:
    steps = list_steps(root)
    if which == 'latest':
        return steps[::-1]
    scored = []
    for s in steps:
        try:
            acc = score(read_meta(root, s))
        except ConversionError as e:
            log(f'warning: {e}; skipped')
            continue
        if acc is not None:
            scored.append((acc, s))
    return [s for _, s in sorted(scored, reverse=True)]


def select(path: str, which: Union[str, int] = 'best', log: Callable[[str], None] = _stderr,
           ema: bool = False) -> TrainCheckpoint:
    """Restore params (the weight EMA with `ema`) + meta of one step: 'best' (by `score`), 'latest', or a
    step number.

    `path` is a workdir, its checkpoints root or a step directory (which then fixes the step). A corrupt or
    half-written candidate is skipped with a warning through `log`; an explicit step is never replaced.
    """
    root, fixed = checkpoint_root(path)
    item = EMA if ema else PARAMS
    if fixed is not None:
        which = fixed
    if isinstance(which, int) or (isinstance(which, str) and which.isdigit()):
        step = int(which)
        if step not in list_steps(root):
            raise ConversionError(f'{root}: no finalized checkpoint step {step} (steps: {list_steps(root)})')
        meta = read_meta(root, step)
        return TrainCheckpoint(step_dir(root, step), step, meta, read_params(root, step, meta, item), ema)
    if which not in ('best', 'latest'):
        raise ConversionError(f"checkpoint selector {which!r}: expected 'best', 'latest' or a step number")
    candidates = _candidates(root, which, log)
    for step in candidates:
        try:
            meta = read_meta(root, step)
            return TrainCheckpoint(step_dir(root, step), step, meta, read_params(root, step, meta, item), ema)
        except ConversionError as e:
            if ema and not has_ema(step_dir(root, step)):
                raise
            log(f'warning: {e}; trying the next candidate')
    what = 'with a validation accuracy ' if which == 'best' else ''
    raise ConversionError(f'{root}: no readable training checkpoint {what}(steps found: {list_steps(root)})')


# ---------------------------------------------------------------- rebuilding from the record

def model_overrides(meta: dict) -> dict:
    """The overrides for `vit_flax.create_model(meta['model'], **...)`, JSON lists back to tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}


def model_from_meta(meta: dict, **extra):
    """The float32 model the checkpoint's params belong to (pass dtype=... for another compute dtype)."""
    from vit_flax.registry import create_model   # (importing it registers every model)
    return create_model(meta['model'], **{**model_overrides(meta), **extra})


def write_class_indices(path: str, class_names: List[str]) -> None:
    """WZMIAOMIAO's `class_indices.json`: {"0": "daisy", ...}, indent 4 (atomic and durable: rewritten by each run)."""
    paths.write_text(path, json.dumps({str(i): n for i, n in enumerate(class_names)}, indent=4))
