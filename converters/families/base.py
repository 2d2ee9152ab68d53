"""`Family`: everything the converters know about one model family, as one class with named methods.

A family module (`vit.py`, `swin.py`, `vit_pytorch.py`) defines one subclass and registers an instance in
`families/__init__.py`. The pipeline asks a family, never branches on its name:

- detection: `detect_torch(state)`, `detect_flax(flat)`, `detect_layout(state)` (which named torch layout);
- architecture read off a checkpoint: `config_from_flax(flat)`, `config_from_torch(state)` (dicts of model
  fields; the torch side may leave some None), `resolve(...)` (what keys cannot say), `core(model)` (fields
  that must equal the checkpoint's), `overrides(cfg, model)` (the rest), `preference(...)` (which registered
  name to take);
- weights: `rules(model)` (the rule table, run both ways by `converters.rules`), `layouts` (other torch
  layouts: name -> (to the table's layout, from it)), `store`/`unstore` (arrays a file holds that the model
  computes), `from_npz`/`to_npz` (a family's own `.npz` layouts), `transformers_classes` and
  `transformers_table(...)` (the `transformers` layout: a key table per class), `adapt(...)` (surgery towards
  another model of the family: positions, windows), `head_features(model)`, `fine_tune_target(...)` (what a
  fine-tuning target implies);
- torch and timm: `timm_kwargs(model)`, `torch_model(model, name)`, `parity_points(model)`,
  `timm_folder_config(...)`; and `describe(ck)` for `vit-flax inspect`.

Defaults below are what a family without the feature does; a subclass overrides only what differs.
"""
import functools
import json
from typing import Callable, Dict, List, Optional, Tuple

from vit_flax.summary import input_notes

from ..errors import ConversionError
from ..resample import resample_pos_embed

Log = Callable[[str], None]


@functools.total_ordering
class Deferred:
    """An element of a sort key computed on its first comparison. Tuples compare element by element and stop
    at the first that differs, so in `min(names, key=...)` over the ~200 registered models a costly tie-breaker
    (building the model a checkpoint needs: ~2 ms a name) is computed only for the names tied on the cheap
    elements before it. The order is exactly that of the computed values."""
    __slots__ = ('_fn', '_value')
    _UNSET = object()

    def __init__(self, fn: Callable[[], object]):
        self._fn, self._value = fn, Deferred._UNSET

    @property
    def value(self):
        if self._value is Deferred._UNSET:
            self._value = self._fn()
        return self._value

    @staticmethod
    def _of(other):
        return other.value if isinstance(other, Deferred) else other

    def __eq__(self, other):
        return self.value == Deferred._of(other)

    def __lt__(self, other):
        return self.value < Deferred._of(other)

    __hash__ = None

    def __repr__(self):
        return f'Deferred({self.value!r})'


def _plain(v):
    """A timm argument in a comparable form: lists for tuples, (function, keywords) for a functools.partial."""
    import functools
    if isinstance(v, functools.partial):
        return [v.func, list(map(_plain, v.args)), {k: _plain(x) for k, x in v.keywords.items()}]
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def holds_field(model, k: str, v) -> bool:
    """Whether `model` has field `k` = `v` as it computes (an MLP width, sizes as pairs, a class token, a pooling,
    LayerScale's presence: its initial value only seeds training); `act_layer` and `gelu` are compared as one, by
    `field_overrides`."""
    from vit_flax.models.layers import to_tuple
    if k == 'mlp_dim':
        return model.mlp_hidden == v
    if k in ('patch_size', 'img_size', 'window_size'):
        return tuple(to_tuple(getattr(model, k), 2)) == tuple(to_tuple(v, 2))
    if k == 'class_token' and hasattr(model, 'has_class_token'):
        return model.has_class_token == v
    if k in ('act_layer', 'gelu') and hasattr(model, 'activation'):
        return True
    if k == 'global_pool' and hasattr(model, 'pool_type'):
        return model.pool_type == {'gap': 'avg'}.get(v, v) and model.use_fc_norm == (v == 'avg')
    if k == 'init_values':
        return bool(model.init_values) == bool(v)
    if k in ('depths', 'num_heads') and isinstance(v, tuple):
        return tuple(getattr(model, k)) == v
    return getattr(model, k) == v


