"""Evaluation: top-1, top-5 and cross-entropy over the validation split, and `--eval-only`.

`--eval-only` evaluates, on the validation split of the data flags given:
- a training workdir (`--workdir`): its best checkpoint, or `--step best|latest|N`, with the model, class
  names and preprocessing recorded in the checkpoint (`--mean/--std` override); both its raw weights and its
  weight EMA when it has one;
- or `--weights` (any file the converters read) with the model flags, as a fine-tuning run would start.
It prints one line per set of weights and writes WORKDIR/eval.json:
{"source", "step", "dataset", "num_val", "results": {"raw"|"ema"|"weights": {"top1", "top5", "loss"}}}.
"""
import json

import jax
import jax.numpy as jnp

from converters.formats import paths, training_ckpt as fmt

from . import data, sharding, step as steps, weights
from .errors import TrainError


def evaluate(eval_step, params, source, transform, batch, pid, nproc, batch_sh) -> dict:
    sums = None
    for local in data.eval_batches(source, transform, batch=batch, process_index=pid, process_count=nproc):
        m = eval_step(params, sharding.global_batch(local, batch_sh))
        sums = m if sums is None else jax.tree.map(jnp.add, sums, m)
    s = {k: float(v) for k, v in jax.device_get(sums).items()}
    n = max(s['count'], 1.0)
    return dict(loss=s['loss'] / n, acc=s['correct'] / n, top5=s['correct5'] / n, unreadable=s['unreadable'])


def eval_only(args, ds, log, warn, warned_dir, build) -> dict:
    """Evaluate and write eval.json; returns its record. `build(num_classes)` -> (model, overrides, size)."""
    nproc, pid = jax.process_count(), jax.process_index()
    mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh, jax.device_count()))
    batch = args.batch_size
    if batch % jax.device_count() or batch % nproc:
        raise TrainError(f'--batch-size {batch} must split evenly over {jax.device_count()} devices and {nproc} '
                         f'processes')
    if args.weights:
        model, overrides, size = build(args.num_classes or len(ds.class_names))
        params, _, wnorm = weights.load(args.weights, args.model,
                                        {k: v for k, v in overrides.items() if k != 'drop_path_rate'},
                                        args.resample, warn)
        sets, source, step = {'weights': params}, paths.resolve(args.weights), None
        mean, std, why = weights.normalization(args, wnorm)
        crop_pct, interpolation = args.crop_pct, args.interpolation
    else:
        try:
            ck = fmt.select(args.workdir, args.step or 'best', log=warn)
        except Exception as e:  # noqa: BLE001 - ConversionError and orbax's own: one line naming the workdir
            raise TrainError(f'--eval-only: {e}') from None
        meta = ck.meta
        if list(meta['class_names']) != list(ds.class_names):
            raise TrainError(f'--eval-only: {ck.path} was trained on other classes ({len(meta["class_names"])}: '
                             f'{meta["class_names"][:3]}...) than --dataset {args.dataset} has')
        model = fmt.model_from_meta(meta, dtype=jnp.dtype(args.dtype))
        sets, source, step = {'raw': ck.flat}, ck.path, ck.step
        if fmt.has_ema(ck.path):
            sets['ema'] = fmt.read_params(paths.dirname(ck.path), ck.step, meta, fmt.EMA)
        cfg = meta['pretrained_cfg']
        mean, std, why = tuple(cfg['mean']), tuple(cfg['std']), f'recorded in {ck.path}'
        if args.mean or args.std:
            mean, std, why = tuple(args.mean or mean), tuple(args.std or std), '--mean/--std'
        size, crop_pct, interpolation = cfg['input_size'][-1], cfg['crop_pct'], cfg['interpolation']
    from flax.traverse_util import unflatten_dict
    eval_tf = data.EvalTransform(size, interpolation, crop_pct, warned_dir=warned_dir)
    replicated, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    batch_shardings = {k: batch_sh for k in ('image', 'label', 'weight', 'unreadable')}
    eval_step = jax.jit(steps.make_eval_step(model, mean=mean, std=std),
                        in_shardings=(replicated, batch_shardings), out_shardings=replicated)
    results = {}
    for name, flat in sets.items():
        params = jax.device_put(unflatten_dict(flat, sep='/') if _is_flat(flat) else flat, replicated)
        r = evaluate(eval_step, params, ds.val, eval_tf, batch, pid, nproc, batch_sh)
        results[name] = dict(top1=r['acc'], top5=r['top5'], loss=r['loss'])
        label = {'raw': 'raw weights', 'ema': 'EMA weights'}.get(name, 'weights')
        log(f"eval: {label} of {source}" + (f' (step {step})' if step is not None else '') +
            f": top-1 {r['acc']:.4f}  top-5 {r['top5']:.4f}  loss {r['loss']:.4f} on {len(ds.val)} "
            f"{args.dataset} val images (normalisation {why})")
    record = dict(source=source, step=step, dataset=args.dataset, num_val=len(ds.val), results=results)
    if pid == 0:
        paths.makedirs(args.workdir)
        out = paths.join(args.workdir, 'eval.json')
        paths.write_text(out, json.dumps(record, indent=2))
        log(f'eval: written to {out}')
    return record


def _is_flat(tree) -> bool:
    return all(not isinstance(v, dict) for v in tree.values())
