"""The tiling policy: which tile size and how many tiles per forward, for a canvas, a checkpoint and a
memory budget (docs/DESIGN.md §9)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..checks import whole_number
from ..errors import ArgumentError
from ..network import PidConfig
from ..variants import MAX_TRAINED_ASPECT, TOO_LARGE, TOO_WIDE
from .geometry import MIN_TILE_PX, Tile, tile_shape, batch_tiles, default_overlap, plan_tiles
from .memory import (
    auto_chunk_tokens, canvas_memory_estimate, device_memory_budget, largest_chunk_within, step_cache_bytes,
    tile_memory_estimate,
)

DEFAULT_MAX_BATCH_TILES = 4
# What a decode may keep from one step to the next (network/prepared.py, docs/DESIGN.md §3.5): nothing,
# the tables, + the adapter's tokens, or its head outputs instead.
STEP_CACHE = ("off", "tables", "tokens", "heads")
# On the CPU the pixel blocks always run in chunks: measured faster there than whole blocks (their
# working set stays in the caches), at a third of the working memory (docs/DESIGN.md §9, README).
CPU_PIXEL_CHUNKS = True


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


LARGEST_PX = 1 << 20  # a bound on tile and overlap sizes, far beyond any image PiD makes


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
    pixel_chunk_tokens: Optional[int] | str = "auto"  # None: unchunked pixel blocks; "auto": choose_pixel_chunks
    canvas_on_device: Optional[bool] = None
    step_cache: str = "auto"  # what a decode computes once and reuses at every step: auto or one of STEP_CACHE

    def __post_init__(self):
        if self.mode not in ("auto", "off", "manual"):
            raise ArgumentError(f"The tiling mode must be auto, off or manual, got {self.mode!r}.")
        for name in ("tile_px", "overlap_px", "max_batch_tiles"):
            whole_number(getattr(self, name), name, 0, LARGEST_PX)
        if self.mode == "manual" and self.tile_px <= 0:
            raise ArgumentError("Manual tiling needs a tile size in pixels (tile_px > 0).")
        if self.max_batch_tiles < 1:
            raise ArgumentError("max_batch_tiles must be at least 1.")
        if self.step_cache not in ("auto", *STEP_CACHE):
            raise ArgumentError(f"step_cache must be auto or one of {', '.join(STEP_CACHE)}, got {self.step_cache!r}.")


@dataclass(frozen=True)
class TilePlan:
    """What `plan_tiling` decided. tiled False: run the network on the whole canvas."""

    canvas_hw: tuple[int, int]
    tile_hw: tuple[int, int]
    overlap: int
    batch_tiles: int
    align: int
    state_canvases: int  # canvas-size fp32 images the sampler keeps (samplers.SamplerSpec.state_canvases)
    tiles: tuple = field(repr=False, default=())
    estimate_bytes: int = 0
    below_trained: bool = False
    fits_budget: bool = True
    pixel_chunk_tokens: Optional[int] = None
    reason: str = ""
    canvas_on_device: bool = True  # the sampler's state on the compute device (False: on the CPU)
    batch: int = 1  # samples decoded together
    branches: int = 1  # network images per sample and tile in one forward: 2 = guidance's two texts batched
    step_cache: str = "off"  # what the decode keeps from step to step: one of STEP_CACHE
    cache_bytes: int = 0  # what that holds on the compute device (memory.step_cache_bytes)

    @property
    def tiled(self) -> bool:
        return len(self.tiles) > 1

    @property
    def grid(self) -> tuple[int, int]:
        return len({t.y0 for t in self.tiles}), len({t.x0 for t in self.tiles})

    @property
    def state_bytes(self) -> int:
        """The sampler's canvas-size state, wherever it lives."""
        return canvas_memory_estimate(self.canvas_hw, self.batch, self.state_canvases)

    @property
    def memory_bytes(self) -> int:
        """Working memory of the decode on the compute device: one forward, plus the sampler's state
        when it lives there."""
        return self.estimate_bytes + (self.state_bytes if self.canvas_on_device else 0) + self.cache_bytes

    @property
    def forward_rows(self) -> int:
        """Images in one forward: tiles x samples x guidance branches."""
        return self.batch_tiles * self.batch * self.branches

    @property
    def tile_batches(self) -> int:
        return math.ceil(len(self.tiles) / self.batch_tiles) if self.tiles else 1


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
    branches: int = 1,
    state_canvases: int,
) -> TilePlan:
    """The largest tile inside the checkpoint's trained range whose working memory (for `batch`
    samples, `tile_memory_estimate`) fits the budget, then as many tiles per forward as still fit.

    A canvas inside the trained range that fits is one tile (untiled). When even the smallest trained
    tile does not fit, smaller tiles down to MIN_TILE_PX are tried (below_trained=True); when nothing
    fits, the smallest trained tile is returned with fits_budget=False. tile_px forces the tile side
    (manual). branches: network images per sample and tile in one forward (2: guidance's two texts
    batched)."""
    H, W = canvas_hw
    align = math.lcm(config.scale, config.patch_size)
    low, high = trained_tile_range(config, variant)
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes
    chunk = auto_chunk_tokens(config, dtype) if chunk_tokens == "auto" else chunk_tokens

    def estimate(shape, n=1):
        return tile_memory_estimate(config, shape, dtype=dtype, batch=n * batch * branches, chunk_tokens=chunk)

    if tile_px:
        sides = [max(align, tile_px // align * align)]
    else:
        top = max(align, high // align * align)
        sides = list(range(top, max(align, low // align * align) - 1, -align))
        sides += list(range(sides[-1] - align, max(align, MIN_TILE_PX // align * align) - 1, -align))
    chosen = None
    whole_fits = (
        not tile_px
        and math.sqrt(H * W) <= high * TOO_LARGE
        and max(H, W) / min(H, W) <= MAX_TRAINED_ASPECT * TOO_WIDE
        and estimate((H, W)) <= budget
    )
    if whole_fits:
        chosen = max(H, W), (H, W)
    def shape_for(side):
        if tile_px:  # by hand: square, clamped to the canvas
            return tuple(n if side >= n else side for n in (H, W))
        return tile_shape((H, W), side, align, MAX_TRAINED_ASPECT)

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
        pixel_chunk_tokens=chunk, reason=reason, batch=batch, branches=branches, state_canvases=state_canvases,
    )


def plan_tiling(
    config: PidConfig,
    canvas_hw: tuple[int, int],
    options: Optional[TileOptions] = None,
    *,
    dtype=torch.float32,
    variant=None,
    batch: int = 1,
    guidance: bool = False,
    batch_branches: bool = True,
    state_canvases: int,
    device=None,
) -> TilePlan:
    """The tiles a decode of `canvas_hw` runs for `options` (None = TileOptions(), i.e. auto), then
    what the memory left over buys (`spend_spare_memory`: the step cache, whole pixel blocks).

    guidance: every step runs the network on two texts (classifier-free guidance). They share one
    forward of twice the batch when they can (batch_branches: the two texts have one shape) and that
    costs no tile size (branches=2), else run as two forwards. state_canvases: the canvas-size images
    the sampler keeps (samplers.SamplerSpec.state_canvases). device: the compute device, when known (the
    CPU keeps chunked pixel blocks; elsewhere without a budget, the device's free memory bounds what is
    spent)."""
    options = options or TileOptions()
    plan = _plan_tiles(config, canvas_hw, options, dtype=dtype, variant=variant, batch=batch, guidance=guidance,
                       batch_branches=batch_branches, state_canvases=state_canvases)
    return spend_spare_memory(plan, config, options, dtype=dtype, guidance=guidance, device=device)


def _plan_tiles(config, canvas_hw, options: TileOptions, *, dtype, variant, batch, guidance, batch_branches,
                state_canvases) -> TilePlan:
    H, W = canvas_hw
    align = math.lcm(config.scale, config.patch_size)
    chunk = auto_chunk_tokens(config, dtype) if options.pixel_chunk_tokens == "auto" else options.pixel_chunk_tokens
    budget = options.memory_budget_bytes
    if options.mode == "off":
        def untiled(branches):
            return TilePlan(
                canvas_hw=(H, W), tile_hw=(H, W), overlap=0, batch_tiles=1, align=align,
                tiles=(Tile(0, 0, H, W, 0, 0),), pixel_chunk_tokens=chunk,
                estimate_bytes=tile_memory_estimate(config, (H, W), dtype=dtype, batch=batch * branches,
                                                    chunk_tokens=chunk),
                reason="untiled: tiling off", canvas_on_device=options.canvas_on_device is not False, batch=batch,
                branches=branches, state_canvases=state_canvases,
            )

        plan = untiled(2) if guidance and batch_branches else untiled(1)
        if guidance and budget is not None and plan.memory_bytes > budget:
            plan = untiled(1)
        return _with_guidance_reason(replace(plan, fits_budget=budget is None or plan.memory_bytes <= budget),
                                     guidance)
    canvas = canvas_memory_estimate((H, W), batch, state_canvases)
    on_device = options.canvas_on_device
    if on_device is None:
        on_device = budget is None or canvas <= budget / 4
    if budget is not None and on_device:
        budget = max(0, budget - canvas)

    def tiles_for(branches):
        return choose_tile(
            config, (H, W), memory_budget_bytes=budget, dtype=dtype, variant=variant,
            batch=batch, overlap=options.overlap_px, max_batch_tiles=options.max_batch_tiles,
            chunk_tokens=chunk, tile_px=options.tile_px if options.mode == "manual" else None, branches=branches,
            state_canvases=state_canvases,
        )

    plan = tiles_for(1)
    if guidance and batch_branches:
        batched = tiles_for(2)
        if batched.tile_hw == plan.tile_hw and batched.fits_budget:  # batching the texts costs no tile size
            plan = batched
    reason = plan.reason
    if not on_device:
        reason += f"; sampler state (~{canvas / 2**30:.1f} GB) kept on the CPU"
    elif not plan.fits_budget:
        reason += (f"; the sampler's canvas state alone takes ~{canvas / 2**30:.1f} GB: keep it on the CPU "
                   "(canvas_on_device=False)")
    return _with_guidance_reason(replace(plan, reason=reason, canvas_on_device=on_device), guidance)


def _with_guidance_reason(plan: TilePlan, guidance: bool) -> TilePlan:
    if not guidance:
        return plan
    how = "in one forward" if plan.branches == 2 else "as two forwards (memory)"
    return replace(plan, reason=f"{plan.reason}; guidance: both texts {how}")


def spend_spare_memory(plan: TilePlan, config: PidConfig, options: TileOptions, *, dtype=torch.float32,
                       guidance: bool = False, device=None) -> TilePlan:
    """With the tiles chosen (the least memory they run in: today's chunks, nothing kept between steps),
    spend what the budget leaves, best value per byte first (docs/DESIGN.md §3.5, §9):

    1. the step cache: the tables and the adapter's tokens (2-6% of a forward, ~1% of its memory);
    2. whole pixel blocks instead of chunks (~5% on a GPU, several times the pixel phase's memory),
       else the largest chunks that fit; on the CPU (CPU_PIXEL_CHUNKS) or an unknown device, today's chunks;
    3. the adapter's head outputs instead of its tokens (~1% of a forward, 8-15x the tokens' bytes),
       single-batch decodes on an accelerator only.

    The budget is options.memory_budget_bytes, else the device's free memory now (RAM on the CPU), else
    none (the device was not given: everything fits). A plan that does not fit its budget gets nothing more, so where the budget is
    small the working memory stays what the tiles alone need. Explicit options (a pixel_chunk_tokens
    or step_cache other than "auto") are kept as given."""
    device_type = torch.device(device).type if device is not None else None
    spare = options.memory_budget_bytes
    if spare is None and device_type is not None:
        spare = device_memory_budget(device)

    def fits(candidate: TilePlan) -> bool:
        return spare is None or candidate.memory_bytes <= spare

    rows = plan.batch_tiles * plan.batch * (2 if guidance else 1)  # every branch keeps its own entry

    def keeping(candidate: TilePlan, keep: str) -> TilePlan:
        return replace(candidate, step_cache=keep, cache_bytes=step_cache_bytes(
            config, candidate.tile_hw, dtype=dtype, rows=rows, keys=candidate.tile_batches, keep=keep))

    notes = []
    if options.step_cache == "auto":
        plan = next((c for c in (keeping(plan, k) for k in ("tokens", "tables")) if fits(c)), keeping(plan, "off"))
    else:
        plan = keeping(plan, options.step_cache)
    if options.pixel_chunk_tokens == "auto":
        plan, why = _choose_pixel_chunks(plan, config, dtype, spare, fits, device_type)
        notes.append(why)
    if options.step_cache == "auto" and plan.step_cache == "tokens" and plan.tile_batches == 1 \
            and device_type not in (None, "cpu") and spare is not None and fits(keeping(plan, "heads")):
        plan = keeping(plan, "heads")
    if plan.step_cache != "off":
        kept = {"tables": "tables", "tokens": "tables, adapter tokens", "heads": "tables, adapter heads"}[plan.step_cache]
        notes.append(f"kept between steps: {kept} ({plan.cache_bytes / 2**30:.2f} GiB)")
    else:
        notes.append("nothing kept between steps")
    return replace(plan, reason="; ".join([plan.reason, *notes]))


def _choose_pixel_chunks(plan: TilePlan, config: PidConfig, dtype, spare, fits, device_type) -> tuple[TilePlan, str]:
    """(the plan with its pixel-block chunking, why): whole when that fits, else the largest chunks that
    fit, never smaller than today's (auto_chunk_tokens); chunks on the CPU."""
    default = auto_chunk_tokens(config, dtype)
    rows = plan.forward_rows
    tokens = rows * (plan.tile_hw[0] // config.patch_size) * (plan.tile_hw[1] // config.patch_size)

    def chunked(chunk) -> TilePlan:
        return replace(plan, pixel_chunk_tokens=chunk,
                       estimate_bytes=tile_memory_estimate(config, plan.tile_hw, dtype=dtype, batch=rows,
                                                           chunk_tokens=chunk))

    if device_type is None:
        return chunked(default), f"pixel blocks in chunks of {default} tokens (the device was not given)"
    if device_type == "cpu" and CPU_PIXEL_CHUNKS:
        return chunked(default), f"pixel blocks in chunks of {default} tokens (CPU: measured faster than whole)"
    whole = chunked(None)
    if fits(whole):
        return whole, "pixel blocks whole" + (" (they fit the budget)" if spare is not None else "")
    need = whole.memory_bytes / 2**30
    left = spare - (plan.memory_bytes - plan.estimate_bytes)
    chunk = largest_chunk_within(config, plan.tile_hw, left, dtype=dtype, batch=rows)
    chunk = default if chunk is None or chunk < default else min(chunk, tokens)
    return chunked(chunk), (f"pixel blocks in chunks of {chunk} tokens (whole they would need {need:.2f} GiB, "
                            f"the budget is {spare / 2**30:.2f} GiB)")
