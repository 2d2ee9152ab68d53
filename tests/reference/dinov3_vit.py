"""A re-implementation of DINOv3's `DinoVisionTransformer` at inference, written for these tests from the
description of facebookresearch/dinov3 @6876159 (`dinov3/models/vision_transformer.py`, `dinov3/layers/
{attention,block,ffn_layers,layer_scale,rope_position_encoding}.py`). That code is under the DINOv3 License,
which this project cannot redistribute: nothing here is copied; it holds the same state_dict keys, shapes and
persistent buffers, so the release's hub files load into it strictly, and computes what the release's forward
computes in eval (float32):

- tokens [cls + 0 * mask_token, storage tokens, patches] (patches from a strided conv, row-major);
- per block: x + ls1 * attn(norm1 x), x + ls2 * ffn(norm2 x); attention with a fused qkv whose bias is multiplied
  by `bias_mask` (the k third 0), RoPE on the patch tokens of q and k (half layout: x cos + [-b || a] sin),
  angles 2 pi c / period with c = 2 (index + 0.5) / size - 1 per axis (rows first), periods base^(4k/Dh);
- ffn: fc1, GELU, fc2, or SwiGLU w3(silu(w1 x) * w2 x) with hidden int(4 D 2/3) rounded up to `align_to`;
- LayerNorm eps 1e-5 everywhere; `norm` on every token; output the normed tokens (x_norm_clstoken = [:, 0]).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)   # B, H, W, D


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qkv_bias:
            self.qkv.register_buffer('bias_mask', torch.ones(3 * dim))   # persistent, as the release's
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, sin, cos):
        b, n, d = x.shape
        bias = None if self.qkv.bias is None else self.qkv.bias * self.qkv.bias_mask
        q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        p = n - sin.shape[0]

        def rot(t):
            a, c = t[..., p:, :].chunk(2, -1)
            turned = torch.cat([-c, a], -1)
            return torch.cat([t[..., :p, :], t[..., p:, :] * cos + turned * sin], -2)
        out = F.scaled_dot_product_attention(rot(q), rot(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, align_to):
        super().__init__()
        h = int(hidden * 2 / 3)
        h += -h % align_to
        self.w1, self.w2, self.w3 = nn.Linear(dim, h), nn.Linear(dim, h), nn.Linear(h, dim)

    def forward(self, x):
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class Block(nn.Module):
    def __init__(self, dim, heads, ffn_ratio, qkv_bias, swiglu_align):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads, qkv_bias)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        hidden = int(dim * ffn_ratio)
        self.mlp = SwiGLU(dim, hidden, swiglu_align) if swiglu_align else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x, sin, cos):
        x = x + self.ls1(self.attn(self.norm1(x), sin, cos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class RopeEmbed(nn.Module):
    def __init__(self, head_dim, base=100.0):
        super().__init__()
        self.head_dim = head_dim
        nb = head_dim // 4
        self.register_buffer('periods', base ** (2 * torch.arange(nb, dtype=torch.float32) / (head_dim // 2)))

    def forward(self, h, w):
        ys = (torch.arange(0.5, h, dtype=torch.float32) / h) * 2 - 1
        xs = (torch.arange(0.5, w, dtype=torch.float32) / w) * 2 - 1
        coords = torch.stack(torch.meshgrid(ys, xs, indexing='ij'), -1).reshape(-1, 2)
        angles = (2 * math.pi * coords[:, :, None] / self.periods).reshape(len(coords), -1)
        angles = torch.cat([angles, angles], -1)
        return angles.sin(), angles.cos()


class DinoV3(nn.Module):
    """ffn: ratio 4 GELU (`swiglu_align=0`) or the release's swiglu ratios (6 for S+/H+ with align 8,
    3 with align 64 for 7B)."""

    def __init__(self, dim=64, depth=2, heads=4, patch=16, storage=4, qkv_bias=True, ffn_ratio=4.0, swiglu_align=0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, storage, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.patch_embed = PatchEmbed(patch, dim)
        self.rope_embed = RopeEmbed(dim // heads)
        self.blocks = nn.ModuleList([Block(dim, heads, ffn_ratio, qkv_bias, swiglu_align) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x):
        x = self.patch_embed(x)
        b, h, w, d = x.shape
        cls = self.cls_token + 0 * self.mask_token
        x = torch.cat([cls.expand(b, -1, -1), self.storage_tokens.expand(b, -1, -1), x.reshape(b, -1, d)], 1)
        sin, cos = self.rope_embed(h, w)
        for blk in self.blocks:
            x = blk(x, sin, cos)
        return self.norm(x)
