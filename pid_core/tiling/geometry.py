"""Tile geometry: where the tiles lie on the canvas and how much each one counts at each pixel.

Tiles are all of one shape (they batch, and compile with static shapes), overlap their neighbours and
start on multiples of `align` (the lcm of the output pixels per latent cell and the patch size), so
each tile's latent is an exact slice of the canvas's latent. Their weights are separable: raised-cosine
ramps across each overlap, 1 elsewhere, normalised to a partition of unity (docs/DESIGN.md §9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

MIN_TILE_PX = 512  # below the trained range: used only when the memory budget leaves nothing larger
SMALLEST_TILE_PX = 64  # the least a user may ask for by hand: a 4 x 4 patch grid
# The latent adapter's conv stack (2 + 2 x 4 convs of 3x3 on the patch grid) sees 10 patches around a
# token: tile edges (zero or replicate padding) disturb about that far in, so overlaps cover it.
ADAPTER_REACH_PATCHES = 10


@dataclass(frozen=True)
class Tile:
    y0: int
    x0: int
    h: int
    w: int
    row: int  # index in the grid of tiles
    col: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.h), slice(self.x0, self.x0 + self.w)


def _axis_starts(n: int, t: int, overlap: int, align: int) -> list[int]:
    """Start offsets of tiles of size t along an axis of n: first at 0, last at n - t, evenly spread,
    multiples of `align` (n - t must be one), neighbours overlapping by at least `overlap`."""
    if t >= n:
        return [0]
    if (n - t) % align:
        raise ValueError(f"axis {n} minus tile {t} is not a multiple of the alignment {align}")
    overlap = min(overlap, t - align)
    count = max(2, math.ceil((n - t) / max(align, t - overlap)) + 1)
    while True:
        starts = [round(i * (n - t) / (count - 1) / align) * align for i in range(count)]
        if max(b - a for a, b in zip(starts, starts[1:])) <= t - overlap:
            return starts
        count += 1


def plan_tiles(canvas_hw: tuple[int, int], tile_hw, overlap: int, align: int = 16) -> list[Tile]:
    """Overlapping tiles covering the canvas, row-major, all of one shape (so they batch and compile
    with static shapes). tile_hw: int or (h, w), clamped to the canvas and rounded down to `align`;
    canvas sides must be multiples of `align`. A canvas within the tile gives exactly one tile."""
    H, W = canvas_hw
    th, tw = (tile_hw, tile_hw) if isinstance(tile_hw, int) else tile_hw
    if H % align or W % align:
        raise ValueError(f"canvas {W}x{H} is not a multiple of the tile alignment {align} px")
    th = H if th >= H else max(align, th // align * align)
    tw = W if tw >= W else max(align, tw // align * align)
    ys = _axis_starts(H, th, overlap, align)
    xs = _axis_starts(W, tw, overlap, align)
    return [Tile(y, x, th, tw, r, c) for r, y in enumerate(ys) for c, x in enumerate(xs)]


def _ramp(m: int) -> torch.Tensor:
    """Raised cosine rising over m samples, strictly inside (0, 1): r(k) + r(m-1-k) = 1."""
    k = torch.arange(m, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(math.pi * (k + 0.5) / m)


def axis_weights(starts: Sequence[int], t: int, n: int) -> list[torch.Tensor]:
    """Per-tile 1-D weights (float32 [t]) along one axis, normalised so that they sum to 1 at every
    position of the axis. Ramps only where a tile meets a neighbour; never 0; 1 where one tile covers."""
    raw = []
    for i, s in enumerate(starts):
        w = torch.ones(t, dtype=torch.float64)
        if i > 0:
            m = starts[i - 1] + t - s  # overlap with the previous tile
            if m > 0:
                w[:m] *= _ramp(m)
        if i + 1 < len(starts):
            m = s + t - starts[i + 1]
            if m > 0:
                w[t - m :] *= _ramp(m).flip(0)
        raw.append(w)
    total = torch.zeros(n, dtype=torch.float64)
    for s, w in zip(starts, raw):
        total[s : s + t] += w
    return [(w / total[s : s + t]).float() for s, w in zip(starts, raw)]


def tile_weights(tiles: Sequence[Tile], canvas_hw: tuple[int, int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(row weights per grid row, column weights per grid column); a tile's weight is the outer product
    wy[tile.row][:, None] * wx[tile.col][None, :], and the weights of all tiles sum to 1 everywhere."""
    H, W = canvas_hw
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    return axis_weights(ys, tiles[0].h, H), axis_weights(xs, tiles[0].w, W)



def batch_tiles(tiles: Sequence[Tile], most: int) -> list[list[Tile]]:
    """Row-major tiles in batches of at most `most`, balanced: 9 tiles at most 4 a batch -> 3 x 3, not 4 + 4 + 1."""
    count = len(tiles)
    n_batches = math.ceil(count / max(1, most))
    n = math.ceil(count / n_batches)
    return [list(tiles[i : i + n]) for i in range(0, count, n)]



def default_overlap(tile_px: int, align: int, patch_size: int = 16) -> int:
    """An eighth of the tile, at least the adapter's reach (160 px), at most a quarter of the tile."""
    want = min(max(tile_px // 8, ADAPTER_REACH_PATCHES * patch_size), tile_px // 4)
    return max(align, math.ceil(want / align) * align)


def tile_shape(canvas_hw, side: int, align: int, max_aspect: float) -> tuple[int, int]:
    """A tile of about side x side px (area side^2) that fits the canvas: a side the canvas is narrower
    than is taken whole and the other grows, up to the widest trained aspect ratio."""
    H, W = canvas_hw
    th, tw = min(H, side), min(W, side)
    if th < side and tw == side:
        tw = min(W, side * side // th, int(th * max_aspect))
    elif tw < side and th == side:
        th = min(H, side * side // tw, int(tw * max_aspect))
    th = H if th >= H else max(align, th // align * align)
    tw = W if tw >= W else max(align, tw // align * align)
    return th, tw

