"""NaFlex ViT (SigLIP 2 NaFlex, timm's `naflexvit`) in Flax linen: patches of any count and aspect ratio up to a
sequence budget, a padding mask through attention and pooling, the position table resized per image.

Inputs. `model.apply(v, images, train=False)` takes NHWC images of one size (timm's "standard mode": their
patch grid is static), or, NaFlex mode, `model.apply(v, patches, patch_coord=coord, patch_valid=valid)` with
`patches` (B, L, P*P*C) flattened (ph, pw, C) as big_vision's `patchify` / timm's `batch_patchify` /
transformers' Siglip2ImageProcessor lay them out, `patch_coord` (B, L, 2) int (y, x) patch coordinates and
`patch_valid` (B, L) bool (False: padding). One jitted call takes a batch of images of mixed aspect ratios:
`naflex_inputs(images, patch, max_seq_len)` builds the three arrays from a list of HWC images, each resized
to fit the budget at its aspect ratio (`size_for_sequence`, transformers' and big_vision's binary search).

Positions. A learned table (gh, gw, D) (`pos_embedding`, timm `embeds.pos_embed` (1, gh, gw, D)) is resized per
image to that image's grid (h, w) = max(coords of its valid patches) + 1 and read at each patch's (y, x):
big_vision gathers by coordinates (so does this model), timm and transformers add the resized table in
row-major order, the same for row-major patches. The resize is torch's `F.interpolate` as timm calls it
(`pos_embed_interp_mode` 'bilinear' or 'bicubic', `pos_embed_antialias`, `pos_embed_align_corners`), which
for bilinear + antialias is also big_vision's `jax.image.scale_and_translate` and transformers' Siglip2: one
separable weight row per axis computed from the traced grid size (no shape depends on the data, so a batch of
grids jits once), then sum_ij wy[i] wx[j] table[i, j]. `pos_embed_ar_preserving` resizes to (L, L), L =
max(h, w), and crops (timm). 'factorized' (timm): two tables `pos_embedding_y` (gh, D), `pos_embedding_x`
(gw, D), each resized linearly (no antialias) and added.

Tree: big_vision's naflex_vit (`embedding` Dense (P*P*C, D), `pos_embedding` (gh, gw, D), `Transformer/
encoderblock_{i}/...` and `Transformer/encoder_norm` as a ViT's, `MAPHead_0`, `head`), so that its `.npz` is
this model's own state; timm's extras under ViT's names: `cls`, `reg`, `LayerScale_{0,1}/scale`, `pool_norm`
(fc_norm).

Mask: the padding tokens are left out as keys of every attention (timm masks them as queries too; that changes
only the padding tokens' own outputs, which nothing reads) and of the pooling: the MAP head's keys, 'avg' /
'max' / 'avgmax' over the valid patch tokens (prefix tokens excluded, timm's `pool_include_prefix=False`).

Intermediates (`mutable=['intermediates']`): `Transformer/embed` (tokens with positions and prefix),
`Transformer/block_{i}`, `Transformer/encoded`.
"""
import math
from typing import Any, List, Literal, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..errors import ModelConfigError
from ..ops.attention import AttnImpl, check_impl
from ..registry import register
from .layers import dense, drop_path_rates, to_tuple
from .layers import norm_layer as make_norm
from .vit import Encoder1DBlock, MAPHead

Dtype = Any


# ---------------------------------------------------------------- resizing weights (torch's F.interpolate)

def _cubic(x, a):
    x = jnp.abs(x)
    return jnp.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                     jnp.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0))


