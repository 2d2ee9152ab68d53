"""The training run, top to bottom: data, model, mesh, state (fresh, fine-tuned or resumed), epochs."""
import math
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, List

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

import vit_flax
from vit_flax import registry
from vit_flax.models.layers import checkpoint_policy
from converters.formats import paths, training_ckpt as fmt

from . import augment, config, data, dump, ema as ema_mod, evaluate as evaluation, feed, layer_decay, optim, \
    report, sharding, step as steps, weights
from .evaluate import evaluate
from .mixup import MixupConfig
from .checkpoint import Checkpoints, checksum_record, close_iterator, device_checksums, quiet_orbax
from .errors import Interrupted, NonFiniteLoss, TrainError, signals_deferred


def init_distributed(args) -> None:
    if not (args.coordinator or args.num_processes or args.distributed):
        return
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU collectives across processes
    if args.coordinator or args.num_processes:
        missing = [f for f, v in (('--coordinator', args.coordinator), ('--num-processes', args.num_processes),
                                  ('--process-id', args.process_id)) if v is None]
        if missing:
            raise TrainError(f'multi-process runs need --coordinator, --num-processes and --process-id '
                             f'(missing {", ".join(missing)})')
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    else:
        jax.distributed.initialize()


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def build_model(args, num_classes: int, extra=None):
    """(model, JSON-able overrides for create_model, square input size). `extra`: more model fields
    (`vit-flax xla --set/--scan-blocks/--attn-impl`), checked as the flags' are."""
    over = dict(num_classes=num_classes, **(extra or {}))
    for k in ('img_size', 'patch_size', 'depth'):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    if args.drop_path:
        over['drop_path_rate'] = args.drop_path
    # remat changes what the backward pass recomputes, not the parameters: it stays out of the overrides
    # that checkpoints record and exports rebuild the model from
    remat = {} if args.remat is None else dict(remat=True, remat_policy=None if args.remat == 'full' else args.remat)
    try:
        checkpoint_policy(remat.get('remat_policy'))
    except ValueError as e:
        raise TrainError(f'--remat {args.remat}: {e}') from None
    flags = dict(img_size='--img-size', patch_size='--patch-size', depth='--depth', drop_path_rate='--drop-path')
    try:
        cls, _ = vit_flax.model_config(args.model)
    except KeyError as e:
        raise TrainError(f'--model {args.model}: {e.args[0]}') from None
    if 'depth' in over and 'num_blocks' in registry.model_fields(cls):   # MLP-Mixer's blocks: timm's num_blocks
        over['num_blocks'] = over.pop('depth')
        flags['num_blocks'] = '--depth'
    missing = [k for k in over if k in flags and k not in registry.model_fields(cls)]
    if missing:   # a flag this family has no field for (Swin has depths, not depth)
        raise TrainError(f'{flags[missing[0]]} {over[missing[0]]}: {args.model} (a {cls.__name__}) has no '
                         f'{missing[0]} field; its fields: {", ".join(registry.model_fields(cls))}')
    try:
        model = vit_flax.create_model(args.model, **over, **remat, dtype=jnp.dtype(args.dtype))
    except (KeyError, TypeError, ValueError) as e:   # UnknownOptionError, ModelConfigError among them
        raise TrainError(f'--model {args.model}: {e.args[0] if isinstance(e, KeyError) else e}') from None
    height, width, _ = model.input_shape
    if height != width:
        raise TrainError(f'{args.model}: training needs a square input, the model takes {height}x{width}')
    return model, _jsonable(over), height


def same_run(meta: dict) -> dict:
    """What a resumed run must share with its checkpoint: the model, the data, the batch, the seed, the
    optimizer, whether it keeps a weight EMA, and the shape of its state (clipping and SGD momentum add to it:
    a checkpoint that differs there would not restore, and must not be taken for a corrupt one). Anything else
    (epochs, lr, mesh, workers, dtype, grad-accum, drop-path, the clipping norm, the mixing, the loss, the
    layer decay) may change."""
    cfg = meta['config']
    return dict(model=meta['model'], num_classes=meta['num_classes'], class_names=meta['class_names'],
                model_overrides={k: v for k, v in meta['model_overrides'].items() if k != 'drop_path_rate'},
                dataset={k: meta['dataset'][k] for k in ('name', 'num_train', 'num_val')},
                **{k: cfg[k] for k in ('batch_size', 'seed', 'optimizer', 'freeze_layers')},
                model_ema=bool(cfg.get('model_ema', False)),
                gradient_clipping=bool(cfg['clip_grad']),
                sgd_momentum=cfg['optimizer'] == 'sgd' and bool(cfg['momentum']))


