"""BEiT and BEiT v2: timm 1.0.31's `Beit` (timm/models/beit.py, 7 names) in Flax.

A pre-norm ViT with EVA's attention (fused qkv, q and v biases, no k bias; it is where EVA's came from) and
BEiT's relative position bias: a table of (2 Wh - 1)(2 Ww - 1) + 3 rows per head whose last three rows are the
class token's entries (vit_flax.models.eva.relative_position_index), added to the attention logits; one table
per block (`use_rel_pos_bias`, every registered name) or one shared by all blocks (`use_shared_rel_pos_bias`,
BEiT's pre-training). Blocks are vit_flax.models.eva.EvaBlock. Fields take ViT's and Eva's names (`fc_norm` is
timm's `use_fc_norm`, `scale_mlp_norm` its `scale_mlp`, `mlp_layer='swiglu'` its `swiglu_mlp`).

Tree (timm's names): patch_embed/{kernel, bias}, cls_token (1, 1, D), pos_embed (1, N + 1, D),
rel_pos_bias/relative_position_bias_table (L, heads), blocks_{i}/{gamma_1, gamma_2, norm1, attn/{qkv/kernel,
q_bias, v_bias, relative_position_bias_table, proj}, norm2, mlp/{Dense_0, Dense_gate, norm, Dense_1}}, norm, fc_norm,
head. `global_pool='avg'` averages the patch tokens (then fc_norm), 'token' reads the class token after norm, '' keeps
every token.
"""
from typing import Any, Literal, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl
from ..registry import register
from .eva import EvaBlock, relative_bias, relative_table_size
from .layers import PatchConv, PatchGrid, dense, drop_path_rates, remat_block, to_tuple
from .layers import norm_layer as make_norm

Dtype = Any


class SharedRelPosBias(nn.Module):
    """The table all blocks share (timm `RelativePositionBias`): `relative_position_bias_table` (L, heads)."""
    window: tuple
    num_heads: int

    @nn.compact
    def __call__(self):
        table = self.param('relative_position_bias_table', nn.initializers.zeros,
                           (relative_table_size(self.window), self.num_heads))
        return relative_bias(table, self.window)


class Beit(PatchGrid, nn.Module):
    """timm's `Beit` (module docstring). Input NHWC images; output logits (pooled features with
    `num_classes=0` or `pre_logits=True`)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    patch_size: Union[int, Sequence[int]] = 16
    in_chans: int = 3
    global_pool: Literal['avg', 'token', ''] = 'avg'
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    qkv_bias: bool = True
    mlp_ratio: float = 4.0
    mlp_layer: Literal['mlp', 'swiglu'] = 'mlp'   # timm swiglu_mlp
    scale_mlp_norm: bool = False                   # timm scale_mlp
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    init_values: Optional[float] = None
    use_abs_pos_emb: bool = True
    use_rel_pos_bias: bool = False
    use_shared_rel_pos_bias: bool = False
    fc_norm: Optional[bool] = None                 # timm use_fc_norm; None: for global_pool='avg'
    remat: bool = False
    dtype: Dtype = jnp.float32
    attn_impl: AttnImpl = 'auto'

    @property
    def num_prefix_tokens(self) -> int:
        return 1

    @property
    def num_features(self) -> int:
        return self.embed_dim

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == 'avg' if self.fc_norm is None else bool(self.fc_norm)

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @nn.compact
    def __call__(self, x, train: bool = False, pre_logits: bool = False):
        check_impl(self.attn_impl)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ModelConfigError(f"input shape {tuple(x.shape[1:])} does not match the model's {self.input_shape} "
                                   f'(set img_size/in_chans when creating the model)')
        d, b, grid = self.embed_dim, x.shape[0], self.grid_size
        x = PatchConv(features=d, patch_size=self.patch_size_tuple, dtype=self.dtype, name='patch_embed')(
            x.astype(self.dtype))
        x = x.reshape(b, -1, d).astype(jnp.promote_types(self.dtype, jnp.float32))
        cls = self.param('cls_token', nn.initializers.normal(0.02), (1, 1, d)).astype(x.dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)), x], axis=1)
        if self.use_abs_pos_emb:
            x = x + self.param('pos_embed', nn.initializers.normal(0.02), (1, x.shape[1], d)).astype(x.dtype)
        x = nn.Dropout(rate=self.pos_drop_rate)(x, deterministic=not train)
        self.sow('intermediates', 'embed', x)
        shared = None
        if self.use_shared_rel_pos_bias:
            shared = SharedRelPosBias(window=grid, num_heads=self.num_heads, name='rel_pos_bias')()
        block_cls = remat_block(EvaBlock, self.remat)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = block_cls(num_heads=self.num_heads, mlp_dim=self.mlp_hidden, qkv_bias=self.qkv_bias,
                          mlp_layer=self.mlp_layer, scale_mlp_norm=self.scale_mlp_norm, norm_eps=self.norm_eps,
                          init_values=self.init_values or None, num_prefix_tokens=1,
                          proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate, drop_path_rate=rate,
                          dtype=self.dtype, attn_impl=self.attn_impl,
                          rel_pos_window=grid if self.use_rel_pos_bias else None,
                          name=f'blocks_{i}')(x, None, not train, shared)
            self.sow('intermediates', f'block_{i}', x)
        if not self.use_fc_norm:
            x = make_norm('layernorm', self.norm_eps, self.dtype, name='norm')(x)
        self.sow('intermediates', 'encoded', x)
        if self.global_pool:   # '' keeps every token (timm's forward_head)
            x = x[:, 1:].mean(axis=1) if self.global_pool == 'avg' else x[:, 0]
        if self.use_fc_norm:
            x = make_norm('layernorm', self.norm_eps, self.dtype, name='fc_norm')(x)
        x = nn.Dropout(rate=self.drop_rate)(x, deterministic=not train)
        if pre_logits or self.num_classes == 0:
            return x
        return dense(self.num_classes, self.dtype, name='head', kernel_init=nn.initializers.zeros)(x)


_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, use_abs_pos_emb=False, use_rel_pos_bias=True)
_LARGE = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, use_abs_pos_emb=False, use_rel_pos_bias=True,
              init_values=1e-5)
for _res in (224, 384):
    register(f'beit_base_patch16_{_res}', Beit, img_size=_res, init_values=0.1, **_BASE)
for _res in (224, 384, 512):
    register(f'beit_large_patch16_{_res}', Beit, img_size=_res, **_LARGE)
register('beitv2_base_patch16_224', Beit, img_size=224, init_values=1e-5, **_BASE)
register('beitv2_large_patch16_224', Beit, img_size=224, **_LARGE)