def timm_class(module: str, name: str, **kwargs):
    """timm's (or torch's) `module.name`, as a functools.partial with `kwargs`; a named stand-in (`TimmRef`)
    where timm is absent (it compares by name and arguments, as a timm folder's config needs)."""
    import importlib
    try:
        cls = getattr(importlib.import_module(module), name)
    except ImportError:
        from .vit import TimmRef
        return TimmRef(name, tuple(sorted(kwargs.items())))
    return functools.partial(cls, **kwargs) if kwargs else cls


def square_img_size(cfg: dict, model):
    """The img_size that gives `model` (one with `num_patches`) the checkpoint's `cfg['num_patches']` tokens
    (None: its own does, or the file records none): the caller's `img_size_hint` when it fits, else a square grid
    of `model.patch_size` patches. ValueError for a count that is no square."""
    from vit_flax.models.layers import to_tuple
    n, hint = cfg.get('num_patches'), cfg.get('img_size_hint')
    if n is None or n == model.num_patches:
        return None
    if hint is not None and model.clone(img_size=hint).num_patches == n:
        return hint
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f'{n} tokens are not a square grid; pass img_size (HxW)')
    patch = to_tuple(model.patch_size, 2)
    return side * patch[0] if patch[0] == patch[1] else (side * patch[0], side * patch[1])


def field_overrides(model, fields: dict) -> dict:
    """The overrides that make `model` the one `fields` (model fields, as a transformers config.json gives them:
    `act_layer` None with `gelu` for a GELU) describes; {} when it is already."""
    kw = {k: v for k, v in fields.items() if k not in ('gelu', 'act_layer') and not holds_field(model, k, v)}
    if 'global_pool' in kw:
        kw['fc_norm'] = None
    if 'init_values' in kw and not fields['init_values']:
        kw['init_values'] = None
    if hasattr(model, 'activation') and ('act_layer' in fields or 'gelu' in fields) \
            and model.activation != (fields.get('act_layer') or fields.get('gelu')):
        if model.act_layer != fields.get('act_layer'):
            kw['act_layer'] = fields.get('act_layer')
        if model.gelu != fields.get('gelu', model.gelu):
            kw['gelu'] = fields['gelu']
    elif not hasattr(model, 'activation') and 'gelu' in fields and model.gelu != fields['gelu']:
        kw['gelu'] = fields['gelu']
    if 'mlp_dim' in kw and hasattr(model, 'mlp_ratio') and not hasattr(model, 'mlp_hidden'):
        kw.pop('mlp_dim')
    return kw


