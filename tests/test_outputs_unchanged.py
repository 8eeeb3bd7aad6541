"""Every way into a decode returns the same bits as before a change of the code's shape: the digests of
tests/output_digests.py, recorded in tests/output_digests.json before the decode entry points were
reorganised (one CPU thread). CPU kernels round differently on other instruction sets, torch versions
and thread counts, so the comparison runs where the recording's fingerprint matches; the digests are
re-recorded (python tests/output_digests.py > tests/output_digests.json, with OMP_NUM_THREADS=1) only
together with a change that is meant to change outputs, and says so."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

RECORDED = json.loads((ROOT / "tests" / "output_digests.json").read_text())


def _run_digests() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "output_digests.py")], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_every_decode_path_gives_the_recorded_bits():
    now = _run_digests()
    if now["fingerprint"] != RECORDED["fingerprint"]:
        pytest.skip(f"digests recorded on {RECORDED['fingerprint']}, this machine is {now['fingerprint']}: "
                    "its kernels round differently")
    changed = sorted(name for name in RECORDED["digests"] if now["digests"].get(name) != RECORDED["digests"][name])
    assert not changed, f"outputs changed: {changed}"
    assert set(now["digests"]) == set(RECORDED["digests"])
