"""Time and memory of PiD decoding, tiled vs untiled, with a full-size random model.

    python -m pid_core bench [--sizes 1024,2048] [--modes untiled,tiled] [--tile 1024] [--steps 1]
                             [--dtype fp32,bf16] [--device cpu,cuda] [--chunk auto|on|off,...]
                             [--sampler student|teacher] [--cfg 5]
                             [--max-tile-batches N] [--seam-only | --no-seam]

Each measurement runs in a fresh subprocess: it builds the random model (released sizes, from a
shared key list when one is given or found, else `random_checkpoints.released_config`), then resets the peak
and runs the sampler. CPU: peak = the process's peak resident memory (VmHWM, reset through
/proc/self/clear_refs after the model is built); working = peak - resident memory after loading
(weights + interpreter), so working covers the network's activations *and* the canvas-size sampler
state. CUDA: torch.cuda.max_memory_allocated, working = peak - allocated after loading. forward = the
largest peak of one network forward measured on its own (the peak is reset just before each call):
the part that the tile size bounds; working - forward is about the sampler's canvas state: the state x
(12 bytes per output pixel, fp32) and, while tiles run, the band of fused v one tile high; while
re-noising (2 or more steps), x0 and the fresh noise. est. = tiling.memory.tile_memory_estimate for that
forward. --sampler teacher runs the undistilled checkpoints' sampler instead (guided DPM-Solver++,
--cfg, the reference's shift for the size; a random negative text): its state is three canvases, and
with guidance each step is two branches (one batched forward, or two).

--max-tile-batches N runs only the first N tile batches of each step and skips the rest. That cannot
lower the peak: every batch has the same shape, the state and the band are allocated before the first
batch, and the step still finishes every row and re-noises the whole canvas. Such runs are marked
"cut" and report the time per tile batch, never a decode time.

--chunk: on runs the pixel blocks in the default chunks, off whole, auto as the tiling policy chooses
for the device (docs/DESIGN.md §9). --reference DIR runs the reference next to this pack instead
(bench_reference.py).

Seam figure (`seam_figure` below): a narrow random model (cheap) decodes at --seam-sizes with tiles
of --seam-tile px over --seam-steps steps; the figure is the mean |diff| of adjacent pixels across tile
edges over the same across patch edges inside tiles (1.0: no visible seam). The untiled decode of the
same inputs gives the baseline of that statistic, and the PSNR of tiled vs untiled is printed too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Sequence

import torch

from .measuring import model_config as _config, parse_sizes, peak as _peak, reset_peak as _reset_peak
from .measuring import process_status as _status, shared_keys

DEFAULT_KEYS = "PiD_res2k_sr4x_official_flux_distill_4step.txt"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _shared_keys() -> str | None:
    return shared_keys(DEFAULT_KEYS)


def _limit_address_space() -> None:
    """Make an allocation beyond what the machine has fail in this process instead of waking the OOM
    killer (which may pick another process)."""
    import resource

    from ..tiling import device_memory_budget

    avail = device_memory_budget("cpu", fraction=0.9)
    if avail:
        limit = _status()["VmSize"] + avail
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


# --------------------------------------------------------------------------------------------------
# Seam figure: for a decoded image and its tile layout, the mean |difference| of the horizontally and
# vertically adjacent pixel pairs that straddle a tile edge (the pair (p-1, p) where p is the first or
# one past the last row/column of a tile, inside the canvas), divided by the same mean over the pairs
# that straddle a *patch* edge (p a multiple of the patch size) at least one patch away from every tile
# edge. Tile edges are patch edges too, so both sides compare like with like; 1.0 means a tile border
# is indistinguishable from any other patch border.


def _edge_positions(starts: Sequence[int], t: int, n: int) -> set:
    edges = set()
    for s in starts:
        if 0 < s < n:
            edges.add(s)
        if 0 < s + t < n:
            edges.add(s + t)
    return edges


def seam_figure(image: torch.Tensor, tiles: Sequence, patch_size: int = 16) -> float:
    """Mean |diff| across tile edges / mean |diff| across patch edges away from tile edges (see the
    module docstring). image [B, C, H, W] (or [C, H, W]); nan when there are no tile edges."""
    img = image.double()
    if img.dim() == 3:
        img = img[None]
    H, W = img.shape[-2:]
    ys = sorted({t.y0 for t in tiles})
    xs = sorted({t.x0 for t in tiles})
    seam_sum = seam_n = inner_sum = inner_n = 0.0
    for axis, n, starts, t in ((-2, H, ys, tiles[0].h), (-1, W, xs, tiles[0].w)):
        edges = _edge_positions(starts, t, n)
        if not edges and len(starts) <= 1:
            continue
        far = [p for p in range(patch_size, n, patch_size) if all(abs(p - e) >= patch_size for e in edges)]
        for positions, is_seam in ((sorted(edges), True), (far, False)):
            if not positions:
                continue
            idx = torch.tensor(positions)
            diff = (img.index_select(axis, idx) - img.index_select(axis, idx - 1)).abs()
            if is_seam:
                seam_sum += diff.sum().item()
                seam_n += diff.numel()
            else:
                inner_sum += diff.sum().item()
                inner_n += diff.numel()
    if seam_n == 0 or inner_n == 0:
        return float("nan")
    return (seam_sum / seam_n) / (inner_sum / inner_n)


def worker(spec: dict) -> dict:
    """One measurement (runs in its own process)."""
    from ..checkpoint import build_model
    from ..plan import plan_decode
    from ..sampling import initial_noise, sample
    from ..teacher import dpm_solver_pp
    from ..tiling import TileOptions
    from ..velocity import network_denoiser, network_velocity
    from .random_checkpoints import config_shapes, random_state_dict

    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    cfg = _config(spec)
    model = build_model(random_state_dict(config_shapes(cfg), seed=0, dtype=dtype), cfg).to(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    H, W = spec["size"]
    g = torch.Generator().manual_seed(1)
    text = torch.randn(1, cfg.text_max_tokens, cfg.text_dim, generator=g).to(device)
    latent = torch.randn(1, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g).to(device)
    chunk = _chunk_option(spec, cfg, dtype)
    if spec["mode"] == "tiled":
        options = TileOptions(mode="manual", tile_px=spec["tile"], overlap_px=spec.get("overlap", 0),
                              max_batch_tiles=spec.get("batch_tiles", 1), pixel_chunk_tokens=chunk)
    else:
        options = TileOptions(mode="off", pixel_chunk_tokens=chunk)
    teacher = spec.get("sampler") == "teacher"
    negative = torch.randn(1, cfg.text_max_tokens, cfg.text_dim, generator=g).to(device) if teacher else None
    plan = plan_decode(model, latent, text, latent_format="pid", sigma=0.3, tiling=options, device=device,
                       sampler=spec.get("sampler", "student"), steps=spec["steps"], cfg=spec.get("cfg") if teacher else None,
                       negative=negative)
    if teacher:
        velocity = network_denoiser(model, plan)
    else:
        velocity = network_velocity(model, plan, max_batches=spec.get("max_tile_batches"))
    # Peak of each network forward on its own (reset just before it): what the tile size bounds.
    # The rest of the decode's working memory is the sampler's canvas-size state.
    seen = {"peak": 0, "forward": 0, "calls": 0}
    forward = model.forward

    def measured_forward(*a, **kw):
        seen["calls"] += 1
        seen["peak"] = max(seen["peak"], _peak(device))
        before = _reset_peak(device)
        result = forward(*a, **kw)
        now = _peak(device)
        seen["forward"] = max(seen["forward"], now - before)
        seen["peak"] = max(seen["peak"], now)
        return result

    model.forward = measured_forward
    base = _reset_peak(device)
    noise, gen = initial_noise((1, 3, H, W), seed=0, device=device)
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        with torch.no_grad():
            last = {}
            # the loop re-noises and clamps x0 in place: keep a copy of the last one (after the peak)
            keep = lambda i, n, x0: last.update(x0=x0.clone()) if i == n and spec.get("save") else None  # noqa: E731
            if teacher:
                out = dpm_solver_pp(velocity, noise, plan.sampler.times, overwrite_noise=True, callback=keep)
            else:
                out = sample(velocity, noise, plan.sampler.times, generator=gen, overwrite_noise=True, callback=keep)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except (RuntimeError, MemoryError) as exc:
        text_ = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        oom = "memory" in text_.lower() or isinstance(exc, MemoryError)
        return {"error": ("out of memory: " if oom else "") + text_[:120]}
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = max(seen["peak"], _peak(device))
    if spec.get("save"):  # the last x0 before the final clamp: random weights saturate the clamp
        torch.save(last["x0"].cpu(), spec["save"])
    forwards = seen["calls"]  # network forwards (tile batches, guidance branches)
    return {
        "time": seconds, "cpu_time": cpu_seconds, "peak": peak, "base": base, "working": peak - base, "weights": weights,
        "forward": seen["forward"],
        "tiles": len(plan.tiles.tiles), "tile_hw": list(plan.tiles.tile_hw), "batch_tiles": plan.tiles.batch_tiles,
        "forwards": forwards, "cut": bool(getattr(velocity, "cut_short", False)),
        "estimate": plan.tiles.estimate_bytes, "finite": bool(torch.isfinite(out).all()),
        "chunk_tokens": plan.tiles.pixel_chunk_tokens, "step_cache": plan.tiles.step_cache,
    }


def _chunk_option(spec: dict, cfg, dtype):
    """--chunk: on = the pixel blocks in the default chunks (tiling.memory.auto_chunk_tokens), off = whole,
    auto = what the tiling policy chooses for the device."""
    from ..tiling.memory import auto_chunk_tokens

    return {"on": auto_chunk_tokens(cfg, dtype), "off": None, "auto": "auto"}[spec["chunk"]]


def _worker_env() -> dict:
    """glibc's malloc raises its mmap threshold after big frees and then keeps freed blocks in the heap,
    so peak RSS would count memory no tensor holds; a fixed threshold returns every block of 1 MiB or
    more to the system when freed, and peak RSS follows the tensors."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(1 << 20))
    return env