class Family:
    name: str = ''
    module_cls: type = None
    # the torch layout the rule table speaks; other named layouts convert to and from it
    torch_layout: str = 'timm'
    layouts: Dict[str, Tuple[Callable, Callable]] = {}
    # core fields a file may differ in from a named target, the weights adapted by `adapt` (ViT: patch_size)
    adaptable: Tuple[str, ...] = ()
    # the layouts whose writer (the second function) takes the model as well as the state_dict
    layout_models: Tuple[str, ...] = ()
    # what a named layout implies about the computation: {layout: (config fields, why)}, said out loud on read
    layout_config: Dict[str, Tuple[dict, str]] = {}
    # layouts whose files wrap the state_dict: {layout: key} (torch.save({key: state}))
    torch_wrap: Dict[str, str] = {}
    # torch-side keys that are buffers derived from the config (suffixes): ignored when reading
    ignore_torch: Tuple[str, ...] = ()
    # the flat Flax key of the learned position table (resampled on a size change), if any
    pos_key: Optional[str] = None
    # the `.npz` layouts this family writes (the first is the default)
    npz_layouts: Tuple[str, ...] = ('flax',)
    # timm has this family (its models build with `timm_kwargs`; timm folders can describe them)
    in_timm: bool = True
    timm_classifier: str = 'head'      # pretrained_cfg['classifier'] in a timm folder
    timm_default_pool: str = 'token'   # config.json's global_pool when timm_kwargs names none
    # releases that fix the width of every attention head, which their files cannot record (a fused qkv):
    # {layout: width}; see `heads_by_convention`
    head_width: Dict[str, int] = {}
    # the `transformers` layout: the Hugging Face transformers classes holding this family's models,
    # {class: (kind, the prefix of its backbone's keys)}, each read and written by `transformers_table`
    transformers_classes: Dict[str, Tuple[str, str]] = {}
    # model fields that change the outputs and that some file of the family holds no array for (a norm eps, an
    # activation, a fused qkv's head count, a pooling with the same parameters, an input size): recorded in
    # the files that have room (.npz zip comment, .safetensors __metadata__; converters/model_fields.py)
    recorded_fields: Tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f'<{self.name} family>'

    # ------------------------------------------------------------ detection

    def detect_torch(self, state) -> bool:
        """A timm-layout (the table's layout) state_dict of this family."""
        return False

    def detect_flax(self, flat) -> bool:
        """A flat Flax tree of this family."""
        return False

    def can_read(self, state) -> bool:
        """Whether this family's table can read a state_dict whose keys another family claims as well (asked
        when the caller names a model of this family): by default, only its own detection."""
        return self.detect_torch(state)

    def detect_layout(self, state) -> str:
        """Which named torch layout a state_dict of this family is in."""
        return self.torch_layout

    # ------------------------------------------------------------ architecture

    def config_from_flax(self, flat) -> dict:
        raise NotImplementedError

    def config_from_torch(self, state) -> dict:
        raise NotImplementedError

    def resolve(self, cfg: dict, arch: Optional[dict], layout: str, model_name, path: str):
        """(cfg, arch, notes): what the keys cannot say, from the caller's overrides `arch` or said out loud."""
        return cfg, arch, []

    def core(self, model) -> dict:
        """The fields a registered model must share with a checkpoint to be its architecture."""
        raise NotImplementedError

    def registered_match(self, cfg: dict) -> bool:
        """Whether a registered model of this family has every core field that `cfg` records."""
        import vit_flax
        from vit_flax.registry import list_models, model_config
        return any(all(cfg.get(k) is None or cfg[k] == v for k, v in self.core(vit_flax.create_model(n)).items())
                   for n in list_models() if model_config(n)[0] is self.module_cls)

    def heads_by_convention(self, cfg: dict, arch: dict, layout: str, model_name, path: str) -> Optional[str]:
        """A file of a release that fixes its heads' width (`head_width[layout]`: DINOv2, open_clip) records
        every size but the head count. Without --model: `--set num_heads=N` gives it; else, when no registered
        model has the file's sizes, num_heads = embed_dim / width, and the note returned says so (else None).
        `cfg` is changed in place."""
        width = self.head_width.get(layout)
        if width is None or model_name is not None or cfg.get('num_heads') is not None:
            return None
        if (arch or {}).get('num_heads') is not None:
            cfg['num_heads'] = arch['num_heads']
            return None
        dim = cfg.get('embed_dim')
        if not dim or dim % width or self.registered_match(cfg):
            return None
        cfg['num_heads'] = dim // width
        return (f'{path}: the {layout} layout does not record its head count, and no registered model has its '
                f'sizes: {dim // width} heads of {width} (embed_dim={dim}; the release\'s convention; '
                f'--set num_heads=N to change it)')

    def overrides(self, cfg: dict, model) -> dict:
        """Overrides that make `model` (holding the checkpoint's core fields) hold exactly the checkpoint."""
        raise NotImplementedError

    def with_core(self, model, cfg: dict):
        """`model` re-shaped to the checkpoint's core fields (a no-op for a registered match)."""
        core = self.core(model)
        return model.clone(**{k: cfg[k] for k in core if cfg.get(k) is not None and cfg[k] != core[k]})

    def preference(self, cfg: dict, name: str, model) -> tuple:
        """Sort key of registered `name` (its `model`) for a checkpoint `cfg`: most core fields shared, then
        fewest overrides (`Deferred`: computed only for the names tied on what comes before it), then the name."""
        shared = sum(cfg.get(k) is None or cfg[k] == v for k, v in self.core(model).items())

        def changed():
            try:
                over = self.overrides(cfg, self.with_core(model, cfg))
                return sum(getattr(model, k) != v for k, v in over.items())
            except ValueError:
                return len(cfg)
        return -shared, Deferred(changed), name

    def check_target(self, src, target, path: str, model_name: str, overrides: dict) -> None:
        """Refuse (one line) a `load_params` target that would silently lose part of the checkpoint `src`."""
        if 'num_classes' not in overrides and src.num_classes != target.num_classes:
            raise ConversionError(f'{path}: checkpoint head has {src.num_classes} classes, {model_name} has '
                                  f'{target.num_classes}; pass num_classes={src.num_classes} to keep it or '
                                  f'num_classes=N to replace it')

    # ------------------------------------------------------------ weights

    def rules(self, model) -> list:
        """The rule table for this model instance (its config decides which rows exist)."""
        raise NotImplementedError

    def transformers_table(self, model, cls: str, spelling: str, prefix: str) -> list:
        """The `transformers` layout of `model` as class `cls` (one of `transformers_classes`): timm's keys (the
        rules' flax side) <-> transformers' (the torch side) in `spelling` ('hub': what `save_pretrained` writes
        and the Hub holds; 'internal': transformers 5's own names), the backbone's keys under `prefix`. Run
        both ways by `converters.rules`, in front of the rule table (converters/hf_transformers.py)."""
        raise ConversionError(f'transformers has no {self.name} class {cls!r}')

    def store(self, flat, model, log: Log = lambda s: None):
        """The tree as files holding arrays the model computes store it (the rules' form)."""
        return flat

    def unstore(self, flat, model):
        """The inverse of `store`: the model's own tree again."""
        return flat

    def from_npz(self, arrays, path: str):
        """(flat, layout, scanned) for a `.npz` in one of this family's own layouts, else None (then the file
        is read as a plain Flax tree)."""
        return None

    def npz_layouts_for(self, model) -> Tuple[str, ...]:
        """The `.npz` layouts `model` can be written in (the first is the default)."""
        return self.npz_layouts

    def to_npz(self, flat, model, layout: str, log: Log):
        """The arrays a `.npz` of `layout` (one of `npz_layouts`) holds."""
        return dict(flat)

    def num_features(self, model) -> int:
        """Width of the pooled features."""
        return int(model.num_features)

    def head_features(self, model) -> int:
        """Input width of the classifier head."""
        return self.num_features(model)

    def fine_tune_target(self, src, target, overrides: dict, log: Log):
        """The target model, completed with what fine-tuning from `src` implies and the caller did not set (Swin V2:
        the pretrained windows when the window changes), each change said through `log`. By default: unchanged."""
        return target

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str, log: Log):
        """Surgery from a checkpoint of model `src` to model `dst` of this family, every change said through
        `log` (the head is the pipeline's): by default, the position table made to fit the new grid."""
        for note in input_notes(dst):   # what summary says too: unseen or zero-padded rows/columns
            log(note)
        return self.adapt_positions(flat, src, dst, resample, log)

    def adapt_positions(self, flat, src, dst, resample: str, log: Log):
        """A learned position table resampled to `dst`'s grid, prefix tokens kept aside."""
        grid = tuple(getattr(dst, 'grid_size', ()))
        if self.pos_key in flat and tuple(src.grid_size) != grid:
            flat[self.pos_key] = resample_pos_embed(flat[self.pos_key], grid, dst.num_prefix_tokens, src.grid_size,
                                                    resample)
            log(f'pos_embedding: grid {tuple(src.grid_size)} -> {grid} ({resample}), '
                f'{dst.num_prefix_tokens} prefix token(s) kept aside')
        return flat

    def layout_note(self, model, layout: str) -> Optional[str]:
        """A warning when the code that reads `layout` computes differently from `model`."""
        return None

    # ------------------------------------------------------------ torch, timm, inspection

    def timm_kwargs(self, model) -> dict:
        """Arguments that make `timm.create_model(name, **kw)` build the same architecture as `model`."""
        raise ConversionError(f'timm has no {self.name} models')

    def torch_model(self, model, model_name: str):
        """The torch module `parity` compares with (timm's, built by `timm_kwargs`), randomly initialised."""
        from ..optional import require
        timm = require('timm', 'vit-flax parity')
        return timm.create_model(model_name, pretrained=False, **self.timm_kwargs(model))

    def parity_points(self, model) -> List[Tuple[str, str, str]]:
        """(label, flax intermediate, torch module) pairs compared by `vit-flax parity`, in forward order."""
        return []

    def describe(self, ck) -> str:
        """One line naming a checkpoint's family and layout, for `vit-flax inspect`."""
        return f'{self.name.capitalize()} ({ck.layout})'

    def timm_folder_config(self, model, model_name: str, pretrained_cfg: dict, class_names=None) -> dict:
        """config.json for `model` as timm's save_for_hf writes it: model_args hold what differs from the
        registered architecture (and num_classes), so `local-dir:` rebuilds exactly this model."""
        import vit_flax
        if not self.in_timm:
            raise ConversionError(f'timm has no {self.name} models: a timm model folder cannot describe '
                                  f'{model_name}; write a .pth or .safetensors instead')
        try:
            kw, base = self.timm_kwargs(model), self.timm_kwargs(vit_flax.create_model(model_name))
        except ValueError as e:
            raise ConversionError(f'timm cannot build this {model_name}: {e}') from None
        if set(base) - set(kw):
            raise ConversionError(f'{model_name} builds {", ".join(sorted(set(base) - set(kw)))} this model has '
                                  f'not; pass --model with the registered name of this architecture')
        model_args = {}
        for k, v in kw.items():
            if k == 'embed_layer' and k in base:
                continue   # a hybrid's backbone: the registered name builds it
            if k == 'num_classes' or k not in base or _plain(v) != _plain(base[k]):
                try:
                    json.dumps(v)
                except TypeError:
                    raise ConversionError(f'{model_name}: timm argument {k} cannot be written to config.json') \
                        from None
                model_args[k] = _plain(v)
        h, w = (int(x) for x in model.input_shape[:2])
        pcfg = dict(input_size=[3, h, w], interpolation=pretrained_cfg['interpolation'],
                    crop_pct=pretrained_cfg['crop_pct'], crop_mode=pretrained_cfg['crop_mode'],
                    mean=list(pretrained_cfg['mean']), std=list(pretrained_cfg['std']),
                    num_classes=model.num_classes, fixed_input_size=True, first_conv='patch_embed.proj',
                    classifier=self.timm_classifier)
        cfg = dict(architecture=model_name, num_classes=model.num_classes, num_features=self.num_features(model),
                   global_pool=kw.get('global_pool', self.timm_default_pool))
        if class_names:
            names = list(class_names)[:model.num_classes]
            cfg['label_names'] = names + [str(i) for i in range(len(names), model.num_classes)]
        cfg.update(model_args=model_args, pretrained_cfg=pcfg)
        return cfg