def resize_weights(out_index, out_size, in_size: int, mode: str = 'bilinear', antialias: bool = True,
                   align_corners: bool = False):
    """The weights (..., in_size) with which torch's `F.interpolate(mode, antialias, align_corners)` of a length
    `in_size` axis to `out_size` makes its entry `out_index` (both int arrays of the same shape, traced or not).

    Half-pixel centres (align_corners=False): source = (o + 0.5) * in / out - 0.5; with antialias the kernel is
    stretched by in/out when shrinking (torch's `_upsample_*_aa`, PIL's, and `jax.image.scale_and_translate`'s);
    the weights are normalised over the taps inside the input (torch's aa kernels; for bilinear without
    antialias this is torch's clamp at the border). Bicubic with antialias is Keys' a = -0.5 (torch's aa and
    jax's); bicubic without antialias (torch's a = -0.75, unnormalised) is not built."""
    if mode not in ('bilinear', 'bicubic', 'linear'):
        raise ModelConfigError(f"pos_embed_interp_mode must be 'bilinear' or 'bicubic', got {mode!r}")
    if mode == 'bicubic' and not antialias:
        raise ModelConfigError('bicubic position resizing without antialias is not built (no timm naflexvit uses it)')
    if align_corners and antialias:
        raise ModelConfigError('pos_embed_align_corners with antialias is not built (no timm naflexvit uses it)')
    o = jnp.asarray(out_index, jnp.float32)[..., None]
    out = jnp.asarray(out_size, jnp.float32)[..., None]
    j = jnp.arange(in_size, dtype=jnp.float32)
    if align_corners:
        src = jnp.where(out > 1, o * (in_size - 1) / jnp.maximum(out - 1, 1), 0.0)
        stretch = 1.0
    else:
        src = (o + 0.5) * in_size / out - 0.5
        stretch = jnp.maximum(in_size / out, 1.0) if antialias else 1.0
    d = (j - src) / stretch
    w = _cubic(d, -0.5) if mode == 'bicubic' else jnp.maximum(0.0, 1.0 - jnp.abs(d))
    return w / jnp.sum(w, axis=-1, keepdims=True)


# ---------------------------------------------------------------- inputs

