"""nodes/comfy_models.py: ComfyUI's model classes in PiD's terms (plain tables, testable without ComfyUI;
the real-ComfyUI suite checks them against ComfyUI's models)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pid_core.latents import LATENT_FORMATS
from pid_core.variants import recommended_stop_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
import comfy_models as cm  # noqa: E402


@pytest.mark.parametrize("cls,fmt", [("Flux", "flux"), ("SD3", "sd3"), ("SDXL", "sdxl"), ("Flux2", "flux2"),
                                     ("Wan21", "qwenimage"), ("Wan22", None), ("SDXL_Playground_2_5", None),
                                     ("SD15", None), (None, None)])
def test_latent_format_by_comfy_class_is_exact(cls, fmt):
    assert cm.LATENT_FORMAT_BY_COMFY_CLASS.get(cls) == fmt


def test_latent_format_names_are_pid_core_formats():
    assert set(cm.LATENT_FORMAT_NAMES) <= set(LATENT_FORMATS)
    assert set(cm.LATENT_FORMAT_BY_COMFY_CLASS.values()) == set(cm.LATENT_FORMAT_NAMES)


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
    assert cm.backbone_for_model_config(mro) == expected


def test_backbones_are_pid_core_backbones():
    for backbone, _ in cm.BACKBONE_BY_MODEL_CONFIG.values():
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
    assert cm.noise_frame_for_model_sampling(mro) == frame


@pytest.mark.parametrize("channels,dim,fmt", [(4, 2, "sdxl"), (128, 2, "flux2"), (16, 3, "qwenimage"),
                                              (16, 2, None), (48, 3, None)])
def test_latent_format_for_vae(channels, dim, fmt):
    assert cm.latent_format_for_vae(SimpleNamespace(latent_channels=channels, latent_dim=dim)) == fmt
