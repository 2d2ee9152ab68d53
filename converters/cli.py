"""The `vit-flax` command: summary, list, convert, inspect, parity. Nothing imports this module."""
import argparse
import json
import os
import sys
import time

from .errors import ConversionError
from .resample import DEFAULT_METHOD, METHODS


def _img_size(text: str):
    try:
        parts = [int(p) for p in text.lower().replace('x', ',').split(',')]
    except ValueError:
        raise argparse.ArgumentTypeError(f'--img-size wants S or HxW, got {text!r}') from None
    if len(parts) not in (1, 2) or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f'--img-size wants S or HxW, got {text!r}')
    return parts[0] if len(parts) == 1 else tuple(parts)


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
    if a.json:
        print(json.dumps(s))
    else:
        print(f"{s['model']}: {s['params']:,} params, {s['gmacs']:.3f} GMACs "
              f"for input {tuple(s['input_shape'])}, {s['num_classes']} classes")


def cmd_list(a):
    import vit_flax
    print('\n'.join(vit_flax.list_models(a.pattern)))


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
    if getattr(a, 'scan_blocks', None) is not None:
        over['scan_blocks'] = a.scan_blocks
    return over


def cmd_convert(a):
    from . import api
    dst = a.dst.rstrip('/')
    src_real, dst_real = os.path.realpath(a.src), os.path.realpath(dst)
    if src_real == dst_real or os.path.commonpath([src_real, dst_real]) == dst_real:
        raise ConversionError(f'{dst}: is the source or contains it; choose another destination')
    if os.path.exists(dst) and not a.force:  # before the (slow) read; atomic_output checks again
        raise ConversionError(f'{dst}: exists; pass --force to replace it')
    t0 = time.perf_counter()
    model, params, ck = api.load_model(a.src, a.model, resample=a.resample, head_init=a.head_init,
                                       bias_resize=a.bias_resize, cast=False, **_overrides(a))
    from flax.traverse_util import flatten_dict
    layout = api.write_flat(flatten_dict(params, sep='/'), model, dst, layout=a.layout, force=a.force)
    how = 'detected' if ck.detected else 'given'
    print(f'{a.src} ({ck.format}, {ck.layout}) -> {dst} ({layout}); model {ck.model_name} ({how}); '
          f'{time.perf_counter() - t0:.1f}s')


def cmd_inspect(a):
    import numpy as np
    from . import api
    ck = api.read_checkpoint(a.ckpt, a.model)
    total = sum(int(np.prod(v.shape)) for v in ck.raw.values())
    nbytes = sum(v.nbytes for v in ck.raw.values())
    dtypes = sorted({str(v.dtype) for v in ck.raw.values()})
    diff = _config_diff(ck)
    if a.json:
        print(json.dumps(dict(path=ck.path, format=ck.format, layout=ck.layout, model=ck.model_name,
                              detected=ck.detected, overrides=diff, keys=len(ck.raw), params=total, bytes=nbytes,
                              dtypes=dtypes, tensors={k: [list(v.shape), str(v.dtype)] for k, v in ck.raw.items()}
                              if a.keys else None), default=str))
        return
    print(f'file:    {ck.path}')
    print(f'format:  {ck.format}   layout: {ck.layout}')
    print(f"model:   {ck.model_name} ({'detected' if ck.detected else 'given'})"
          + (f"  with {', '.join(f'{k}={v}' for k, v in diff.items())}" if diff else ''))
    print(f'keys:    {len(ck.raw)}   params: {total:,}   bytes: {nbytes:,}   dtypes: {", ".join(dtypes)}')
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
    return getattr(model, 'mlp_dim', None) == int(model.embed_dim * model.mlp_ratio)


def cmd_parity(a):
    from . import api, parity
    model, params, ck = api.load_model(a.ckpt, a.model)
    rows = parity.compare(model, params, ck.model_name, batch=a.batch)
    print(f'parity: {ck.model_name} from {a.ckpt} ({ck.format}, {ck.layout}), batch {a.batch}, float32')
    print(parity.format_table(rows, a.tol))
    return 0 if all(r.rel <= a.tol for r in rows) else 1


def build_parser():
    p = argparse.ArgumentParser(prog='vit-flax', description='ViT/DeiT/Swin in Flax: summaries and checkpoint '
                                'conversion between Google .npz, PyTorch (.pth/.pt/.bin, .safetensors) and orbax.')
    sub = p.add_subparsers(dest='cmd', required=True)

    s = sub.add_parser('summary', help='parameter count and GMACs of a registered model')
    s.add_argument('model')
    s.add_argument('--json', action='store_true', help='print one JSON object (keys include params, gmacs)')
    s.add_argument('--num-classes', type=_at_least(0, '--num-classes'))
    s.add_argument('--img-size', type=_img_size)
    s.set_defaults(fn=cmd_summary)

    s = sub.add_parser('list', help='registered model names')
    s.add_argument('pattern', nargs='?', default='*')
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser('convert', help='convert a checkpoint; formats follow the extensions',
                       description='Formats by extension: .npz (Google), .pth/.pt/.bin (PyTorch state_dict), '
                       '.safetensors, a directory (orbax). Head and position-embedding changes are reported.')
    s.add_argument('src')
    s.add_argument('dst')
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
    s.add_argument('--window-size', type=_at_least(1, '--window-size'), help='Swin: new attention window; bias tables are resized')
    s.add_argument('--bias-resize', choices=('bicubic', 'timm'), default='bicubic',
                   help='Swin bias-table resizing (default: bicubic, as Microsoft\'s fine-tuning code; '
                   'timm: timm\'s resize_rel_pos_bias_table)')
    s.add_argument('--layout', help='output layout: npz released (default), linen, big_vision; '
                   'torch timm (default) or microsoft (Swin)')
    s.add_argument('--scan-blocks', action=argparse.BooleanOptionalAction, default=None,
                   help='ViT: stack the blocks as nn.scan does (Transformer/encoderblock/... with a leading depth '
                   'axis) in npz linen/big_vision and orbax output; --no-scan-blocks unrolls them '
                   '(default: as the source; released npz and torch files are always unrolled)')
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser('inspect', help='format, layout, detected model, keys, shapes, dtypes, totals')
    s.add_argument('ckpt')
    s.add_argument('--model')
    s.add_argument('--keys', action='store_true', help='list every key with shape and dtype')
    s.add_argument('--json', action='store_true')
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser('parity', help='run timm and Flax on the same input; per-block differences')
    s.add_argument('ckpt')
    s.add_argument('--model')
    s.add_argument('--tol', type=float, default=1e-4, help='relative tolerance (default 1e-4)')
    s.add_argument('--batch', type=int, default=2)
    s.set_defaults(fn=cmd_parity)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args) or 0
    except ConversionError as e:
        print(f'vit-flax: error: {e}', file=sys.stderr)
        return 1
    except (KeyError, TypeError, ValueError) as e:  # bad model names / options from the registry
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f'vit-flax: error: {msg}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
