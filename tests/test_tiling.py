"""Tiled decoding, chunked memory paths, block offloading and the attention hook (CPU, narrow models)."""

import copy
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from pid_core import sampling
from pid_core.network import layers
from pid_core.offload import enable_block_offload, offload_device_bytes
from pid_core.precision import compute_context
from pid_core.sampling import initial_noise, sample, velocity_to_x0
from pid_core.speed import attention_backend, compile_model, heads_merged_backend
from pid_core.testing import narrow_config, random_model, released_config
from pid_core.tiling import (
    TiledVelocity,
    TileOptions,
    axis_weights,
    choose_tile,
    make_velocity,
    plan_decode,
    plan_tiles,
    seam_figure,
    tile_memory_estimate,
    tile_weights,
)
from pid_core.variants import VARIANTS

SMALL = dict(text_dim=32, text_tokens=12)


def _inputs(cfg, H, W, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 7, cfg.text_dim, generator=g)
    latent = torch.randn(batch, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g)
    sigma = torch.tensor([0.3, 0.0])[:batch]
    return text, latent, sigma


# ------------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    "canvas, tile, overlap, align",
    [
        ((256, 256), 128, 32, 32),
        ((192, 512), 128, 64, 32),  # landscape
        ((512, 96), 128, 32, 32),  # portrait strip narrower than the tile
        ((4096, 7168), 2048, 256, 32),
        ((8192, 8192), 2048, 256, 64),
        ((2304, 4096), 1792, 256, 128),  # SigLIP alignment
        ((256, 256), 256, 32, 32),  # tile = canvas
        ((128, 160), 512, 64, 32),  # canvas smaller than the tile
    ],
)
def test_plan_tiles_cover_align_and_share_one_shape(canvas, tile, overlap, align):
    H, W = canvas
    tiles = plan_tiles(canvas, tile, overlap, align)
    assert len({(t.h, t.w) for t in tiles}) == 1
    cover = torch.zeros(H, W, dtype=torch.int32)
    for t in tiles:
        assert t.y0 % align == 0 and t.x0 % align == 0 and t.h % align == 0 and t.w % align == 0
        assert 0 <= t.y0 and t.y0 + t.h <= H and 0 <= t.x0 and t.x0 + t.w <= W
        assert t.h == min(H, tile // align * align) and t.w == min(W, tile // align * align)
        cover[t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w] += 1
    assert cover.min() >= 1
    # Neighbours overlap by at least the requested amount (where the tile leaves room for it).
    for starts, size in ((sorted({t.y0 for t in tiles}), tiles[0].h), (sorted({t.x0 for t in tiles}), tiles[0].w)):
        for a, b in zip(starts, starts[1:]):
            assert a + size - b >= min(overlap, size - align)
    if H <= tile and W <= tile:
        assert len(tiles) == 1 and (tiles[0].h, tiles[0].w) == (H, W)


def test_plan_rejects_unaligned_canvas():
    with pytest.raises(ValueError):
        plan_tiles((200, 256), 128, 32, 32)


@pytest.mark.parametrize("canvas, tile, overlap", [((256, 384), 128, 32), ((4096, 4096), 2048, 256), ((512, 96), 128, 64)])
def test_weights_are_positive_smooth_and_a_partition_of_unity(canvas, tile, overlap):
    tiles = plan_tiles(canvas, tile, overlap, 32)
    wy, wx = tile_weights(tiles, canvas)
    total = torch.zeros(canvas, dtype=torch.float64)
    for t in tiles:
        w = wy[t.row][:, None].double() * wx[t.col][None, :].double()
        assert w.min() > 0
        total[t.y0 : t.y0 + t.h, t.x0 : t.x0 + t.w] += w
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    for weights in (wy, wx):
        for w in weights:
            # Raised-cosine ramps over >= `overlap` px: no step larger than the ramp's steepest one.
            assert (w[1:] - w[:-1]).abs().max() <= math.pi / (2 * min(overlap, w.numel())) + 1e-6


def test_weights_are_one_where_one_tile_covers():
    starts = [0, 96, 192]
    ws = axis_weights(starts, 128, 320)
    assert torch.all(ws[0][:96] == 1) and torch.all(ws[2][-96:] == 1)
    assert torch.all(ws[1][32:96] == 1)  # between its two overlaps
    single = axis_weights([0], 64, 64)
    assert torch.all(single[0] == 1)


# ------------------------------------------------------------------------------ tiled velocity: exact


def _local_model(x, t, latent, text, sigma):
    """A network whose velocity at a pixel depends only on that pixel and the latent cell under it:
    tiling it is exact, so this checks slicing, ordering and fusion."""
    scale = x.shape[-1] // latent.shape[-1]
    z = latent[:, :3].repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    return x * t.view(-1, 1, 1, 1) + z * text.mean((1, 2)).view(-1, 1, 1, 1) + sigma.view(-1, 1, 1, 1)


@pytest.mark.parametrize("batch_tiles", [1, 3, 4])
def test_tiled_velocity_of_a_local_model_is_exact(batch_tiles):
    B, H, W, scale = 2, 256, 384, 32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, H, W, generator=g)
    latent = torch.randn(B, 16, H // scale, W // scale, generator=g)
    text, sigma = torch.randn(B, 5, 8, generator=g), torch.tensor([0.2, 0.7])
    t = torch.tensor([0.866, 0.866])
    calls = []

    def call(xs, ts, zs, ys, ss):
        calls.append(xs.shape[0])
        return _local_model(xs, ts, zs, ys, ss)

    tiled = TiledVelocity(call, latent, canvas_hw=(H, W), tile_hw=128, overlap=64, scale=scale,
                          batch_tiles=batch_tiles, conditioning=(text, sigma))
    v = tiled(x, t)
    assert torch.allclose(v, _local_model(x, t, latent, text, sigma), atol=1e-5)
    n_tiles = len(tiled.tiles)
    assert sum(calls) == n_tiles * B and max(calls) <= batch_tiles * B


def test_tile_progress_callback_and_cancel():
    seen = []
    latent = torch.zeros(1, 4, 8, 8)
    tiled = TiledVelocity(lambda x, t, z: x, latent, canvas_hw=(256, 256), tile_hw=128, overlap=32, scale=32,
                          batch_tiles=2, callback_per_tile=lambda done, total: seen.append((done, total)))
    tiled(torch.zeros(1, 3, 256, 256), torch.ones(1))
    total = len(tiled.tiles)
    assert seen[-1] == (total, total) and all(b > a for (a, _), (b, _) in zip(seen, seen[1:]))

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    tiled.callback_per_tile = cancel
    with pytest.raises(Cancelled):
        sample(tiled, torch.zeros(1, 3, 256, 256), steps=2, generator=torch.Generator().manual_seed(0))


def test_padded_batches_keep_one_shape():
    shapes = []
    latent = torch.zeros(1, 4, 12, 4)

    def call(x, t, z):
        shapes.append(tuple(x.shape))
        return x

    tiled = TiledVelocity(call, latent, canvas_hw=(384, 128), tile_hw=128, overlap=64, scale=32, batch_tiles=2,
                          pad_batches=True)
    assert len(tiled.tiles) == 5
    x = torch.randn(1, 3, 384, 128)
    assert torch.allclose(tiled(x, torch.ones(1)), x, atol=1e-6)
    assert len(set(shapes)) == 1


# ------------------------------------------------------------------------ tiled decode, real network


def _decode(model, cfg, H, W, steps, plan, batch=1, seed=0, **kw):
    text, latent, sigma = _inputs(cfg, H, W, batch)
    noise, gen = initial_noise((batch, 3, H, W), seed=seed)
    with torch.no_grad():
        return sample(make_velocity(model, text, latent, sigma, plan=plan, **kw), noise, steps=steps, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_single_tile_equals_untiled_bit_exact(dtype):
    cfg = narrow_config(**SMALL)
    model = random_model(cfg, dtype=dtype)
    H, W = 128, 192
    text, latent, sigma = _inputs(cfg, H, W)

    def whole(x, t):
        with compute_context(model, "cpu"):
            return model(x, t, text, latent, sigma)

    def call(x, t, z, y, s):
        with compute_context(model, "cpu"):
            return model(x, t, y, z, s)

    tiled = TiledVelocity(call, latent, canvas_hw=(H, W), tile_hw=4096, overlap=64, scale=cfg.scale,
                          conditioning=(text, sigma))
    assert len(tiled.tiles) == 1
    outs = []
    for velocity in (whole, tiled):
        noise, gen = initial_noise((1, 3, H, W), seed=3)
        with torch.no_grad():
            outs.append(sample(velocity, noise, steps=4, generator=gen))
    assert torch.equal(outs[0], outs[1])
    # And through plan_decode / make_velocity (auto: the canvas is inside the trained range).
    plan = plan_decode(cfg, (H, W), TileOptions(pixel_chunk_tokens=None))
    assert not plan.tiled
    noise, gen = initial_noise((1, 3, H, W), seed=3)
    with torch.no_grad():
        assert torch.equal(sample(make_velocity(model, text, latent, sigma, plan=plan), noise, steps=4, generator=gen), outs[0])


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
    plan = plan_decode(cfg, (H, W), TileOptions(mode="manual", tile_px=tile, overlap_px=align // 2, max_batch_tiles=2))
    assert plan.tiled and all(t.y0 % cfg.scale == 0 and t.x0 % cfg.scale == 0 for t in plan.tiles)
    out = _decode(model, cfg, H, W, steps, plan, batch=2 if steps == 2 else 1)
    assert out.shape[-2:] == (H, W) and torch.isfinite(out).all()
    assert out.abs().max() <= 1


def test_seam_figure_small_scale():
    """The small analogue of the 2K/4K seam check: 3x3 tiles of 192 px on a 448 px canvas, 4 steps."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H = W = 448
    plan = plan_decode(cfg, (H, W), TileOptions(mode="manual", tile_px=192, overlap_px=64, max_batch_tiles=4))
    assert plan.grid == (3, 3)
    tiled = _decode(model, cfg, H, W, 4, plan)
    whole = _decode(model, cfg, H, W, 4, None)
    figure = seam_figure(tiled, plan.tiles, cfg.patch_size)
    assert figure <= 1.2
    assert abs(seam_figure(whole, plan.tiles, cfg.patch_size) - 1) < 0.2  # the statistic itself is unbiased


def test_seam_figure_sees_a_seam():
    img = torch.zeros(1, 3, 256, 256)
    img[..., :, 128:] = 1.0
    img += 0.01 * torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tiles = plan_tiles((256, 256), (256, 128), 0, 32)
    assert seam_figure(img, tiles) > 10


# --------------------------------------------------------------------------------- memory helpers


def test_chunked_x0_update_equals_whole(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 37, 41, generator=g)
    v = torch.randn(2, 3, 37, 41, generator=g).to(torch.bfloat16)
    t = torch.tensor([0.999, 0.342])
    whole = velocity_to_x0(x, v, t)
    monkeypatch.setattr(sampling, "X0_SLICE_ELEMENTS", 500)
    sliced = velocity_to_x0(x, v, t)
    assert torch.equal(whole, sliced) and sliced.dtype == x.dtype


def test_chunked_network_paths_equal_whole():
    """Chunked pixel blocks, embedding and read-out (bands of patch rows) against the reference order."""
    cfg = narrow_config(layout="v1.5", **SMALL)
    model = random_model(cfg)
    H, W = 96, 160
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 3, H, W, generator=g), torch.tensor([0.9, 0.3]), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g), torch.tensor([0.0, 0.5]))
    with torch.no_grad():
        whole = model(*args)
        for chunk in (1, 7, 10, 25, 10_000):
            assert (model(*args, chunk_tokens=chunk) - whole).abs().max().item() < 1e-5


def test_chunked_bf16_under_autocast_matches_whole():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    H, W = 96, 160
    args = (torch.randn(1, 3, H, W, generator=g), torch.tensor([0.9]), torch.randn(1, 7, 32, generator=g),
            torch.randn(1, 16, H // 32, W // 32, generator=g), torch.tensor([0.3]))
    with torch.no_grad(), compute_context(model, "cpu"):
        whole = model(*args)
        chunked = model(*args, chunk_tokens=7)
    assert chunked.dtype == whole.dtype == torch.bfloat16
    assert (whole.float() - chunked.float()).abs().max() <= 1e-2


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
    on_device = plan_decode(cfg, (8192, 8192), TileOptions(memory_budget_bytes=2 << 30, canvas_on_device=True),
                            dtype=torch.bfloat16, variant=flux2k)
    off_device = plan_decode(cfg, (8192, 8192), TileOptions(memory_budget_bytes=2 << 30, canvas_on_device=False),
                             dtype=torch.bfloat16, variant=flux2k)
    auto = plan_decode(cfg, (8192, 8192), TileOptions(memory_budget_bytes=2 << 30), dtype=torch.bfloat16,
                       variant=flux2k)
    # the 1.6 GB state on the GPU leaves room only for tiles below the trained size; on the CPU it does not
    assert on_device.canvas_on_device and on_device.below_trained and on_device.tile_hw[0] < 2048
    assert off_device.fits_budget and off_device.tile_hw == (2048, 2048) and not off_device.canvas_on_device
    assert auto == off_device  # the 1.6 GB state is over a quarter of 2 GB: auto keeps it on the CPU
    assert plan_decode(cfg, (4096, 4096), TileOptions(memory_budget_bytes=4 << 30), dtype=torch.bfloat16,
                       variant=flux2k).canvas_on_device
    # Manual and off.
    assert plan_decode(cfg, (4096, 4096), TileOptions(mode="off")).tiled is False
    manual = plan_decode(cfg, (4096, 4096), TileOptions(mode="manual", tile_px=1024, overlap_px=100))
    assert manual.tile_hw == (1024, 1024) and manual.overlap == 128
    with pytest.raises(ValueError):
        TileOptions(mode="manual")


def test_tiled_memory_is_bounded_by_the_tile():
    """Peak bytes allocated by one step's x0 (profiler), beyond the state x: the streamed tiled path
    grows only by its band of rows (one tile high, the canvas wide) as the canvas grows 4x, the
    untiled path with the canvas."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)

    def peak(H, W, plan):
        text, latent, sigma = _inputs(cfg, H, W)
        velocity = make_velocity(model, text, latent, sigma, plan=plan)
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

    def tiled(H, W):
        return plan_decode(cfg, (H, W), TileOptions(mode="manual", tile_px=128, overlap_px=32, max_batch_tiles=1,
                                                    pixel_chunk_tokens=None))

    small_t, canvas_small = peak(256, 256, tiled(256, 256))
    large_t, canvas_large = peak(512, 512, tiled(512, 512))
    small_u, _ = peak(256, 256, None)
    large_u, _ = peak(512, 512, None)
    band_growth = 3 * 128 * (512 - 256) * 4  # the band: 128 rows, 256 columns more
    assert large_t - small_t <= 1.5 * band_growth <= 0.25 * (canvas_large - canvas_small), (large_t, small_t)
    assert large_u > 3 * small_u
    assert large_t < 0.4 * large_u


# ------------------------------------------------------------------------------ offload and speed


def test_offload_on_cpu_equals_plain():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 64, 96
    text, latent, sigma = _inputs(cfg, H, W)
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x, torch.tensor([0.9]), text, latent, sigma)
        handle = enable_block_offload(model, "cpu")
        out = model(x, torch.tensor([0.9]), text, latent, sigma)
        assert handle.moves == cfg.patch_depth + cfg.pixel_depth
        handle.remove()
        again = model(x, torch.tensor([0.9]), text, latent, sigma)
    assert torch.equal(ref, out) and torch.equal(ref, again)
    assert offload_device_bytes(model) < sum(p.numel() * p.element_size() for p in model.parameters())


def test_offload_moves_each_block_only_while_it_runs():
    """With the meta device standing in for a GPU: each block's weights are on the device during its
    forward and back in CPU storage after; the small modules stay on the device."""
    cfg = narrow_config(**SMALL)
    model = copy.deepcopy(random_model(cfg))
    handle = enable_block_offload(model, "meta")
    during = []
    for block in list(model.patch_blocks) + list(model.pixel_blocks):
        block.register_forward_pre_hook(lambda m, a: during.append({p.device.type for p in m.parameters()}))
    assert all(p.device.type == "cpu" for b in model.patch_blocks for p in b.parameters())
    assert model.final_layer.linear.weight.device.type == "meta"
    H, W = 64, 64
    text, latent, sigma = _inputs(cfg, H, W)
    with torch.no_grad():
        out = model(torch.empty(1, 3, H, W, device="meta"), torch.tensor([0.9], device="meta"),
                    text.to("meta"), latent.to("meta"), sigma.to("meta"))
    assert out.shape == (1, 3, H, W) and out.device.type == "meta"
    assert during == [{"meta"}] * (cfg.patch_depth + cfg.pixel_depth)
    assert all(p.device.type == "cpu" for b in model.pixel_blocks for p in b.parameters())
    handle.remove()


def test_attention_backend_is_used_and_restored():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 64, 96
    text, latent, sigma = _inputs(cfg, H, W)
    x = torch.randn(1, 3, H, W)
    calls = []

    def counting(q, k, v):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v)

    def comfy_like(q, k, v, heads, skip_reshape=False):  # ComfyUI's optimized_attention contract
        assert skip_reshape and q.shape[1] == heads
        calls.append("comfy")
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

    with torch.no_grad():
        ref = model(x, torch.tensor([0.9]), text, latent, sigma)
        with attention_backend(counting):
            out = model(x, torch.tensor([0.9]), text, latent, sigma)
        assert len(calls) == cfg.patch_depth + cfg.pixel_depth
        assert layers._attention_backend is None
        with attention_backend(heads_merged_backend(comfy_like)):
            out2 = model(x, torch.tensor([0.9]), text, latent, sigma)
        assert calls.count("comfy") == cfg.patch_depth + cfg.pixel_depth
    assert layers._attention_backend is None
    assert torch.equal(ref, out)
    assert (ref - out2).abs().max() < 1e-5


def test_compile_helper_is_opt_in():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    compiled = compile_model(model)  # lazy: nothing compiles until called
    assert compiled is not model and callable(compiled)
    assert not hasattr(model, "_orig_mod")  # the model itself is untouched; decoding uses it by default


def test_default_overlap():
    from pid_core.tiling import default_overlap

    assert default_overlap(2048, 32) == 256 and default_overlap(1024, 32) == 160 and default_overlap(128, 32) == 32
    assert default_overlap(2048, 128) == 256


def _nonlinear_call(x, t, z):
    """A stand-in network whose v depends on the tile (position-dependent, nonlinear)."""
    tt = t.view(-1, 1, 1, 1)
    return torch.tanh(3 * x) * tt + z.mean(1, keepdim=True).repeat_interleave(32, -2).repeat_interleave(32, -1)


@pytest.mark.parametrize("canvas_hw,tile,batch", [
    ((256, 256), 128, 1),   # 3 x 3 tiles, one at a time
    ((256, 256), 128, 4),   # batches spanning tile rows
    ((448, 128), 128, 3),   # one column: a batch spans three tile rows, the band wraps around its ring
    ((192, 320), 128, 2),
    ((128, 192), 4096, 1),  # one tile
])
def test_streamed_x0_equals_fused_velocity_bit_exact(canvas_hw, tile, batch):
    """denoise_in_place (band of rows, x0 written as rows finish) == x0 from the whole fused v."""
    H, W = canvas_hw
    latent = torch.randn(2, 4, H // 32, W // 32, generator=torch.Generator().manual_seed(1))
    tiled = TiledVelocity(_nonlinear_call, latent, canvas_hw=(H, W), tile_hw=tile, overlap=64, scale=32,
                          batch_tiles=batch)
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.866, 0.342])
    expected = velocity_to_x0(x, tiled(x, t), t)
    y = x.clone()
    assert tiled.denoise_in_place(y, t) is y
    assert torch.equal(y, expected)


def test_sampler_streams_tiles_without_touching_given_noise():
    latent = torch.randn(1, 4, 8, 8)
    tiled = TiledVelocity(_nonlinear_call, latent, canvas_hw=(256, 256), tile_hw=128, overlap=32, scale=32)
    noise = torch.randn(1, 3, 256, 256)
    kept = noise.clone()
    renoise = [torch.randn(1, 3, 256, 256) for _ in range(3)]
    streamed = sample(tiled, noise, steps=4, renoise=renoise)
    assert torch.equal(noise, kept)  # copied before the first in-place step

    def fused(x, t):  # the same velocity without denoise_in_place: the out-of-place reference loop
        return tiled(x, t)

    assert torch.equal(streamed, sample(fused, noise, steps=4, renoise=renoise))
    # overwrite_noise hands the storage over: the result is the noise tensor itself
    same = sample(tiled, noise, steps=4, renoise=renoise, overwrite_noise=True)
    assert same.data_ptr() == noise.data_ptr() and torch.equal(same, streamed)


def test_cut_short_runs_still_finish_every_row():
    latent = torch.zeros(1, 4, 8, 8)
    tiled = TiledVelocity(lambda x, t, z: torch.ones_like(x), latent, canvas_hw=(256, 256), tile_hw=128,
                          overlap=32, scale=32, max_batches=1)
    x = torch.zeros(1, 3, 256, 256)
    tiled.denoise_in_place(x, torch.ones(1))
    assert tiled.cut_short and tiled.forward_calls == 1
    y1 = min(t.y0 for t in tiled.tiles if t.y0 > 0)
    x1 = min(t.x0 for t in tiled.tiles if t.x0 > 0)
    assert (x[..., :y1, :x1] == -1).all()  # covered by the first tile only: x0 = 0 - 1 * 1
    assert (x[..., -1, -1] == 0).all()  # never computed: v = 0


def test_bench_worker_and_seam_in_process(capsys):
    """The benchmark's measurement and seam paths, on a narrow model at a tiny size (the real runs
    use the full-size model in subprocesses: python -m pid_core.bench)."""
    from pid_core import bench

    row = bench.worker(dict(mode="tiled", chunk="on", dtype="fp32", device="cpu", size=[128, 192], tile=128,
                            overlap=32, steps=2, batch_tiles=1, narrow=True, max_tile_batches=1))
    assert row["tiles"] == 2 and row["cut"] and row["forwards"] == 2 and row["working"] >= 0 and "forward" in row
    assert "cut: 2 of 4 forwards" in bench._format_row(dict(row, mode="tiled", chunk="on", dtype="fp32", device="cpu",
                                                            size=[128, 192], steps=2))
    bench.main(["--seam-only", "--seam-sizes", "192", "--seam-tile", "128", "--seam-steps", "1", "--overlap", "32"])
    out = capsys.readouterr().out
    assert "192x192" in out


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_network_matches_eager_on_static_tiles():
    """torch.compile (dynamic=False) through the tiled path with padded batches: one shape, same values."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 128, 320
    text, latent, sigma = _inputs(cfg, H, W)
    plan = plan_decode(cfg, (H, W), TileOptions(mode="manual", tile_px=128, overlap_px=32, max_batch_tiles=2))
    x = torch.randn(1, 3, H, W)
    eager = make_velocity(model, text, latent, sigma, plan=plan, pad_batches=True)(x, torch.tensor([0.9]))
    compiled = make_velocity(model, text, latent, sigma, plan=plan, pad_batches=True,
                             network=compile_model(model))(x, torch.tensor([0.9]))
    assert (eager - compiled).abs().max() < 1e-4
