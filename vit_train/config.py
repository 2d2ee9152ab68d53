"""The run's settings: `TrainConfig` (the Python face: one field per command-line flag, dashes as
underscores, the same defaults) and the flags of train_flax.py / `vit-flax train`, whose defaults are read
from it (`build_parser` refuses a flag without a field or a field without a flag, so the two cannot drift)."""
import argparse
import dataclasses
import difflib
import numbers
import os
from typing import Optional, Tuple

import numpy as np

from .data import DATASETS, INTERPOLATIONS
from .errors import TrainError
from .optim import OPTIMIZERS

# `python train_flax.py` with no --model (the embedded digits demo): a small ViT that timm also builds
# (timm.create_model('vit_tiny_patch16_224', img_size=16, patch_size=8, depth=4)).
DEMO_MODEL = 'vit_tiny_patch16_224'
DEMO_OVERRIDES = dict(img_size=16, patch_size=8, depth=4)
# The model without --model, per data set: the tiny demo is for the 8x8 digits only; photos get ViT-S/16 at 224,
# CIFAR's 32x32 images ViT-S with 4x4 patches (timm.create_model('vit_small_patch16_224', img_size=32,
# patch_size=4): 64 patches, as the CIFAR ViT recipes use).
DEFAULT_MODELS = {
    'digits': (DEMO_MODEL, DEMO_OVERRIDES),
    'cifar10': ('vit_small_patch16_224', dict(img_size=32, patch_size=4)),
    'cifar100': ('vit_small_patch16_224', dict(img_size=32, patch_size=4)),
    'folder': ('vit_small_patch16_224', {}),
}

# Per data set: (crop_pct, RandomResizedCrop scale, horizontal flip). Digits are tiny and not mirror
# symmetric; the others follow WZMIAOMIAO's scripts (RandomResizedCrop + flip, Resize(256)/CenterCrop(224) for folders).
DATA_DEFAULTS = {
    'digits': (1.0, (0.85, 1.0), False),
    'cifar10': (1.0, (0.08, 1.0), True),
    'cifar100': (1.0, (0.08, 1.0), True),
    'folder': (0.875, (0.08, 1.0), True),
}
OPTIMIZER_DEFAULTS = {'adamw': dict(lr=1e-3, weight_decay=0.05), 'sgd': dict(lr=1e-3, weight_decay=5e-5)}


def _fraction(text):
    try:
        v = float(text)
    except ValueError:
        v = -1
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f'wants a fraction in [0, 1), got {text!r}')
    return v


def _model_text(model: str, overrides: dict) -> str:
    """'vit_small_patch16_224 at 224', 'vit_small_patch16_224 with patch_size=4 at 32'."""
    rest = {k: v for k, v in overrides.items() if k != 'img_size'}
    size = overrides.get('img_size', 224)  # every default is a *_224 model
    return model + (' with ' + ', '.join(f'{k}={v}' for k, v in rest.items()) if rest else '') + f' at {size}'


@dataclasses.dataclass
class TrainConfig:
    """Every training flag as a field (`--batch-size` is `batch_size`), with the command line's defaults; a
    None is "decided by the run" as for an absent flag (the model per data set, lr and weight decay per
    optimizer, ...). Each field means what its flag's `--help` says. `debug` only matters to the command
    line (tracebacks); from Python every error is an exception anyway."""
    # model
    model: Optional[str] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    depth: Optional[int] = None
    num_classes: Optional[int] = None
    drop_path: float = 0.0
    dtype: str = 'float32'
    weights: Optional[str] = None
    resample: str = 'bicubic'
    remat: Optional[str] = None          # 'full' is the bare --remat
    freeze_layers: bool = False
    # data
    dataset: Optional[str] = None
    data_path: Optional[str] = None
    val_split: float = 0.2
    workers: Optional[int] = None
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    interpolation: str = 'bilinear'
    crop_pct: Optional[float] = None
    crop_scale: Optional[Tuple[float, float]] = None
    hflip: Optional[bool] = None
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    grad_accum: int = 1
    optimizer: str = 'adamw'
    lr: Optional[float] = None
    lrf: float = 0.01
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    label_smoothing: float = 0.0
    clip_grad: float = 1.0
    seed: int = 0
    # run
    workdir: Optional[str] = None
    keep: int = 2
    save_every: int = 0
    debug: bool = False
    fresh_start: bool = False
    mesh: str = ''
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    distributed: bool = False
    plan: Optional[str] = None           # --plan TARGET: compile the step for TARGET, report, do not train


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def build_parser(prog=None) -> argparse.ArgumentParser:
    p = _flags(prog)
    dests = [a.dest for a in p._actions if a.dest != 'help']
    if sorted(dests) != sorted(FIELDS):  # a programming error, caught by any run and by the tests
        raise AssertionError(f'flags without a TrainConfig field: {sorted(set(dests) - set(FIELDS))}; '
                             f'fields without a flag: {sorted(set(FIELDS) - set(dests))}')
    p.set_defaults(**dataclasses.asdict(TrainConfig()))
    return p


