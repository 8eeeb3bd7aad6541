"""Several processes, one job: torchrun's ranks, their process group, and the two ways they share work.

Started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and
MASTER_PORT), a command joins torch.distributed's process group for its duration: NCCL when the ranks
compute on CUDA (one GPU per local rank), gloo on the CPU. Started plainly, everything runs in one
process and torch.distributed is never touched.

  decode-many   the ranks take disjoint shares of the items (`shard_by_cost`); they exchange only the
                item list at the start and their counts at the end.
  decode        the ranks share one image's tile batches (`TileParallel`): each runs its share of
                every round and all of them fuse every tile's velocity in the single-process order,
                so the image is bit-identical to the one-process tiled decode (docs/DESIGN.md §14).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from .checks import require_device
from .errors import PidError
from .wording import term


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among torchrun's processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def label(self) -> str:
        """A prefix for per-rank progress lines ('' in one process)."""
        return f"[rank {self.rank}/{self.world_size}] " if self.several else ""


def ranks_from_environment(environ=None) -> Ranks:
    """The ranks torchrun announced in the environment; one process when it did not start us."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return Ranks()
    try:
        world = int(env["WORLD_SIZE"])
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise PidError("RANK, WORLD_SIZE, LOCAL_RANK must be whole numbers (set by torchrun).") from None
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise PidError(f"Inconsistent torchrun environment: RANK {rank}, WORLD_SIZE {world}, "
                       f"LOCAL_RANK {local_rank}, LOCAL_WORLD_SIZE {local_world}.")
    return Ranks(rank, world, local_rank, local_world)


_joined = Ranks()  # the ranks of the process group this process is in (one process when none)


def current() -> Ranks:
    """The ranks of the session this process has joined (`session`); rank 0 of 1 outside one."""
    return _joined


def compute_device(requested: Optional[str] = None) -> torch.device:
    """The device this process computes on: the one asked for (default: CUDA when available, else the
    CPU). Under torchrun each local rank takes its own GPU (cuda:LOCAL_RANK) unless an index is given."""
    ranks = ranks_from_environment()
    device = require_device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and ranks.several:
        count = torch.cuda.device_count()
        if ranks.local_rank >= count:
            raise PidError(f"torchrun started {ranks.local_world_size} processes on this machine but it has "
                           f"{count} GPU(s): use --nproc-per-node {count} or fewer.")
        device = torch.device("cuda", ranks.local_rank)
    return device


def one_thread_per_cpu_rank(device: torch.device, environ=None) -> None:
    """Under torchrun on the CPU, compute with one thread per rank unless OMP_NUM_THREADS says otherwise.

    torchrun gives its workers one thread when it starts several but leaves a single worker torch's
    default (every core). CPU kernels round differently with different thread counts (each thread's
    share ends in a scalar tail, and some matmuls split their sums), so without this a 1-rank and a
    2-rank run would differ in the last bit. With it, any number of CPU ranks computes like
    `OMP_NUM_THREADS=1 python -m pid_core ...` (docs/DESIGN.md §14)."""
    env = os.environ if environ is None else environ
    if device.type == "cpu" and "WORLD_SIZE" in env and "OMP_NUM_THREADS" not in env:
        torch.set_num_threads(1)


@contextlib.contextmanager
def session(device: torch.device, *, timeout: Optional[timedelta] = None) -> Iterator[Ranks]:
    """Join torchrun's process group for the duration of the block and leave it after (NCCL for CUDA
    devices, gloo for the CPU); under torchrun on the CPU, one thread per rank (`one_thread_per_cpu_rank`).
    Without torchrun, or with one rank, there is no group to join.

    timeout: how long a collective waits for the slowest rank (torch's default: 30 minutes)."""
    global _joined
    ranks = ranks_from_environment()
    one_thread_per_cpu_rank(device)
    if not ranks.several or dist.is_initialized():
        yield _joined if dist.is_initialized() else ranks
        return
    options = {} if timeout is None else {"timeout": timeout}
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the object collectives use the current device
        dist.init_process_group("nccl", device_id=device, **options)
    else:
        dist.init_process_group("gloo", **options)
    _joined = ranks
    try:
        yield ranks
    finally:
        _joined = Ranks()
        dist.destroy_process_group()


