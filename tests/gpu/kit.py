"""One run of the GPU kit: where its ComfyUI, models and results are, and the sizes it decodes.

run.sh sets the environment:

    COMFYUI_PATH, COMFYUI_PY   the ComfyUI tree and its Python (as for tests/comfyui)
    PID_GPU_WORK               the run's scratch folder: models/ (kit_checkpoints.json), results/, logs/
    PID_GPU_REHEARSAL=1        a rehearsal on the CPU (run.sh --dry-run): narrow checkpoints, small sizes,
                               ComfyUI with --cpu; it checks the kit's plumbing, never GPU behaviour

The sizes are chosen for the device tool's limits (10 minutes a command, 15 minutes a session): the
whole run.sh stays near 5 minutes on an H200 (README, "GPU").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import sys

HERE = pathlib.Path(__file__).resolve().parent
TESTS = HERE.parent
if str(TESTS) not in sys.path:  # the scripts run outside pytest: comfyui.* is tests/comfyui
    sys.path.insert(0, str(TESTS))

from comfyui.comfy_harness import ComfyServer, find_comfyui, prepare_base_directory, start_server  # noqa: E402

GIB = 1024 ** 3


@dataclasses.dataclass
class Kit:
    work: pathlib.Path
    rehearsal: bool
    comfy_path: pathlib.Path
    comfy_py: str
    manifest: dict

    # Output sides in pixels: `decode_px` for the loader, flag and low-VRAM checks (the 2K-to-4K
    # checkpoint's trained range starts at 2048), `big_px` for the interrupted decode and the benchmark's
    # second size (tiled by `auto`, beyond the trained 3840).
    @property
    def decode_px(self) -> int:
        return 256 if self.rehearsal else 2048

    @property
    def big_px(self) -> int:
        return 512 if self.rehearsal else 4096

    @property
    def models(self) -> pathlib.Path:
        return self.work / "models"

    @property
    def results(self) -> pathlib.Path:
        return self.work / "results"

    @property
    def logs(self) -> pathlib.Path:
        return self.work / "logs"

    def file(self, kind: str) -> str:
        """The checkpoint file name of `kind` (bf16, mxfp8, int8_convrot)."""
        return self.manifest["files"][kind]

    @classmethod
    def from_env(cls) -> tuple[Kit | None, str | None]:
        """(the kit, None), or (None, why there is none)."""
        found, reason = find_comfyui()
        if found is None:
            return None, reason
        work = os.environ.get("PID_GPU_WORK")
        if not work:
            return None, "PID_GPU_WORK is not set: run the GPU tests through tests/gpu/run.sh"
        manifest = pathlib.Path(work) / "models" / "kit_checkpoints.json"
        if not manifest.is_file():
            return None, f"{manifest} is missing: run the GPU tests through tests/gpu/run.sh"
        return cls(pathlib.Path(work), os.environ.get("PID_GPU_REHEARSAL") == "1", found[0], found[1],
                   json.loads(manifest.read_text())), None

    # -- servers ------------------------------------------------------------------------------------------
    def frontend_root(self) -> pathlib.Path:
        """A stand-in for the frontend package (not carried: no test uses the browser)."""
        root = self.work / "frontend"
        root.mkdir(parents=True, exist_ok=True)
        (root / "index.html").write_text("<!doctype html><title>GPU kit: no frontend</title>\n")
        return root

    def prepare_models_base(self) -> pathlib.Path:
        """The base folder whose models/ every server shares: the harness's tiny models and narrow PiDs,
        plus the kit's checkpoints (linked)."""
        base = self.work / "base"
        if not (base / "models").is_dir():
            prepare_base_directory(base, self.comfy_path, self.comfy_py)
        target = base / "models" / "diffusion_models"
        for name in self.manifest["files"].values():
            link = target / name
            if not link.exists():
                os.symlink(self.models / "diffusion_models" / name, link)
        return base

    @contextlib.contextmanager
    def server(self, name: str, extra_args=()):
        """ComfyUI with this pack on the kit's device (CUDA; the CPU in a rehearsal) and `extra_args`, the
        shared models; its log is kept in logs/<name>.log."""
        base = self.work / "servers" / name
        if base.exists():
            shutil.rmtree(base)
        base.mkdir(parents=True)
        prepare_base_directory(base, self.comfy_path, self.comfy_py, models_from=self.work / "base")
        args = ["--front-end-root", str(self.frontend_root()), *extra_args]
        server = start_server(self.comfy_path, self.comfy_py, base, args, cpu=self.rehearsal)
        try:
            yield server
        finally:
            server.stop()
            self.logs.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(server.log_path, self.logs / f"{name}.log")


def system_stats(server: ComfyServer) -> dict:
    """The first device of GET /system_stats (name, vram_total, vram_free, torch_vram_total/free)."""
    status, body = server.get("/system_stats")
    assert status == 200, body
    return body["devices"][0]
