"""Launching the command line in one process or under torchrun (gloo on the CPU), for the tests of
several ranks; run as a script it is a tile-parallel decode worker that saves its float image.

Every process runs one CPU thread: CPU matmul kernels may split their sums by thread count, so a
bit-for-bit comparison needs the same count in each process (torchrun gives each worker one).
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600  # a 2-core CI machine shared with other jobs: generous


def environment(one_thread: bool = True) -> dict:
    """one_thread False: OMP_NUM_THREADS unset (a plain process then uses every core)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "OMP_NUM_THREADS")}
    env.update(PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    return env


def command(args, ranks: int = 1, module: bool = True, torchrun: bool | None = None) -> list:
    """python -m pid_core ARGS, or under torchrun with `ranks` processes (torchrun default: ranks > 1)."""
    target = ["-m", "pid_core", *args] if module else list(args)
    if not (ranks > 1 if torchrun is None else torchrun):
        return [sys.executable, *target]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "--max-restarts=0", *target]


def run(args, ranks: int = 1, module: bool = True, cwd=None, torchrun: bool | None = None,
        one_thread: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command(args, ranks, module, torchrun), env=environment(one_thread), cwd=cwd or ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def worker(out_dir: str) -> None:
    """Decode two configurations with the tile batches shared by this process's ranks; save each
    rank's float result (or `single` without torchrun)."""
    import torch

    from pid_core import distributed
    from pid_core.decode import run_plan
    from pid_core.plan import plan_decode
    from pid_core.commands.random_checkpoints import narrow_config, random_model
    from pid_core.tiling import TileOptions

    torch.set_num_threads(1)
    model = random_model(narrow_config(layout="v1.5", latent_channels=16), seed=3)
    g = torch.Generator().manual_seed(7)
    latent = torch.randn(2, 16, 6, 12, generator=g)  # two images of 192 x 384 px
    text = torch.randn(2, 300, 2304, generator=g)
    results = {}
    with distributed.session(torch.device("cpu")) as ranks:
        # 2 x 5 tiles: at most 4 a batch -> 4, 4, 2 (two rounds on 2 ranks; in the second a short batch
        # and an idle rank); at most 16 -> one batch (rank 1 only receives)
        for batch_tiles in (4, 16):
            options = TileOptions(mode="manual", tile_px=128, overlap_px=64, max_batch_tiles=batch_tiles)
            plan = plan_decode(model, latent, text, latent_format="flux", sigma=torch.tensor([0.2, 0.5]),
                               tiling=options, steps=3)
            assert plan.tiles.tiled and len(plan.tiles.tiles) == 10, plan.tiles.reason
            results[batch_tiles] = run_plan(model, plan, seed=11, batch_runner=distributed.tile_runner())
            results[f"tiles per forward, at most {batch_tiles}"] = plan.tiles.batch_tiles
        name = f"rank{ranks.rank}" if ranks.several else "single"
    torch.save(results, os.path.join(out_dir, f"{name}.pt"))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    worker(sys.argv[1])
