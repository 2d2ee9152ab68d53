"""lucidrains' vit-pytorch `ViT` (`vit_pytorch.ViT`) in Flax linen, computing what each of its releases computes.

Architecture (vit-pytorch 1.26): patches flattened in `(p1 p2 c)` order, LayerNorm over the patch pixels,
Linear to `dim`, LayerNorm; a class token unless `pool='mean'`; a learned position table over all tokens;
`depth` pre-norm blocks whose attention has an inner width `heads * dim_head` (which may differ from
`dim`), no qkv bias and scale `dim_head ** -0.5`, and whose MLP is LayerNorm, Linear, exact GELU, Linear;
a final LayerNorm; `cls` (first token) or `mean` pooling; a Linear head. LayerNorm eps 1e-5 throughout.

Older releases are the same model with some parts switched, which the fields below name:
`patch_norm=False` (before 1.0: the patch embedding is the Linear alone), `final_norm='pooled'` (up to
1.2: no final norm over the tokens; `mlp_head = Sequential(LayerNorm, Linear)` norms the pooled vector,
which differs from the current order under mean pooling), `class_token=True` with `pool='mean'` (before 1.16:
the class token is kept and averaged with the patches).

Field names are vit-pytorch's (`dim`, `depth`, `heads`, `dim_head`, `mlp_dim`, `pool`, `dropout`,
`emb_dropout`), except `img_size`/`in_chans` (its `image_size`/`channels`), as everywhere in vit_flax.
Input NHWC. `num_classes=0` returns the pooled features (vit-pytorch returns the tokens there).

Inner modules spell vit-pytorch's one `dropout` as timm's `attn_drop_rate` (on the attention weights) and
`proj_drop_rate` (after the output projection and in the MLP): LucidViT passes it to both. `attn_impl`
(default 'auto') selects the attention implementation as in ViT (ops/attention.py; old names accepted
with a DeprecationWarning).

Parameter tree: `patch_embed/{pixel_norm, proj, norm}`, `cls` (1, 1, dim), `pos_embedding`
(1, prefix + patches, dim), `Transformer/layers_{i}/attn/{norm, query, key, value, out}` (Google's
(dim, heads, dim_head) kernels, so a Flax file records the heads; `out` is absent when vit-pytorch has no
output projection: heads == 1 and dim_head == dim), `Transformer/layers_{i}/ff/{norm, mlp/{Dense_0, Dense_1}}`,
`Transformer/norm`, `head_norm`, `head`. Intermediates as in `vit.py`: `Transformer/embed`,
`Transformer/block_{i}`, `Transformer/encoded`.
"""
from typing import Any, Literal, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl, dot_product_attention
from ..registry import register
from .layers import (LayerNorm, MlpBlock, PatchGrid, ProjectionParams, active_dropout, dense, dense_general,
                     fused_projection, merge_heads, split_heads, to_tuple)

Dtype = Any
EPS = 1e-5  # torch.nn.LayerNorm's default, used by every vit-pytorch norm


def _norm(dtype, name=None):
    return LayerNorm(epsilon=EPS, dtype=dtype, name=name)


class Attention(nn.Module):
    """vit-pytorch's `Attention`: LayerNorm, bias-free q/k/v to heads x dim_head, softmax, output projection."""
    heads: int
    dim_head: int
    project_out: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dim, heads = x.shape[-1], self.heads
        y = _norm(self.dtype, 'norm')(x)
        # one matmul for q, k, v (kernels concatenated at trace time, the tree keeps three), as vit.py does
        qkv = [ProjectionParams(features=(heads, self.dim_head), use_bias=False,
                                kernel_init=nn.initializers.lecun_normal(), name=n)(dim)
               for n in ('query', 'key', 'value')]
        q, k, v = split_heads(fused_projection(y, qkv, self.dtype), 3, heads, self.dtype, self.dim_head ** -0.5)
        drop = nn.Dropout(rate=self.attn_drop_rate)
        out = dot_product_attention(q, k, v, impl=self.attn_impl,
                                    dropout=active_dropout(drop, deterministic))  # (B, H, N, Dh)
        if not self.project_out:  # vit-pytorch's to_out is Identity: one head as wide as the model
            return merge_heads(out)
        out = dense_general(dim, (-2, -1), self.dtype, name='out')(out.transpose(0, 2, 1, 3))
        return nn.Dropout(rate=self.proj_drop_rate)(out, deterministic=deterministic)


