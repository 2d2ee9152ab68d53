"""The `vit-flax` command: summary, list, convert, inspect, parity, predict, xla, train. Nothing imports this module."""
import argparse
import fnmatch
import json
import os
import signal
import sys
import time
import traceback

from converters.errors import ConversionError, first_line, quiet_unraisable
from converters.resample import DEFAULT_METHOD, METHODS


def _img_size(text: str):
    try:
        parts = [int(p) for p in text.lower().replace('x', ',').split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'--img-size wants S or HxW, got {text!r}') from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f'--img-size wants S or HxW, got {text!r}')
    return parts[0] if len(parts) == 1 else tuple(parts)


def _setting(text: str):
    """--set KEY=VALUE: the value as a Python literal (16, 0.1, True, None, (2, 2, 6, 2)), else a string."""
    import ast
    key, sep, value = text.partition('=')
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f'--set wants KEY=VALUE, got {text!r}')
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _at_least(lo: int, what: str):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < lo:
            raise argparse.ArgumentTypeError(f'{what} wants an integer >= {lo}, got {text!r}')
        return v
    return parse


def cmd_summary(a):
    import vit_flax
    over = {k: v for k, v in dict(num_classes=a.num_classes, img_size=a.img_size).items() if v is not None}
    s = vit_flax.summarize(a.model, **over)
    for note in s['notes']:
        _say(f'warning: {note}')
    if a.json:
        print(json.dumps(s))
    else:
        print(f"{s['model']}: {s['params']:,} params, {s['gmacs']:.3f} GMACs "
              f"for input {tuple(s['input_shape'])}, {s['num_classes']} classes")


def cmd_list(a):
    """Registered names matching PATTERN, one per line; none matching is said on stderr, exit 1 (as grep).
    The names come from vit_flax_cli/model_names.txt while it is current (no jax import; see names.py)."""
    from . import names
    found = names.list_models(a.pattern)
    if not found:
        timm = sorted(n for n in names.timm_names() if fnmatch.fnmatchcase(n, a.pattern))
        close = names.similar_models(a.pattern.strip('*?'))
        _say(f'vit-flax: no registered model matches {a.pattern!r}'
             + (f' ({len(timm)} timm model(s) do, which this project does not build yet: {", ".join(timm[:3])}'
                + (', ...' if len(timm) > 3 else '') + ')' if timm else '')
             + (f'; similar: {", ".join(close)}' if close else '') + f'; `vit-flax list` shows all '
             f'{len(names.registered())}')
        return 1
    print('\n'.join(found))


def _overrides(a):
    over = {}
    if a.num_classes is not None:
        over['num_classes'] = a.num_classes
    if a.img_size is not None:
        over['img_size'] = a.img_size
    if getattr(a, 'drop_pre_logits', False):
        over['representation_size'] = None
    if getattr(a, 'window_size', None) is not None:
        over['window_size'] = a.window_size
    if getattr(a, 'posemb', None):
        over['posemb'] = a.posemb
    if getattr(a, 'scan_blocks', None) is not None:
        over['scan_blocks'] = a.scan_blocks
    over.update(getattr(a, 'set', None) or [])
    return over


def cmd_convert(a):
    from converters import pipeline
    dst = a.dst.rstrip('/')
    src_real, dst_real = os.path.realpath(a.src), os.path.realpath(dst)
    if src_real == dst_real or os.path.commonpath([src_real, dst_real]) == dst_real:
        raise ConversionError(f'{dst}: is the source or contains it; choose another destination')
    if os.path.exists(dst) and not a.force:  # before the (slow) read; atomic_output checks again
        raise ConversionError(f'{dst}: exists; pass --force to replace it')
    folder = a.format in ('timm-folder', 'transformers')
    if not folder:
        from converters.formats import output_format
        output_format(dst)   # an unknown (or read-only) extension fails before the read
    t0 = time.perf_counter()
    model, params, ck = pipeline.load_model(a.src, a.model, resample=a.resample, head_init=a.head_init,
                                       bias_resize=a.bias_resize, cast=False, allow_nonfinite=a.allow_nonfinite,
                                       step=a.step, ema=a.ema, **_overrides(a))
    from flax.traverse_util import flatten_dict
    flat = flatten_dict(params, sep='/')
    if a.dtype:
        flat = _cast_floats(flat, a.dtype, dst)
    names = ck.class_names if ck.class_names and len(ck.class_names) <= model.num_classes else None
    beside = None if folder or not names else _class_indices_beside(dst, names, a.force)
    if a.format == 'transformers':
        layout = 'transformers ' + pipeline.write_transformers(flat, model, dst, class_names=names, force=a.force,
                                                               log=_say)
    elif folder:
        from .predict import data_config
        cfg, why = data_config(ck, model)
        _say(f'preprocessing in config.json: {why}')
        pipeline.write_model_folder(flat, model, ck.model_name, dst, pretrained_cfg=cfg, class_names=names, force=a.force)
        layout = 'timm model folder'
    else:
        layout = pipeline.write_flat(flat, model, dst, layout=a.layout, force=a.force)
    if beside:
        from converters.formats.training_ckpt import write_class_indices
        write_class_indices(beside, names)   # atomic and durable itself
    how = 'detected' if ck.detected else 'given'
    print(f'{a.src} ({ck.format}, {ck.layout}) -> {dst} ({layout}); model {ck.model_name} ({how}); '
          f'{time.perf_counter() - t0:.1f}s' + (f'; class names in {beside}' if beside else ''))


