"""What the decode commands share: their options, checks, model loading, progress and image writing.

decode and decode-many (and selftest, through decode) take the same options (`add_decode_options`),
check them before anything loads, load the model the same way and write images atomically.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import time
from typing import Optional, Sequence

import torch

from .. import distributed
from ..errors import ArgumentError, OutputError
from ..precision import DTYPES


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


def tile_options(tile, overlap: Optional[int], budget_bytes: Optional[int] = None):
    """--tile off | auto | a tile side in pixels (at least SMALLEST_TILE_PX), --overlap in pixels, within a
    memory budget."""
    from ..tiling import TileOptions
    from ..tiling.geometry import SMALLEST_TILE_PX
    from ..tiling.policy import LARGEST_PX

    value = str(tile).strip().lower()
    mode = value if value in ("off", "auto") else "manual"
    side = int(value) if value.isdigit() else 0
    if mode == "manual" and not SMALLEST_TILE_PX <= side <= LARGEST_PX:
        raise ArgumentError(f"--tile takes off, auto or a tile size from {SMALLEST_TILE_PX} to {LARGEST_PX} px, "
                            f"not {tile!r}.")
    overlap = overlap or 0
    if mode == "off" and overlap:
        raise ArgumentError(f"--overlap {overlap} applies to tiles, but --tile is off: drop --overlap, or give --tile "
                            "auto or a tile size.")
    if not 0 <= overlap <= LARGEST_PX or (mode == "manual" and overlap > side // 2):
        limit = f", at most half the tile ({side // 2} px)" if mode == "manual" else ""
        raise ArgumentError(f"--overlap takes 0 (automatic) or a number of pixels{limit}, not {overlap}.")
    return TileOptions(mode=mode, tile_px=side, overlap_px=overlap, memory_budget_bytes=budget_bytes)


def check_run_options(args) -> None:
    """The options decode and decode-many apply to every image, checked before anything is loaded."""
    from ..files import FLUX2_VAE_FILE, sniff

    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise ArgumentError(f"--cfg takes a guidance scale of 0 or more (1 = no guidance), not {args.cfg}.")
    if args.bn_stats is not None:
        sniff(args.bn_stats, FLUX2_VAE_FILE)
    check_colour_options(args.color_reference, args.color_match)


def check_colour_options(reference, strength) -> None:
    """--color-reference names an image file; --color-match (0 to 1) only with a reference."""
    from ..errors import ColourReferenceError

    if strength is not None and not (math.isfinite(strength) and 0 <= strength <= 1):
        raise ArgumentError(f"--color-match takes a strength from 0 to 1 (0: the decode's own colours), not {strength}.")
    if reference is None:
        if strength is not None:
            raise ArgumentError("--color-match needs --color-reference (an image of the scene with the colours to keep).")
        return
    if not os.path.isfile(reference):
        what = "is a folder" if os.path.isdir(reference) else "was not found"
        raise ColourReferenceError(f"The colour reference {reference} {what}: give an image file (PNG, JPEG, WebP).")


def check_decode_arguments(args) -> torch.device:
    """Every option of `decode`, checked before anything is loaded (docs/DESIGN.md §13): the device exists,
    numbers are in range, the input files are files of a kind we read, the output can be written and is
    none of the inputs. Returns the device."""
    from ..checks import check_seed
    from ..errors import TextEmbeddingError
    from ..files import CHECKPOINT_FILE, LATENT_FILE, TEXT_EMBEDDING_FILE, sniff
    from ..images import check_output_path
    from ..plan import check_latent_format_name

    device = distributed.compute_device(args.device)  # under torchrun each local rank takes its own GPU
    check_seed(args.seed)
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise ArgumentError(f"--sigma takes the noise level the latent carries, 0 or more (0 = clean), not {args.sigma}.")
    check_run_options(args)
    check_latent_format_name(args.latent_format)
    tile_options(args.tile, args.overlap)
    if getattr(args, "compile", False):
        from ..compile import compile_mode

        compile_mode(args.compile)
    sniff(args.checkpoint, CHECKPOINT_FILE)
    sniff(args.latent, LATENT_FILE)
    if args.text_embedding is not None:
        sniff(args.text_embedding, TEXT_EMBEDDING_FILE)
    elif not os.path.exists(args.text_encoder):
        raise TextEmbeddingError(f"Gemma text encoder not found: {args.text_encoder}. Check the path.")
    if args.negative_embedding is not None:
        sniff(args.negative_embedding, TEXT_EMBEDDING_FILE)
    check_output_path(args.out, inputs=(args.checkpoint, args.latent, args.text_embedding, args.negative_embedding,
                                        args.text_encoder, args.bn_stats, args.color_reference))
    return device


def plan_for(model, latent, meta, text, options, *, budget_bytes: Optional[int], negative, bn_stats=None):
    """The decode plan of one latent from a command's options: decode's arguments, or a decode-many item
    (which holds the same names). Only translates: every decision is plan.plan_decode's."""
    from ..images import read_image
    from ..plan import plan_decode

    reference = read_image(options.color_reference) if options.color_reference else None
    return plan_decode(model, latent, text, meta=meta, latent_format=options.latent_format, sigma=options.sigma,
                       leftover_noise=options.leftover_noise, bn_stats=bn_stats,
                       tiling=tile_options(options.tile, options.overlap, budget_bytes), sampler=options.sampler,
                       steps=options.steps, cfg=options.cfg, negative=negative, color_reference=reference,
                       color_match=options.color_match)


