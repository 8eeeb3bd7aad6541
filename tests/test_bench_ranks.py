"""The rank benchmark reads the decode times the commands print (the timing itself is never a test)."""

import os
import subprocess
import sys

from pid_core.commands.bench_ranks import command_line, decode_seconds

from conftest import ROOT


def test_reads_the_decode_time_of_each_command():
    decode = "tiling     : ...\ntime       : load 0.1s, decode 12.5s (2 steps, cpu)\n"
    assert decode_seconds(decode, "tiles") == 12.5
    one = "decode-many: 8 item(s): 8 done, 0 skipped (finished before), 0 failed\n  19.5s, 1 text(s) encoded or read\n"
    assert decode_seconds(one, "many") == 19.5
    two = ("decode-many: 8 item(s): 8 done, 0 skipped (finished before), 0 failed\n"
           "  rank 0: 4 done, 0 failed, 13.1s, 1 text(s)\n  rank 1: 4 done, 0 failed, 12.2s, 1 text(s)\n")
    assert decode_seconds(two, "many") == 13.1  # the slowest rank


def test_command_lines_are_the_real_commands():
    class Args:
        mode, steps, device, tile = "tiles", 2, "cpu", "256"

    one = command_line("/r", "/o", Args, 1)
    two = command_line("/r", "/o", Args, 2)
    assert one[1:4] == ["-m", "pid_core", "decode"] and "--tile" in one
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert two[-(len(one) - 1):] == one[1:]  # torchrun starts the same command


def test_runs_the_real_commands():
    """The whole benchmark at a tiny size: one process, one thread, and two ranks under torchrun decode the
    same image (the timing is never a test)."""
    done = subprocess.run([sys.executable, "-m", "pid_core", "bench-ranks", "--mode", "tiles", "--size", "128",
                           "--tile", "64", "--steps", "1", "--runs", "1"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()}
    assert rows.keys() >= {"1 process", "1 process, 1 thread", "2 ranks, 1 thread each"}
    assert rows["2 ranks, 1 thread each"].rstrip().endswith("yes")  # byte for byte the 1-thread image
