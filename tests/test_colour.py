"""Colour against a colour reference: CIEDE2000, the colour error, the match, the reference check, and the
bench-colour command at a tiny size."""

import json

import pytest
import torch
import torch.nn.functional as F

from pid_core import colour
from pid_core.colour import (
    ColourError,
    area_resize,
    check_colour_reference,
    ciede2000,
    colour_error,
    lab_to_srgb,
    match_colour,
    srgb_to_lab,
)
from pid_core.commands import main
from pid_core.commands.bench import seam_figure
from pid_core.commands.bench_colour import detail_figures, drift, synthetic_scene, tiled_drift
from pid_core.errors import ArgumentError, ColourReferenceError, PidError
from pid_core.tiling.geometry import plan_tiles

# Sharma, Wu and Dalal (2005), "The CIEDE2000 color-difference formula: implementation notes,
# supplementary test data, and mathematical observations", Table 1: L1 a1 b1, L2 a2 b2, ΔE00.
SHARMA_PAIRS = [
    (50.0000, 2.6772, -79.7751, 50.0000, 0.0000, -82.7485, 2.0425),
    (50.0000, 3.1571, -77.2803, 50.0000, 0.0000, -82.7485, 2.8615),
    (50.0000, 2.8361, -74.0200, 50.0000, 0.0000, -82.7485, 3.4412),
    (50.0000, -1.3802, -84.2814, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -1.1848, -84.8006, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, -0.9009, -85.5211, 50.0000, 0.0000, -82.7485, 1.0000),
    (50.0000, 0.0000, 0.0000, 50.0000, -1.0000, 2.0000, 2.3669),
    (50.0000, -1.0000, 2.0000, 50.0000, 0.0000, 0.0000, 2.3669),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0009, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0010, 7.1792),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0011, 7.2195),
    (50.0000, 2.4900, -0.0010, 50.0000, -2.4900, 0.0012, 7.2195),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0009, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0010, -2.4900, 4.8045),
    (50.0000, -0.0010, 2.4900, 50.0000, 0.0011, -2.4900, 4.7461),
    (50.0000, 2.5000, 0.0000, 50.0000, 0.0000, -2.5000, 4.3065),
    (50.0000, 2.5000, 0.0000, 73.0000, 25.0000, -18.0000, 27.1492),
    (50.0000, 2.5000, 0.0000, 61.0000, -5.0000, 29.0000, 22.8977),
    (50.0000, 2.5000, 0.0000, 56.0000, -27.0000, -3.0000, 31.9030),
    (50.0000, 2.5000, 0.0000, 58.0000, 24.0000, 15.0000, 19.4535),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.1736, 0.5854, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2972, 0.0000, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 1.8634, 0.5757, 1.0000),
    (50.0000, 2.5000, 0.0000, 50.0000, 3.2592, 0.3350, 1.0000),
    (60.2574, -34.0099, 36.2677, 60.4626, -34.1751, 39.4387, 1.2644),
    (63.0109, -31.0961, -5.8663, 62.8187, -29.7946, -4.0864, 1.2630),
    (61.2901, 3.7196, -5.3901, 61.4292, 2.2480, -4.9620, 1.8731),
    (35.0831, -44.1164, 3.7933, 35.0232, -40.0716, 1.5901, 1.8645),
    (22.7233, 20.0904, -46.6940, 23.0331, 14.9730, -42.5619, 2.0373),
    (36.4612, 47.8580, 18.3852, 36.2715, 50.5065, 21.2231, 1.4146),
    (90.8027, -2.0831, 1.4410, 91.1528, -1.6435, 0.0447, 1.4441),
    (90.9257, -0.5406, -0.9208, 88.6381, -0.8985, -0.7239, 1.5381),
    (6.7747, -0.2908, -2.4247, 5.8714, -0.0985, -2.2286, 0.6377),
    (2.0776, 0.0795, -1.1350, 0.9033, -0.0636, -0.5514, 0.9082),
]

# The targets (and the tiny tiled canvas's seam band)
TARGET_DELTA_E = 1.0
TARGET_HF_RATIO = (0.95, 1.05)
TARGET_HF_PSNR = 35.0
TARGET_SEAM = (0.98, 1.02)


