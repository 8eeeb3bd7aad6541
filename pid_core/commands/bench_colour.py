"""Colour matching measured on synthetic images (no weights): colour error, detail kept, time, seams.

    python -m pid_core bench-colour [--sizes 2048] [--spaces srgb,linear,lab] [--drift-spaces srgb,linear]
                                    [--cells 16] [--cell-samples 2] [--ridge 1e-4]
                                    [--time-sizes 2048,4096,8192] [--runs 3] [--seam-size 8192] [--tile 2048]
                                    [--device cpu] [--json FILE]

The scene (`synthetic_scene`): a smooth colour field (a few low-frequency waves per channel) plus fine
texture (white noise, mostly in luminance, and noise at the reference's scale). The reference is its
area-downsample by --scale (4, as PiD's output is to its latent's VAE decode). The drifted copy
(`drift`) has a known cast: a 3x3 colour matrix that loses contrast and saturation, a bias, and a slowly
varying spatial tint, applied to every pixel (so the cast also flattens the texture).

Quality (per --sizes, before and after `match_colour` in each of --spaces): mean CIEDE2000 against the
reference, channel means off (8-bit levels), and the detail: the high band of an image is the image minus
its area-downsample to the reference's size interpolated back (bilinearly), so the band holds what the
reference cannot; printed are its energy over the clean image's and its PSNR against the clean image's
high band (peak 1). The "already right" rows match the clean image itself: what matching does to an
image that needs nothing; with a softer reference (`soften`), what it does to the detail when the
reference lacks some (its ΔE is against that softer reference).

--cells, --cell-samples and --ridge set match_colour's fit for the quality table (docs/DESIGN.md §15
compares them); --drift-spaces: the cast applied to the sRGB values or in linear light.

Time (per --time-sizes and space, each in a fresh process): match_colour alone on a drifted canvas, the
best of --runs runs (wall and CPU seconds), and the peak memory of its first run beyond what existed
before (resident memory on the CPU, with every freed block of 1 MiB or more returned to the system as in
`bench`; torch's allocator on CUDA): its inputs are not counted, its result is.

Seams (--seam-size, tiles of --tile px laid out as a tiled decode lays them): every tile gets its own
slightly different drift, either blended across the overlaps with the tile fusion's weights (what a fused
tiled decode would show) or pasted with hard borders (tiles decoded on their own). Printed before and
after matching the whole canvas: the seam figure of `bench.seam_figure` (1.0: tile borders look like any
other border) and the mean CIEDE2000.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from .. import colour
from ..errors import ArgumentError
from ..tiling.geometry import default_overlap, plan_tiles, tile_weights
from .bench import _peak, _reset_peak, _worker_env, seam_figure

LUMA = (0.2126, 0.7152, 0.0722)


# --------------------------------------------------------------------------------------------------
# The synthetic images


def _waves(n: int, g: torch.Generator, count: int) -> torch.Tensor:
    """[count, n]: cos(2 pi f t + phase) over t in [0, 1), f in [-3, 3] cycles per image."""
    t = torch.arange(n, dtype=torch.float64) / n
    f = torch.rand(count, 1, generator=g, dtype=torch.float64) * 6 - 3
    phase = torch.rand(count, 1, generator=g, dtype=torch.float64) * 2 * math.pi
    return torch.cos(2 * math.pi * f * t + phase).float()


def synthetic_scene(height: int, width: int, *, scale: int = 4, seed: int = 0, device="cpu") -> torch.Tensor:
    """[1, 3, H, W] in [0, 1]: a smooth colour field plus fine texture (module docstring)."""
    g = torch.Generator().manual_seed(seed)
    waves, amps = 4, [0.12 / (k + 1) for k in range(4)]
    base = (torch.rand(3, generator=g) * 0.3 + 0.35).tolist()
    wy, wx = _waves(height, g, 3 * waves), _waves(width, g, 3 * waves)
    image = torch.empty(1, 3, height, width, device=device)
    for c in range(3):
        field = torch.full((height, width), base[c], device=device)
        for k in range(waves):
            field.addr_(wy[c * waves + k].to(device), wx[c * waves + k].to(device), alpha=amps[k])
        image[0, c] = field
    noise = lambda *shape: torch.rand(*shape, generator=g).to(device) - 0.5  # noqa: E731
    image += 0.10 * noise(1, 1, height, width)  # fine texture, luminance
    image += 0.03 * noise(1, 3, height, width)  # fine texture, colour
    coarse = noise(1, 1, max(1, height // scale), max(1, width // scale))
    image += 0.10 * F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return image.clamp_(0, 1)


def drift_matrix(contrast: float, saturation: float) -> torch.Tensor:
    """Loses contrast (all channels toward mid-grey) and saturation (toward the pixel's luminance)."""
    luma = torch.tensor(LUMA)[None, :].expand(3, 3)
    return contrast * (saturation * torch.eye(3) + (1 - saturation) * luma)


DRIFT_SPACES = ("srgb", "linear")
DRIFT = dict(contrast=0.95, saturation=0.9, bias=(0.01, -0.006, 0.012), tint=0.012)


def drift(image: torch.Tensor, *, contrast: float = DRIFT["contrast"], saturation: float = DRIFT["saturation"],
          bias=DRIFT["bias"], tint: float = DRIFT["tint"], seed: int = 1, origin=(0, 0), canvas=None,
          space: str = "srgb") -> torch.Tensor:
    """The image with a known colour cast: M (x - 0.5) + 0.5 + bias + a slowly varying tint (about 0.7
    cycles per canvas, amplitude `tint` per channel), clamped to [0, 1]; x the sRGB values, or with
    space="linear" linear light (converted back after). `origin` and `canvas` place a crop in a larger
    canvas, so that the tint of a tile continues its neighbours'."""
    if space == "linear":
        cast = drift(colour.srgb_to_linear(image), contrast=contrast, saturation=saturation, bias=bias, tint=tint,
                     seed=seed, origin=origin, canvas=canvas)
        return colour.linear_to_srgb(cast)
    B, _, h, w = image.shape
    H, W = canvas or (h, w)
    g = torch.Generator().manual_seed(seed)
    phase = (torch.rand(3, 2, generator=g) * 2 * math.pi).tolist()
    out = torch.einsum("ij,bj...->bi...", drift_matrix(contrast, saturation).to(image), image - 0.5)
    out += 0.5 + torch.tensor(bias, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    y = (torch.arange(origin[0], origin[0] + h, dtype=torch.float64) / H).to(image.device)
    x = (torch.arange(origin[1], origin[1] + w, dtype=torch.float64) / W).to(image.device)
    for c in range(3):
        ty = torch.cos(2 * math.pi * 0.6 * y + phase[c][1]).float()
        tx = torch.sin(2 * math.pi * 0.7 * x + phase[c][0]).float()
        out[:, c] += tint * ty[:, None] * tx[None, :]
    return out.clamp_(0, 1)


def tiled_drift(image: torch.Tensor, tiles, *, blend: bool, seed: int = 2) -> torch.Tensor:
    """Every tile drifted with its own parameters (DRIFT, each varied by a few percent), then blended with
    the tile fusion's weights (blend) or pasted one over the other in row-major order (hard borders)."""
    H, W = image.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros_like(image)
    wy, wx = tile_weights(tiles, (H, W)) if blend else (None, None)
    for tile in tiles:
        r = (torch.rand(5, generator=g) * 2 - 1).tolist()
        params = dict(contrast=DRIFT["contrast"] + 0.02 * r[0], saturation=DRIFT["saturation"] + 0.04 * r[1],
                      bias=tuple(b + 0.008 * d for b, d in zip(DRIFT["bias"], r[2:])))
        ys, xs = tile.slices
        part = drift(image[:, :, ys, xs], origin=(tile.y0, tile.x0), canvas=(H, W), **params)
        if blend:
            weight = (wy[tile.row][:, None] * wx[tile.col][None, :]).to(image)
            out[:, :, ys, xs] += part * weight
        else:
            out[:, :, ys, xs] = part
    return out


def soften(reference: torch.Tensor) -> torch.Tensor:
    """The reference blurred by the binomial [1, 4, 6, 4, 1] / 16 per axis (a standard deviation of one
    reference pixel): a reference softer than the image, as a VAE decode can be."""
    k = torch.tensor([1.0, 4, 6, 4, 1], device=reference.device) / 16
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 5, 5)
    return F.conv2d(F.pad(reference, (2, 2, 2, 2), mode="replicate"), kernel, groups=3)


# --------------------------------------------------------------------------------------------------
# The figures


def high_band(image: torch.Tensor, size) -> torch.Tensor:
    """The image minus its area-downsample to `size` interpolated back bilinearly: what a reference of
    that size cannot hold."""
    low = colour.area_resize(image, size)
    return image.float() - F.interpolate(low, size=image.shape[-2:], mode="bilinear", align_corners=False)


def detail_figures(result: torch.Tensor, clean: torch.Tensor, size) -> tuple[float, float]:
    """(high-band energy of result / of clean, PSNR of result's high band against clean's in dB, peak 1)."""
    a, b = high_band(result, size).double(), high_band(clean, size).double()
    ratio = (a.square().mean() / b.square().mean()).item()
    mse = (a - b).square().mean().item()
    return ratio, (10 * math.log10(1 / mse) if mse > 0 else math.inf)


def figures(result: torch.Tensor, clean: torch.Tensor, reference: torch.Tensor) -> dict:
    error = colour.colour_error(result, reference)
    ratio, db = detail_figures(result, clean, reference.shape[-2:])
    return dict(delta_e=error.delta_e.mean().item(), levels=error.levels.mean().item(), hf_ratio=ratio, hf_psnr=db)


# --------------------------------------------------------------------------------------------------
# The three measurements


def _row(name: str, f: dict) -> str:
    db = "inf" if math.isinf(f["hf_psnr"]) else f"{f['hf_psnr']:.1f}"
    return f"  {name:<44} {f['delta_e']:>9.2f} {f['levels']:>9.2f} {f['hf_ratio']:>10.3f} {db:>9}"


def quality(size: int, spaces, drift_spaces, scale: int, device, settings: dict) -> list[dict]:
    clean = synthetic_scene(size, size, scale=scale, device=device)
    reference = colour.area_resize(clean, (size // scale, size // scale))
    rows = []
    for drift_space in drift_spaces:
        drifted = drift(clean, space=drift_space)
        rows.append(dict(case=f"cast in {drift_space}", space="-", **figures(drifted, clean, reference)))
        for space in spaces:
            matched = colour.match_colour(drifted, reference, space=space, **settings)
            rows.append(dict(case=f"cast in {drift_space}, matched", space=space, **figures(matched, clean, reference)))
    for space in spaces:
        rows.append(dict(case="already right, matched", space=space,
                         **figures(colour.match_colour(clean, reference, space=space, **settings), clean, reference)))
    soft = soften(reference)
    rows.append(dict(case="already right, softer reference", space="-", **figures(clean, clean, soft)))
    for space in spaces:
        rows.append(dict(case="already right, softer ref., matched", space=space,
                         **figures(colour.match_colour(clean, soft, space=space, **settings), clean, soft)))
    print(f"quality: {size}x{size} output, reference {size // scale}x{size // scale} "
          f"(ΔE: mean CIEDE2000 vs the reference; levels: channel means off; detail: high band vs the clean image's)")
    print(f"  {'':<44} {'ΔE2000':>9} {'levels':>9} {'hf energy':>10} {'hf PSNR':>9}")
    for row in rows:
        name = row["case"] + ("" if row["space"] == "-" else f" ({row['space']})")
        print(_row(name, row), flush=True)
    return [dict(r, kind="quality", size=size) for r in rows]


def time_worker(spec: dict) -> dict:
    """One timing (in its own process, so that its peak memory is its own): the best of spec["runs"]
    runs of match_colour on a drifted canvas, and the peak memory of the first run beyond the inputs."""
    device = torch.device(spec["device"])
    size, scale = spec["size"], spec["scale"]
    clean = synthetic_scene(size, size, scale=scale, device=device)
    reference = colour.area_resize(clean, (size // scale, size // scale))
    drifted = drift(clean)
    del clean
    walls, cpus, peak = [], [], None
    for _ in range(spec["runs"]):
        base = _reset_peak(device) if peak is None else None
        wall, cpu = time.perf_counter(), time.process_time()
        result = colour.match_colour(drifted, reference, space=spec["space"])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        if peak is None:
            peak = _peak(device) - base
        del result
    return dict(wall=min(walls), cpu=min(cpus), peak=peak, canvas=drifted.numel() * drifted.element_size())


def timing(size: int, spaces, scale: int, runs: int, device) -> list[dict]:
    rows = []
    for space in spaces:
        spec = dict(size=size, space=space, scale=scale, runs=runs, device=str(device))
        row = dict(kind="time", **spec, **_run_worker(spec))
        rows.append(row)
        if "error" in row:
            print(f"  {f'{size}x{size}':>10} {space:>7}  {row['error']}", flush=True)
            continue
        print(f"  {f'{size}x{size}':>10} {space:>7} {row['wall']:>8.2f} {row['cpu']:>8.2f} {row['peak'] / 2**20:>10.0f} "
              f"{row['peak'] / row['canvas']:>9.2f}", flush=True)
    return rows


def _run_worker(spec: dict) -> dict:
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "pid_core", "bench-colour", "--_worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=here, env=_worker_env())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": tail[:160] if proc.returncode >= 0 else f"killed by signal {-proc.returncode}"}


def seams(size: int, tile: int, scale: int, space: str, device) -> list[dict]:
    clean = synthetic_scene(size, size, scale=scale, device=device)
    reference = colour.area_resize(clean, (size // scale, size // scale))
    tiles = plan_tiles((size, size), tile, default_overlap(tile, 32), 32)
    gy = len({t.y0 for t in tiles})
    gx = len({t.x0 for t in tiles})
    print(f"seams: {size}x{size} canvas, {gx}x{gy} tiles of {tile} px (overlap {default_overlap(tile, 32)} px), "
          f"a drift per tile, matched as a whole ({space})")
    print(f"  {'tiles':<34} {'seam before':>11} {'after':>7} {'ΔE before':>10} {'after':>7}")
    rows = []
    for blend in (True, False):
        drifted = tiled_drift(clean, tiles, blend=blend)
        matched = colour.match_colour(drifted, reference, space=space)
        row = dict(kind="seam", size=size, tile=tile, blend=blend, space=space,
                   seam_before=seam_figure(drifted, tiles), seam_after=seam_figure(matched, tiles),
                   delta_e_before=colour.colour_error(drifted, reference).delta_e.item(),
                   delta_e_after=colour.colour_error(matched, reference).delta_e.item())
        del drifted, matched
        name = "blended (as a fused tiled decode)" if blend else "hard borders (tiles on their own)"
        print(f"  {name:<34} {row['seam_before']:>11.3f} {row['seam_after']:>7.3f} {row['delta_e_before']:>10.2f} "
              f"{row['delta_e_after']:>7.2f}", flush=True)
        rows.append(row)
    return rows


def _sizes(text: str) -> list[int]:
    return [int(s) for s in text.split(",") if s]


def add_parser(sub) -> None:
    parser = sub.add_parser("bench-colour", help="colour matching on synthetic images: colour error, detail, time, seams",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="2048", help="output sizes of the quality table (comma-separated; '' skips)")
    parser.add_argument("--spaces", default=",".join(colour.SPACES), help="colour spaces to compare")
    parser.add_argument("--drift-spaces", default="srgb,linear",
                        help="where the synthetic cast is applied: srgb (the values) and/or linear (linear light)")
    parser.add_argument("--cells", type=int, default=colour.CELLS, help="match_colour's cells (quality table only)")
    parser.add_argument("--cell-samples", type=int, default=colour.CELL_SAMPLES,
                        help="match_colour's samples per cell side (quality table only)")
    parser.add_argument("--ridge", type=float, default=colour.RIDGE,
                        help="match_colour's ridge (quality table only; a huge ridge leaves A = I: a plain low-band swap)")
    parser.add_argument("--scale", type=int, default=4, help="output size over the reference's")
    parser.add_argument("--time-sizes", default="2048,4096,8192", help="sizes to time match_colour at ('' skips)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per size (the best is printed)")
    parser.add_argument("--seam-size", type=int, default=8192, help="side of the tiled canvas (0 skips)")
    parser.add_argument("--tile", type=int, default=2048, help="tile side of the tiled canvas")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also append every row to this file (JSON lines)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_bench_colour)


def cmd_bench_colour(args) -> int:
    from ..checks import require_device

    if args._worker:
        print(json.dumps(time_worker(json.loads(args._worker))), flush=True)
        return 0
    device = require_device(args.device)
    spaces = [s for s in args.spaces.split(",") if s]
    drift_spaces = [s for s in args.drift_spaces.split(",") if s]
    for option, given, known in (("--spaces", spaces, colour.SPACES), ("--drift-spaces", drift_spaces, DRIFT_SPACES)):
        unknown = [s for s in given if s not in known]
        if unknown:
            raise ArgumentError(f"{option}: unknown colour space {', '.join(unknown)} (use {', '.join(known)})")
    settings = dict(cells=args.cells, cell_samples=args.cell_samples, ridge=args.ridge)
    print(f"# torch {torch.__version__}, {device}, {torch.get_num_threads()} threads; default space "
          f"{colour.DEFAULT_SPACE}; quality table with cells {args.cells}, cell samples {args.cell_samples}, "
          f"ridge {args.ridge:g}", flush=True)
    rows = []
    for size in _sizes(args.sizes):
        rows += quality(size, spaces, drift_spaces, args.scale, device, settings)
    if _sizes(args.time_sizes):
        print(f"time of match_colour (best of {args.runs} runs, each size and space in a fresh process); "
              f"peak: memory beyond its inputs, the result included")
        print(f"  {'size':>10} {'space':>7} {'wall s':>8} {'CPU s':>8} {'peak MiB':>10} {'/ canvas':>9}")
        for size in _sizes(args.time_sizes):
            rows += timing(size, spaces, args.scale, args.runs, device)
    if args.seam_size:
        rows += seams(args.seam_size, args.tile, args.scale, colour.DEFAULT_SPACE, device)
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0