def _field_error(name: str, flag: str, value, wants: str) -> TrainError:
    return TrainError(f'TrainConfig field {name} ({flag}) wants {wants}, got {value!r}')


def _check_value(action: argparse.Action, value):
    """The value as its flag would have parsed it, or a TrainError naming the field."""
    name, flag = action.dest, action.option_strings[0]
    if value is None and action.default is None:
        return None
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):   # switches
        if not isinstance(value, (bool, np.bool_)):
            raise _field_error(name, flag, value, 'True or False')
        return bool(value)
    if isinstance(action.nargs, int):
        if isinstance(value, (str, bytes)) or not hasattr(value, '__len__') or len(value) != action.nargs:
            raise _field_error(name, flag, value, f'a sequence of {action.nargs} numbers')
        return tuple(_scalar(action, name, flag, v) for v in value)
    if action.nargs == '?' and value is True:   # --remat bare
        return action.const
    return _scalar(action, name, flag, value)


def _scalar(action, name, flag, value):
    t = action.type
    if t is int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _field_error(name, flag, value, 'an integer')
        value = int(value)
    elif t in (float, _fraction):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _field_error(name, flag, value, 'a number')
        value = float(value)
        if t is _fraction and not 0 <= value < 1:
            raise _field_error(name, flag, value, 'a fraction in [0, 1)')
    elif not isinstance(value, (str, os.PathLike)):
        raise _field_error(name, flag, value, 'a string' + (f' (one of {", ".join(action.choices)})'
                                                            if action.choices else ''))
    else:
        value = os.fspath(value)
    if action.choices and value not in action.choices:
        raise _field_error(name, flag, value, f'one of {", ".join(map(str, action.choices))}')
    return value


def from_python(config) -> argparse.Namespace:
    """A TrainConfig, or a mapping of its fields (the rest default), as the namespace the flags would give;
    an unknown key or a value its flag would refuse is a one-line TrainError naming the field."""
    if isinstance(config, TrainConfig):
        values = dataclasses.asdict(config)
    elif hasattr(config, 'keys'):
        values = dict(config)
        for k in values:
            if k not in FIELDS:
                close = difflib.get_close_matches(str(k).replace('-', '_'), FIELDS, n=3, cutoff=0.6)
                raise TrainError(f'unknown TrainConfig field {k!r}' + (
                    f'; did you mean {" or ".join(map(repr, close))}?' if close else
                    f'; the fields are {", ".join(FIELDS)}'))
        values = dict(dataclasses.asdict(TrainConfig()), **values)
    else:
        raise TrainError(f'train() wants a TrainConfig or a dict of its fields, got {type(config).__name__}')
    actions = {a.dest: a for a in build_parser()._actions if a.dest != 'help'}
    return argparse.Namespace(**{k: _check_value(actions[k], v) for k, v in values.items()})


