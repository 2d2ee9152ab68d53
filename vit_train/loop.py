"""The training run, top to bottom: data, model, mesh, state (fresh, fine-tuned or resumed), epochs."""
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

import vit_flax
from converters import training_ckpt as fmt

from . import config, data, optim, report, sharding, step as steps, weights
from .checkpoint import Checkpoints
from .errors import NonFiniteLoss, TrainError

# A resumed run must agree with its checkpoint on these (anything else - epochs, lr, mesh, workers, dtype,
# grad-accum - may change between runs).
SAME_RUN = ('model', 'model_overrides', 'num_classes', 'dataset', 'data_path', 'val_split', 'batch_size', 'seed',
            'optimizer', 'freeze_layers')


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


def model_overrides(args, num_classes: int) -> dict:
    over = dict(num_classes=num_classes)
    for k in ('img_size', 'patch_size', 'depth'):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    if args.drop_path:
        over['drop_path_rate'] = args.drop_path
    return over


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def _identity(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in SAME_RUN}


def _check_same_run(meta: dict, cfg: dict, workdir: str) -> None:
    old, new = _identity(meta['config']), _identity(cfg)
    for k in SAME_RUN:
        if old[k] != new[k]:
            raise TrainError(f'{workdir} holds a run with {k}={old[k]!r}, this command has {k}={new[k]!r}; '
                             f'use the same flags to resume it, or another --workdir')


