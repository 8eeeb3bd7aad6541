"""Random PiD checkpoints for the GPU kit, made on the spot (no released weights travel or exist there).

    python make_checkpoints.py COMFYUI_PATH MODELS_DIR [--size full|narrow] [--device cuda|cpu]

Run with ComfyUI's Python (the quantized files are written by ComfyUI's own quantization code). Writes
into MODELS_DIR/diffusion_models/ (where Comfy-Org's files go, read by core's UNETLoader and by PiD Loader):

* pid_flux1_1024_to_4096_4step_bf16.safetensors: the FLUX.1 2K-to-4K v1.5 student's key layout (16
  channels, the released sizes of pid_core's `released_config`, 1.40 B parameters; `--size narrow`: the
  tests' narrow sizes) with random weights, bf16, no key prefix: a Comfy-Org-style file that core
  ComfyUI's UNETLoader loads as its own PiD model and PiD Loader loads as the pack's;
* the same weights quantized as ComfyUI writes them: ..._mxfp8.safetensors (mxfp8) and
  ..._int8_convrot.safetensors (int8 tensorwise with convrot), the patch and pixel blocks' matmuls;

and MODELS_DIR/kit_checkpoints.json naming them (with the config, parameter count and the seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEM = "pid_flux1_1024_to_4096_4step"
FILES = {"bf16": f"{STEM}_bf16.safetensors", "mxfp8": f"{STEM}_mxfp8.safetensors",
         "int8_convrot": f"{STEM}_int8_convrot.safetensors"}
SEED = 20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comfy_path")
    parser.add_argument("models_dir")
    parser.add_argument("--size", choices=["full", "narrow"], default="full")
    parser.add_argument("--device", default="cuda", help="where the weights are quantized")
    args = parser.parse_args(argv)

    sys.path[:0] = [args.comfy_path, str(REPO), str(REPO / "tests" / "comfyui")]
    sys.argv = [sys.argv[0]] + (["--cpu"] if args.device == "cpu" else [])
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch
    from safetensors.torch import save_file

    from pid_core.commands.random_checkpoints import config_shapes, narrow_config, random_state_dict, released_config
    from quantized_files import write_quantized

    start = time.perf_counter()
    out = pathlib.Path(args.models_dir) / "diffusion_models"
    out.mkdir(parents=True, exist_ok=True)
    config = (released_config("v1.5", 16) if args.size == "full" else
              narrow_config(layout="v1.5", latent_channels=16))
    torch.set_num_threads(os.cpu_count() or 1)
    sd = random_state_dict(config_shapes(config), seed=SEED, dtype=torch.bfloat16)
    save_file(sd, str(out / FILES["bf16"]))
    timings = {"bf16": time.perf_counter() - start}
    layers = {}
    for fmt in ("mxfp8", "int8_convrot"):
        t = time.perf_counter()
        layers[fmt] = write_quantized(sd, str(out / FILES[fmt]), fmt, device=args.device)
        timings[fmt] = time.perf_counter() - t
    manifest = {
        "size": args.size, "files": FILES, "quantized_layers": layers, "seed": SEED,
        "parameters": sum(math.prod(t.shape) for t in sd.values()),
        "config": {k: v for k, v in vars(config).items() if isinstance(v, (int, float, str, bool))},
        "seconds": timings, "device": args.device,
    }
    (pathlib.Path(args.models_dir) / "kit_checkpoints.json").write_text(json.dumps(manifest, indent=1))
    print(f"[make_checkpoints] {args.size}: {manifest['parameters'] / 1e9:.3f} B parameters, "
          + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