def _flags(prog=None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description='Train or fine-tune a ViT/DeiT/Swin with optax, grain, orbax and jax.sharding. '
        'With no arguments: a small ViT on scikit-learn digits. Rerunning the same command resumes.')
    m = p.add_argument_group('model')
    m.add_argument('--model', help='registered model name (default, per --dataset: ' + '; '.join(
        f'{name}: {_model_text(*DEFAULT_MODELS[name])}' for name in ('digits', 'folder', 'cifar10')).replace(
            'cifar10:', 'cifar10/cifar100:') + '; the start-up line says which)')
    m.add_argument('--img-size', type=int, help='input size (default: the model\'s own)')
    m.add_argument('--patch-size', type=int, help='patch size (default: the model\'s own)')
    m.add_argument('--depth', type=int, help='number of blocks (default: the model\'s own)')
    m.add_argument('--num-classes', type=int, help='head size (default: the number of classes in the data)')
    m.add_argument('--drop-path', type=_fraction, default=0.0, help='stochastic depth rate (default 0)')
    m.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='compute dtype; params and optimizer state stay float32 (default float32)')
    m.add_argument('--weights', help='checkpoint to fine-tune from: any format the converters read (.npz, .pth, '
                   '.safetensors, orbax) or a training workdir (its best step); the head is replaced and the '
                   'position embedding resampled to fit, every change logged (default: none, random initialisation)')
    m.add_argument('--resample', choices=('bicubic', 'bilinear', 'google'), default='bicubic',
                   help='position-embedding resampling for --weights (default bicubic, as timm for .pth)')
    m.add_argument('--remat', nargs='?', const='full', metavar='POLICY',
                   help='recompute each block in the backward pass to save memory (jax.checkpoint): bare for the '
                   'whole block, or a jax.checkpoint_policies name that saves some values, e.g. dots_saveable '
                   '(default: off, every activation kept)')
    m.add_argument('--freeze-layers', action='store_true',
                   help='train only the head (and pre_logits, head_dist); every other parameter stays bit-identical '
                   '(default: off, every parameter trains)')

    d = p.add_argument_group('data')
    d.add_argument('--dataset', choices=DATASETS, help='default: folder when --data-path is given, else digits')
    d.add_argument('--data-path', help='folder data set root, or the CIFAR directory / downloaded .tar.gz '
                   '(default: none, which only --dataset digits allows)')
    d.add_argument('--val-split', type=_fraction, default=0.2,
                   help='validation share of digits and of a folder without train/ and val/ (default 0.2)')
    d.add_argument('--workers', type=int,
                   help='grain worker processes (default: min(8, cpus) for folders, which decode files; '
                   '0 for the in-memory digits and CIFAR, where threads suffice)')
    d.add_argument('--mean', type=float, nargs=3, help='normalisation mean (default: what --weights were trained with)')
    d.add_argument('--std', type=float, nargs=3, help='normalisation std (default: as --mean)')
    d.add_argument('--interpolation', choices=INTERPOLATIONS, default='bilinear', help='resize filter (default bilinear)')
    d.add_argument('--crop-pct', type=float, help='evaluation: resize to img/crop_pct, centre crop img '
                   '(default 0.875 for folders, as WZMIAOMIAO\'s scripts; 1.0 for digits and CIFAR)')
    d.add_argument('--crop-scale', type=float, nargs=2, metavar=('MIN', 'MAX'),
                   help='training RandomResizedCrop area range (default 0.08 1, digits 0.85 1)')
    d.add_argument('--hflip', action=argparse.BooleanOptionalAction, help='random horizontal flip (default: on; off for digits)')

    o = p.add_argument_group('optimisation')
    o.add_argument('--epochs', type=int, default=10, help='number of passes over the training set (default 10)')
    o.add_argument('--batch-size', type=int, default=32,
                   help='global batch per update (default 32). An epoch is whole batches only: the remainder of '
                   'the shuffled training set (fewer than one batch) is left out, a different part each epoch; '
                   'the start-up line says how many images that is')
    o.add_argument('--grad-accum', type=int, default=1, help='split each batch into N micro-batches (default 1)')
    o.add_argument('--optimizer', choices=OPTIMIZERS, default='adamw', help='AdamW or SGD with momentum (default adamw)')
    o.add_argument('--lr', type=float, help='peak learning rate (default 1e-3, either optimizer)')
    o.add_argument('--lrf', type=float, default=0.01, help='final learning rate as a fraction of --lr (default 0.01)')
    o.add_argument('--warmup-epochs', type=float, default=1.0, help='linear warmup (default 1 epoch)')
    o.add_argument('--momentum', type=float, default=0.9, help='SGD momentum (default 0.9)')
    o.add_argument('--weight-decay', type=float, help='default: 0.05 (adamw), 5e-5 (sgd, as WZMIAOMIAO\'s scripts); never on '
                   'biases, norms, position embeddings, tokens or relative-position tables')
    o.add_argument('--label-smoothing', type=_fraction, default=0.0,
                   help='cross-entropy label smoothing in [0, 1) (default 0: none)')
    o.add_argument('--clip-grad', type=float, default=1.0, help='clip the global gradient norm (0: off; default 1)')
    o.add_argument('--seed', type=int, default=0,
                   help='seeds the initialisation, the shuffle, augmentation and dropout (default 0)')

    r = p.add_argument_group('run')
    r.add_argument('--workdir', help='checkpoints, logs, summary.json (default: runs/<dataset>-<model>)')
    r.add_argument('--keep', type=int, default=2, help='keep the last N checkpoints, plus the best (default 2)')
    r.add_argument('--save-every', type=int, default=0,
                   help='also checkpoint every N steps inside an epoch (default: at epoch ends only)')
    r.add_argument('--debug', action='store_true', help='show the traceback of an internal error (default: off, one line)')
    r.add_argument('--fresh-start', action='store_true',
                   help='when no checkpoint in --workdir restores (each is set aside as <step>.corrupt), train '
                   'from scratch there instead of stopping with an error (default: off)')
    r.add_argument('--mesh', default='', help="device mesh 'data=N,fsdp=M' (default: data over every device); "
                   'fsdp > 1 shards parameters and optimizer state')
    r.add_argument('--coordinator', help='multi-process: HOST:PORT of process 0 (jax.distributed.initialize; '
                   'default: none, a single process)')
    r.add_argument('--num-processes', type=int, help='multi-process: number of processes (default: none, a single process)')
    r.add_argument('--process-id', type=int, help='multi-process: this process\'s index, 0 to N-1 (default: none, a single process)')
    r.add_argument('--distributed', action='store_true',
                   help='call jax.distributed.initialize() with cluster auto-detection (SLURM, TPU pods, ...) '
                   '(default: off)')
    r.add_argument('--plan', metavar='TARGET',
                   help='compile exactly the training step this run would take (model, optimizer, mesh, remat, batch) '
                   'for TARGET (cpu, or tpu:TOPOLOGY such as tpu:v5e:2x2, compiled without a TPU; needs libtpu: '
                   "pip install 'vit-flax[tpu]'), print memory per device, FLOPs and the roofline, and exit without "
                   'training: 0 when it fits, 1 (with the largest batch that fits) when it does not (default: off)')
    return p