def _cast_floats(flat, dtype: str, dst: str):
    """Every floating-point array as `dtype` ('float32', 'bfloat16', 'float16'; round to nearest even), said on
    stderr. A value float16 cannot hold (|x| > 65504) is refused, naming its key: it would be written as inf."""
    import ml_dtypes
    import numpy as np
    target = {'float32': np.float32, 'bfloat16': ml_dtypes.bfloat16, 'float16': np.float16}[dtype]
    out, changed = {}, 0
    for k, v in flat.items():
        if np.issubdtype(v.dtype, np.floating) or v.dtype == ml_dtypes.bfloat16:
            if v.dtype != target:
                w = np.asarray(v).astype(target)
                if dtype == 'float16' and not np.all(np.isfinite(w) | ~np.isfinite(np.asarray(v, np.float32))):
                    raise ConversionError(f'{dst}: key {k!r} holds values beyond float16\'s range (65504); '
                                          f'use --dtype bfloat16')
                v, changed = w, changed + 1
        out[k] = v
    _say(f'dtype: {changed} floating-point arrays written as {dtype}' + ('' if dtype == 'float32' else
         ' (round to nearest even: a reduced-precision copy, not the float32 weights)'))
    return out


def _class_indices_beside(dst: str, names, force: bool):
    """WZMIAOMIAO's class_indices.json beside a converted file; another one there is replaced only with --force."""
    from converters.formats.training_ckpt import CLASS_INDICES
    path = os.path.join(os.path.dirname(os.path.abspath(dst)), CLASS_INDICES)
    if os.path.exists(path) and not force:
        from converters.formats.timm_folder import read_class_indices
        try:
            same = read_class_indices(path) == list(names)
        except ConversionError:
            same = False
        if not same:
            raise ConversionError(f'{path}: exists with other class names; pass --force to replace it')
    return path


def cmd_predict(a):
    """Every image is checked before the model loads; with several, the readable ones are predicted, each
    unreadable one is reported in one line (in --json, as an entry with its "error"), and the exit is 1."""
    import numpy as np
    from converters import pipeline, preprocess
    from . import predict as pr
    errors = {}
    for p in a.images:
        try:
            preprocess.check_image(p)
        except ConversionError as e:
            errors[p] = str(e)
    if len(errors) == len(a.images):   # nothing to predict: no model is loaded
        if len(errors) == 1:
            raise ConversionError(errors[a.images[0]])
        for msg in errors.values():
            _say(f'vit-flax: error: {msg}')
        return 1
    model, params, ck = pipeline.load_model(a.ckpt, a.model, step=a.step, **_overrides(a))
    cfg, why = pr.data_config(ck, model)
    names, names_from = pr.class_names(ck, model, a.classes)
    _say(f'model: {ck.model_name} ({model.num_classes} classes) from {a.ckpt}')
    native = pr.native_aspect(model)
    shown = (f'each image at its aspect ratio in at most {model.max_seq_len} patches, {cfg["interpolation"]}, '
             f'mean {cfg["mean"]} std {cfg["std"]}') if native else preprocess.describe(cfg)
    _say(f'preprocessing: {shown} ({why})' + (f'; {cfg["note"]}' if 'note' in cfg else ''))
    _say(f'class names: {names_from}')
    loaded = {}
    for p in a.images:
        if p not in errors:
            try:
                loaded[p] = pr.load_native(p, cfg, model) if native else preprocess.load_image(p, cfg)
            except ConversionError as e:   # damage a header check cannot see
                errors[p] = str(e)
    good = [p for p in a.images if p in loaded]
    run = (lambda xs: pr.predict_naflex(model, params, xs, a.batch)) if native else \
        (lambda xs: pr.predict(model, params, np.stack(xs), a.batch))
    top = dict(zip(good, pr.top_k(run([loaded[p] for p in good]), a.top_k, names))) if good else {}
    if a.json:
        print(json.dumps(dict(model=ck.model_name, checkpoint=a.ckpt, preprocessing=preprocess.config_for_json(cfg),
                              predictions=[dict(image=p, top_k=[dict(index=i, label=n, prob=v) for i, n, v in top[p]])
                                           if p in top else dict(image=p, error=errors[p]) for p in a.images])))
    else:
        for p in good:
            print(p)
            for i, n, v in top[p]:
                print(f'  {v:.4f}  {n}' + (f'  [{i}]' if n != str(i) else ''))
    sys.stdout.flush()
    for p in a.images:
        if p in errors:
            _say(f'vit-flax: error: {errors[p]}')
    if errors:
        _say(f'vit-flax: {len(good)} of {len(a.images)} images predicted, {len(errors)} could not be read')
    return 1 if errors else 0