def check_same_run(old: dict, new: dict, workdir: str) -> None:
    a, b = same_run(old), same_run(new)
    for k in a:
        if a[k] != b[k]:
            raise TrainError(f'{workdir} holds a run with {k}={a[k]!r}, this command has {k}={b[k]!r}; '
                             f'use the same flags to resume it, or another --workdir')


@dataclass
class StateSpec:
    """Shapes and shardings of the train state {'params', 'opt_state', 'step'} (+ 'ema' with --model-ema),
    and how to make one; `lr_scales`/`groups`: the layer-wise decay (None without --layer-decay)."""
    init_params: callable        # rng -> params
    init_opt: callable           # params -> opt_state (trainable params only)
    abstract: dict               # ShapeDtypeStructs carrying their shardings
    shardings: dict
    tx: object
    trainable: list
    num_params: int
    num_trainable: int
    lr_scales: dict = None
    groups: dict = None


def state_spec(model, args, mesh) -> StateSpec:
    init_params = lambda rng: model.init(rng, jnp.zeros((1,) + model.input_shape, jnp.float32), train=False)['params']
    params = jax.eval_shape(init_params, jax.random.PRNGKey(0))
    flat = flatten_dict(params, sep='/')
    trainable = optim.trainable_keys(flat, args.freeze_layers)
    tx = optim.make(args.optimizer, args.weight_decay, {k: optim.decays(k) for k in trainable}, args.momentum,
                    args.clip_grad)
    init_opt = lambda p: tx.init({k: v for k, v in flatten_dict(p, sep='/').items() if k in trainable})
    abstract = dict(params=params, opt_state=jax.eval_shape(init_opt, params), step=jax.ShapeDtypeStruct((), jnp.int32))
    shardings = dict(params=sharding.tree_shardings(abstract['params'], mesh),
                     opt_state=sharding.tree_shardings(abstract['opt_state'], mesh), step=sharding.replicated(mesh))
    if args.model_ema:   # the weight EMA: a second params tree, sharded as the params
        abstract['ema'], shardings['ema'] = params, shardings['params']
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    size = lambda keys: sum(int(np.prod(flat[k].shape)) for k in keys)
    groups = scales = None
    if args.layer_decay is not None:
        groups = layer_decay.param_groups(model, {k: flat[k].shape for k in trainable}, args.layer_decay,
                                          optim.decays)
        scales = layer_decay.scales(groups)
    return StateSpec(init_params, init_opt, abstract, shardings, tx, trainable, size(flat), size(trainable),
                     scales, groups)


BATCH_KEYS = ('image', 'label', 'weight', 'unreadable')
ERASE_KEYS = ('erase', 'erase_seed')   # random erasing's boxes and noise seeds (with --reprob)


def batch_keys(args) -> tuple:
    return BATCH_KEYS + (ERASE_KEYS if args.reprob else ())


def jit_steps(model, spec: StateSpec, mesh, args, mean, std):
    """(train_step, eval_step), jitted with their shardings: what the run calls, and what `--plan` and
    `vit-flax xla --train` compile (vit_train.plan), so the two can never differ.
    train_step(state, batch, lr, ema_weight) donates the state; eval_step(params, batch) returns replicated
    sums. The recipe (mixing, BCE, layer decay, EMA, erasing) is the run's flags'."""
    from vit_flax.ops.attention import batch_mesh
    replicated, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    batch_shardings = {k: batch_sh for k in BATCH_KEYS}

    def on_mesh(fn):   # traced knowing the mesh: the Pallas attention kernels run per device (shard_map)
        def traced(*a):
            with batch_mesh(mesh):
                return fn(*a)
        return traced

    mix_cfg = MixupConfig.from_args(args, model.num_classes)
    train_step = jax.jit(
        on_mesh(steps.make_train_step(model, spec.tx, spec.trainable, mean=mean, std=std, seed=args.seed,
                                      label_smoothing=args.smoothing, grad_accum=args.grad_accum, mix=mix_cfg,
                                      bce=args.bce_loss, bce_threshold=args.bce_target_thresh,
                                      lr_scales=spec.lr_scales, ema=args.model_ema,
                                      erase_mode=args.remode if args.reprob else None)),
        in_shardings=(spec.shardings, {k: batch_sh for k in batch_keys(args)}, replicated, replicated),
        out_shardings=(spec.shardings, replicated), donate_argnums=0)
    eval_step = jax.jit(on_mesh(steps.make_eval_step(model, mean=mean, std=std)),
                        in_shardings=(spec.shardings['params'], batch_shardings), out_shardings=replicated)
    return train_step, eval_step


