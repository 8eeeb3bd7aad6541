"""The velocity function the sampler calls: one tile equals the untiled network bit for bit, every
variant and step count decodes tiled, compile is opt-in and matches eager."""

import math
import shutil

import pytest
import torch

from pid_core.precision import compute_context
from pid_core.sampling import initial_noise, sample
from pid_core.commands.random_checkpoints import narrow_config, random_model
from pid_core.tiling import TileOptions
from pid_core.tiling.fusion import TiledVelocity
from pid_core.tiling.geometry import plan_tiles
from pid_core.velocity import network_velocity

from small_decode import SMALL, small_decode, small_plan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_tile_equals_untiled_bit_exact(dtype):
    cfg = narrow_config(**SMALL)
    model = random_model(cfg, dtype=dtype)
    H, W = 128, 192
    plan = small_plan(model, H, W, TileOptions(pixel_chunk_tokens=None), steps=4)  # auto: inside the trained range
    assert not plan.tiles.tiled

    def whole(x, t):
        with compute_context(plan.device, plan.compute_dtype):
            return model(x, t, plan.text, plan.latent, plan.sigma)

    def call(x, t, z, y, s):
        with compute_context(plan.device, plan.compute_dtype):
            return model(x, t, y, z, s)

    tiled = TiledVelocity(call, plan.latent, plan_tiles((H, W), 4096, 64, 32), scale=cfg.scale, device="cpu",
                          conditioning=(plan.text, plan.sigma))
    assert len(tiled.tiles) == 1
    outs = []
    for velocity in (whole, tiled, network_velocity(model, plan)):
        noise, gen = initial_noise((1, 3, H, W), seed=3)
        with torch.no_grad():
            outs.append(sample(velocity, noise, plan.sampler.times, generator=gen))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


VARIANT_LIKE = [
    dict(layout="v1", latent_channels=16),  # FLUX.1 / SD3 / Qwen: x32
    dict(layout="v1", latent_channels=4),  # SDXL
    dict(layout="v1.5", latent_channels=128),  # FLUX.2 v1.5: un-packs 128 -> 32, x64
    dict(layout="v1", latent_channels=1152),  # SigLIP: x128
]


