"""Time of the commands in one process and under torchrun, on this machine (gloo on the CPU, NCCL on GPUs).

    python -m pid_core bench-ranks --mode tiles [--size 1024] [--tile 256] [--steps 2] [--ranks 2] [--runs 3]
    python -m pid_core bench-ranks --mode many [--items 8] [--size 512] [--steps 2] [--ranks 2] [--runs 3]

It writes a random checkpoint (narrow by default: `random_checkpoints.narrow_config`; --full: the released sizes),
latents and a text embedding to a temporary folder and runs the real commands, in turn (A B C A B C ...,
so a drift of the machine's speed hits every configuration alike):

  1 process           python -m pid_core ...            (torch's default threads: every core)
  1 process, 1 thread the same with OMP_NUM_THREADS=1   (what each rank has: the scaling reference)
  N ranks             torchrun --nproc-per-node N -m pid_core ...   (one thread per rank)

A shared machine is noisy: the minimum decode time is printed beside the median.

tiles: `decode` of one --size x --size image with --tile tiles; many: `decode-many` of --items latents of
--size px. It prints, per configuration, the median wall time of the whole command (start-up, loading
and the decode) and the median decode time the command reports (tiles: rank 0's decode; many: the
slowest rank's), and whether the images equal those of the 1-thread process byte for byte.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

CHECKPOINT = "pid_flux1_512_to_2048_4step_bf16.safetensors"  # named like the FLUX.1 file: format flux


def prepare(root: str, args) -> None:
    import torch
    from safetensors.torch import save_file

    from .random_checkpoints import make_random_checkpoint, released_config

    changes = {} if not args.full else {k: getattr(released_config(), k) for k in (
        "hidden_size", "num_heads", "patch_depth", "mlp_hidden", "pixel_depth", "pixel_hidden_size",
        "pixel_attn_hidden_size", "pixel_num_heads", "pixel_mlp_hidden", "adapter_hidden")}
    make_random_checkpoint(os.path.join(root, CHECKPOINT), layout="v1", latent_channels=16, **changes)
    g = torch.Generator().manual_seed(0)
    cells = args.size // 32
    save_file({"text_embedding": torch.randn(1, 300, 2304, generator=g)}, os.path.join(root, "text.safetensors"))
    count = 1 if args.mode == "tiles" else args.items
    with open(os.path.join(root, "items.jsonl"), "w") as manifest:
        for i in range(count):
            save_file({"latent": torch.randn(1, 16, cells, cells, generator=g)}, os.path.join(root, f"l{i}.safetensors"))
            manifest.write(json.dumps({"latent": f"l{i}.safetensors", "seed": i, "sigma": 0.3}) + "\n")


def command_line(root: str, out: str, args, ranks: int) -> list[str]:
    common = ["--checkpoint", os.path.join(root, CHECKPOINT), "--text-embedding", os.path.join(root, "text.safetensors"),
              "--steps", str(args.steps), "--device", args.device]
    if args.mode == "tiles":
        pid = ["decode", *common, "--latent", os.path.join(root, "l0.safetensors"), "--sigma", "0.3",
               "--tile", str(args.tile), "--out", os.path.join(out, "l0.png")]
    else:
        pid = ["decode-many", *common, "--manifest", os.path.join(root, "items.jsonl"), "--out-dir", out,
               "--tile", str(args.tile)]
    if ranks == 1:
        return [sys.executable, "-m", "pid_core", *pid]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "pid_core", *pid]


def decode_seconds(stdout: str, mode: str) -> float:
    """The decode time the command printed: decode's 'decode X s'; decode-many's slowest rank."""
    if mode == "tiles":
        return float(re.search(r"decode ([\d.]+)s", stdout).group(1))
    ranks = [float(s) for s in re.findall(r"rank \d+: .*?, ([\d.]+)s,", stdout)]
    return max(ranks) if ranks else float(re.search(r"^  ([\d.]+)s,", stdout, re.M).group(1))


def images(folder: str) -> dict:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder)) if n.endswith(".png")}


def add_parser(sub) -> None:
    p = sub.add_parser("bench-ranks", help="the commands timed in one process and under torchrun",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["tiles", "many"], default="tiles")
    p.add_argument("--size", type=int, default=1024, help="output side in px (a multiple of 32)")
    p.add_argument("--tile", default=None, help="tile side in px (default: tiles 256, many auto)")
    p.add_argument("--items", type=int, default=8)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--full", action="store_true", help="the released model sizes instead of a narrow model")
    p.set_defaults(func=cmd_bench_ranks)


def cmd_bench_ranks(args) -> int:
    args.tile = args.tile or ("256" if args.mode == "tiles" else "auto")
    configs = [("1 process", 1, {}), ("1 process, 1 thread", 1, {"OMP_NUM_THREADS": "1"}),
               (f"{args.ranks} ranks, 1 thread each", args.ranks, {"OMP_NUM_THREADS": "1"})]
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as root:
        prepare(root, args)
        walls: dict = {c[0]: [] for c in configs}
        decodes: dict = {c[0]: [] for c in configs}
        outputs: dict = {}
        for run in range(args.runs):
            for name, ranks, env in configs:
                out = os.path.join(root, f"out-{run}-{ranks}-{len(env)}")
                environ = {**os.environ, "PYTHONPATH": here, **env}
                started = time.perf_counter()
                done = subprocess.run(command_line(root, out, args, ranks), env=environ, capture_output=True, text=True)
                walls[name].append(time.perf_counter() - started)
                if done.returncode != 0:
                    print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
                    return 1
                decodes[name].append(decode_seconds(done.stdout, args.mode))
                outputs.setdefault(name, images(out))
    reference = outputs["1 process, 1 thread"]
    print(f"{args.mode}: {'decode' if args.mode == 'tiles' else 'decode-many'} of "
          f"{1 if args.mode == 'tiles' else args.items} x {args.size}x{args.size} px, tile {args.tile}, "
          f"{args.steps} steps, {'full-size' if args.full else 'narrow'} model, {args.device}, "
          f"{os.cpu_count()} CPUs; medians of {args.runs} runs")
    print(f"{'configuration':<26} {'wall s':>8} {'decode s':>9} {'(min)':>7} {'vs 1 thread':>12}  same images as 1 thread")
    base = statistics.median(decodes["1 process, 1 thread"])
    for name, _, _ in configs:
        wall, dec = statistics.median(walls[name]), statistics.median(decodes[name])
        print(f"{name:<26} {wall:8.1f} {dec:9.2f} {min(decodes[name]):7.2f} {dec / base:11.2f}x  "
              f"{'yes' if outputs[name] == reference else 'no'}")
    return 0

