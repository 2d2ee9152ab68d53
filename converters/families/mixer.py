"""MLP-Mixer, gMixer, ResMLP, gMLP (`vit_flax.MlpMixer`, timm's `mlp_mixer`): the Flax tree <-> timm state_dict
map (one table, run both ways), Facebook's ResMLP release layout, and the architecture read off a checkpoint.

Files:
- Google's `.npz` (vit_jax's `imagenet21k/Mixer-B_16.npz` and the like, what `vit_jax.checkpoint.load` reads for
  `models_mixer.MlpMixer`): `stem`, `MixerBlock_{i}/...`, `pre_head_layer_norm`, `head`, keys joined by '/', i.e.
  exactly the model's tree (what `vit_jax.checkpoint.load` recovers from the '/' keys): read and written as it is.
  vit_jax computes the tanh GELU (flax's `nn.gelu` default); timm, reading the same weights (its `goog_in21k*`
  `.pth` files are these arrays converted; it has no `.npz` reader for Mixer), computes the exact one, and so
  does this model by default (`act_layer='gelu'`): reading a Google Mixer file says so, and `--set
  act_layer=gelu_tanh` gives vit_jax's function (then our logits are vit_jax's: 0.0 relative on the tests'
  reduced copy; with timm's GELU 8e-5 there). big_vision's `mlp_mixer.py` has the same tree and GELU; its
  training checkpoints hold it under `params/` (read as layout `big_vision`, the optimizer state left out).
- timm (the table below): `stem.proj`, `blocks.{i}.{norm1, mlp_tokens.fc1/fc2, norm2, mlp_channels.fc1/fc2}`
  (Mixer), `blocks.{i}.{norm1.alpha/beta, linear_tokens, ls1, norm2, mlp_channels, ls2}` (ResMLP, alpha/beta
  (1, 1, D)), `blocks.{i}.{norm, mlp_channels.{fc1, gate.norm, gate.proj, fc2}}` (gMLP), `norm`, `head`.
- Facebook's ResMLP release (facebookresearch/deit `resmlp_models.py`, layout `facebook`): `patch_embed.proj`,
  `blocks.{i}.{norm1, attn, gamma_1, norm2, mlp.fc1/fc2, gamma_2}`, alpha/beta (D,); converted as timm's own
  `checkpoint_filter_fn` does (tested equal), and written back so that that filter reads it.

What a file does not record: the activation (GELU or, for gMixer's GLU, SiLU: the registered name that fits
the shapes says it), ResMLP's `init_values` (an init only), the image size beyond its token count (a square
grid of the file's tokens unless the size asked for fits).
"""
import re
from typing import List

import numpy as np

from vit_flax.models.layers import to_tuple
from vit_flax.models.mixer import MlpMixer

from ..errors import ConversionError
from ..rules import CONV, Rule, Transform, dense_rules, mlp_rules, norm_rules, rule
from .base import Family, square_img_size, timm_class

# Affine alpha/beta: (D,) here, (1, 1, D) in timm
AFFINE = Transform('affine', lambda a: [a[0].reshape(1, 1, -1)], lambda a: [a[0].reshape(-1)])
BLOCK_NAMES = {'mixer': 'MixerBlock', 'resmlp': 'ResBlock', 'gmlp': 'SpatialGatingBlock'}
_FLAX_BLOCK = re.compile(r'^(MixerBlock|ResBlock|SpatialGatingBlock)_(\d+)/')
_TORCH_BLOCK = re.compile(r'^blocks\.(\d+)\.')


def _norm(flax: str, torch: str, kind: str) -> List[Rule]:
    if kind == 'affine':
        return [rule(f'{flax}/alpha', f'{torch}.alpha', AFFINE), rule(f'{flax}/beta', f'{torch}.beta', AFFINE)]
    return norm_rules(flax, torch)


def _norm_name(kind: str, index: int) -> str:
    return f'Affine_{index}' if kind == 'affine' else f'LayerNorm_{index}'


# ---------------------------------------------------------------- Facebook's ResMLP layout

