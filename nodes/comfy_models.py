"""What a ComfyUI MODEL or VAE is, in PiD's terms: latent format, backbone, noise frame.

ComfyUI names these by its own classes (comfy/latent_formats.py, comfy/supported_models.py,
comfy/model_sampling.py); the tables map those names to pid_core's.
"""

from __future__ import annotations

from typing import Iterable, Optional

# PiD's latent formats that a ComfyUI model can produce, by ComfyUI latent_format class name. Exact
# class names only: Flux subclasses SD3 and Wan22 subclasses Wan21, and those are different spaces.
LATENT_FORMAT_BY_COMFY_CLASS = {
    "Flux": "flux",  # FLUX.1, Z-Image, Lumina2, Chroma
    "SD3": "sd3",
    "SDXL": "sdxl",
    "Flux2": "flux2",
    "Wan21": "qwenimage",  # Qwen-Image uses the Wan 2.1 VAE space
}
# The formats a user can pick on the nodes.
LATENT_FORMAT_NAMES = tuple(dict.fromkeys(LATENT_FORMAT_BY_COMFY_CLASS.values()))

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


def _mro_names(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def describe_model(model) -> dict:
    """What PiD needs to know about a ComfyUI MODEL: latent format, backbone, distilled, noise frame."""
    base = model.model
    latent_format = LATENT_FORMAT_BY_COMFY_CLASS.get(type(base.latent_format).__name__)
    backbone, distilled = backbone_for_model_config(_mro_names(base.model_config))
    if latent_format is None:
        backbone = None
    frame = noise_frame_for_model_sampling(_mro_names(model.get_model_object("model_sampling")))
    return {"latent_format": latent_format, "backbone": backbone, "distilled": distilled, "frame": frame}


def latent_format_for_vae(vae) -> Optional[str]:
    """The PiD latent format of a ComfyUI VAE, when its shape settles it (16-channel 2-D is ambiguous)."""
    channels, dims = int(getattr(vae, "latent_channels", 0)), int(getattr(vae, "latent_dim", 2))
    return {(4, 2): "sdxl", (128, 2): "flux2", (16, 3): "qwenimage"}.get((channels, dims))
