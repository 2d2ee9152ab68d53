"""The run's settings: `TrainConfig` (the Python face: one field per command-line flag, dashes as
underscores, the same defaults) and the flags of train_flax.py / `vit-flax train`, generated from its fields
(`build_parser`: each field's type, default, help and choices come from the field and its metadata, so the
two cannot drift); `resolve` checks the values and fills the defaults that depend on other flags."""
import argparse
import dataclasses
import difflib
import math
import numbers
import os
import typing
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
DEFAULT_MODELS.update(packed=DEFAULT_MODELS['folder'], hf=DEFAULT_MODELS['folder'])

# Per data set: (crop_pct, RandomResizedCrop scale, horizontal flip). Digits are tiny and not mirror
# symmetric; the others follow WZMIAOMIAO's scripts (RandomResizedCrop + flip, Resize(256)/CenterCrop(224) for folders).
DATA_DEFAULTS = {
    'digits': (1.0, (0.85, 1.0), False),
    'cifar10': (1.0, (0.08, 1.0), True),
    'cifar100': (1.0, (0.08, 1.0), True),
    'folder': (0.875, (0.08, 1.0), True),
}
DATA_DEFAULTS.update(packed=DATA_DEFAULTS['folder'], hf=DATA_DEFAULTS['folder'])
# the sets whose images are files, decoded in the pipeline's workers (digits and CIFAR are arrays in memory)
DECODED = ('folder', 'packed', 'hf')
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


def _switch(help_: str, group: str):
    """A bool flag that is off unless given (`--flag`)."""
    return _flag(False, help_, group, action='store_true')


def _flag(default, help_: str, group: str, **argparse_kw):
    """One field of TrainConfig and its flag: `help` (which states the default), the `group` of --help it is
    listed in, and whatever argparse needs beyond what the field's annotation says (type=, choices=, metavar=,
    action=, nargs=, const=, `aliases`: other spellings of the flag). The flag is `--` + the name with dashes."""
    return dataclasses.field(default=default, metadata=dict(help=help_, group=group, argparse=argparse_kw))


# the groups of --help, in order: a field's metadata names the key, --help shows the title
GROUPS = {'model': 'model', 'data': 'data',
          'augmentation': "augmentation (timm's flags and meanings; docs/TRAINING.md)",
          'optimisation': 'optimisation', 'recipe': 'recipe', 'evaluation and logging': 'evaluation and logging',
          'run': 'run'}


