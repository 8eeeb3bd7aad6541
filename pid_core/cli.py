"""Command line: decode a latent file to PNG, show what a checkpoint is, download released files.

    python -m pid_core decode --checkpoint F --latent L.safetensors --text-embedding E --out out.png
    python -m pid_core decode --checkpoint UNDISTILLED --latent L --prompt P --text-encoder G [--cfg 5 --steps 25]
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

import torch

from .errors import PidError
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


def tile_options(args, device: torch.device):
    """--tile off | auto | a tile side in pixels, within the device's free memory."""
    from .tiling import TileOptions, device_memory_budget

    if args.tile not in ("off", "auto") and not args.tile.isdigit():
        raise PidError(f"--tile takes off, auto or a tile size in pixels, not {args.tile!r}.")
    mode = args.tile if args.tile in ("off", "auto") else "manual"
    return TileOptions(mode=mode, tile_px=int(args.tile) if mode == "manual" else 0, overlap_px=args.overlap or 0,
                       memory_budget_bytes=device_memory_budget(device))


def cmd_decode(args) -> int:
    from .checkpoint import describe, load_pid
    from .decode import encode_text, run_plan
    from .files import load_latent_file, load_text_embedding
    from .images import save_png
    from .plan import plan_decode

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    started = time.perf_counter()
    dtype = DTYPES[args.dtype]
    if dtype is None and device.type == "cpu":
        dtype = torch.float32  # CPUs run bf16 matmuls far slower than fp32; on GPUs the file's bf16 is kept
    model = load_pid(args.checkpoint, device=device, dtype=dtype)
    latent, meta = load_latent_file(args.latent)
    encoder = TextEncoderOnDemand(args.text_encoder, device)
    text = load_text_embedding(args.text_embedding) if args.text_embedding else encode_text(args.prompt, encoder())
    plan = plan_decode(model, latent, text, meta=meta, latent_format=args.latent_format, sigma=args.sigma,
                       leftover_noise=args.leftover_noise, tiling=tile_options(args, device),
                       sampler=args.sampler, steps=args.steps, cfg=args.cfg,
                       negative=lambda: negative_embedding(args, encoder))
    loaded = time.perf_counter()
    steps = plan.sampler.steps
    image = run_plan(model, plan, seed=args.seed, callback=ProgressBar(steps), compile=args.compile)
    finished = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    outputs = []
    for i in range(image.shape[0]):
        path = args.out if image.shape[0] == 1 else f"{os.path.splitext(args.out)[0]}_{i:02d}.png"
        save_png(image[i], path)
        outputs.append(path)
    print(f"checkpoint : {describe(model)}")
    sigma = args.sigma if args.sigma is not None else (meta.sigma if meta.sigma is not None else 0.0)
    sigmas = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).tolist()
    print(f"latent     : {list(latent.shape)} as {plan.latent_format}, sigma {', '.join(f'{s:.3g}' for s in sigmas)} "
          f"({plan.sigma_source})")
    print(f"sampler    : {plan.sampler.describe()} ({plan.sampler.kind_source})")
    print(f"tiling     : {plan.tiles.reason}")
    print(f"output     : {image.shape[0]} x {image.shape[-1]}x{image.shape[-2]} px -> {', '.join(outputs)}")
    print(f"time       : load {loaded - started:.1f}s, decode {finished - loaded:.1f}s ({steps} steps, {device.type})")
    print(f"peak memory: {peak_memory_text(device)}")
    return 0


class TextEncoderOnDemand:
    """The Gemma encoder of --text-encoder, loaded the first time it is needed (None without one)."""

    def __init__(self, path, device):
        self.path, self.device, self.encoder = path, device, None

    def __call__(self):
        if self.encoder is None and self.path:
            from .text import GemmaTextEncoder

            self.encoder = GemmaTextEncoder.from_pretrained(self.path, device=self.device)
        return self.encoder


def negative_embedding(args, encoder: TextEncoderOnDemand):
    """The unconditional text of a guided (teacher) decode; asked for by the plan only when guided."""
    from .files import load_text_embedding
    from .text import NEGATIVE_PROMPT

    if args.negative_embedding:
        return load_text_embedding(args.negative_embedding)
    if encoder() is None:
        raise PidError(
            "A guided decode (an undistilled checkpoint, cfg > 1) needs the negative prompt's embedding: pass "
            "--negative-embedding (the reference's negative prompt, encoded like the prompt), or --text-encoder "
            "to encode it here, or --cfg 1 for no guidance."
        )
    prompt = NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    return encoder().encode([prompt])


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
    d.add_argument("--steps", type=int, default=None,
                   help="sampler steps: students 1-4 (default 4), undistilled checkpoints 1-100 (default 25)")
    d.add_argument("--sampler", default="auto", choices=["auto", "student", "teacher"],
                   help="auto: from the checkpoint's file name (undistilled -> teacher); override when the name cannot tell")
    d.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale of the undistilled checkpoints (default 5; 1 = none)")
    negative = d.add_mutually_exclusive_group()
    negative.add_argument("--negative-prompt", default=None,
                          help="negative prompt of a guided decode (default: the reference's, through --text-encoder)")
    negative.add_argument("--negative-embedding", default=None,
                          help="precomputed Gemma embedding of the negative prompt [1|B,300,2304] (needed with "
                               "--text-embedding and no --text-encoder)")
    d.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    d.add_argument("--dtype", default="auto", choices=list(DTYPES), help="weight dtype (auto: the file's on GPU, fp32 on CPU)")
    d.add_argument("--tile", default="auto", help="auto (tiles only beyond the trained size or free memory), off, or a tile size in output pixels (e.g. 2048)")
    d.add_argument("--overlap", type=int, default=None, help="tile overlap in output pixels")
    d.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for many decodes of one size on a GPU)")
    d.add_argument("--out", required=True, help="output PNG (numbered when the batch has several images)")
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
    if args.command == "decode" and args.negative_prompt is not None and not args.text_encoder:
        build_parser().error("--negative-prompt needs --text-encoder (a Gemma-2-2b-it folder); "
                             "or give --negative-embedding")
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        return args.func(args)
    except PidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
