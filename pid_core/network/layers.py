"""Small building blocks of the PixelDiT body, written to reproduce the reference numerics.

Mixed precision: the reference runs fp32 weights under bf16 autocast (spec 2.5). We may hold bf16
weights instead, so every place where the reference multiplies by an fp32 weight outside a matmul
(norm weights, gate scalars) upcasts the weight explicitly: the result dtype is then the same as the
reference's in both the fp32 and the bf16 path.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype): rounded to the input dtype *before* the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.float() * normed.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Same expression order as the reference: (1 + scale) is formed in the modulation's dtype.
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (patch-block MLPs)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """fc2(gelu(fc1 x)) with exact erf GELU (pixel-block MLPs)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t*1000 with max_period 10 and [cos, sin] order, then an MLP (spec 2.3c)."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t_scaled: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10) * torch.arange(half, dtype=torch.float32, device=t_scaled.device) / half)
        args = t_scaled[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class TokenEmbedder(nn.Module):
    """Linear projection, optionally followed by RMSNorm (text embedder)."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = False):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.norm = RMSNorm(out_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked SDPA over [B, heads, N, d].

    q and k leave RoPE in fp32 while v is the matmul dtype; the reference's autocast casts all three
    to bf16 before SDPA, so we cast to v's dtype (the compute dtype) the same way.
    """
    dtype = v.dtype
    return F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v)
