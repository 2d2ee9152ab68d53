"""facebookresearch/dinov2 at b8931f7 (Apache-2.0, Meta Platforms): dinov2/layers and
dinov2/models/vision_transformer.py as released, unchanged, so the tests run the real DinoVisionTransformer offline.
The hub files are built by dinov2/hub/backbones.py: vit_{small,base,large,giant2}(img_size=518, patch_size=14,
init_values=1.0, block_chunks=0, ffn_layer="mlp" or "swiglufused" for giant, num_register_tokens=0 or 4,
interpolate_antialias=False/True, interpolate_offset=0.1/0.0).
"""
