"""Fusion of tile velocities: exact slicing and ordering, streaming equal to fusing first, progress, cancel."""

import pytest
import torch

from pid_core.sampling import sample, student_schedule, velocity_to_x0
from pid_core.tiling.fusion import TiledVelocity
from pid_core.tiling.geometry import plan_tiles


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

    tiled = TiledVelocity(call, latent, plan_tiles((H, W), 128, 64, 32), scale=scale, device="cpu",
                          batch_tiles=batch_tiles, conditioning=(text, sigma))
    v = tiled(x, t)
    assert torch.allclose(v, _local_model(x, t, latent, text, sigma), atol=1e-5)
    n_tiles = len(tiled.tiles)
    assert sum(calls) == n_tiles * B and max(calls) <= batch_tiles * B


def test_tile_progress_callback_and_cancel():
    seen = []
    latent = torch.zeros(1, 4, 8, 8)
    tiled = TiledVelocity(lambda x, t, z: x, latent, plan_tiles((256, 256), 128, 32, 32), scale=32, device="cpu",
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
        sample(tiled, torch.zeros(1, 3, 256, 256), student_schedule(2), generator=torch.Generator().manual_seed(0))


def test_padded_batches_keep_one_shape():
    shapes = []
    latent = torch.zeros(1, 4, 12, 4)

    def call(x, t, z):
        shapes.append(tuple(x.shape))
        return x

    tiled = TiledVelocity(call, latent, plan_tiles((384, 128), 128, 64, 32), scale=32, device="cpu", batch_tiles=2,
                          pad_batches=True)
    assert len(tiled.tiles) == 5
    x = torch.randn(1, 3, 384, 128)
    assert torch.allclose(tiled(x, torch.ones(1)), x, atol=1e-6)
    assert len(set(shapes)) == 1


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
    tiled = TiledVelocity(_nonlinear_call, latent, plan_tiles((H, W), tile, 64, 32), scale=32, device="cpu",
                          batch_tiles=batch)
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.866, 0.342])
    expected = velocity_to_x0(x, tiled(x, t), t)
    y = x.clone()
    assert tiled.denoise_in_place(y, t) is y
    assert torch.equal(y, expected)


def test_sampler_streams_tiles_without_touching_given_noise():
    latent = torch.randn(1, 4, 8, 8)
    tiled = TiledVelocity(_nonlinear_call, latent, plan_tiles((256, 256), 128, 32, 32), scale=32, device="cpu")
    noise = torch.randn(1, 3, 256, 256)
    kept = noise.clone()
    renoise = [torch.randn(1, 3, 256, 256) for _ in range(3)]
    streamed = sample(tiled, noise, student_schedule(4), renoise=renoise)
    assert torch.equal(noise, kept)  # copied before the first in-place step

    def fused(x, t):  # the same velocity without denoise_in_place: the out-of-place reference loop
        return tiled(x, t)

    assert torch.equal(streamed, sample(fused, noise, student_schedule(4), renoise=renoise))
    # overwrite_noise hands the storage over: the result is the noise tensor itself
    same = sample(tiled, noise, student_schedule(4), renoise=renoise, overwrite_noise=True)
    assert same.data_ptr() == noise.data_ptr() and torch.equal(same, streamed)


def test_cut_short_runs_still_finish_every_row():
    latent = torch.zeros(1, 4, 8, 8)
    tiled = TiledVelocity(lambda x, t, z: torch.ones_like(x), latent, plan_tiles((256, 256), 128, 32, 32),
                          scale=32, device="cpu", max_batches=1)
    x = torch.zeros(1, 3, 256, 256)
    tiled.denoise_in_place(x, torch.ones(1))
    assert tiled.cut_short and tiled.forward_calls == 1
    y1 = min(t.y0 for t in tiled.tiles if t.y0 > 0)
    x1 = min(t.x0 for t in tiled.tiles if t.x0 > 0)
    assert (x[..., :y1, :x1] == -1).all()  # covered by the first tile only: x0 = 0 - 1 * 1
    assert (x[..., -1, -1] == 0).all()  # never computed: v = 0
