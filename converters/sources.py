"""The read path as a table of sources: each way a checkpoint arrives, tried in one order.

A source answers `matches(path)` (cheap: a name or a file's presence, no weights read) and
`read(path, request) -> Checkpoint`. `read_checkpoint` takes the first source that matches and calls its
`read` once; a source that resolves a name (hf-hub) or finds a weight file in a folder hands that to
another source's `read` directly, never back to `read_checkpoint`. The order (SOURCES):

1. training workdir   `vit_train`'s run folder or one step of it (formats/training_ckpt): params + meta
2. hf-hub name        `hf-hub:ORG/NAME[@REV]` (formats/hf_hub, through timm_folder.resolve_hf_hub): the
                      snapshot, then read by the local source that matches it (a repo without config.json,
                      an open_clip one, is its weight file)
3. Flax msgpack folder  config.json with a `model_type` and `flax_model.msgpack` as its only weights
                      (formats/hf_flax): read as that file
4. transformers folder  config.json with a `model_type` (formats/transformers_folder: the files;
                      hf_transformers: config.json, the family's `transformers` key table, match_model)
5. timm folder        config.json with an `architecture` (formats/timm_folder): its weight file, then
                      config.json's fields checked against the weights
6. file               by format (formats.file_format: npz, torch, safetensors, orbax folder, msgpack): a
                      family's own layouts (Google's .npz) or the Flax tree itself, else a torch state_dict
                      decoded by the family that detects it

What each source gives is the same Checkpoint (checkpoint.py): the flat Flax tree of a registered model.
A new way of arriving is one class here and one line in SOURCES.
"""
import os
from dataclasses import replace
from typing import Tuple

from vit_flax.models.layers import to_tuple
from vit_flax.registry import UnknownModelError, model_config, split_tag

from . import formats, hf_transformers, model_fields, rules
from .checkpoint import Checkpoint, ReadRequest, check_model_options, match_model, read_config
from .errors import ConversionError
from .families import FAMILIES, family_of, flax_family, torch_family
from .formats import hf_flax, timm_folder, training_ckpt, transformers_folder
from .scan import is_scanned, unstack_blocks


class Source:
    """One way a checkpoint arrives (module docstring)."""
    name = 'source'

    def matches(self, path: str) -> bool:
        raise NotImplementedError

    def read(self, path: str, request: ReadRequest) -> Checkpoint:
        raise NotImplementedError


class TrainingWorkdir(Source):
    name = 'training workdir'

    def matches(self, path):
        return training_ckpt.is_training_checkpoint(path)

    def read(self, path, request):
        tck = training_ckpt.select(path, 'best' if request.step is None else request.step, request.log,
                                   ema=request.ema)
        meta = tck.meta
        model = training_ckpt.model_from_meta(meta)
        acc = meta['val_acc']   # None on a step saved inside an epoch
        note = (f'training checkpoint step {tck.step} (epoch {meta["epoch"]}, '
                f'val_acc {"none (saved inside an epoch)" if acc is None else f"{acc:.4f}"}) '
                f'of {meta["model"]}')
        if request.ema:
            acc = meta.get('val_acc_ema')
            note += f': its weight EMA (val_acc_ema {"none" if acc is None else f"{acc:.4f}"})'
        elif training_ckpt.has_ema(tck.path):
            note += ': its raw weights (it also holds a weight EMA: --ema takes that)'
        else:
            note += ': its weights'
        return Checkpoint(tck.path, 'training', 'flax', tck.flat, tck.flat, family_of(model), meta['model'], model,
                          detected=True, notes=[note], kind='training', source=path,
                          pretrained_cfg=meta['pretrained_cfg'], class_names=list(meta['class_names']))


class HubName(Source):
    name = 'hf-hub name'

    def matches(self, path):
        return str(path).startswith(timm_folder.HF_HUB)

    def read(self, path, request):
        local = timm_folder.resolve_hf_hub(path)   # the snapshot folder, or its weight file
        return pick(local, LOCAL_SOURCES).read(local, request)


