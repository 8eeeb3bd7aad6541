"""The GPU kit's tests (marked `gpu`): the real ComfyUI with this pack on CUDA, started by tests/gpu/run.sh.

Without CUDA every `gpu` test is skipped with the reason, before any fixture runs: CI (no GPU) skips
them, and PID_REQUIRE_COMFYUI=1 (which fails the ComfyUI tests when ComfyUI is missing) does not apply
to them, since a machine without a GPU is not a broken setup. `run.sh --dry-run` sets
PID_GPU_REHEARSAL=1: the same tests on the CPU with narrow checkpoints and small sizes, to check the
kit's plumbing before a GPU session (CUDA-only checks skip there, each with its reason).
"""

from __future__ import annotations

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