def test_ciede2000_matches_the_published_pairs():
    table = torch.tensor(SHARMA_PAIRS, dtype=torch.float64)
    lab1, lab2, expected = table[:, 0:3], table[:, 3:6], table[:, 6]
    assert (ciede2000(lab1, lab2) - expected).abs().max() < 1e-4  # the table has 4 decimals
    assert (ciede2000(lab2, lab1) - expected).abs().max() < 1e-4  # and the formula is symmetric
    assert ciede2000(lab1, lab1).abs().max() == 0


def test_srgb_to_lab_known_values():
    rgb = torch.tensor([[1.0, 1, 1], [0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [128 / 255] * 3], dtype=torch.float64)
    expected = torch.tensor([[100, 0, 0], [0, 0, 0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                             [32.2970, 79.1875, -107.8602], [53.5850, 0, 0]], dtype=torch.float64)
    assert (srgb_to_lab(rgb) - expected).abs().max() < 2e-3
    assert (lab_to_srgb(srgb_to_lab(rgb)) - rgb).abs().max() < 1e-9
    grid = torch.rand(2, 3, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert (lab_to_srgb(srgb_to_lab(grid)) - grid).abs().max() < 1e-9  # [B, 3, H, W] too


def test_area_resize_is_torchs_area_for_whole_ratios_and_exact_coverage_otherwise():
    x = torch.rand(2, 3, 48, 36, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(area_resize(x, (12, 9)), F.interpolate(x, size=(12, 9), mode="area"), atol=1e-6)
    odd = area_resize(x, (13, 10))  # 48/13 and 36/10 px per output pixel, partial pixels weighted
    assert torch.allclose(odd.mean((2, 3)), x.mean((2, 3)), atol=1e-6)  # every input pixel counts once
    assert torch.equal(area_resize(x, (13, 10), chunk_pixels=50), odd)
    flat = torch.full((1, 3, 17, 11), 0.25)
    assert torch.allclose(area_resize(flat, (5, 4)), torch.full((1, 3, 5, 4), 0.25))


def test_colour_error_of_an_image_that_matches_is_zero_and_counts_levels():
    ref = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1
    image = F.interpolate(ref, scale_factor=4, mode="nearest")  # area-downsamples back to ref exactly
    error = colour_error(image, ref)
    assert isinstance(error, ColourError)
    assert error.delta_e.shape == (2,) and error.delta_e.abs().max() < 1e-4 and error.levels.abs().max() < 1e-4  # float32 means
    shifted = image.clone()
    shifted[1, 0] += 3 / 255  # one channel of the second image, 3 levels: mean over R, G, B = 1 level
    error = colour_error(shifted, ref)
    assert error.levels[0] < 1e-4 and abs(error.levels[1] - 1.0) < 1e-3
    assert error.delta_e[0] < 1e-4 < 0.5 < error.delta_e[1]
    one = colour_error(image[:1], ref[:1])  # [1] reference for all, 3-D images, a reference larger than the image
    assert torch.allclose(colour_error(image[0], ref[0]).delta_e, one.delta_e)
    assert torch.allclose(colour_error(ref[:1], image[:1]).delta_e, one.delta_e, atol=1e-6)
    assert "CIEDE2000" in error.describe() and "levels" in error.describe()


def test_strength_zero_returns_the_input_untouched():
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(3))
    ref = torch.rand(1, 3, 10, 10)
    before = image.clone()
    out = match_colour(image, ref, strength=0.0)
    assert out is image and torch.equal(out, before)
    assert match_colour(image, ref, 0) is image


def _scene(height=256, width=256, scale=4):
    clean = synthetic_scene(height, width, scale=scale)
    reference = area_resize(clean, (height // scale, width // scale))
    return clean, reference


def test_strength_between_zero_and_one_interpolates():
    clean, reference = _scene(128, 128)
    drifted = drift(clean)
    full = match_colour(drifted, reference)
    assert 0 < full.min() and full.max() < 1  # nothing clipped, so the blend is exact up to rounding
    for s in (0.25, 0.5):
        assert torch.allclose(match_colour(drifted, reference, s), drifted + s * (full - drifted), atol=1e-6)
    half = colour_error(match_colour(drifted, reference, 0.5), reference).delta_e.item()
    assert colour_error(full, reference).delta_e.item() < half < colour_error(drifted, reference).delta_e.item()


@pytest.mark.parametrize("cast", ["srgb", "linear"])
def test_detail_kept_and_colour_fixed_at_the_targets(cast):
    clean, reference = _scene()
    drifted = drift(clean, space=cast)
    before = colour_error(drifted, reference)
    assert 3 <= before.delta_e.item() <= 6  # a cast like the (3-4 in sRGB; linear light hits harder)
    ratio_before, _ = detail_figures(drifted, clean, reference.shape[-2:])
    assert ratio_before < 0.92  # the cast also flattened the texture
    matched = match_colour(drifted, reference)
    assert colour_error(matched, reference).delta_e.item() < TARGET_DELTA_E
    ratio, db = detail_figures(matched, clean, reference.shape[-2:])
    assert TARGET_HF_RATIO[0] <= ratio <= TARGET_HF_RATIO[1] and db >= TARGET_HF_PSNR


def test_an_image_that_already_matches_is_left_as_it_is():
    for height, width, h, w in ((256, 256, 64, 64), (301, 203, 97, 65)):
        clean = synthetic_scene(height, width)
        reference = area_resize(clean, (h, w))
        assert (match_colour(clean, reference) - clean).abs().max() < 1e-5


def test_chunked_equals_unchunked():
    """Chunks of rows compute every output row from the same input rows by the same operations: equal."""
    for height, width, h, w in ((200, 136, 50, 34), (301, 203, 97, 65)):
        clean = synthetic_scene(height, width)
        reference = area_resize(clean, (h, w))
        drifted = drift(clean)
        whole = match_colour(drifted, reference, chunk_pixels=1 << 30)
        assert torch.equal(match_colour(drifted, reference, chunk_pixels=1000), whole)
        assert torch.equal(match_colour(drifted, reference, chunk_pixels=1), whole)  # one row at a time
        a, b = colour_error(drifted, reference, chunk_pixels=300), colour_error(drifted, reference, chunk_pixels=1 << 30)
        assert torch.allclose(a.delta_e, b.delta_e, rtol=1e-12)  # float64 sums in another grouping


def test_any_size_batch_dtype_and_space():
    g = torch.Generator().manual_seed(4)
    image = torch.rand(2, 3, 97, 61, generator=g) * 0.6 + 0.2  # odd sizes, reference not a divisor
    ref = torch.rand(1, 3, 30, 19, generator=g) * 0.6 + 0.2
    for space in colour.SPACES:
        out = match_colour(image, ref, space=space)
        assert out.shape == image.shape and out.dtype == image.dtype and torch.isfinite(out).all()
        assert 0 <= out.min() and out.max() <= 1
    per_image = match_colour(image, ref.expand(2, -1, -1, -1))
    assert torch.equal(per_image, match_colour(image, ref))
    assert torch.equal(match_colour(image[0], ref[0]), match_colour(image[:1], ref)[0])  # [3, H, W]
    half = match_colour(image.half(), ref)
    assert half.dtype == torch.float16 and (half.float() - match_colour(image.half().float(), ref)).abs().max() < 1e-3
    larger = F.interpolate(image[:1], scale_factor=2, mode="nearest")  # a reference larger than the image
    assert (match_colour(image[:1], larger) - image[:1]).abs().max() < 1e-5
    channels_last = image.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # a ComfyUI IMAGE, permuted
    assert torch.allclose(match_colour(channels_last, ref), match_colour(image, ref), atol=1e-6)
    tiny = match_colour(torch.rand(1, 3, 5, 5), torch.rand(1, 3, 1, 1))
    assert tiny.shape == (1, 3, 5, 5) and torch.isfinite(tiny).all()


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), True, "1", None])
def test_bad_strength_is_refused(strength):
    with pytest.raises(ArgumentError, match="strength must be a number from 0 to 1"):
        match_colour(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 2, 2), strength)


def test_unknown_space_and_bad_settings_are_refused():
    image, ref = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 2, 2)
    with pytest.raises(ArgumentError, match="Unknown colour space 'hsv'"):
        match_colour(image, ref, space="hsv")
    with pytest.raises(ArgumentError, match="cells must be a whole number"):
        match_colour(image, ref, cells=0)
    with pytest.raises(ArgumentError, match="cell_samples must be a whole number"):
        match_colour(image, ref, cell_samples=2.5)
    for ridge in (0.0, float("inf"), float("nan")):
        with pytest.raises(ArgumentError, match="ridge must be a positive number"):
            match_colour(image, ref, ridge=ridge)


