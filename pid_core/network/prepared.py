"""What a forward computes that does not depend on the step: made once per decode, reused at every step
(docs/DESIGN.md §3.5).

A forward depends on the step (the noisy image x and its time t) and on inputs that stay fixed for the
whole decode of an image or a tile: the latent, the text, sigma and the patch grid. `PidNet.prepare`
computes the second part into a `Prepared`; `PidNet.forward(..., prepared=p)` then skips it. Built by
the same calls on the same inputs, the reused tensors are the ones a forward would make, so the result
is bit-identical to recomputing them.

How much is kept is the caller's choice (`KEEP`), by cost against bytes (docs/DESIGN.md §3.5):

  "tables"  the text embedding with its positions, the RoPE tables, the pixel sin-cos axes, sigma:
            small, and every forward would rebuild them
  "tokens"  + the adapter's conv stack output [B, L, adapter_hidden]: 2-6% of a forward's work
            (released sizes at 2048 px) for adapter_hidden values per patch token
  "heads"   the adapter's head outputs instead of its tokens [B, L, hidden] per gate: another ~1% of
            the work for 8 to 15 times the bytes of the tokens
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

KEEP = ("tables", "tokens", "heads")

Table = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Prepared:
    """The step-invariant inputs of a forward over `batch` images of a `grid` of patches."""

    batch: int
    grid: tuple[int, int]  # patches (rows, columns)
    keep: str  # one of KEEP
    sigma: torch.Tensor  # [B] float32, the latent's noise level
    text: torch.Tensor  # [B, n_txt, hidden]: the text embedder's output plus the position table
    rope_img: Table  # patch tokens' 2-D RoPE (cos, sin)
    rope_txt: Table  # text tokens' 1-D RoPE
    rope_pix: Table  # the pixel blocks' 2-D RoPE over patches
    pixel_dtype: torch.dtype  # the dtype of x the sin-cos axes were cast to
    sincos_cols: torch.Tensor  # [W, d/2]
    sincos_rows: dict = field(default_factory=dict)  # {(first row, rows): [rows, d/2]}, the bands a forward reads
    tokens: Optional[torch.Tensor] = None  # keep "tokens": the adapter's conv stack output [B, L, adapter_hidden]
    heads: Optional[tuple[torch.Tensor, ...]] = None  # keep "heads": one [B, L, hidden] per gated patch block
    pixel_head: Optional[torch.Tensor] = None  # keep "heads", v1.5: the pixel blocks' gate feature

    @property
    def nbytes(self) -> int:
        """Bytes held (tensors only)."""
        tensors = [self.sigma, self.text, *self.rope_img, *self.rope_txt, *self.rope_pix, self.sincos_cols,
                   *self.sincos_rows.values(), self.tokens, *(self.heads or ()), self.pixel_head]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def check(self, batch: int, grid: tuple[int, int]) -> None:
        if (batch, tuple(grid)) != (self.batch, tuple(self.grid)):
            raise ValueError(f"prepared for {self.batch} image(s) of {self.grid[0]}x{self.grid[1]} patches, called "
                             f"with {batch} of {grid[0]}x{grid[1]}")


class PreparedCache:
    """The prepared inputs of one decode by key (the canvas, a tile batch, a guidance branch): made at the
    first forward of a key, reused at every later one. Keys are the caller's: one key, one set of
    (latent, text, sigma) for the whole decode. Entries of one tile shape share their tables."""

    def __init__(self, network, keep: str, chunk_tokens: Optional[int]):
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
        self.network, self.keep, self.chunk_tokens = network, keep, chunk_tokens
        self.entries: dict = {}
        self._last: Optional[Prepared] = None

    def get(self, key, x: torch.Tensor, latent: torch.Tensor, text: torch.Tensor, sigma: torch.Tensor) -> Prepared:
        entry = self.entries.get(key)
        if entry is None:
            P = self.network.config.patch_size
            grid = (x.shape[-2] // P, x.shape[-1] // P)
            entry = self.network.prepare(latent, text, sigma, grid, keep=self.keep, pixel_dtype=x.dtype,
                                         chunk_tokens=self.chunk_tokens, tables_from=self._last)
            self.entries[key] = self._last = entry
        return entry

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for entry in self.entries.values():
            for t in (entry.sigma, entry.text, *entry.rope_img, *entry.rope_txt, *entry.rope_pix, entry.sincos_cols,
                      *entry.sincos_rows.values(), entry.tokens, *(entry.heads or ()), entry.pixel_head):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
        return total