def flux2_bn_stats(args):
    """--bn-stats: the FLUX.2 VAE's statistics for raw 32-channel FLUX.2 latents (None when not given)."""
    from ..files import load_flux2_bn_stats

    return load_flux2_bn_stats(args.bn_stats) if args.bn_stats else None


def load_model(checkpoint: str, device: torch.device, dtype_name: str = "auto"):
    """The PiD model for a command. The weights stay in the file's dtype unless --dtype names another
    (precision.DTYPES); precision.py decides the compute (fp32 per layer on the CPU, the reference's bf16
    autocast on GPUs)."""
    from ..checkpoint import load_pid

    return load_pid(checkpoint, device=device, dtype=DTYPES[dtype_name])


def output_paths(out: str, batch: int) -> list[str]:
    """Where the images of a decode go: `out` for one image, name_00.png, name_01.png, ... for a batch."""
    from ..images import numbered_path

    return [out] if batch == 1 else [numbered_path(out, i) for i in range(batch)]


def write_images(image: torch.Tensor, out: str, *, only: Optional[Sequence[int]] = None) -> list[str]:
    """The images [B, 3, H, W] in [0, 1] of a decode to output_paths(out) (`only`: those indices), in the
    format the extension names; all are encoded, then written together atomically: either every file is
    replaced or none is."""
    from ..images import encode_image, image_format, to_uint8, write_all_atomically

    ext = image_format(out)
    paths = output_paths(out, image.shape[0])
    chosen = range(len(paths)) if only is None else only
    encoded = [(paths[i], encode_image(to_uint8(image[i]), ext)) for i in chosen]
    try:
        for path, _ in encoded:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_all_atomically(encoded)
    except OSError as exc:
        fix = {errno.ENOSPC: "Free disk space or choose another folder.",
               errno.EFBIG: "The file-size limit (ulimit -f) is below the image's size: raise it or write elsewhere.",
               errno.EDQUOT: "The disk quota is used up: free space or choose another folder."}
        raise OutputError(f"Could not write {exc.filename or out} ({exc.strerror or exc}); nothing was written and "
                          f"files already there are unchanged. "
                          f"{fix.get(exc.errno, 'Check the folder and choose another if needed.')}") from None
    return [p for p, _ in encoded]