class FlaxMsgpackFolder(Source):
    name = 'Flax msgpack folder'

    def matches(self, path):
        return timm_folder.has_config_json(path) and hf_flax.folder_msgpack(os.path.abspath(path)) is not None

    def read(self, path, request):
        ck = FILE.read(hf_flax.folder_msgpack(os.path.abspath(path)), request)
        ck.source = request.given
        return ck


class TransformersFolder(Source):
    name = 'transformers folder'

    def matches(self, path):
        return timm_folder.has_config_json(path) and transformers_folder.is_transformers_folder(os.path.abspath(path))

    def read(self, path, request):
        r = hf_transformers.read_folder(os.path.abspath(path), request.model_name, request.arch)
        fam, img_size = r['family'], request.img_size
        if img_size is not None and fam.pos_key is None and to_tuple(img_size, 2) != to_tuple(r['model'].img_size, 2):
            r['model'] = r['model'].clone(img_size=img_size)
        layout = f'transformers {r["cls"]} ({r["spelling"]} keys)'
        return Checkpoint(r['weights'], r['format'], layout, r['raw'], r['flat'], fam, r['name'], r['model'],
                          detected=request.model_name is None, notes=r['notes'], kind='transformers',
                          source=request.given, class_names=r['class_names'])


class TimmFolder(Source):
    name = 'timm folder'

    def matches(self, path):
        return timm_folder.has_config_json(path)

    def read(self, path, request):
        """The weights read as any torch file, the model named by config.json, checked against it."""
        fc = timm_folder.read_config(os.path.abspath(path), request.given)
        model_name, arch_in = request.model_name, request.arch
        detected, arch = model_name is None, arch_in
        if model_name is None or split_tag(model_name)[0] == fc.model_name:
            # what config.json records describes the weights (a window size too); the head and input size are
            # checked against the weights' own below / resolved from the position table
            recorded = {k: v for k, v in fc.arch.items() if k not in ('num_classes', 'img_size')}
            model_name, arch = fc.model_name, {**recorded, **(arch or {})}
        ck = FILE.read(fc.weights, replace(request, model_name=model_name, arch=arch,
                                           img_size=request.img_size or fc.arch.get('img_size')))
        for k, v in fc.arch.items():   # a recorded field the weights contradict (their keys decided otherwise)
            if k not in ('num_classes', 'img_size') and k not in (arch_in or {}) and hasattr(ck.model, k) \
                    and getattr(ck.model, k) != v and not isinstance(v, (list, tuple)):
                raise ConversionError(f'{fc.config_path}: model_args {k}={v!r}, but the weights are for {k}='
                                      f'{getattr(ck.model, k)!r}')
        if fc.num_classes is not None and fc.num_classes != ck.model.num_classes:
            raise ConversionError(f'{fc.config_path}: num_classes {fc.num_classes}, but the weights\' head has '
                                  f'{ck.model.num_classes} classes')
        size = fc.arch.get('img_size')
        if size is not None and to_tuple(size, 2) != to_tuple(ck.model.img_size, 2):
            if ck.family.pos_key in ck.flat:   # a learned position table says which size the weights are for
                raise ConversionError(f'{fc.config_path}: img_size {size}, but the weights\' position table is '
                                      f'for {ck.model.img_size}')
            ck.model = ck.model.clone(img_size=size)   # nothing in the weights depends on it (Swin): as recorded
        if fc.label_names and len(fc.label_names) > ck.model.num_classes:
            raise ConversionError(f'{fc.config_path}: {len(fc.label_names)} label_names, but the weights\' head '
                                  f'has {ck.model.num_classes} classes')
        ck.notes, ck.detected = fc.notes + ck.notes, detected
        ck.kind, ck.source, ck.pretrained_cfg, ck.class_names = ('timm-folder', request.given, fc.pretrained_cfg,
                                                                 fc.label_names)
        return ck


