"""The benchmark: its measurement worker and the seam figure."""

import torch

from pid_core.commands import bench, main
from pid_core.commands.bench import seam_figure
from pid_core.commands.measuring import parse_sizes
from pid_core.commands.random_checkpoints import narrow_config, random_model
from pid_core.tiling import TileOptions
from pid_core.tiling.geometry import plan_tiles

from small_decode import SMALL, small_decode, small_plan


def test_seam_figure_small_scale():
    """The small analogue of the 2K/4K seam check: 3x3 tiles of 192 px on a 448 px canvas, 4 steps."""
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H = W = 448
    tiling = TileOptions(mode="manual", tile_px=192, overlap_px=64, max_batch_tiles=4)
    plan = small_plan(model, H, W, tiling).tiles
    assert plan.grid == (3, 3)
    tiled = small_decode(model, cfg, H, W, 4, tiling)
    whole = small_decode(model, cfg, H, W, 4, None)
    figure = seam_figure(tiled, plan.tiles, cfg.patch_size)
    assert figure <= 1.2
    assert abs(seam_figure(whole, plan.tiles, cfg.patch_size) - 1) < 0.2  # the statistic itself is unbiased


def test_seam_figure_sees_a_seam():
    img = torch.zeros(1, 3, 256, 256)
    img[..., :, 128:] = 1.0
    img += 0.01 * torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    tiles = plan_tiles((256, 256), (256, 128), 0, 32)
    assert seam_figure(img, tiles) > 10


def test_bench_worker_and_seam_in_process(capsys):
    """The benchmark's measurement and seam paths, on a narrow model at a tiny size (the real runs
    use the full-size model in subprocesses: python -m pid_core bench)."""

    row = bench.worker(dict(mode="tiled", chunk="on", dtype="fp32", device="cpu", size=[128, 192], tile=128,
                            overlap=32, steps=2, batch_tiles=1, narrow=True, max_tile_batches=1))
    assert row["tiles"] == 2 and row["cut"] and row["forwards"] == 2 and row["working"] >= 0 and "forward" in row
    assert "cut: 2 of 4 forwards" in bench._format_row(dict(row, mode="tiled", chunk="on", dtype="fp32", device="cpu",
                                                            size=[128, 192], steps=2))
    main(["bench", "--seam-only", "--seam-sizes", "192", "--seam-tile", "128", "--seam-steps", "1", "--overlap", "32"])
    out = capsys.readouterr().out
    assert "192x192" in out


def test_bench_worker_runs_the_teacher_sampler():
    row = bench.worker(dict(mode="untiled", chunk="on", dtype="fp32", device="cpu", size=[64, 64], tile=64, overlap=0,
                            steps=3, batch_tiles=1, narrow=True, layout="v1.5", latent_channels=16, sampler="teacher",
                            cfg=5.0))
    # 3 guided steps: the first (t near 1) as two forwards, the others batched
    assert row["forwards"] == 4 and row["finite"] and row["cpu_time"] > 0
    text = bench._format_row(dict(row, mode="untiled", chunk="on", dtype="fp32", device="cpu", size=[64, 64], steps=3,
                                  sampler="teacher", cfg=5.0))
    assert "teacher cfg 5" in text and "4 forward(s)" in text


def test_bad_sizes_end_in_one_line(capsys):
    import pytest

    for sizes in ("abc", "0", "2048x", "32"):
        with pytest.raises(SystemExit) as stop:
            main(["bench", "--sizes", sizes])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and len(err.splitlines()) == 1 and "is no output size" in err, err
    assert parse_sizes("1024, 768x512") == [(1024, 1024), (512, 768)]


def test_bench_reference_skips_without_a_checkout():
    """The side-by-side benchmark needs a checkout of nv-tlabs/PiD (never part of this repository)."""
    import pytest

    from pid_core.commands.bench_reference import import_reference_network
    from pid_core.errors import ArgumentError

    with pytest.raises(ArgumentError, match="checkout of nv-tlabs/PiD"):
        import_reference_network("/nonexistent")


def test_bench_command_measures_a_narrow_model(capsys):
    """The whole command (its memory guard, a worker subprocess per row, the table) at a tiny size."""
    assert main(["bench", "--narrow", "--layout", "v1.5", "--sizes", "64", "--modes", "untiled", "--chunk", "on,auto",
                 "--steps", "1", "--device", "cpu", "--no-seam"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("untiled")]
    assert len(rows) == 2 and not any("error" in row for row in rows), rows
