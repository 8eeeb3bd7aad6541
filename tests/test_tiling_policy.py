"""The memory model and the tiling policy: estimates grow as designed; plans fit the budget and the
trained range; the tiled path's memory is bounded by the tile."""

import pytest
import torch

from functools import partial

from pid_core.commands.random_checkpoints import narrow_config, random_model, released_config
from pid_core.samplers import SAMPLERS
from pid_core.sampling import velocity_to_x0
from pid_core.tiling import TileOptions, plan_tiling as plan_tiling_for
from pid_core.tiling.memory import canvas_memory_estimate, tile_memory_estimate
from pid_core.tiling.policy import choose_tile as choose_tile_for
from pid_core.variants import STUDENT, TEACHER, VARIANTS
from pid_core.velocity import network_velocity

from small_decode import SMALL, small_plan

# the student's state unless a test says otherwise
plan_tiling = partial(plan_tiling_for, state_canvases=SAMPLERS[STUDENT].state_canvases)
choose_tile = partial(choose_tile_for, state_canvases=SAMPLERS[STUDENT].state_canvases)


def test_estimates_follow_the_design():
    cfg = released_config()
    est = lambda side, **kw: tile_memory_estimate(cfg, side, dtype=torch.bfloat16, **kw)  # noqa: E731
    assert est(1024) < est(2048) < est(4096)
    assert est(2048) < 0.5 * est(2048, chunk_tokens=None)  # chunking removes the per-pixel modulation
    assert 1.5 * est(2048) < est(2048, batch=2) < 2 * est(2048)
    # No budget: a 2K decode on a 2K checkpoint is one pass; 4K and 8K are tiled at the trained size.
    flux2k = VARIANTS["flux-2k"]
    assert not choose_tile(cfg, (2048, 2048), memory_budget_bytes=None, variant=flux2k).tiled
    plan = choose_tile(cfg, (4096, 4096), memory_budget_bytes=None, variant=flux2k)
    assert plan.tiled and plan.tile_hw == (2048, 2048) and not plan.below_trained
    plan8 = choose_tile(cfg, (8192, 8192), memory_budget_bytes=2 << 30, dtype=torch.bfloat16, variant=flux2k)
    assert plan8.tile_hw == (2048, 2048) and plan8.estimate_bytes <= 2 << 30
    # A 4K checkpoint decodes 4096 px in one pass when memory allows, tiles under a small budget.
    c15 = released_config("v1.5", 16)
    v15 = VARIANTS["flux-2kto4k-v1.5"]
    assert not choose_tile(c15, (4096, 4096), memory_budget_bytes=None, variant=v15).tiled
    mid = choose_tile(c15, (4096, 4096), memory_budget_bytes=1 << 30, dtype=torch.bfloat16, variant=v15)
    assert mid.tiled and mid.estimate_bytes <= 1 << 30 and not mid.below_trained
    small = choose_tile(c15, (4096, 4096), memory_budget_bytes=1 << 29, dtype=torch.bfloat16, variant=v15)
    assert small.tiled and small.estimate_bytes <= 1 << 29 and small.below_trained
    # Nothing fits: the smallest trained tile, flagged; the canvas state counts against the budget.
    none = choose_tile(cfg, (8192, 8192), memory_budget_bytes=1 << 20, variant=flux2k)
    assert none.tile_hw == (2048, 2048) and not none.fits_budget
    on_device = plan_tiling(cfg, (8192, 8192), TileOptions(memory_budget_bytes=2 << 30, canvas_on_device=True),
                            dtype=torch.bfloat16, variant=flux2k)
    off_device = plan_tiling(cfg, (8192, 8192), TileOptions(memory_budget_bytes=2 << 30, canvas_on_device=False),
                             dtype=torch.bfloat16, variant=flux2k)
    auto = plan_tiling(cfg, (8192, 8192), TileOptions(memory_budget_bytes=2 << 30), dtype=torch.bfloat16,
                       variant=flux2k)
    # the 1.6 GB state on the GPU leaves room only for tiles below the trained size; on the CPU it does not
    assert on_device.canvas_on_device and on_device.below_trained and on_device.tile_hw[0] < 2048
    assert off_device.fits_budget and off_device.tile_hw == (2048, 2048) and not off_device.canvas_on_device
    assert auto == off_device  # the 1.6 GB state is over a quarter of 2 GB: auto keeps it on the CPU
    assert plan_tiling(cfg, (4096, 4096), TileOptions(memory_budget_bytes=4 << 30), dtype=torch.bfloat16,
                       variant=flux2k).canvas_on_device
    # Manual and off.
    assert plan_tiling(cfg, (4096, 4096), TileOptions(mode="off")).tiled is False
    manual = plan_tiling(cfg, (4096, 4096), TileOptions(mode="manual", tile_px=1024, overlap_px=100))
    assert manual.tile_hw == (1024, 1024) and manual.overlap == 128
    with pytest.raises(ValueError):
        TileOptions(mode="manual")


