"""What a ComfyUI MODEL is, in PiD's terms: its backbone and the noise frame of its sampler's state.

ComfyUI names these by its own classes (comfy/supported_models.py, comfy/model_sampling.py); the tables
map those names to pid_core's. (The latent spaces, ComfyUI's latent_format classes included, are
pid_core.latent_formats' table.) Plain tables: testable without ComfyUI.
"""

from __future__ import annotations

from typing import Iterable, Optional

# Backbone (pid_core.variants name) by ComfyUI model config class, matched along the class's MRO so
# SDXL derivatives count as SDXL. Value: (backbone, distilled). A distilled (few-step) model is finished
# to x0 before PiD, as the reference does for turbo models.
BACKBONE_BY_MODEL_CONFIG = {
    "FluxSchnell": ("flux", True),
    "FluxInpaint": ("flux", False),
    "Flux2": ("flux2", False),
    "Flux": ("flux", False),
    "ZImagePixelSpace": (None, False),
    "ZImage": ("zimage", False),
    "SD3": ("sd3", False),
    "SDXL": ("sdxl", False),
    "QwenImage": ("qwenimage", False),
}

# Noise frame of the sampler's state, by ComfyUI model_sampling class, matched along the MRO, most
# derived first: IMG_TO_IMG_FLOW subclasses CONST with other semantics.
NOISE_FRAME_BY_MODEL_SAMPLING = {
    "IMG_TO_IMG_FLOW": None,
    "IMG_TO_IMG": None,
    "COSMOS_RFLOW": None,
    "V_PREDICTION_DDPM": None,
    "CONST": "flow",  # x_t = (1 - s) x0 + s eps
    "EPS": "euler",  # x = x0 + s eps (k-diffusion frame); V_PREDICTION, EDM and X0 share it
}


def backbone_for_model_config(mro_names: Iterable[str]) -> tuple[Optional[str], bool]:
    """(backbone, distilled) from the class names of a ComfyUI model config, most derived first."""
    return next((BACKBONE_BY_MODEL_CONFIG[n] for n in mro_names if n in BACKBONE_BY_MODEL_CONFIG), (None, False))


def noise_frame_for_model_sampling(mro_names: Iterable[str]) -> Optional[str]:
    """"flow", "euler" or None from the class names of a model_sampling object, most derived first."""
    return next((NOISE_FRAME_BY_MODEL_SAMPLING[n] for n in mro_names if n in NOISE_FRAME_BY_MODEL_SAMPLING), None)