def _run_worker(spec: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "pid_core", "bench", "--_worker", json.dumps(spec)]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=here, env=_worker_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode < 0:
        tail = f"killed by signal {-proc.returncode} ({tail})"
    return {"error": tail[:160]}


def _gb(x) -> str:
    return "-" if x is None else f"{x / 2**30:.2f}"


def _expected_bytes(spec: dict) -> int:
    """A pessimistic guess of the process's peak, to skip runs this machine cannot hold."""
    from ..samplers import SAMPLERS
    from ..tiling.memory import canvas_memory_estimate, tile_memory_estimate

    cfg = _config(spec)
    H, W = spec["size"]
    dtype = DTYPES[spec["dtype"]]
    chunk = _chunk_option(spec, cfg, dtype)
    shape = (min(H, spec["tile"]), min(W, spec["tile"])) if spec["mode"] == "tiled" else (H, W)
    work = tile_memory_estimate(cfg, shape, dtype=dtype, batch=spec.get("batch_tiles", 1), chunk_tokens=chunk)
    weights = (0.02e9 if spec.get("narrow") else 1.40e9) * (2 if dtype == torch.bfloat16 else 4)
    canvases = SAMPLERS[spec.get("sampler", "student")].state_canvases
    return int(1.3 * (work + canvas_memory_estimate((H, W), 1, canvases)) + weights + (1 << 30))


