"""nodes/comfy_models.py: ComfyUI's model classes in PiD's terms (plain tables, testable without ComfyUI;
the real-ComfyUI suite checks them against ComfyUI's models). ComfyUI's latent_format classes are in
pid_core.latent_formats' table (tests/test_latent_formats.py)."""

import sys
from pathlib import Path

import pytest

from pid_core.variants import recommended_stop_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
import comfy_models as cm  # noqa: E402


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