def batch_specs(batch: int, size: int, mesh, args=None, train: bool = True) -> dict:
    """ShapeDtypeStructs of one global batch as data.TrainTransform makes it (uint8 NHWC images, int32
    labels, float32 weights, int32 unreadable flags; with --reprob the erasing boxes (recount, 4) int32 and
    the noise seeds uint32), split over the mesh as the run splits it."""
    sh = sharding.batch_sharding(mesh)
    shapes = dict(image=((batch, size, size, 3), np.uint8), label=((batch,), np.int32),
                  weight=((batch,), np.float32), unreadable=((batch,), np.int32))
    if train and args is not None and args.reprob:
        shapes.update(erase=((batch, args.recount, 4), np.int32), erase_seed=((batch,), np.uint32))
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sh) for k, (s, d) in shapes.items()}


class EpochMeter:
    """Sums of the step metrics, fetched one step late so the host never waits on the device's queue."""

    def __init__(self, on_loss, on_metrics=None):
        self.on_loss, self.on_metrics, self.pending = on_loss, on_metrics, []
        self.sums = dict(loss=0.0, correct=0.0, count=0.0, unreadable=0.0)
        self.t_first, self.images_timed = None, 0
        self.wait, self.steps = 0.0, 0

    def add(self, step_no: int, metrics, data_wait: float = 0.0) -> None:
        """`metrics`: the step's device arrays (read one step later); `data_wait`: seconds the loop waited
        for the step's batch."""
        self.wait, self.steps = self.wait + data_wait, self.steps + 1
        self.pending.append((step_no, metrics))
        if len(self.pending) > 1:
            self._fetch(*self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._fetch(*self.pending.pop(0))

    def _fetch(self, step_no, metrics):
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.on_loss(step_no, m['loss'], m['params_finite'])
        if self.on_metrics is not None:
            self.on_metrics(step_no, m)
        if self.t_first is None:  # time from the first finished step on: compilation is not throughput
            self.t_first = time.perf_counter()
        else:
            self.images_timed += m['count'] + m['unreadable']
        self.sums['loss'] += m['loss'] * m['count']
        for k in ('correct', 'count', 'unreadable'):
            self.sums[k] += m[k]

    def data_wait_ms(self):
        """Mean milliseconds per step the loop waited for its batch (None before any step)."""
        return round(1000 * self.wait / self.steps, 3) if self.steps else None

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.sums['count'], 1.0)

    def images_per_sec(self):
        """Images per second after the epoch's first step (which may compile), or None when nothing after it
        was timed yet (a one-step epoch never is): no figure rather than a made-up 0."""
        dt = time.perf_counter() - self.t_first if self.t_first else 0.0
        return self.images_timed / dt if dt > 0 and self.images_timed else None


@dataclass
class TrainResult:
    """What `vit_train.train` returns. `params`: the final parameters, the linen tree of `model` (jax
    arrays); `state`: the final train state {'params', 'opt_state', 'step'} (the optimizer state keyed by
    flat '/'-joined trainable param names); `history`: summary.json's `history` list (one dict per epoch of
    the run so far, resumed epochs included: epoch, step, train_loss, train_acc, val_loss, val_acc,
    learning_rate, images_per_sec, unreadable_images; process 0 only); `workdir`: the absolute run folder;
    `model`: the linen module the params belong to; `best_val_acc`."""
    params: Any
    state: dict
    history: List[dict] = field(default_factory=list)
    workdir: str = ''
    model: Any = None
    best_val_acc: Any = None


def run(argv=None, prog=None) -> int:
    """The command line's run: parse `argv`, train, return 0 (errors are raised)."""
    gen = run_iter(config.build_parser(prog).parse_args(argv), own_process=True)
    try:
        while True:
            next(gen)
    except StopIteration:
        return 0
    finally:
        gen.close()