class FeedForward(nn.Module):
    """vit-pytorch's `FeedForward`: LayerNorm, then Linear, GELU (exact), dropout, Linear, dropout."""
    mlp_dim: int
    proj_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        y = _norm(self.dtype, 'norm')(x)
        # MlpBlock's param names (Dense_0, Dense_1) and its bias init; vit-pytorch's init is torch's default
        return MlpBlock(mlp_dim=self.mlp_dim, drop_rate=self.proj_drop_rate, dtype=self.dtype, name='mlp')(
            y, deterministic)


class Block(nn.Module):
    """One of vit-pytorch's `transformer.layers`: x + attn(x), then x + ff(x) (each norms its input)."""
    heads: int
    dim_head: int
    mlp_dim: int
    project_out: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = x + Attention(heads=self.heads, dim_head=self.dim_head, project_out=self.project_out,
                          proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate, dtype=self.dtype,
                          attn_impl=self.attn_impl, name='attn')(x, deterministic)
        return x + FeedForward(mlp_dim=self.mlp_dim, proj_drop_rate=self.proj_drop_rate, dtype=self.dtype,
                               name='ff')(x, deterministic)


class PatchEmbed(nn.Module):
    """`to_patch_embedding`: (p1 p2 c)-ordered patch pixels -> [LayerNorm] -> Linear -> [LayerNorm]."""
    patch_size: Sequence[int]
    dim: int
    patch_norm: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        ph, pw = self.patch_size
        # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)' on NHWC input
        x = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, ph * pw * c)
        if self.patch_norm:
            x = _norm(self.dtype, 'pixel_norm')(x)
        x = dense(self.dim, self.dtype, name='proj')(x)
        return _norm(self.dtype, 'norm')(x) if self.patch_norm else x


class Transformer(nn.Module):
    """`transformer`: the blocks and, from release 1.4 on, the final norm over every token."""
    depth: int
    heads: int
    dim_head: int
    mlp_dim: int
    project_out: bool = True
    final_norm: bool = True
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        self.sow('intermediates', 'embed', x)
        for i in range(self.depth):
            x = Block(heads=self.heads, dim_head=self.dim_head, mlp_dim=self.mlp_dim, project_out=self.project_out,
                      proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate, dtype=self.dtype,
                      attn_impl=self.attn_impl, name=f'layers_{i}')(x, deterministic)
            self.sow('intermediates', f'block_{i}', x)
        if self.final_norm:
            x = _norm(self.dtype, 'norm')(x)
        self.sow('intermediates', 'encoded', x)
        return x


