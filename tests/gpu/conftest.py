"""The GPU kit's tests (marked `gpu`): the real ComfyUI with this pack on CUDA, started by tests/gpu/run.sh.

Without CUDA every `gpu` test is skipped with the reason, before any fixture runs: CI (no GPU) skips
them, and PID_REQUIRE_COMFYUI=1 (which fails the ComfyUI tests when ComfyUI is missing) does not apply
to them, since a machine without a GPU is not a broken setup. `run.sh --dry-run` sets
PID_GPU_REHEARSAL=1: the same tests on the CPU with narrow checkpoints and small sizes, to check the
kit's plumbing before a GPU session (CUDA-only checks skip there, each with its reason).
"""

from __future__ import annotations

import json
import os

import pytest

NO_CUDA = "needs CUDA: the GPU kit runs these on a GPU machine (tests/gpu/run.sh); skipped without a GPU"


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def rehearsal() -> bool:
    return os.environ.get("PID_GPU_REHEARSAL") == "1"


def pytest_runtest_logreport(report):
    """Each finished test as a JSON line in PID_GPU_WORK/results/tests.jsonl (outcome, seconds, figures,
    the first line of a failure), so a run stopped at its time cap still reports what finished
    (report.py reads it when pytest's JUnit XML is missing)."""
    work = os.environ.get("PID_GPU_WORK")
    if not work or not report.nodeid.startswith("tests/gpu/test_gpu_comfyui.py"):
        return
    if report.when != "call" and report.outcome == "passed":
        return  # setup and teardown only count when they fail or skip
    message = ""
    if report.outcome != "passed":
        longrepr = report.longrepr
        message = longrepr[2] if isinstance(longrepr, tuple) else getattr(longrepr, "reprcrash", None)
        message = message if isinstance(message, str) else getattr(message, "message", str(longrepr))
    results = os.path.join(work, "results")
    os.makedirs(results, exist_ok=True)
    with open(os.path.join(results, "tests.jsonl"), "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                            "seconds": report.duration, "figures": dict(report.user_properties),
                            "message": message.splitlines()[0] if message else ""}, default=str) + "\n")


def pytest_collection_modifyitems(config, items):
    if cuda_available() or rehearsal():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kit():
    from .kit import Kit

    found, reason = Kit.from_env()
    if found is None:
        pytest.skip(reason)
    found.results.mkdir(parents=True, exist_ok=True)
    return found


@pytest.fixture
def needs_cuda(kit):
    """For the checks that only mean something on a GPU (device memory, kernels): skipped in a rehearsal."""
    if kit.rehearsal:
        pytest.skip("a CUDA-only check: the CPU rehearsal skips it")


@pytest.fixture(scope="session")
def models_base(kit):
    return kit.prepare_models_base()


@pytest.fixture(scope="session")
def cuda_server(kit, models_base):
    """ComfyUI with its default settings on the GPU (dynamic VRAM on NVIDIA), for the whole session."""
    with kit.server("default") as server:
        yield server
