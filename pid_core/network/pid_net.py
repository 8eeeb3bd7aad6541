"""PidNet: the PixelDiT body plus the latent adapter; one call predicts the velocity v = eps - x0 (docs/DESIGN.md §3)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import LatentAdapter, SigmaGate
from .attention import note_device
from .blocks import FinalLayer, PatchBlock, PixelBlock
from .config import PidConfig
from .layers import TimestepEmbedder, TokenEmbedder
from .prepared import KEEP, Prepared
from .rope import pixel_sincos, pixel_sincos_axes, pixel_sincos_table, rope_1d, rope_2d

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
        text: Optional[torch.Tensor] = None,
        latent: Optional[torch.Tensor] = None,
        sigma: Optional[torch.Tensor] = None,
        *,
        chunk_tokens: int | None = None,
        prepared: Optional[Prepared] = None,
    ) -> torch.Tensor:
        """x [B,3,H,W] noisy image; t [B] flow time in [0,1]; text [B,T,text_dim]; latent [B,C,h,w] in PiD space;
        sigma [B] the latent's noise level. Returns the velocity [B,3,H,W].

        chunk_tokens: patch tokens per chunk of the per-pixel work (None: all at once, the reference's
        order of operations). Memory only: the result agrees to float rounding.
        prepared: what `prepare` made for these text, latent and sigma (docs/DESIGN.md §3.5); text and
        sigma are then not read, nor the latent unless only the tables were kept. The same result bit
        for bit as without it."""
        cfg = self.config
        B, _, H, W = x.shape
        P, D = cfg.patch_size, cfg.hidden_size
        gh, gw = H // P, W // P
        L = gh * gw
        note_device(x.device)  # attention.py: the GPU's capability, read here in eager code
        owned = prepared is None
        if owned:
            prepared = self.prepare(latent, text, sigma, (gh, gw), pixel_dtype=x.dtype, chunk_tokens=chunk_tokens)
        else:
            prepared.check(B, (gh, gw))
        sigma = prepared.sigma

        # Adapter features; each head is projected just before its gate, so only one exists at a time
        # (unless prepared holds them all).
        lq_tokens = prepared.tokens
        if lq_tokens is None and prepared.heads is None:
            if latent is None:
                raise ValueError("a forward with prepared tables only (keep='tables') needs the latent")
            lq_tokens = self.lq_proj.tokens(latent, gh, gw)
        if owned:
            prepared.tokens = None  # released after the patch blocks, below

        # Conditioning: timestep, text, patch tokens.
        t_emb = self.t_embedder((t.float().reshape(-1) * TIMESCALE).expand(B)).view(B, 1, D)
        c = F.silu(t_emb)
        y = prepared.text
        s = self.s_embedder(F.unfold(x, kernel_size=P, stride=P).transpose(1, 2))  # features in (c, ky, kx) order

        for i, block in enumerate(self.patch_blocks):
            if i % cfg.lq_interval == 0:
                k = i // cfg.lq_interval
                lq = prepared.heads[k] if prepared.heads is not None else self.lq_proj.output_heads[k](lq_tokens)
                s = self.lq_proj.gate_modules[k](s, lq, sigma)
                del lq
            s, y = block(s, y, c, prepared.rope_img, prepared.rope_txt, last=i == cfg.patch_depth - 1)
        del y
        s = F.silu(t_emb + s)
        if self.pit_lq_gate is not None:
            lq = prepared.pixel_head if prepared.heads is not None else self.lq_proj.pit_head(lq_tokens)
            s = self.pit_lq_gate(s, lq, sigma)
            del lq
        del lq_tokens

        # Pixel stream: per-pixel embedding plus the absolute pixel sin-cos table, grouped per patch.
        d = cfg.pixel_hidden_size
        chunk = chunk_tokens
        s_cond = s.reshape(B * L, D)
        del s
        if chunk:
            p = self._pixel_stream_chunked(x, chunk, prepared)
        else:
            p = self.pixel_embedder(x.permute(0, 2, 3, 1))
            p = p + self._sincos(prepared, 0, H, x)
            p = p.reshape(B, gh, P, gw, P, d).permute(0, 1, 3, 2, 4, 5).reshape(B * L, P * P, d)
        rope_pix = prepared.rope_pix
        for block in self.pixel_blocks:
            p = block(p, s_cond, B, rope_pix, chunk_tokens=chunk, inplace=bool(chunk))
        if chunk:
            return self._final_chunked(p, B, H, W, chunk)

        out = self.final_layer(p)  # [B*L, P*P, 3]
        out = out.reshape(B, gh, gw, P, P, 3).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, 3, H, W)

    def prepare(
        self,
        latent: torch.Tensor,
        text: torch.Tensor,
        sigma: torch.Tensor,
        grid: tuple[int, int],
        *,
        keep: str = "tokens",
        pixel_dtype: torch.dtype = torch.float32,
        chunk_tokens: int | None = None,
        tables_from: Optional[Prepared] = None,
    ) -> Prepared:
        """The step-invariant part of a forward over a grid of (rows, columns) patches for this latent
        [B,C,h,w], text [B,T,text_dim] and sigma [B] (docs/DESIGN.md §3.5), made by the calls a forward
        makes. keep: "tables", "tokens" or "heads" (network/prepared.py). pixel_dtype: x's dtype;
        chunk_tokens: the forward's, which decides the bands of the pixel table it reads. tables_from: an
        earlier Prepared whose RoPE and sin-cos tables are reused when they are the ones this would make
        (tiles of one shape share them). Run it under the precision the forwards run under (the tensors
        keep its dtypes)."""
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
        cfg = self.config
        gh, gw = grid
        B = latent.shape[0]
        device = latent.device
        P = cfg.patch_size
        H, W = gh * P, gw * P
        ref = cfg.rope_ref_px // P
        n_txt = min(text.shape[1], cfg.text_max_tokens)
        y = self.y_embedder(text[:, :n_txt])
        y = y + self.y_pos_embedding[:, :n_txt].to(device=y.device, dtype=y.dtype)
        d = cfg.pixel_hidden_size
        bands = sorted({(r0 * P, (r1 - r0) * P) for _, r0, r1, _, _ in self._bands(1, H, W, chunk_tokens)}
                       if chunk_tokens else {(0, H)})
        shared = tables_from
        if shared is None or shared.grid != (gh, gw) or shared.pixel_dtype != pixel_dtype \
                or shared.rope_txt[0].shape[0] != n_txt or sorted(shared.sincos_rows) != bands \
                or shared.sincos_cols.device != device:
            shared = None
        if shared is not None:  # the same calls on the same arguments: the same values
            tables = dict(rope_img=shared.rope_img, rope_txt=shared.rope_txt, rope_pix=shared.rope_pix,
                          sincos_cols=shared.sincos_cols, sincos_rows=shared.sincos_rows)
        else:
            tables = dict(
                rope_img=rope_2d(cfg.head_dim, gh, gw, ref, ref, device=device),
                rope_txt=rope_1d(cfg.head_dim, n_txt, device=device),
                rope_pix=rope_2d(cfg.pixel_head_dim, gh, gw, ref, ref, device=device),
                sincos_cols=pixel_sincos_axes(d, 0, W, device=device, dtype=pixel_dtype)[0],
                sincos_rows={(row0, rows): pixel_sincos_axes(d, rows, 0, row0=row0, device=device, dtype=pixel_dtype)[1]
                             for row0, rows in bands},
            )
        prepared = Prepared(batch=B, grid=(gh, gw), keep=keep, sigma=sigma.float().reshape(-1).expand(B), text=y,
                            pixel_dtype=pixel_dtype, **tables)
        if keep == "tables":
            return prepared
        tokens = self.lq_proj.tokens(latent, gh, gw)
        if keep == "tokens":
            prepared.tokens = tokens
            return prepared
        prepared.heads = tuple(head(tokens) for head in self.lq_proj.output_heads)
        if self.lq_proj.pit_head is not None:
            prepared.pixel_head = self.lq_proj.pit_head(tokens)
        return prepared

    def _sincos(self, prepared: Prepared, row0: int, rows: int, x: torch.Tensor) -> torch.Tensor:
        """The pixel table of rows [row0, row0 + rows) of x's width: from the prepared axes when they hold
        that band in x's dtype, else computed (the same calls)."""
        axis = prepared.sincos_rows.get((row0, rows)) if prepared.pixel_dtype == x.dtype else None
        if axis is None or prepared.sincos_cols.shape[0] != x.shape[-1]:
            return pixel_sincos(self.config.pixel_hidden_size, rows, x.shape[-1], row0=row0, device=x.device,
                                dtype=x.dtype)
        return pixel_sincos_table(prepared.sincos_cols, axis)

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

    def _pixel_stream_chunked(self, x: torch.Tensor, chunk: int, prepared: Prepared) -> torch.Tensor:
        B, _, H, W = x.shape
        P, d = self.config.patch_size, self.config.pixel_hidden_size
        gw = W // P
        p = None
        for b, r0, r1, t0, t1 in self._bands(B, H, W, chunk):
            band = self.pixel_embedder(x[b : b + 1, :, r0 * P : r1 * P].permute(0, 2, 3, 1))
            band = band + self._sincos(prepared, r0 * P, (r1 - r0) * P, x)
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
