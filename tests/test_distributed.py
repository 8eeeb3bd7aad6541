"""Several ranks: torchrun's environment, balanced shares, and one image's tiles shared by 2 ranks (gloo on
the CPU) equal to the one-process tiled decode bit for bit."""

import os

import pytest
import torch
from safetensors.torch import save_file

import ranks_helper
from pid_core import distributed
from pid_core.errors import PidError
from pid_core.commands.random_checkpoints import make_random_checkpoint


def test_one_process_without_torchrun():
    ranks = distributed.ranks_from_environment({})
    assert (ranks.rank, ranks.world_size, ranks.several, ranks.is_main, ranks.label) == (0, 1, False, True, "")
    assert distributed.current() == distributed.Ranks()
    with distributed.session(torch.device("cpu")) as joined:  # no torchrun: nothing to join
        assert not joined.several and not torch.distributed.is_initialized()
        assert distributed.gather_objects(5) == [5] and distributed.from_main("x") == "x"
        assert distributed.smallest(None) is None and distributed.tile_runner() is None


def test_ranks_from_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    ranks = distributed.ranks_from_environment(env)
    assert (ranks.rank, ranks.world_size, ranks.local_rank, ranks.local_world_size) == (3, 8, 1, 2)
    assert ranks.several and not ranks.is_main and ranks.label == "[rank 3/8] "
    with pytest.raises(PidError, match="Inconsistent"):
        distributed.ranks_from_environment({"RANK": "8", "WORLD_SIZE": "8"})
    with pytest.raises(PidError, match="whole numbers"):
        distributed.ranks_from_environment({"RANK": "x", "WORLD_SIZE": "2"})


def test_cpu_ranks_of_one_machine_share_its_memory(monkeypatch):
    import pid_core.tiling

    monkeypatch.setattr(pid_core.tiling, "device_memory_budget", lambda device: 8 << 30)
    assert distributed.memory_budget("cpu") == 8 << 30
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.memory_budget("cpu") == 4 << 30
    assert distributed.memory_budget("meta") == 8 << 30  # a GPU of its own per rank


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shares_are_balanced_and_the_same_on_every_rank(world):
    g = torch.Generator().manual_seed(world)
    costs = (torch.randint(1, 100, (40,), generator=g) ** 2).tolist()
    shares = distributed.shard_by_cost(costs, world)
    assert shares == distributed.shard_by_cost(list(costs), world)
    assert sorted(i for share in shares for i in share) == list(range(len(costs)))
    assert all(share == sorted(share) for share in shares)
    loads = [sum(costs[i] for i in share) for share in shares]
    assert max(loads) - min(loads) <= max(costs)  # largest first onto the least loaded: within one item
    assert distributed.shard_by_cost([5, 1, 1, 1, 1, 1], 2) == [[0], [1, 2, 3, 4, 5]]
    assert distributed.shard_by_cost([], 2) == [[], []]


def test_two_ranks_share_the_tiles_of_one_image_bit_for_bit(tmp_path):
    """The 2-rank tile-parallel run_plan == the 1-process run_plan, as floats (two batches of 4 tile
    batches and one of a single batch; 2 images; 3 steps with re-noising)."""
    worker = os.path.join(ranks_helper.ROOT, "tests", "ranks_helper.py")
    for ranks in (1, 2):
        done = ranks_helper.run([worker, str(tmp_path)], ranks=ranks, module=False)
        assert done.returncode == 0, done.stderr[-3000:]
    single = torch.load(tmp_path / "single.pt")
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        for key in (4, 16):
            assert torch.equal(shared[key], single[key]), (rank, key)
    # the two configurations batch the tiles differently, so each sharing pattern is checked (their images may
    # or may not differ in the last bit: that depends on this CPU's kernels)
    assert (single["tiles per forward, at most 4"], single["tiles per forward, at most 16"]) == (4, 10)


@pytest.fixture(scope="module")
def decode_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    ckpt = root / "pid_flux1_512_to_2048_4step_bf16.safetensors"
    make_random_checkpoint(str(ckpt), layout="v1", latent_channels=16)
    g = torch.Generator().manual_seed(4)
    save_file({"latent": torch.randn(1, 16, 8, 12, generator=g), "pid_sigma": torch.tensor(0.3)}, str(root / "latent.safetensors"))
    save_file({"text_embedding": torch.randn(1, 300, 2304, generator=g)}, str(root / "text.safetensors"))
    return root


def test_decode_command_under_torchrun_writes_the_one_process_image(decode_files):
    root = decode_files
    args = ["decode", "--checkpoint", str(root / "pid_flux1_512_to_2048_4step_bf16.safetensors"),
            "--latent", str(root / "latent.safetensors"), "--text-embedding", str(root / "text.safetensors"),
            "--tile", "128", "--overlap", "64", "--steps", "2", "--seed", "5"]
    one = ranks_helper.run(args + ["--out", str(root / "one.png")])
    two = ranks_helper.run(args + ["--out", str(root / "two.png")], ranks=2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "tile batches shared by 2 ranks" in two.stdout and two.stdout.count("output     :") == 1  # rank 0 reports
    assert (root / "one.png").read_bytes() == (root / "two.png").read_bytes()


def test_torchrun_on_the_cpu_gives_one_and_two_ranks_the_same_threads(decode_files):
    """torchrun leaves a single worker every core but gives several one thread each; the command
    evens that out (one thread per CPU rank unless OMP_NUM_THREADS is set), so 1 and 2 ranks agree."""
    root = decode_files
    args = ["decode", "--checkpoint", str(root / "pid_flux1_512_to_2048_4step_bf16.safetensors"),
            "--latent", str(root / "latent.safetensors"), "--text-embedding", str(root / "text.safetensors"),
            "--tile", "128", "--overlap", "64", "--steps", "2", "--seed", "5"]
    for ranks in (1, 2):
        done = ranks_helper.run(args + ["--out", str(root / f"torchrun{ranks}.png")], ranks=ranks, torchrun=True,
                                one_thread=False)
        assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "torchrun1.png").read_bytes() == (root / "torchrun2.png").read_bytes()
    plain = ranks_helper.run(args + ["--out", str(root / "plain.png")])  # OMP_NUM_THREADS=1, no torchrun
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (root / "torchrun1.png").read_bytes() == (root / "plain.png").read_bytes()


def test_one_thread_per_cpu_rank_only_under_torchrun_and_unless_set():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        distributed.one_thread_per_cpu_rank(torch.device("cpu"), {})  # not torchrun
        distributed.one_thread_per_cpu_rank(torch.device("cpu"), {"WORLD_SIZE": "1", "OMP_NUM_THREADS": "2"})
        distributed.one_thread_per_cpu_rank(torch.device("meta"), {"WORLD_SIZE": "1"})  # not the CPU
        assert torch.get_num_threads() == 2
        distributed.one_thread_per_cpu_rank(torch.device("cpu"), {"WORLD_SIZE": "1"})
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