@dataclasses.dataclass
class TrainConfig:
    """Every training flag as a field (`--batch-size` is `batch_size`), with the command line's defaults; a
    None is "decided by the run" as for an absent flag (the model per data set, lr and weight decay per
    optimizer, ...). Each field means what its flag's `--help` says: the parser is generated from these
    fields (`build_parser`), so adding a flag is adding a field here with its help in `_flag(...)`. `debug`
    only matters to the command line (tracebacks); from Python every error is an exception anyway."""
    # ---- model
    model: Optional[str] = _flag(None, 'registered model name (default, per --dataset: ' + '; '.join(
        f'{name}: {_model_text(*DEFAULT_MODELS[name])}' for name in ('digits', 'folder', 'cifar10')).replace(
            'cifar10:', 'cifar10/cifar100:') + '; the start-up line says which)', 'model')
    img_size: Optional[int] = _flag(None, "input size (default: the model's own)", 'model')
    patch_size: Optional[int] = _flag(None, "patch size (default: the model's own)", 'model')
    depth: Optional[int] = _flag(None, "number of blocks (default: the model's own)", 'model')
    num_classes: Optional[int] = _flag(None, 'head size (default: the number of classes in the data)', 'model')
    drop_path: float = _flag(0.0, 'stochastic depth rate (default 0)', 'model', type=_fraction)
    dtype: str = _flag('float32', 'compute dtype; params and optimizer state stay float32 (default float32)',
                       'model', choices=('float32', 'bfloat16'))
    weights: Optional[str] = _flag(
        None, 'checkpoint to fine-tune from: any format the converters read (.npz, .pth, .safetensors, orbax) or a '
        'training workdir (its best step); the head is replaced and the position embedding resampled to fit, every '
        'change logged (default: none, random initialisation)', 'model')
    resample: str = _flag('bicubic', 'position-embedding resampling for --weights (default bicubic, as timm for .pth)',
                          'model', choices=('bicubic', 'bilinear', 'google'))
    remat: Optional[str] = _flag(
        None, 'recompute each block in the backward pass to save memory (jax.checkpoint): bare for the whole block, '
        'or a jax.checkpoint_policies name that saves some values, e.g. dots_saveable (default: off, every '
        'activation kept)', 'model', nargs='?', const='full', metavar='POLICY')
    freeze_layers: bool = _switch('train only the head (and pre_logits, head_dist); every other parameter stays '
                                  'bit-identical (default: off, every parameter trains)', 'model')
    head_bias_init: Optional[float] = _flag(
        None, "set the head's bias to this constant after initialisation (not on resume): big_vision's -6.9 "
        '(about -ln 1000) with --bce-loss, its sigmoid_xent (default: none, the model\'s own init)', 'model')
    # ---- data
    dataset: Optional[str] = _flag(
        None, 'default: packed when --data-path holds a dataset.json (`vit-flax data pack`), folder for another '
        '--data-path, else digits; hf: a datasets save_to_disk folder or Parquet files', 'data', choices=DATASETS)
    data_path: Optional[str] = _flag(
        None, 'folder data set root, packed shards (a dataset.json folder, local or a URL such as gs://...), the '
        'CIFAR directory / downloaded .tar.gz, or (hf) a datasets folder, a .parquet or a folder of them (default: '
        'none, which only --dataset digits allows)', 'data')
    image_column: str = _flag('image', 'hf: the column of encoded images (default image)', 'data')
    label_column: str = _flag('label', 'hf: the column of labels; ClassLabel features give the class names '
                              '(default label)', 'data')
    verify_shards: str = _flag('sha256', 'packed: check each shard against dataset.json before training, by sha256 '
                               '(reads every shard once) or by size only (default sha256)', 'data',
                               choices=('sha256', 'size'))
    prefetch: int = _flag(2, 'batches put on the devices ahead of the step that uses them (default 2; 0: none)',
                          'data')
    val_split: float = _flag(0.2, 'validation share of digits and of a folder without train/ and val/ (default 0.2)',
                             'data', type=_fraction)
    workers: Optional[int] = _flag(None, 'grain worker processes (default: the cores this process may use, for '
                                   'folders, shards and hf, which decode files; 0 for the in-memory digits and '
                                   'CIFAR, where threads suffice)', 'data')
    mean: Optional[Tuple[float, float, float]] = _flag(
        None, 'normalisation mean (default: what --weights were trained with)', 'data')
    std: Optional[Tuple[float, float, float]] = _flag(None, 'normalisation std (default: as --mean)', 'data')
    interpolation: str = _flag('bilinear', 'resize filter (default bilinear)', 'data', choices=INTERPOLATIONS)
    crop_pct: Optional[float] = _flag(None, 'evaluation: resize to img/crop_pct, centre crop img (default 0.875 for '
                                      "folders, as WZMIAOMIAO's scripts; 1.0 for digits and CIFAR)", 'data')
    crop_scale: Optional[Tuple[float, float]] = _flag(
        None, 'training RandomResizedCrop area range (default 0.08 1, digits 0.85 1)', 'data', metavar=('MIN', 'MAX'))
    hflip: Optional[bool] = _flag(None, 'random horizontal flip (default: on; off for digits)', 'data',
                                  action=argparse.BooleanOptionalAction)
    # ---- augmentation (host side, timm's flags, names and defaults)
    aa: Optional[str] = _flag(
        None, "timm's auto-augment policy, applied after the crop and flip: "
        "rand-m<M>-n<N>-mstd<S>-mmax<X>-inc<0|1>-p<P>[-t<set>] (RandAugment, e.g. DeiT's rand-m9-mstd0.5-inc1), "
        'original, originalr, v0, v0r (AutoAugment), 3a (DeiT III), augmix-m<M>-w<W>-d<D>-a<A>-b<0|1> '
        '(default: none)', 'augmentation', metavar='POLICY')
    color_jitter: Optional[float] = _flag(
        None, 'torchvision ColorJitter(X, X, X) (brightness, contrast, saturation), only without --aa or with '
        '--aa 3a, as timm (default 0.4 as timm; 0 for digits)', 'augmentation', metavar='X')
    reprob: float = _flag(0.0, "random erasing probability per image, timm's RandomErasing on the normalised image "
                          '(default 0: off)', 'augmentation', metavar='P')
    remode: str = _flag('pixel', 'random erasing fill: const 0 (the mean colour), rand N(0,1) per box and channel, '
                        'pixel N(0,1) per pixel (default pixel, as timm)', 'augmentation',
                        choices=('const', 'rand', 'pixel'))
    recount: int = _flag(1, 'random erasing: 1 to N boxes per image, their area split between them (default 1)',
                         'augmentation')
    aug_repeats: int = _flag(0, "repeated augmentation (timm's RepeatAugSampler): each image N times in a row, each "
                             'copy augmented on its own, the epoch length kept; --batch-size must be a multiple of N '
                             '(default 0: off)', 'augmentation', metavar='N')
    # ---- optimisation
    epochs: int = _flag(10, 'number of passes over the training set (default 10); a resumed run given another '
                        'value recomputes the cosine schedule over the new length and says so', 'optimisation')
    batch_size: int = _flag(32, 'global batch per update (default 32). An epoch is whole batches only: the '
                            'remainder of the shuffled training set (fewer than one batch) is left out, a different '
                            'part each epoch; the start-up line says how many images that is', 'optimisation')
    grad_accum: int = _flag(1, 'split each batch into N micro-batches (default 1): the update still sees '
                            '--batch-size images', 'optimisation')
    grad_accum_steps: int = _flag(1, "timm's meaning: accumulate N batches of --batch-size per update, i.e. an "
                                  'update of N x --batch-size images in N micro-batches (default 1); not with '
                                  '--grad-accum', 'optimisation')
    optimizer: str = _flag('adamw', 'AdamW or SGD with momentum (default adamw)', 'optimisation', choices=OPTIMIZERS)
    lr: Optional[float] = _flag(None, 'peak learning rate (default 1e-3, either optimizer)', 'optimisation')
    lrf: float = _flag(0.01, 'final learning rate as a fraction of --lr (default 0.01)', 'optimisation')
    warmup_epochs: float = _flag(1.0, 'linear warmup (default 1 epoch)', 'optimisation')
    momentum: float = _flag(0.9, 'SGD momentum (default 0.9)', 'optimisation')
    weight_decay: Optional[float] = _flag(
        None, "default: 0.05 (adamw), 5e-5 (sgd, as WZMIAOMIAO's scripts); never on biases, norms, position "
        'embeddings, tokens or relative-position tables', 'optimisation')
    layer_decay: Optional[float] = _flag(
        None, "layer-wise learning-rate decay in (0, 1] as timm's param_groups_layer_decay: block i of L gets "
        'lr x decay^(L+1-(i+1)), the patch embedding, tokens and positions decay^(L+1), the head 1; the run '
        'writes WORKDIR/param_groups.json (default: none, one learning rate)', 'optimisation')
    clip_grad: float = _flag(1.0, 'clip the global gradient norm (0: off; default 1)', 'optimisation')
    seed: int = _flag(0, 'seeds the initialisation, the shuffle, augmentation, mixing and dropout (default 0)',
                      'optimisation')
    # ---- recipe: targets, mixing, losses, EMA (timm's flags and meanings)
    smoothing: float = _flag(0.0, "label smoothing in [0, 1) as timm's: on = 1 - e + e/C, off = e/C (default 0: "
                             "none; timm's train.py default is 0.1)", 'recipe', type=_fraction,
                             aliases=('--label-smoothing',))
    mixup: float = _flag(0.0, "mixup alpha, active if > 0 (timm's Mixup; default 0: off; DeiT 0.8)", 'recipe')
    cutmix: float = _flag(0.0, 'cutmix alpha, active if > 0 (default 0: off; DeiT 1.0)', 'recipe')
    cutmix_minmax: Optional[Tuple[float, float]] = _flag(
        None, 'cutmix box side range as fractions of the image; sets cutmix on with alpha 1 (default: none, the '
        'box from lambda)', 'recipe', metavar=('MIN', 'MAX'))
    mixup_prob: float = _flag(1.0, 'probability of mixing a batch (or element) when mixup or cutmix is on '
                              '(default 1)', 'recipe')
    mixup_switch_prob: float = _flag(0.5, 'probability of cutmix instead of mixup when both are on (default 0.5)',
                                     'recipe')
    mixup_mode: str = _flag('batch', "how mixing parameters are drawn: one per 'batch', per 'pair' (i and B-1-i), "
                            "per 'elem' (default batch)", 'recipe', choices=('batch', 'pair', 'elem'))
    bce_loss: bool = _switch("binary cross-entropy on the (mixed, smoothed) targets, timm's BinaryCrossEntropy: the "
                             'mean over batch and classes (default: off, softmax cross-entropy)', 'recipe')
    bce_target_thresh: Optional[float] = _flag(
        None, 'with --bce-loss: binarise the targets, t > THRESH (default: none, soft targets)', 'recipe')
    model_ema: bool = _switch("keep an exponential moving average of the weights, timm's ModelEmaV3: saved in "
                              'every checkpoint, evaluated each epoch beside the raw weights (default: off)', 'recipe')
    model_ema_decay: float = _flag(0.9998, "EMA decay (default 0.9998, timm's train.py; DeiT 0.99996)", 'recipe')
    model_ema_warmup: bool = _switch("EMA decay warm-up, timm's 1 - (1 + step)^(-2/3) capped at --model-ema-decay "
                                     '(default: off)', 'recipe')
    # ---- evaluation and logging
    eval_only: bool = _switch('evaluate instead of training: the workdir\'s best checkpoint (or --step), or '
                              '--weights, on the validation split; prints top-1/top-5 and writes WORKDIR/eval.json '
                              '(default: off)', 'evaluation and logging')
    step: Optional[str] = _flag(None, 'with --eval-only: the checkpoint to evaluate, best, latest or a step number '
                                '(default: best)', 'evaluation and logging')
    dump_batches: int = _flag(0, 'write the first N training batches as the model sees them (after every '
                              'augmentation and mixing) to WORKDIR/batches.npz and a contact sheet batches.png, then '
                              'exit without training (default 0: off)', 'evaluation and logging', metavar='N')
    log_every: int = _flag(50, 'every N steps log loss, learning rate, gradient norm, data-wait fraction and '
                           'images/s to TensorBoard and WORKDIR/metrics.jsonl (default 50; 0: off)',
                           'evaluation and logging', metavar='N')
    # ---- run
    workdir: Optional[str] = _flag(None, 'checkpoints, logs, summary.json: a folder or a URL such as gs://bucket/run '
                                   '(default: runs/<dataset>-<model>)', 'run')
    keep: int = _flag(2, 'keep the last N checkpoints, plus the best (default 2)', 'run')
    save_every: int = _flag(0, 'also checkpoint every N steps inside an epoch (default: at epoch ends only)', 'run')
    debug: bool = _switch('show the traceback of an internal error (default: off, one line)', 'run')
    fresh_start: bool = _switch('when no checkpoint in --workdir restores (each is set aside as <step>.corrupt), '
                                'train from scratch there instead of stopping with an error (default: off)', 'run')
    mesh: str = _flag('', "device mesh 'data=N,fsdp=M' (default: data over every device); fsdp > 1 shards "
                      'parameters and optimizer state', 'run')
    coordinator: Optional[str] = _flag(None, 'multi-process: HOST:PORT of process 0 (jax.distributed.initialize; '
                                       'default: none, a single process)', 'run')
    num_processes: Optional[int] = _flag(None, 'multi-process: number of processes (default: none, a single '
                                         'process)', 'run')
    process_id: Optional[int] = _flag(None, "multi-process: this process's index, 0 to N-1 (default: none, a single "
                                      'process)', 'run')
    distributed: bool = _switch('call jax.distributed.initialize() with cluster auto-detection (SLURM, TPU pods, '
                                '...) (default: off)', 'run')
    plan: Optional[str] = _flag(
        None, 'compile exactly the training step this run would take (model, optimizer, mesh, remat, batch) for '
        'TARGET (cpu, or tpu:TOPOLOGY such as tpu:v5e:2x2, compiled without a TPU; needs libtpu: '
        "pip install 'vit-flax-tools[tpu]'), print memory per device, FLOPs and the roofline, and exit without "
        'training: 0 when it fits, 1 (with the largest batch that fits) when it does not (default: off)', 'run',
        metavar='TARGET')


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# older names of fields, accepted from Python as their flags are on the command line
FIELD_ALIASES = {'label_smoothing': 'smoothing'}