def size_for_sequence(height: int, width: int, patch: Union[int, Sequence[int]], max_seq_len: int,
                      eps: float = 1e-5) -> Tuple[int, int]:
    """The (H, W), multiples of the patch, at which an image of `height` x `width` fills at most `max_seq_len`
    patches, its aspect ratio kept as closely as that allows: the binary search over the scale of big_vision's
    `resize_to_sequence` and transformers' `get_image_size_for_max_num_patches` (each side at least a patch)."""
    ph, pw = to_tuple(patch, 2)

    def scaled(scale):
        h = max(ph, int(math.ceil(height * scale / ph) * ph))
        w = max(pw, int(math.ceil(width * scale / pw) * pw))
        return h, w

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        h, w = scaled(mid)
        if (h // ph) * (w // pw) <= max_seq_len:
            lo = mid
        else:
            hi = mid
    return scaled(lo)


def patchify(image, patch: Union[int, Sequence[int]]):
    """An (H, W, C) image (H, W multiples of the patch) -> (patches (n, ph*pw*C) flattened (ph, pw, C),
    coords (n, 2) int32 (y, x)), row-major: big_vision's `patchify`, timm's `batch_patchify`."""
    ph, pw = to_tuple(patch, 2)
    image = np.asarray(image)
    h, w, c = image.shape
    if h % ph or w % pw:
        raise ModelConfigError(f'image {h}x{w} is not a multiple of the patch {ph}x{pw}')
    nh, nw = h // ph, w // pw
    patches = image.reshape(nh, ph, nw, pw, c).transpose(0, 2, 1, 3, 4).reshape(nh * nw, ph * pw * c)
    yy, xx = np.meshgrid(np.arange(nh), np.arange(nw), indexing='ij')
    return patches, np.stack([yy.reshape(-1), xx.reshape(-1)], axis=-1).astype(np.int32)


def naflex_inputs(images: List[np.ndarray], patch: Union[int, Sequence[int]], max_seq_len: int):
    """A batch of (H, W, C) images whose sides are multiples of the patch (`size_for_sequence` gives such
    sizes) -> dict(patches (B, max_seq_len, ph*pw*C) float32, patch_coord (B, max_seq_len, 2) int32,
    patch_valid (B, max_seq_len) bool): each image's patches row-major, then zero padding (coords 0, invalid),
    as timm's NaFlex collator and transformers' Siglip2ImageProcessor pad."""
    out_p, out_c, out_v = [], [], []
    for im in images:
        p, c = patchify(im, patch)
        n = p.shape[0]
        if n > max_seq_len:
            raise ModelConfigError(f'an image of {n} patches exceeds max_seq_len={max_seq_len}')
        out_p.append(np.pad(p.astype(np.float32), ((0, max_seq_len - n), (0, 0))))
        out_c.append(np.pad(c, ((0, max_seq_len - n), (0, 0))))
        out_v.append(np.arange(max_seq_len) < n)
    return dict(patches=np.stack(out_p), patch_coord=np.stack(out_c), patch_valid=np.stack(out_v))


# ---------------------------------------------------------------- the model

class NaFlexVit(nn.Module):
    """timm's NaFlexVit (the standard-Block configurations its 14 `naflexvit_*` names use) and big_vision's
    SigLIP 2 NaFlex image tower. Output: logits, or pooled features with `num_classes=0`.

    Fields under timm's `NaFlexVitCfg` names and defaults (module docstring for the positions and the mask);
    `img_size` is only the size of the standard-mode input (timm's default_cfg input_size), `max_seq_len` the
    sequence budget `predict` and `naflex_inputs` fill (timm trains these names at 576, SigLIP 2 serves 256)."""
    num_classes: int = 1000
    img_size: Union[int, Sequence[int]] = 384
    patch_size: Union[int, Sequence[int]] = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_dim: Optional[int] = None   # the MLP width when given (a checkpoint's), else int(embed_dim * mlp_ratio)
    qkv_bias: bool = True
    init_values: Optional[float] = None
    class_token: bool = False
    reg_tokens: int = 0
    pos_embed: Literal['learned', 'factorized', 'none'] = 'learned'
    pos_embed_grid_size: Tuple[int, int] = (16, 16)
    pos_embed_interp_mode: Literal['bilinear', 'bicubic'] = 'bicubic'
    pos_embed_ar_preserving: bool = False
    pos_embed_antialias: bool = True
    pos_embed_align_corners: bool = False
    global_pool: Literal['token', 'avg', 'avgmax', 'max', 'map', ''] = 'map'
    fc_norm: Optional[bool] = None
    final_norm: bool = True
    act_layer: Literal['gelu', 'gelu_tanh'] = 'gelu'
    norm_eps: float = 1e-6
    max_seq_len: int = 576
    drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: AttnImpl = 'auto'

    # -- derived configuration (plain properties so they work on unbound modules too)
    @property
    def patch_size_tuple(self):
        return to_tuple(self.patch_size, 2)

    @property
    def grid_size(self):
        return tuple(i // p for i, p in zip(to_tuple(self.img_size, 2), self.patch_size_tuple))

    @property
    def input_shape(self):
        return tuple(to_tuple(self.img_size, 2)) + (self.in_chans,)

    @property
    def has_class_token(self) -> bool:
        return bool(self.class_token)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.reg_tokens)

    @property
    def activation(self) -> str:
        """timm's name of the MLP activation ('gelu' exact, 'gelu_tanh')."""
        return self.act_layer

    @property
    def gelu(self) -> str:
        """The GELU's form as ViT's `gelu` field names it: 'exact' or 'tanh'."""
        return {'gelu': 'exact', 'gelu_tanh': 'tanh'}[self.act_layer]

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == 'avg' if self.fc_norm is None else bool(self.fc_norm)

    @property
    def pool_type(self) -> str:
        return self.global_pool

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_dim or int(self.embed_dim * self.mlp_ratio)

    @property
    def num_features(self) -> int:
        return self.embed_dim

    def _check(self):
        if self.embed_dim % self.num_heads:
            raise ModelConfigError(f'embed_dim {self.embed_dim} is not divisible by {self.num_heads} heads')
        if self.global_pool == 'token' and not self.class_token:
            raise ModelConfigError("global_pool='token' needs the class token (class_token=True)")
        if self.pos_embed == 'learned':
            resize_weights(0, 1, 1, self.pos_embed_interp_mode, self.pos_embed_antialias,
                           self.pos_embed_align_corners)
        check_impl(self.attn_impl)

    @nn.compact
    def __call__(self, x, train: bool = False, patch_coord=None, patch_valid=None, pre_logits: bool = False):
        self._check()
        ph, pw = self.patch_size_tuple
        dim = self.embed_dim
        if patch_coord is None:   # standard mode: NHWC images of one size
            if x.ndim != 4 or x.shape[-1] != self.in_chans or x.shape[1] % ph or x.shape[2] % pw:
                raise ModelConfigError(f'input shape {tuple(x.shape[1:])}: this model takes (H, W, {self.in_chans}) '
                                       f'images with sides multiples of the patch {(ph, pw)}, or patches with '
                                       f'patch_coord and patch_valid')
            b, h, w, c = x.shape
            nh, nw = h // ph, w // pw
            x = x.reshape(b, nh, ph, nw, pw, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * nw, ph * pw * c)
            yy, xx = np.meshgrid(np.arange(nh), np.arange(nw), indexing='ij')
            coord = jnp.asarray(np.stack([yy.reshape(-1), xx.reshape(-1)], -1)[None], jnp.int32)
            coord = jnp.broadcast_to(coord, (b,) + coord.shape[1:])
            valid = None
            grid = jnp.broadcast_to(jnp.asarray([nh, nw], jnp.int32), (b, 2))
        else:
            if x.ndim != 3 or x.shape[-1] != ph * pw * self.in_chans:
                raise ModelConfigError(f'patches of shape {tuple(x.shape)}: want (B, L, {ph * pw * self.in_chans}) '
                                       f'(patch {(ph, pw)} x {self.in_chans} channels, flattened (ph, pw, C))')
            if patch_valid is None:
                raise ModelConfigError('NaFlex patches need patch_valid (B, L) beside patch_coord')
            coord = jnp.asarray(patch_coord, jnp.int32)
            valid = jnp.asarray(patch_valid).astype(bool)
            grid = jnp.max(jnp.where(valid[..., None], coord, 0), axis=1) + 1   # (B, 2): each image's (h, w)
        stream = jnp.promote_types(self.dtype, jnp.float32)
        x = dense(dim, self.dtype, name='embedding')(x.astype(self.dtype)).astype(stream)
        x = x + self.positions(coord, grid).astype(stream)
        prefix = []
        if self.class_token:
            prefix.append(self.param('cls', nn.initializers.normal(stddev=1e-6), (1, 1, dim)))
        if self.reg_tokens:
            prefix.append(self.param('reg', nn.initializers.normal(stddev=1e-6), (1, self.reg_tokens, dim)))
        if prefix:
            tokens = jnp.concatenate(prefix, axis=1).astype(stream)
            x = jnp.concatenate([jnp.broadcast_to(tokens, (x.shape[0],) + tokens.shape[1:]), x], axis=1)
        n_prefix = self.num_prefix_tokens
        keys = None
        if valid is not None:
            keys = jnp.concatenate([jnp.ones((x.shape[0], n_prefix), bool), valid], axis=1)[:, None, None, :]
        x = nn.Dropout(rate=self.proj_drop_rate)(x, deterministic=not train)
        x = NaFlexEncoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_hidden,
                          qkv_bias=self.qkv_bias, init_values=self.init_values, gelu=self.activation,
                          norm_eps=self.norm_eps, proj_drop_rate=self.proj_drop_rate,
                          attn_drop_rate=self.attn_drop_rate, drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                          attn_impl=self.attn_impl, final_norm=self.final_norm and not self.use_fc_norm,
                          name='Transformer')(x, keys, deterministic=not train)
        x = self.pool(x, valid, train)
        if self.final_norm and self.use_fc_norm:
            x = make_norm('layernorm', self.norm_eps, self.dtype, name='pool_norm')(x)
        if pre_logits or self.num_classes == 0:
            return x
        x = nn.Dropout(rate=self.drop_rate)(x, deterministic=not train)
        return dense(self.num_classes, self.dtype, name='head', kernel_init=nn.initializers.zeros)(x)

    def positions(self, coord, grid):
        """(B, L, D) float32 position embeddings of patches at `coord` (B, L, 2) in images of `grid` (B, 2)."""
        dim = self.embed_dim
        gh, gw = self.pos_embed_grid_size
        if self.pos_embed == 'none':
            return jnp.zeros(coord.shape[:2] + (dim,), jnp.float32)
        out = jnp.max(grid, axis=-1, keepdims=True) if self.pos_embed_ar_preserving else grid   # (B, 2) or (B, 1)
        out_y, out_x = (out[:, :1], out[:, :1]) if self.pos_embed_ar_preserving else (out[:, :1], out[:, 1:])
        hi = jax.lax.Precision.HIGHEST
        if self.pos_embed == 'factorized':
            ty = self.param('pos_embedding_y', nn.initializers.normal(stddev=0.02), (gh, dim)).astype(jnp.float32)
            tx = self.param('pos_embedding_x', nn.initializers.normal(stddev=0.02), (gw, dim)).astype(jnp.float32)
            wy = resize_weights(coord[..., 0], out_y, gh, 'linear', antialias=False)
            wx = resize_weights(coord[..., 1], out_x, gw, 'linear', antialias=False)
            return jnp.einsum('bni,id->bnd', wy, ty, precision=hi) + jnp.einsum('bnj,jd->bnd', wx, tx, precision=hi)
        table = self.param('pos_embedding', nn.initializers.normal(stddev=0.02), (gh, gw, dim)).astype(jnp.float32)
        kw = dict(mode=self.pos_embed_interp_mode, antialias=self.pos_embed_antialias,
                  align_corners=self.pos_embed_align_corners)
        wy = resize_weights(coord[..., 0], out_y, gh, **kw)
        wx = resize_weights(coord[..., 1], out_x, gw, **kw)
        rows = jnp.einsum('bni,ijd->bnjd', wy, table, precision=hi)
        return jnp.einsum('bnj,bnjd->bnd', wx, rows, precision=hi)

    def pool(self, x, valid, train: bool = False):
        """Normed tokens -> pooled features over the valid patch tokens (module docstring)."""
        kind = self.global_pool
        if kind == 'token':
            return x[:, 0]
        if kind == '':
            return x
        patches = x[:, self.num_prefix_tokens:]
        if kind == 'map':
            mask = None if valid is None else valid[:, None, None, :]
            return MAPHead(num_heads=self.num_heads, mlp_dim=self.mlp_hidden, gelu=self.activation,
                           norm_eps=self.norm_eps, dtype=self.dtype, attn_impl=self.attn_impl,
                           name='MAPHead_0')(patches, deterministic=not train, mask=mask)
        m = jnp.ones(patches.shape[:2], patches.dtype) if valid is None else valid.astype(patches.dtype)
        mean = jnp.sum(patches * m[..., None], axis=1) / jnp.maximum(jnp.sum(m, axis=1, keepdims=True), 1)
        big = jnp.where(m[..., None] > 0, patches, jnp.finfo(patches.dtype).min).max(axis=1)
        return {'avg': mean, 'max': big, 'avgmax': 0.5 * (mean + big)}[kind]