def cmd_inspect(a):
    import numpy as np
    from converters import pipeline
    over = _overrides(a)
    ck = pipeline.read_checkpoint(a.ckpt, a.model, pipeline.arch_overrides(over), over.get('img_size'))
    family = ck.family.describe(ck)
    total = sum(int(np.prod(v.shape)) for v in ck.flat.values())   # the model's parameters only
    stored = sum(int(np.prod(v.shape)) for v in ck.raw.values())
    extra = stored - total   # buffers the file saves beside them (Microsoft's relative_position_index, attn_mask)
    nbytes = sum(v.nbytes for v in ck.raw.values())
    dtypes = sorted({str(v.dtype) for v in ck.raw.values()})
    diff = _config_diff(ck)
    nonfinite = pipeline.check_finite(ck.flat, ck.path, allow=True, log=lambda msg: None)
    if a.json:
        print(json.dumps(dict(path=ck.path, format=ck.format, layout=ck.layout, family=family, model=ck.model_name,
                              detected=ck.detected, overrides=diff, notes=ck.notes, keys=len(ck.raw), params=total,
                              other_values=extra,
                              bytes=nbytes, nonfinite=nonfinite, dtypes=dtypes,
                              tensors={k: [list(v.shape), str(v.dtype)] for k, v in ck.raw.items()}
                              if a.keys else None), default=str))
        return
    print(f'file:    {ck.path}')
    print(f'format:  {ck.format}   layout: {ck.layout}')
    print(f'family:  {family}')
    print(f"model:   {ck.model_name} ({'detected' if ck.detected else 'given'})"
          + (f"  with {', '.join(f'{k}={v}' for k, v in diff.items())}" if diff else ''))
    for note in ck.notes:
        print(f'note:    {note}')
    print(f'keys:    {len(ck.raw)}   params: {total:,}   bytes: {nbytes:,}   dtypes: {", ".join(dtypes)}')
    if extra:
        print(f'         (and {extra:,} stored values that are not parameters: buffers the model regenerates)')
    if nonfinite:
        k, n = next(iter(nonfinite.items()))
        print(f'WARNING: {len(nonfinite)} key(s) hold NaN/Inf values, first {k!r} ({n} values)')
    if a.keys:
        width = max(len(k) for k in ck.raw)
        for k, v in ck.raw.items():
            print(f'  {k:<{width}}  {str(tuple(v.shape)):<22} {v.dtype}')


def _config_diff(ck):
    """Fields where the checkpoint's model differs from the registered one (16 and (16, 16) are equal)."""
    import vit_flax
    base = vit_flax.create_model(ck.model_name)
    fields = [f for f in base.__dataclass_fields__ if f not in ('parent', 'name')]
    return {f: getattr(ck.model, f) for f in fields
            if not _same(getattr(ck.model, f), getattr(base, f)) and not (f == 'mlp_dim' and _default_mlp(ck.model))}


def _same(a, b) -> bool:
    a, b = (tuple(v) if isinstance(v, (tuple, list)) else v for v in (a, b))
    if isinstance(a, int) and isinstance(b, tuple):
        a = (a,) * len(b)
    if isinstance(b, int) and isinstance(a, tuple):
        b = (b,) * len(a)
    return a == b


