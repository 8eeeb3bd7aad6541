"""What the PiD nodes share: ids, the PiD model socket, errors as messages, the LATENT's PiD keys."""

from __future__ import annotations

import contextlib
from typing import Optional

from comfy_api.latest import io

from ..pid_core.errors import PidError
from ..pid_core.latent_formats import COMFY_FORMATS
from ..pid_core.latents import LatentMeta
from ..pid_core.wording import NODE, render

CATEGORY = "PiD"
# The formats a user can pick on the nodes: those a ComfyUI model or VAE produces.
LATENT_FORMAT_NAMES = tuple(COMFY_FORMATS.values())

# Node ids: distinctive, never a core id (core has `PiDConditioning`) nor a likely id of another PiD pack.
NODE_ID_EARLY_STOP = "PixelDiffusionDecoderKSamplerEarlyStop"
NODE_ID_LOADER = "PixelDiffusionDecoderLoader"
NODE_ID_DECODE = "PixelDiffusionDecoderDecode"
NODE_ID_ENCODE_DEGRADE = "PixelDiffusionDecoderEncodeDegrade"
NODE_ID_TEXT_ENCODE = "PixelDiffusionDecoderTextEncode"

# The socket that carries a loaded PiD model (a ComfyUI ModelPatcher around a PidNet).
PID_MODEL_TYPE = "PID_DECODER_MODEL"
PidModel = io.Custom(PID_MODEL_TYPE)

# LATENT keys written by KSampler Early Stop and PiD Encode-Degrade, read by PiD Decode.
KEY_SIGMA = "pid_sigma"  # float: the noise level the samples carry (the sampler's sigma at the stop step)
KEY_FORMAT = "pid_latent_format"  # the pid_core latent format of the samples
KEY_SAMPLES_REF = "pid_samples_ref"  # the samples tensor the keys describe (identity check)


class NodeInputError(ValueError):
    """A user-facing problem with a node's inputs; the message says what to do, its terms (wording.term)
    in a ComfyUI user's words."""

    # ComfyUI shows "<module>.<class>" as the error type; the loaded pack's module path is a file path.
    __module__ = "PiD"

    def __init__(self, message: str):
        super().__init__(render(message, NODE))


@contextlib.contextmanager
def user_errors():
    """Engine errors (PidError) reach ComfyUI as one clear message in a node's words (inputs, ComfyUI's
    nodes and folders), without the engine's traceback."""
    try:
        yield
    except PidError as e:
        raise NodeInputError(e.template) from None


def write_pid_metadata(latent: dict, samples, *, sigma: float, latent_format: Optional[str]) -> dict:
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
    return out


def read_pid_metadata(latent: dict) -> tuple[LatentMeta, Optional[str]]:
    """(what travels with the LATENT, a warning or None).

    The keys only count while they describe the samples they were written for: a node that replaces
    `samples` but copies the dict (a sampler continuing the run, an upscale) keeps stale keys, so they
    are ignored when `samples` is not the tensor they were written with.
    """
    sigma, fmt = latent.get(KEY_SIGMA), latent.get(KEY_FORMAT)
    if sigma is None and fmt is None:
        return LatentMeta(source="the LATENT"), None
    ref = latent.get(KEY_SAMPLES_REF)
    if ref is not None and ref is not latent.get("samples"):
        return LatentMeta(source="the LATENT"), (
            "This LATENT carries PiD metadata (sigma, format) from an earlier node, but its samples were "
            "changed since (another sampler or a latent edit), so the metadata is ignored: sigma 0 (clean) "
            "and the latent format from the input are used. Set sigma by hand if the latent is noisy."
        )
    return LatentMeta(sigma=sigma, latent_format=fmt, source="the LATENT"), None
