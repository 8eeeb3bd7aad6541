"""Command line: decode a latent file to PNG, show what a checkpoint is, download released files.

    python -m pid_core decode --checkpoint F --latent L.safetensors --text-embedding E --out out.png
    python -m pid_core info F
    python -m pid_core download flux-2k [--repackaged] [--dest DIR]
    python -m pid_core selftest [--out pid_selftest.png]
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import time

import torch

from .errors import ArgumentError, OutputError, PidError
from .precision import DTYPES

GEMMA_REPO = "Efficient-Large-Model/gemma-2-2b-it"  # the text encoder the reference loads


class ProgressBar:
    """Steps, and the tiles of the step in progress, on one line of stderr."""

    def __init__(self, total: int):
        self.total, self.start, self.step = total, time.perf_counter(), 0

    def __call__(self, step: int, total: int, x0=None) -> None:
        self.step = step
        self._draw(step, "")
        if step == total:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def tile(self, done: int, total: int) -> None:
        """After each batch of tiles (tiled decodes): the step in progress, with its tiles."""
        self._draw(self.step + done / total, f" tiles {done}/{total}", shown_step=self.step + 1)

    def _draw(self, progress: float, tiles: str, shown_step: int | None = None) -> None:
        stream = sys.stderr  # looked up per call, so redirection after start-up is honoured
        done = int(20 * progress / self.total)
        stream.write(f"\rdecoding [{'#' * done}{'.' * (20 - done)}] step {shown_step or self.step}/{self.total}{tiles}  "
                     f"{time.perf_counter() - self.start:.1f}s   ")
        stream.flush()


def peak_memory_text(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (CUDA)"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"


def tile_options(args, memory_budget_bytes=None):
    """--tile off | auto | a tile side in pixels (at least MIN_TILE_PX), --overlap in pixels."""
    from .tiling import TileOptions
    from .tiling.geometry import MIN_TILE_PX

    value = str(args.tile).strip().lower()
    mode = value if value in ("off", "auto") else "manual"
    tile = int(value) if value.isdigit() else 0
    if mode == "manual" and tile < MIN_TILE_PX:
        raise ArgumentError(f"--tile takes off, auto or a tile size of at least {MIN_TILE_PX} px, not {args.tile!r}.")
    overlap = args.overlap or 0
    if overlap < 0 or (mode == "manual" and overlap >= tile // 2):
        limit = f" and less than half the tile ({tile // 2} px)" if mode == "manual" else ""
        raise ArgumentError(f"--overlap takes 0 (automatic) or a number of pixels{limit}, not {args.overlap}.")
    return TileOptions(mode=mode, tile_px=tile, overlap_px=overlap, memory_budget_bytes=memory_budget_bytes)


def check_decode_arguments(args) -> torch.device:
    """Every option of `decode`, checked before anything is loaded (docs/DESIGN.md §13): the device exists,
    numbers are in range, the input files are files of a kind we read, the output can be written and is
    none of the inputs. Returns the device."""
    from .checks import check_seed, require_device
    from .errors import TextEmbeddingError
    from .files import CHECKPOINT_FILE, LATENT_FILE, TEXT_EMBEDDING_FILE, sniff
    from .images import check_output_path
    from .plan import check_latent_format_name

    device = require_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    check_seed(args.seed)
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise ArgumentError(f"--sigma takes the noise level the latent carries, 0 or more (0 = clean), not {args.sigma}.")
    check_latent_format_name(args.latent_format)
    tile_options(args)
    sniff(args.checkpoint, CHECKPOINT_FILE)
    sniff(args.latent, LATENT_FILE)
    if args.text_embedding is not None:
        sniff(args.text_embedding, TEXT_EMBEDDING_FILE)
    elif not os.path.exists(args.text_encoder):
        raise TextEmbeddingError(f"Gemma text encoder not found: {args.text_encoder}. Check the path.")
    check_output_path(args.out, inputs=(args.checkpoint, args.latent, args.text_embedding, args.text_encoder))
    return device


def write_images(image: torch.Tensor, out: str) -> list[str]:
    """Every image of the batch to `out` (numbered when there are several), each written atomically;
    all are encoded before the first is written."""
    from .images import (
        encode_image,
        image_format,
        numbered_path,
        to_uint8,
        write_atomically,
    )

    ext = image_format(out)
    paths = [out] if image.shape[0] == 1 else [numbered_path(out, i) for i in range(image.shape[0])]
    encoded = [encode_image(to_uint8(image[i]), ext) for i in range(image.shape[0])]
    for i, (path, data) in enumerate(zip(paths, encoded)):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_atomically(path, data)
        except OSError as exc:
            written = f" ({', '.join(paths[:i])} written)" if i else ""
            fix = {errno.ENOSPC: "Free disk space or choose another folder.",
                   errno.EFBIG: "The file-size limit (ulimit -f) is below the image's size: raise it or write elsewhere.",
                   errno.EDQUOT: "The disk quota is used up: free space or choose another folder."}
            raise OutputError(f"Could not write {path} ({exc.strerror or exc}){written}; a file already there is "
                              f"unchanged. {fix.get(exc.errno, 'Check the folder and choose another if needed.')}") from None
    return paths


def cmd_decode(args) -> int:
    from .checkpoint import describe, load_pid
    from .decode import encode_text, run_plan
    from .files import load_latent_file, load_text_embedding
    from .images import check_image_size
    from .plan import plan_decode
    from .tiling import device_memory_budget

    device = check_decode_arguments(args)
    started = time.perf_counter()
    dtype = DTYPES[args.dtype]
    if dtype is None and device.type == "cpu":
        dtype = torch.float32  # CPUs run bf16 matmuls far slower than fp32; on GPUs the file's bf16 is kept
    latent, meta = load_latent_file(args.latent)
    model = load_pid(args.checkpoint, device=device, dtype=dtype)
    if args.text_embedding:
        text = load_text_embedding(args.text_embedding)
    else:
        from .text import GemmaTextEncoder

        text = encode_text(args.prompt, GemmaTextEncoder.from_pretrained(args.text_encoder, device=device))
    plan = plan_decode(model, latent, text, meta=meta, latent_format=args.latent_format, sigma=args.sigma,
                       leftover_noise=args.leftover_noise, tiling=tile_options(args, device_memory_budget(device)))
    check_image_size(args.out, *plan.output_hw)
    loaded = time.perf_counter()
    progress = ProgressBar(args.steps)
    image = run_plan(model, plan, seed=args.seed, steps=args.steps, callback=progress, tile_callback=progress.tile,
                     compile=args.compile)
    finished = time.perf_counter()
    outputs = write_images(image, args.out)
    print(f"checkpoint : {describe(model)}")
    sigma = args.sigma if args.sigma is not None else (meta.sigma if meta.sigma is not None else 0.0)
    sigmas = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).tolist()
    print(f"latent     : {list(latent.shape)} as {plan.latent_format}, sigma {', '.join(f'{s:.3g}' for s in sigmas)} "
          f"({plan.sigma_source})")
    print(f"tiling     : {plan.tiles.reason}")
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
    print(f"weights    : {str(model.checkpoint.file_dtype).replace('torch.', '')}, all finite")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pid_core", description="PiD pixel-diffusion decoder")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("decode", help="decode a latent file to PNG")
    d.add_argument("--checkpoint", required=True, help="PiD checkpoint (.pth or .safetensors)")
    d.add_argument("--latent", required=True, help="latent: .safetensors / ComfyUI .latent / .pt / .npy")
    d.add_argument("--latent-format", default="auto", help="auto, a format (flux, sd3, sdxl, flux2, flux2_raw, qwenimage, dinov2, siglip, pid) or a backbone")
    d.add_argument("--sigma", type=float, default=None, help="noise level of the latent (0 = clean; default: the file's pid_sigma, else 0)")
    d.add_argument("--leftover-noise", action="store_true", help="the latent is a stock ComfyUI leftover latent x_t/(1-sigma)")
    text = d.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt, encoded with --text-encoder")
    text.add_argument("--text-embedding", help="precomputed Gemma embedding [B,300,2304] (.safetensors/.pt/.npy)")
    d.add_argument("--text-encoder", help="Gemma-2-2b-it folder (Hugging Face layout) for --prompt")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--steps", type=int, default=4, choices=[1, 2, 3, 4])
    d.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    d.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weight dtype (auto: the file's on GPU, fp32 on CPU)")
    d.add_argument("--tile", default="auto", help="auto (tiles only beyond the trained size or free memory), off, or a tile size in output pixels, at least 512 (e.g. 2048)")
    d.add_argument("--overlap", type=int, default=None, help="tile overlap in output pixels")
    d.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for many decodes of one size on a GPU)")
    d.add_argument("--out", required=True, help="output image: .png, or .jpg / .webp with Pillow (numbered name_00.png ... when the batch has several images)")
    d.set_defaults(func=cmd_decode)

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
    if args.command == "decode" and args.prompt and not args.text_encoder:
        build_parser().error("--prompt needs --text-encoder (a Gemma-2-2b-it folder)")
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        return args.func(args)
    except PidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