class EpochMeter:
    """Sums of the step metrics, fetched one step late so the host never waits on the device's queue."""

    def __init__(self, on_loss):
        self.on_loss, self.pending = on_loss, []
        self.sums = dict(loss=0.0, correct=0.0, count=0.0, unreadable=0.0, steps=0)
        self.t_first, self.images_timed = None, 0

    def add(self, step_no: int, metrics) -> None:
        self.pending.append((step_no, metrics))
        if len(self.pending) > 1:
            self._fetch(*self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._fetch(*self.pending.pop(0))

    def _fetch(self, step_no, metrics):
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        self.on_loss(step_no, m['loss'])
        if self.t_first is None:  # time from the first finished step on: compilation is not throughput
            self.t_first = time.perf_counter()
        else:
            self.images_timed += m['count'] + m['unreadable']
        self.sums['loss'] += m['loss'] * m['count']
        for k in ('correct', 'count', 'unreadable'):
            self.sums[k] += m[k]
        self.sums['steps'] += 1

    def images_per_sec(self) -> float:
        dt = time.perf_counter() - self.t_first if self.t_first else 0.0
        return self.images_timed / dt if dt > 0 else 0.0


def run(argv=None, prog=None) -> int:
    args = config.resolve(config.build_parser(prog).parse_args(argv))
    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        # a rerun (resume) compiles the same programs: keep them beside the run unless the user chose a cache
        jax.config.update('jax_compilation_cache_dir', os.path.join(args.workdir, 'xla_cache'))
    init_distributed(args)
    nproc, pid = jax.process_count(), jax.process_index()
    log, warn = report.printer(pid == 0), report.printer(pid == 0, sys.stderr)

    # ---- data
    ds = data.load(args.dataset, args.data_path, args.val_split)
    num_classes = args.num_classes or len(ds.class_names)
    if not len(ds.val):
        raise TrainError(f'no validation images (--val-split {args.val_split})')
    if num_classes < len(ds.class_names):
        raise TrainError(f'--num-classes {num_classes} is fewer than the {len(ds.class_names)} classes in the data')

    # ---- model
    overrides = model_overrides(args, num_classes)
    try:
        model = vit_flax.create_model(args.model, **overrides, dtype=jnp.dtype(args.dtype))
    except (KeyError, TypeError, ValueError) as e:
        raise TrainError(f'--model {args.model}: {e.args[0] if isinstance(e, KeyError) else e}') from None
    height, width, _ = model.input_shape
    if height != width:
        raise TrainError(f'{args.model}: training needs a square input, the model takes {height}x{width}')
    size = height

    # ---- devices, batch and schedule
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

    run_cfg = _jsonable(dict(vars(args), model_overrides=overrides, num_classes=num_classes,
                             data_path=ds.path, crop_scale=list(args.crop_scale)))
    ckpts = Checkpoints(args.workdir, args.keep)

    # ---- state: shapes, shardings, optimizer
    init_fn = lambda rng: model.init(rng, jnp.zeros((1,) + model.input_shape, jnp.float32), train=False)['params']
    abstract_params = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    flat_abstract = flatten_dict(abstract_params, sep='/')
    trainable = optim.trainable_keys(flat_abstract, args.freeze_layers)
    tx = optim.make(args.optimizer, args.weight_decay, {k: optim.decays(k) for k in trainable},
                    args.momentum, args.clip_grad)
    opt_init = lambda params: tx.init({k: v for k, v in flatten_dict(params, sep='/').items() if k in trainable})
    abstract = dict(params=abstract_params, opt_state=jax.eval_shape(opt_init, abstract_params),
                    step=jax.ShapeDtypeStruct((), jnp.int32))
    shardings = dict(params=sharding.tree_shardings(abstract['params'], mesh),
                     opt_state=sharding.tree_shardings(abstract['opt_state'], mesh), step=sharding.replicated(mesh))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)

    train_tf = data.TrainTransform(size, args.interpolation, args.crop_scale, hflip=args.hflip)
    eval_tf = data.EvalTransform(size, args.interpolation, args.crop_pct)

    def data_iter(start_step=0):
        return data.train_iterator(ds.train, train_tf, batch=batch, seed=args.seed, process_index=pid,
                                   process_count=nproc, workers=args.workers, start_step=start_step)

    def resume_iter(meta):
        if meta['num_processes'] == nproc and meta['data_workers'] == args.workers:
            return data_iter(), True
        log(f"data: checkpoint written by {meta['num_processes']} process(es) with {meta['data_workers']} "
            f"worker(s); positioning the pipeline from the step instead of its saved state")
        return data_iter(meta['step']), False

    # ---- resumed, or fresh / fine-tuned (a resumed run keeps the weights' record and normalisation)
    resumed = ckpts.resume(abstract, resume_iter, lambda m: _check_same_run(m, run_cfg, args.workdir), warn)
    if resumed:
        state, it, meta0 = resumed
        start, best_acc, winfo = int(state['step']), meta0['best_val_acc'], meta0['weights']
        if start >= total:
            log(f"training already finished: epoch {meta0['epoch']} of {meta0['epochs']} (step {start}) in "
                f"{args.workdir}; nothing to do (raise --epochs to train further)")
            _close(it)
            ckpts.close()
            return 0
        log(f"resumed from epoch {meta0['epoch']} (step {start})")
        cfg = meta0['pretrained_cfg']
        wnorm = (tuple(cfg['mean']), tuple(cfg['std']), 'as recorded in the checkpoint')
    else:
        params_np, winfo, wnorm = None, None, None
        if args.weights:
            load_over = {k: v for k, v in overrides.items() if k != 'drop_path_rate'}
            params_np, winfo, wnorm = weights.load(args.weights, args.model, load_over, args.resample, warn)
            params = sharding.put(params_np, shardings['params'])
        else:
            params = jax.jit(init_fn, out_shardings=shardings['params'])(jax.random.PRNGKey(args.seed))
        state = dict(params=params, opt_state=jax.jit(opt_init, out_shardings=shardings['opt_state'])(params),
                     step=sharding.put(np.int32(0), shardings['step']))
        it, start, best_acc = data_iter(), 0, None
    mean, std, norm_why = weights.normalization(args, wnorm)

    batch_sh = sharding.batch_sharding(mesh)
    batch_shardings = {k: batch_sh for k in ('image', 'label', 'weight', 'unreadable')}
    train_step = jax.jit(
        steps.make_train_step(model, tx, trainable, mean=mean, std=std, label_smoothing=args.label_smoothing,
                              grad_accum=args.grad_accum, seed=args.seed),
        in_shardings=(shardings, batch_shardings, sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
    eval_step = jax.jit(steps.make_eval_step(model, mean=mean, std=std),
                        in_shardings=(shardings['params'], batch_shardings), out_shardings=sharding.replicated(mesh))
    rep = report.Reporter(args.workdir, pid == 0, resume_epoch=start // spe)

    if pid == 0:
        os.makedirs(args.workdir, exist_ok=True)
        fmt.write_class_indices(os.path.join(args.workdir, fmt.CLASS_INDICES), ds.class_names)
    nparams = sum(int(np.prod(x.shape)) for x in flat_abstract.values())
    ntrain = sum(int(np.prod(flat_abstract[k].shape)) for k in trainable)
    log(f'data: {args.dataset} {len(ds.train)} train / {len(ds.val)} val images, {num_classes} classes, '
        f'{size}px, {spe} steps of {batch} per epoch')
    log(f'model: {args.model} {overrides} {args.dtype}, {nparams:,} params'
        + (f', {ntrain:,} trainable (--freeze-layers)' if args.freeze_layers else ''))
    log(f'normalisation: mean {list(mean)} std {list(std)} ({norm_why})')
    log(f'mesh: data={mesh_sizes["data"]} fsdp={mesh_sizes["fsdp"]} over {ndev} device(s) in {nproc} process(es); '
        + sharding.describe(state['params']))

    pre_cfg = dict(input_size=[3, size, size], interpolation=args.interpolation, crop_pct=args.crop_pct,
                   crop_mode='center', mean=list(mean), std=list(std))

    def meta_for(step_no, epoch, rec):
        return dict(format=fmt.FORMAT, version=fmt.VERSION, model=args.model, model_overrides=_jsonable(overrides),
                    num_classes=num_classes, class_names=ds.class_names, dtype=args.dtype, pretrained_cfg=pre_cfg,
                    epoch=epoch, step=step_no, steps_per_epoch=spe, epochs=args.epochs,
                    train_loss=rec.get('train_loss'), train_acc=rec.get('train_acc'), val_loss=rec.get('val_loss'),
                    val_acc=rec.get('val_acc'), best_val_acc=best_acc, weights=winfo,
                    dataset=dict(name=args.dataset, path=ds.path, val_split=args.val_split,
                                 num_train=len(ds.train), num_val=len(ds.val)),
                    num_processes=nproc, data_workers=args.workers, mesh=mesh_sizes, config=run_cfg,
                    saved=time.strftime('%Y-%m-%dT%H:%M:%S%z'))

    def check_loss(step_no, loss):
        if not math.isfinite(loss):
            raise NonFiniteLoss(f'non-finite loss ({loss}) at step {step_no + 1} (epoch {step_no // spe + 1})')

    save_blocked = []
    try:
        for epoch in range(start // spe, args.epochs):
            meter = EpochMeter(check_loss)
            first = max(start, epoch * spe)
            bar = rep.bar(spe, f'[train epoch {epoch + 1}]', initial=first - epoch * spe)
            for s in range(first, (epoch + 1) * spe):
                state, metrics = train_step(state, sharding.global_batch(next(it), batch_sh), np.float32(lr_at(s)))
                meter.add(s, metrics)
                bar.update()
                if meter.sums['count']:
                    bar.set_postfix_str(f"loss {meter.sums['loss'] / meter.sums['count']:.3f} "
                                        f"acc {meter.sums['correct'] / meter.sums['count']:.3f} "
                                        f"{meter.images_per_sec():.0f} img/s")
                if args.save_every and (s + 1) % args.save_every == 0 and (s + 1) % spe:
                    meter.flush()  # never save parameters whose loss was not checked
                    save_blocked.append(ckpts.save(s + 1, state, it, meta_for(s + 1, epoch, {})))
            meter.flush()
            bar.close()
            val = evaluate(eval_step, state['params'], ds.val, eval_tf, batch, pid, nproc, batch_sh)
            step_no = (epoch + 1) * spe
            sums = meter.sums
            rec = dict(epoch=epoch + 1, epochs=args.epochs, step=step_no,
                       train_loss=sums['loss'] / max(sums['count'], 1), train_acc=sums['correct'] / max(sums['count'], 1),
                       val_loss=val['loss'], val_acc=val['acc'], learning_rate=float(lr_at(step_no - 1)),
                       images_per_sec=meter.images_per_sec())
            best_acc = max(best_acc or 0.0, rec['val_acc'])
            blocked = ckpts.save(step_no, state, it, meta_for(step_no, epoch + 1, rec))
            save_blocked.append(blocked)
            unreadable = sums['unreadable'] + val['unreadable']
            if unreadable:
                warn(f'epoch {epoch + 1}: skipped {int(unreadable)} unreadable image(s) '
                     f'({int(sums["unreadable"])} train, {int(val["unreadable"])} val)')
            rep.epoch(dict(rec, best_val_acc=best_acc, model=args.model, num_devices=ndev, num_processes=nproc,
                           mesh=mesh_sizes, unreadable_images=int(unreadable), checkpoint_step=step_no,
                           checkpoint_save_blocked_s=round(blocked, 4), workdir=args.workdir))
    except NonFiniteLoss as e:
        ckpts.wait()
        last = ckpts.steps()
        raise NonFiniteLoss(f'{e}; stopped. Last good checkpoint: '
                            + (f'step {last[-1]} in {ckpts.root}' if last else 'none')) from None
    finally:
        ckpts.close()
        _close(it)
        rep.close()
    if save_blocked:
        log(f'done: best val_acc {best_acc:.4f}; checkpoints in {ckpts.root} '
            f'(a save blocked the loop {np.median(save_blocked) * 1000:.0f} ms, median of {len(save_blocked)})')
    return 0


def _close(it) -> None:
    if hasattr(it, 'close'):  # grain's multiprocess prefetch holds worker processes
        it.close()


def evaluate(eval_step, params, source, transform, batch, pid, nproc, batch_sh) -> dict:
    sums = None
    for local in data.eval_batches(source, transform, batch=batch, process_index=pid, process_count=nproc):
        m = eval_step(params, sharding.global_batch(local, batch_sh))
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    s = {k: float(v) for k, v in jax.device_get(sums).items()}
    n = max(s['count'], 1.0)
    return dict(loss=s['loss'] / n, acc=s['correct'] / n, unreadable=s['unreadable'])