# integer flags and their least value
MINIMA = dict(img_size=1, patch_size=1, depth=1, num_classes=1, epochs=1, batch_size=1, grad_accum=1, keep=1,
              save_every=0, workers=0, num_processes=1, process_id=0)


def resolve(args) -> argparse.Namespace:
    """Check the integer flags; fill the defaults that depend on other flags (the model per data set, the
    per-dataset and per-optimizer values)."""
    a = argparse.Namespace(**vars(args))
    for k, lo in MINIMA.items():
        if getattr(a, k) is not None and getattr(a, k) < lo:
            raise TrainError(f'--{k.replace("_", "-")} wants an integer >= {lo}, got {getattr(a, k)}')
    if a.dataset is None:
        a.dataset = 'folder' if a.data_path else 'digits'
    a.demo = a.model is None and a.dataset == 'digits'
    a.default_model = None  # without --model: the line that says which model the data set got
    if a.model is None:
        a.model, preset = DEFAULT_MODELS[a.dataset]
        for k, v in preset.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        chosen = {k: getattr(a, k) for k in ('img_size', 'patch_size', 'depth') if getattr(a, k) is not None}
        why = 'the digits demo, default' if a.demo else 'default'
        a.default_model = (f'model: {_model_text(a.model, chosen)} ({why} for --dataset {a.dataset}; '
                           f'pass --model to choose)')
    crop_pct, scale, hflip = DATA_DEFAULTS[a.dataset]
    a.crop_pct = crop_pct if a.crop_pct is None else a.crop_pct
    a.crop_scale = tuple(scale if a.crop_scale is None else a.crop_scale)
    a.hflip = hflip if a.hflip is None else a.hflip
    for k, v in OPTIMIZER_DEFAULTS[a.optimizer].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.workers is None:
        a.workers = min(8, os.cpu_count() or 1) if a.dataset == 'folder' else 0
    if a.workdir is None:
        a.workdir = os.path.join('runs', f'{a.dataset}-{a.model}')
    a.workdir = os.path.abspath(a.workdir)
    check_workdir(a.workdir)
    return a


def check_workdir(path: str) -> None:
    """Refuse a --workdir that cannot be created or written, before anything is read or written."""
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise TrainError(f'--workdir {path}: {parent} is a file, not a directory')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f'--workdir {path}: {parent} is not writable')