def _argparse_kwargs(f: dataclasses.Field) -> dict:
    """argparse's add_argument keywords for a TrainConfig field: from its annotation (Optional[X] is X,
    Tuple[X, X] is nargs=2 of X, bool a switch) unless its metadata says otherwise."""
    kw = dict(f.metadata['argparse'])
    kw.pop('aliases', None)
    kw['help'] = f.metadata['help']
    if 'action' in kw:
        return kw
    t = f.type
    if typing.get_origin(t) is typing.Union:   # Optional[X]
        t = next(a for a in typing.get_args(t) if a is not type(None))
    if typing.get_origin(t) is tuple:
        args = typing.get_args(t)
        kw.setdefault('nargs', len(args))
        t = args[0]
    if t in (int, float) and 'type' not in kw:
        kw['type'] = t
    return kw


class _Parser(argparse.ArgumentParser):
    """argparse's parser whose refusals are one line (`prog: error: ...; see --help`), exit status 2."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')


def build_parser(prog=None) -> argparse.ArgumentParser:
    """The flags, one per TrainConfig field (generated from the fields: name, type, default, help, choices).
    Abbreviations are refused (`--epoch 1` is an error, not --epochs)."""
    p = _Parser(
        prog=prog, allow_abbrev=False,
        description='Train or fine-tune a ViT/DeiT/Swin with optax, grain, orbax and jax.sharding. With no arguments: '
        'a small ViT on scikit-learn digits. Rerunning the same command resumes. Flags take timm\'s names and '
        'meanings where timm has them (--mixup, --cutmix, --smoothing, --model-ema, --layer-decay, ...).')
    groups = {}
    for f in dataclasses.fields(TrainConfig):
        g = f.metadata['group']
        if g not in groups:
            groups[g] = p.add_argument_group(GROUPS[g])
        names = ['--' + f.name.replace('_', '-'), *f.metadata['argparse'].get('aliases', ())]
        groups[g].add_argument(*names, dest=f.name, **_argparse_kwargs(f))
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
        values = {FIELD_ALIASES.get(k, k): v for k, v in dict(config).items()}
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


# integer flags and their least value
MINIMA = dict(img_size=1, patch_size=1, depth=1, num_classes=1, epochs=1, batch_size=1, grad_accum=1, keep=1,
              save_every=0, workers=0, num_processes=1, process_id=0, grad_accum_steps=1, dump_batches=0,
              log_every=0, recount=1, aug_repeats=0, prefetch=0)


def _range_error(flag: str, value, wants: str) -> TrainError:
    return TrainError(f'{flag} {value}: wants {wants}')


def check_recipe(a) -> None:
    """The recipe flags' values (mixing, losses, EMA, layer decay, evaluation): one TrainError naming the flag,
    before anything is built or compiled."""
    for flag, v in (('--mixup', a.mixup), ('--cutmix', a.cutmix)):
        if not (math.isfinite(v) and v >= 0):
            raise _range_error(flag, v, 'an alpha >= 0 (0: off)')
    for flag, v in (('--mixup-prob', a.mixup_prob), ('--mixup-switch-prob', a.mixup_switch_prob)):
        if not 0 <= v <= 1:
            raise _range_error(flag, v, 'a probability in [0, 1]')
    if a.cutmix_minmax is not None:
        lo, hi = a.cutmix_minmax
        if not 0 < lo < hi <= 1:
            raise _range_error('--cutmix-minmax', f'{lo} {hi}', 'MIN MAX with 0 < MIN < MAX <= 1')
    if a.layer_decay is not None and not 0 < a.layer_decay <= 1:
        raise _range_error('--layer-decay', a.layer_decay, 'a factor in (0, 1]')
    if not 0 <= a.model_ema_decay < 1:
        raise _range_error('--model-ema-decay', a.model_ema_decay, 'a decay in [0, 1)')
    if a.bce_target_thresh is not None:
        if not 0 <= a.bce_target_thresh < 1:
            raise _range_error('--bce-target-thresh', a.bce_target_thresh, 'a threshold in [0, 1)')
        if not a.bce_loss:
            raise TrainError(f'--bce-target-thresh {a.bce_target_thresh}: only with --bce-loss')
    if a.head_bias_init is not None and not math.isfinite(a.head_bias_init):
        raise _range_error('--head-bias-init', a.head_bias_init, 'a finite number')
    if a.step is not None and not a.eval_only:
        raise TrainError(f'--step {a.step}: only with --eval-only (training resumes from the latest step)')
    if a.step is not None and a.step not in ('best', 'latest') and not a.step.isdigit():
        raise _range_error('--step', a.step, 'best, latest or a step number')
    if mixing(a) and a.batch_size % 2:
        raise TrainError(f'--batch-size {a.batch_size}: mixup/cutmix pair image i with image B-1-i, the batch '
                         f'must be even')


def mixing(a) -> bool:
    """Whether mixup or cutmix is on (timm's Mixup is created when any of these is set)."""
    return a.mixup > 0 or a.cutmix > 0 or a.cutmix_minmax is not None


def resolve(args) -> argparse.Namespace:
    """Check the integer flags; fill the defaults that depend on other flags (the model per data set, the
    per-dataset and per-optimizer values)."""
    a = argparse.Namespace(**vars(args))
    for k, lo in MINIMA.items():
        if getattr(a, k) is not None and getattr(a, k) < lo:
            raise TrainError(f'--{k.replace("_", "-")} wants an integer >= {lo}, got {getattr(a, k)}')
    a.accum_note = None
    if a.grad_accum_steps > 1:   # timm's: each update sums N batches of --batch-size
        if a.grad_accum > 1:
            raise TrainError(f'--grad-accum-steps {a.grad_accum_steps} (timm\'s: N batches per update) and '
                             f'--grad-accum {a.grad_accum} (ours: the batch split in N): give one of them')
        a.accum_note = (f'--grad-accum-steps {a.grad_accum_steps} (timm\'s meaning): updates of '
                        f'{a.grad_accum_steps} x {a.batch_size} = {a.grad_accum_steps * a.batch_size} images, in '
                        f'{a.grad_accum_steps} micro-batches (ours: --batch-size {a.grad_accum_steps * a.batch_size} '
                        f'--grad-accum {a.grad_accum_steps})')
        a.batch_size, a.grad_accum, a.grad_accum_steps = a.batch_size * a.grad_accum_steps, a.grad_accum_steps, 1
    check_recipe(a)
    if a.dataset is None:
        a.dataset = 'folder' if a.data_path else 'digits'
    origin = a.dataset
    if a.dataset in ('folder', 'packed') and a.data_path:
        from . import records
        if records.has_manifest(a.data_path):   # packed shards: their source's defaults (CIFAR's 32 px model)
            a.dataset, origin = 'packed', records.read_manifest(a.data_path).get('origin', 'folder')
            origin = origin if origin in DATA_DEFAULTS else 'folder'
    elif a.dataset == 'packed':
        origin = 'folder'
    a.demo = a.model is None and a.dataset == 'digits'
    a.default_model = None  # without --model: the line that says which model the data set got
    if a.model is None:
        a.model, preset = DEFAULT_MODELS[origin]
        for k, v in preset.items():
            if getattr(a, k) is None:
                setattr(a, k, v)
        chosen = {k: getattr(a, k) for k in ('img_size', 'patch_size', 'depth') if getattr(a, k) is not None}
        why = 'the digits demo, default' if a.demo else 'default'
        a.default_model = (f'model: {_model_text(a.model, chosen)} ({why} for --dataset {a.dataset}; '
                           f'pass --model to choose)')
    crop_pct, scale, hflip = DATA_DEFAULTS[origin]
    a.crop_pct = crop_pct if a.crop_pct is None else a.crop_pct
    a.crop_scale = tuple(scale if a.crop_scale is None else a.crop_scale)
    a.hflip = hflip if a.hflip is None else a.hflip
    if a.color_jitter is None:
        a.color_jitter = 0.0 if a.dataset == 'digits' else 0.4
    check_augmentation(a)
    for k, v in OPTIMIZER_DEFAULTS[a.optimizer].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    if a.workers is None:
        a.workers = host_cores() if a.dataset in DECODED and origin not in ('cifar10', 'cifar100') else 0
    if a.workdir is None:
        a.workdir = os.path.join('runs', f'{a.dataset}-{a.model}')
    from converters.formats import paths
    a.workdir = paths.resolve(a.workdir)   # a URL (gs://bucket/run) as given: never through os.path
    check_workdir(a.workdir)
    return a


def check_augmentation(a) -> None:
    """The augmentation flags, refused in one line naming the flag (and the token of a policy) before anything
    is read or compiled."""
    from . import augment
    if a.aa is not None:
        if not a.aa.strip():
            raise TrainError('--aa wants a policy (rand-m9-mstd0.5-inc1, original, v0, 3a, augmix-...), got an empty string')
        try:
            augment.parse_policy(a.aa, augment.policy_hparams(224, (0.5, 0.5, 0.5), a.interpolation))
        except augment.AugmentError as e:
            raise TrainError(str(e)) from None
    if not (np.isfinite(a.color_jitter) and a.color_jitter >= 0):
        raise TrainError(f'--color-jitter wants a number >= 0, got {a.color_jitter}')
    if not 0 <= a.reprob <= 1:
        raise TrainError(f'--reprob wants a probability in [0, 1], got {a.reprob}')
    if a.aug_repeats > 1 and a.batch_size % a.aug_repeats:
        raise TrainError(f'--aug-repeats {a.aug_repeats}: --batch-size {a.batch_size} is not a multiple of it (each '
                         f'batch holds whole groups of an image\'s copies)')


def host_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_workdir(path: str) -> None:
    """Refuse a --workdir that cannot be created or written, before anything is read or written. A URL:
    refused when its scheme has no file system here (gs:// without gcsfs) or it cannot be reached; write
    permission shows at the first write."""
    from converters.formats import paths
    if paths.is_url(path):
        try:
            paths.exists(path)
        except Exception as e:  # noqa: BLE001 - ImportError (gcsfs), NotImplementedError (scheme), auth errors
            hint = ' (a gs:// workdir needs pip install gcsfs google-cloud-storage)' if path.startswith('gs://') else ''
            raise TrainError(f'--workdir {path}: cannot be reached ({type(e).__name__}: '
                             f'{str(e).strip().splitlines()[0] if str(e).strip() else ""}){hint}') from None
        return
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise TrainError(f'--workdir {path}: {parent} is a file, not a directory')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainError(f'--workdir {path}: {parent} is not writable')
