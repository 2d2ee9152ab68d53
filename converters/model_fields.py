"""Model fields a weights file holds no array for, recorded beside the arrays where the format has room.

A file's arrays give a model's sizes, never its norm eps, its activation (exact, tanh or quick GELU), its
pooling among those with the same parameters, a torch fused qkv's head count, and so on: each family lists
these fields (`Family.recorded_fields`; the list per family is in docs/FORMATS.md). Without them a reader
takes the registered model's values, and a transformers ViT (eps 1e-12) or an OpenAI CLIP (QuickGELU) read
back from its own conversion computes something else (1e-4 to 5e-3 relative).

Where a format has room that its own readers ignore, the file records them as one JSON object,
`{"module": "VisionTransformer", "fields": {"norm_eps": 1e-12, "act_layer": "quick_gelu", ...}}`:

- `.npz`: the zip archive's comment, `vit_flax.model=` then the JSON (np.load, vit_jax's and big_vision's
  loaders and timm's `_load_weights` never read a zip comment);
- `.safetensors`: the header's `__metadata__`, key `vit_flax.model` (a string, as the format requires;
  safetensors' `load_file`, timm and transformers read the tensors only).

The reader (converters.sources.File) sets them on the model the arrays give and says what they changed; a field
the caller passes (`--set`, `arch`) wins. A corrupt or unknown entry is a one-line error naming the file and
the key. Where a format has no room (a torch `.pth` state_dict, a bare orbax tree), `pipeline.write_flat` reads
the file back and says on stderr each field a reader will take otherwise, with both values and the `--set` to
pass.
"""
import json
import struct
import zipfile
from typing import Dict, Optional

from vit_flax.registry import UnknownOptionError, check_options

from .errors import ConversionError

KEY = 'vit_flax.model'                         # the safetensors __metadata__ key
ZIP_PREFIX = (KEY + '=').encode()              # the .npz zip comment's start
ZIP_COMMENT_MAX = 65535                        # what a zip comment can hold


def _plain(v):
    return [_plain(x) for x in v] if isinstance(v, (tuple, list)) else v


def _typed(v):
    """JSON's lists back as the tuples model fields hold."""
    return tuple(_typed(x) for x in v) if isinstance(v, list) else v


def record(model) -> Dict[str, object]:
    """{field: value} of `model`'s family's `recorded_fields` (JSON types)."""
    from .families import family_of
    return {k: _plain(getattr(model, k)) for k in family_of(model).recorded_fields}


def text(model) -> Optional[str]:
    """The JSON a file records for `model`, or None when its family records nothing."""
    fields = record(model)
    if not fields:
        return None
    return json.dumps({'module': type(model).__name__, 'fields': fields}, separators=(',', ':'), sort_keys=True)


def zip_comment(model) -> bytes:
    """The `.npz` zip comment for `model` (b'' when its family records nothing)."""
    t = text(model)
    if t is None:
        return b''
    out = ZIP_PREFIX + t.encode()
    if len(out) > ZIP_COMMENT_MAX:   # never with the families' short lists
        raise ConversionError(f'{type(model).__name__}: its model fields do not fit a zip comment')
    return out


def safetensors_metadata(model) -> Dict[str, str]:
    t = text(model)
    return {} if t is None else {KEY: t}


# ---------------------------------------------------------------- reading

def _read_text(path: str, fmt: str):
    """(the recorded JSON text or None, where it was found) of a file already read by its format's reader."""
    if fmt == 'npz':
        with zipfile.ZipFile(path) as z:
            comment = z.comment
        if not comment.startswith(ZIP_PREFIX):
            return None, None
        try:
            return comment[len(ZIP_PREFIX):].decode('utf-8'), 'zip comment'
        except UnicodeDecodeError:
            raise ConversionError(f'{path}: zip comment {KEY}: not UTF-8 text') from None
    if fmt == 'safetensors':
        with open(path, 'rb') as f:
            (n,) = struct.unpack('<Q', f.read(8))
            meta = json.loads(f.read(n).decode('utf-8')).get('__metadata__') or {}
        return meta.get(KEY), '__metadata__'
    return None, None


def read(path: str, fmt: str, family) -> Dict[str, object]:
    """The fields `path` records for a model of `family` ({} when it records none), each checked: a one-line
    error naming the file and key for text that is not our JSON, another family's module, a field the family
    does not record, or a value the field does not take."""
    t, where = _read_text(path, fmt)
    if t is None:
        return {}
    at = f'{path}: {where} {KEY}'
    try:
        obj = json.loads(t)
    except (ValueError, RecursionError) as e:
        raise ConversionError(f'{at}: not valid JSON ({str(e).splitlines()[0]})') from None
    if not isinstance(obj, dict) or not isinstance(obj.get('fields'), dict) or set(obj) != {'module', 'fields'}:
        raise ConversionError(f'{at}: not an object of "module" and "fields"')
    if obj['module'] != family.module_cls.__name__:
        raise ConversionError(f'{at}: module {obj["module"]!r}, but the arrays are a {family.module_cls.__name__}')
    fields = {k: _typed(v) for k, v in obj['fields'].items()}
    for k, v in fields.items():
        if k not in family.recorded_fields:
            raise ConversionError(f'{at}: field {k!r} is not one a {family.name} file records '
                                  f'({", ".join(family.recorded_fields)})')
        try:
            check_options(family.module_cls, {k: v})
        except (UnknownOptionError, ValueError, TypeError) as e:
            raise ConversionError(f'{at}: field {k!r}: {str(e).split(": ", 1)[-1]}') from None
    return fields


def differs(a, b) -> bool:
    """Whether two values of a field differ as written (None against False counts: see `computes_otherwise`)."""
    return _plain(a) != _plain(b)


# a field whose spellings compute alike (class_token None or False without a token pooling, act_layer None with
# gelu 'exact' or act_layer 'gelu', 224 or (224, 224)) is compared through what the module derives from it
_DERIVED = {'class_token': 'has_class_token', 'fc_norm': 'use_fc_norm', 'global_pool': 'pool_type',
            'act_layer': 'activation', 'gelu': 'activation'}


def _effective(model, k):
    v = getattr(model, _DERIVED[k]) if k in _DERIVED and hasattr(model, _DERIVED[k]) else getattr(model, k)
    if k in ('img_size', 'window_size', 'ref_feat_shape') and isinstance(v, int):
        v = (v, v)
    if k in ('act_layer', 'gelu') and hasattr(model, 'activation'):
        v = {'gelu': 'exact', 'gelu_tanh': 'tanh'}.get(v, v)
    return _plain(v)


def computes_otherwise(a, b, k) -> bool:
    """Whether models `a` and `b` (of one family) differ in field `k`, written and as they compute."""
    return differs(getattr(a, k), getattr(b, k)) and _effective(a, k) != _effective(b, k)


def set_flags(fields: Dict[str, object]) -> str:
    """`--set k=v ...` for the CLI (values as the Python literals --set takes)."""
    def literal(v):
        return v if isinstance(v, str) else repr(_typed(v)).replace(' ', '')
    return ' '.join(f'--set {k}={literal(v)}' for k, v in fields.items())
