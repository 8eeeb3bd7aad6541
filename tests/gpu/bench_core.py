"""PiD Decode against core ComfyUI's own PiD, on one ComfyUI server: the GPU kit's benchmark.

    python bench_core.py OUT_JSON [--runs 2] [--deadline SECONDS]

Same GPU, same random full-size weights (the kit's Comfy-Org-style bf16 file: core's UNETLoader and PiD
Loader read the same file), same latent and text conditioning (core_pid.inputs), 4 steps each: core's
graph (PiDConditioning + SamplerCustom lcm / simple, its shift-1.5 schedule) and PiD Decode (tiling
auto, the released schedule; at sizes beyond the checkpoint's trained range also tiling off, the one
pass over the whole canvas that core makes). At kit.decode_px (2048) and kit.big_px (4096), each graph
warmed up once (its model loaded) and then timed `--runs` times; every model unloaded between graphs,
so each peak is one model's.

Per row: the decode's wall seconds (device synchronized; PiDTestMark to PiDTestMeasure), the peak of
torch's allocator during the decode, the weights ComfyUI holds on the device, and the PSNR of the
image against core's at the same size. Under dynamic VRAM (v0.33's default on NVIDIA) the weights live
outside torch's allocator, so the peak is the decode's working memory plus what torch holds.

Rows that cannot run before the deadline are written as skipped; a failing graph is written with its
error, and the others still run. Uses the environment of kit.py (run.sh sets it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time
import traceback

HERE = pathlib.Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))
if str(HERE.parents[1]) not in sys.path:
    sys.path.insert(0, str(HERE.parents[1]))

from comfyui import core_pid  # noqa: E402
from gpu.kit import GIB, Kit, system_stats  # noqa: E402

TRAINED_MAX_PX = 3840  # the 2K-to-4K checkpoints' largest trained output


def graphs(kit: Kit, px: int) -> list[tuple[str, str, callable]]:
    """(row name, label, graph for a nonce) at px x px."""
    hw = (px // 32, px // 32)
    file = kit.file("bf16")
    core_model = ({"class_type": "PiDTestNarrowCorePiD", "inputs": {"unet_name": file}} if kit.rehearsal
                  else core_pid.unet_loader(file))
    loader = "PiDTestNarrowCorePiD" if kit.rehearsal else "UNETLoader"
    out = [
        ("core", f"core ComfyUI PiD ({loader} + PiDConditioning + SamplerCustom)",
         lambda nonce: core_pid.core_graph(core_model, out_hw=(px, px), name="core", nonce=nonce, latent_hw=hw)),
        ("pack", "PiD Decode (tiling auto)",
         lambda nonce: core_pid.pack_graph(file, name="pack", nonce=nonce, latent_hw=hw)),
    ]
    if px > TRAINED_MAX_PX or kit.rehearsal:
        out.append(("pack_untiled", "PiD Decode (tiling off)",
                    lambda nonce: core_pid.pack_graph(file, name="pack_untiled", nonce=nonce, tiling="off",
                                                      latent_hw=hw)))
    return out


def image_psnr(a, b) -> float:
    from pid_core.precision import psnr

    return psnr(a.permute(0, 3, 1, 2) * 2 - 1, b.permute(0, 3, 1, 2) * 2 - 1)


def measure(server, kit: Kit, name: str, make, runs: int, wait_s: float):
    """Warm-up + `runs` timed runs of one graph: (row dict, last image)."""
    seconds, result, image = [], None, None
    for nonce in range(runs + 1):
        server.run(make(nonce), timeout=wait_s)
        result, image = core_pid.read_measurement(server, name)
        seconds.append(result["seconds"])
    weights = sum(m["loaded"] for m in result["loaded_models"])
    cold, seconds = seconds[0], seconds[1:]
    return {"seconds": seconds, "median_seconds": statistics.median(seconds), "cold_seconds": cold,
            "peak_allocated_GiB": None if result["peak_allocated"] is None else result["peak_allocated"] / GIB,
            "weights_on_device_GiB": weights / GIB, "loaded_models": result["loaded_models"],
            "image_shape": result["image_shape"]}, image


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_json")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--deadline", type=float, default=240.0, help="seconds from start; later rows are skipped")
    args = parser.parse_args(argv)
    start = time.monotonic()
    kit, reason = Kit.from_env()
    if kit is None:
        sys.exit(f"bench_core: {reason}")
    kit.prepare_models_base()
    out = {"rehearsal": kit.rehearsal, "runs": args.runs, "sizes": [], "rows": [],
           "schedules": {"core": core_pid.CORE_SIGMAS, "pack": core_pid.RELEASED_SIGMAS},
           "checkpoint": kit.file("bf16"), "parameters": kit.manifest.get("parameters")}
    path = pathlib.Path(args.out_json)

    def save():
        path.write_text(json.dumps(out, indent=1))

    with kit.server("bench") as server:
        out["device"] = system_stats(server).get("name")
        for px in (kit.decode_px, kit.big_px):
            out["sizes"].append(px)
            images = {}
            for name, label, make in graphs(kit, px):
                row = {"size": px, "graph": name, "label": label}
                left = args.deadline - (time.monotonic() - start)
                if left < 30:
                    row["skipped"] = f"not run: {left:.0f} s left of the --deadline {args.deadline:.0f} s"
                else:
                    try:
                        figures, images[name] = measure(server, kit, name, make, args.runs, wait_s=left)
                        row.update(figures)
                    except Exception as e:  # noqa: BLE001 - the row says what failed; the others still run
                        row["error"] = f"{type(e).__name__}: {e}"[:1500]
                        traceback.print_exc()
                    server.free()
                out["rows"].append(row)
                save()
            for row in out["rows"]:
                if row["size"] == px and row["graph"] in images and "core" in images and row["graph"] != "core":
                    row["psnr_vs_core_db"] = image_psnr(images[row["graph"]], images["core"])
            save()
    out["seconds"] = time.monotonic() - start
    save()
    print(f"[bench_core] {len(out['rows'])} rows in {out['seconds']:.0f} s -> {path}")


if __name__ == "__main__":
    main()
