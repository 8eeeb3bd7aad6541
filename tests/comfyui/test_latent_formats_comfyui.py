"""pid_core's latent spaces against ComfyUI's own (comfy/latent_formats.py), not against copied numbers.

For each ComfyUI latent format class a ComfyUI model can produce, ComfyUI's process_in / process_out of
a random latent (run by COMFYUI_PY) must equal pid_core's to_pid / from_pid. Skipped unless
COMFYUI_PATH and COMFYUI_PY are set.
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from pid_core.latent_formats import COMFY_FORMATS as LATENT_FORMAT_BY_COMFY_CLASS
from pid_core.latent_formats import LATENT_FORMATS

from .comfy_harness import find_comfyui

ROOT = pathlib.Path(__file__).resolve().parents[2]

SCRIPT = r"""
import sys
comfy_path, data = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_path)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.latent_formats as lf
from safetensors.torch import load_file, save_file
inputs = load_file(data)
out = {}
for key, z in inputs.items():
    fmt = getattr(lf, key)()
    out[key + ".in"] = fmt.process_in(z.clone()).clone()
    out[key + ".out"] = fmt.process_out(z.clone()).clone()
save_file(out, data + ".out")
"""


@pytest.fixture(scope="module")
def comfy_python():
    found, reason = find_comfyui()
    if found is None:
        pytest.skip(reason)
    return found


def test_process_in_and_out_equal_comfyui(comfy_python, tmp_path):
    comfy_path, comfy_py = comfy_python
    g = torch.Generator().manual_seed(0)
    frames = lambda fmt: (1,) if LATENT_FORMATS[fmt].video else ()  # noqa: E731  Wan / Qwen-Image: [B, C, 1, H, W]
    inputs = {cls: torch.randn(2, LATENT_FORMATS[fmt].channels, *frames(fmt), 3, 5, generator=g) * 3
              for cls, fmt in LATENT_FORMAT_BY_COMFY_CLASS.items()}
    data = tmp_path / "latents.safetensors"
    save_file(inputs, str(data))
    script = tmp_path / "formats.py"
    script.write_text(SCRIPT)
    run = subprocess.run([comfy_py, str(script), str(comfy_path), str(data)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    comfy = load_file(str(data) + ".out")
    for cls, fmt in LATENT_FORMAT_BY_COMFY_CLASS.items():
        ours = LATENT_FORMATS[fmt]
        z = inputs[cls]
        image_latent = z.squeeze(2) if ours.video else z
        torch.testing.assert_close(ours.to_pid(z), comfy[cls + ".in"].reshape(image_latent.shape), rtol=1e-6,
                                   atol=1e-6, msg=f"{cls} process_in")
        torch.testing.assert_close(ours.from_pid(image_latent), comfy[cls + ".out"].reshape(image_latent.shape),
                                   rtol=1e-6, atol=1e-6, msg=f"{cls} process_out")
