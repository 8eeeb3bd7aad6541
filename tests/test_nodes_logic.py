"""The node logic that needs no ComfyUI (nodes/_common.py), and the pack's import surface."""

import ast
import importlib.util
import math
import pathlib
import sys

import pytest
import torch

from nodes import _common as c

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- ids and mappings -------------------------------------------------------------------------------

def test_node_ids_are_distinct_and_not_core():
    ids = [c.NODE_ID_EARLY_STOP, c.NODE_ID_LOADER, c.NODE_ID_DECODE, c.NODE_ID_ENCODE_DEGRADE]
    assert len(set(ids)) == 4
    assert "PiDConditioning" not in ids
    assert all(i.startswith("PixelDiffusionDecoder") for i in ids)


@pytest.mark.parametrize("cls,fmt", [("Flux", "flux"), ("SD3", "sd3"), ("SDXL", "sdxl"), ("Flux2", "flux2"),
                                     ("Wan21", "qwenimage"), ("Wan22", None), ("SDXL_Playground_2_5", None),
                                     ("SD15", None), (None, None)])
def test_latent_format_by_comfy_class_is_exact(cls, fmt):
    assert c.latent_format_for_comfy_class(cls) == fmt


def test_latent_format_names_are_pid_core_formats():
    from pid_core.latents import LATENT_FORMATS

    assert set(c.LATENT_FORMAT_NAMES) <= set(LATENT_FORMATS)
    assert set(c.LATENT_FORMAT_BY_COMFY_CLASS.values()) == set(c.LATENT_FORMAT_NAMES)


@pytest.mark.parametrize("mro,expected", [
    (["Flux", "BASE", "object"], ("flux", False)),
    (["FluxSchnell", "Flux", "BASE"], ("flux", True)),
    (["Flux2", "Flux", "BASE"], ("flux2", False)),
    (["SSD1B", "SDXL", "BASE"], ("sdxl", False)),
    (["ZImage", "Lumina2", "BASE"], ("zimage", False)),
    (["ZImagePixelSpace", "ZImage", "Lumina2"], (None, False)),
    (["Lumina2", "BASE"], (None, False)),
    (["QwenImage", "BASE"], ("qwenimage", False)),
    (["SD3", "BASE"], ("sd3", False)),
])
def test_backbone_by_model_config(mro, expected):
    assert c.backbone_for_model_config(mro) == expected


def test_backbones_are_pid_core_backbones():
    from pid_core.variants import recommended_stop_step

    for backbone, _ in c.BACKBONE_BY_MODEL_CONFIG.values():
        if backbone is not None:
            recommended_stop_step(backbone)  # raises for an unknown name


@pytest.mark.parametrize("mro,frame", [
    (["ModelSampling", "ModelSamplingFlux", "CONST", "object"], "flow"),
    (["ModelSampling", "ModelSamplingDiscrete", "EPS"], "euler"),
    (["ModelSampling", "ModelSamplingDiscrete", "V_PREDICTION", "EPS"], "euler"),
    (["ModelSampling", "IMG_TO_IMG_FLOW", "CONST"], None),
    (["ModelSampling", "COSMOS_RFLOW"], None),
])
def test_noise_frame(mro, frame):
    assert c.noise_frame_for_model_sampling(mro) == frame


# --- stop step ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("stop,total,steps,expected", [
    (24, 28, 28, 24), (24, 28, 20, 17), (24, 28, 7, 6), (24, 28, 3, 3), (26, 30, 30, 26), (46, 50, 8, 7),
    (44, 50, 50, 44), (24, 28, 1, 1), (46, 50, 4, 4),
])
def test_scale_stop_step(stop, total, steps, expected):
    assert c.scale_stop_step(stop, total, steps) == expected


def test_choose_stop_step_explicit_and_capped():
    assert c.choose_stop_step(10, 28, backbone=None, recommended=None) == 10
    assert c.choose_stop_step(40, 28, backbone="flux", recommended=(24, 28)) == 28


@pytest.mark.parametrize("auto", [0, -1])
def test_choose_stop_step_auto(auto):
    assert c.choose_stop_step(auto, 28, backbone="flux", recommended=(24, 28)) == 24
    assert c.choose_stop_step(auto, 20, backbone="flux", recommended=(24, 28)) == 17
    # turbo / klein: the reference decodes the final x0
    assert c.choose_stop_step(auto, 8, backbone="zimage-turbo", recommended=None) == 8
    assert c.choose_stop_step(auto, 4, backbone="flux", recommended=(24, 28), distilled=True) == 4
    # few-step runs (a turbo model that ComfyUI reports as its base model) hand PiD the final latent
    assert c.choose_stop_step(auto, 8, backbone="zimage", recommended=(46, 50)) == 8
    assert c.choose_stop_step(auto, c.FEW_STEPS + 1, backbone="zimage", recommended=(46, 50)) == 12