def facebook_to_timm(state):
    """facebookresearch/deit's ResMLP keys -> timm's, as timm's `mlp_mixer.checkpoint_filter_fn`: `patch_embed.`
    -> `stem.`, `attn.` -> `linear_tokens.`, `mlp.` -> `mlp_channels.`, `gamma_` -> `ls`, alpha/beta to (1, 1, D)."""
    out = {}
    for k, v in state.items():
        k = k.replace('patch_embed.', 'stem.').replace('attn.', 'linear_tokens.').replace('mlp.', 'mlp_channels.')
        k = k.replace('gamma_', 'ls')
        if k.endswith(('.alpha', '.beta')):
            v = np.asarray(v).reshape(1, 1, -1)
        out[k] = v
    return out


def timm_to_facebook(state):
    """The inverse: timm's ResMLP keys -> facebookresearch/deit's, alpha/beta (D,)."""
    if not any(k.endswith('linear_tokens.weight') for k in state):
        raise ConversionError("the facebook layout holds ResMLP only (block_layer='resmlp')")
    out = {}
    for k, v in state.items():
        k = re.sub(r'^stem\.', 'patch_embed.', k)
        k = k.replace('.linear_tokens.', '.attn.').replace('.mlp_channels.', '.mlp.')
        k = re.sub(r'\.ls([12])$', r'.gamma_\1', k)
        if k.endswith(('.alpha', '.beta')):
            v = np.asarray(v).reshape(-1)
        out[k] = v
    return out


