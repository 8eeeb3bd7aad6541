"""Integration harness: a real ComfyUI, started headless on CPU with this pack installed (used by conftest.py).

Set two variables to run these tests (setup_comfyui.sh prints them; see SETUP.md beside this file):

    COMFYUI_PATH  a ComfyUI tree (the folder with main.py)
    COMFYUI_PY    a Python that has ComfyUI's requirements and this pack's

Without them every test here is skipped; with PID_REQUIRE_COMFYUI=1 (set by .ci/run) they fail
instead, so a broken setup cannot pass as skipped. The session fixture `comfyui`:
* makes a temporary base directory (`--base-directory`) whose custom_nodes/ holds a symlink to this
  repository (the pack) and one to tests/comfyui/support_nodes (test-only nodes), and whose models/
  holds tiny random models made for the run (make_tiny_models.py): a FLUX.1-style diffusion model and an
  SDXL-family EPS UNet (UNETLoader), a FLUX.1-style 16-channel VAE and an SDXL-style 4-channel VAE
  (VAELoader), narrow random PiD checkpoints for 16- and 4-channel latents and one named undistilled
  (models/pid), a narrow Gemma-2 with its SentencePiece tokenizer (models/text_encoders);
* starts `main.py --cpu --listen 127.0.0.1 --port <free port>` with an in-memory database and API nodes
  off, waits for GET /system_stats, and stops the server at the end of the session.

HTTP goes to 127.0.0.1 through urllib (stdlib only); EventStream reads ComfyUI's websocket (progress,
previews, interruptions) with websocket-client (tests/requirements.txt).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
PACK_LINK_NAME = "comfyui-pid-decoder"
START_TIMEOUT_S = float(os.environ.get("COMFYUI_START_TIMEOUT", "180"))

FLUX_FILE = "pid_test_tiny_flux.safetensors"
VAE_FILE = "pid_test_tiny_flux_vae.safetensors"
PID_FILE = "pid_test_narrow_random.safetensors"
SDXL_FILE = "pid_test_tiny_sdxl_family.safetensors"
SDXL_VAE_FILE = "pid_test_tiny_sdxl_vae.safetensors"
PID_SDXL_FILE = "pid_test_narrow_random_sdxl.safetensors"
TEACHER_FILE = "pid_test_narrow_random_undistilled.safetensors"  # "undistilled": the teacher sampler
GEMMA_FILE = "pid_test_tiny_gemma2.safetensors"
MODEL_FILES = {"flux": FLUX_FILE, "vae": VAE_FILE, "pid": PID_FILE, "sdxl": SDXL_FILE, "sdxl_vae": SDXL_VAE_FILE,
               "pid_sdxl": PID_SDXL_FILE, "teacher": TEACHER_FILE, "gemma": GEMMA_FILE}

REQUIRED = os.environ.get("PID_REQUIRE_COMFYUI") == "1"


def unavailable(reason: str):
    """Skip the test; under PID_REQUIRE_COMFYUI=1 (CI) fail it, since there a missing ComfyUI, browser or
    test dependency means a broken setup."""
    import pytest

    if REQUIRED:
        pytest.fail(f"PID_REQUIRE_COMFYUI=1, but {reason}", pytrace=False)
    pytest.skip(reason)


def find_comfyui():
    path = os.environ.get("COMFYUI_PATH")
    py = os.environ.get("COMFYUI_PY")
    if not path or not py:
        return None, ("set COMFYUI_PATH (a ComfyUI tree) and COMFYUI_PY (its Python) to run the ComfyUI tests: "
                      "eval \"$(tests/comfyui/setup_comfyui.sh)\"; see tests/comfyui/SETUP.md")
    if not (pathlib.Path(path) / "main.py").is_file():
        return None, f"COMFYUI_PATH={path} has no main.py; point it at a ComfyUI checkout"
    if not os.access(py, os.X_OK):
        return None, f"COMFYUI_PY={py} is not an executable Python"
    return (pathlib.Path(path).resolve(), py), None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyError(AssertionError):
    """A prompt failed: validation (HTTP 400, node_errors), execution (execution_error) or an
    interruption (execution_interrupted)."""

    def __init__(self, message, *, status=None, body=None, node_errors=None, execution_error=None,
                 interrupted=None):
        super().__init__(message)
        self.status = status
        self.body = body
        self.node_errors = node_errors or {}
        self.execution_error = execution_error or {}
        self.interrupted = interrupted or {}


class ComfyServer:
    def __init__(self, base_url: str, base_dir: pathlib.Path, process: subprocess.Popen, log_path: pathlib.Path):
        self.base_url = base_url
        self.base_dir = base_dir
        self.output_dir = base_dir / "output"
        self.process = process
        self.log_path = log_path
        self.client_id = uuid.uuid4().hex

    # -- HTTP ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, payload=None, timeout: float = 30.0):
        """(status, parsed JSON or raw text). HTTP errors are returned, not raised."""
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read()
        text = body.decode("utf-8", "replace")
        try:
            return status, json.loads(text) if text else None
        except json.JSONDecodeError:
            return status, text

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, payload, **kw):
        return self.request("POST", path, payload, **kw)

    def object_info(self, node_id: str | None = None) -> dict:
        status, body = self.get("/object_info" + (f"/{node_id}" if node_id else ""))
        assert status == 200, body
        return body

    def free(self):
        """Unload models and clear caches (after replacing a model file: loaders cache by name)."""
        self.post("/free", {"unload_models": True, "free_memory": True})

    # -- prompts -----------------------------------------------------------------------------------
    def queue(self, graph: dict, client_id: str | None = None) -> str:
        """POST an API-format graph; returns the prompt id or raises ComfyError with node_errors.
        Progress and previews go to the websocket of `client_id` (default: this object's, never opened)."""
        status, body = self.post("/prompt", {"prompt": graph, "client_id": client_id or self.client_id})
        if status != 200:
            node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
            raise ComfyError(f"POST /prompt answered {status}: {json.dumps(body)[:2000]}", status=status,
                             body=body, node_errors=node_errors)
        return body["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll /history until the prompt finished; returns its history entry or raises ComfyError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            status, body = self.get(f"/history/{prompt_id}")
            if status == 200 and isinstance(body, dict) and prompt_id in body:
                entry = body[prompt_id]
                st = entry.get("status", {})
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    if st.get("status_str") == "error":
                        err, interrupted = {}, {}
                        for name, data in st.get("messages", []):
                            if name == "execution_error":
                                err = data
                            elif name == "execution_interrupted":
                                interrupted = data
                        if interrupted and not err:
                            raise ComfyError(f"interrupted in node {interrupted.get('node_type')}", body=entry,
                                             interrupted=interrupted)
                        raise ComfyError(f"execution failed in node {err.get('node_type')}: "
                                         f"{err.get('exception_type')}: {err.get('exception_message')}",
                                         execution_error=err, body=entry)
                    return entry
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.queue(graph), timeout=timeout)

    # -- outputs -------------------------------------------------------------------------------------
    def read_tensors(self, filename: str):
        """What a PiDTestSave* node wrote: ({name: tensor}, metadata dict)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.output_dir / filename
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
        return load_file(str(path)), meta

    # -- process -------------------------------------------------------------------------------------
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        try:
            lines = self.log_text().splitlines()
        except OSError:
            return ""
        return "--- ComfyUI log (tail) ---\n" + "\n".join(lines[-n:])

    def _check_alive(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"ComfyUI exited with code {self.process.returncode}\n{self.log_tail()}")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def _make_models(models: pathlib.Path, comfy_path: pathlib.Path, comfy_py: str):
    for sub in ("diffusion_models", "vae", "pid", "text_encoders"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [comfy_py, str(HERE / "make_tiny_models.py"), str(comfy_path),
         str(models / "diffusion_models" / FLUX_FILE), str(models / "vae" / VAE_FILE),
         str(models / "diffusion_models" / SDXL_FILE), str(models / "vae" / SDXL_VAE_FILE),
         str(models / "text_encoders" / GEMMA_FILE)],
        cwd=str(models), check=True, timeout=300, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    from pid_core.commands.random_checkpoints import make_random_checkpoint

    # narrow (hidden 64, 2 heads, 3 patch blocks), full text contract (300 x 2304)
    for name, layout, channels in ((PID_FILE, "v1", 16), (PID_SDXL_FILE, "v1", 4), (TEACHER_FILE, "v1.5", 16)):
        make_random_checkpoint(str(models / "pid" / name), layout=layout, latent_channels=channels, text_dim=2304,
                               text_tokens=300)


def start_server(comfy_path: pathlib.Path, comfy_py: str, base: pathlib.Path, extra_args=(), *, cpu: bool = True,
                 env: dict | None = None) -> ComfyServer:
    """Start ComfyUI on a free loopback port with `base` as its base directory (and `extra_args` on its
    command line); wait until it answers. `cpu=False` leaves out --cpu (the GPU kit: ComfyUI picks the
    GPU as its users' ComfyUI does); `env` adds to the server's environment."""
    port = _free_port()
    log_path = base / "comfyui.log"
    cmd = [comfy_py, "main.py", *(["--cpu"] if cpu else []), "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
           "--disable-api-nodes", "--disable-auto-launch", "--preview-method", "none", *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, cwd=str(comfy_path), stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ComfyServer(f"http://127.0.0.1:{port}", base, process, log_path)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            server._check_alive()
            try:
                status, _ = server.get("/system_stats", timeout=5)
                if status == 200:
                    return server
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"ComfyUI did not answer in {START_TIMEOUT_S}s\n{server.log_tail()}")
            time.sleep(0.5)
    except BaseException:
        server.stop()
        raise


def prepare_base_directory(base: pathlib.Path, comfy_path: pathlib.Path, comfy_py: str,
                           models_from: pathlib.Path | None = None) -> None:
    """custom_nodes/ with the pack and the test-only nodes (symlinks), models/ with tiny random models
    (or a symlink to the models/ of another base directory, `models_from`)."""
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    os.symlink(REPO, custom / PACK_LINK_NAME, target_is_directory=True)
    os.symlink(HERE / "support_nodes", custom / "pid_test_support_nodes", target_is_directory=True)
    if models_from is not None:
        os.symlink(models_from / "models", base / "models", target_is_directory=True)
    else:
        _make_models(base / "models", comfy_path, comfy_py)


class EventStream:
    """ComfyUI's websocket (/ws) for one new client id: its JSON events and binary frames, in order.

    Prompts queued with `queue` carry this client id, so their `progress`, `executing`, preview frames
    (binary: event type 1, then image type 1 = JPEG, then the image) and execution messages come here.
    A thread reads the socket into `events`: (type, data) for JSON events, ("binary", bytes) for frames.
    """

    PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE

    def __init__(self, server: ComfyServer, connect_timeout: float = 30.0):
        import websocket  # websocket-client

        self.server = server
        self.client_id = uuid.uuid4().hex
        url = server.base_url.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        self._ws = websocket.create_connection(url, timeout=connect_timeout)
        self._ws.settimeout(None)
        self.events: list[tuple[str, object]] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="comfyui-ws", daemon=True)
        self._thread.start()

    def _read(self):
        import websocket

        while True:
            try:
                opcode, data = self._ws.recv_data()
            except (websocket.WebSocketException, OSError):
                break
            if opcode == websocket.ABNF.OPCODE_TEXT:
                message = json.loads(data)
                event = (message.get("type"), message.get("data"))
            elif opcode == websocket.ABNF.OPCODE_BINARY:
                event = ("binary", bytes(data))
            else:
                continue
            with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def queue(self, graph: dict) -> str:
        return self.server.queue(graph, client_id=self.client_id)

    def wait_for(self, predicate, timeout: float = 120.0):
        """The first event (type, data) for which predicate(type, data) is true, waiting for it; an
        execution_error event before it raises at once (its prompt cannot get there any more)."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._changed:
            while True:
                for event in self.events[seen:]:
                    if predicate(*event):
                        return event
                    if event[0] == "execution_error":
                        raise ComfyError(f"execution failed before the awaited event: {json.dumps(event[1])[:2000]}",
                                         execution_error=event[1])
                seen = len(self.events)
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    raise TimeoutError(f"no such websocket event in {timeout}s; got {[e[0] for e in self.events]}\n"
                                       f"{self.server.log_tail()}")
                self._changed.wait(min(left, 1.0))

    def of_prompt(self, prompt_id: str, kind: str) -> list:
        """The data of every JSON event of type `kind` for this prompt."""
        with self._changed:
            return [d for t, d in self.events if t == kind and isinstance(d, dict) and d.get("prompt_id") == prompt_id]

    def previews(self) -> list[tuple[int, bytes]]:
        """(image type, image bytes) of every preview frame so far."""
        import struct

        with self._changed:
            frames = [d for t, d in self.events if t == "binary"]
        out = []
        for frame in frames:
            event, image_type = struct.unpack(">II", frame[:8])
            if event == self.PREVIEW_IMAGE:
                out.append((image_type, frame[8:]))
        return out

    def close(self):
        try:
            self._ws.close()
        finally:
            self._thread.join(timeout=10)
