"""timm model folders (`config.json` + `model.safetensors`) and the Hugging Face hub cache, read and written.

The layout is what `timm.models.save_for_hf` writes and `timm.create_model('local-dir:DIR', pretrained=True)`
reads; a hub snapshot (`$HF_HOME/hub/models--timm--NAME/snapshots/<commit>/`) is the same folder. ::

    config.json   {"architecture": "vit_base_patch16_224[.tag]", "num_classes": 1000, "num_features": 768,
                   "global_pool": "token", "label_names": [...], "model_args": {timm kwargs: img_size, depth...},
                   "pretrained_cfg": {"input_size": [3, 224, 224], "interpolation", "crop_pct", "crop_mode",
                                      "mean", "std", "num_classes", ...}}
    model.safetensors (or pytorch_model.bin: a torch state_dict, read without running pickle code)

`hf-hub:ORG/NAME[@REVISION]` resolves through huggingface_hub (hf_hub.py): downloaded when online, read from
its cache offline (`HF_HUB_OFFLINE=1`).
"""
import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from ..errors import ConversionError, first_line

CONFIG = 'config.json'
# timm's preferred weight files (timm.models._hub._PREFERRED_FILES), those holding a plain state_dict
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'pytorch_model.pth', 'model.pth')
HF_HUB = 'hf-hub:'
MAX_CONFIG_BYTES = 16 << 20
# timm kwargs whose values are spelled differently in vit-flax: timm key -> (our field, {timm value: ours})
# model_args whose values vit-flax spells otherwise, for models without timm's own field of that name
# (the ViT has timm's `act_layer` and `global_pool` values; Swin spells its activation `gelu`).
_TIMM_VALUES = {'act_layer': ('gelu', {'gelu': 'exact', 'gelu_tanh': 'tanh'})}


@dataclass
class FolderConfig:
    folder: str
    config_path: str
    weights: str                       # the weight file read
    model_name: str                    # registered name, pretrained tag stripped
    tag: str
    arch: dict                         # vit-flax fields from model_args (img_size, depth, ...)
    num_classes: Optional[int]
    pretrained_cfg: dict
    label_names: Optional[List[str]]
    notes: List[str] = field(default_factory=list)


def has_config_json(path: str) -> bool:
    """A folder holding config.json: read as a model folder (timm's, transformers', a Flax msgpack's)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def load_json(path: str):
    try:
        size = os.path.getsize(path)
        if size > MAX_CONFIG_BYTES:
            raise ConversionError(f'{path}: {size:,} bytes, too large for a config file')
        with open(path, 'rb') as f:
            return json.loads(f.read().decode('utf-8'))
    except FileNotFoundError:
        raise ConversionError(f'{path}: no such file') from None
    except OSError as e:
        raise ConversionError(f'{path}: cannot read ({first_line(e)})') from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConversionError(f'{path}: not valid JSON ({first_line(e)})') from None


def label_list(names, num_classes: Optional[int], where: str) -> Optional[List[str]]:
    """timm's label_names (a list, or {index: name} where there are gaps) as a list of num_classes names."""
    if names is None:
        return None
    if isinstance(names, dict):
        try:
            pairs = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError):
            raise ConversionError(f'{where}: label_names keys must be class indices') from None
        n = max(num_classes or 0, max(pairs, default=-1) + 1)
        return [pairs.get(i, str(i)) for i in range(n)]
    if isinstance(names, list) and all(isinstance(n, (str, int, float)) and not isinstance(n, bool) for n in names):
        return [str(n) for n in names]
    raise ConversionError(f'{where}: label_names must be a list of names or an {{index: name}} object')


def read_class_indices(path: str) -> List[str]:
    """WZMIAOMIAO's class_indices.json ({"0": "daisy", ...}) as a list of names."""
    names = label_list(load_json(path), None, path)
    if not names:
        raise ConversionError(f'{path}: holds no class names')
    return names


def _model_fields(model_name: str, model_args, where: str):
    """vit-flax fields from timm's model_args; what vit-flax has no field for is ignored (and said)."""
    from vit_flax.registry import model_config
    cls = model_config(model_name)[0]
    fields = set(cls.__dataclass_fields__) - {'parent', 'name', 'dtype'}
    arch, ignored = {}, []
    if not isinstance(model_args, dict):
        raise ConversionError(f'{where}: model_args is a {type(model_args).__name__}, not an object')
    for k, v in model_args.items():
        if k in _TIMM_VALUES and k not in fields:
            ours, values = _TIMM_VALUES[k]
            if not isinstance(v, str) or v not in values:
                raise ConversionError(f'{where}: model_args {k}={v!r} is not one vit-flax builds '
                                      f'({", ".join(map(repr, values))})')
            k, v = ours, values[v]
        elif k == 'embed_norm_layer':
            k, v = 'embed_norm', bool(v)
        if k not in fields:
            ignored.append(k)
            continue
        arch[k] = _checked(k, v, cls.__dataclass_fields__[k], where)
    return arch, ignored