class NaFlexEncoder(nn.Module):
    """The blocks and the final norm (`Transformer/encoderblock_{i}`, `Transformer/encoder_norm`: a ViT's and
    big_vision's names), every attention masked by `keys` (B, 1, 1, N) (None: no padding)."""
    depth: int
    num_heads: int
    mlp_dim: int
    qkv_bias: bool = True
    init_values: Optional[float] = None
    gelu: str = 'exact'
    norm_eps: float = 1e-6
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Dtype = jnp.float32
    attn_impl: str = 'auto'
    final_norm: bool = True

    @nn.compact
    def __call__(self, x, keys=None, deterministic: bool = True):
        self.sow('intermediates', 'embed', x)
        for i, rate in enumerate(drop_path_rates(self.drop_path_rate, self.depth)):
            x = Encoder1DBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, qkv_bias=self.qkv_bias,
                               proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                               drop_path_rate=rate, gelu=self.gelu, norm_eps=self.norm_eps, dtype=self.dtype,
                               attn_impl=self.attn_impl, init_values=self.init_values,
                               name=f'encoderblock_{i}')(x, deterministic, mask=keys)
            self.sow('intermediates', f'block_{i}', x)
        if self.final_norm:
            x = make_norm('layernorm', self.norm_eps, self.dtype, name='encoder_norm')(x)
        self.sow('intermediates', 'encoded', x)
        return x


