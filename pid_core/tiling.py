"""Tiled decoding: any output size inside a memory budget, every tile inside the trained range.

PiD attends over the whole canvas (spec 9): 16x the attention work of 2K at 4K, 256x at 8K, and the
models drift in colour beyond the sizes they were trained on (spec 3, 8). Tiling here is a *velocity
function over the canvas*, so the sampler (`sampling.sample`) is unchanged:

* the canvas is covered by overlapping tiles of one shape (`plan_tiles`), whose origins and sizes are
  multiples of the output pixels per latent cell, so each tile's latent is an exact slice;
* at every step each tile is run as a whole image of tile size (its own RoPE grid and pixel sin-cos
  table, as in training), several tiles per forward, and the tiles' velocities are fused with smooth
  separable weights (raised-cosine ramps across each overlap, 1 elsewhere, a partition of unity);
* fusing v is fusing x0 (x0 = x - t v with the shared x), so all tiles share one state at every step
  and the sampler's one global noise field is, in effect, cropped per tile.

A canvas not larger than the tile is one tile with weight 1: the result is bit-identical to calling
the network on the whole canvas.

Seam figure (`seam_figure`): for a decoded image and its tile layout, the mean |difference| of the
horizontally and vertically adjacent pixel pairs that straddle a tile edge (the pair (p-1, p) where p
is the first or one past the last row/column of a tile, inside the canvas), divided by the same mean
over the pairs that straddle a *patch* edge (p a multiple of the patch size) at least one patch away
from every tile edge. Tile edges are patch edges too, so both sides compare like with like; 1.0 means
a tile border is indistinguishable from any other patch border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch

from .network import PidConfig

DEFAULT_MAX_BATCH_TILES = 4
MIN_TILE_PX = 512  # below the trained range: used only when the memory budget leaves nothing larger
# The latent adapter's conv stack (2 + 2 x 4 convs of 3x3 on the patch grid) sees 10 patches around a
# token: tile edges (zero or replicate padding) disturb about that far in, so overlaps cover it.
ADAPTER_REACH_PATCHES = 10
PIXEL_CHUNK_BYTES = 128 << 20  # working set of one chunk of the pixel blocks
ESTIMATE_MARGIN = 1.15  # allocator slack and what the formula leaves out
# A canvas this much beyond the trained size (sqrt of the area) or aspect ratio is still decoded in one
# pass when it fits in memory: the margins at which variants.check_output_size starts to warn.
TRAINED_TOLERANCE = 1.15
ASPECT_TOLERANCE = 1.2


# --------------------------------------------------------------------------------------------------
# Layout


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


# --------------------------------------------------------------------------------------------------
# The tiled velocity


ModelCall = Callable[..., torch.Tensor]  # (x [N,3,h,w], t [N], latent [N,C,lh,lw], *conditioning) -> v


class TiledVelocity:
    """A velocity function (x [B,3,H,W], t [B]) -> v [B,3,H,W] over the canvas, computed per tile.

    model_call(x_tiles, t_tiles, latent_tiles, *conditioning_tiles) runs the network on a batch of
    tiles: rows are tile-major (tile j, sample b at row j*B + b) and every tensor of `conditioning`
    (per sample, first dim B: the text, sigma) is repeated per tile the same way. `latent` is the
    PiD-space latent of the canvas: the tile at (y0, x0, h, w) gets latent[..., y0/scale:(y0+h)/scale,
    x0/scale:(x0+w)/scale]. Tiles run on `device` (default: the canvas's); results come back to the
    canvas's device in x's dtype. callback_per_tile(done, total) runs after each batch (raise from
    it to cancel). pad_batches pads the last batch with repeats so that every forward has the same
    shape (for torch.compile). max_batches (benchmarks only) stops each call after that many batches
    and sets `cut_short`.

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
        *,
        canvas_hw: tuple[int, int],
        tile_hw,
        overlap: int,
        scale: int,
        patch_size: int = 16,
        batch_tiles: int = 1,
        conditioning: Sequence[torch.Tensor] = (),
        device=None,
        callback_per_tile: Optional[Callable[[int, int], None]] = None,
        pad_batches: bool = False,
        max_batches: Optional[int] = None,
    ):
        H, W = canvas_hw
        if latent.shape[-2] * scale != H or latent.shape[-1] * scale != W:
            raise ValueError(
                f"tiling needs the canvas to be the latent size x {scale}: latent "
                f"{latent.shape[-1]}x{latent.shape[-2]} -> {latent.shape[-1] * scale}x{latent.shape[-2] * scale}, canvas {W}x{H}"
            )
        self.model_call = model_call
        self.latent = latent
        self.canvas_hw = (H, W)
        self.scale = scale
        self.align = math.lcm(scale, patch_size)
        self.tiles = plan_tiles((H, W), tile_hw, overlap, self.align)
        self.row_weights, self.col_weights = tile_weights(self.tiles, (H, W))
        self.batch_tiles = max(1, int(batch_tiles))
        self.conditioning = tuple(conditioning)
        self.device = torch.device(device) if device is not None else None
        self.callback_per_tile = callback_per_tile
        self.pad_batches = pad_batches
        self.max_batches = max_batches
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
        device = self.device or x.device
        t = t.reshape(-1).expand(B)
        wy, wx = self._weights(x.device, x.dtype)
        batches = self.batches()
        full = len(batches[0])
        done = 0
        self.cut_short = False
        for index, batch in enumerate(batches):
            if self.max_batches is not None and index >= self.max_batches:
                self.cut_short = True
                return
            run = list(batch)
            if self.pad_batches and len(run) < full:
                run += [run[-1]] * (full - len(run))
            n = len(run)
            xs = torch.cat([x[(..., *tile.slices)] for tile in run]).to(device)
            zs = torch.cat([self._latent_tile(tile) for tile in run]).to(device)
            ts = t.repeat(n).to(device)
            conds = [c.to(device).repeat(n, *([1] * (c.dim() - 1))) for c in self.conditioning]
            v = self.model_call(xs, ts, zs, *conds)
            del xs, zs, conds
            self.forward_calls += 1
            yield [
                (tile, v[j * B : (j + 1) * B].to(x.device, x.dtype), wy[tile.row][:, None] * wx[tile.col][None, :])
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


def batch_tiles(tiles: Sequence[Tile], most: int) -> list[list[Tile]]:
    """Row-major tiles in batches of at most `most`, balanced: 9 tiles at most 4 a batch -> 3 x 3, not 4 + 4 + 1."""
    count = len(tiles)
    n_batches = math.ceil(count / max(1, most))
    n = math.ceil(count / n_batches)
    return [list(tiles[i : i + n]) for i in range(0, count, n)]


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
        from .sampling import velocity_to_x0

        for y, r, n in self._pieces(y0, y1):
            rows = x[..., y : y + n, :]
            velocity_to_x0(rows, self.buf[..., r : r + n, :], t, out=rows)
            self.buf[..., r : r + n, :].zero_()
        return max(y0, y1)


# --------------------------------------------------------------------------------------------------
# Memory estimate and automatic tile size


def _act_bytes(dtype) -> int:
    return 2 if dtype in (torch.bfloat16, torch.float16) else 4


def auto_chunk_tokens(config: PidConfig, dtype=torch.float32, budget_bytes: int = PIXEL_CHUNK_BYTES) -> int:
    """Patch tokens per chunk of the pixel blocks so that one chunk's working set stays near budget."""
    return max(64, int(budget_bytes // _pixel_chunk_bytes_per_token(config, _act_bytes(dtype))) // 64 * 64)


def _pixel_chunk_bytes_per_token(cfg: PidConfig, a: int) -> int:
    """Working set per patch token of the per-pixel part of a pixel block: the modulation (6 groups of
    pixel_hidden per pixel, computed 2 then 4 at a time when chunked), the MLP's hidden layer before
    and after GELU and two fp32 stream-sized temporaries."""
    p2, d = cfg.patch_size**2, cfg.pixel_hidden_size
    return p2 * (4 * d * a + 2 * d * 4 + 2 * cfg.pixel_mlp_hidden * a)


def tile_memory_estimate(
    config: PidConfig,
    tile_hw,
    *,
    dtype=torch.float32,
    batch: int = 1,
    chunk_tokens: Optional[int] | str = "auto",
    text_tokens: Optional[int] = None,
    attention: str = "flash",
) -> int:
    """Working memory in bytes (beyond the weights) of one forward over `batch` images of tile_hw.

    From the network's sizes: the patch-block residual stream in fp32 and the largest transient of a
    patch block (SwiGLU hidden x3, or q/k/v with fp32 RoPE temporaries), one adapter head at a time,
    the pixel stream ([tokens, P*P, pixel_hidden] fp32, in and out) and the pixel blocks' per-pixel
    working set for the whole canvas (unchunked) or one chunk; attention "flash" (SDPA's flash or
    memory-efficient kernels, linear in tokens, used for every attention here on CUDA and CPU) or
    "math" (the full [heads, N, N] score matrix). dtype: the compute dtype (bf16 weights run under
    bf16 autocast). Calibrated against measurements of the full-size model on CPU (pid_core.bench).
    """
    th, tw = (tile_hw, tile_hw) if isinstance(tile_hw, int) else tile_hw
    cfg = config
    a = _act_bytes(dtype)
    P, D, M = cfg.patch_size, cfg.hidden_size, cfg.mlp_hidden
    L = (th // P) * (tw // P)
    T = text_tokens if text_tokens is not None else cfg.text_max_tokens
    N = batch * L
    p2, d, Dp = P * P, cfg.pixel_hidden_size, cfg.pixel_attn_hidden_size
    io = 3 * p2 * 4 + 3 * p2 * a  # the tile batch x (fp32) and its velocity
    # Patch phase: residual (fp32), adapter tokens, and the larger transient of a block: SwiGLU (its
    # fp32 modulated input, the bf16/fp32 copy, hidden x3) or attention (modulated input, qkv, roped
    # q and k, the concatenated [text; image] q/k/v and the output).
    mlp = 4 * D + D * a + 3 * M * a
    attn = 4 * D + 9 * D * a
    patch = N * (D * 4 + cfg.adapter_hidden * 4 + io + max(mlp, attn)) + batch * T * D * 16
    # Pixel phase: s_cond (fp32), the pixel stream (fp32), compressed tokens and attention, the per-pixel
    # working set of one chunk; unchunked, also the embedding and read-out temporaries (3 streams).
    stream = p2 * d * 4
    chunk = N if chunk_tokens in (None, 0) else (
        auto_chunk_tokens(cfg, dtype) if chunk_tokens == "auto" else int(chunk_tokens))
    chunk = min(chunk, N)
    pixel = N * (D * 4 + stream + 6 * Dp * a + io) + chunk * _pixel_chunk_bytes_per_token(cfg, a)
    if chunk == N:
        pixel = max(pixel, N * (D * 4 + 4 * stream + io))
    total = max(patch, pixel)
    if attention == "math":
        heads = max(cfg.num_heads, cfg.pixel_num_heads)
        total += batch * heads * (L + T) ** 2 * max(a, 4) * 2
    return int(total * ESTIMATE_MARGIN)


CANVASES = 2  # fp32 canvases alive at once in sampling.sample over a TiledVelocity (see below)


def canvas_memory_estimate(canvas_hw: tuple[int, int], batch: int = 1) -> int:
    """The decode's canvas-size state (fp32, 12 bytes per pixel each) next to the network: while tiles
    run, the state x and the band of fused v (TiledVelocity.denoise_in_place, at most a canvas); while
    re-noising, x0 and the fresh noise. Plus the float64 slices of the x0 update (bounded)."""
    H, W = canvas_hw
    return CANVASES * batch * 3 * H * W * 4 + (64 << 20)


def trained_tile_range(config: PidConfig, variant=None) -> tuple[int, int]:
    """(smallest, largest) tile side in px inside the checkpoint's training range, as sqrt(h*w).

    The 2K-to-4K students were trained up to 3840 px and are released for 1024 -> 4096 decodes
    (their Comfy-Org names say 1024_to_4096), so 4096 counts as trained; 2K students: 2048. Unknown
    models (custom or test checkpoints): by layout, v1.5 as 2K-to-4K, v1 as 2K."""
    if variant is not None:
        low, high = variant.trained_px
        if high > 2048:
            high = max(high, 4096)
        return low, high
    return (2048, 4096) if config.layout == "v1.5" else (2048, 2048)


@dataclass(frozen=True)
class TileOptions:
    """How PiD Decode tiles. mode "auto": tile only when the canvas is larger than the checkpoint's
    trained size or the working memory would not fit `memory_budget_bytes` (None: no memory limit),
    with the largest tile that fits; "off": never tile; "manual": tiles of `tile_px` (square, output
    px). overlap_px 0 = automatic (`default_overlap`: an eighth of the tile, at least the adapter's
    reach of 160 px, at most a quarter of the tile). memory_budget_bytes: the free memory of the
    compute device beyond the loaded weights (None: no limit); what is left of it after the sampler's
    canvas state (`canvas_memory_estimate`, when the state is on that device) bounds the working memory
    of one forward (`tile_memory_estimate`). canvas_on_device: where the sampler's state lives; None
    (auto) keeps it with the network unless it would take more than a quarter of the budget, then on
    the CPU (tiles travel to the device and their v back: a few MB per tile and step)."""

    mode: str = "auto"
    tile_px: int = 0
    overlap_px: int = 0
    memory_budget_bytes: Optional[int] = None
    max_batch_tiles: int = DEFAULT_MAX_BATCH_TILES
    pixel_chunk_tokens: Optional[int] | str = "auto"  # None: unchunked pixel blocks
    canvas_on_device: Optional[bool] = None

    def __post_init__(self):
        if self.mode not in ("auto", "off", "manual"):
            raise ValueError(f"tiling mode must be auto, off or manual, got {self.mode!r}")
        if self.mode == "manual" and self.tile_px <= 0:
            raise ValueError("manual tiling needs tile_px > 0")
        if self.tile_px < 0 or self.overlap_px < 0:
            raise ValueError("tile_px and overlap_px must not be negative")


@dataclass(frozen=True)
class TilePlan:
    """What `choose_tile` / `plan_decode` decided. tiled False: run the network on the whole canvas."""

    canvas_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    overlap: int
    batch_tiles: int
    align: int
    tiles: tuple = field(repr=False, default=())
    estimate_bytes: int = 0
    below_trained: bool = False
    fits_budget: bool = True
    pixel_chunk_tokens: Optional[int] = None
    reason: str = ""
    canvas_on_device: bool = True  # the sampler's state on the compute device (False: on the CPU)

    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 1

    @property
    def grid(self) -> tuple[int, int]:
        return len({t.y0 for t in self.tiles}), len({t.x0 for t in self.tiles})


def default_overlap(tile_px: int, align: int, patch_size: int = 16) -> int:
    """An eighth of the tile, at least the adapter's reach (160 px), at most a quarter of the tile."""
    want = min(max(tile_px // 8, ADAPTER_REACH_PATCHES * patch_size), tile_px // 4)
    return max(align, math.ceil(want / align) * align)


def _tile_shape(canvas_hw, side: int, align: int, max_aspect: float) -> tuple[int, int]:
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


def choose_tile(
    config: PidConfig,
    canvas_hw: tuple[int, int],
    *,
    memory_budget_bytes: Optional[int],
    dtype=torch.float32,
    variant=None,
    batch: int = 1,
    overlap: int = 0,
    max_batch_tiles: int = DEFAULT_MAX_BATCH_TILES,
    chunk_tokens: Optional[int] | str = "auto",
    tile_px: Optional[int] = None,
) -> TilePlan:
    """The largest tile inside the checkpoint's trained range whose working memory (for `batch`
    samples, `tile_memory_estimate`) fits the budget, then as many tiles per forward as still fit.

    A canvas inside the trained range that fits is one tile (untiled). When even the smallest trained
    tile does not fit, smaller tiles down to MIN_TILE_PX are tried (below_trained=True); when nothing
    fits, the smallest trained tile is returned with fits_budget=False. tile_px forces the tile side
    (manual)."""
    from .variants import MAX_TRAINED_ASPECT

    H, W = canvas_hw
    align = math.lcm(config.scale, config.patch_size)
    low, high = trained_tile_range(config, variant)
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes
    chunk = auto_chunk_tokens(config, dtype) if chunk_tokens == "auto" else chunk_tokens

    def estimate(shape, n=1):
        return tile_memory_estimate(config, shape, dtype=dtype, batch=n * batch, chunk_tokens=chunk)

    if tile_px:
        sides = [max(align, tile_px // align * align)]
    else:
        top = max(align, high // align * align)
        sides = list(range(top, max(align, low // align * align) - 1, -align))
        sides += list(range(sides[-1] - align, max(align, MIN_TILE_PX // align * align) - 1, -align))
    chosen = None
    whole_fits = (
        not tile_px
        and math.sqrt(H * W) <= high * TRAINED_TOLERANCE
        and max(H, W) / min(H, W) <= MAX_TRAINED_ASPECT * ASPECT_TOLERANCE
        and estimate((H, W)) <= budget
    )
    if whole_fits:
        chosen = max(H, W), (H, W)
    def shape_for(side):
        if tile_px:  # by hand: square, clamped to the canvas
            return tuple(n if side >= n else side for n in (H, W))
        return _tile_shape((H, W), side, align, MAX_TRAINED_ASPECT)

    for side in ([] if whole_fits else sides):
        if estimate(shape_for(side)) <= budget:
            chosen = side, shape_for(side)
            break
    if chosen is None:  # nothing fits: smaller tiles would only cost quality; keep the trained size
        side = sides[0] if tile_px else max(align, low // align * align)
        chosen = side, shape_for(side)
    side, shape = chosen
    fits = estimate(shape) <= budget
    ov = overlap or default_overlap(min(shape), align, config.patch_size)
    ov = math.ceil(ov / align) * align
    tiles = tuple(plan_tiles((H, W), shape, ov, align))
    n = 1
    while n < min(max_batch_tiles, len(tiles)) and estimate(shape, n + 1) <= budget:
        n += 1
    n = len(batch_tiles(tiles, n)[0])  # balanced: 9 tiles at most 4 a batch run as 3 x 3
    below = (side < low) and len(tiles) > 1
    if len(tiles) == 1:
        reason = f"untiled: {W}x{H} fits in one pass"
    else:
        gy, gx = len({t.y0 for t in tiles}), len({t.x0 for t in tiles})
        if tile_px:
            why = "tile size set by hand"
        elif side < sides[0]:
            why = "largest tile inside the memory budget" + ("; below the trained size" if below else "")
        else:
            why = f"the checkpoint's trained size ({high} px)"
        reason = f"{gx}x{gy} tiles of {shape[1]}x{shape[0]} px, overlap {ov} px, {n} per forward: {why}"
        if not fits:
            reason += f"; no tile down to {MIN_TILE_PX} px fits the memory budget"
    return TilePlan(
        canvas_hw=(H, W), tile_hw=shape, overlap=ov, batch_tiles=n, align=align, tiles=tiles,
        estimate_bytes=estimate(shape, n), below_trained=below, fits_budget=fits,
        pixel_chunk_tokens=chunk, reason=reason,
    )


def plan_decode(
    config: PidConfig,
    canvas_hw: tuple[int, int],
    options: Optional[TileOptions] = None,
    *,
    dtype=torch.float32,
    variant=None,
    batch: int = 1,
) -> TilePlan:
    """The plan PiD Decode runs for `options` (None = TileOptions(), i.e. auto)."""
    options = options or TileOptions()
    H, W = canvas_hw
    align = math.lcm(config.scale, config.patch_size)
    chunk = auto_chunk_tokens(config, dtype) if options.pixel_chunk_tokens == "auto" else options.pixel_chunk_tokens
    if options.mode == "off":
        return TilePlan(
            canvas_hw=(H, W), tile_hw=(H, W), overlap=0, batch_tiles=1, align=align,
            tiles=(Tile(0, 0, H, W, 0, 0),), pixel_chunk_tokens=chunk,
            estimate_bytes=tile_memory_estimate(config, (H, W), dtype=dtype, batch=batch, chunk_tokens=chunk),
            reason="untiled: tiling off", canvas_on_device=options.canvas_on_device is not False,
        )
    budget = options.memory_budget_bytes
    canvas = canvas_memory_estimate((H, W), batch)
    on_device = options.canvas_on_device
    if on_device is None:
        on_device = budget is None or canvas <= budget / 4
    if budget is not None and on_device:
        budget = max(0, budget - canvas)
    plan = choose_tile(
        config, (H, W), memory_budget_bytes=budget, dtype=dtype, variant=variant,
        batch=batch, overlap=options.overlap_px, max_batch_tiles=options.max_batch_tiles,
        chunk_tokens=chunk, tile_px=options.tile_px if options.mode == "manual" else None,
    )
    reason = plan.reason
    if not on_device:
        reason += f"; sampler state (~{canvas / 2**30:.1f} GB) kept on the CPU"
    elif not plan.fits_budget:
        reason += (f"; the sampler's canvas state alone takes ~{canvas / 2**30:.1f} GB: keep it on the CPU "
                   "(canvas_on_device=False)")
    return replace(plan, reason=reason, canvas_on_device=on_device)


def device_memory_budget(device, *, fraction: float = 0.85) -> Optional[int]:
    """A working-memory budget from what the device has free now (CUDA: free memory; CPU:
    MemAvailable); None when unknown. Inside ComfyUI prefer comfy.model_management.get_free_memory."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * fraction)
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(int(line.split()[1]) * 1024 * fraction)
    except (OSError, RuntimeError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------------------------------
# Putting it together for a PidNet


def make_velocity(
    model,
    text: torch.Tensor,
    latent: torch.Tensor,
    sigma: torch.Tensor,
    *,
    plan: Optional[TilePlan] = None,
    device=None,
    callback_per_tile: Optional[Callable[[int, int], None]] = None,
    autocast: bool = True,
    max_batches: Optional[int] = None,
    pad_batches: bool = False,
    network=None,
):
    """The velocity function for `sampling.sample`: the network on the whole canvas (plan None or
    untiled) or a TiledVelocity. text [B|1, T, text_dim], latent [B, C, h, w] (PiD space), sigma [B]|[1].

    The network runs on `device` (default: the latent's), under the weights' autocast when `autocast`,
    with the plan's pixel-block chunking. `network` replaces `model` as the callable (for example a
    torch.compile'd model: `speed.compile_model`); `model` still gives the config and dtype. The canvas
    (noise, x) may live elsewhere (CPU for small cards): tiles travel to `device` and v comes back.
    The tiled velocity streams: the sampler never holds a whole-canvas v (TiledVelocity)."""
    from .precision import compute_context

    net = network if network is not None else model
    B = latent.shape[0]
    device = torch.device(device) if device is not None else latent.device
    text = text.expand(B, -1, -1) if text.shape[0] == 1 and B > 1 else text
    sigma = sigma.reshape(-1).float()
    sigma = sigma.expand(B) if sigma.numel() == 1 else sigma
    chunk = plan.pixel_chunk_tokens if plan is not None else None

    def call(x, t, z, y, s):
        with torch.no_grad(), (compute_context(model, device) if autocast else _null()):
            return net(x, t, y, z, s, chunk_tokens=chunk)

    if plan is None or not plan.tiled:
        text_d, latent_d, sigma_d = text.to(device), latent.to(device), sigma.to(device)

        def whole(x, t):
            v = call(x.to(device), t.reshape(-1).expand(x.shape[0]).to(device), latent_d, text_d, sigma_d)
            return v.to(x.device)

        return whole
    config = model.config
    return TiledVelocity(
        call, latent, canvas_hw=plan.canvas_hw, tile_hw=plan.tile_hw, overlap=plan.overlap,
        scale=config.scale, patch_size=config.patch_size, batch_tiles=plan.batch_tiles,
        conditioning=(text, sigma), device=device, callback_per_tile=callback_per_tile,
        max_batches=max_batches, pad_batches=pad_batches,
    )


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------------------------------
# Seam figure


def _edge_positions(starts: Sequence[int], t: int, n: int) -> set:
    edges = set()
    for s in starts:
        if 0 < s < n:
            edges.add(s)
        if 0 < s + t < n:
            edges.add(s + t)
    return edges


def seam_figure(image: torch.Tensor, tiles: Sequence[Tile], patch_size: int = 16) -> float:
    """Mean |diff| across tile edges / mean |diff| across patch edges away from tile edges (see the
    module docstring). image [B, C, H, W] (or [C, H, W]); nan when there are no tile edges."""
    img = image.double()
    if img.dim() == 3:
        img = img[None]
    H, W = img.shape[-2:]
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    seam_sum = seam_n = inner_sum = inner_n = 0.0
    for axis, n, starts, t in ((-2, H, ys, tiles[0].h), (-1, W, xs, tiles[0].w)):
        edges = _edge_positions(starts, t, n)
        if not edges and len(starts) <= 1:
            continue
        far = [p for p in range(patch_size, n, patch_size) if all(abs(p - e) >= patch_size for e in edges)]
        for positions, is_seam in ((sorted(edges), True), (far, False)):
            if not positions:
                continue
            idx = torch.tensor(positions)
            diff = (img.index_select(axis, idx) - img.index_select(axis, idx - 1)).abs()
            if is_seam:
                seam_sum += diff.sum().item()
                seam_n += diff.numel()
            else:
                inner_sum += diff.sum().item()
                inner_n += diff.numel()
    if seam_n == 0 or inner_n == 0:
        return float("nan")
    return (seam_sum / seam_n) / (inner_sum / inner_n)