def _default_mlp(model) -> bool:
    return hasattr(model, 'mlp_ratio') and getattr(model, 'mlp_dim', None) == int(model.embed_dim * model.mlp_ratio)


def cmd_parity(a):
    from converters.optional import require
    require('torch', 'vit-flax parity')   # before the checkpoint is read
    from converters import pipeline
    from . import parity
    model, params, ck = pipeline.load_model(a.ckpt, a.model, allow_nonfinite=a.allow_nonfinite, **_overrides(a))
    tol = a.tol if a.tol is not None else (1e-4 if a.dtype == 'float32' else 5e-2)
    if a.dtype != 'float32':   # Flax computes in bf16 (float32 params, norms, softmax, accumulation), timm in float32
        import jax.numpy as jnp
        model = model.clone(dtype=jnp.bfloat16)
    hf = parity.transformers_folder(ck)   # a transformers folder: transformers' own model on its own weights
    rows = parity.compare_transformers(model, params, hf, batch=a.batch) if hf else \
        parity.compare(model, params, ck.model_name, batch=a.batch)
    ref = 'transformers' if hf else 'timm'
    against = '' if a.dtype == 'float32' else f' against {ref} in float32'
    print(f'parity: {ck.model_name} from {a.ckpt} ({ck.format}, {ck.layout}), batch {a.batch}, Flax {a.dtype}{against}'
          + (f', against transformers {hf}' if hf else ''))
    print(parity.format_table(rows, tol))
    return 0 if all(r.rel <= tol for r in rows) else 1


def cmd_train(a):
    from vit_train import main as train_main
    return train_main(a.args, prog='vit-flax train')  # its own flags, parser and error handling


