"""What Swin V1 (swin.py) and Swin V2 (swinv2.py) share, as files and as trees: the stages a checkpoint holds,
Microsoft's layout (patch merging at the end of a stage, classifier `head`; timm moves it to the start of the
next and names it `head.fc`), the stem and tail of the rule table, the fields read off any Swin checkpoint, and
the family properties. Each family adds what it computes its own way (V1's bias tables, V2's cosine attention,
continuous position bias and buffers)."""
import re
from typing import Dict, List, Tuple

import numpy as np

from vit_flax.models.layers import to_tuple

from ..errors import ConversionError
from ..rules import CONV, Rule, dense_rules, norm_rules, renamed_rules, rule
from .base import Family

DOWNSAMPLE = re.compile(r'^layers\.(\d+)\.downsample\.')
TORCH_BLOCKS = r'^layers\.(\d+)\.blocks\.(\d+)\.'
FLAX_BLOCKS = r'^layers_(\d+)/blocks_(\d+)/'


def blocks_per_stage(keys, pattern) -> Tuple[int, ...]:
    """Blocks in each stage, from the keys that `pattern` (stage, block) matches."""
    found = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            found[i] = max(found.get(i, 0), j + 1)
    return tuple(found[i] for i in range(len(found)))


def stage_count(state) -> int:
    stages = {int(m.group(1)) for k in state for m in [re.match(r'^layers\.(\d+)\.', k)] if m}
    if not stages:
        raise ConversionError('not a Swin state_dict: no layers.{i} keys')
    return max(stages) + 1


def merging_to_timm(state: Dict[str, np.ndarray], drop: Tuple[str, ...] = ()) -> Dict[str, np.ndarray]:
    """Microsoft's layout -> timm's, as timm's `checkpoint_filter_fn`: `layers.{i}.downsample` moved to
    `layers.{i+1}`, `head.*` to `head.fc.*`; keys containing any of `drop` left out. Arrays pass through
    untouched (bit-exact)."""
    last = stage_count(state) - 1
    if f'layers.{last}.downsample.reduction.weight' in state or (
            last > 0 and 'layers.0.downsample.reduction.weight' not in state):
        raise ConversionError('not in the Microsoft layout (patch merging is not at the end of layers.0); '
                              'is it already a timm state_dict?')
    out = {}
    for k, v in state.items():
        if any(s in k for s in drop):
            continue
        k = DOWNSAMPLE.sub(lambda m: f'layers.{int(m.group(1)) + 1}.downsample.', k)
        if k.startswith('head.'):
            k = 'head.fc.' + k[len('head.'):]
        out[k] = v
    return out


def merging_to_microsoft(state: Dict[str, np.ndarray], out: Dict[str, np.ndarray], stage: int) -> None:
    """Put timm's patch merging of stage `stage + 1` at the end of stage `stage` (Microsoft's place), into
    `out` (a stage's blocks first: Microsoft's key order)."""
    src, dst = f'layers.{stage + 1}.downsample.', f'layers.{stage}.downsample.'
    for name in ('reduction.weight', 'norm.weight', 'norm.bias'):
        if src + name in state:
            out[dst + name] = state[src + name]


def norm_and_head_to_microsoft(state: Dict[str, np.ndarray], out: Dict[str, np.ndarray]) -> None:
    """The final norm, then the classifier as Microsoft's `head` (timm's `head.fc`), into `out`."""
    for k, v in state.items():
        if k.startswith('norm.'):
            out[k] = v
    for k, v in state.items():
        if k.startswith('head.fc.'):
            out['head.' + k[len('head.fc.'):]] = v


