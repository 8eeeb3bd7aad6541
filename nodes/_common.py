"""Node logic that needs no ComfyUI: ids, choosing the stop step, sigmas, LATENT metadata.

Everything here is plain Python / torch so CI tests it without ComfyUI (tests/test_nodes_logic.py).
The node files translate between ComfyUI objects and these functions.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

CATEGORY = "PiD"

# Node ids: distinctive, never a core id (core has `PiDConditioning`) nor a likely id of another PiD pack.
NODE_ID_EARLY_STOP = "PixelDiffusionDecoderKSamplerEarlyStop"
NODE_ID_LOADER = "PixelDiffusionDecoderLoader"
NODE_ID_DECODE = "PixelDiffusionDecoderDecode"
NODE_ID_ENCODE_DEGRADE = "PixelDiffusionDecoderEncodeDegrade"

# The custom socket type that carries a loaded PiD model (a ComfyUI ModelPatcher around a PidNet).
PID_MODEL_TYPE = "PID_DECODER_MODEL"

# Model folder for PiD checkpoints (models/pid); files in diffusion_models/ are listed too.
PID_FOLDER = "pid"

# LATENT keys written by the early-stop and encode-degrade nodes and read by PiD Decode.
KEY_SIGMA = "pid_sigma"  # float: the noise level the samples carry (the sampler's sigma at the stop step)
KEY_FORMAT = "pid_latent_format"  # "flux" | "sd3" | "sdxl" | "flux2" | "qwenimage"
KEY_BACKBONE = "pid_backbone"  # e.g. "flux", "zimage", "sdxl" (pid_core.variants backbones), when known
KEY_SAMPLES_REF = "pid_samples_ref"  # the samples tensor the metadata describes (identity check)

# PiD's latent formats that a ComfyUI model can produce, by ComfyUI latent_format class name
# (comfy/latent_formats.py). Exact class names only: Flux subclasses SD3 and Wan22 subclasses Wan21,
# and those are different spaces.
LATENT_FORMAT_BY_COMFY_CLASS = {
    "Flux": "flux",  # FLUX.1, Z-Image, Lumina2, Chroma
    "SD3": "sd3",
    "SDXL": "sdxl",
    "Flux2": "flux2",
    "Wan21": "qwenimage",  # Qwen-Image uses the Wan 2.1 VAE space
}
LATENT_FORMAT_NAMES = ("flux", "sd3", "sdxl", "flux2", "qwenimage")

# Backbone (pid_core.variants name) by ComfyUI model config class (comfy/supported_models.py),
# matched along the class's MRO so SDXL derivatives count as SDXL. Value: (backbone, distilled).
# A distilled (few-step) model is finished to x0 before PiD, as the reference does for turbo models.
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

# Noise frame of the sampler's state, by ComfyUI model_sampling class (comfy/model_sampling.py).
# Matched along the MRO, most derived first: IMG_TO_IMG_FLOW subclasses CONST with other semantics.
NOISE_FRAME_BY_MODEL_SAMPLING = {
    "IMG_TO_IMG_FLOW": None,
    "IMG_TO_IMG": None,
    "COSMOS_RFLOW": None,
    "V_PREDICTION_DDPM": None,
    "CONST": "flow",  # x_t = (1 - s) x0 + s eps
    "EPS": "euler",  # x = x0 + s eps (k-diffusion frame); V_PREDICTION, EDM and X0 share it
}


class NodeInputError(ValueError):
    """A user-facing problem with a node's inputs; the message says what to do."""

    # ComfyUI shows "<module>.<class>" as the error type; the loaded pack's module path is a file path.
    __module__ = "PiD"


def latent_format_for_comfy_class(class_name: Optional[str]) -> Optional[str]:
    """PiD latent format for a ComfyUI latent_format class name, or None if PiD has none for it."""
    return LATENT_FORMAT_BY_COMFY_CLASS.get(class_name or "")


def backbone_for_model_config(mro_names: Iterable[str]) -> tuple[Optional[str], bool]:
    """(backbone, distilled) from the class names of a ComfyUI model config, most derived first."""
    for name in mro_names:
        if name in BACKBONE_BY_MODEL_CONFIG:
            return BACKBONE_BY_MODEL_CONFIG[name]
    return None, False


def noise_frame_for_model_sampling(mro_names: Iterable[str]) -> Optional[str]:
    """"flow", "euler" or None from the class names of a model_sampling object (most derived first)."""
    for name in mro_names:
        if name in NOISE_FRAME_BY_MODEL_SAMPLING:
            return NOISE_FRAME_BY_MODEL_SAMPLING[name]
    return None


