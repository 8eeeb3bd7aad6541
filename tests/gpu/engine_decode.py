"""pid_core.decode alone (no ComfyUI) on the inputs of the kit's PiD Decode graphs.

    python engine_decode.py OUT_DIR --px 2048 [--device cuda] [--runs N] NAME=CHECKPOINT[:ROUND_TRIP] ...

For each job: load the checkpoint with pid_core (quantized files are dequantized to bf16 as ComfyUI's
layouts define them), optionally round the weights through an fp8 dtype (ROUND_TRIP fp8_e4m3fn or
fp8_e5m2: the matmul and conv weights, as PiD Loader stores them for that weight_dtype), and decode
core_pid.inputs' latent and text (the same seeded CPU draws as PiDTestLatent and PiDTestConditioning),
sigma 0, 4 steps, tiling auto within the device's memory, as PiD Decode runs them. Writes
OUT_DIR/NAME.safetensors (the image [1, H, W, 3], as ComfyUI's IMAGE) and OUT_DIR/NAME.json: the
seconds of each of N timed runs after a warm-up (device synchronized; N 0: one untimed decode), the
load seconds, the device.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

ROUND_TRIPS = ("fp8_e4m3fn", "fp8_e5m2")


def inputs(px: int):
    import torch

    from comfyui import core_pid

    spec = core_pid.inputs(latent_hw=(px // 32, px // 32))
    lat, txt = spec["latent"]["inputs"], spec["text"]["inputs"]
    latent = torch.randn(lat["batch"], lat["channels"], lat["height"], lat["width"],
                         generator=torch.Generator().manual_seed(lat["seed"])) * lat["scale"]
    text = torch.randn(txt["batch"], txt["tokens"], txt["width"],
                       generator=torch.Generator().manual_seed(txt["seed"])) * txt["scale"]
    return latent, text


def round_trip(model, dtype_name: str) -> int:
    """Round the model's matmul and conv weights through an fp8 dtype in place; how many."""
    import torch

    dtype = getattr(torch, dtype_name.replace("fp8_", "float8_"))
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() >= 2:
                p.copy_(p.to(dtype).to(p.dtype))
                count += 1
    return count


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("jobs", nargs="+", help="NAME=CHECKPOINT[:ROUND_TRIP]")
    parser.add_argument("--px", type=int, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--runs", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch
    from safetensors.torch import save_file

    from pid_core.checkpoint import load_pid
    from pid_core.decode import decode
    from pid_core.tiling import TileOptions, device_memory_budget

    cuda = torch.device(args.device).type == "cuda"
    latent, text = inputs(args.px)
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    for job in args.jobs:
        name, _, spec = job.partition("=")
        checkpoint, _, trip = spec.partition(":")
        if trip and trip not in ROUND_TRIPS:
            sys.exit(f"engine_decode: unknown round trip {trip!r} (one of {', '.join(ROUND_TRIPS)})")
        t = time.perf_counter()
        model = load_pid(checkpoint, device=args.device)
        rounded = round_trip(model, trip) if trip else 0
        sync()
        load_seconds = time.perf_counter() - t
        seconds, image = [], None
        for run in range(args.runs + 1 if args.runs else 1):  # with timed runs, the first is the warm-up
            sync()
            t = time.perf_counter()
            tiling = TileOptions(mode="auto", memory_budget_bytes=device_memory_budget(args.device))
            image = decode(model, latent.to(args.device), text=text.to(args.device), latent_format="flux",
                           sigma=0.0, seed=args.seed, steps=4, tiling=tiling)
            sync()
            if run:
                seconds.append(time.perf_counter() - t)
        save_file({"image": image.permute(0, 2, 3, 1).float().cpu().contiguous()}, str(out_dir / f"{name}.safetensors"))
        result = {"name": name, "checkpoint": checkpoint, "round_trip": trip or None, "rounded_weights": rounded,
                  "seconds": seconds, "load_seconds": load_seconds, "device": args.device, "px": args.px,
                  "peak_allocated": torch.cuda.max_memory_allocated() if cuda else None}
        (out_dir / f"{name}.json").write_text(json.dumps(result))
        print(json.dumps(result), flush=True)
        del model, image
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