def test_tiled_memory_is_bounded_by_the_tile():
    """Peak bytes allocated by one step's x0 (profiler), beyond the state x: as the canvas grows 4x, the
    streamed tiled path grows only by its band of rows (one tile high, the canvas wide), the untiled
    path with the canvas."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)

    def peak(H, W, tiling):
        velocity = network_velocity(model, small_plan(model, H, W, tiling))
        x = torch.randn(1, 3, H, W)
        t = torch.tensor([0.9])
        with torch.no_grad(), torch.profiler.profile(profile_memory=True) as prof:
            if hasattr(velocity, "denoise_in_place"):
                velocity.denoise_in_place(x, t)
            else:
                velocity_to_x0(x, velocity(x, t), t)
        events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
        current = top = 0
        for e in events:
            current += e.self_cpu_memory_usage
            top = max(top, current)
        return top, 3 * H * W * 4

    tiled = TileOptions(mode="manual", tile_px=128, overlap_px=32, max_batch_tiles=1, pixel_chunk_tokens=None)
    small_t, canvas_small = peak(256, 256, tiled)
    large_t, canvas_large = peak(512, 512, tiled)
    small_u, _ = peak(256, 256, None)
    large_u, _ = peak(512, 512, None)
    band_growth = 3 * 128 * (512 - 256) * 4  # the band: 128 rows, 256 columns more
    assert large_t - small_t <= 1.5 * band_growth <= 0.25 * (canvas_large - canvas_small), (large_t, small_t)
    # untiled, the network's activations grow with the canvas (chunking bounds only the per-pixel part)
    assert large_u - small_u > 10 * (canvas_large - canvas_small)
    assert large_t < 0.4 * large_u


def test_guidance_batches_both_texts_when_it_costs_no_tile_size():
    cfg = released_config(layout="v1.5")
    one = lambda **kw: plan_tiling(cfg, (2048, 2048), TileOptions(**kw), dtype=torch.bfloat16)  # noqa: E731
    guided = lambda **kw: plan_tiling(cfg, (2048, 2048), TileOptions(**kw), dtype=torch.bfloat16,  # noqa: E731
                                      guidance=True)
    roomy = guided()
    assert roomy.branches == 2 and not roomy.tiled and "one forward" in roomy.reason
    assert roomy.estimate_bytes > one().estimate_bytes  # twice the images per forward
    # a budget where one pass fits only single: two forwards at the same tile rather than smaller tiles
    single = one().estimate_bytes
    budget = int(single * 1.5) + canvas_memory_estimate((2048, 2048), 1, 2)  # one forward, not two
    tight = guided(memory_budget_bytes=budget)
    assert tight.branches == 1 and not tight.tiled and "two forwards" in tight.reason
    # off: the doubled forward when it fits, else two
    assert guided(mode="off").branches == 2
    assert guided(mode="off", memory_budget_bytes=budget).branches == 1
    assert one().branches == 1


def test_the_teachers_state_is_three_canvases():
    cfg = released_config(layout="v1.5")
    student = plan_tiling(cfg, (4096, 4096), TileOptions(mode="off"))
    teacher = plan_tiling_for(cfg, (4096, 4096), TileOptions(mode="off"),
                              state_canvases=SAMPLERS[TEACHER].state_canvases)
    assert teacher.memory_bytes - student.memory_bytes == (
        canvas_memory_estimate((4096, 4096), 1, 3) - canvas_memory_estimate((4096, 4096), 1, 2)) == 3 * 4096 * 4096 * 4


def _plan(cfg, side, device="cuda", **options):
    return plan_tiling(cfg, (side, side), TileOptions(**options), dtype=torch.bfloat16, device=device)


def test_pixel_blocks_run_whole_when_memory_allows():
    """Spare memory buys whole pixel blocks (no chunks) on a GPU; a small budget keeps today's chunks and
    memory; between the two, the largest chunks that fit. The plan's summary says which and why."""
    from pid_core.tiling.memory import auto_chunk_tokens

    cfg = released_config("v1.5")
    chunk = auto_chunk_tokens(cfg, torch.bfloat16)
    today = _plan(cfg, 2048, mode="off", step_cache="off", pixel_chunk_tokens=chunk).memory_bytes
    whole = _plan(cfg, 2048, mode="off", step_cache="off", pixel_chunk_tokens=None).memory_bytes
    assert whole > 2 * today  # the unchunked estimate: the per-pixel modulation of every token at once
    roomy = _plan(cfg, 2048, mode="off", step_cache="off", memory_budget_bytes=whole)
    assert roomy.pixel_chunk_tokens is None and "pixel blocks whole (they fit the budget)" in roomy.reason
    small = _plan(cfg, 2048, mode="off", step_cache="off", memory_budget_bytes=today)
    assert small.pixel_chunk_tokens == chunk and small.memory_bytes == today and "whole they would need" in small.reason
    budget = (today + whole) // 2
    mid = _plan(cfg, 2048, mode="off", step_cache="off", memory_budget_bytes=budget)
    assert chunk < mid.pixel_chunk_tokens < 128 * 128 and mid.memory_bytes <= budget
    assert _plan(cfg, 2048, mode="off", step_cache="off", memory_budget_bytes=mid.memory_bytes + (64 << 20)
                 ).pixel_chunk_tokens >= mid.pixel_chunk_tokens
    # the CPU keeps chunks (measured as fast there); an unknown device keeps today's plan
    cpu = _plan(cfg, 2048, device="cpu", mode="off", memory_budget_bytes=whole * 2)
    assert cpu.pixel_chunk_tokens == chunk and "CPU" in cpu.reason
    assert _plan(cfg, 2048, device=None, mode="off").pixel_chunk_tokens == chunk
    # given by hand: kept
    assert _plan(cfg, 2048, mode="off", pixel_chunk_tokens=512, memory_budget_bytes=whole * 2).pixel_chunk_tokens == 512
    assert _plan(cfg, 2048, mode="off", pixel_chunk_tokens=None, memory_budget_bytes=today).pixel_chunk_tokens is None
    # tiled: chosen per tile batch, after the tiles (which do not shrink for it)
    tiled = _plan(cfg, 8192, memory_budget_bytes=40 << 30)
    assert tiled.tiled and tiled.pixel_chunk_tokens is None and tiled.memory_bytes <= 40 << 30
    tight = _plan(cfg, 8192, memory_budget_bytes=4 << 30)
    assert tight.pixel_chunk_tokens is not None and tight.memory_bytes <= 4 << 30


