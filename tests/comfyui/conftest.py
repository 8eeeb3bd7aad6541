"""Fixtures for the ComfyUI integration tests (skipped unless COMFYUI_PATH and COMFYUI_PY are set).

See comfy_harness.py for what the session fixture sets up, and SETUP.md for the environment.
"""

import subprocess

import pytest

from .comfy_harness import (
    FLUX_FILE, GEMMA_FILE, PID_FILE, TEACHER_FILE, VAE_FILE, find_comfyui, prepare_base_directory, start_server,
)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    found, reason = find_comfyui()
    if found is None:
        pytest.skip(reason)
    comfy_path, comfy_py = found
    base = tmp_path_factory.mktemp("comfyui-base")
    try:
        prepare_base_directory(base, comfy_path, comfy_py)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"could not make the tiny test models with {comfy_py}:\n{(e.stdout or b'').decode(errors='replace')}")
    server = start_server(comfy_path, comfy_py, base)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_files():
    return {"flux": FLUX_FILE, "vae": VAE_FILE, "pid": PID_FILE, "teacher": TEACHER_FILE, "gemma": GEMMA_FILE}