def run_iter(namespace, own_process=False):
    """A generator over the epochs of the run the flags' `namespace` describes: yields each epoch's record
    (what summary.json holds after it, less `history`) after its checkpoint is started, returns a TrainResult.
    `own_process`: the command line owns the process and may set jax's compilation cache to the workdir's."""
    # where the main process and grain's worker processes note the unreadable files they warned about: one
    # warning per file per run, not one per process
    with tempfile.TemporaryDirectory(prefix='vit-train-warned-', ignore_cleanup_errors=True) as warned_dir, \
            quiet_orbax():
        return (yield from _run(namespace, own_process, warned_dir))


def _run(namespace, own_process, warned_dir):
    args = config.resolve(namespace)
    init_distributed(args)
    nproc, pid = jax.process_count(), jax.process_index()
    log, warn = report.printer(pid == 0), report.printer(pid == 0, sys.stderr)
    if args.default_model and not (args.eval_only and not args.weights):   # a workdir's own model is evaluated
        log(args.default_model)
    if args.accum_note:
        log(args.accum_note)

    # ---- data and model
    if args.plan and args.num_classes:   # the data decide nothing else the step depends on
        model = build_model(args, args.num_classes)[0]
        return planned(args, args.num_classes, log, model)
    ds = data.load(args.dataset, args.data_path, args.val_split, args.image_column, args.label_column,
                   args.verify_shards)
    num_classes = args.num_classes or len(ds.class_names)
    if not len(ds.val):
        raise TrainError(f'no validation images (--val-split {args.val_split})')
    if num_classes < len(ds.class_names):
        raise TrainError(f'--num-classes {num_classes} is fewer than the {len(ds.class_names)} classes in the data')
    if args.eval_only:   # evaluate a workdir's checkpoint or --weights, write eval.json, train nothing
        return evaluation.eval_only(args, ds, log, warn, warned_dir, lambda n: build_model(args, n))
    model, overrides, size = build_model(args, num_classes)
    if args.plan:
        return planned(args, num_classes, log, model)
    mix_cfg = MixupConfig.from_args(args, num_classes)

    # ---- devices, batch, schedule, state
    mesh_sizes = sharding.parse_mesh(args.mesh, jax.device_count())
    mesh = sharding.make_mesh(mesh_sizes)
    ndev, batch = jax.device_count(), args.batch_size
    if batch % ndev or batch % nproc or (batch // ndev) % args.grad_accum:
        raise TrainError(f'--batch-size {batch} must split evenly over {ndev} devices, {nproc} processes and '
                         f'--grad-accum {args.grad_accum} micro-batches per device')
    spe = len(ds.train) // batch
    if spe == 0:
        raise TrainError(f'{len(ds.train)} training images are fewer than one --batch-size {batch}')
    total = args.epochs * spe
    lr_at = optim.schedule(args.lr, args.lrf, round(args.warmup_epochs * spe), total)
    spec = state_spec(model, args, mesh)
    base_meta = dict(format=fmt.FORMAT, version=fmt.VERSION, model=args.model, model_overrides=overrides,
                     num_classes=num_classes, class_names=ds.class_names, dtype=args.dtype, steps_per_epoch=spe,
                     epochs=args.epochs, dataset=dict(name=args.dataset, path=ds.path, val_split=args.val_split,
                                                      num_train=len(ds.train), num_val=len(ds.val)),
                     num_processes=nproc, data_workers=args.workers, mesh=mesh_sizes,
                     config=_jsonable(dict(vars(args), crop_scale=list(args.crop_scale))))

    eval_tf = data.EvalTransform(size, args.interpolation, args.crop_pct, warned_dir=warned_dir)

    batch_sh = sharding.batch_sharding(mesh)

    def host_iter(wnorm, start_step=0):
        # the policies fill with the normalisation mean (timm's img_mean), known once the weights are
        mean = weights.normalization(args, wnorm)[0]
        aug = augment.TrainAugment(args.aa, args.color_jitter, args.reprob, args.recount, size, mean,
                                   args.interpolation)
        train_tf = data.TrainTransform(size, args.interpolation, args.crop_scale, hflip=args.hflip,
                                       warned_dir=warned_dir, augment=aug)
        return data.train_iterator(ds.train, train_tf, batch=batch, seed=args.seed, process_index=pid,
                                   process_count=nproc, workers=args.workers, start_step=start_step,
                                   aug_repeats=args.aug_repeats)

    def data_iter(wnorm, start_step=0):
        return feed.DeviceFeed(host_iter(wnorm, start_step), lambda local: sharding.global_batch(local, batch_sh),
                               args.prefetch)

    def resume_iter(meta):
        cfg = meta['pretrained_cfg']
        wnorm = (tuple(cfg['mean']), tuple(cfg['std']), '')
        if meta['num_processes'] == nproc and meta['data_workers'] == args.workers:
            return data_iter(wnorm), True
        log(f"data: checkpoint written by {meta['num_processes']} process(es) with {meta['data_workers']} "
            f"worker(s); positioning the pipeline from the step instead of its saved state")
        return data_iter(wnorm, meta['step']), False

    def load_weights():
        over = {k: v for k, v in overrides.items() if k != 'drop_path_rate'}
        return weights.load(args.weights, args.model, over, args.resample, warn)

    if args.dump_batches:   # what the model sees (the run's transform, erasing and mixing); no training
        wnorm = load_weights()[2] if args.weights else None   # the normalisation a fresh run would use
        it = host_iter(wnorm)
        try:
            return dump.dump_batches(args, it, ds.class_names, num_classes, mix_cfg, log,
                                     *weights.normalization(args, wnorm)[:2])
        finally:
            close_iterator(it)

    # ---- resumed, or fresh / fine-tuned (a resumed run keeps its weights' record and normalisation)
    loaded = None
    if args.weights and not fmt.list_steps(paths.join(args.workdir, fmt.CHECKPOINTS_DIR)):
        loaded = load_weights()  # a fresh run reads its weights before it writes anything
    if own_process and not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        # a rerun (resume) compiles the same programs: keep them beside the run unless the user chose a cache
        jax.config.update('jax_compilation_cache_dir', paths.join(args.workdir, 'xla_cache'))  # (jax takes URLs)
    ckpts = Checkpoints(args.workdir, args.keep)
    sums_fn = jax.jit(device_checksums, in_shardings=(spec.shardings,), out_shardings=sharding.replicated(mesh))
    checksums = lambda st: checksum_record(jax.device_get(sums_fn(st)))  # noqa: E731
    resumed = ckpts.resume(spec.abstract, resume_iter, lambda m: check_same_run(m, base_meta, args.workdir), warn,
                           checksums)
    if resumed:
        state, it, meta0 = resumed
        start, best_acc, winfo = int(state['step']), meta0['best_val_acc'], meta0['weights']
        if start >= total:
            log(f"training already finished: epoch {meta0['epoch']} of {meta0['epochs']} (step {start}) in "
                f"{args.workdir}; nothing to do (raise --epochs to train further)")
            close_iterator(it)
            ckpts.close()
            return TrainResult(state['params'], state, report.read_history(args.workdir), args.workdir, model,
                               best_acc)
        log(report.resumed(start, spe, args.epochs))
        if meta0['epochs'] != args.epochs:
            old = meta0['config']
            old_at = optim.schedule(old['lr'], old['lrf'], round(old['warmup_epochs'] * spe), meta0['epochs'] * spe)
            log(f"schedule: --epochs {args.epochs} (the checkpoint's run had {meta0['epochs']}): the cosine is "
                f"recomputed over {total} steps; learning rate at step {start + 1}: {old_at(start):.6g} -> "
                f"{lr_at(start):.6g}")
        cfg = meta0['pretrained_cfg']
        wnorm = (tuple(cfg['mean']), tuple(cfg['std']), 'as recorded in the checkpoint')
    else:
        aside = ckpts.set_aside()
        if aside and not args.fresh_start:
            ckpts.close()
            raise TrainError(f'{ckpts.root}: no usable checkpoint to resume from (set aside: {", ".join(aside)}); '
                             f'rerun with --fresh-start to train from scratch in this workdir')
        winfo, wnorm = None, None
        if args.weights:
            params_np, winfo, wnorm = loaded or load_weights()  # (loaded late: every checkpoint was unusable)
            params = sharding.put(params_np, spec.shardings['params'])
        else:
            params = jax.jit(spec.init_params, out_shardings=spec.shardings['params'])(jax.random.PRNGKey(args.seed))
        if args.head_bias_init is not None:
            params = set_head_bias(params, args.head_bias_init, spec.shardings['params'])
            log(f'head: bias set to {args.head_bias_init} (--head-bias-init)')
        state = dict(params=params, opt_state=jax.jit(spec.init_opt, out_shardings=spec.shardings['opt_state'])(params),
                     step=sharding.put(np.int32(0), spec.shardings['step']))
        if args.model_ema:   # timm's ModelEmaV3 starts as a copy of the model (its own buffers: the state is donated)
            state['ema'] = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=spec.shardings['params'])(params)
        it, start, best_acc = data_iter(wnorm), 0, None
    mean, std, norm_why = weights.normalization(args, wnorm)
    base_meta.update(weights=winfo, pretrained_cfg=dict(input_size=[3, size, size], interpolation=args.interpolation,
                                                        crop_pct=args.crop_pct, crop_mode='center',
                                                        mean=list(mean), std=list(std)))

    # ---- the compiled steps
    replicated = sharding.replicated(mesh)
    train_step, eval_step = jit_steps(model, spec, mesh, args, mean, std)
    ema_weight = (lambda n: ema_mod.weight_at(n, args.model_ema_decay, args.model_ema_warmup)) if args.model_ema \
        else (lambda n: np.float32(0.0))

    if pid == 0:
        paths.makedirs(args.workdir)
        fmt.write_class_indices(paths.join(args.workdir, fmt.CLASS_INDICES), ds.class_names)
        if spec.groups is not None:
            layer_decay.write(paths.join(args.workdir, 'param_groups.json'), spec.groups, args.layer_decay)
    for line in recipe_lines(args, mix_cfg, spec):
        log(line)
    log(f'data: {args.dataset} {len(ds.train)} train / {len(ds.val)} val images, {num_classes} classes, '
        f'{size}px, {spe} steps of {batch} per epoch')
    left = len(ds.train) - spe * batch  # an epoch is whole batches (data.train_iterator)
    if args.aug_repeats > 1:
        seen = spe * batch // args.aug_repeats
        log(f'train: {len(ds.train)} images, batch {batch}: {spe} step{"s" * (spe > 1)} per epoch of {seen} images '
            f'{args.aug_repeats} times each (--aug-repeats; a new shuffle, so other images, each epoch)')
    elif left:
        log(f'train: {len(ds.train)} images, batch {batch}: {spe} step{"s" * (spe > 1)} per epoch, {left} image'
            f'{"s" * (left > 1)} left out each epoch (a different {left} each epoch: every epoch is a new shuffle)')
    log(f'model: {args.model} {overrides} {args.dtype}, {spec.num_params:,} params'
        + (f', {spec.num_trainable:,} trainable (--freeze-layers)' if args.freeze_layers else ''))
    log(f'normalisation: mean {list(mean)} std {list(std)} ({norm_why})')
    log('augmentation: ' + augment.describe(args.aa, args.color_jitter, args.reprob, args.remode, args.recount,
                                            args.aug_repeats))
    log(f'mesh: data={mesh_sizes["data"]} fsdp={mesh_sizes["fsdp"]} over {ndev} device(s) in {nproc} process(es); '
        + sharding.describe(state['params']))

    def save(step_no, epoch, rec):
        meta = dict(base_meta, epoch=epoch, step=step_no, best_val_acc=best_acc, checksums=checksums(state),
                    saved=time.strftime('%Y-%m-%dT%H:%M:%S%z'),
                    **{k: rec.get(k) for k in ('train_loss', 'train_acc', 'val_loss', 'val_acc', 'val_top5',
                                               'val_acc_ema', 'val_top5_ema')})
        with signals_deferred():  # a save is started whole or not at all
            blocked.append(ckpts.save(step_no, state, it, meta))
        return blocked[-1]

    def check_loss(step_no, loss, params_finite=True):
        where = f'at step {step_no + 1} (epoch {step_no // spe + 1})'
        if not math.isfinite(loss):
            raise NonFiniteLoss(f'non-finite loss ({loss}) {where}')
        if not params_finite:
            raise NonFiniteLoss(f'non-finite parameters after the update {where}')

    def last_good(placed=False):
        try:
            ckpts.wait()  # a save in flight was consistent when it started: let it finish
        except Exception as e:  # noqa: BLE001 - a save the signal cut short: its temporary never becomes a step
            warn(f'warning: the save in flight did not finish ({type(e).__name__}); it is discarded')
        last = ckpts.steps()
        if not last:
            return 'none'
        at = f' ({report.place(last[-1], spe, args.epochs)})' if placed else ''
        return f'step {last[-1]}{at} in {ckpts.root}'

    # ---- epochs
    rep, blocked = report.Reporter(args.workdir, pid == 0, resume_epoch=start // spe), []
    steplog = report.StepLog(args.workdir, pid == 0, args.log_every, batch, lr_at, rep.tb, resume_step=start)
    done = start  # updates made so far, for the interruption message
    try:
        for epoch in range(start // spe, args.epochs):
            meter = EpochMeter(check_loss, steplog.on_metrics)
            first = max(start, epoch * spe)
            bar = rep.bar(spe, f'[train epoch {epoch + 1}]', initial=first - epoch * spe)
            for s in range(first, (epoch + 1) * spe):
                state, metrics = train_step(state, next(it), np.float32(lr_at(s)), ema_weight(s + 1))
                it.fill()  # the next batches are read and sent while this step computes
                steplog.waited(it.last_wait)
                done = s + 1
                meter.add(s, metrics, it.last_wait)
                bar.update()
                speed = meter.images_per_sec()
                bar.set_postfix_str(f"loss {meter.mean('loss'):.3f} acc {meter.mean('correct'):.3f}"
                                    + ('' if speed is None else f' {speed:.0f} img/s'))
                if args.save_every and (s + 1) % args.save_every == 0 and (s + 1) % spe:
                    meter.flush()  # never save parameters whose loss was not checked
                    save(s + 1, epoch, {})
            meter.flush()
            bar.close()
            val = evaluate(eval_step, state['params'], ds.val, eval_tf, batch, pid, nproc, batch_sh)
            step_no = (epoch + 1) * spe
            if not math.isfinite(val['loss']):  # finite params can still overflow the logits
                raise NonFiniteLoss(f"non-finite validation loss ({val['loss']}) after epoch {epoch + 1} (step {step_no})")
            rec = dict(epoch=epoch + 1, epochs=args.epochs, step=step_no, train_loss=meter.mean('loss'),
                       train_acc=meter.mean('correct'), val_loss=val['loss'], val_acc=val['acc'],
                       val_top5=val['top5'], learning_rate=lr_at(step_no - 1), images_per_sec=meter.images_per_sec(),
                       data_wait_ms=meter.data_wait_ms())
            if args.model_ema:   # the EMA evaluated beside the raw weights; the better one ranks the checkpoint
                val_ema = evaluate(eval_step, state['ema'], ds.val, eval_tf, batch, pid, nproc, batch_sh)
                rec.update(val_loss_ema=val_ema['loss'], val_acc_ema=val_ema['acc'], val_top5_ema=val_ema['top5'])
            rec['val_top5'] = val['top5']
            score = fmt.score(rec)
            if args.model_ema:
                which = 'EMA' if rec['val_acc_ema'] > rec['val_acc'] else 'raw'
                log(f"epoch {epoch + 1}: val_acc raw {rec['val_acc']:.4f} / EMA {rec['val_acc_ema']:.4f} (top-5 "
                    f"{rec['val_top5']:.4f} / {rec['val_top5_ema']:.4f}): this checkpoint ranks by the {which} "
                    f"weights' {score:.4f}" + ('; best so far' if score > (best_acc or 0.0) else ''))
            best_acc = max(best_acc or 0.0, score)
            save_s = save(step_no, epoch + 1, rec)
            unreadable = meter.sums['unreadable'] + val['unreadable']
            if unreadable:
                warn(f'epoch {epoch + 1}: skipped {int(unreadable)} unreadable image(s) '
                     f'({int(meter.sums["unreadable"])} train, {int(val["unreadable"])} val)')
            record = dict(rec, best_val_acc=best_acc, model=args.model, num_devices=ndev, num_processes=nproc,
                          mesh=mesh_sizes, unreadable_images=int(unreadable), checkpoint_step=step_no,
                          checkpoint_save_blocked_s=round(save_s, 4), workdir=args.workdir)
            rep.epoch(record)
            yield record
    except NonFiniteLoss as e:
        raise NonFiniteLoss(f'{e}; stopped. Last good checkpoint: {last_good()}') from None
    except KeyboardInterrupt as e:
        signum = getattr(e, 'signum', signal.SIGINT)
        raise Interrupted(signum, f'interrupted by {signal.Signals(signum).name} after '
                          f'{report.where(done, spe, args.epochs)}; last complete checkpoint: {last_good(True)}; '
                          f'rerun the same command to resume') from None
    finally:
        ckpts.close()
        close_iterator(it)
        steplog.close()
        rep.close()
    log(f'done: best val_acc {best_acc:.4f}; checkpoints in {ckpts.root} '
        f'(a save blocked the loop {np.median(blocked) * 1000:.0f} ms, median of {len(blocked)})')
    return TrainResult(state['params'], state, list(rep.history), args.workdir, model, best_acc)


def set_head_bias(params, value: float, shardings):
    """params with head/bias set to `value` (big_vision's init_head_bias), keeping their shardings."""
    if 'bias' not in params.get('head', {}):
        raise TrainError(f'--head-bias-init {value}: the model has no head bias (num_classes=0?)')

    def put(p):
        return dict(p, head=dict(p['head'], bias=jnp.full_like(p['head']['bias'], value)))
    return jax.jit(put, out_shardings=shardings)(params)


def recipe_lines(args, mix_cfg, spec):
    """What the run does beyond plain cross-entropy training, one line each."""
    if mix_cfg is not None:
        what = ([f'mixup alpha {mix_cfg.mixup_alpha}'] if mix_cfg.mixup_alpha > 0 else []) + \
            ([f'cutmix alpha {mix_cfg.cutmix_alpha}' + (f' minmax {list(mix_cfg.cutmix_minmax)}'
                                                          if mix_cfg.cutmix_minmax else '')]
             if mix_cfg.cutmix_alpha > 0 else [])
        yield (f"mixing: {', '.join(what)}, prob {mix_cfg.prob}, switch {mix_cfg.switch_prob}, mode {mix_cfg.mode} "
               f"(timm's Mixup, on the device); smoothing {args.smoothing}")
    if args.bce_loss:
        yield (f"loss: binary cross-entropy (timm's BinaryCrossEntropy), target threshold "
               f"{args.bce_target_thresh}")
    elif mix_cfg is not None or args.smoothing:
        yield 'loss: soft-target cross-entropy (timm\'s SoftTargetCrossEntropy)'
    if args.model_ema:
        yield (f"EMA: decay {args.model_ema_decay}{' with warm-up' if args.model_ema_warmup else ''} (timm's "
               f'ModelEmaV3), evaluated each epoch beside the raw weights')
    if spec.groups is not None:
        layers = max(g['layer_id'] for g in spec.groups.values()) + 1
        low = min(g['lr_scale'] for g in spec.groups.values())
        yield (f'layer decay: {args.layer_decay} over {layers} layer ids, lr x {low:.3g} (stem) .. x 1 (head); '
               f'every parameter in {paths.join(args.workdir, "param_groups.json")}')


def planned(args, num_classes, log, model):
    """--plan TARGET: the step this run would compile, compiled for TARGET and described; a TrainError (exit 1)
    naming the largest batch that fits when it does not fit."""
    from . import plan
    if plan.parse_target(args.plan)[0] == 'tpu' and jax.default_backend() == 'cpu':
        plan.quiet_libtpu_env()
    p = plan.plan(args, args.plan, num_classes, train=True)
    log(plan.describe(p))
    if not p['fits']:
        ndev = p['devices']
        probe = lambda n: plan.plan(argparse_copy(args, batch_size=n), args.plan, num_classes, train=True)  # noqa: E731
        best, _, nxt = plan.max_batch(probe, args.batch_size // 2, ndev * args.grad_accum)
        raise TrainError(f'--plan {args.plan}: --batch-size {args.batch_size} does not fit ({plan.fmt_bytes(p["peak_bytes"])} '
                         f'per device, {plan.fmt_bytes(p["memory_bytes"])} there); the largest batch that fits is '
                         f'{best}' + (f' ({nxt} does not)' if nxt else '') + (' (with --remat it would take less)'
                                                                                 if not args.remat else ''))
    log(f'plan: fits on {args.plan}; not training (--plan)')
    return TrainResult(None, None, [], args.workdir, model, None)


def argparse_copy(args, **changes):
    import argparse
    return argparse.Namespace(**dict(vars(args), **changes))
