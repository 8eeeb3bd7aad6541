"""PidNet: the PixelDiT body plus the latent adapter; one call predicts the velocity v = eps - x0 (docs/DESIGN.md §3)."""

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
    """operations: the namespace every Linear, Conv2d, GroupNorm and LayerNorm comes from (ops.py):
    torch.nn, ops.CastOps, or what ComfyUI's comfy.ops gives for the file."""

    def __init__(self, cfg: PidConfig, operations=nn):
        super().__init__()
        self.config = cfg
        ops = operations
        D, P = cfg.hidden_size, cfg.patch_size
        self.y_pos_embedding = nn.Parameter(torch.zeros(1, cfg.text_max_tokens, D))
        self.pixel_embedder = TokenEmbedder(3, cfg.pixel_hidden_size, operations=ops)
        self.s_embedder = TokenEmbedder(3 * P * P, D, operations=ops)
        self.t_embedder = TimestepEmbedder(D, operations=ops)
        self.y_embedder = TokenEmbedder(cfg.text_dim, D, norm=True, operations=ops)
        self.patch_blocks = nn.ModuleList(PatchBlock(D, cfg.num_heads, cfg.mlp_hidden, ops) for _ in range(cfg.patch_depth))
        self.pixel_blocks = nn.ModuleList(
            PixelBlock(cfg.pixel_hidden_size, D, P, cfg.pixel_attn_hidden_size, cfg.pixel_num_heads, cfg.pixel_mlp_hidden, ops)
            for _ in range(cfg.pixel_depth)
        )
        self.final_layer = FinalLayer(cfg.pixel_hidden_size, operations=ops)
        self.lq_proj = LatentAdapter(cfg, ops)
        self.pit_lq_gate = SigmaGate(D, cfg.gate == "per_token_per_dim", ops) if cfg.pixel_gate else None
        # Provenance, set by checkpoint.load_pid: the released variant (or None) and the file.
        self.variant = None
        self.checkpoint = None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        *,
        chunk_tokens: int | None = None,
    ) -> torch.Tensor:
        """x [B,3,H,W] noisy image; t [B] flow time in [0,1]; text [B,T,text_dim]; latent [B,C,h,w] in PiD space;
        sigma [B] the latent's noise level. Returns the velocity [B,3,H,W].

        chunk_tokens: patch tokens per chunk of the per-pixel work (None: all at once, the reference's
        order of operations). Memory only: the result agrees to float rounding."""
        cfg = self.config
        B, _, H, W = x.shape
        P, D = cfg.patch_size, cfg.hidden_size
        gh, gw = H // P, W // P
        L = gh * gw
        ref = cfg.rope_ref_px // P
        sigma = sigma.float().reshape(-1).expand(B)

        # Adapter features; each head is projected just before its gate, so only one exists at a time.
        lq_tokens = self.lq_proj.tokens(latent, gh, gw)

        # Conditioning: timestep, text, patch tokens.
        t_emb = self.t_embedder((t.float().reshape(-1) * TIMESCALE).expand(B)).view(B, 1, D)
        c = F.silu(t_emb)
        n_txt = min(text.shape[1], cfg.text_max_tokens)
        y = self.y_embedder(text[:, :n_txt])
        y = y + self.y_pos_embedding[:, :n_txt].to(device=y.device, dtype=y.dtype)
        s = self.s_embedder(F.unfold(x, kernel_size=P, stride=P).transpose(1, 2))  # features in (c, ky, kx) order

        rope_img = rope_2d(cfg.head_dim, gh, gw, ref, ref, device=x.device)
        rope_txt = rope_1d(cfg.head_dim, n_txt, device=x.device)
        for i, block in enumerate(self.patch_blocks):
            if i % cfg.lq_interval == 0:
                k = i // cfg.lq_interval
                s = self.lq_proj.gate_modules[k](s, self.lq_proj.output_heads[k](lq_tokens), sigma)
            s, y = block(s, y, c, rope_img, rope_txt, last=i == cfg.patch_depth - 1)
        s = F.silu(t_emb + s)
        if self.pit_lq_gate is not None:
            s = self.pit_lq_gate(s, self.lq_proj.pit_head(lq_tokens), sigma)
        del lq_tokens

        # Pixel stream: per-pixel embedding plus the absolute pixel sin-cos table, grouped per patch.
        d = cfg.pixel_hidden_size
        chunk = chunk_tokens
        s_cond = s.reshape(B * L, D)
        del s
        if chunk:
            p = self._pixel_stream_chunked(x, chunk)
        else:
            p = self.pixel_embedder(x.permute(0, 2, 3, 1))
            p = p + pixel_sincos(d, H, W, device=x.device, dtype=x.dtype)
            p = p.reshape(B, gh, P, gw, P, d).permute(0, 1, 3, 2, 4, 5).reshape(B * L, P * P, d)
        rope_pix = rope_2d(cfg.pixel_head_dim, gh, gw, ref, ref, device=x.device)
        for block in self.pixel_blocks:
            p = block(p, s_cond, B, rope_pix, chunk_tokens=chunk, inplace=bool(chunk))
        if chunk:
            return self._final_chunked(p, B, H, W, chunk)

        out = self.final_layer(p)  # [B*L, P*P, 3]
        out = out.reshape(B, gh, gw, P, P, 3).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, 3, H, W)

    # With chunk_tokens set, the pixel stream is also built and read out in bands of patch rows
    # of about that many tokens, so that no canvas-size temporary exists besides the stream itself.

    def _bands(self, B: int, H: int, W: int, chunk: int):
        P = self.config.patch_size
        gh, gw = H // P, W // P
        rows = max(1, chunk // gw)
        for b in range(B):
            for r0 in range(0, gh, rows):
                r1 = min(gh, r0 + rows)
                yield b, r0, r1, (b * gh + r0) * gw, (b * gh + r1) * gw

    def _pixel_stream_chunked(self, x: torch.Tensor, chunk: int) -> torch.Tensor:
        B, _, H, W = x.shape
        P, d = self.config.patch_size, self.config.pixel_hidden_size
        gw = W // P
        p = None
        for b, r0, r1, t0, t1 in self._bands(B, H, W, chunk):
            band = self.pixel_embedder(x[b : b + 1, :, r0 * P : r1 * P].permute(0, 2, 3, 1))
            band = band + pixel_sincos(d, (r1 - r0) * P, W, row0=r0 * P, device=x.device, dtype=x.dtype)
            band = band.reshape(r1 - r0, P, gw, P, d).permute(0, 2, 1, 3, 4).reshape(t1 - t0, P * P, d)
            if p is None:
                p = band.new_empty((B * (H // P) * gw, P * P, d))
            p[t0:t1] = band
        return p

    def _final_chunked(self, p: torch.Tensor, B: int, H: int, W: int, chunk: int) -> torch.Tensor:
        P = self.config.patch_size
        gw = W // P
        out = None
        for b, r0, r1, t0, t1 in self._bands(B, H, W, chunk):
            band = self.final_layer(p[t0:t1])  # [tokens, P*P, 3]
            band = band.reshape(r1 - r0, gw, P, P, 3).permute(4, 0, 2, 1, 3).reshape(3, (r1 - r0) * P, W)
            if out is None:
                out = band.new_empty((B, 3, H, W))
            out[b, :, r0 * P : r1 * P] = band
        return out
