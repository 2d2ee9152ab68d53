"""WZMIAOMIAO's PyTorch code re-implemented for the tests: the ViT and Swin classes (and the data split) of
https://github.com/WZMIAOMIAO/deep-learning-for-image-processing, a blog series' code that is not a package.

That repository is GPL-3.0: nothing here is copied from it. These are our own implementations of the same
module names, state_dict keys, forward computation and quirks, checked against its files at commit
2ecf2eea2b97777bb18fe9ff458292fde5a92b7e (where `vit_model.py` last changed in 578eff1d, `swin_transformer/
model.py` in 6ee8067a, `vision_transformer/utils.py` in 9508fd25):
- `pytorch_classification/vision_transformer/vit_model.py` -> `VisionTransformer` below: the same module
  names, state_dict keys and forward computation (its `embed_layer` is built without `norm_layer`, so a
  2-D file has no `patch_embed.norm`; `pre_logits` = Linear + Tanh only when not distilled; the distilled
  eval output is the mean of both heads).
- the 1-D ViT of the same blog series (not in that repository; described in the project's REFERENCE.md):
  `vit_model.py` with `PatchEmbed.proj = Conv1d(C, D, P, stride=P)` over (B, C, L), and the model passes its
  `norm_layer` (LayerNorm eps 1e-6) to the patch embedding -> `VisionTransformer1D`.
- `pytorch_classification/swin_transformer/model.py` -> `SwinTransformer` below, quirks included: the window
  is never clamped and the shift never dropped (every odd block shifts by window // 2, even on a 7x7
  stage), `relative_position_index` is a saved buffer, the -100 mask is built in forward (no `attn_mask` in
  the state_dict), the feature map is padded *before* the cyclic shift, patch merging sits at the end of a
  stage, and the head is a plain `head` Linear.
- `pytorch_classification/vision_transformer/utils.py` `read_split_data` -> `read_split_data` below: the
  train/val split of a class-per-folder data set and its class_indices.json text (without its prints, plots
  and file writes).
Dropout and drop path are left out: the tests run these classes in eval mode only.
"""
import json
import os
import random
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- vit_model.py

class PatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_c=3, embed_dim=768, norm_layer=None):
        super().__init__()
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class PatchEmbed1D(nn.Module):
    """The 1-D blog variant: (B, C, L) signals, a strided Conv1d, then the model's norm layer."""
    def __init__(self, img_size=1024, patch_size=16, in_c=1, embed_dim=768, norm_layer=None):
        super().__init__()
        self.num_patches = img_size // patch_size
        self.proj = nn.Conv1d(in_c, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).transpose(1, 2))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_c=3, num_classes=1000, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None, representation_size=None,
                 distilled=False, embed_layer=PatchEmbed):
        super().__init__()
        self.num_features = embed_dim
        self.num_tokens = 2 if distilled else 1
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = self._patch_embed(embed_layer, img_size, patch_size, in_c, embed_dim, norm_layer)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, norm_layer)
                                      for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        if representation_size and not distilled:
            self.num_features = representation_size
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module('fc', nn.Linear(embed_dim, representation_size))
            self.pre_logits.add_module('act', nn.Tanh())
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = None
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _patch_embed(self, embed_layer, img_size, patch_size, in_c, embed_dim, norm_layer):
        return embed_layer(img_size=img_size, patch_size=patch_size, in_c=in_c, embed_dim=embed_dim)

    def forward_features(self, x):
        x = self.patch_embed(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1)
        if self.dist_token is None:
            x = torch.cat((cls_token, x), dim=1)
        else:
            x = torch.cat((cls_token, self.dist_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.pre_logits(x[:, 0]) if self.dist_token is None else (x[:, 0], x[:, 1])

    def forward(self, x):
        x = self.forward_features(x)
        if self.head_dist is not None:
            x, x_dist = self.head(x[0]), self.head_dist(x[1])
            return (x, x_dist) if self.training else (x + x_dist) / 2
        return self.head(x)


class VisionTransformer1D(VisionTransformer):
    """The 1-D ViT: as above, but the patch embedding is `PatchEmbed1D` and receives the model's norm layer."""
    def __init__(self, **kw):
        super().__init__(embed_layer=PatchEmbed1D, **kw)

    def _patch_embed(self, embed_layer, img_size, patch_size, in_c, embed_dim, norm_layer):
        return embed_layer(img_size=img_size, patch_size=patch_size, in_c=in_c, embed_dim=embed_dim,
                           norm_layer=norm_layer)


# ---------------------------------------------------------------- swin_transformer/model.py

def window_partition(x, w):
    b, h, wd, c = x.shape
    x = x.view(b, h // w, w, wd // w, w, c)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, w, w, c)


def window_reverse(windows, w, h, wd):
    b = int(windows.shape[0] / (h * wd / w / w))
    x = windows.view(b, h // w, wd // w, w, w, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, h, wd, -1)


class SwinPatchEmbed(nn.Module):
    def __init__(self, patch_size=4, in_c=3, embed_dim=96, norm_layer=None):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_c, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        _, _, h, w = x.shape
        p = self.patch_size
        if h % p[0] or w % p[1]:  # WZMIAOMIAO's code pads a whole patch on an axis that needs none (kept as is)
            x = F.pad(x, (0, p[1] - w % p[1], 0, p[0] - h % p[0], 0, 0))
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class PatchMerging(nn.Module):
    def __init__(self, dim, norm_layer=nn.LayerNorm):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x, h, w):
        b, _, c = x.shape
        x = x.view(b, h, w, c)
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class WindowAttention(nn.Module):
    def __init__(self, dim, window_size, num_heads, qkv_bias=True):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        coords = torch.stack(torch.meshgrid([torch.arange(wh), torch.arange(ww)], indexing='ij')).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += wh - 1
        rel[:, :, 1] += ww - 1
        rel[:, :, 0] *= 2 * ww - 1
        self.register_buffer('relative_position_index', rel.sum(-1))  # persistent: saved in the state_dict
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        b_, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b_, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(b_ // nw, nw, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b_, n, c))


class SwinTransformerBlock(nn.Module):
    def __init__(self, dim, num_heads, window_size=7, shift_size=0, mlp_ratio=4., qkv_bias=True):
        super().__init__()
        self.window_size, self.shift_size = window_size, shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, (window_size, window_size), num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # the Swin file's Mlp: the same keys, its dropouts left out

    def forward(self, x, attn_mask):
        h, w, ws = self.H, self.W, self.window_size
        b, _, c = x.shape
        shortcut = x
        x = self.norm1(x).view(b, h, w, c)
        pad_r, pad_b = (ws - w % ws) % ws, (ws - h % ws) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))  # padded first, shifted after
        _, hp, wp, _ = x.shape
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        else:
            attn_mask = None
        windows = self.attn(window_partition(x, ws).view(-1, ws * ws, c), mask=attn_mask)
        x = window_reverse(windows.view(-1, ws, ws, c), ws, hp, wp)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :h, :w, :].contiguous().view(b, h * w, c)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class BasicLayer(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size, mlp_ratio=4., qkv_bias=True, downsample=None):
        super().__init__()
        self.window_size, self.shift_size = window_size, window_size // 2  # never clamped
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size, 0 if i % 2 == 0 else self.shift_size, mlp_ratio, qkv_bias)
            for i in range(depth)])
        self.downsample = downsample(dim=dim) if downsample is not None else None

    def create_mask(self, x, h, w):
        ws, ss = self.window_size, self.shift_size
        hp, wp = int(np.ceil(h / ws)) * ws, int(np.ceil(w / ws)) * ws
        img_mask = torch.zeros((1, hp, wp, 1))
        cnt = 0
        for hs in (slice(0, -ws), slice(-ws, -ss), slice(-ss, None)):
            for wsl in (slice(0, -ws), slice(-ws, -ss), slice(-ss, None)):
                img_mask[:, hs, wsl, :] = cnt
                cnt += 1
        mw = window_partition(img_mask, ws).view(-1, ws * ws)
        mask = mw.unsqueeze(1) - mw.unsqueeze(2)
        return mask.masked_fill(mask != 0, float(-100.0)).masked_fill(mask == 0, float(0.0))

    def forward(self, x, h, w):
        attn_mask = self.create_mask(x, h, w)
        for blk in self.blocks:
            blk.H, blk.W = h, w
            x = blk(x, attn_mask)
        if self.downsample is not None:
            x = self.downsample(x, h, w)
            h, w = (h + 1) // 2, (w + 1) // 2
        return x, h, w


class SwinTransformer(nn.Module):
    def __init__(self, patch_size=4, in_chans=3, num_classes=1000, embed_dim=96, depths=(2, 2, 6, 2),
                 num_heads=(3, 6, 12, 24), window_size=7, mlp_ratio=4., qkv_bias=True):
        super().__init__()
        self.num_layers = len(depths)
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.patch_embed = SwinPatchEmbed(patch_size, in_chans, embed_dim, nn.LayerNorm)
        self.layers = nn.ModuleList([
            BasicLayer(int(embed_dim * 2 ** i), depths[i], num_heads[i], window_size, mlp_ratio, qkv_bias,
                       PatchMerging if i < self.num_layers - 1 else None)
            for i in range(self.num_layers)])
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        x, h, w = self.patch_embed(x)
        for layer in self.layers:
            x, h, w = layer(x, h, w)
        return self.head(torch.flatten(self.avgpool(self.norm(x).transpose(1, 2)), 1))


# ---------------------------------------------------------------- vision_transformer/utils.py

def read_split_data(root, val_rate=0.2):
    """(train paths, train labels, val paths, val labels, class_indices.json text) as WZMIAOMIAO's
    `read_split_data` splits a folder of one subfolder per class: `random` seeded with 0 once, classes in
    sorted order; per class, its .jpg/.JPG/.png/.PNG files sorted, `random.sample` of int(n * val_rate) of
    them for validation, and both lists in that sorted order. The JSON maps index -> name, indent 4."""
    random.seed(0)
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    split = ([], [], [], [])
    for label, name in enumerate(names):
        files = sorted(os.path.join(root, name, f) for f in os.listdir(os.path.join(root, name))
                       if os.path.splitext(f)[-1] in ('.jpg', '.JPG', '.png', '.PNG'))
        val = set(random.sample(files, k=int(len(files) * val_rate)))
        for path in files:
            paths, labels = split[2:] if path in val else split[:2]
            paths.append(path)
            labels.append(label)
    return (*split, json.dumps(dict(enumerate(names)), indent=4))