def measure(args) -> list[dict]:
    from ..tiling import device_memory_budget

    rows = []
    devices = [d for d in args.device.split(",") if d]
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            print(f"# {device}: not available, skipped", flush=True)
            continue
        for size in args.sizes:
            for mode in args.modes.split(","):
                for dtype in args.dtype.split(","):
                    for chunk in args.chunk.split(","):
                        spec = dict(mode=mode, chunk=chunk, dtype=dtype, device=device, size=list(size),
                                    tile=args.tile, overlap=args.overlap, steps=args.steps,
                                    batch_tiles=args.batch_tiles, keys=args.keys, layout=args.layout,
                                    latent_channels=args.latent_channels, narrow=args.narrow,
                                    sampler=args.sampler, cfg=args.cfg)
                        if mode == "tiled" and args.max_tile_batches and args.sampler == "student":
                            spec["max_tile_batches"] = args.max_tile_batches
                        if args.save_outputs:
                            os.makedirs(args.save_outputs, exist_ok=True)
                            spec["save"] = os.path.join(
                                args.save_outputs, f"{mode}_{chunk}_{dtype}_{device}_{size[1]}x{size[0]}.pt")
                        row = dict(spec)
                        need = _expected_bytes(spec) if device == "cpu" else 0
                        avail = device_memory_budget("cpu", fraction=1.0) if device == "cpu" else None
                        if avail and need > avail:
                            row["error"] = f"skipped: needs ~{_gb(need)} GB, {_gb(avail)} GB available"
                        else:
                            row.update(_run_worker(spec, args.timeout))
                        rows.append(row)
                        print(_format_row(row), flush=True)
                        if args.json:
                            with open(args.json, "a") as f:
                                f.write(json.dumps(row) + "\n")
    if args.save_outputs:
        _compare_chunking(rows)
    return rows


