"""What the converters know about each model family, looked up from a Flax module instance.

A family supplies: its rule table (`rules(model)`), the timm kwargs that rebuild the same
architecture (`timm_kwargs(model)`, or `torch_model(model)` for a family timm does not have), parity
points (label, flax intermediate, torch module), torch-side keys that are buffers to ignore when reading,
and named torch layouts besides the one its table speaks (`torch_layout`, timm's for timm's families):
`layouts[name] = (to_table(state) -> state, from_table(state) -> state)`,
and how a tree is stored in files that need arrays the model computes (`store`) and read back
(`unstore`).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

from vit_flax.models.swin import SwinTransformer
from vit_flax.models.vit import VisionTransformer
from vit_flax.models.vit_pytorch import LucidViT

from . import lucid_map, swin_map, vit_map


@dataclass(frozen=True)
class Family:
    name: str
    module_cls: type
    rules: Callable
    timm_kwargs: Callable
    parity_points: Callable
    ignore_torch: Tuple[str, ...] = ()
    layouts: Dict[str, Tuple[Callable, Callable]] = field(default_factory=dict)
    # recognises a timm-layout state_dict (dict of arrays) of this family
    detect_torch: Callable = lambda state: False
    # recognises a flat Flax tree of this family
    detect_flax: Callable = lambda flat: False
    # architecture read off a checkpoint: dicts of config fields (torch side may leave num_heads None)
    config_from_flax: Callable = None
    config_from_torch: Callable = None
    # the registered model's fields that must equal the checkpoint's, and the overrides for the rest
    core: Callable = None
    overrides: Callable = None
    # which named torch layout a state_dict is in ('timm' or a key of `layouts`); None: always timm
    detect_layout: Callable = None
    # family-specific surgery between a checkpoint's model and a target model (e.g. window resizing)
    adapt: Callable = None
    # what a named layout implies about the computation: {layout: (config fields, why)}, said out loud on read
    layout_config: Dict[str, Tuple[dict, str]] = field(default_factory=dict)
    # layout_note(model, layout): a warning when the code that reads `layout` computes differently from `model`
    layout_note: Callable = lambda model, layout: None
    # the torch layout the rule table speaks (named layouts convert to and from it)
    torch_layout: str = 'timm'
    # resolve(cfg, arch, layout, model_name, path) -> (cfg, arch, notes): what the keys cannot say, from the
    # caller's overrides (`arch`) or said out loud (`notes`)
    resolve: Callable = None
    # torch_model(model) -> the torch module `parity` compares with; None: timm.create_model(timm_kwargs)
    torch_model: Callable = None
    # the flat Flax key of the learned position table (resampled on a size change), if any
    pos_key: str = None
    # store(flat, model, log) -> flat as files with fixed arrays written out hold it (the rules' form);
    # unstore(flat, model) -> the model's own tree again
    store: Callable = lambda flat, model, log=None: flat
    unstore: Callable = lambda flat, model: flat


FAMILIES = [
    Family('vit', VisionTransformer, vit_map.vit_rules, vit_map.vit_timm_kwargs, vit_map.vit_parity_points,
           detect_torch=lambda s: 'patch_embed.proj.weight' in s and any(k.startswith('blocks.') for k in s),
           detect_flax=lambda f: 'embedding/kernel' in f,
           config_from_flax=vit_map.vit_config_from_flax, config_from_torch=vit_map.vit_config_from_torch,
           core=vit_map.vit_core, overrides=vit_map.vit_overrides, store=vit_map.vit_store,
           unstore=vit_map.vit_unstore, pos_key=vit_map.POS_KEY),
    Family('swin', SwinTransformer, swin_map.swin_rules, swin_map.swin_timm_kwargs, swin_map.swin_parity_points,
           ignore_torch=swin_map.SWIN_IGNORE,
           layouts={'microsoft': (swin_map.microsoft_to_timm, swin_map.timm_to_microsoft),
                    'wzmiaomiao': (swin_map.microsoft_to_timm, swin_map.timm_to_wzmiaomiao)},
           detect_torch=lambda s: any('relative_position_bias_table' in k for k in s) and 'patch_embed.proj.weight' in s,
           detect_flax=lambda f: 'patch_embed/proj/kernel' in f and any('relative_position_bias_table' in k for k in f),
           config_from_flax=swin_map.swin_config_from_flax, config_from_torch=swin_map.swin_config_from_torch,
           core=swin_map.swin_core, overrides=swin_map.swin_overrides,
           detect_layout=swin_map.swin_detect_layout, adapt=swin_map.swin_adapt,
           layout_config=swin_map.SWIN_LAYOUT_CONFIG, layout_note=swin_map.swin_layout_note),
    Family('vit-pytorch', LucidViT, lucid_map.lucid_rules, None, lucid_map.lucid_parity_points,
           layouts=lucid_map.LUCID_LAYOUTS, detect_torch=lucid_map.lucid_detect_torch,
           detect_flax=lucid_map.lucid_detect_flax, config_from_flax=lucid_map.lucid_config_from_flax,
           config_from_torch=lucid_map.lucid_config_from_torch, core=lucid_map.lucid_core,
           overrides=lucid_map.lucid_overrides, detect_layout=lucid_map.lucid_detect_layout,
           layout_note=lucid_map.lucid_layout_note, torch_layout=lucid_map.CURRENT,
           resolve=lucid_map.lucid_resolve, torch_model=lucid_map.lucid_torch_model, pos_key='pos_embedding'),
]


def register_family(family: Family) -> None:
    FAMILIES.append(family)


def detect_flax_family(flat) -> Family:
    return next((fam for fam in FAMILIES if fam.detect_flax(flat)), None)


def family_of(model) -> Family:
    for fam in FAMILIES:
        if isinstance(model, fam.module_cls):
            return fam
    raise TypeError(f'no converter family for {type(model).__name__}')