@pytest.mark.parametrize("spec", VARIANT_LIKE, ids=lambda s: f"{s['layout']}-{s['latent_channels']}ch")
@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_tiled_decode_runs_every_variant_and_step_count(spec, steps):
    cfg = narrow_config(**spec, **SMALL)
    model = random_model(cfg)
    align = math.lcm(cfg.scale, 16)
    H, W = 2 * align + (align if align < 128 else 0), 3 * align  # several tiles, non-square
    tile = max(align, 2 * align if align < 128 else align)
    tiling = TileOptions(mode="manual", tile_px=tile, overlap_px=align // 2, max_batch_tiles=2)
    plan = small_plan(model, H, W, tiling).tiles
    assert plan.tiled and all(t.y0 % cfg.scale == 0 and t.x0 % cfg.scale == 0 for t in plan.tiles)
    out = small_decode(model, cfg, H, W, steps, tiling, batch=2 if steps == 2 else 1)
    assert out.shape[-2:] == (H, W) and torch.isfinite(out).all()
    assert out.abs().max() <= 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_network_matches_eager_on_static_tiles():
    """The compiled blocks through the tiled path, batches padded to one shape: the same values as eager
    (tests/test_compile.py checks the whole canvas)."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 128, 320
    plan = small_plan(model, H, W, TileOptions(mode="manual", tile_px=128, overlap_px=32, max_batch_tiles=2))
    x = torch.randn(1, 3, H, W)
    eager = network_velocity(model, plan)(x, torch.tensor([0.9]))
    compiled_velocity = network_velocity(model, plan, compile=True)
    assert compiled_velocity.pad_batches  # every batch one shape: one compiled graph
    compiled = compiled_velocity(x, torch.tensor([0.9]))
    assert (eager - compiled).abs().max() < 1e-4


# ---------------------------------------------------------------- the teacher's guided denoiser


def _teacher_plan(model, cfg, H, W, steps, tiling=None, *, guidance=5.0):
    negative = torch.randn(1, 7, cfg.text_dim, generator=torch.Generator().manual_seed(9))
    return small_plan(model, H, W, tiling, batch=2, sampler="teacher", steps=steps, cfg=guidance,
                      negative=negative)


def _teacher_decode(model, plan, *, seed=0, **kw):
    from pid_core.teacher import dpm_solver_pp
    from pid_core.velocity import network_denoiser

    noise, _ = initial_noise((plan.batch, 3, *plan.output_hw), seed=seed)
    return dpm_solver_pp(network_denoiser(model, plan, **kw), noise, plan.sampler.times, clamp=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_single_tile_equals_untiled_bit_exact(dtype):
    """A tile covering the canvas fuses to exactly the untiled guided x0, at every step."""

    cfg = narrow_config(layout="v1.5", **SMALL)
    model = random_model(cfg, dtype=dtype)
    H, W = 64, 96
    untiled = _teacher_plan(model, cfg, H, W, 3, TileOptions(mode="off", pixel_chunk_tokens=None))
    assert untiled.tiles.branches == 2 and not untiled.tiles.tiled
    whole = _teacher_decode(model, untiled)
    # the same plan with its one tile run through TiledVelocity (a plan of one tile runs untiled)
    from pid_core import velocity as velocity_module

    original = velocity_module._over_canvas

    def forced_tiles(call, model, plan, conditioning, **kw):
        return TiledVelocity(call, plan.latent, plan_tiles((H, W), 4096, 64, 32), scale=model.config.scale,
                             device=plan.device, conditioning=conditioning)

    velocity_module._over_canvas = forced_tiles
    try:
        tiled = _teacher_decode(model, untiled)
    finally:
        velocity_module._over_canvas = original
    assert torch.equal(whole, tiled)


def test_teacher_batched_branches_agree_with_two_forwards():
    from dataclasses import replace

    cfg = narrow_config(layout="v1.5", **SMALL)
    model = random_model(cfg)
    H, W = 64, 96
    plan = _teacher_plan(model, cfg, H, W, 3, TileOptions(mode="off", pixel_chunk_tokens=None))
    calls = {1: 0, 2: 0}

    def counter(branches):
        def count():
            calls[branches] += 1
        return count

    def as_two(plan):
        return replace(plan, tiles=replace(plan.tiles, branches=1))

    two = _teacher_decode(model, as_two(plan), after_forward=counter(1))
    batched = _teacher_decode(model, plan, after_forward=counter(2))
    assert calls == {1: 6, 2: 4}  # the first step (t near 1) keeps the reference's two forwards
    assert (two - batched).abs().max() <= 1e-4 * two.abs().max()
    one = _teacher_plan(model, cfg, H, W, 1, TileOptions(mode="off", pixel_chunk_tokens=None))
    assert torch.equal(_teacher_decode(model, as_two(one)), _teacher_decode(model, one))  # the reference's order


def test_teacher_cfg_one_runs_the_conditional_branch_only():
    cfg = narrow_config(layout="v1.5", **SMALL)
    model = random_model(cfg)
    H, W = 64, 64
    plan = _teacher_plan(model, cfg, H, W, 2, guidance=1.0)
    calls = []
    out = _teacher_decode(model, plan, after_forward=lambda: calls.append(1))
    assert len(calls) == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize("spec", VARIANT_LIKE[2:3] + VARIANT_LIKE[:1], ids=lambda s: f"{s['layout']}-{s['latent_channels']}ch")
def test_tiled_teacher_decode(spec):
    cfg = narrow_config(**spec, **SMALL)
    model = random_model(cfg)
    align = math.lcm(cfg.scale, 16)
    H, W = 2 * align, 3 * align  # two tiles side by side
    plan = _teacher_plan(model, cfg, H, W, 2, TileOptions(mode="manual", tile_px=2 * align, overlap_px=align // 2,
                                                          max_batch_tiles=2))
    assert plan.tiles.tiled and plan.tiles.branches == 2 and plan.tiles.state_canvases == 3  # the teacher's state
    tiles_done = []
    out = _teacher_decode(model, plan, callback_per_tile=lambda d, n: tiles_done.append((d, n)))
    assert out.shape == (2, 3, H, W) and torch.isfinite(out).all()
    assert tiles_done[-1][0] == tiles_done[-1][1] == len(plan.tiles.tiles)
