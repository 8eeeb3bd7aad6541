"""The step cache (network/prepared.py): what does not depend on the step, made once per decode (per
tile batch when tiled) and reused, gives the same result bit for bit as recomputing it."""

from dataclasses import replace

import pytest
import torch

from pid_core.checkpoint import load_pid
from pid_core.commands.conformance import load_case
from pid_core.commands.random_checkpoints import narrow_config, random_model
from pid_core.network.prepared import KEEP, PreparedCache
from pid_core.plan import plan_decode
from pid_core.precision import compute_context
from pid_core.sampling import initial_noise, sample
from pid_core.teacher import dpm_solver_pp
from pid_core.tiling import TileOptions
from pid_core.tiling.memory import step_cache_bytes
from pid_core.velocity import network_denoiser, network_velocity

from small_decode import SMALL, small_inputs, small_plan

CACHES = ("off", *KEEP)


def _forward_args(cfg, H, W, batch=2):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(batch, 3, H, W, generator=g)
    t = torch.tensor([0.9, 0.3])[:batch]
    text, latent, sigma = small_inputs(cfg, H, W, batch)
    return x, t, text, latent, sigma


@pytest.mark.parametrize("layout", ["v1", "v1.5"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_forward_with_prepared_equals_plain_forward(layout, chunk):
    cfg = narrow_config(layout=layout, **SMALL)
    model = random_model(cfg)
    x, t, text, latent, sigma = _forward_args(cfg, 96, 160)
    with torch.no_grad():
        plain = model(x, t, text, latent, sigma, chunk_tokens=chunk)
        for keep in KEEP:
            prepared = model.prepare(latent, text, sigma, (96 // 16, 160 // 16), keep=keep, chunk_tokens=chunk)
            # only what the level keeps is read: text and sigma never, the latent for "tables" only
            latent_arg = latent if keep == "tables" else None
            assert torch.equal(model(x, t, None, latent_arg, None, chunk_tokens=chunk, prepared=prepared), plain), keep
            assert torch.equal(model(x * 0.5, t, None, latent_arg, None, chunk_tokens=chunk, prepared=prepared),
                               model(x * 0.5, t, text, latent, sigma, chunk_tokens=chunk)), keep


def test_prepared_under_bf16_autocast_equals_plain_forward():
    cfg = narrow_config(layout="v1.5", **SMALL)
    model = random_model(cfg, dtype=torch.bfloat16)
    x, t, text, latent, sigma = _forward_args(cfg, 64, 96)
    with torch.no_grad(), compute_context("cpu", torch.bfloat16):
        plain = model(x, t, text, latent, sigma)
        prepared = model.prepare(latent, text, sigma, (4, 6), keep="heads")
        assert prepared.heads[0].dtype == torch.bfloat16 and prepared.text.dtype == torch.float32
        assert torch.equal(model(x, t, prepared=prepared), plain)


def test_prepared_is_checked_against_the_call():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    x, t, text, latent, sigma = _forward_args(cfg, 64, 96)
    prepared = model.prepare(latent, text, sigma, (4, 6))
    with torch.no_grad(), pytest.raises(ValueError, match="prepared for 2 image"):
        model(x[:, :, :32], t, prepared=prepared)
    with pytest.raises(ValueError, match="keep must be one of"):
        model.prepare(latent, text, sigma, (4, 6), keep="everything")


def _with_cache(plan, cache: str):
    """The decode plan keeping `cache` between steps (its other choices unchanged)."""
    return replace(plan, tiles=replace(plan.tiles, step_cache=cache))


def _student(model, plan, **kw):
    noise, gen = initial_noise((plan.batch, 3, *plan.output_hw), seed=5)
    with torch.no_grad():
        return sample(network_velocity(model, plan, **kw), noise, plan.sampler.times, generator=gen)


def test_shared_reference_cases_decode_bit_identical_with_every_step_cache(shared_cases):
    """The student sampler through the engine's own path on each shared reference case (its checkpoint,
    inputs and noise), untiled: every step-cache level gives the image of no cache, bit for bit."""
    for folder in shared_cases:
        case, io = load_case(str(folder))
        overrides = {k: case["config"][k] for k in ("latent_down_factor", "sr_scale", "latent_unpatchify")
                     if k in case["config"]}
        model = load_pid(str(folder / case["checkpoint"]), dtype=torch.float32, **overrides)
        H, W = io["sample.noise"].shape[-2:]
        for chunk in (None, 16):
            base = plan_decode(model, io["lq_latent"], io["text"], latent_format="pid", sigma=io["degrade_sigma"],
                               tiling=TileOptions(mode="off", pixel_chunk_tokens=chunk, step_cache="off"), steps=4)
            base = replace(base, latent=io["lq_latent"])  # the case's exact network input
            results = {}
            for cache in CACHES:
                velocity = network_velocity(model, _with_cache(base, cache))
                with torch.no_grad():
                    results[cache] = sample(velocity, io["sample.noise"], base.sampler.times,
                                            renoise=[io[f"sample.eps{i}"] for i in range(1, 4)])
            for cache in KEEP:
                assert torch.equal(results[cache], results["off"]), (folder.name, chunk, cache)


@pytest.mark.parametrize("layout", ["v1", "v1.5"])
def test_tiled_decode_bit_identical_with_every_step_cache(layout):
    """Several tile batches (each with its own latent slice, so its own cache entry), 4 steps."""
    cfg = narrow_config(layout=layout, **SMALL)
    model = random_model(cfg)
    H, W = 128, 192
    base = small_plan(model, H, W, TileOptions(mode="manual", tile_px=96, overlap_px=32, max_batch_tiles=2,
                                               step_cache="off"), batch=2)
    assert base.tiles.tiled and base.tiles.tile_batches > 1
    results = {cache: _student(model, _with_cache(base, cache)) for cache in CACHES}
    for cache in KEEP:
        assert torch.equal(results[cache], results["off"]), cache


def test_each_key_is_prepared_once_and_tables_are_shared(monkeypatch):
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 128, 192
    plan = small_plan(model, H, W, TileOptions(mode="manual", tile_px=96, overlap_px=32, step_cache="tokens"),
                      steps=3)
    made = []
    original = PreparedCache.get

    def counting(self, key, *args):
        fresh = key not in self.entries
        entry = original(self, key, *args)
        if fresh:
            made.append((key, entry))
        return entry

    monkeypatch.setattr(PreparedCache, "get", counting)
    _student(model, plan)
    assert len(made) == plan.tiles.tile_batches  # one entry per tile batch, made at the first step
    first = made[0][1]
    assert all(entry.rope_img is first.rope_img and entry.sincos_cols is first.sincos_cols for _, entry in made)
    assert len({id(entry.tokens) for _, entry in made}) == len(made)


def test_untiled_call_without_cache_prepares_every_time(monkeypatch):
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    calls = []
    original = model.prepare
    monkeypatch.setattr(model, "prepare", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    for cache, expected in (("off", 4), ("tokens", 1)):
        calls.clear()
        _student(model, small_plan(model, 64, 96, TileOptions(mode="off", step_cache=cache)))
        assert len(calls) == expected, cache


@pytest.mark.parametrize("tiled", [False, True])
def test_teacher_decode_bit_identical_with_step_cache(tiled):
    """Guided DPM-Solver++: the first step's two forwards, then both texts batched; and with the two
    branches as two forwards throughout (each its own cache entry)."""
    cfg = narrow_config(layout="v1.5", **SMALL)
    model = random_model(cfg)
    H, W = (64, 160) if tiled else (64, 96)
    negative = torch.randn(1, 7, cfg.text_dim, generator=torch.Generator().manual_seed(9))
    options = (TileOptions(mode="manual", tile_px=96, overlap_px=32, step_cache="off") if tiled
               else TileOptions(mode="off", pixel_chunk_tokens=None, step_cache="off"))
    base = small_plan(model, H, W, options, batch=2, sampler="teacher", steps=3, cfg=5.0, shift=3.0,
                      negative=negative)
    assert base.tiles.tiled == tiled and base.tiles.branches == 2
    noise, _ = initial_noise((2, 3, H, W), seed=1)
    for branches in (2, 1):
        results = {}
        for cache in CACHES:
            plan = replace(base, tiles=replace(base.tiles, branches=branches, step_cache=cache))
            with torch.no_grad():
                results[cache] = dpm_solver_pp(network_denoiser(model, plan), noise, plan.sampler.times, clamp=False)
        for cache in KEEP:
            assert torch.equal(results[cache], results["off"]), (branches, cache)


@pytest.mark.parametrize("layout", ["v1", "v1.5"])
@pytest.mark.parametrize("keep", KEEP)
def test_memory_model_covers_the_cache(layout, keep):
    """step_cache_bytes (the plan's cache_bytes) against what a decode's cache really holds."""
    cfg = narrow_config(layout=layout, **SMALL)
    model = random_model(cfg)
    H, W = 128, 192
    plan = small_plan(model, H, W, TileOptions(mode="manual", tile_px=96, overlap_px=32, max_batch_tiles=2,
                                               step_cache=keep), batch=2, steps=1)
    text = plan.text
    caches = []
    original = PreparedCache.__init__

    def keeping(self, *a, **kw):
        original(self, *a, **kw)
        caches.append(self)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(PreparedCache, "__init__", keeping)
        _student(model, plan)
    held = caches[0].nbytes
    tiles = plan.tiles
    estimate = step_cache_bytes(cfg, tiles.tile_hw, rows=tiles.forward_rows, keys=tiles.tile_batches, keep=keep,
                                text_tokens=text.shape[1])
    assert tiles.cache_bytes >= held  # the plan counts the text's full length: an upper bound
    assert held <= estimate <= 1.5 * held