def _compare_chunking(rows: list[dict]) -> None:
    """Max |difference| between the chunked and unchunked outputs of the same run (same inputs), taken
    before the sampler's final clamp to [-1, 1]."""
    done = {}
    for row in rows:
        if "error" in row or row.get("cut") or not row.get("save"):
            continue
        key = (row["mode"], row["dtype"], row["device"], tuple(row["size"]))
        done.setdefault(key, {})[row["chunk"]] = row["save"]
    for (mode, dtype, device, (H, W)), files in done.items():
        if "on" in files and "off" in files:
            a, b = torch.load(files["on"]), torch.load(files["off"])
            print(f"# {mode} {dtype} {device} {W}x{H}: chunked vs unchunked x0 max |diff| "
                  f"{(a - b).abs().max().item():.2e} (max |x0| {b.abs().max().item():.2f})", flush=True)


HEADER = (f"{'mode':<8} {'chunk':<5} {'dtype':<5} {'device':<6} {'output':>10} {'tiles':>11} "
          f"{'time':>14} {'peak GB':>8} {'weights':>8} {'working':>8} {'forward':>8} {'est.':>6}  note")


def _format_row(row: dict) -> str:
    H, W = row["size"]
    head = f"{row['mode']:<8} {row['chunk']:<5} {row['dtype']:<5} {row['device']:<6} {f'{W}x{H}':>10} "
    if "error" in row:
        return head + f"{'':>11} {'':>14} {'':>8} {'':>8} {'':>8} {'':>8} {'':>6}  {row['error']}"
    th, tw = row["tile_hw"]
    tiles = f"{row['tiles']}x{tw}" if row["tiles"] > 1 else "1 (whole)"
    if row["cut"]:
        per = row["time"] / max(1, row["forwards"])
        timing = f"{per:.1f}s/batch"
        note = (f"cut: {row['forwards']} of {math.ceil(row['tiles'] / row['batch_tiles']) * row['steps']} "
                f"forwards ({row['batch_tiles']} tile/batch), time is per batch")
    else:
        timing = f"{row['time']:.1f}s"
        note = f"{row['steps']} step(s), {row['forwards']} forward(s), {row['cpu_time']:.1f} cpu-s"
        if row.get("sampler") == "teacher":
            note += f", teacher cfg {row['cfg']:g}"
    if "step_cache" in row:  # what the plan chose (tiling.policy.spend_spare_memory)
        chunks = "whole" if row["chunk_tokens"] is None else f"chunks of {row['chunk_tokens']}"
        note += f"; pixel blocks {chunks}, kept: {row['step_cache']}"
    return head + (f"{tiles:>11} {timing:>14} {_gb(row['peak']):>8} {_gb(row['weights']):>8} "
                   f"{_gb(row['working']):>8} {_gb(row.get('forward')):>8} {_gb(row['estimate']):>6}  {note}")


# --------------------------------------------------------------------------------------------------


def seam(args) -> list[dict]:
    """Seam figure of tiled decodes with a narrow random model (module docstring)."""
    from ..decode import run_plan
    from ..plan import plan_decode
    from ..precision import psnr
    from ..tiling import TileOptions
    from .random_checkpoints import narrow_config, random_model

    cfg = narrow_config(layout=args.layout, latent_channels=args.latent_channels)
    model = random_model(cfg, seed=0, dtype=torch.float32)
    results = []
    print(f"{'output':>10} {'tiles':>12} {'steps':>5} {'seam tiled':>10} {'same, untiled':>13} "
          f"{'PSNR tiled/untiled':>18} {'time':>8}", flush=True)
    for size in args.seam_sizes:
        H, W = size
        g = torch.Generator().manual_seed(2)
        text = torch.randn(1, cfg.text_max_tokens, cfg.text_dim, generator=g)
        latent = torch.randn(1, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g)
        options = TileOptions(mode="manual", tile_px=args.seam_tile, overlap_px=args.overlap,
                              max_batch_tiles=args.batch_tiles)
        plan = plan_decode(model, latent, text, latent_format="pid", sigma=0.3, steps=args.seam_steps, tiling=options)
        start = time.perf_counter()
        tiled = run_plan(model, plan, seed=0)
        seconds = time.perf_counter() - start
        figure = seam_figure(tiled, plan.tiles.tiles, cfg.patch_size)
        base = db = None
        if max(H, W) <= args.seam_untiled_max:
            untiled = plan_decode(model, latent, text, latent_format="pid", sigma=0.3, steps=args.seam_steps)
            whole = run_plan(model, untiled, seed=0)
            base = seam_figure(whole, plan.tiles.tiles, cfg.patch_size)
            db = psnr(tiled, whole, data_range=1.0)
        gy, gx = plan.tiles.grid
        row = dict(size=[H, W], tiles=f"{gx}x{gy}x{plan.tiles.tile_hw[1]}", steps=args.seam_steps, seam=figure,
                   untiled=base, psnr=db, time=seconds)
        results.append(row)
        print(f"{f'{W}x{H}':>10} {row['tiles']:>12} {args.seam_steps:>5} {figure:>10.3f} "
              f"{'-' if base is None else f'{base:.3f}':>13} {'-' if db is None else f'{db:.1f} dB':>18} "
              f"{seconds:>7.1f}s", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(dict(row, kind="seam")) + "\n")
    return results


