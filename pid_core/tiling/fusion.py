"""Fusion: the tiles' velocities combined into one state for the whole canvas at every step.

Each tile is run as a whole image of tile size (its own RoPE grid and pixel sin-cos table, as in
training), several tiles per forward. Fusing v with weights that sum to 1 is fusing x0 (x0 = x - t v
with the shared x), so all tiles share one state at every step and the sampler's one global noise field
is, in effect, cropped per tile. A canvas not larger than the tile is one tile of weight 1: the result
is bit-identical to calling the network on the whole canvas (docs/DESIGN.md §9).
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence

import torch

from ..sampling import velocity_to_x0
from .geometry import Tile, batch_tiles, tile_weights

ModelCall = Callable[..., torch.Tensor]  # (x [N,3,h,w], t [N], latent [N,C,lh,lw], *conditioning) -> v
# (forward, batches, blank) -> each batch's v, in batch order: forward(batch) runs the network on a batch
# of tiles, blank(n_tiles) allocates a v of n tiles (the shape, dtype and device forward returns).
BatchRunner = Callable[[Callable[[list[Tile]], torch.Tensor], Sequence[list[Tile]], Callable[[int], torch.Tensor]],
                       Iterator[torch.Tensor]]


def run_here(forward, batches, blank):
    """The batch runner of one process: every batch here, in order, each when the fusion asks for it.
    (distributed.TileParallel spreads them over torchrun's ranks instead, docs/DESIGN.md §14.)"""
    for batch in batches:
        yield forward(batch)


class TiledVelocity:
    """A velocity function (x [B,3,H,W], t [B]) -> v [B,3,H,W] over the canvas, computed per tile.

    `tiles` cover the canvas (geometry.plan_tiles, row-major, one shape). model_call(x_tiles, t_tiles,
    latent_tiles, *conditioning_tiles) runs the network on a batch of tiles: rows are tile-major (tile j,
    sample b at row j*B + b) and every tensor of `conditioning` (per sample, first dim B: the text, sigma)
    is repeated per tile the same way. `latent` is the PiD-space latent of the canvas: the tile at
    (y0, x0, h, w) gets latent[..., y0/scale:(y0+h)/scale, x0/scale:(x0+w)/scale]. Tiles run on
    `device`; results come back to the canvas's device in x's dtype. callback_per_tile(done, total) runs
    after each batch (raise from it to cancel). pad_batches pads the last batch with repeats so that every forward has the same
    shape (for torch.compile). max_batches (benchmarks only) stops each call after that many batches
    and sets `cut_short`. batch_runner decides where the batches run: `run_here` (default) runs each
    in this process; distributed.TileParallel shares them among torchrun's ranks (docs/DESIGN.md §14).
    keyed: model_call also takes key=, the positions of the batch's tiles: the same key means the same
    latent and conditioning at every step (what the network's step cache is keyed by).

    `sampling.sample` calls `denoise_in_place`, which never holds a whole-canvas v: tiles run in
    row-major order, their weighted velocities add into a band of rows one tile high (reused as a
    ring), and as soon as no later tile covers a row its x0 is written over x. Calling the object
    returns the fused v of the whole canvas instead. Both add the same terms in the same order, so
    they agree bit for bit.
    """

    def __init__(
        self,
        model_call: ModelCall,
        latent: torch.Tensor,
        tiles: Sequence[Tile],
        *,
        scale: int,
        device,
        batch_tiles: int = 1,
        conditioning: Sequence[torch.Tensor] = (),
        callback_per_tile: Optional[Callable[[int, int], None]] = None,
        pad_batches: bool = False,
        max_batches: Optional[int] = None,
        batch_runner: Optional[BatchRunner] = None,
        keyed: bool = False,
    ):
        H, W = latent.shape[-2] * scale, latent.shape[-1] * scale
        if max(t.y0 + t.h for t in tiles) != H or max(t.x0 + t.w for t in tiles) != W:
            raise ValueError(f"the tiles do not cover the canvas {W}x{H} of this latent x {scale}")
        self.model_call = model_call
        self.latent = latent
        self.canvas_hw = (H, W)
        self.scale = scale
        self.tiles = list(tiles)
        self.row_weights, self.col_weights = tile_weights(self.tiles, (H, W))
        self.batch_tiles = max(1, int(batch_tiles))
        self.conditioning = tuple(conditioning)
        self.device = torch.device(device)
        self.callback_per_tile = callback_per_tile
        self.pad_batches = pad_batches
        self.max_batches = max_batches
        self.batch_runner = batch_runner or run_here
        self.keyed = keyed
        self.cut_short = False
        self.forward_calls = 0
        self._weights_on: dict = {}

    @property
    def tile_hw(self) -> tuple[int, int]:
        return self.tiles[0].h, self.tiles[0].w

    def batches(self) -> list[list[Tile]]:
        return batch_tiles(self.tiles, self.batch_tiles)

    def _weights(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._weights_on:
            self._weights_on[key] = (
                [w.to(device, dtype) for w in self.row_weights],
                [w.to(device, dtype) for w in self.col_weights],
            )
        return self._weights_on[key]

    def _latent_tile(self, tile: Tile) -> torch.Tensor:
        s = self.scale
        return self.latent[..., tile.y0 // s : (tile.y0 + tile.h) // s, tile.x0 // s : (tile.x0 + tile.w) // s]

    def _weighted_velocities(self, x: torch.Tensor, t: torch.Tensor):
        """Yields, per batch of tiles in row-major order, [(tile, its v on x's device, its weight)]."""
        B = x.shape[0]
        device = self.device
        t = t.reshape(-1).expand(B)
        wy, wx = self._weights(x.device, x.dtype)
        batches = self.batches()
        self.cut_short = self.max_batches is not None and self.max_batches < len(batches)
        if self.cut_short:
            batches = batches[: self.max_batches]
        full = len(batches[0])

        def forward(batch: list[Tile]) -> torch.Tensor:
            """The network on one batch of tiles: v [len(batch) * B, 3, h, w] in x's dtype, on `device`."""
            run = list(batch)
            if self.pad_batches and len(run) < full:
                run += [run[-1]] * (full - len(run))
            n = len(run)
            xs = torch.cat([x[(..., *tile.slices)] for tile in run]).to(device)
            zs = torch.cat([self._latent_tile(tile) for tile in run]).to(device)
            ts = t.repeat(n).to(device)
            conds = [c.to(device).repeat(n, *([1] * (c.dim() - 1))) for c in self.conditioning]
            self.forward_calls += 1
            # keyed: the batch's tiles name its latent and conditioning, the same at every step (step cache)
            key = {"key": tuple((tile.y0, tile.x0) for tile in run)} if self.keyed else {}
            return self.model_call(xs, ts, zs, *conds, **key)[: len(batch) * B].to(x.dtype)

        def blank(n_tiles: int) -> torch.Tensor:
            return torch.empty((n_tiles * B, x.shape[1], *self.tile_hw), dtype=x.dtype, device=device)

        done = 0
        for batch, v in zip(batches, self.batch_runner(forward, batches, blank)):
            yield [
                (tile, v[j * B : (j + 1) * B].to(x.device), wy[tile.row][:, None] * wx[tile.col][None, :])
                for j, tile in enumerate(batch)
            ]
            del v
            done += len(batch)
            if self.callback_per_tile is not None:
                self.callback_per_tile(done, len(self.tiles))

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The fused velocity of the whole canvas (a new canvas-size tensor)."""
        out = torch.zeros_like(x, memory_format=torch.contiguous_format)
        for parts in self._weighted_velocities(x, t):
            for tile, v, weight in parts:
                out[(..., *tile.slices)].addcmul_(v, weight)
        return out

    def denoise_in_place(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x <- x0 = x - t v (sampling.velocity_to_x0) with the fused v, streamed through a band of rows.

        Tiles are added one at a time in row-major order (a batch's v is already computed) and, after
        each, the rows above the next tile's top are covered by no later tile: their x0 is final. So
        the pending rows never span more than one tile height, whatever the batch."""
        H = self.canvas_hw[0]
        band = RowRing(x, self.tile_hw[0])
        finished = 0  # rows [0, finished) hold x0
        k = 0  # tiles added so far; parts arrive in self.tiles order
        for parts in self._weighted_velocities(x, t):
            for tile, v, weight in parts:
                band.add(tile, v, weight)
                k += 1
                ready = self.tiles[k].y0 if k < len(self.tiles) else H
                finished = band.flush_x0(x, t, finished, ready)
            del parts, v
        band.flush_x0(x, t, finished, H)  # all rows (the rest only when a run was cut short)
        return x



class RowRing:
    """A band of canvas rows ([B, C, rows, W], zeros) addressed by canvas row modulo its height, so it
    slides down the canvas without copies. Rows handed to `flush_x0` are zeroed for reuse."""

    def __init__(self, like: torch.Tensor, rows: int):
        self.rows = rows
        self.buf = torch.zeros((*like.shape[:-2], rows, like.shape[-1]), dtype=like.dtype, device=like.device)

    def _pieces(self, y0: int, y1: int):
        """(canvas row start, ring row start, length) pieces of canvas rows [y0, y1)."""
        y = y0
        while y < y1:
            r = y % self.rows
            n = min(y1 - y, self.rows - r)
            yield y, r, n
            y += n

    def add(self, tile: Tile, v: torch.Tensor, weight: torch.Tensor) -> None:
        cols = slice(tile.x0, tile.x0 + tile.w)
        for y, r, n in self._pieces(tile.y0, tile.y0 + tile.h):
            k = y - tile.y0
            self.buf[..., r : r + n, cols].addcmul_(v[..., k : k + n, :], weight[k : k + n])

    def flush_x0(self, x: torch.Tensor, t: torch.Tensor, y0: int, y1: int) -> int:
        """x[rows] <- x0 from the band's v for canvas rows [y0, y1); returns y1."""
        for y, r, n in self._pieces(y0, y1):
            rows = x[..., y : y + n, :]
            velocity_to_x0(rows, self.buf[..., r : r + n, :], t, out=rows)
            self.buf[..., r : r + n, :].zero_()
        return max(y0, y1)