def _checked(k, v, fld, where):
    """A model_args value of the kind the field holds: positive sizes, finite rates, flags, names."""
    default = fld.default
    ok = lambda x: type(x) is int and (0 if k == 'num_classes' else 1) <= x <= 1 << 20   # noqa: E731
    if isinstance(v, list) and v and all(ok(x) for x in v) and any(t in str(fld.type) for t in ('Sequence', 'Tuple')):
        return tuple(v)
    if isinstance(default, bool) or (default is None and isinstance(v, bool)):
        good = isinstance(v, bool)
    elif isinstance(default, float):
        good = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1 << 20
    elif isinstance(default, str):
        good = isinstance(v, str)
    else:   # sizes, counts, (h, w) pairs; None where the field allows it
        good = ok(v) or (v is None and default is None)
    if not good:
        raise ConversionError(f'{where}: model_args {k}={v!r} is not a valid value')
    return v


def read_config(folder: str, where: Optional[str] = None) -> FolderConfig:
    """Parse and check a model folder's config.json; find its weight file. `where` names the folder in errors."""
    folder = os.path.abspath(folder)
    path = os.path.join(folder, CONFIG)
    cfg = load_json(path)
    if not isinstance(cfg, dict):
        raise ConversionError(f'{path}: a JSON {type(cfg).__name__}, not an object')
    if 'pretrained_cfg' not in cfg:   # timm's legacy single-dict layout: everything at the top level
        cfg = dict(architecture=cfg.get('architecture'), num_classes=cfg.get('num_classes'),
                   label_names=cfg.get('label_names', cfg.get('labels')), pretrained_cfg=cfg)
    arch_name = cfg.get('architecture')
    if not isinstance(arch_name, str) or not arch_name:
        raise ConversionError(f'{path}: no "architecture" (the timm model name)')
    from vit_flax.registry import list_models, split_tag
    name, tag = split_tag(arch_name)
    if name not in list_models():
        raise ConversionError(f'{path}: architecture {arch_name!r} is not a model vit-flax builds '
                              f'(see `vit-flax list`)')
    pcfg = cfg.get('pretrained_cfg')
    if not isinstance(pcfg, dict):
        raise ConversionError(f'{path}: pretrained_cfg is a {type(pcfg).__name__}, not an object')
    num_classes = cfg.get('num_classes', pcfg.get('num_classes'))
    if num_classes is not None and (type(num_classes) is not int or num_classes < 0):
        raise ConversionError(f'{path}: num_classes {num_classes!r} is not a non-negative integer')
    arch, ignored = _model_fields(name, cfg.get('model_args') or {}, path)
    notes = [f'{path}: model_args {", ".join(ignored)} ignored (no such vit-flax field)'] if ignored else []
    labels = label_list(cfg.get('label_names', pcfg.get('label_names')), num_classes, path)
    weights = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if weights is None:
        raise ConversionError(f'{where or folder}: no weights in the model folder (looked for {", ".join(WEIGHT_FILES)})')
    return FolderConfig(folder, path, weights, name, tag, arch, num_classes, pcfg, labels, notes)


# ---------------------------------------------------------------- the Hugging Face Hub

def hf_cache_dir() -> str:
    """Where huggingface_hub keeps its cache (see hf_hub.cache_dir)."""
    from . import hf_hub
    return hf_hub.cache_dir()


def resolve_hf_hub(spec: str) -> str:
    """`hf-hub:ORG/NAME[@REV]` -> its local snapshot folder, through huggingface_hub (hf_hub.py: downloaded when
    online, the cache offline); a snapshot without config.json (an open_clip repo) -> its weight file."""
    from . import hf_hub
    snap = hf_hub.resolve(spec)
    if os.path.isfile(os.path.join(snap, CONFIG)):
        return snap
    weights = [f for f in hf_hub.wanted(hf_hub.listing(snap)) if f in hf_hub.OPEN_CLIP_WEIGHTS]
    if not weights:
        raise ConversionError(f'{spec}: the snapshot {snap} has no config.json')
    return os.path.join(snap, weights[0])


def resolve(path: str) -> Optional[str]:
    """The model folder `path` names (itself, or an hf-hub snapshot; for an hf-hub repo without config.json, its
    weight file), or None when it names none."""
    if str(path).startswith(HF_HUB):
        return resolve_hf_hub(str(path))
    return os.path.abspath(path) if has_config_json(str(path)) else None


# ---------------------------------------------------------------- writing

def write(state: Dict, config: dict, path: str, force: bool = False, class_names=None) -> None:
    """Write `config.json` + `model.safetensors` (+ class_indices.json) as one folder, atomically."""
    from .durable import atomic_output
    from .safetensors import write_safetensors
    with atomic_output(path, force) as tmp:
        os.mkdir(tmp)
        write_safetensors(state, os.path.join(tmp, WEIGHT_FILES[0]))
        with open(os.path.join(tmp, CONFIG), 'w') as f:
            json.dump(config, f, indent=2)
        if class_names:
            from .training_ckpt import CLASS_INDICES, write_class_indices
            write_class_indices(os.path.join(tmp, CLASS_INDICES), class_names)
