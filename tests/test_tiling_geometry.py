"""Tile geometry: tiles cover the canvas in one shape, aligned; weights are a smooth partition of unity."""

import math

import pytest
import torch

from pid_core.tiling.geometry import axis_weights, default_overlap, plan_tiles, tile_weights


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


def test_default_overlap():
    assert default_overlap(2048, 32) == 256 and default_overlap(1024, 32) == 160 and default_overlap(128, 32) == 32
    assert default_overlap(2048, 128) == 256
