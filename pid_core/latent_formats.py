"""The latent spaces PiD takes, as one table: every fact about a format lives in its row here.

A row says what latent the user has (channels, the VAE's factor, 5-D or not), who makes it (the words
messages and menus use, ComfyUI's class of that latent space), how it maps to PiD's input space and
back (ComfyUI's process_in / process_out, same constants and order of operations: docs/DESIGN.md §5),
and its noise frame. The checkpoint registry (variants.py), the latent checks (latents.py), the
nodes (their format menus, the VAE and MODEL lookups of Encode-Degrade and KSampler Early Stop) and
the network's adapter (the FLUX.2 un-packing) all derive from it.

Formats that share a channel count and dimensionality (16-channel FLUX.1, SD3 and Qwen-Image-as-4-D)
cannot be told apart by shape: `same_shape(fmt)` is that ambiguity group, derived from the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import CheckpointError, LatentError
from .wording import term

# Wan 2.1 VAE per-channel statistics, which Qwen-Image's VAE shares (ComfyUI's Wan21 latent format,
# `latents_mean` / `latents_std`; the same 16 values are in the diffusers Wan / Qwen-Image VAE config).
WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

# FLUX.2 VAE BatchNorm epsilon used by PiD's normalization of raw FLUX.2 latents.
FLUX2_BN_EPS = 1e-4


class Flux2BNStats(NamedTuple):
    """The FLUX.2 VAE's BatchNorm statistics over the 128 packed channels."""

    running_mean: torch.Tensor  # [128]
    running_var: torch.Tensor  # [128]


def flux2_bn_stats_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> Flux2BNStats:
    """Read `bn.running_mean` / `bn.running_var` [128] from a FLUX.2 VAE state dict (any key prefix)."""
    keys = [k for k in state_dict if k == "bn.running_mean" or k.endswith(".bn.running_mean")]
    keys.sort(key=len)  # the top-level BatchNorm first
    for mean_key in keys:
        var_key = mean_key[: -len("running_mean")] + "running_var"
        mean, var = state_dict[mean_key], state_dict.get(var_key)
        if var is None or tuple(mean.shape) != (128,) or tuple(var.shape) != (128,):
            continue
        mean, var = mean.detach().float().cpu(), var.detach().float().cpu()
        if not (torch.isfinite(mean).all() and torch.isfinite(var).all() and (var >= 0).all()):
            raise CheckpointError(
                f"The FLUX.2 VAE statistics {mean_key} / {var_key} hold NaN, infinite or negative "
                "values; the VAE file is damaged. Download the FLUX.2 VAE again."
            )
        return Flux2BNStats(mean, var)
    raise CheckpointError(
        "This file has no FLUX.2 BatchNorm statistics (bn.running_mean and bn.running_var of 128 "
        "values), so it is not the FLUX.2 VAE. Load the FLUX.2 VAE file (flux2_ae.safetensors or "
        "ComfyUI's flux2-vae.safetensors) to normalize a raw 32-channel FLUX.2 latent."
    )