def convert_state_frame(x, sigma: float, from_frame: Optional[str], to_frame: Optional[str]):
    """A sampler state at noise level sigma, from one noise frame to another: (x, sigma).

    flow: x = (1 - s) x0 + s eps (s in [0, 1]); euler: x = x0 + s eps (s >= 0). Both describe the same
    point: x_flow / (1 - s) = x0 + s / (1 - s) eps. Works in model space (after process_in), where
    the scaling is linear. Unknown frames pass through.
    """
    if from_frame == to_frame or from_frame is None or to_frame is None:
        return x, float(sigma)
    s = float(sigma)
    if from_frame == "flow" and to_frame == "euler":
        if s >= 1.0:
            raise NodeInputError("A state at sigma 1 (pure noise) has no Euler-frame equivalent; stop later.")
        return x / (1.0 - s), s / (1.0 - s)
    if from_frame == "euler" and to_frame == "flow":
        return x / (1.0 + s), s / (1.0 + s)
    raise NodeInputError(f"Unknown noise frames {from_frame!r} -> {to_frame!r}.")


def vp_to_euler(x, sigma: float):
    """A VP-frame state sqrt(1 - s^2) x0 + s eps -> the Euler frame x0 + s_eu eps: (x, s_eu).

    pid_core noises SDXL latents in PiD's VP frame; a LATENT with format 'sdxl' holds the Euler frame
    (what an SDXL sampler's state is), which PiD Decode converts back exactly."""
    s = float(sigma)
    if not 0.0 <= s < 1.0:
        raise NodeInputError(f"An SDXL latent can be noised to a sigma in [0, 1), got {s:g}.")
    keep = math.sqrt(1.0 - s * s)
    return x / keep, s / keep


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scale_stop_step(stop: int, total: int, steps: int) -> int:
    """A recommended stop step `stop` of `total` steps, for a run of `steps` steps (1..steps)."""
    if total <= 0 or steps <= 0:
        raise NodeInputError(f"steps must be positive (got {steps} of {total}).")
    return max(1, min(steps, round_half_up(steps * stop / total)))


# Auto stop runs few-step schedules to the end: turbo / distilled models (Z-Image-Turbo, FLUX.2 Klein),
# which ComfyUI cannot tell from their base models, are recommended to hand PiD their final latent.
FEW_STEPS = 12


def choose_stop_step(
    stop_at_step: int,
    steps: int,
    *,
    backbone: Optional[str],
    recommended: Optional[tuple[int, int]],
    distilled: bool = False,
) -> int:
    """The step at which to stop, 1..steps (steps = run to the end, a clean latent).

    stop_at_step >= 1 is taken as is (capped at steps). 0 or -1 ("auto") uses the backbone's
    recommended point (e.g. FLUX.1 24 of 28) scaled to `steps`; a distilled model, a backbone whose
    recommendation is "the final x0" (recommended None), or a run of at most FEW_STEPS steps runs to the end.
    """
    steps = int(steps)
    if steps < 1:
        raise NodeInputError(f"steps must be at least 1, got {steps}.")
    stop_at_step = int(stop_at_step)
    if stop_at_step >= 1:
        return min(stop_at_step, steps)
    if stop_at_step < -1:
        raise NodeInputError(
            f"stop_at_step {stop_at_step} is not valid: give a step from 1 to {steps}, or 0 / -1 for the "
            "model's recommended stop step."
        )
    if backbone is None:
        raise NodeInputError(
            "stop_at_step is 'auto' (0 or -1), but this model is not one PiD knows a recommended stop step "
            "for (FLUX.1, FLUX.2, SD3, SDXL, Qwen-Image, Z-Image). Set stop_at_step to a step number, "
            "e.g. about 85% of the steps."
        )
    if distilled or recommended is None or steps <= FEW_STEPS:
        return steps
    stop, total = recommended
    return scale_stop_step(stop, total, steps)


def split_sigmas(sigmas: Sequence[float], stop_step: int) -> tuple[int, float]:
    """(k, sigma_k) for the sigmas a sampler really uses (len = steps + 1, last usually 0).

    k is the stop step capped at the last index, sigma_k the level the state has after k steps.
    The sampler runs sigmas[:k+1] (stop), then sigmas[k:] (finish). An empty schedule (denoise 0)
    gives (0, 0.0): nothing runs and the latent is returned as is.
    """
    n = len(sigmas)
    if n <= 1:
        return 0, 0.0
    k = max(0, min(int(stop_step), n - 1))
    return k, float(sigmas[k])


# --- LATENT metadata ---------------------------------------------------------------------------