def add_parser(sub) -> None:
    parser = sub.add_parser("bench", help="time, memory and seam figures with a full-size random model",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, type=parse_sizes, help="output sizes: N (square) or WxH, "
                        "comma-separated (default 1024,2048; with --reference 2048,4096)")
    parser.add_argument("--modes", default="untiled,tiled")
    parser.add_argument("--tile", type=int, default=1024, help="tile side in px for the tiled mode")
    parser.add_argument("--overlap", type=int, default=0, help="overlap in px (0: automatic)")
    parser.add_argument("--batch-tiles", type=int, default=1, help="tiles per forward")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--sampler", default="student", choices=["student", "teacher"],
                        help="teacher: the undistilled checkpoints' guided DPM-Solver++ (with --cfg)")
    parser.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the teacher sampler (1: none)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or both (comma-separated)")
    parser.add_argument("--device", default=None, help="cpu, cuda or both (default: both where there is a GPU; "
                        "with --reference the GPU, else the CPU)")
    parser.add_argument("--chunk", default="auto", help="pixel-block chunking: on (the default chunks), off (whole), "
                        "auto (the tiling policy's choice for the device), or several comma-separated")
    parser.add_argument("--reference", default=None, metavar="DIR",
                        help="a checkout of nv-tlabs/PiD: run its network next to this pack on the same weights "
                        "(bench_reference.py)")
    parser.add_argument("--compile", default="off,on", help="with --reference: eager (off), compiled (on) or both")
    parser.add_argument("--runs", type=int, default=3, help="with --reference: timed decodes per mode (the median)")
    parser.add_argument("--max-tile-batches", type=int, default=0,
                        help="run only this many tile batches per step (memory runs on slow machines)")
    parser.add_argument("--keys", default=None, help="key list of the model to build (default: shared flux 2k list, "
                        "else the released v1 sizes)")
    parser.add_argument("--narrow", action="store_true", help="a narrow random model instead (smoke tests)")
    parser.add_argument("--layout", default="v1")
    parser.add_argument("--latent-channels", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=None, help="seconds per measurement")
    parser.add_argument("--seam-only", action="store_true")
    parser.add_argument("--no-seam", action="store_true")
    parser.add_argument("--seam-sizes", default="2048,4096", type=parse_sizes)
    parser.add_argument("--seam-tile", type=int, default=1024)
    parser.add_argument("--seam-steps", type=int, default=4)
    parser.add_argument("--seam-untiled-max", type=int, default=2048,
                        help="largest side for which the untiled baseline of the seam statistic is run")
    parser.add_argument("--save-outputs", default=None, help="folder: keep each run's output and compare "
                        "chunked with unchunked runs")
    parser.add_argument("--json", default=None, help="also append every row to this file (JSON lines)")
    parser.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    parser.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    if args._worker:
        spec = json.loads(args._worker)
        if spec["device"] == "cpu":
            _limit_address_space()
        print(json.dumps(worker(spec)), flush=True)
        return 0
    if args.reference:
        from . import bench_reference

        args.sizes = args.sizes or parse_sizes("2048,4096")
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        bench_reference.measure(args)
        return 0
    args.sizes = args.sizes or parse_sizes("1024,2048")
    args.device = args.device or ("cpu,cuda" if torch.cuda.is_available() else "cpu")
    if args.keys is None and args.layout == "v1" and args.latent_channels == 16 and not args.narrow:
        args.keys = _shared_keys()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, model: "
          f"{os.path.basename(args.keys) if args.keys else ('narrow' if args.narrow else 'released') + f' {args.layout} sizes, {args.latent_channels}-ch latent'}",
          flush=True)
    if not args.seam_only:
        print(HEADER, flush=True)
        measure(args)
    if not args.no_seam:
        print(f"# seam figure: narrow random {args.layout} model, tiles of {args.seam_tile} px", flush=True)
        seam(args)
    return 0