def joins_torchrun(command: Callable) -> Callable:
    """A command-line command (args -> exit code) that joins torchrun's process group when started by
    it, on the device its --device asks for."""

    @functools.wraps(command)
    def run(args) -> int:
        with session(compute_device(getattr(args, "device", None))):
            return command(args)

    return run


# ---------------------------------------------------------------------------------- small collectives


def gather_objects(value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank; [value] in one process."""
    if not _joined.several:
        return [value]
    out = [None] * _joined.world_size
    dist.all_gather_object(out, value)
    return out


def from_main(value):
    """Rank 0's `value` (picklable) on every rank."""
    if not _joined.several:
        return value
    box = [value if _joined.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if _joined.several:
        dist.barrier()


def memory_budget(device) -> Optional[int]:
    """This rank's working-memory budget on `device` (tiling.device_memory_budget): the ranks of one
    machine share its CPU memory, so on the CPU each gets its share."""
    from .tiling import device_memory_budget

    budget = device_memory_budget(device)
    ranks = ranks_from_environment()
    if budget is not None and torch.device(device).type == "cpu":
        budget //= ranks.local_world_size
    return budget


def smallest(value: Optional[int]) -> Optional[int]:
    """The smallest of the ranks' values (None: unknown, ignored): ranks that must plan alike (the
    tiles of one image) plan for the most constrained of them."""
    known = [v for v in gather_objects(value) if v is not None]
    return min(known) if known else None


# ----------------------------------------------------------------------------------- sharing items


def shard_by_cost(costs: Sequence[float], world_size: int) -> list[list[int]]:
    """Indices of `costs` split into `world_size` shares of about equal total cost: largest first,
    each onto the least loaded share (ties: the lower rank). Deterministic, so every rank computes the
    same split; each share lists its indices in ascending order."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0.0] * world_size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += costs[i]
    return [sorted(s) for s in shares]


# ------------------------------------------------------------------------- sharing one image's tiles

Forward = Callable[[list], torch.Tensor]  # a batch of tiles -> its velocities [tiles x B, 3, h, w]


class TileParallel:
    """A batch runner for tiling.TiledVelocity that spreads the tile batches of every step over the
    ranks and gives every rank every batch's velocity (docs/DESIGN.md §14).

    Batches go in rounds of world_size: in round k rank r runs batch k * world_size + r, then the
    round's velocities are all-gathered (ranks without a batch in the last round send a blank) and
    yielded in batch order. Each batch is computed exactly as the one-process decode computes it (the
    same tiles together), and the fusion then adds the same terms in the same order on every rank: the
    state stays the same on all ranks and bit-identical to the one-process tiled decode. Memory beyond
    the one-process decode: one round's velocities (world_size batches of 3-channel tiles)."""

    def __init__(self, group=None):
        self.group = group

    def __call__(self, forward: Forward, batches: Sequence[list], blank: Callable[[int], torch.Tensor]):
        world, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self._check_same_plan(batches)
        full = len(batches[0])
        received = [blank(full) for _ in range(world)]
        for start in range(0, len(batches), world):
            send = blank(full).zero_()  # a short last batch, or none, is padded with zeros
            if start + rank < len(batches):
                v = forward(batches[start + rank])
                send[: v.shape[0]].copy_(v)
                del v
            dist.all_gather(received, send, group=self.group)
            del send
            # The consumer uses each batch before asking for the next, so the next round may reuse the buffers.
            for k, batch in enumerate(batches[start:start + world]):
                yield received[k][: received[k].shape[0] // full * len(batch)]

    def _check_same_plan(self, batches: Sequence[list]) -> None:
        """Every rank must cut the canvas alike, or the gathered velocities would not fit."""
        mine = [[(t.y0, t.x0, t.h, t.w) for t in batch] for batch in batches]
        everyone = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(everyone, mine, group=self.group)
        if any(other != mine for other in everyone):
            raise PidError("The ranks planned different tiles for this image (different memory budgets or "
                           f"options): give every rank the same {term.tiling}.")


def tile_runner() -> Optional[TileParallel]:
    """A TileParallel runner when this process is one of several in a session; None (run every batch
    here) in one process."""
    return TileParallel() if _joined.several else None


def say(text: str, *, file=None) -> None:
    """Print on rank 0 only (in one process: always)."""
    if _joined.is_main:
        print(text, file=file or sys.stdout, flush=True)