def test_good_references_pass():
    for ref, batch in ((torch.rand(1, 3, 64, 96), 2), (torch.rand(2, 3, 64, 96), 2), (torch.rand(3, 64, 96), 1),
                       (torch.rand(1, 3, 128, 193), 1),  # 0.5% wider than the image: within 1%
                       (torch.rand(1, 3, 512, 768), 1), (torch.rand(1, 3, 64, 96, dtype=torch.float16), 1)):
        assert check_colour_reference(ref, (256, 384), batch) is None


def _nan():
    ref = torch.rand(1, 3, 64, 64)
    ref[0, 1, 5, 5] = float("nan")
    return ref


def _inf():
    ref = torch.rand(1, 3, 64, 64)
    ref[0, 2, 0, 0] = float("inf")
    return ref


BAD_REFERENCES = [
    (lambda: torch.rand(1, 3, 64, 96), "is 96x64 .* the decoded image is 256x256"),  # aspect ratio
    (lambda: torch.rand(1, 3, 64, 65), "is 65x64 .* the decoded image is 256x256"),  # 1.6% off
    (_nan, "NaN or infinite"),
    (_inf, "NaN or infinite"),
    (lambda: torch.rand(1, 4, 64, 64), "has 4 colour channels; it must have 3"),
    (lambda: torch.rand(1, 1, 64, 64), "has 1 colour channel; it must have 3"),
    (lambda: torch.rand(3, 3, 64, 64), "holds 3 images but the decode makes 2"),
    (lambda: (torch.rand(1, 3, 64, 64) * 255).to(torch.uint8), "holds uint8 values"),
    (lambda: torch.rand(1, 3, 64, 64) * 255, "values from 0 to 1"),
    (lambda: torch.rand(1, 3, 64, 64) * 2 - 1, "values from 0 to 1"),
    (lambda: torch.rand(64, 64), "shape \\[batch, 3, height, width\\]"),
    (lambda: torch.rand(1, 3, 0, 64), "empty"),
    (lambda: [[0.5]], "must be an image tensor, got list"),
]


