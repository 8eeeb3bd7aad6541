"""Small building blocks of the PixelDiT body, written to reproduce the reference numerics.

Mixed precision: the reference runs fp32 weights under bf16 autocast (docs/DESIGN.md §4). We may hold bf16
weights instead, so every place where the reference multiplies by an fp32 weight outside a matmul
(norm weights, gate scalars) upcasts the weight explicitly: the result dtype is then the same as the
reference's in both the fp32 and the bf16 path. Linear layers come from the `operations` namespace
(ops.py); the few parameters held outside those layers are cast to the input's device when used, so
they work wherever a partial load left them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import sdpa


class RMSNorm(nn.Module):
    """w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype): rounded to the input dtype *before* the weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(device=x.device, dtype=torch.float32) * normed.to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Same expression order as the reference: (1 + scale) is formed in the modulation's dtype.
    return x * (1 + scale) + shift


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (patch-block MLPs)."""

    def __init__(self, dim: int, hidden: int, operations=nn):
        super().__init__()
        self.w1 = operations.Linear(dim, hidden, bias=False)
        self.w3 = operations.Linear(dim, hidden, bias=False)
        self.w2 = operations.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nn.Module):
    """fc2(gelu(fc1 x)) with exact erf GELU (pixel-block MLPs)."""

    def __init__(self, dim: int, hidden: int, operations=nn):
        super().__init__()
        self.fc1 = operations.Linear(dim, hidden)
        self.fc2 = operations.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of t*1000 with max_period 10 and [cos, sin] order, then an MLP (docs/DESIGN.md §3.2)."""

    def __init__(self, hidden: int, freq_dim: int = 256, operations=nn):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(operations.Linear(freq_dim, hidden), nn.SiLU(), operations.Linear(hidden, hidden))

    def forward(self, t_scaled: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10) * torch.arange(half, dtype=torch.float32, device=t_scaled.device) / half)
        args = t_scaled[:, None].float() * freqs[None]
        # fp32 into the MLP, as in the reference: under autocast its matmul casts to bf16 itself.
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TokenEmbedder(nn.Module):
    """Linear projection, optionally followed by RMSNorm (text embedder)."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = False, operations=nn):
        super().__init__()
        self.proj = operations.Linear(in_dim, out_dim)
        self.norm = RMSNorm(out_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        return self.norm(x) if self.norm is not None else x


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_attention_backend: Optional[AttentionFn] = None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention over [B, heads, N, d]: SDPA (its kernel chosen by attention.py), or the
    backend set with `set_attention_backend`.

    q and k leave RoPE in fp32 while v is the matmul dtype; the reference's autocast casts all three
    to bf16 before SDPA, so we cast to v's dtype (the compute dtype) the same way.
    """
    dtype = v.dtype
    q, k = q.to(dtype), k.to(dtype)
    backend = _attention_backend
    if backend is not None:
        return backend(q, k, v)
    return sdpa(q, k, v)  # SDPA with the fastest exact kernel for the device (attention.py)


def set_attention_backend(fn: Optional[AttentionFn]) -> Optional[AttentionFn]:
    """Route every attention of the network through fn(q, k, v) -> [B, heads, N, d] (q, k, v
    [B, heads, N, d], unmasked, default scale); None restores SDPA. Returns the previous backend.

    Process-wide: prefer the `attention_backend` context manager, which restores it."""
    global _attention_backend
    previous, _attention_backend = _attention_backend, fn
    return previous


@contextlib.contextmanager
def attention_backend(fn: Optional[AttentionFn]):
    """`with attention_backend(fn): ...` runs the network with fn as its attention, then restores."""
    previous = set_attention_backend(fn)
    try:
        yield
    finally:
        set_attention_backend(previous)


def heads_merged_backend(fn) -> AttentionFn:
    """Adapt a function of ComfyUI's `optimized_attention` kind, fn(q, k, v, heads, skip_reshape=True)
    taking [B, heads, N, d] and returning [B, N, heads*d], to a backend for `attention_backend`.

    A 4-D result is taken as [B, heads, N, d] already. No ComfyUI import here: the caller passes fn."""

    def backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, N, d = q.shape
        out = fn(q, k, v, H, skip_reshape=True)
        if out.dim() == 4:
            return out
        return out.reshape(B, N, H, d).transpose(1, 2)

    backend.wrapped = fn
    return backend
