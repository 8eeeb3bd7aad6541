"""Command line: decode a latent file to PNG, show what a checkpoint is, download released files.

    python -m pid_core decode --checkpoint F --latent L.safetensors --text-embedding E --out out.png
    python -m pid_core decode-many --checkpoint F --manifest items.jsonl      (decode_many.py)
    torchrun --nproc-per-node 8 -m pid_core decode ... | decode-many ...     (several GPUs: distributed.py)
    python -m pid_core info F
    python -m pid_core download flux-2k [--repackaged] [--dest DIR]
    python -m pid_core selftest [--out pid_selftest.png]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Optional, Sequence

import torch

from . import distributed
from .errors import PidError
from .images import save_png
from .precision import DTYPES

GEMMA_REPO = "Efficient-Large-Model/gemma-2-2b-it"  # the text encoder the reference loads


class ProgressBar:
    def __init__(self, total: int):
        self.total, self.start = total, time.perf_counter()

    def __call__(self, step: int, total: int, x0=None) -> None:
        self.stream = sys.stderr  # looked up per call, so redirection after start-up is honoured
        done = int(20 * step / total)
        self.stream.write(f"\rdecoding [{'#' * done}{'.' * (20 - done)}] step {step}/{total}  {time.perf_counter() - self.start:.1f}s")
        if step == total:
            self.stream.write("\n")
        self.stream.flush()


def peak_memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def tile_options(tile: str, overlap: Optional[int], budget_bytes: Optional[int]):
    """--tile off | auto | a tile side in pixels; --overlap in pixels; the memory budget to fit."""
    from .tiling import TileOptions

    tile = str(tile)
    if tile not in ("off", "auto") and not tile.isdigit():
        raise PidError(f"--tile takes off, auto or a tile size in pixels, not {tile!r}.")
    mode = tile if tile in ("off", "auto") else "manual"
    return TileOptions(mode=mode, tile_px=int(tile) if mode == "manual" else 0, overlap_px=overlap or 0,
                       memory_budget_bytes=budget_bytes)


def load_model(checkpoint: str, device: torch.device, dtype_name: str = "auto"):
    """The PiD model for a command: the weights' dtype by name (precision.DTYPES); auto keeps the file's
    on a GPU and takes fp32 on the CPU, where bf16 matmuls are far slower on most processors."""
    from .checkpoint import load_pid

    dtype = DTYPES[dtype_name]
    if dtype is None and device.type == "cpu":
        dtype = torch.float32
    return load_pid(checkpoint, device=device, dtype=dtype)


def output_paths(out: str, batch: int) -> list[str]:
    """Where the images of a decode go: `out` for one image, out_00.png, out_01.png, ... for a batch."""
    if batch == 1:
        return [out]
    return [f"{os.path.splitext(out)[0]}_{i:02d}.png" for i in range(batch)]


def save_images(image: torch.Tensor, out: str, *, only: Optional[Sequence[int]] = None) -> list[str]:
    """Write a decode's images [B, 3, H, W] in [0, 1] as PNGs (output_paths; `only`: those indices),
    each atomically. Nothing is written when any value is not finite."""
    if not torch.isfinite(image).all():
        raise PidError("The decode produced values that are not finite (NaN or inf); nothing was written. "
                       "Try --dtype fp32, or check the checkpoint and the latent.")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    paths = output_paths(out, image.shape[0])
    written = []
    for i in (range(len(paths)) if only is None else only):
        save_png(image[i], paths[i])
        written.append(paths[i])
    return written


@distributed.joins_torchrun
def cmd_decode(args) -> int:
    from .checkpoint import describe
    from .decode import encode_text, run_plan
    from .files import load_latent_file, load_text_embedding
    from .plan import plan_decode

    ranks = distributed.current()  # several under torchrun: they share the tile batches of this image
    device = distributed.compute_device(args.device)
    started = time.perf_counter()
    model = load_model(args.checkpoint, device, args.dtype)
    latent, meta = load_latent_file(args.latent)
    if args.text_embedding:
        text = load_text_embedding(args.text_embedding)
    else:
        text = None
        if ranks.is_main:  # the other ranks take rank 0's embedding, so every rank decodes the same inputs
            from .text import GemmaTextEncoder

            text = encode_text(args.prompt, GemmaTextEncoder.from_pretrained(args.text_encoder, device=device))
        text = distributed.from_main(text)
    budget = distributed.smallest(distributed.memory_budget(device))  # the same tiles on every rank
    plan = plan_decode(model, latent, text, meta=meta, latent_format=args.latent_format, sigma=args.sigma,
                       leftover_noise=args.leftover_noise, tiling=tile_options(args.tile, args.overlap, budget))
    if ranks.several and not plan.tiles.tiled:
        distributed.say(f"note: one pass over the whole canvas, nothing to share: each of the {ranks.world_size} "
                        f"ranks runs it (give --tile, e.g. --tile 1024, to share tiles among them)")
    loaded = time.perf_counter()
    image = run_plan(model, plan, seed=args.seed, steps=args.steps, compile=args.compile,
                     callback=ProgressBar(args.steps) if ranks.is_main else None,
                     batch_runner=distributed.tile_runner())
    finished = time.perf_counter()
    if not ranks.is_main:
        return 0  # every rank holds the same image; rank 0 writes it
    outputs = save_images(image, args.out)
    print(f"checkpoint : {describe(model)}")
    sigma = args.sigma if args.sigma is not None else (meta.sigma if meta.sigma is not None else 0.0)
    sigmas = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).tolist()
    print(f"latent     : {list(latent.shape)} as {plan.latent_format}, sigma {', '.join(f'{s:.3g}' for s in sigmas)} "
          f"({plan.sigma_source})")
    print(f"tiling     : {plan.tiles.reason}" + (f"; tile batches shared by {ranks.world_size} ranks" if ranks.several else ""))
    print(f"output     : {image.shape[0]} x {image.shape[-1]}x{image.shape[-2]} px -> {', '.join(outputs)}")
    print(f"time       : load {loaded - started:.1f}s, decode {finished - loaded:.1f}s ({args.steps} steps, {device.type})")
    print(f"peak memory: {peak_memory_text(device)}")
    return 0


def cmd_selftest(args) -> int:
    """Decode a random latent with a small random checkpoint: proves the install end to end, offline."""
    import tempfile

    from safetensors.torch import save_file

    from .testing import make_random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "pid_flux1_512_to_2048_4step_bf16.safetensors")  # named like the FLUX.1 2K file
        make_random_checkpoint(ckpt, layout="v1", latent_channels=16)
        latent = os.path.join(tmp, "latent.safetensors")
        save_file({"latent": torch.randn(1, 16, 8, 12), "pid_sigma": torch.tensor(0.3)}, latent)
        text = os.path.join(tmp, "text.safetensors")
        save_file({"text_embedding": torch.randn(1, 300, 2304)}, text)
        print("self-test: a small random PiD checkpoint (random weights: the image is noise, its size is real)")
        return cmd_decode(build_parser().parse_args(
            ["decode", "--checkpoint", ckpt, "--latent", latent, "--text-embedding", text, "--out", args.out]
            + (["--device", args.device] if args.device else [])
        ))


def cmd_info(args) -> int:
    from .checkpoint import describe, load_pid

    model = load_pid(args.checkpoint)
    cfg = model.config
    print(describe(model))
    print(f"key layout : {model.checkpoint.key_layout}")
    print(f"network    : {cfg.patch_depth} patch blocks x {cfg.hidden_size}, {cfg.pixel_depth} pixel blocks, text {cfg.text_max_tokens}x{cfg.text_dim}")
    if model.variant is not None:
        v = model.variant
        print(f"variant    : {v.name} ({v.label}); backbones {', '.join(v.backbones)}; latent format {v.latent_format}")
    return 0


def cmd_download(args) -> int:
    from .variants import LICENSE_NOTE, get_variant

    try:
        from huggingface_hub import hf_hub_download, snapshot_download
    except ImportError:
        raise PidError("Downloading needs huggingface_hub: pip install huggingface_hub") from None
    print(LICENSE_NOTE)
    dest = args.dest or "."
    try:
        if args.name.lower() in ("gemma", "text-encoder", "gemma-2-2b-it"):
            path = snapshot_download(GEMMA_REPO, local_dir=os.path.join(dest, "gemma-2-2b-it"),
                                     allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        else:
            variant = get_variant(args.name)
            hub = variant.repackaged_file if args.repackaged else variant.official_file
            if hub is None:
                raise PidError(f"{variant.name} has no repackaged file; omit --repackaged to get the official one.")
            path = hf_hub_download(hub.repo, hub.path, local_dir=dest)
    except PidError:
        raise
    except Exception as exc:  # network, authentication, missing file: all reported the same way
        raise PidError(
            f"Download failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Check the network connection (this command needs the Hugging Face Hub) or download the file by hand."
        ) from None
    print(f"saved: {path}")
    return 0


def add_decode_options(p: argparse.ArgumentParser, *, text_required: bool) -> None:
    """The options of one decode, shared by decode and decode-many."""
    p.add_argument("--checkpoint", required=True, help="PiD checkpoint (.pth or .safetensors)")
    p.add_argument("--latent-format", default="auto", help="auto, a format (flux, sd3, sdxl, flux2, flux2_raw, qwenimage, dinov2, siglip, pid) or a backbone")
    p.add_argument("--sigma", type=float, default=None, help="noise level of the latent (0 = clean; default: the file's pid_sigma, else 0)")
    p.add_argument("--leftover-noise", action="store_true", help="the latent is a stock ComfyUI leftover latent x_t/(1-sigma)")
    text = p.add_mutually_exclusive_group(required=text_required)
    text.add_argument("--prompt", help="prompt, encoded with --text-encoder")
    text.add_argument("--text-embedding", help="precomputed Gemma embedding [B,300,2304] (.safetensors/.pt/.npy)")
    p.add_argument("--text-encoder", help="Gemma-2-2b-it folder (Hugging Face layout) for --prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4, choices=[1, 2, 3, 4])
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weight dtype (auto: the file's on GPU, fp32 on CPU)")
    p.add_argument("--tile", default="auto", help="auto (tiles only beyond the trained size or free memory), off, or a tile size in output pixels (e.g. 2048)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in output pixels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pid_core", description="PiD pixel-diffusion decoder")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("decode", help="decode a latent file to PNG (under torchrun: its tiles shared by the ranks)")
    d.add_argument("--latent", required=True, help="latent: .safetensors / ComfyUI .latent / .pt / .npy")
    add_decode_options(d, text_required=True)
    d.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for many decodes of one size on a GPU)")
    d.add_argument("--out", required=True, help="output PNG (numbered when the batch has several images)")
    d.set_defaults(func=cmd_decode)

    from .decode_many import add_parser as add_decode_many

    add_decode_many(sub)

    t = sub.add_parser("selftest", help="decode with a small random checkpoint (offline install check)")
    t.add_argument("--out", default="pid_selftest.png")
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_selftest)

    i = sub.add_parser("info", help="show what a checkpoint file is")
    i.add_argument("checkpoint")
    i.set_defaults(func=cmd_info)

    g = sub.add_parser("download", help="download a released checkpoint (or 'gemma') from the Hugging Face Hub")
    g.add_argument("name", help="variant (e.g. flux-2k, flux-2kto4k-v1.5, sdxl-2kto4k) or 'gemma'")
    g.add_argument("--repackaged", action="store_true", help="the Comfy-Org .safetensors instead of the official .pth")
    g.add_argument("--dest", help="target folder (default: current folder)")
    g.set_defaults(func=cmd_download)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", None) and not args.text_encoder:
        build_parser().error("--prompt needs --text-encoder (a Gemma-2-2b-it folder)")
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        return args.func(args)
    except PidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
