"""python -m pid_core selftest: decode with a small random checkpoint (offline install check)."""

from __future__ import annotations

import os
import tempfile

import torch

from .decode import cmd_decode
from .random_checkpoints import make_random_checkpoint


def cmd_selftest(args) -> int:
    """Decode a random latent with a small random checkpoint: proves the install end to end, offline."""
    from safetensors.torch import save_file

    from . import build_parser

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


def add_parser(sub) -> None:
    t = sub.add_parser("selftest", help="decode with a small random checkpoint (offline install check)")
    t.add_argument("--out", default="pid_selftest.png")
    t.add_argument("--device", default=None)
    t.set_defaults(func=cmd_selftest)