def build_parser():
    p = argparse.ArgumentParser(prog='vit-flax', description='ViT/DeiT/Swin in Flax: summaries and checkpoint '
                                'conversion between Google .npz, PyTorch (.pth/.pt/.bin, .safetensors) and orbax.')
    p.add_argument('--debug', action='store_true', help='show the traceback of an error')
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--debug', action='store_true', default=argparse.SUPPRESS, help='show the traceback of an error')
    sub = p.add_subparsers(dest='cmd', required=True)

    s = sub.add_parser('summary', parents=[common], help='parameter count and GMACs of a registered model')
    s.add_argument('model', help='registered model name (timm\'s; `vit-flax list` shows them)')
    s.add_argument('--json', action='store_true', help='print one JSON object (keys include params, gmacs, notes)')
    s.add_argument('--num-classes', type=_at_least(0, '--num-classes'),
                   help='head size (default: the model\'s own, 1000 for ImageNet models; 0: no head)')
    s.add_argument('--img-size', type=_img_size, help='input size S or HxW (default: the model\'s own)')
    s.set_defaults(fn=cmd_summary)

    s = sub.add_parser('list', parents=[common], help='registered model names')
    s.add_argument('pattern', nargs='?', default='*', help='shell-style pattern, e.g. \'deit_*\' (default: every name)')
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser('convert', parents=[common], help='convert a checkpoint; formats follow the extensions',
                       description='Formats by extension: .npz (Google), .pth/.pt/.bin (PyTorch state_dict), '
                       '.safetensors, a directory (orbax). Head and position-embedding changes are reported.')
    s.add_argument('src', help='checkpoint file, orbax folder, timm model folder, hf-hub:ORG/NAME or training workdir')
    s.add_argument('dst', help='output: its extension picks the format (a folder: orbax)')
    s.add_argument('--model', help='registered model name (default: detected from the checkpoint)')
    s.add_argument('--force', action='store_true', help='replace an existing DST')
    s.add_argument('--num-classes', type=_at_least(0, '--num-classes'), help='new head size; a head that does not fit is replaced '
                   '(see --head-init); 0 drops the head')
    s.add_argument('--img-size', type=_img_size, help='new input size S or HxW; position embeddings are resampled')
    s.add_argument('--resample', choices=METHODS, default=DEFAULT_METHOD,
                   help=f'position-embedding resampling (default: {DEFAULT_METHOD}, as timm does for .pth; '
                   'bilinear: timm npz loading; google: scipy zoom order 1, align-corners, as vit_jax/big_vision)')
    s.add_argument('--head-init', choices=('zeros', 'fresh'), default='zeros',
                   help='init of a replaced head: zeros (Google fine-tuning, default) or fresh (trunc normal .02)')
    s.add_argument('--drop-pre-logits', action='store_true', help='drop the pre_logits (representation) layer')
    s.add_argument('--window-size', type=_at_least(1, '--window-size'), help='Swin: new attention window; V1 bias tables are resized, '
                   'Swin V2\'s continuous bias needs no resizing (its pretrained windows are kept, as Microsoft\'s '
                   'fine-tuning configs do)')
    s.add_argument('--bias-resize', choices=('bicubic', 'timm'), default='bicubic',
                   help='Swin bias-table resizing (default: bicubic, as Microsoft\'s fine-tuning code; '
                   'timm: timm\'s resize_rel_pos_bias_table)')
    s.add_argument('--posemb', choices=('learn', 'sincos2d'),
                   help='ViT positions: learn (a stored table; fixed sincos2d positions are written out as one) or '
                   'sincos2d (big_vision\'s fixed table; a learned table is dropped). Default: as the checkpoint')
    s.add_argument('--allow-nonfinite', action='store_true', help='convert weights holding NaN/Inf (refused by '
                   'default: a checkpoint like that is broken), with a warning')
    s.add_argument('--dtype', choices=('float32', 'bfloat16', 'float16'),
                   help='write floating-point arrays in this dtype (default: as read)')
    s.add_argument('--format', choices=('auto', 'timm-folder', 'transformers'), default='auto',
                   help='auto (default): from DST\'s extension; timm-folder: DST is a folder of config.json + model.safetensors '
                   'that timm.create_model(\'local-dir:DST\', pretrained=True) loads; transformers: a Hugging Face '
                   'transformers folder that the class holding the model (ViTForImageClassification, Dinov2Model, '
                   'SiglipVisionModel, ...) loads with from_pretrained(DST)')
    s.add_argument('--step', help='SRC is a training workdir: best (default), latest, or a step number')
    s.add_argument('--ema', action='store_true', help='SRC is a training workdir run with --model-ema: export its '
                   'weight EMA (default: its raw weights; the log line says which were taken)')
    s.add_argument('--layout', help='output layout: npz released (default), linen, big_vision; torch timm '
                   '(default) or microsoft or wzmiaomiao (Swin; WZMIAOMIAO\'s swin_transformer/model.py); '
                   'vit-pytorch models: vit-pytorch (default), vit-pytorch-1.16, -1.2, -0.7, -0.6 (older releases)')
    s.add_argument('--scan-blocks', action=argparse.BooleanOptionalAction, default=None,
                   help='ViT: stack the blocks as nn.scan does (Transformer/encoderblock/... with a leading depth '
                   'axis) in npz linen/big_vision and orbax output; --no-scan-blocks unrolls them '
                   '(default: as the source; released npz and torch files are always unrolled)')
    _add_set(s)
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser('predict', parents=[common], help='top-k classes of images, with the checkpoint\'s own '
                       'preprocessing and class names',
                       description='CKPT: a training workdir, a timm model folder, hf-hub:ORG/NAME[@REV] (through '
                       'huggingface_hub; HF_HUB_OFFLINE=1: its cache only) or any file the converters read. Preprocessing (resize, centre crop, mean/std) comes '
                       'from what the checkpoint records; the defaults are said on stderr.')
    s.add_argument('ckpt', help='checkpoint: any the converters read')
    s.add_argument('images', nargs='+', metavar='IMAGE', help='image files (any Pillow reads)')
    s.add_argument('--model', help='registered model name (default: recorded in, or detected from, the checkpoint)')
    s.add_argument('--top-k', type=_at_least(1, '--top-k'), default=5, help='classes shown per image (default 5)')
    s.add_argument('--classes', help='class names in WZMIAOMIAO\'s class_indices.json format ({"0": "daisy", ...})')
    s.add_argument('--json', action='store_true', help='print one JSON object')
    s.add_argument('--step', help='CKPT is a training workdir: best (default), latest, or a step number')
    s.add_argument('--batch', type=_at_least(1, '--batch'), default=32, help='images per forward pass (default 32)')
    _add_set(s)
    s.set_defaults(fn=cmd_predict, num_classes=None, img_size=None)

    s = sub.add_parser('inspect', parents=[common], help='format, layout, detected model, keys, shapes, dtypes, totals')
    s.add_argument('ckpt', help='checkpoint: any the converters read')
    s.add_argument('--model', help='registered model name (default: detected from the checkpoint)')
    s.add_argument('--keys', action='store_true', help='list every key with shape and dtype')
    s.add_argument('--json', action='store_true', help='print one JSON object')
    _add_set(s)
    s.set_defaults(fn=cmd_inspect, num_classes=None, img_size=None)

    s = sub.add_parser('parity', parents=[common], help='run timm (transformers, for a transformers folder) and Flax '
                       'on the same input; per-block differences')
    s.add_argument('ckpt', help='checkpoint: any the converters read')
    s.add_argument('--model', help='registered model name (default: detected from the checkpoint)')
    s.add_argument('--tol', type=float, default=None,
                   help='relative tolerance (default 1e-4 in float32, 5e-2 with --dtype bfloat16)')
    s.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                   help='Flax compute dtype (default float32); bfloat16 is reported against timm in float32')
    s.add_argument('--batch', type=_at_least(1, '--batch'), default=2, help='images compared (default 2)')
    s.add_argument('--allow-nonfinite', action='store_true', help='compare weights holding NaN/Inf (refused by default)')
    _add_set(s)
    s.set_defaults(fn=cmd_parity, num_classes=None, img_size=None)

    from . import xla
    xla.add_parser(sub, common, _add_set, _at_least)

    s = sub.add_parser('train', add_help=False, help='train or fine-tune (the flags of train_flax.py; '
                       'vit-flax train --help)')
    s.add_argument('args', nargs=argparse.REMAINDER, help='the flags of train_flax.py')
    s.set_defaults(fn=cmd_train)

    from .data_cmd import add_parser as add_data_parser
    add_data_parser(sub, common)
    return p