class File(Source):
    """A file (or an orbax folder), by format: each format's decoder gives either a flat Flax tree (with its
    layout) or a torch state_dict for the families' rule tables; the rest is shared."""
    name = 'file'

    def matches(self, path):
        return True   # the last resort: formats.file_format names what it cannot read

    def read(self, path, request):
        fmt = formats.file_format(path)
        raw = formats.read_file(path)
        img_size, notes, hf = request.img_size, [], None
        if fmt == 'msgpack':   # transformers' former Flax checkpoints: our ViT tree, config.json beside the file
            hf = hf_flax.read_vit(path, raw)
            flat, layout, scanned, notes = hf.flat, 'hf_flax', False, list(hf.notes)
            img_size = img_size if img_size is not None else hf.img_size
        else:
            flat, layout, scanned = self.flax_tree(fmt, raw, path)
        if flat is not None:
            family = flax_family(flat)
            if family is None:
                raise ConversionError(f'{path}: not a ViT/DeiT/Swin/vit-pytorch/MLP-Mixer Flax tree '
                                      f'(first keys: {", ".join(list(flat)[:3])})')
            cfg = dict(read_config(family.config_from_flax, flat, path), img_size_hint=img_size)
        else:
            try:   # a named model's family reads the keys it shares with another family
                named = model_config(request.model_name)[0] if request.model_name else None
            except UnknownModelError:
                named = None   # said below, by the match
            family = torch_family(raw, path, prefer=named)
            state, layout = raw, family.detect_layout(raw)
            if layout != family.torch_layout:
                try:
                    state = family.layouts[layout][0](raw)
                except ConversionError as e:
                    raise ConversionError(f'{path}: {e}') from None
            cfg = dict(read_config(family.config_from_torch, state, path), img_size_hint=img_size)
            if layout in family.layout_config:
                fields, why = family.layout_config[layout]
                cfg.update(fields)
                notes.append(f'{layout} layout ({why}): {", ".join(f"{k}={v}" for k, v in fields.items())}')
        # the model fields the file records beside its arrays (model_fields.py): every one is set on the model
        # matched below, unless the caller set it; with the caller's, they count in the match where the arrays
        # say nothing (a torch qkv's heads)
        recorded = model_fields.read(path, fmt, family) if fmt in ('npz', 'safetensors') else {}
        if request.img_size is not None:   # a size asked for: the positions are resampled to it, or taken as it
            recorded.pop('img_size', None)
        elif recorded.get('img_size') is not None:
            img_size = cfg['img_size_hint'] = recorded['img_size']
        model_name, arch_in = request.model_name, request.arch
        check_model_options(family.module_cls, {**(arch_in or {}),
                                                **({} if img_size is None else {'img_size': img_size})},
                            path, model_name)
        # what the keys leave unknown (a torch qkv's heads) comes from the caller or the record; the rest of the
        # record is set on the model the arrays give (set_recorded), so that what it changed can be said
        described = {**{k: v for k, v in recorded.items() if k != 'img_size'}, **(arch_in or {})}
        unknown = {k for k, v in cfg.items() if v is None}
        cfg, arch, resolved = family.resolve(cfg, described or None, layout, model_name, path)
        notes += resolved
        for k, v in (arch or {}).items():
            if k in cfg and cfg[k] is None:
                cfg[k] = v
        told = {k: recorded[k] for k in unknown
                if k in recorded and k not in (arch_in or {}) and cfg.get(k) is not None}
        arch = {k: v for k, v in (arch or {}).items() if k not in recorded or k in (arch_in or {}) or k in told} or None
        name, model = match_model(family, cfg, path, model_name, arch, request.adapt_core)
        if scanned:  # a file written from nn.scan'd blocks describes a model that scans them
            model = model.clone(scan_blocks=True)
        if hf is not None:   # what config.json says beyond the shapes (eps, activation), unless the caller said
            model = model.clone(**{k: v for k, v in hf.arch.items() if k not in (arch_in or {})})
        model, said = self.set_recorded(model, recorded, arch_in, path, fmt, told)
        notes += said
        if request.model_only:
            return Checkpoint(path, fmt, layout, raw, flat or {}, family, name, model, detected=model_name is None,
                              notes=notes)
        if flat is None:
            try:
                flat = rules.torch_to_flax(state, family.rules(model), ignore=family.ignore_torch)
            except ConversionError as e:   # a model the module refuses (heads that do not divide the width) says so
                raise ConversionError(f'{path}: {model_fault(model) or e}') from None
        flat = family.unstore(flat, model)
        ck = Checkpoint(path, fmt, layout, raw, flat, family, name, model, detected=model_name is None, notes=notes,
                        recorded=recorded)
        if hf is not None:
            ck.kind, ck.source, ck.class_names, ck.pretrained_cfg = ('transformers', path, hf.class_names,
                                                                     hf.pretrained_cfg)
        return ck

    @staticmethod
    def set_recorded(model, recorded: dict, arch_in, path: str, fmt: str, told: dict):
        """(model, notes): `model` (what the arrays give, with `told`: the recorded fields the keys left
        unknown) with the other fields the file records that differ and the caller did not set, each said with
        the value the arrays alone would have given."""
        over = {k: v for k, v in recorded.items()
                if k not in (arch_in or {}) and k not in told and model_fields.differs(getattr(model, k), v)}
        changed = model
        if over:
            try:
                changed = model.clone(**over)
            except ValueError as e:
                raise ConversionError(f'{path}: the model fields it records: {e}') from None
        said = [f'{k}={v!r} (the arrays alone: unknown)' for k, v in told.items()]
        said += [f'{k}={v!r} (the arrays alone: {getattr(model, k)!r})' for k, v in over.items()
                 if model_fields.computes_otherwise(model, changed, k)]
        where = 'zip comment' if fmt == 'npz' else '__metadata__'
        return changed, [f'{path}: model fields recorded in its {where}: ' + ', '.join(said)] if said else []

    @staticmethod
    def flax_tree(fmt: str, raw, path: str) -> Tuple:
        """(flat Flax tree, layout, scanned) of an npz (a family's own layouts, Google's, else the tree itself)
        or an orbax checkpoint; (None, None, False) for a torch state_dict."""
        flat = layout = None
        scanned = False
        if fmt == 'npz':
            flat, layout, scanned = next(filter(None, (fam.from_npz(raw, path) for fam in FAMILIES)), (None,) * 3)
        if fmt in ('npz', 'orbax') and flat is None:
            scanned = is_scanned(raw)
            flat, layout = unstack_blocks(dict(raw), path), 'flax'
        return flat, layout, scanned