@pytest.mark.parametrize("make, message", BAD_REFERENCES)
def test_bad_references_are_refused_in_one_line(make, message):
    with pytest.raises(ColourReferenceError, match=message) as caught:
        check_colour_reference(make(), (256, 256), 2)
    assert isinstance(caught.value, PidError) and "\n" not in str(caught.value)
    image = torch.rand(2, 3, 256, 256)
    for use in (lambda ref: match_colour(image, ref), lambda ref: match_colour(image, ref, 0.0),
                lambda ref: colour_error(image, ref)):  # the functions that take a reference check it too
        with pytest.raises(ColourReferenceError, match=message):
            use(make())


def test_a_tiled_canvas_has_no_seams_after_matching():
    """The small analogue of the 8192 px canvas of bench-colour: 3 x 3 tiles, each with its own drift,
    blended as the tile fusion blends them, matched as a whole."""
    size = 512
    clean, reference = _scene(size, size)
    tiles = plan_tiles((size, size), 256, 64, 32)
    assert len(tiles) == 9
    drifted = tiled_drift(clean, tiles, blend=True)
    matched = match_colour(drifted, reference)
    assert TARGET_SEAM[0] <= seam_figure(matched, tiles) <= TARGET_SEAM[1]
    assert colour_error(drifted, reference).delta_e.item() > 3 > 1 > colour_error(matched, reference).delta_e.item()


def test_bench_colour_command_at_a_tiny_size(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    assert main(["bench-colour", "--sizes", "128", "--spaces", "srgb", "--drift-spaces", "srgb,linear",
                 "--time-sizes", "128", "--runs", "1", "--seam-size", "256", "--tile", "128", "--json", str(rows)]) == 0
    out = capsys.readouterr().out
    assert "cast in linear, matched (srgb)" in out and "already right, matched (srgb)" in out
    assert "hard borders" in out and "128x128" in out
    kinds = [json.loads(line)["kind"] for line in rows.read_text().splitlines()]
    assert kinds.count("quality") == 7 and kinds.count("time") == 1 and kinds.count("seam") == 2
    timed = [json.loads(line) for line in rows.read_text().splitlines() if '"time"' in line]
    assert all("error" not in row and row["wall"] > 0 and row["peak"] > 0 for row in timed)
    assert main(["bench-colour", "--spaces", "hsv", "--sizes", "", "--time-sizes", "", "--seam-size", "0"]) == 2
    assert "error: --spaces: unknown colour space hsv" in capsys.readouterr().err
    assert main(["bench-colour", "--drift-spaces", "xyz", "--sizes", "", "--time-sizes", "", "--seam-size", "0"]) == 2
    assert "error: --drift-spaces: unknown colour space xyz (use srgb, linear)" in capsys.readouterr().err