# ---------------------------------------------------------------- timm's 14 naflexvit names

def _naflex(name, **cfg):
    register(name, NaFlexVit, **cfg)


_B = dict(embed_dim=768, depth=12, num_heads=12)
_SO150 = dict(embed_dim=832, depth=21, num_heads=13, mlp_ratio=34 / 13, qkv_bias=False, init_values=1e-5, reg_tokens=1)
_naflex('naflexvit_base_patch16_gap', **_B, init_values=1e-5, global_pool='avg', reg_tokens=4, fc_norm=True)
_naflex('naflexvit_base_patch16_par_gap', **_B, init_values=1e-5, pos_embed_ar_preserving=True, global_pool='avg',
        reg_tokens=4, fc_norm=True)
_naflex('naflexvit_base_patch16_parfac_gap', **_B, init_values=1e-5, pos_embed_ar_preserving=True,
        pos_embed='factorized', global_pool='avg', reg_tokens=4, fc_norm=True)
_naflex('naflexvit_base_patch16_map', **_B, init_values=1e-5, global_pool='map', reg_tokens=1)
_naflex('naflexvit_so150m2_patch16_reg1_gap', **_SO150, global_pool='avg', fc_norm=True)
_naflex('naflexvit_so150m2_patch16_reg1_map', **_SO150, global_pool='map')
# SigLIP 2 NaFlex towers (big_vision's; timm's default weights are headless)
_SIGLIP = dict(act_layer='gelu_tanh', global_pool='map', pos_embed_interp_mode='bilinear', num_classes=0,
               max_seq_len=256)
