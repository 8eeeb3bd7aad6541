"""Command line: decode a latent file to an image, show what a checkpoint is, download released files.

    python -m pid_core decode --checkpoint F --latent L.safetensors --text-embedding E --out out.png
    python -m pid_core decode --checkpoint UNDISTILLED --latent L --prompt P --text-encoder G [--cfg 5 --steps 25]
    python -m pid_core decode-many --checkpoint F --manifest items.jsonl      (decode_many.py)
    torchrun --nproc-per-node 8 -m pid_core decode ... | decode-many ...     (several GPUs: distributed.py)
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
from typing import Optional, Sequence

import torch

from . import distributed
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


def tile_options(tile, overlap: Optional[int], budget_bytes: Optional[int] = None):
    """--tile off | auto | a tile side in pixels (at least SMALLEST_TILE_PX), --overlap in pixels, within a
    memory budget."""
    from .tiling import TileOptions
    from .tiling.geometry import SMALLEST_TILE_PX
    from .tiling.policy import LARGEST_PX

    value = str(tile).strip().lower()
    mode = value if value in ("off", "auto") else "manual"
    side = int(value) if value.isdigit() else 0
    if mode == "manual" and not SMALLEST_TILE_PX <= side <= LARGEST_PX:
        raise ArgumentError(f"--tile takes off, auto or a tile size from {SMALLEST_TILE_PX} to {LARGEST_PX} px, "
                            f"not {tile!r}.")
    overlap = overlap or 0
    if not 0 <= overlap <= LARGEST_PX or (mode == "manual" and overlap > side // 2):
        limit = f", at most half the tile ({side // 2} px)" if mode == "manual" else ""
        raise ArgumentError(f"--overlap takes 0 (automatic) or a number of pixels{limit}, not {overlap}.")
    return TileOptions(mode=mode, tile_px=side, overlap_px=overlap, memory_budget_bytes=budget_bytes)


def check_decode_arguments(args) -> torch.device:
    """Every option of `decode`, checked before anything is loaded (docs/DESIGN.md §13): the device exists,
    numbers are in range, the input files are files of a kind we read, the output can be written and is
    none of the inputs. Returns the device."""
    from .checks import check_seed
    from .errors import TextEmbeddingError
    from .files import CHECKPOINT_FILE, LATENT_FILE, TEXT_EMBEDDING_FILE, sniff
    from .images import check_output_path
    from .plan import check_latent_format_name

    device = distributed.compute_device(args.device)  # under torchrun each local rank takes its own GPU
    check_seed(args.seed)
    if args.sigma is not None and not (math.isfinite(args.sigma) and args.sigma >= 0):
        raise ArgumentError(f"--sigma takes the noise level the latent carries, 0 or more (0 = clean), not {args.sigma}.")
    check_latent_format_name(args.latent_format)
    tile_options(args.tile, args.overlap)
    sniff(args.checkpoint, CHECKPOINT_FILE)
    sniff(args.latent, LATENT_FILE)
    if args.text_embedding is not None:
        sniff(args.text_embedding, TEXT_EMBEDDING_FILE)
    elif not os.path.exists(args.text_encoder):
        raise TextEmbeddingError(f"Gemma text encoder not found: {args.text_encoder}. Check the path.")
    if args.negative_embedding is not None:
        sniff(args.negative_embedding, TEXT_EMBEDDING_FILE)
    check_output_path(args.out, inputs=(args.checkpoint, args.latent, args.text_embedding, args.negative_embedding,
                                        args.text_encoder))
    return device


def load_model(checkpoint: str, device: torch.device, dtype_name: str = "auto"):
    """The PiD model for a command. The weights stay in the file's dtype unless --dtype names another
    (precision.DTYPES); precision.py decides the compute (fp32 per layer on the CPU, the reference's bf16
    autocast on GPUs)."""
    from .checkpoint import load_pid

    return load_pid(checkpoint, device=device, dtype=DTYPES[dtype_name])


def output_paths(out: str, batch: int) -> list[str]:
    """Where the images of a decode go: `out` for one image, name_00.png, name_01.png, ... for a batch."""
    from .images import numbered_path

    return [out] if batch == 1 else [numbered_path(out, i) for i in range(batch)]


def write_images(image: torch.Tensor, out: str, *, only: Optional[Sequence[int]] = None) -> list[str]:
    """The images [B, 3, H, W] in [0, 1] of a decode to output_paths(out) (`only`: those indices), in the
    format the extension names; all are encoded, then written together atomically: either every file is
    replaced or none is."""
    from .images import encode_image, image_format, to_uint8, write_all_atomically

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


@distributed.joins_torchrun
def cmd_decode(args) -> int:
    from .checkpoint import describe
    from .decode import encode_text, run_plan
    from .files import load_latent_file, load_text_embedding
    from .images import check_image_size
    from .plan import plan_decode

    device = check_decode_arguments(args)
    ranks = distributed.current()  # several under torchrun: they share the tile batches of this image
    started = time.perf_counter()
    latent, meta = load_latent_file(args.latent)
    model = load_model(args.checkpoint, device, args.dtype)
    encoder = TextEncoderOnDemand(args.text_encoder, device)
    if args.text_embedding:
        text = load_text_embedding(args.text_embedding)
    else:  # the other ranks take rank 0's embeddings, so every rank decodes the same inputs
        text = distributed.from_main(encode_text(args.prompt, encoder()) if ranks.is_main else None)

    def negative():
        return distributed.from_main(negative_embedding(args, encoder) if ranks.is_main else None)

    budget = distributed.smallest(distributed.memory_budget(device))  # the same tiles on every rank
    plan = plan_decode(model, latent, text, meta=meta, latent_format=args.latent_format, sigma=args.sigma,
                       leftover_noise=args.leftover_noise, tiling=tile_options(args.tile, args.overlap, budget),
                       sampler=args.sampler, steps=args.steps, cfg=args.cfg, negative=negative)
    check_image_size(args.out, *plan.output_hw)
    if ranks.several and not plan.tiles.tiled:
        distributed.say(f"note: one pass over the whole canvas, nothing to share: each of the {ranks.world_size} "
                        f"ranks runs it (give --tile, e.g. --tile 1024, to share tiles among them)")
    loaded = time.perf_counter()
    steps = plan.sampler.steps
    progress = ProgressBar(steps) if ranks.is_main else None
    image = run_plan(model, plan, seed=args.seed, compile=args.compile, callback=progress,
                     tile_callback=progress.tile if progress else None, batch_runner=distributed.tile_runner())
    finished = time.perf_counter()
    if not ranks.is_main:
        return 0  # every rank holds the same image; rank 0 writes it
    outputs = write_images(image, args.out)
    print(f"checkpoint : {describe(model)}")
    sigma = args.sigma if args.sigma is not None else (meta.sigma if meta.sigma is not None else 0.0)
    sigmas = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).tolist()
    print(f"latent     : {list(latent.shape)} as {plan.latent_format}, sigma {', '.join(f'{s:.3g}' for s in sigmas)} "
          f"({plan.sigma_source})")
    print(f"sampler    : {plan.sampler.describe()} ({plan.sampler.kind_source})")
    print(f"tiling     : {plan.tiles.reason}" + (f"; tile batches shared by {ranks.world_size} ranks" if ranks.several else ""))
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


def negative_embedding(args, encoder):
    """The unconditional text of a guided (teacher) decode, asked for by the plan only when guided:
    --negative-embedding, else --negative-prompt or the reference's negative prompt through `encoder()`."""
    from .files import load_text_embedding
    from .text import NEGATIVE_PROMPT

    if args.negative_embedding:
        return load_text_embedding(args.negative_embedding)
    if encoder() is None:
        raise ArgumentError(
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
    p.add_argument("--steps", type=int, default=None,
                   help="sampler steps: students 1-4 (default 4), undistilled checkpoints 1-100 (default 25); 0 = the default")
    p.add_argument("--sampler", default="auto", choices=["auto", "student", "teacher"],
                   help="auto: from the checkpoint's file name (undistilled -> teacher); override when the name cannot tell")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance scale of the undistilled checkpoints (default 5; 1 = none)")
    negative = p.add_mutually_exclusive_group()
    negative.add_argument("--negative-prompt", default=None,
                          help="negative prompt of a guided decode (default: the reference's, through --text-encoder)")
    negative.add_argument("--negative-embedding", default=None,
                          help="precomputed Gemma embedding of the negative prompt [1|B,300,2304] (needed with "
                               "--text-embedding and no --text-encoder)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available; under torchrun cuda:LOCAL_RANK)")
    p.add_argument("--dtype", default="auto", choices=list(DTYPES), help="storage dtype of the weights (auto: the file's); CPUs compute in fp32 per layer, GPUs in bf16 autocast")
    p.add_argument("--tile", default="auto", help="auto (tiles only beyond the trained size or free memory), off, or a tile size in output pixels, at least 64 (e.g. 2048)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in output pixels")


class OneLineErrors(argparse.ArgumentParser):
    """A usage mistake ends like every other error of the command: one line `error: ...`, exit code 2
    (argparse would print the whole usage first); --help still shows it."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrors(prog="python -m pid_core", description="PiD pixel-diffusion decoder")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("decode", help="decode a latent file to an image (under torchrun: its tiles shared by the ranks)")
    d.add_argument("--latent", required=True, help="latent: .safetensors / ComfyUI .latent / .pt / .npy")
    add_decode_options(d, text_required=True)
    d.add_argument("--compile", action="store_true", help="torch.compile the network (pays off for many decodes of one size on a GPU)")
    d.add_argument("--out", required=True, help="output image: .png, or .jpg / .webp with Pillow (numbered name_00.png ... when the batch has several images)")
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
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "negative_prompt", None) is not None and not args.text_encoder:
        parser.error("--negative-prompt needs --text-encoder (a Gemma-2-2b-it folder); or give --negative-embedding")
    if getattr(args, "prompt", None) is not None and not args.text_encoder:
        parser.error("--prompt needs --text-encoder (a Gemma-2-2b-it folder)")
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        return args.func(args)
    except PidError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