def _add_set(parser):
    parser.add_argument('--set', type=_setting, action='append', metavar='KEY=VALUE',
                        help='a model field the file does not record or that should differ, repeatable: '
                        'heads=8 (vit-pytorch), always_partition=True (Swin), depth=6, in_chans=2, ... '
                        '(the value is a Python literal)')


def _say(msg: str) -> None:
    try:
        print(msg, file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):   # stderr closed too: nothing left to tell
        pass


def _quiet_broken_pipe() -> int:
    """The reader of our output went away (`vit-flax list | head`): stop quietly, as coreutils do.

    Python would otherwise print a traceback, and again at exit when it flushes stdout; pointing stdout
    at /dev/null stops the second one. The exit status is the shell's for a process killed by SIGPIPE.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + signal.SIGPIPE


def main(argv=None) -> int:
    """Exit status: 0 success, 1 a refused input or failed conversion (one line naming the file and the
    fault), 2 bad usage, 70 an internal error (one line; `--debug` shows the traceback), 130 interrupted,
    141 output pipe closed. `train` keeps the exit codes of train_flax.py."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ['train']:  # argparse would claim the training flags (and --help) for itself
        return cmd_train(argparse.Namespace(args=argv[1:]))
    if argv[:1] == ['xla']:   # before jax loads: it runs on the CPU and compiles for the target
        from .xla import prepare_env
        prepare_env()
    args = build_parser().parse_args(argv)
    debug = getattr(args, 'debug', False)
    if args.fn is not cmd_list:   # `list` answers without jax; the rest import it here, after --help and usage errors
        from vit_flax.errors import ModelConfigError
        from vit_flax.registry import UnknownModelError, UnknownOptionError
        refused = (ConversionError, UnknownModelError, UnknownOptionError, ModelConfigError)
    else:
        refused = (ConversionError,)
    try:
        rc = args.fn(args) or 0
        sys.stdout.flush()   # inside the try: a closed pipe surfaces here, not at interpreter exit
        return rc
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except KeyboardInterrupt:
        if debug:
            raise
        _say('vit-flax: interrupted')
        return 130
    except refused as e:
        if debug:
            raise
        _say(f'vit-flax: error: {e}')
        return 1
    except Exception as e:  # noqa: BLE001 - anything else is our bug: say so, never dress it up as bad input
        if debug:
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        _say(f'vit-flax: internal error: {type(e).__name__}: {first_line(e)} (at {os.path.basename(where.filename)}:'
             f'{where.lineno}; rerun with --debug for the traceback)')
        return 70


def run() -> None:
    """The `vit-flax` entry point. After a failure, the process ends at once: libraries' threads that are
    still unwinding (orbax/tensorstore after a corrupt checkpoint) must not add tracebacks, or crash,
    after the one line already printed; no output is pending then (writes are complete or discarded)."""
    quiet_unraisable(sys.argv[1:])  # for good: threads may still be unwinding when the process ends
    code = main()
    if code and sys.argv[1:2] != ['train']:  # training waits for its own checkpoint threads before it returns
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


if __name__ == '__main__':
    run()