def test_choose_stop_step_errors_are_clear():
    with pytest.raises(c.NodeInputError, match="stop_at_step"):
        c.choose_stop_step(0, 20, backbone=None, recommended=None)
    with pytest.raises(c.NodeInputError, match="-5"):
        c.choose_stop_step(-5, 20, backbone="flux", recommended=(24, 28))
    with pytest.raises(c.NodeInputError):
        c.choose_stop_step(3, 0, backbone="flux", recommended=(24, 28))


def test_choose_stop_step_matches_pid_core_recommendations():
    from pid_core.variants import recommended_stop_step

    assert c.choose_stop_step(0, 28, backbone="flux", recommended=recommended_stop_step("flux")) == 24
    assert c.choose_stop_step(0, 30, backbone="sdxl", recommended=recommended_stop_step("sdxl")) == 26
    assert c.choose_stop_step(0, 50, backbone="qwenimage", recommended=recommended_stop_step("qwenimage")) == 44


# --- sigmas -------------------------------------------------------------------------------------------

def test_split_sigmas():
    sigmas = [1.0, 0.8, 0.5, 0.2, 0.0]
    assert c.split_sigmas(sigmas, 2) == (2, 0.5)
    assert c.split_sigmas(sigmas, 4) == (4, 0.0)
    assert c.split_sigmas(sigmas, 9) == (4, 0.0)  # past the end: the finished latent
    assert c.split_sigmas([], 3) == (0, 0.0)  # denoise 0
    assert c.split_sigmas([0.7], 3) == (0, 0.0)


def test_split_sigmas_uses_the_sigmas_really_run():
    # dpm_2 (discard penultimate): 5 steps are computed as 6 and the penultimate dropped
    full = [1.0, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0]
    used = full[:-2] + full[-1:]
    assert c.split_sigmas(used, 3) == (3, 0.5)
    # denoise 0.5 over 4 steps: the tail of an 8-step schedule
    eight = [1 - i / 8 for i in range(9)]
    tail = eight[-5:]
    assert c.split_sigmas(tail, 1) == (1, pytest.approx(0.375))


# --- frames ---------------------------------------------------------------------------------------------

def test_convert_state_frame_round_trip():
    x0, eps, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), 0.3
    flow = (1 - s) * x0 + s * eps
    euler, s_eu = c.convert_state_frame(flow, s, "flow", "euler")
    assert s_eu == pytest.approx(s / (1 - s))
    torch.testing.assert_close(euler, x0 + s_eu * eps)
    back, s_back = c.convert_state_frame(euler, s_eu, "euler", "flow")
    assert s_back == pytest.approx(s)
    torch.testing.assert_close(back, flow)
    same, s_same = c.convert_state_frame(flow, s, "flow", "flow")
    assert same is flow and s_same == s
    unknown, _ = c.convert_state_frame(flow, s, None, "flow")
    assert unknown is flow


def test_vp_to_euler_inverts_pid_core_sdxl_frame():
    from pid_core.latents import prepare_latent

    x0, eps, s = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), 0.4
    vp = math.sqrt(1 - s * s) * x0 + s * eps  # noise_latent's SDXL frame, in PiD space
    eu, s_eu = c.vp_to_euler(vp, s)
    raw = eu / 0.13025  # SDXL process_out
    z, sigma = prepare_latent(raw, "sdxl", s_eu, expected_channels=4)
    torch.testing.assert_close(z, vp, rtol=1e-5, atol=1e-5)
    assert float(sigma[0]) == pytest.approx(s, abs=1e-6)
    with pytest.raises(c.NodeInputError):
        c.vp_to_euler(vp, 1.0)


# --- LATENT metadata ------------------------------------------------------------------------------------