def write_pid_metadata(
    latent: dict,
    samples,
    *,
    sigma: float,
    latent_format: Optional[str],
    backbone: Optional[str] = None,
) -> dict:
    """A copy of `latent` with new samples and the PiD keys (extra keys survive nodes that copy)."""
    out = dict(latent)
    out.pop("downscale_ratio_spacial", None)
    out.pop("downscale_ratio_temporal", None)
    out["samples"] = samples
    out[KEY_SIGMA] = float(sigma)
    out[KEY_SAMPLES_REF] = samples
    if latent_format is not None:
        out[KEY_FORMAT] = latent_format
    else:
        out.pop(KEY_FORMAT, None)
    if backbone is not None:
        out[KEY_BACKBONE] = backbone
    else:
        out.pop(KEY_BACKBONE, None)
    return out


def strip_pid_metadata(latent: dict) -> dict:
    """A copy without PiD keys (for latents whose samples no longer match them)."""
    return {k: v for k, v in latent.items() if k not in (KEY_SIGMA, KEY_FORMAT, KEY_BACKBONE, KEY_SAMPLES_REF)}


def read_pid_metadata(latent: dict) -> tuple[dict, Optional[str]]:
    """({sigma, latent_format, backbone} found, warning or None).

    The keys only count while they describe the samples they were written for: a node that replaces
    `samples` but copies the dict (a sampler continuing the run, an upscale) keeps stale keys, so they
    are ignored when `samples` is not the tensor they were written with.
    """
    found = {"sigma": latent.get(KEY_SIGMA), "latent_format": latent.get(KEY_FORMAT), "backbone": latent.get(KEY_BACKBONE)}
    if found["sigma"] is None and found["latent_format"] is None:
        return {"sigma": None, "latent_format": None, "backbone": None}, None
    ref = latent.get(KEY_SAMPLES_REF)
    if ref is not None and ref is not latent.get("samples"):
        return {"sigma": None, "latent_format": None, "backbone": None}, (
            "This LATENT carries PiD metadata (sigma, format) from an earlier node, but its samples were "
            "changed since (another sampler or a latent edit), so the metadata is ignored: sigma 0 (clean) "
            "and the latent format from the input are used. Set sigma by hand if the latent is noisy."
        )
    return found, None


def resolve_sigma(sigma_input: float, latent: dict) -> tuple[float, str]:
    """(sigma, where from): a negative input means auto, i.e. the LATENT's pid_sigma, else 0 (clean)."""
    if sigma_input is not None and float(sigma_input) >= 0:
        return float(sigma_input), "set on the node"
    meta, _ = read_pid_metadata(latent)
    if meta["sigma"] is not None:
        return float(meta["sigma"]), "from the LATENT (pid_sigma)"
    return 0.0, "auto: no pid_sigma on the LATENT, taken as clean"


def resolve_latent_format(choice: str, latent: dict) -> str:
    """'auto' -> the LATENT's pid_latent_format when present, else 'auto' (pid_core detects)."""
    choice = (choice or "auto").strip().lower()
    if choice != "auto":
        return choice
    meta, _ = read_pid_metadata(latent)
    return meta["latent_format"] or "auto"


def latent_format_for_vae(latent_channels: int, latent_dim: int) -> Optional[str]:
    """The PiD latent format of a ComfyUI VAE, when its shape settles it (16-channel 2-D is ambiguous)."""
    if latent_channels == 4 and latent_dim == 2:
        return "sdxl"
    if latent_channels == 128 and latent_dim == 2:
        return "flux2"
    if latent_channels == 16 and latent_dim == 3:
        return "qwenimage"
    return None


def preview_rgb_uint8(x0, max_side: int = 512):
    """x0 [B, 3, H, W] in [-1, 1] -> the first sample as uint8 [h, w, 3] numpy, longest side <= max_side."""
    import torch

    img = x0[0:1].detach().float()
    h, w = img.shape[-2:]
    scale = max(h, w) / max_side
    if scale > 1:
        img = torch.nn.functional.interpolate(img, size=(max(1, int(h / scale)), max(1, int(w / scale))),
                                              mode="area")
    img = ((img[0].clamp(-1, 1) + 1) * 127.5).to(torch.uint8)
    return img.permute(1, 2, 0).cpu().numpy()


def decode_memory_wanted(model, batch: int, height: int, width: int, tile_options) -> int:
    """Bytes PiD Decode asks ComfyUI to free beside its weights (load_models_gpu's memory_required):
    the working memory of the plan it would run with no memory limit (the whole canvas, or tiles of the
    checkpoint's trained size) plus the sampler's canvas state. With less free, the auto plan then
    picks smaller or fewer tiles per forward, or keeps the state on the CPU."""
    from dataclasses import replace

    from pid_core.precision import weight_dtype
    from pid_core.tiling import canvas_memory_estimate, plan_decode

    variant = model.variant
    plan = plan_decode(model.config, (height, width), replace(tile_options, memory_budget_bytes=None),
                       dtype=weight_dtype(model), variant=variant, batch=batch)
    return plan.estimate_bytes + canvas_memory_estimate((height, width), batch)
