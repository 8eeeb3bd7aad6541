"""The two kinds of transformer block: joint text/image patch blocks and per-pixel PiT blocks (docs/DESIGN.md §3.2)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .layers import GeluMLP, RMSNorm, SwiGLU, attention, modulate
from .ops import layer_weights_of
from .rope import apply_rope


def _autocast_on(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


class JointAttention(nn.Module):
    """MMDiT attention: separate q/k/v and norms for text and image, one SDPA over [text; image]."""

    def __init__(self, dim: int, heads: int, operations=nn):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv_x = operations.Linear(dim, 3 * dim, bias=False)
        self.qkv_y = operations.Linear(dim, 3 * dim, bias=False)
        self.q_norm_x = RMSNorm(head_dim)
        self.k_norm_x = RMSNorm(head_dim)
        self.q_norm_y = RMSNorm(head_dim)
        self.k_norm_y = RMSNorm(head_dim)
        self.proj_x = operations.Linear(dim, dim)
        self.proj_y = operations.Linear(dim, dim)

    def _qkv(self, linear, q_norm, k_norm, tokens, rope):
        B, N, C = tokens.shape
        q, k, v = linear(tokens).reshape(B, N, 3, self.heads, C // self.heads).unbind(2)
        q, k = apply_rope(q_norm(q), rope), apply_rope(k_norm(k), rope)
        return q, k, v

    def forward(self, x, y, rope_img, rope_txt, need_text_out: bool = True):
        B, Nx, C = x.shape
        Ny = y.shape[1]
        qx, kx, vx = self._qkv(self.qkv_x, self.q_norm_x, self.k_norm_x, x, rope_img)
        qy, ky, vy = self._qkv(self.qkv_y, self.q_norm_y, self.k_norm_y, y, rope_txt)
        # Text first, then image: [B, heads, Ny + Nx, d].
        q = torch.cat([qy, qx], dim=1).transpose(1, 2)
        k = torch.cat([ky, kx], dim=1).transpose(1, 2)
        v = torch.cat([vy, vx], dim=1).transpose(1, 2)
        out = attention(q, k, v).transpose(1, 2)
        out_x = self.proj_x(out[:, Ny:].reshape(B, Nx, C))
        out_y = self.proj_y(out[:, :Ny].reshape(B, Ny, C)) if need_text_out else None
        return out_x, out_y


class PatchBlock(nn.Module):
    """MMDiTBlockT2I: adaLN-modulated joint attention and SwiGLU MLPs on both streams."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, operations=nn):
        super().__init__()
        self.norm_x1 = RMSNorm(dim)
        self.norm_y1 = RMSNorm(dim)
        self.attn = JointAttention(dim, heads, operations)
        self.norm_x2 = RMSNorm(dim)
        self.norm_y2 = RMSNorm(dim)
        self.mlp_x = SwiGLU(dim, mlp_hidden, operations)
        self.mlp_y = SwiGLU(dim, mlp_hidden, operations)
        self.adaLN_modulation_img = nn.Sequential(operations.Linear(dim, 6 * dim))
        self.adaLN_modulation_txt = nn.Sequential(operations.Linear(dim, 6 * dim))

    def forward(self, x, y, c, rope_img, rope_txt, last: bool = False):
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation_img(c).chunk(6, dim=-1)
        sh1y, sc1y, g1y, sh2y, sc2y, g2y = self.adaLN_modulation_txt(c).chunk(6, dim=-1)
        attn_x, attn_y = self.attn(
            modulate(self.norm_x1(x), sh1, sc1),
            modulate(self.norm_y1(y), sh1y, sc1y),
            rope_img,
            rope_txt,
            need_text_out=not last,
        )
        x = x + g1 * attn_x
        x = x + g2 * self.mlp_x(modulate(self.norm_x2(x), sh2, sc2))
        if last:
            # The text stream of the last block feeds nothing downstream.
            return x, y
        y = y + g1y * attn_y
        y = y + g2y * self.mlp_y(modulate(self.norm_y2(y), sh2y, sc2y))
        return x, y