def test_metadata_round_trip_and_copy():
    samples = torch.zeros(1, 16, 4, 4)
    latent = {"samples": torch.ones(1, 16, 4, 4), "batch_index": [0], "downscale_ratio_spacial": 8}
    out = c.write_pid_metadata(latent, samples, sigma=0.25, latent_format="flux", backbone="flux")
    assert out is not latent and latent["samples"] is not samples
    assert out["samples"] is samples and out["batch_index"] == [0] and "downscale_ratio_spacial" not in out
    assert out[c.KEY_SIGMA] == 0.25 and out[c.KEY_FORMAT] == "flux" and out[c.KEY_BACKBONE] == "flux"
    meta, warning = c.read_pid_metadata(out)
    assert meta == {"sigma": 0.25, "latent_format": "flux", "backbone": "flux"} and warning is None
    # a node that copies the dict keeps it valid
    assert c.read_pid_metadata(dict(out))[0]["sigma"] == 0.25


def test_stale_metadata_is_ignored():
    out = c.write_pid_metadata({}, torch.zeros(1, 16, 4, 4), sigma=0.4, latent_format="flux")
    continued = dict(out)
    continued["samples"] = torch.ones(1, 16, 4, 4)  # e.g. another sampler finished it
    meta, warning = c.read_pid_metadata(continued)
    assert meta["sigma"] is None and meta["latent_format"] is None
    assert "ignored" in warning
    assert c.resolve_sigma(-1.0, continued)[0] == 0.0
    assert c.resolve_latent_format("auto", continued) == "auto"
    assert c.KEY_SIGMA not in c.strip_pid_metadata(out)


def test_resolve_sigma_and_format():
    out = c.write_pid_metadata({}, torch.zeros(1, 4, 4, 4), sigma=3.5, latent_format="sdxl")
    assert c.resolve_sigma(-1.0, out) == (3.5, "from the LATENT (pid_sigma)")
    assert c.resolve_sigma(0.1, out)[0] == 0.1
    assert c.resolve_sigma(0.0, out)[0] == 0.0  # 0 on the node means clean, not auto
    assert c.resolve_sigma(-1.0, {"samples": torch.zeros(1)})[0] == 0.0
    assert c.resolve_latent_format("auto", out) == "sdxl"
    assert c.resolve_latent_format("flux", out) == "flux"
    assert c.resolve_latent_format("auto", {"samples": torch.zeros(1)}) == "auto"


@pytest.mark.parametrize("channels,dim,fmt", [(4, 2, "sdxl"), (128, 2, "flux2"), (16, 3, "qwenimage"),
                                              (16, 2, None), (48, 3, None)])
def test_latent_format_for_vae(channels, dim, fmt):
    assert c.latent_format_for_vae(channels, dim) == fmt


def test_preview_image():
    x0 = torch.linspace(-1, 1, 2 * 3 * 40 * 100).reshape(2, 3, 40, 100)
    img = c.preview_rgb_uint8(x0, max_side=50)
    assert img.shape == (20, 50, 3) and img.dtype.name == "uint8"
    assert c.preview_rgb_uint8(x0[:, :, :8, :8]).shape == (8, 8, 3)


def test_memory_wanted_follows_the_plan():
    """What PiD Decode asks ComfyUI to free: the unlimited plan's working memory + the canvas state."""
    from pid_core.testing import narrow_config, random_model
    from pid_core.tiling import TileOptions

    model = random_model(narrow_config(layout="v1", latent_channels=16))
    auto = TileOptions()
    small = c.decode_memory_wanted(model, 1, 512, 512, auto)
    assert c.decode_memory_wanted(model, 1, 1024, 1024, auto) > small
    assert c.decode_memory_wanted(model, 2, 512, 512, auto) > small
    # tiles bound the network's part: a small manual tile asks for less than one pass at 4K
    whole = c.decode_memory_wanted(model, 1, 4096, 4096, TileOptions(mode="off"))
    tiled = c.decode_memory_wanted(model, 1, 4096, 4096, TileOptions(mode="manual", tile_px=512, max_batch_tiles=1))
    assert tiled < whole


# --- import surface -------------------------------------------------------------------------------------

def test_pack_root_imports_without_comfyui(monkeypatch):
    """ComfyUI imports the folder as a package; outside ComfyUI that import must work and stay light."""
    name = "pid_pack_root_under_test"
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    assert callable(module.comfy_entrypoint)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")


def test_pack_files_import_nothing_heavy_at_top_level():
    tree = ast.parse((ROOT / "__init__.py").read_text())
    top_imports = {alias.name.split(".")[0] for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
                   for alias in node.names}
    assert top_imports <= {"importlib", "logging", "os", "sys"}, top_imports
    init = ast.parse((ROOT / "nodes" / "__init__.py").read_text())
    assert not [n for n in init.body if isinstance(n, (ast.Import, ast.ImportFrom))]
