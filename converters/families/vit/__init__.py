"""The ViT family (`vit_flax.VisionTransformer`: ViT, DeiT, R+ViT hybrids, SigLIP towers, 1-D ViTs) as the
converters see it: Google's `.npz` layouts, the ResNet stem of hybrids, and the Flax <-> timm rule table, one
table for both directions.

Google `.npz` layouts (see shared REFERENCE.md):
- released: vit_jax / AugReg files; block children numbered by one counter
  (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3). Written by default, since
  timm's npz reader and Google's `checkpoint.load` both take it.
- linen: per-class numbering (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0),
  i.e. exactly our Flax tree.
- big_vision: a `params/` (or `opt/target/`, `params/img/`) prefix, linen numbering, `pos_embedding` at the
  top level without a cls row, optionally scanned blocks (`Transformer/encoderblock/...` with a leading
  depth axis).

The ResNet stem of R+ViT hybrids: Google's tree (vit_jax `models_resnet`) <-> timm's `patch_embed.backbone`.
timm holds the stem as a `ResNetV2` (`stem.conv`, `stem.norm`, `stages.{i}.blocks.{j}.conv{1,2,3}/norm{1,2,3}`,
`downsample.conv/norm` on a stage's first block) or, for the root block alone (R+ViT-Ti), as a bare
`conv`/`norm` pair. GroupNorm scale/bias map like LayerNorm's.

A model with big_vision's fixed sincos2d positions has no position param; files that need a table (timm's
`pos_embed`, vit_jax's released layout) hold it written out (`store`), and a stored table equal to that
function bit for bit reads back as the fixed one (`unstore`), so round trips stay exact.

The package, one module a job: `npz` (Google's layouts), `hybrid` (the ResNet stem), `releases` (DINOv2,
open_clip, DeiT III), `family` (the rule table and `ViTFamily`). Every name the former `families/vit.py`
module offered is here too.
"""
from .npz import LAYOUTS, detect_prefix, detect_npz_layout, npz_to_flax, flax_to_npz  # noqa: F401
from .hybrid import (TORCH_PREFIX, resnet_rules, resnet_from_flax, resnet_from_torch, resnet_label,
                     timm_backbone)  # noqa: F401
from .releases import (dinov2_to_timm, timm_to_dinov2, is_open_clip, open_clip_to_timm, timm_to_open_clip,
                       deit3_to_timm, timm_to_deit3)  # noqa: F401
from .family import (POS_KEY, TimmRef, is_sincos2d_table, sincos2d_pos_embed, VIT_CORE, img_size_override,
                     ViTFamily, FAMILY)  # noqa: F401