class PixelAttention(nn.Module):
    """Self-attention over the compressed patch tokens of a PiT block."""

    def __init__(self, dim: int, heads: int, operations=nn):
        super().__init__()
        self.heads = heads
        head_dim = dim // heads
        self.qkv = operations.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.proj = operations.Linear(dim, dim)

    def forward(self, a: torch.Tensor, rope) -> torch.Tensor:
        B, N, C = a.shape
        q, k, v = self.qkv(a).reshape(B, N, 3, self.heads, C // self.heads).unbind(2)
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class PixelBlock(nn.Module):
    """PiTBlock: per-pixel adaLN modulation from the patch token, attention over compressed patches.

    The pixel stream p is [B*L, P*P, d]. The modulation of one token is 6*d*P*P values laid out
    (pixel, group, channel), 24576 per token for the released models: the largest tensor of the
    network. `chunk_tokens` computes it for that many tokens at a time so that it never exists for the
    whole canvas; the result is the same, only the peak memory changes.
    """

    def __init__(self, pixel_dim: int, cond_dim: int, patch_size: int, attn_dim: int, heads: int, mlp_hidden: int,
                 operations=nn):
        super().__init__()
        self.pixel_dim = pixel_dim
        self.p2 = patch_size * patch_size
        self.attn_dim = attn_dim
        self.compress_to_attn = operations.Linear(self.p2 * pixel_dim, attn_dim)
        self.expand_from_attn = operations.Linear(attn_dim, self.p2 * pixel_dim)
        self.norm1 = RMSNorm(pixel_dim)
        self.attn = PixelAttention(attn_dim, heads, operations)
        self.norm2 = RMSNorm(pixel_dim)
        self.mlp = GeluMLP(pixel_dim, mlp_hidden, operations)
        self.adaLN_modulation = nn.Sequential(operations.Linear(cond_dim, 6 * pixel_dim * self.p2))
        self.layer_weights = layer_weights_of(operations)

    def _modulation_weights(self, s_cond: torch.Tensor):
        """Context giving the modulation layer's (weight, bias) in the dtype its matmul runs in (autocast's
        when on, else s_cond's) on s_cond's device, from wherever and however the namespace stores them."""
        device_type = s_cond.device.type
        dtype = torch.get_autocast_dtype(device_type) if _autocast_on(device_type) else s_cond.dtype
        return self.layer_weights(self.adaLN_modulation[0], dtype, s_cond.device)

    def _modulation_groups(self, weight, bias, s_cond: torch.Tensor, first: int, last: int):
        """Groups first..last-1 of the modulation of the tokens s_cond [n, cond], each [n, P*P, d].

        The wanted rows of one pixel are contiguous in the weight, so the weight is read through a
        [P*P, groups*d, cond] view by one batched matmul over the pixels (s_cond broadcast, not
        copied): no slice of the 24576-row weight is ever copied. Operands in the weight's dtype and
        autocast off: autocast would cast the expanded [P*P, n, cond] input, a copy of s_cond per
        pixel; these are the operands autocast would use, so the result is the same."""
        d, cond_dim = self.pixel_dim, weight.shape[-1]
        weight = weight.view(self.p2, 6 * d, cond_dim)[:, first * d : last * d]
        bias = bias.view(self.p2, 1, 6 * d)[:, :, first * d : last * d]
        n = s_cond.shape[0]
        s_cond = s_cond.to(weight.dtype)
        device_type = s_cond.device.type
        with torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext():
            out = torch.baddbmm(bias, s_cond[None].expand(self.p2, n, cond_dim), weight.transpose(1, 2))
        return out.transpose(0, 1).chunk(last - first, dim=-1)

    def forward(self, p, s_cond, B: int, rope, chunk_tokens: int | None = None, inplace: bool = False):
        """chunk_tokens: tokens per chunk of the per-pixel work (None: all at once, the reference's
        order of operations). inplace (chunked only): write the output over p, which the caller
        gives up; saves one pixel stream."""
        BL = p.shape[0]
        step = BL if not chunk_tokens else max(1, min(BL, chunk_tokens))
        if step >= BL:
            return self._forward_whole(p, s_cond, B, rope)
        with self._modulation_weights(s_cond) as (weight, bias):
            return self._forward_chunked(p, s_cond, B, rope, step, inplace, weight, bias)

    def _forward_chunked(self, p, s_cond, B: int, rope, step: int, inplace: bool, weight, bias):
        BL = p.shape[0]
        L = BL // B
        # Phase 1: per chunk, modulate + compress; the compressed tokens are small (attn_dim each).
        compressed = []
        for i in range(0, BL, step):
            shift, scale = self._modulation_groups(weight, bias, s_cond[i : i + step], 0, 2)
            p_norm = modulate(self.norm1(p[i : i + step]), shift, scale)
            del shift, scale
            compressed.append(self.compress_to_attn(p_norm.flatten(1)))
            del p_norm
        attn_out = self.attn(torch.cat(compressed).view(B, L, self.attn_dim), rope).reshape(BL, self.attn_dim)
        del compressed
        # Phase 2: per chunk, expand + residuals, written into the output stream.
        out = None
        for i in range(0, BL, step):
            gate_msa, shift2, scale2, gate_mlp = self._modulation_groups(weight, bias, s_cond[i : i + step], 2, 6)
            p_i = p[i : i + step] + gate_msa * self.expand_from_attn(attn_out[i : i + step]).view(-1, self.p2, self.pixel_dim)
            del gate_msa
            p_i = p_i + gate_mlp * self.mlp(modulate(self.norm2(p_i), shift2, scale2))
            del gate_mlp, shift2, scale2
            if out is None:
                out = p if inplace and p_i.dtype == p.dtype else p_i.new_empty((BL, *p_i.shape[1:]))
            out[i : i + step] = p_i
            del p_i
        return out

    def _forward_whole(self, p, s_cond, B: int, rope):
        BL = p.shape[0]
        # The whole modulation at once, laid out (pixel, group, channel): the reference's order of operations.
        modulation = self.adaLN_modulation(s_cond).view(BL, self.p2, 6 * self.pixel_dim)
        shift1, scale1, gate_msa, shift2, scale2, gate_mlp = modulation.chunk(6, dim=-1)
        a = self.compress_to_attn(modulate(self.norm1(p), shift1, scale1).flatten(1))
        a = self.attn(a.view(B, BL // B, self.attn_dim), rope).reshape(BL, self.attn_dim)
        p = p + gate_msa * self.expand_from_attn(a).view(BL, self.p2, self.pixel_dim)
        return p + gate_mlp * self.mlp(modulate(self.norm2(p), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, pixel_dim: int, out_channels: int = 3, operations=nn):
        super().__init__()
        self.norm = RMSNorm(pixel_dim)
        self.linear = operations.Linear(pixel_dim, out_channels)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(p))
