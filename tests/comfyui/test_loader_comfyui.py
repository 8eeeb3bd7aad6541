"""PiD Loader inside ComfyUI's model machinery: quantized files, fp8 weight dtypes, partial loads,
unload / reload (docs/DESIGN.md §12). Skipped unless COMFYUI_PATH and COMFYUI_PY are set.

The quantized files are made by ComfyUI's own quantization code (comfy.quant_ops) in
loader_checks.py, run by ComfyUI's Python, which loads and decodes them through PiD Loader and PiD
Decode themselves; the tests here read its figures.
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import pytest
import torch

from .comfy_harness import find_comfyui
from .test_comfyui_nodes import add_pid_decode, graph_base, save_image

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Image PSNR (dB, images in [-1, 1]) of each stored form against the bf16 file's decode, with margin
# below what the narrow random model gives (mxfp8 36, int8 convrot 45, fp8 e4m3 29, e5m2 24).
MIN_PSNR = {"mxfp8": 30.0, "int8_convrot": 40.0, "int8_convrot_per_layer": 40.0, "fp8_e4m3fn": 25.0,
            "fp8_e5m2": 20.0, "odd_mxfp8": 27.0, "odd_nvfp4": 17.0}  # odd widths: mxfp8 32, nvfp4 21.5


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    found, reason = find_comfyui()
    if found is None:
        pytest.skip(reason)
    comfy_path, comfy_py = found
    work = tmp_path_factory.mktemp("loader-checks")
    run = subprocess.run([comfy_py, str(HERE / "loader_checks.py"), str(comfy_path), str(REPO), str(work)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"loader_checks.py failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("name", ["mxfp8", "int8_convrot", "int8_convrot_per_layer"])
def test_quantized_files_load_and_decode_close_to_bf16(checks, name):
    result = checks[name]
    assert checks["quantized_layers"][name] > 0
    assert result["quantized_tensors"] == checks["quantized_layers"][name], "layers were not kept quantized"
    assert result["finite"]
    assert result["psnr"] >= MIN_PSNR[name], result
    assert result["standalone_max_diff"] == 0.0, "pid_core dequantizes differently from ComfyUI"


@pytest.mark.parametrize("name", ["odd_mxfp8", "odd_nvfp4"])
def test_widths_off_the_layout_block_load_at_their_own_widths(checks, name):
    """Every matmul weight stored padded to the layout's blocks (hidden 48 as 64, ...): PiD Loader builds
    the network at the file's widths, ComfyUI's layers read the padded weights at those widths, and PiD
    Decode decodes close to the bf16 file; pid_core alone (mxfp8) reads the same widths and weights."""
    result = checks[name]
    assert result["config_matches"], result
    assert result["quantized_tensors"] == checks["quantized_layers"][name] > 0
    assert result["padded_tensors"] == result["quantized_tensors"], "the file was meant to be stored padded"
    assert result["logical_shapes"], result
    assert result["finite"]
    assert result["psnr"] >= MIN_PSNR[name], result
    if name == "odd_mxfp8":
        assert result["standalone_config_matches"]
        assert result["standalone_max_diff"] == 0.0, "pid_core dequantizes differently from ComfyUI"


@pytest.mark.parametrize("dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_weight_dtypes(checks, dtype):
    assert checks[dtype]["fp8_parameters"] > 0
    assert checks[dtype]["psnr"] >= MIN_PSNR[dtype], checks[dtype]


def test_partial_load_decodes_the_full_load_image(checks):
    partial = checks["partial"]
    assert checks["bf16_finite"]
    assert partial["lowvram"] and 0 < partial["loaded_bytes"] < partial["budget"], partial
    assert partial["max_abs_diff"] == 0.0


def test_unload_and_reload_give_the_same_image(checks):
    assert checks["reload"] == {"same_patcher": 0.0, "new_load": 0.0}


def test_unload_between_prompts(comfyui, model_files):
    """Two prompts with every model unloaded in between (POST /free), the second loading the (bf16) file
    again under another weight_dtype name, so that PiD Loader and PiD Decode run again: the same image."""
    images = []
    for run, weight_dtype in enumerate(("auto", "bf16")):
        g = graph_base(model_files, steps=3, stop=2, finish=False)
        add_pid_decode(g, model_files, latent=("early", 0), steps=1)
        g["pid"]["inputs"]["weight_dtype"] = weight_dtype
        save_image(g, "s_img", ["decode", 0], f"reload_{run}.safetensors")
        comfyui.run(g)
        images.append(comfyui.read_tensors(f"reload_{run}.safetensors")[0]["image"])
        comfyui.free()
    assert torch.isfinite(images[0]).all()
    assert torch.equal(images[0], images[1])
