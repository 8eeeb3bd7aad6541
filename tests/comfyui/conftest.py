"""Fixtures for the ComfyUI integration and browser tests (skipped unless COMFYUI_PATH and COMFYUI_PY
are set; failed instead of skipped under PID_REQUIRE_COMFYUI=1, as in CI).

See comfy_harness.py for what the session fixture sets up, and SETUP.md for the environment.
"""

import subprocess

import pytest

from .comfy_harness import (
    MODEL_FILES,
    EventStream,
    find_comfyui,
    prepare_base_directory,
    start_server,
    unavailable,
)


@pytest.fixture(scope="session")
def comfy_install():
    found, reason = find_comfyui()
    if found is None:
        unavailable(reason)
    return found


def _start(tmp_path_factory, comfy_install, name, *, models_from=None, extra_args=()):
    comfy_path, comfy_py = comfy_install
    base = tmp_path_factory.mktemp(name)
    try:
        prepare_base_directory(base, comfy_path, comfy_py, models_from=models_from)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"could not make the tiny test models with {comfy_py}:\n{(e.stdout or b'').decode(errors='replace')}")
    return start_server(comfy_path, comfy_py, base, extra_args=extra_args)


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory, comfy_install):
    server = _start(tmp_path_factory, comfy_install, "comfyui-base")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def comfyui_split_attention(tmp_path_factory, comfy_install, comfyui):
    """A second server, started with --use-split-cross-attention, sharing the first one's models
    (stopped after the module that uses it)."""
    server = _start(tmp_path_factory, comfy_install, "comfyui-split-attention", models_from=comfyui.base_dir,
                    extra_args=("--use-split-cross-attention",))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def model_files():
    return dict(MODEL_FILES)


@pytest.fixture
def events(comfyui):
    """ComfyUI's websocket for a fresh client id (needs websocket-client, tests/requirements.txt)."""
    try:
        import websocket  # noqa: F401
    except ImportError:
        unavailable("websocket-client is not installed (pip install -r tests/requirements.txt)")
    stream = EventStream(comfyui)
    try:
        yield stream
    finally:
        stream.close()