def test_step_cache_follows_the_budget():
    from pid_core.tiling.memory import step_cache_bytes

    cfg = released_config("v1.5")
    # no budget: the tables and the adapter's tokens (one entry per tile batch), never the heads
    untiled = _plan(cfg, 2048, device=None, mode="off")
    assert untiled.step_cache == "tokens" and "adapter tokens" in untiled.reason
    tiled = _plan(cfg, 8192, device=None)
    assert tiled.tiled and tiled.step_cache == "tokens"
    assert tiled.cache_bytes == step_cache_bytes(cfg, tiled.tile_hw, dtype=torch.bfloat16, rows=tiled.forward_rows,
                                                 keys=tiled.tile_batches, keep="tokens")
    assert tiled.memory_bytes == tiled.estimate_bytes + tiled.cache_bytes + (
        tiled.memory_bytes - tiled.estimate_bytes - tiled.cache_bytes)  # counted in the plan's memory
    bare = _plan(cfg, 8192, device=None, step_cache="off")
    assert tiled.memory_bytes - bare.memory_bytes == tiled.cache_bytes > 0
    # a single pass on a GPU with room to spare keeps the heads' outputs; the CPU and tiled plans do not
    heads = _plan(cfg, 2048, mode="off", memory_budget_bytes=40 << 30)
    assert heads.step_cache == "heads" and heads.cache_bytes > 8 * untiled.cache_bytes
    assert _plan(cfg, 2048, device="cpu", mode="off", memory_budget_bytes=40 << 30).step_cache == "tokens"
    assert _plan(cfg, 8192, memory_budget_bytes=40 << 30).step_cache == "tokens"
    # a budget today's plan fills: nothing kept, no larger chunks, the memory of today's plan
    from pid_core.tiling.memory import auto_chunk_tokens

    alone = _plan(cfg, 2048, mode="off", step_cache="off", pixel_chunk_tokens=auto_chunk_tokens(cfg, torch.bfloat16))
    full = _plan(cfg, 2048, mode="off", memory_budget_bytes=alone.memory_bytes)
    assert full.step_cache == "off" and full.memory_bytes == alone.memory_bytes
    assert "nothing kept between steps" in full.reason
    with pytest.raises(ValueError, match="step_cache"):
        TileOptions(step_cache="everything")