class SwinFamilyBase(Family):
    """The Swin families' common ground: timm's `head.fc` classifier and average pooling, Microsoft's
    `{'model': ...}` files, the rule table's stem (patch embedding) and tail (final norm, head), the parity
    points (stem, every stage, the norm) and the sizes every Swin checkpoint records."""
    torch_wrap = {'microsoft': 'model'}
    timm_classifier = 'head.fc'
    timm_default_pool = 'avg'

    def stem_rules(self) -> List[Rule]:
        return [rule('patch_embed/proj/kernel', 'patch_embed.proj.weight', CONV),
                rule('patch_embed/proj/bias', 'patch_embed.proj.bias')] + norm_rules('patch_embed/norm',
                                                                                    'patch_embed.norm')

    def tail_rules(self, model) -> List[Rule]:
        return norm_rules('norm', 'norm') + (dense_rules('head', 'head.fc') if model.num_classes > 0 else [])

    def transformers_table(self, model, cls: str, spelling: str, prefix: str) -> List[Rule]:
        """timm Swin keys <-> transformers' Swin / Swinv2 classes (`swin.` / `swinv2.` in *ForImageClassification):
        `embeddings.{patch_embeddings.projection, norm}`, `encoder.layers.i.blocks.j.*` (`transformers_block`),
        `encoder.layers.i.downsample.{reduction, norm}` at the end of stage i (timm: the start of stage i+1),
        `layernorm`, `classifier`."""
        p = prefix
        rules = renamed_rules('patch_embed.proj', f'{p}embeddings.patch_embeddings.projection')
        rules += renamed_rules('patch_embed.norm', f'{p}embeddings.norm')
        for i, depth in enumerate(model.depths):
            s = f'{p}encoder.layers.{i}.'
            for j in range(depth):
                rules += self.transformers_block(model, f'layers.{i}.blocks.{j}.', f'{s}blocks.{j}.', spelling)
            if i + 1 < len(model.depths):   # merging: the end of stage i here, the start of stage i+1 in timm
                rules += renamed_rules(f'layers.{i + 1}.downsample.reduction', f'{s}downsample.reduction', bias=False)
                rules += renamed_rules(f'layers.{i + 1}.downsample.norm', f'{s}downsample.norm')
        rules += renamed_rules('norm', f'{p}layernorm')
        if model.num_classes > 0:
            rules += renamed_rules('head.fc', 'classifier')
        return rules

    def transformers_block(self, model, t: str, h: str, spelling: str) -> List[Rule]:
        """One block's rows of `transformers_table`: timm's keys under `t`, transformers' under `h`."""
        raise NotImplementedError

    def parity_points(self, model):
        """(label, flax intermediate, timm module) pairs, in forward order; both sides are NHWC."""
        pts = [('patch_embed', 'embed', 'patch_embed')]
        pts += [(f'stage {i}', f'stage_{i}', f'layers.{i}') for i in range(len(model.depths))]
        pts.append(('norm', 'encoded', 'norm'))
        return pts

    def sizes_from_flax(self, flat) -> dict:
        """Patch embedding, stages, MLP width and head, off a flat Flax tree."""
        kernel = flat['patch_embed/proj/kernel']
        return dict(embed_dim=kernel.shape[-1], in_chans=kernel.shape[-2], patch_size=tuple(kernel.shape[:2]),
                    depths=blocks_per_stage(flat, FLAX_BLOCKS),
                    mlp_ratio=flat['layers_0/blocks_0/mlp/Dense_0/kernel'].shape[1] / kernel.shape[-1],
                    num_classes=flat['head/bias'].shape[0] if 'head/bias' in flat else 0)

    def sizes_from_torch(self, state) -> dict:
        """The same off a timm-layout state_dict."""
        w = state['patch_embed.proj.weight']
        return dict(embed_dim=w.shape[0], in_chans=w.shape[1], patch_size=tuple(w.shape[2:]),
                    depths=blocks_per_stage(state, TORCH_BLOCKS),
                    mlp_ratio=state['layers.0.blocks.0.mlp.fc1.weight'].shape[0] / w.shape[0],
                    num_classes=state['head.fc.bias'].shape[0] if 'head.fc.bias' in state else 0)

    def core_sizes(self, model) -> dict:
        return dict(embed_dim=model.embed_dim, patch_size=to_tuple(model.patch_size, 2), depths=tuple(model.depths),
                    num_heads=tuple(model.num_heads), mlp_ratio=model.mlp_ratio)
