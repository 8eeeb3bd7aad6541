"""PidNet: the PixelDiT body plus the latent adapter; one call predicts the velocity v = eps - x0 (spec 2.3)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import LatentAdapter, SigmaGate
from .blocks import FinalLayer, PatchBlock, PixelBlock
from .config import PidConfig
from .layers import TimestepEmbedder, TokenEmbedder
from .rope import pixel_sincos, rope_1d, rope_2d

TIMESCALE = 1000.0  # the network takes flow time t in [0, 1]; its embedding sees t * 1000


class PidNet(nn.Module):
    def __init__(self, cfg: PidConfig):
        super().__init__()
        self.config = cfg
        D, P = cfg.hidden_size, cfg.patch_size
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.text_max_tokens, D))
        self.pixel_embedder = TokenEmbedder(3, cfg.pixel_hidden_size)
        self.s_embedder = TokenEmbedder(3 * P * P, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = TokenEmbedder(cfg.text_dim, D, norm=True)
        self.patch_blocks = nn.ModuleList(PatchBlock(D, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.patch_depth))
        self.pixel_blocks = nn.ModuleList(
            PixelBlock(cfg.pixel_hidden_size, D, P, cfg.pixel_attn_hidden_size, cfg.pixel_num_heads, cfg.pixel_mlp_hidden)
            for _ in range(cfg.pixel_depth)
        )
        self.final_layer = FinalLayer(cfg.pixel_hidden_size)
        self.lq_proj = LatentAdapter(cfg)
        self.pit_lq_gate = SigmaGate(D, per_dim=cfg.gate == "per_token_per_dim") if cfg.pixel_gate else None
        # How many patch tokens the pixel blocks process at a time (None: all). Memory only; same result.
        self.pixel_chunk_tokens: int | None = None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        latent: torch.Tensor,
        sigma: torch.Tensor,
    ) -> torch.Tensor:
        """x [B,3,H,W] noisy image; t [B] flow time in [0,1]; text [B,T,text_dim]; latent [B,C,h,w] in PiD space;
        sigma [B] the latent's noise level. Returns the velocity [B,3,H,W]."""
        cfg = self.config
        B, _, H, W = x.shape
        P, D = cfg.patch_size, cfg.hidden_size
        gh, gw = H // P, W // P
        L = gh * gw
        ref = cfg.rope_ref_px // P
        sigma = sigma.float().reshape(-1).expand(B)

        lq_feats, lq_pit = self.lq_proj(latent, gh, gw)

        # Conditioning: timestep, text, patch tokens.
        t_emb = self.t_embedder((t.float().reshape(-1) * TIMESCALE).expand(B)).view(B, 1, D)
        c = F.silu(t_emb)
        n_txt = min(text.shape[1], cfg.text_max_tokens)
        y = self.y_embedder(text[:, :n_txt])
        y = y + self.y_pos_embedding[:, :n_txt].to(y.dtype)
        s = self.s_embedder(F.unfold(x, kernel_size=P, stride=P).transpose(1, 2))  # features in (c, ky, kx) order

        rope_img = rope_2d(cfg.head_dim, gh, gw, ref, ref, device=x.device)
        rope_txt = rope_1d(cfg.head_dim, n_txt, device=x.device)
        for i, block in enumerate(self.patch_blocks):
            if i % cfg.lq_interval == 0:
                k = i // cfg.lq_interval
                s = self.lq_proj.gate_modules[k](s, lq_feats[k], sigma)
            s, y = block(s, y, c, rope_img, rope_txt, last=i == cfg.patch_depth - 1)
        s = F.silu(t_emb + s)
        if self.pit_lq_gate is not None:
            s = self.pit_lq_gate(s, lq_pit, sigma)

        # Pixel stream: per-pixel embedding plus the absolute pixel sin-cos table, grouped per patch.
        d = cfg.pixel_hidden_size
        p = self.pixel_embedder(x.permute(0, 2, 3, 1))
        p = p + pixel_sincos(d, H, W, device=x.device, dtype=x.dtype)
        p = p.reshape(B, gh, P, gw, P, d).permute(0, 1, 3, 2, 4, 5).reshape(B * L, P * P, d)
        s_cond = s.reshape(B * L, D)
        rope_pix = rope_2d(cfg.pixel_head_dim, gh, gw, ref, ref, device=x.device)
        for block in self.pixel_blocks:
            p = block(p, s_cond, B, rope_pix, chunk_tokens=self.pixel_chunk_tokens)

        out = self.final_layer(p)  # [B*L, P*P, 3]
        out = out.reshape(B, gh, gw, P, P, 3).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, 3, H, W)