def model_fault(model):
    """What the module refuses in `model`'s configuration (its setup's ModelConfigError), or None."""
    from vit_flax.errors import ModelConfigError
    from vit_flax.summary import param_shapes
    try:
        param_shapes(model)
    except ModelConfigError as e:
        return str(e)
    return None


FILE = File()
# the sources a local path (given, or an hf-hub name resolved) may be, in order
LOCAL_SOURCES = (FlaxMsgpackFolder(), TransformersFolder(), TimmFolder(), FILE)
SOURCES = (TrainingWorkdir(), HubName()) + LOCAL_SOURCES


def pick(path: str, sources=SOURCES) -> Source:
    """The first source that matches `path` (File matches anything)."""
    return next(s for s in sources if s.matches(path))


def read_checkpoint(path: str, request: ReadRequest) -> Checkpoint:
    """Read any supported checkpoint into the flat Flax tree of a matching model: the first matching source's
    `read`, called once (module docstring)."""
    path = str(path)
    source = pick(path)
    if request.step is not None and not isinstance(source, TrainingWorkdir):
        raise ConversionError(f'{path}: a step is chosen only in a training workdir')
    if request.ema and not isinstance(source, TrainingWorkdir):
        raise ConversionError(f'{path}: EMA weights are chosen only in a training workdir')
    return source.read(path, request)
