"""Core ComfyUI's own PiD and this pack's PiD Decode on the same narrow random weights, latent and text
(CPU): both graphs of core_pid.py run and give images of the same size. The plumbing of the GPU kit's
core-vs-pack benchmark (tests/gpu/bench_core.py); no speed figures here.

Core's UNETLoader fixes PiD's released sizes, so core's model comes from PiDTestNarrowCorePiD (core's
model class and loader, the sizes read from the narrow file). Skipped unless COMFYUI_PATH and
COMFYUI_PY are set (failed instead under PID_REQUIRE_COMFYUI=1).
"""

from __future__ import annotations

import pytest
import torch

from pid_core.precision import psnr

from . import core_pid

LATENT_HW = (4, 6)  # -> 128 x 192 pixels (x 32)


@pytest.mark.parametrize("layout_file", ["pid", "teacher"])  # a v1 and a v1.5 narrow file
def test_core_and_pack_decode_the_same_inputs(comfyui, model_files, layout_file):
    name = model_files[layout_file]
    out_hw = (LATENT_HW[0] * 32, LATENT_HW[1] * 32)
    core = core_pid.core_graph({"class_type": "PiDTestNarrowCorePiD", "inputs": {"unet_name": name}},
                               out_hw=out_hw, seed=3, name=f"core_{layout_file}", latent_hw=LATENT_HW)
    pack = core_pid.pack_graph(name, seed=3, name=f"pack_{layout_file}", latent_hw=LATENT_HW, weight_dtype="fp32",
                               tiling="off")
    if layout_file == "teacher":  # the undistilled file decodes as a student here, like core's
        pack[f"pack_{layout_file}_image"]["inputs"]["sampler"] = "student"
    comfyui.run(core)
    comfyui.run(pack)
    core_result, core_image = core_pid.read_measurement(comfyui, f"core_{layout_file}")
    pack_result, pack_image = core_pid.read_measurement(comfyui, f"pack_{layout_file}")

    assert core_image.shape == pack_image.shape == (1, *out_hw, 3)
    for image in (core_image, pack_image):
        assert torch.isfinite(image).all() and image.std() > 0.01
    for result in (core_result, pack_result):
        assert result["seconds"] > 0 and result["device"] == "cpu" and result["peak_allocated"] is None
    assert any(m["model"] == "PiD" for m in core_result["loaded_models"]), core_result["loaded_models"]
    assert any(m["model"] == "PidNet" for m in pack_result["loaded_models"]), pack_result["loaded_models"]
    # the same network, text and latent; another schedule and other noise: alike, not equal
    similarity = psnr(core_image.permute(0, 3, 1, 2) * 2 - 1, pack_image.permute(0, 3, 1, 2) * 2 - 1)
    assert similarity > 5.0, similarity


CORE_SCHEDULE = """
import sys
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.model_base, comfy.samplers, comfy.supported_models
model_sampling = comfy.model_base.model_sampling(comfy.supported_models.PiD({"image_model": "pid"}),
                                                 comfy.model_base.ModelType.FLOW)
print(comfy.samplers.calculate_sigmas(model_sampling, "simple", 4).tolist())
"""


def test_core_schedule_is_not_the_released_one(comfy_install):
    """core_pid.CORE_SIGMAS (stated next to the benchmark's figures) is what core's graph samples."""
    import json
    import subprocess

    comfy_path, comfy_py = comfy_install
    run = subprocess.run([comfy_py, "-c", CORE_SCHEDULE], cwd=str(comfy_path), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    sigmas = json.loads(run.stdout.strip().splitlines()[-1])
    assert sigmas == pytest.approx(core_pid.CORE_SIGMAS, abs=1e-3)
    assert max(abs(a - b) for a, b in zip(sigmas, core_pid.RELEASED_SIGMAS)) > 0.04