class MixerFamily(Family):
    """`vit_flax.MlpMixer`: Google's Mixer `.npz` (the tree itself), timm's layout, Facebook's ResMLP files."""
    name = 'mixer'
    module_cls = MlpMixer
    recorded_fields = ('act_layer', 'norm_eps', 'global_pool')
    layouts = {'facebook': (facebook_to_timm, timm_to_facebook)}
    timm_classifier = 'head'
    timm_default_pool = 'avg'

    # ------------------------------------------------------------ detection

    def detect_torch(self, state) -> bool:
        return 'stem.proj.weight' in state and any(_TORCH_BLOCK.match(k) for k in state)

    def detect_flax(self, flat) -> bool:
        return 'stem/kernel' in flat and any(_FLAX_BLOCK.match(k) for k in flat)

    def from_npz(self, arrays, path: str):
        """A Mixer tree under big_vision's `params/` (its training checkpoints, beside `opt/...`) or a training
        state's `opt/target/`: (the tree, 'big_vision', False), the rest of the file left out. An unprefixed Mixer
        `.npz` (Google's released files) is read as the tree itself (layout 'flax')."""
        for prefix in ('params/', 'opt/target/'):
            if f'{prefix}stem/kernel' in arrays and any(_FLAX_BLOCK.match(k[len(prefix):]) for k in arrays
                                                         if k.startswith(prefix)):
                return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}, 'big_vision', False
        return None

    def detect_layout(self, state) -> str:
        """'facebook' (deit's ResMLP: `patch_embed.proj` and a token Linear `blocks.0.attn.weight`), else 'timm'."""
        if 'patch_embed.proj.weight' in state and 'blocks.0.attn.weight' in state and 'blocks.0.norm1.alpha' in state:
            return 'facebook'
        return self.torch_layout

    # ------------------------------------------------------------ the rule table

    def rules(self, model) -> List[Rule]:
        """The map for a `vit_flax.MlpMixer` instance (its block type and norm decide which rows exist)."""
        norm = model.norm_layer
        rules = [rule('stem/kernel', 'stem.proj.weight', CONV), rule('stem/bias', 'stem.proj.bias')]
        if model.stem_norm:
            rules += _norm(model.stem_norm_name, 'stem.norm', norm)
        for i in range(model.num_blocks):
            f, t = f'{BLOCK_NAMES[model.block_layer]}_{i}', f'blocks.{i}'
            if model.block_layer == 'mixer':
                rules += _norm(f'{f}/{_norm_name(norm, 0)}', f'{t}.norm1', norm)
                rules += mlp_rules(f'{f}/token_mixing', f'{t}.mlp_tokens')
                rules += _norm(f'{f}/{_norm_name(norm, 1)}', f'{t}.norm2', norm)
                rules += mlp_rules(f'{f}/channel_mixing', f'{t}.mlp_channels')
            elif model.block_layer == 'resmlp':
                rules += _norm(f'{f}/{_norm_name(norm, 0)}', f'{t}.norm1', norm)
                rules += dense_rules(f'{f}/token_mixing', f'{t}.linear_tokens')
                rules.append(rule(f'{f}/LayerScale_0/scale', f'{t}.ls1'))
                rules += _norm(f'{f}/{_norm_name(norm, 1)}', f'{t}.norm2', norm)
                rules += mlp_rules(f'{f}/channel_mixing', f'{t}.mlp_channels')
                rules.append(rule(f'{f}/LayerScale_1/scale', f'{t}.ls2'))
            else:
                g, tg = f'{f}/channel_mixing/SpatialGatingUnit_0', f'{t}.mlp_channels.gate'
                rules += _norm(f'{f}/{_norm_name(norm, 0)}', f'{t}.norm', norm)
                rules += dense_rules(f'{f}/channel_mixing/Dense_0', f'{t}.mlp_channels.fc1')
                rules += norm_rules(f'{g}/LayerNorm_0', f'{tg}.norm')
                rules += dense_rules(f'{g}/token_mixing', f'{tg}.proj')
                rules += dense_rules(f'{f}/channel_mixing/Dense_1', f'{t}.mlp_channels.fc2')
        rules += _norm(model.final_norm_name, 'norm', norm)
        return rules + (dense_rules('head', 'head') if model.num_classes > 0 else [])

    # ------------------------------------------------------------ architecture

    @staticmethod
    def _config(block_layer, norm_layer, stem, tokens, channels, gate, blocks, head_bias) -> dict:
        """Fields from the shapes: `stem` the HWIO kernel's shape, `tokens` the token MLP's first (N, hidden) or the
        token Linear's (N, N) kernel, `channels` the channel MLP's first (D, hidden) kernel, `gate` whether it is a
        GLU."""
        dim, n = stem[-1], tokens.shape[0]
        cfg = dict(block_layer=block_layer, norm_layer=norm_layer, embed_dim=dim, in_chans=stem[2],
                   patch_size=tuple(stem[:2]), num_blocks=blocks, num_patches=n,
                   num_classes=head_bias.shape[0] if head_bias is not None else 0)
        c = channels.shape[1] / dim
        if block_layer == 'mixer':
            cfg.update(mlp_ratio=(tokens.shape[1] / dim, c), mlp_layer='glu' if gate else 'mlp')
        else:
            cfg.update(mlp_ratio=c, mlp_layer='gated' if block_layer == 'gmlp' else 'glu' if gate else 'mlp')
        return cfg

    def config_from_flax(self, flat) -> dict:
        """Architecture fields of `MlpMixer` read off a flat Flax tree."""
        kinds = {m.group(1) for k in flat for m in [_FLAX_BLOCK.match(k)] if m}
        if len(kinds) != 1:
            raise ValueError(f'blocks of several kinds: {sorted(kinds)}')
        kind = next(k for k, v in BLOCK_NAMES.items() if v in kinds)
        b = f'{BLOCK_NAMES[kind]}_0'
        norm = 'affine' if f'{b}/Affine_0/alpha' in flat else 'layernorm'
        if kind == 'gmlp':
            tokens, channels = flat[f'{b}/channel_mixing/SpatialGatingUnit_0/token_mixing/kernel'], \
                flat[f'{b}/channel_mixing/Dense_0/kernel']
            gate = True
        else:
            tokens = flat[f'{b}/token_mixing/Dense_0/kernel' if kind == 'mixer' else f'{b}/token_mixing/kernel']
            channels = flat[f'{b}/channel_mixing/Dense_0/kernel']
            gate = flat[f'{b}/channel_mixing/Dense_1/kernel'].shape[0] * 2 == channels.shape[1]
        blocks = 1 + max(int(m.group(2)) for k in flat for m in [_FLAX_BLOCK.match(k)] if m)
        return dict(self._config(kind, norm, flat['stem/kernel'].shape, tokens, channels, gate, blocks,
                                 flat.get('head/bias')),
                    stem_norm='stem_layer_norm/scale' in flat or 'stem_affine/alpha' in flat)

    def config_from_torch(self, state) -> dict:
        """The same fields off a timm-layout state_dict."""
        b = 'blocks.0'
        norm = 'affine' if f'{b}.norm1.alpha' in state or f'{b}.norm.alpha' in state else 'layernorm'
        if f'{b}.mlp_channels.gate.proj.weight' in state:
            kind, tokens, gate = 'gmlp', state[f'{b}.mlp_channels.gate.proj.weight'].T, True
        elif f'{b}.linear_tokens.weight' in state:
            kind, tokens = 'resmlp', state[f'{b}.linear_tokens.weight'].T
        else:
            kind, tokens = 'mixer', state[f'{b}.mlp_tokens.fc1.weight'].T
        channels = state[f'{b}.mlp_channels.fc1.weight'].T
        if kind != 'gmlp':
            gate = state[f'{b}.mlp_channels.fc2.weight'].shape[1] * 2 == channels.shape[1]
        out, cin, ph, pw = state['stem.proj.weight'].shape
        blocks = 1 + max(int(m.group(1)) for k in state for m in [_TORCH_BLOCK.match(k)] if m)
        return dict(self._config(kind, norm, (ph, pw, cin, out), tokens, channels, gate, blocks,
                                 state.get('head.bias')),
                    stem_norm='stem.norm.weight' in state or 'stem.norm.alpha' in state)

    def core(self, model) -> dict:
        """Fields of a registered model that a checkpoint must share (the rest are `overrides`)."""
        ratio = model.mlp_dims if model.block_layer == 'mixer' else model.mlp_dims[1]
        ratio = tuple(d / model.embed_dim for d in ratio) if isinstance(ratio, tuple) else ratio / model.embed_dim
        return dict(block_layer=model.block_layer, norm_layer=model.norm_layer, mlp_layer=model.mlp_layer,
                    embed_dim=model.embed_dim, patch_size=to_tuple(model.patch_size, 2), num_blocks=model.num_blocks,
                    mlp_ratio=ratio)

    def overrides(self, cfg: dict, model) -> dict:
        """Overrides that make `model` (holding the file's core fields) hold exactly the checkpoint: classes,
        channels, and the image size whose grid has the file's token count."""
        kw = {k: cfg[k] for k in ('num_classes', 'in_chans', 'stem_norm') if k in cfg and cfg[k] != getattr(model, k)}
        size = square_img_size(cfg, model)
        if size is not None:
            kw['img_size'] = size
        return kw

    def resolve(self, cfg: dict, arch, layout: str, model_name, path: str):
        """A Mixer `.npz` (Google's tree) records no activation: said out loud, since vit_jax and big_vision compute
        another."""
        notes = []
        if layout in ('flax', 'big_vision') and cfg['block_layer'] == 'mixer' and cfg['mlp_layer'] == 'mlp' \
                and 'act_layer' not in (arch or {}):
            notes.append(f"{path}: a Mixer tree records no activation: read with timm's exact GELU (act_layer="
                         f"'gelu'), as timm reads Google's Mixer weights; vit_jax's and big_vision's MlpMixer compute "
                         f'the tanh form (--set act_layer=gelu_tanh)')
        return cfg, arch, notes

    def adapt(self, flat, src, dst, *, resample: str, bias_resize: str, log):
        """Nothing to adapt but the head (the pipeline's): the token MLPs are sized for one token count."""
        if tuple(src.grid_size) != tuple(dst.grid_size):
            raise ConversionError(f'the token-mixing weights are sized for a {src.grid_size} grid of tokens '
                                  f'(img_size {src.img_size}); a {dst.grid_size} grid (img_size {dst.img_size}) '
                                  f'cannot be made from them')
        return flat

    # ------------------------------------------------------------ torch, timm, inspection

    def timm_kwargs(self, model) -> dict:
        """Arguments of timm's `MlpMixer` class that build the same architecture as `model` (`torch_model`). timm's
        registered functions fix their sizes and blocks themselves, so `timm.create_model(name, **kw)` takes only
        what differs from the registration (a timm folder's model_args are exactly that)."""
        block = {'mixer': timm_class('timm.models.mlp_mixer', 'MixerBlock'),
                 'resmlp': timm_class('timm.models.mlp_mixer', 'ResBlock', init_values=model.init_values),
                 'gmlp': timm_class('timm.models.mlp_mixer', 'SpatialGatingBlock')}[model.block_layer]
        mlp = timm_class('timm.layers', {'mlp': 'Mlp', 'glu': 'GluMlp', 'gated': 'GatedMlp'}[model.mlp_layer])
        norm = timm_class('timm.models.mlp_mixer', 'Affine') if model.norm_layer == 'affine' else \
            timm_class('torch.nn', 'LayerNorm', eps=model.norm_eps)
        act = {'gelu': timm_class('torch.nn', 'GELU'), 'silu': timm_class('torch.nn', 'SiLU'),
               'gelu_tanh': timm_class('torch.nn', 'GELU', approximate='tanh')}[model.act_layer]
        ratio = to_tuple(model.mlp_ratio, 2) if model.block_layer == 'mixer' else to_tuple(model.mlp_ratio, 2)[1]
        return dict(num_classes=model.num_classes, img_size=model.img_size, in_chans=model.in_chans,
                    patch_size=model.patch_size, num_blocks=model.num_blocks, embed_dim=model.embed_dim,
                    mlp_ratio=ratio, block_layer=block, mlp_layer=mlp, norm_layer=norm, act_layer=act,
                    drop_rate=model.drop_rate, proj_drop_rate=model.proj_drop_rate,
                    drop_path_rate=model.drop_path_rate, global_pool=model.global_pool, stem_norm=model.stem_norm)

    def torch_model(self, model, model_name: str):
        """timm's `MlpMixer` built from `timm_kwargs` (any size, depth or width; randomly initialised)."""
        from ..optional import require
        require('timm', 'vit-flax parity')
        from timm.models.mlp_mixer import MlpMixer as TimmMixer
        return TimmMixer(**self.timm_kwargs(model))

    def parity_points(self, model):
        """(label, flax intermediate, timm module) pairs, in forward order; both sides (B, N, D)."""
        pts = [('stem', 'embed', 'stem')]
        pts += [(f'block {i}', f'block_{i}', f'blocks.{i}') for i in range(model.num_blocks)]
        return pts + [('norm', 'encoded', 'norm')]

    def describe(self, ck) -> str:
        kind = {'mixer': 'gMixer' if ck.model.mlp_layer == 'glu' else 'MLP-Mixer', 'resmlp': 'ResMLP',
                'gmlp': 'gMLP'}[ck.model.block_layer]
        return f'{kind} ({ck.layout})'

    def timm_folder_config(self, model, model_name: str, pretrained_cfg: dict, class_names=None) -> dict:
        """As every family's, with timm's `stem.proj` first conv; refused (one line) where the model differs from
        `model_name` in an argument timm's entrypoint for it fixes itself (its sizes and blocks: it would raise
        on the folder's model_args)."""
        from vit_flax.registry import model_config
        cfg = super().timm_folder_config(model, model_name, pretrained_cfg, class_names)
        to_timm = {'init_values': 'block_layer'}   # ResMLP's LayerScale start is an argument of timm's block
        fixed = {to_timm.get(k, k) for k in model_config(model_name)[1]}
        clash = sorted(set(cfg['model_args']) & fixed)
        if clash:
            values = ', '.join(f'{k}={cfg["model_args"][k]}' for k in clash)
            raise ConversionError(f"timm's {model_name} fixes {', '.join(clash)} itself: a timm folder cannot describe "
                                  f'this model ({values}); write a .pth or .safetensors instead')
        cfg['pretrained_cfg']['first_conv'] = 'stem.proj'   # timm's mlp_mixer default_cfg
        return cfg


FAMILY = MixerFamily()
