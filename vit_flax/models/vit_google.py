"""timm's names for Google's other ViT checkpoint families: R+ViT hybrids and SigLIP / SigLIP 2 image towers.

Each entry is timm's own configuration (`vision_transformer_hybrid.py`, `vision_transformer.py`),
`num_classes` included: timm builds a model with its default pretrained tag's head, so the SigLIP towers
and `vit_base_r50_s16_224` (in21k, no head) are headless.
"""
from .vit import VisionTransformer, _SIZES
from ..registry import register

# ---- R+ViT hybrids (vit_jax R50+ViT-B_16, AugReg R_Ti_16, R26_S_32, R50_L_32): ResNet stem, then patches.
_HYBRIDS = [  # (name, size, ResNet units per stage, patch on the stem's output, num_classes)
    ('vit_tiny_r_s16_p8_224', 'tiny', (), 8, 1000),
    ('vit_tiny_r_s16_p8_384', 'tiny', (), 8, 1000),
    ('vit_small_r26_s32_224', 'small', (2, 2, 2, 2), 1, 1000),
    ('vit_small_r26_s32_384', 'small', (2, 2, 2, 2), 1, 1000),
    ('vit_base_r26_s32_224', 'base', (2, 2, 2, 2), 1, 1000),
    ('vit_base_r50_s16_224', 'base', (3, 4, 9), 1, 0),
    ('vit_base_r50_s16_384', 'base', (3, 4, 9), 1, 1000),
    ('vit_large_r50_s32_224', 'large', (3, 4, 6, 3), 1, 1000),
    ('vit_large_r50_s32_384', 'large', (3, 4, 6, 3), 1, 1000),
]
for _name, _size, _layers, _patch, _classes in _HYBRIDS:
    register(_name, VisionTransformer, img_size=int(_name[-3:]), patch_size=_patch, resnet=_layers,
             num_classes=_classes, **_SIZES[_size])

# ---- SigLIP / SigLIP 2 image towers: no class token, MAP head (or GAP on the `_gap` names), final norm,
# headless. big_vision itself always uses the tanh GELU; timm (and so these names) uses it only where listed.
_SIGLIP_SIZES = dict(
    base=dict(embed_dim=768, depth=12, num_heads=12),
    large=dict(embed_dim=1024, depth=24, num_heads=16),
    so400m=dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362),   # MLP 4304
    giantopt=dict(embed_dim=1536, depth=40, num_heads=16),
)
_SIGLIP = [  # (size, patch, resolutions with the MAP head, extra resolutions with GAP only, gelu)
    ('base', 32, (256,), (), 'tanh'),
    ('base', 16, (224, 256, 384, 512), (), 'exact'),
    ('large', 16, (256, 384), (), 'exact'),
    ('large', 16, (512,), (), 'tanh'),
    ('so400m', 14, (224, 378, 384), (448, 896), 'exact'),
    ('so400m', 16, (256, 384, 512), (), 'tanh'),
    ('giantopt', 16, (256, 384), (), 'tanh'),
]
for _size, _patch, _map_res, _gap_res, _gelu in _SIGLIP:
    for _pool, _tag, _res_list in (('map', '', _map_res), ('gap', '_gap', _map_res + _gap_res)):
        for _res in _res_list:
            register(f'vit_{_size}_patch{_patch}_siglip{_tag}_{_res}', VisionTransformer, img_size=_res,
                     patch_size=_patch, class_token=False, global_pool=_pool, gelu=_gelu, num_classes=0,
                     **_SIGLIP_SIZES[_size])
