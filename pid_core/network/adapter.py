"""The latent adapter: conv stack on the low-resolution latent, output heads, sigma-aware gates (docs/DESIGN.md §3.2)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..latent_formats import unpatchify
from .config import PidConfig
from .ops import layer_weights_of


class ResBlock(nn.Module):
    """x + conv(silu(GN(conv(silu(GN(x)))))), 4 groups; each GroupNorm computed in fp32, as autocast does
    in the reference (its output stays fp32)."""

    def __init__(self, channels: int, padding_mode: str, operations=nn):
        super().__init__()
        conv = lambda: operations.Conv2d(channels, channels, 3, padding=1, padding_mode=padding_mode)  # noqa: E731
        norm = lambda: operations.GroupNorm(4, channels)  # noqa: E731
        self.block = nn.Sequential(norm(), nn.SiLU(), conv(), norm(), nn.SiLU(), conv())
        self.layer_weights = layer_weights_of(operations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.block:
            h = self._group_norm_fp32(layer, h) if isinstance(layer, nn.GroupNorm) else layer(h)
        return x + h

    def _group_norm_fp32(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        with self.layer_weights(norm, torch.float32, x.device) as (weight, bias):
            return F.group_norm(x.float(), norm.num_groups, weight, bias, norm.eps)


class SigmaGate(nn.Module):
    """x + sigmoid(content_proj([x; lq]) - exp(log_alpha) * sigma) * lq.

    v1 gates per token and channel (content_proj -> dim outputs); v1.5 per token (-> 1 output).
    """

    def __init__(self, dim: int, per_dim: bool, operations=nn):
        super().__init__()
        self.content_proj = operations.Linear(2 * dim, dim if per_dim else 1)
        self.log_alpha = nn.Parameter(torch.tensor(0.0))

    def forward(self, x: torch.Tensor, lq: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        content = self.content_proj(torch.cat([x, lq], dim=-1))
        log_alpha = self.log_alpha.to(device=sigma.device, dtype=torch.float32)
        sigma_offset = -log_alpha.exp() * sigma.float().view(-1, 1, 1)
        return x + torch.sigmoid(content + sigma_offset) * lq


class LatentAdapter(nn.Module):
    """Projects the latent to one feature set per gated patch block (+ one for the pixel blocks in v1.5).

    State-dict names follow the reference's `lq_proj.*` layout exactly.
    """

    def __init__(self, cfg: PidConfig, operations=nn):
        super().__init__()
        self.cfg = cfg
        ops = operations
        h, pad = cfg.adapter_hidden, cfg.conv_padding
        self.latent_proj = nn.Sequential(
            ops.Conv2d(cfg.adapter_in_channels, h, 3, padding=1, padding_mode=pad),
            nn.SiLU(),
            ops.Conv2d(h, h, 3, padding=1, padding_mode=pad),
            *[ResBlock(h, pad, ops) for _ in range(cfg.adapter_res_blocks)],
        )
        self.output_heads = nn.ModuleList(ops.Linear(h, cfg.hidden_size) for _ in range(cfg.num_lq_outputs))
        self.pit_head = ops.Linear(h, cfg.hidden_size) if cfg.pixel_gate else None
        # Training-only auxiliary head: kept so that v1.5 checkpoints load strictly, never run.
        self.lq_aux_rgb_head = (
            nn.Sequential(ops.LayerNorm(h), ops.Linear(h, h), nn.SiLU(), ops.Linear(h, 3 * (cfg.patch_size // cfg.sr_scale) ** 2))
            if cfg.has_aux_rgb_head
            else None
        )
        per_dim = cfg.gate == "per_token_per_dim"
        self.gate_modules = nn.ModuleList(SigmaGate(cfg.hidden_size, per_dim, ops) for _ in range(cfg.num_lq_outputs))

    def unpack(self, z: torch.Tensor) -> torch.Tensor:
        """FLUX.2 v1.5: [B, C*f*f, h, w] -> [B, C, h*f, w*f], the inverse of FLUX.2's packing."""
        f = self.cfg.latent_unpatchify
        return z if f == 1 else unpatchify(z, f)

    def align(self, z: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """Bring the (un-packed) latent onto the patch grid (docs/DESIGN.md §3.2)."""
        cfg = self.cfg
        ratio = cfg.sr_scale * (cfg.latent_down_factor / cfg.latent_unpatchify) / cfg.patch_size
        if ratio > 1:
            # Legacy nearest (floor indexing) to the exact grid, so uneven sizes are accepted too.
            return F.interpolate(z, size=(grid_h, grid_w), mode="nearest")
        if ratio == 1:
            if z.shape[-2:] != (grid_h, grid_w):
                z = F.interpolate(z, size=(grid_h, grid_w), mode="bilinear", align_corners=False)
            return z
        fold = round(1 / ratio)  # latent finer than the patch grid: fold k x k cells into channels
        if z.shape[-2:] != (grid_h * fold, grid_w * fold):
            z = F.interpolate(z, size=(grid_h * fold, grid_w * fold), mode="bilinear", align_corners=False)
        B, C = z.shape[:2]
        z = z.reshape(B, C, grid_h, fold, grid_w, fold).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(B, C * fold * fold, grid_h, grid_w)

    def tokens(self, latent: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """The conv stack's features [B, L, adapter_hidden], tokens row-major; the heads project them."""
        z = self.align(self.unpack(latent), grid_h, grid_w)
        return self.latent_proj(z).flatten(2).transpose(1, 2)