def patchify(z: torch.Tensor, f: int = 2) -> torch.Tensor:
    """[B, C, H, W] -> [B, C*f*f, H/f, W/f]: channel c*f*f + i*f + j takes pixel (f*h + i, f*w + j) of c.

    FLUX.2's "(c pi pj)" packing (f = 2); `unpatchify` is its inverse, which the v1.5 FLUX.2 adapter runs."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // f, f, w // f, f).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * f * f, h // f, w // f)


def unpatchify(z: torch.Tensor, f: int = 2) -> torch.Tensor:
    """[B, C*f*f, h, w] -> [B, C, h*f, w*f], the inverse of `patchify`."""
    b, c, h, w = z.shape
    z = z.reshape(b, c // (f * f), f, f, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // (f * f), h * f, w * f)


def _bn_view(stats: Flux2BNStats, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = stats.running_mean.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    var = stats.running_var.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    return mean, torch.sqrt(var + FLUX2_BN_EPS)


@dataclass(frozen=True)
class LatentFormat:
    """A latent space that PiD can take, and how to map it to PiD's input space and back."""

    name: str
    label: str  # who makes such latents: the words menus and messages use
    channels: int | None  # channels of the latent as the user has it (None: any)
    down_factor: int | None  # image pixels per cell of that latent (the VAE's factor)
    pid_channels: int | None  # channels after to_pid
    frame: str  # noise frame: "flow", "euler" (SDXL, EPS sampler) or "pid" (already converted)
    shift: float = 0.0  # process_in: (z - shift) * scale
    scale: float = 1.0
    mean: tuple[float, ...] | None = None  # per-channel process_in: (z - mean) * scale / std
    std: tuple[float, ...] | None = None
    patchify: int = 1  # 2: raw FLUX.2 latent, 2x2 packing + BatchNorm (needs the VAE's stats)
    video: bool = False  # also takes 5-D [B, C, 1, H, W] (Wan / Qwen-Image VAE): its VAE is 3-D
    comfy_class: str | None = None  # ComfyUI's latent_format class of this space (exact name), if any

    def to_pid(self, samples: torch.Tensor, bn_stats: Flux2BNStats | None = None) -> torch.Tensor:
        """Raw VAE space -> PiD input space (ComfyUI's process_in). Returns [B, C, h, w]."""
        x = self.image_latent(samples)
        if self.patchify > 1:
            mean, std = _bn_view(self._stats(bn_stats), x)
            return (patchify(x, self.patchify) - mean) / std
        if self.mean is not None:
            mean, std = self._per_channel(x)
            return (x - mean) * self.scale / std
        return (x - self.shift) * self.scale

    def from_pid(self, z: torch.Tensor, bn_stats: Flux2BNStats | None = None) -> torch.Tensor:
        """PiD input space -> raw VAE space (ComfyUI's process_out); 4-D, unsqueeze(2) for 5-D."""
        if z.ndim != 4 or (self.pid_channels is not None and z.shape[1] != self.pid_channels):
            raise LatentError(
                f"from_pid of format '{self.name}' takes a [B, {self.pid_channels}, h, w] latent, "
                f"got {list(z.shape)}."
            )
        if self.patchify > 1:
            mean, std = _bn_view(self._stats(bn_stats), z)
            return unpatchify(z * std + mean, self.patchify)
        if self.mean is not None:
            mean, std = self._per_channel(z)
            return z * std / self.scale + mean
        return z / self.scale + self.shift

    def _per_channel(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
        return mean, std

    def _stats(self, bn_stats: Flux2BNStats | None) -> Flux2BNStats:
        if bn_stats is None:
            raise LatentError(
                "A raw 32-channel FLUX.2 latent must be packed and normalized with the FLUX.2 VAE's BatchNorm "
                f"statistics, and none were given: give {term.flux2_stats}."
            )
        return bn_stats

    def image_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """Check the shape against this format; a 5-D single-frame latent becomes 4-D."""
        if not isinstance(samples, torch.Tensor):
            raise LatentError(f"The latent must be a torch tensor, got {type(samples).__name__}.")
        if samples.ndim == 5:
            if not self.video:
                video = ", ".join(f"'{f.name}'" for f in LATENT_FORMATS.values() if f.video)
                raise LatentError(
                    f"This latent is 5-D {list(samples.shape)} ([B, C, T, H, W], a video or Qwen-Image "
                    f"latent), but the latent format '{self.name}' ({self.label}) takes 4-D "
                    f"[B, C, H, W] latents. Set {term.latent_format} to {video} for Qwen-Image latents."
                )
            if samples.shape[2] != 1:
                raise LatentError(
                    f"This latent has {samples.shape[2]} frames ({list(samples.shape)}); PiD decodes "
                    "single images. Pass a single-frame latent [B, C, 1, H, W]."
                )
            samples = samples[:, :, 0]
        if samples.ndim != 4:
            raise LatentError(
                f"The latent has shape {list(samples.shape)}; PiD takes [B, C, H, W] "
                "(or [B, 16, 1, H, W] for Qwen-Image)."
            )
        if self.channels is not None and samples.shape[1] != self.channels:
            raise LatentError(format_mismatch(samples.shape[1], self))
        if self.patchify > 1 and (samples.shape[2] % self.patchify or samples.shape[3] % self.patchify):
            raise LatentError(
                f"A {self.label} latent is packed {self.patchify}x{self.patchify}, so its height and width must be "
                f"multiples of {self.patchify}; got {samples.shape[2]}x{samples.shape[3]}. Crop the image to a "
                f"multiple of {self.patchify * self.down_factor} pixels."
            )
        return samples


# ComfyUI's constants for each space (its latent formats SDXL, SD3, Flux, Flux2 and Wan21).
LATENT_FORMATS: dict[str, LatentFormat] = {
    f.name: f
    for f in (
        # FLUX.1, Z-Image (and Lumina2-family VAEs): ComfyUI's Flux.
        LatentFormat("flux", "FLUX.1 / Z-Image", 16, 8, 16, "flow", shift=0.1159, scale=0.3611, comfy_class="Flux"),
        LatentFormat("sd3", "SD3", 16, 8, 16, "flow", shift=0.0609, scale=1.5305, comfy_class="SD3"),
        LatentFormat("sdxl", "SDXL", 4, 8, 4, "euler", scale=0.13025, comfy_class="SDXL"),
        # ComfyUI's FLUX.2 VAE already packs 2x2 and applies the BatchNorm: identity.
        LatentFormat("flux2", "FLUX.2 / Klein", 128, 16, 128, "flow", comfy_class="Flux2"),
        # The raw VAE latent (diffusers Flux2KleinPipeline): pack and normalize as PiD does.
        LatentFormat("flux2_raw", "raw FLUX.2 VAE", 32, 8, 128, "flow", patchify=2),
        # Qwen-Image uses the Wan 2.1 VAE space.
        LatentFormat("qwenimage", "Qwen-Image", 16, 8, 16, "flow", mean=WAN21_MEAN, std=WAN21_STD, video=True,
                     comfy_class="Wan21"),
        # The RAE encoders already normalize their tokens.
        LatentFormat("dinov2", "DINOv2-RAE", 768, 16, 768, "flow"),
        LatentFormat("siglip", "SigLIP-2 Scale-RAE", 1152, 16, 1152, "flow"),
        # A latent already in PiD's input space and frame (e.g. from noise_latent).
        LatentFormat("pid", "already in PiD's input space", None, None, None, "pid"),
    )
}

# The formats a ComfyUI model or VAE produces, by ComfyUI's latent_format class name (exact names:
# ComfyUI's Flux subclasses SD3 and Wan22 subclasses Wan21, and those are other spaces), in table order.
COMFY_FORMATS: dict[str, str] = {f.comfy_class: f.name for f in LATENT_FORMATS.values() if f.comfy_class}


def get_latent_format(latent_format: str | LatentFormat) -> LatentFormat:
    if isinstance(latent_format, LatentFormat):
        return latent_format
    found = LATENT_FORMATS.get(str(latent_format).strip().lower())
    if found is None:
        raise LatentError(
            f"Unknown latent format {latent_format!r}. Choose one of: {', '.join(LATENT_FORMATS)}."
        )
    return found


def formats_with_channels(channels: int, names=None) -> list[LatentFormat]:
    """The formats (among `names`, default all) whose latents have this many channels."""
    return [f for f in LATENT_FORMATS.values() if f.channels == channels and (names is None or f.name in names)]


def same_shape(fmt: str | LatentFormat, names=None) -> list[LatentFormat]:
    """The ambiguity group of a format: the formats (among `names`) whose latents have its shape."""
    return formats_with_channels(get_latent_format(fmt).channels, names)


def looks_like(channels: int) -> str:
    """Who makes latents with this many channels, for messages ('' when no format has that many)."""
    return " / ".join(f.label for f in formats_with_channels(channels))


def format_by_channels(channels: int) -> str | None:
    """The only format whose latents have this many channels; None when several share it (16) or none."""
    found = formats_with_channels(channels)
    return found[0].name if len(found) == 1 else None


def pid_channels(channels: int) -> int:
    """Channels of a latent with this many channels once in PiD space (raw FLUX.2 gets packed)."""
    fits = formats_with_channels(channels)
    return fits[0].pid_channels if len(fits) == 1 else channels


def formats_for_vae(channels: int, video: bool, names=None) -> list[LatentFormat]:
    """The formats (among `names`) a VAE with this many latent channels can encode to: a 3-D (video)
    VAE only to 5-D formats, a 2-D one only to the others."""
    return [f for f in formats_with_channels(channels, names) if f.video == video]


def format_mismatch(channels: int, fmt: LatentFormat) -> str:
    """The message for a latent whose channels are not the chosen format's."""
    what = f" ({looks_like(channels)})" if looks_like(channels) else ""
    return (f"The latent has {channels} channels{what}, but the latent format '{fmt.name}' ({fmt.label}) takes "
            f"{fmt.channels}-channel latents. Set {term.latent_format} to 'auto' or to the format of the model that "
            "made the latent.")