class LucidViT(PatchGrid, nn.Module):
    """vit-pytorch's `ViT` (any release from 0.6 on; see the module docstring for what changed)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 224
    patch_size: Union[int, Sequence[int]] = 16
    in_chans: int = 3
    dim: int = 768
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    mlp_dim: int = 3072
    pool: Literal['cls', 'mean'] = 'cls'
    class_token: Optional[bool] = None   # None: pool == 'cls' (releases >= 1.16); True with 'mean': older ones
    patch_norm: bool = True              # the LayerNorms around the patch Linear (releases >= 1.0)
    final_norm: Literal['tokens', 'pooled'] = 'tokens'  # 'tokens': transformer.norm (>= 1.4); 'pooled': mlp_head's (<= 1.2)
    dropout: float = 0.0
    emb_dropout: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: AttnImpl = 'auto'  # the attention kernel (module docstring)

    # -- derived configuration (plain properties so they work on unbound modules too) --
    @property
    def has_class_token(self) -> bool:
        return self.pool == 'cls' if self.class_token is None else self.class_token

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.has_class_token)

    @property
    def num_features(self) -> int:
        return self.dim

    @property
    def project_out(self) -> bool:
        return not (self.heads == 1 and self.dim_head == self.dim)

    def setup(self):
        if self.pool not in ('cls', 'mean'):
            raise ModelConfigError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
        if self.pool == 'cls' and not self.has_class_token:
            raise ModelConfigError("pool='cls' needs the class token")
        if self.final_norm not in ('tokens', 'pooled'):
            raise ModelConfigError(f"final_norm must be 'tokens' or 'pooled', got {self.final_norm!r}")
        check_impl(self.attn_impl)
        img = to_tuple(self.img_size, 2)
        if any(i % p for i, p in zip(img, self.patch_size_tuple)):   # vit-pytorch asserts the same
            raise ModelConfigError(f'img_size {self.img_size} is not a multiple of the patch {self.patch_size}: '
                                   f'vit-pytorch\'s ViT takes only whole patches')
        self.patch_embed = PatchEmbed(patch_size=self.patch_size_tuple, dim=self.dim, patch_norm=self.patch_norm,
                                      dtype=self.dtype)
        if self.has_class_token:
            self.cls = self.param('cls', nn.initializers.normal(1.0), (1, 1, self.dim))
        n = self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens
        self.pos_embedding = self.param('pos_embedding', nn.initializers.normal(1.0), (1, n, self.dim))
        self.emb_drop = nn.Dropout(rate=self.emb_dropout)
        self.Transformer = Transformer(depth=self.depth, heads=self.heads, dim_head=self.dim_head, mlp_dim=self.mlp_dim,
                                       project_out=self.project_out, final_norm=self.final_norm == 'tokens',
                                       proj_drop_rate=self.dropout, attn_drop_rate=self.dropout, dtype=self.dtype,
                                       attn_impl=self.attn_impl)
        if self.final_norm == 'pooled':
            self.head_norm = _norm(self.dtype)
        if self.num_classes > 0:
            self.head = dense(self.num_classes, self.dtype)

    def forward_features(self, x, train: bool = False):
        """Images -> tokens (B, prefix + patches, dim), normed when `final_norm='tokens'`."""
        if tuple(x.shape[1:]) != self.input_shape:
            raise ModelConfigError(f"input shape {tuple(x.shape[1:])} does not match the model's {self.input_shape} "
                                   f'(set img_size/in_chans when creating the model)')
        x = self.patch_embed(x.astype(self.dtype))
        if self.has_class_token:
            x = jnp.concatenate([jnp.broadcast_to(self.cls.astype(x.dtype), (x.shape[0], 1, self.dim)), x], axis=1)
        x = self.emb_drop(x + self.pos_embedding.astype(x.dtype), deterministic=not train)
        return self.Transformer(x, deterministic=not train)

    def forward_head(self, x, train: bool = False, pre_logits: bool = False):
        """Tokens -> pooled (the mean runs over every token, a class token included) -> [norm] -> head."""
        x = x.mean(axis=1) if self.pool == 'mean' else x[:, 0]
        if self.final_norm == 'pooled':
            x = self.head_norm(x)
        if pre_logits or self.num_classes == 0:
            return x
        return self.head(x)

    def __call__(self, x, train: bool = False):
        return self.forward_head(self.forward_features(x, train), train)


def _lucid(name, **cfg):
    register(name, LucidViT, **cfg)


# vit-pytorch has no named models: these are ViT's sizes with its default dim_head=64 (heads x 64 = dim),
# and the model of its README's usage example. Any other configuration is one override away.
for _size, _dim, _depth, _heads in [('tiny', 192, 12, 3), ('small', 384, 12, 6), ('base', 768, 12, 12),
                                    ('large', 1024, 24, 16)]:
    _lucid(f'lucid_vit_{_size}_patch16_224', img_size=224, patch_size=16, dim=_dim, depth=_depth, heads=_heads,
           dim_head=64, mlp_dim=4 * _dim)
_lucid('lucid_vit_readme_patch32_256', img_size=256, patch_size=32, dim=1024, depth=6, heads=16, dim_head=64,
       mlp_dim=2048)