_naflex('naflexvit_base_patch16_siglip', **_B, **_SIGLIP)
_naflex('naflexvit_so400m_patch16_siglip', embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, **_SIGLIP)
# NVIDIA C-RADIO backbones: a 128x128 table, bilinear without antialias, aspect preserved, class token pooling
_RADIO = dict(class_token=True, global_pool='token', final_norm=False, pos_embed_grid_size=(128, 128),
              pos_embed_interp_mode='bilinear', pos_embed_ar_preserving=True, pos_embed_antialias=False,
              num_classes=0, img_size=512)
_naflex('naflexvit_base_patch16_radio_v3', **_B, **_RADIO, init_values=1e-5, reg_tokens=7,
        pos_embed_align_corners=True)
_naflex('naflexvit_large_patch16_radio_v3', embed_dim=1024, depth=24, num_heads=16, **_RADIO, init_values=1e-5,
        reg_tokens=7)
_naflex('naflexvit_huge_patch16_radio_v3', embed_dim=1280, depth=32, num_heads=16, **_RADIO, reg_tokens=7,
        pos_embed_align_corners=True)
_naflex('naflexvit_giant_patch16_radio_v3', embed_dim=1536, depth=40, num_heads=24, **_RADIO, reg_tokens=7)
_naflex('naflexvit_so400m_patch16_radio_v4', embed_dim=1152, depth=27, num_heads=16, mlp_ratio=4304 / 1152,
        **_RADIO, reg_tokens=9)
_naflex('naflexvit_huge_patch16_radio_v4', embed_dim=1280, depth=32, num_heads=16, **_RADIO, reg_tokens=9)