class TextEncoderOnDemand:
    """The Gemma encoder of --text-encoder, loaded the first time it is needed (None without one)."""

    def __init__(self, path, device):
        self.path, self.device, self.encoder = path, device, None

    def __call__(self):
        if self.encoder is None and self.path:
            from ..text import GemmaTextEncoder

            self.encoder = GemmaTextEncoder.from_pretrained(self.path, device=self.device)
        return self.encoder


def negative_embedding(args, encoder):
    """The unconditional text of a guided (teacher) decode, asked for by the plan only when guided:
    --negative-embedding, else --negative-prompt or the reference's negative prompt through `encoder()`."""
    from ..files import load_text_embedding
    from ..text import NEGATIVE_PROMPT

    if args.negative_embedding:
        return load_text_embedding(args.negative_embedding)
    if encoder() is None:
        return None  # the plan says what is missing, in the command line's words
    prompt = NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    return encoder().encode([prompt])


def add_decode_options(p: argparse.ArgumentParser, *, text_required: bool) -> None:
    """The options of one decode, shared by decode and decode-many."""
    p.add_argument("--checkpoint", required=True, help="PiD checkpoint (.pth or .safetensors)")
    p.add_argument("--latent-format", default="auto", help="auto, a format (flux, sd3, sdxl, flux2, flux2_raw, qwenimage, dinov2, siglip, pid) or a backbone")
    p.add_argument("--sigma", type=float, default=None, help="noise level of the latent (0 = clean; default: the file's pid_sigma, else 0)")
    p.add_argument("--leftover-noise", action="store_true", help="the latent is a stock ComfyUI leftover latent x_t/(1-sigma)")
    p.add_argument("--bn-stats", default=None, metavar="FLUX2_VAE",
                   help="the FLUX.2 VAE file (its BatchNorm statistics), for raw 32-channel FLUX.2 latents (--latent-format flux2_raw)")
    text = p.add_mutually_exclusive_group(required=text_required)
    text.add_argument("--prompt", help="prompt, encoded with --text-encoder")
    text.add_argument("--text-embedding", help="precomputed Gemma embedding [B,300,2304] (.safetensors/.pt/.npy)")
    p.add_argument("--text-encoder", help="Gemma-2-2b-it folder (Hugging Face layout) for --prompt")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of PiD's noise, 0 to 2^64-1. On CUDA every seed is its own noise; on the CPU, seeds that "
                        "differ by a multiple of 2^32 repeat (torch's CPU generator keeps a seed's low 32 bits)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps: students 1-4 (default 4), undistilled checkpoints 1-100 (default 25); 0 = the default")
    p.add_argument("--sampler", default="auto", choices=["auto", "student", "teacher"],
                   help="auto: from the checkpoint's file name (undistilled -> teacher); override when the name cannot tell")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale of the undistilled checkpoints, 0 or more (default 5; 1 = none)")
    negative = p.add_mutually_exclusive_group()
    negative.add_argument("--negative-prompt", default=None,
                          help="negative prompt of a guided decode (default: the reference's, through --text-encoder)")
    negative.add_argument("--negative-embedding", default=None,
                          help="precomputed Gemma embedding of the negative prompt [1|B,300,2304] (needed with "
                               "--text-embedding and no --text-encoder)")
    p.add_argument("--color-reference", default=None, metavar="IMAGE",
                   help="an image of the same scene whose colours to keep (the VAE decode of the latent, an upscale's "
                        "source; PNG, JPEG, WebP; any size with the output's aspect ratio): the decode's low-frequency "
                        "colour is matched to it, its detail kept")
    p.add_argument("--color-match", type=float, default=None, metavar="S",
                   help="how strongly the colour reference's colours are kept, 0 to 1 (default 1 with a reference)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="storage dtype of the weights (auto: the file's); CPUs compute in fp32 per layer, GPUs in bf16 autocast")
    p.add_argument("--tile", default="auto", help="auto (tiles only beyond the trained size or free memory), off, or a tile size in output pixels, at least 64 (e.g. 2048)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in output pixels")
