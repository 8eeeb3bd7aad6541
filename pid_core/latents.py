"""Each backbone's latent space <-> PiD's input space, noising, and the SDXL frame change.

PiD takes the *normalized diffusion-space* latent: what the LDM denoises (docs/DESIGN.md §5). A ComfyUI LATENT
holds raw VAE space; ComfyUI's `latent_format.process_in` maps it to the diffusion space, and for
every backbone that is exactly PiD's input space. So `to_pid` here is
`process_in` and `from_pid` is `process_out`, with the same constants and the same operation order.

A latent taken from a sampler stopped early also carries noise at level sigma; `prepare_latent`
brings it into the frame PiD was trained on (docs/DESIGN.md §5):
* flow models (FLUX.1, SD3, FLUX.2, Qwen-Image, Z-Image): x_t = (1-s) x0 + s eps, s in [0, 1];
  ComfyUI's stopped sampler returns x_t / (1-s), which is undone here;
* SDXL (EPS, Euler frame): x_eu = x0 + s_eu eps; PiD wants the VP frame
  x_vp = x_eu / sqrt(s_eu^2 + 1), s_vp = s_eu / sqrt(s_eu^2 + 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import CheckpointError, LatentError, SigmaError
from .variants import VARIANTS, Variant

# Wan 2.1 VAE per-channel statistics, which Qwen-Image's VAE shares: ComfyUI
# comfy/latent_formats.py, class Wan21 (`latents_mean`, `latents_std`; comfyanonymous/ComfyUI).
# The same 16 values are the `latents_mean` / `latents_std` of the diffusers Wan / Qwen-Image VAE config.
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


def flux2_patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, 32, H, W] -> [B, 128, H/2, W/2]: channel c*4 + pi*2 + pj takes pixel (2h+pi, 2w+pj) of c.

    The FLUX.2 "(c pi pj)" packing; the v1.5 adapter's un-packing is its inverse.
    """
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return z.reshape(b, c * 4, h // 2, w // 2)


def flux2_unpatchify(z: torch.Tensor) -> torch.Tensor:
    """[B, 128, h, w] -> [B, 32, 2h, 2w], the inverse of `flux2_patchify`."""
    b, c, h, w = z.shape
    z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(b, c // 4, h * 2, w * 2)


def _bn_view(stats: Flux2BNStats, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = stats.running_mean.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    var = stats.running_var.to(device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
    return mean, torch.sqrt(var + FLUX2_BN_EPS)


@dataclass(frozen=True)
class LatentFormat:
    """A latent space that PiD can take, and how to map it to PiD's input space and back."""

    name: str
    label: str  # who makes such latents, for menus and messages
    channels: int | None  # channels of the latent as the user has it (None: any)
    down_factor: int | None  # image pixels per cell of that latent
    pid_channels: int | None  # channels after to_pid
    frame: str  # noise frame: "flow", "euler" (SDXL, EPS sampler) or "pid" (already converted)
    shift: float = 0.0  # process_in: (z - shift) * scale
    scale: float = 1.0
    mean: tuple[float, ...] | None = None  # per-channel process_in: (z - mean) * scale / std
    std: tuple[float, ...] | None = None
    patchify: int = 1  # 2: raw FLUX.2 latent, 2x2 packing + BatchNorm (needs the VAE's stats)
    video: bool = False  # also takes 5-D [B, C, 1, H, W] (Wan / Qwen-Image VAE)

    def to_pid(self, samples: torch.Tensor, bn_stats: Flux2BNStats | None = None) -> torch.Tensor:
        """Raw VAE space -> PiD input space (ComfyUI's process_in). Returns [B, C, h, w]."""
        x = self._image_latent(samples)
        if self.patchify > 1:
            mean, std = _bn_view(self._stats(bn_stats), x)
            return (flux2_patchify(x) - mean) / std
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
            return flux2_unpatchify(z * std + mean)
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
                "A raw 32-channel FLUX.2 latent must be packed and normalized with the FLUX.2 VAE's "
                "BatchNorm statistics, and none were given. Connect the FLUX.2 VAE, or pass the "
                "128-channel latent that ComfyUI's FLUX.2 VAE gives (latent format 'flux2')."
            )
        return bn_stats

    def _image_latent(self, samples: torch.Tensor) -> torch.Tensor:
        """Check the shape against this format; a 5-D single-frame latent becomes 4-D."""
        if not isinstance(samples, torch.Tensor):
            raise LatentError(f"The latent must be a torch tensor, got {type(samples).__name__}.")
        if samples.ndim == 5:
            if not self.video:
                raise LatentError(
                    f"This latent is 5-D {list(samples.shape)} ([B, C, T, H, W], a video or Qwen-Image "
                    f"latent), but the latent format '{self.name}' ({self.label}) takes 4-D "
                    "[B, C, H, W] latents. Use the format 'qwenimage' for Qwen-Image latents."
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
            raise LatentError(_format_mismatch(samples.shape[1], self))
        if self.patchify > 1 and (samples.shape[2] % 2 or samples.shape[3] % 2):
            raise LatentError(
                f"A raw FLUX.2 latent is packed 2x2, so its height and width must be even; got "
                f"{samples.shape[2]}x{samples.shape[3]}. Crop the image to a multiple of 16 pixels."
            )
        return samples


# The formats of docs/DESIGN.md §5, with ComfyUI's constants (comfy/latent_formats.py: SDXL, SD3, Flux, Flux2,
# Wan21).
LATENT_FORMATS: dict[str, LatentFormat] = {
    f.name: f
    for f in (
        # FLUX.1, Z-Image (and Lumina2-family VAEs): ComfyUI Flux.
        LatentFormat("flux", "FLUX.1 / Z-Image", 16, 8, 16, "flow", shift=0.1159, scale=0.3611),
        LatentFormat("sd3", "SD3", 16, 8, 16, "flow", shift=0.0609, scale=1.5305),
        LatentFormat("sdxl", "SDXL", 4, 8, 4, "euler", scale=0.13025),
        # ComfyUI's FLUX.2 VAE already packs 2x2 and applies the BatchNorm: identity.
        LatentFormat("flux2", "FLUX.2 / Klein", 128, 16, 128, "flow"),
        # The raw VAE latent (diffusers Flux2KleinPipeline): pack and normalize as PiD does.
        LatentFormat("flux2_raw", "raw FLUX.2 VAE", 32, 8, 128, "flow", patchify=2),
        LatentFormat("qwenimage", "Qwen-Image", 16, 8, 16, "flow",
                     mean=WAN21_MEAN, std=WAN21_STD, video=True),
        # The RAE encoders already normalize their tokens.
        LatentFormat("dinov2", "DINOv2-RAE", 768, 16, 768, "flow"),
        LatentFormat("siglip", "SigLIP-2 Scale-RAE", 1152, 16, 1152, "flow"),
        # A latent already in PiD's input space and frame (e.g. from noise_latent).
        LatentFormat("pid", "already in PiD's input space", None, None, None, "pid"),
    )
}


def get_latent_format(latent_format: str | LatentFormat) -> LatentFormat:
    if isinstance(latent_format, LatentFormat):
        return latent_format
    found = LATENT_FORMATS.get(str(latent_format).strip().lower())
    if found is None:
        raise LatentError(
            f"Unknown latent format {latent_format!r}. Choose one of: {', '.join(LATENT_FORMATS)}."
        )
    return found


def _formats_with_channels(channels: int) -> list[LatentFormat]:
    return [f for f in LATENT_FORMATS.values() if f.channels == channels]


# What a latent with this many channels most likely is; for messages only.
_LOOKS_LIKE = {c: " / ".join(f.label for f in _formats_with_channels(c))
               for c in {f.channels for f in LATENT_FORMATS.values() if f.channels}}
# The format a latent can only be in, given its channel count (16 channels: three formats).
_FORMAT_BY_CHANNELS = {c: fs[0].name for c in _LOOKS_LIKE if len(fs := _formats_with_channels(c)) == 1}


def _pid_channels(channels: int) -> int:
    """Channels of a latent with this many channels once in PiD space (raw FLUX.2 gets packed)."""
    fits = _formats_with_channels(channels)
    return fits[0].pid_channels if len(fits) == 1 else channels


def _checkpoint_mismatch(channels: int, expected: int) -> str:
    wants = f"{expected}-channel {_LOOKS_LIKE.get(expected, '')}".rstrip()
    fits = [v.name for v in VARIANTS.values() if v.latent_channels == _pid_channels(channels)]
    if channels not in _LOOKS_LIKE or not fits:
        return (
            f"This {channels}-channel latent is not one that any released PiD checkpoint takes; the "
            f"checkpoint expects {wants} latents. Give it a latent from a model it was made for, or "
            "decode this latent with its own VAE."
        )
    return (
        f"This is a {channels}-channel {_LOOKS_LIKE[channels]} latent, but the checkpoint expects "
        f"{wants} latents; load the {_LOOKS_LIKE[channels]} PiD checkpoint ({', '.join(fits)}), or "
        "give this checkpoint a latent from a model it was made for."
    )


def _format_mismatch(channels: int, fmt: LatentFormat, expected: int | None = None) -> str:
    what = f" ({_LOOKS_LIKE[channels]})" if channels in _LOOKS_LIKE else ""
    head = (
        f"The latent has {channels} channels{what}, but the latent format '{fmt.name}' "
        f"({fmt.label}) takes {fmt.channels}-channel latents. "
    )
    if expected is not None and _pid_channels(channels) != expected:
        return head + _checkpoint_mismatch(channels, expected)
    return head + "Set the latent format to 'auto' or to the format of the model that made the latent."


def _check_samples(samples: torch.Tensor) -> None:
    if not isinstance(samples, torch.Tensor) or not samples.is_floating_point():
        raise LatentError(
            f"The latent must be a floating-point torch tensor, got "
            f"{getattr(samples, 'dtype', type(samples).__name__)}."
        )
    if samples.ndim not in (4, 5):
        raise LatentError(
            f"The latent has shape {list(samples.shape)}; PiD takes [B, C, H, W] "
            "(or [B, 16, 1, H, W] for Qwen-Image)."
        )
    if samples.shape[0] == 0 or samples.numel() == 0:
        raise LatentError(f"The latent {list(samples.shape)} is empty; give at least one sample.")
    if samples.ndim == 5 and samples.shape[2] != 1:
        raise LatentError(
            f"This latent has {samples.shape[2]} frames ({list(samples.shape)}, [B, C, frames, H, W]); PiD decodes "
            "single images. Pass a single-frame latent [B, C, 1, H, W], e.g. samples[:, :, :1]."
        )
    if not torch.isfinite(samples).all():
        raise LatentError(
            "The latent holds NaN or infinite values: the sampler or VAE that made it failed "
            "(try full precision, another sampler, or a stop step below the last)."
        )


def _sigma_vector(sigma, batch: int, device: torch.device) -> torch.Tensor:
    """sigma as float32 [B]: one value for the batch, or one per sample."""
    if isinstance(sigma, (list, tuple)) or type(sigma).__module__ == "numpy":
        try:  # one value per sample, as a list or a numpy array
            sigma = torch.as_tensor(sigma, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise SigmaError(f"sigma must be a number or a list of numbers, got {sigma!r}.") from None
    if isinstance(sigma, torch.Tensor):
        if sigma.dtype == torch.bool or sigma.is_complex():  # as True and 0.3j are refused below
            raise SigmaError(f"sigma must hold real numbers, got a {sigma.dtype} tensor.")
        if sigma.ndim > 1:
            raise SigmaError(
                f"sigma must be a number or a 1-D tensor [B], got shape {list(sigma.shape)}."
            )
        s = sigma.detach().to(device=device, dtype=torch.float32).reshape(-1)
        if s.numel() == 1:
            s = s.expand(batch).clone()
        elif s.numel() != batch:
            raise SigmaError(
                f"sigma has {s.numel()} values but the latent batch has {batch} samples; give one "
                "sigma for the whole batch or one per sample."
            )
    else:
        if isinstance(sigma, (str, bytes, bool)):  # float() would take "0.3" and True
            raise SigmaError(f"sigma must be a number or a tensor, got {sigma!r}.")
        try:
            value = float(sigma)
        except (TypeError, ValueError):
            raise SigmaError(f"sigma must be a number or a tensor, got {sigma!r}.") from None
        s = torch.full((batch,), value, dtype=torch.float32, device=device)
    if not torch.isfinite(s).all():
        raise SigmaError(
            "sigma is NaN or infinite; give the noise level the latent carries (0 for clean)."
        )
    return s


# The largest SDXL (Euler-frame) sigma taken: SDXL's schedule ends at 14.6, and beyond about 1000 the
# latent would keep less than a millionth of its content (docs/DESIGN.md §5). Also the node's maximum.
MAX_EULER_SIGMA = 1000.0


def _check_sigma_range(s: torch.Tensor, fmt: LatentFormat) -> None:
    if fmt.frame == "euler":
        if (s < 0).any():
            raise SigmaError(
                f"sigma {s.min().item():g} is negative. For SDXL give the sampler's Euler sigma at "
                "the step it stopped at (0 for a finished latent)."
            )
        if (s > MAX_EULER_SIGMA).any():
            raise SigmaError(
                f"sigma {s.max().item():g} is far beyond SDXL's noise schedule (its largest sigma is 14.6; at most "
                f"{MAX_EULER_SIGMA:g} is taken): such a latent is pure noise. Give the sampler's Euler sigma at the "
                "step it stopped at, or 0 for a finished latent."
            )
        return
    if (s < 0).any() or (s > 1).any():
        bad = s[(s < 0) | (s > 1)][0].item()
        raise SigmaError(
            f"sigma {bad:g} is outside [0, 1]. A flow-matching latent (FLUX.1, SD3, FLUX.2, "
            "Qwen-Image, Z-Image) carries a noise level from 0 (clean) to 1 (pure noise): give the "
            "sigma of the step the sampler stopped at, or 0 for a finished latent."
        )


def prepare_latent(
    samples: torch.Tensor,
    latent_format: str | LatentFormat,
    sigma: float | torch.Tensor,
    *,
    expected_channels: int,
    bn_stats: Flux2BNStats | None = None,
    undo_noise_scaling: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A user's latent -> (z [B, C, h, w] float32 in PiD space, degrade_sigma [B] float32).

    samples: a ComfyUI LATENT's `samples` (raw VAE space) or a VAE encoder output; "pid" format for
    a latent already in PiD's space and frame. sigma: the noise level the latent carries, 0 if clean.
    expected_channels: the checkpoint's latent channels (Variant.latent_channels).
    undo_noise_scaling: the samples come from a ComfyUI sampler stopped at sigma, which returns
    x_t / (1 - sigma) for flow models; multiply it back. Set False when the
    samples already hold x_t itself. No effect at sigma 0, for SDXL (EPS: nothing to undo) or "pid".
    The bf16 rounding of the reference (docs/DESIGN.md §10) is left to the plan.
    """
    fmt = get_latent_format(latent_format)
    _check_samples(samples)
    channels = samples.shape[1]
    if fmt.channels is not None and channels != fmt.channels:
        raise LatentError(_format_mismatch(channels, fmt, expected_channels))
    if (fmt.pid_channels or channels) != expected_channels:
        raise LatentError(_checkpoint_mismatch(channels, expected_channels))
    batch = samples.shape[0]
    s = _sigma_vector(sigma, batch, samples.device)
    _check_sigma_range(s, fmt)

    z = fmt.to_pid(samples.float(), bn_stats)
    s4 = s.view(-1, 1, 1, 1)
    if fmt.frame == "flow" and undo_noise_scaling:
        if (s >= 1).any():  # undoing it would multiply by 0: an all-zero latent, decoded as pure noise
            raise SigmaError(
                "A stock leftover latent is x_t / (1 - sigma), undefined at sigma 1: it cannot be a leftover latent "
                "at that sigma. Give the sampler's state x_t itself (KSampler Early Stop) without leftover noise, or "
                "the sigma the sampler really stopped at (below 1)."
            )
        z = z * (1 - s4)
    elif fmt.frame == "euler":
        # The EPS sampler's state is x_eu = x0 + s_eu * eps in model space, i.e. after process_in
        # (ComfyUI applies process_out to it unchanged). PiD's SDXL frame is VP (docs/DESIGN.md §5):
        # x_vp = x_eu / sqrt(s_eu^2 + 1) = sqrt(1 - s_vp^2) x0 + s_vp eps.
        z = z / torch.sqrt(s4 * s4 + 1)
        s = sigma_to_pid(s, fmt)
    _check_pid_range(z, fmt)
    return z.contiguous(), s


# Latents in PiD's input space are a few units in size (the formats normalise them, noisy states
# included); far larger values mean a wrong format or a scaled tensor, and only give a wrong image.
MAX_PID_LATENT = 1e4


def _check_pid_range(z: torch.Tensor, fmt: LatentFormat) -> None:
    peak = z.detach().abs().amax().item()  # NaN propagates: a NaN peak fails the test below too
    if not peak <= MAX_PID_LATENT:
        raise LatentError(
            f"The latent reaches {peak:.3g} in PiD's input space, where latents are a few units: it is not a "
            f"'{fmt.name}' ({fmt.label}) latent, or it was scaled. Check the latent and its format."
        )


def sigma_to_pid(sigma, latent_format: str | LatentFormat):
    """The backbone's sigma -> PiD's degrade_sigma: s/sqrt(s^2+1) for SDXL's Euler sigma, else as is."""
    if get_latent_format(latent_format).frame != "euler":
        return sigma
    return sigma / (sigma * sigma + 1) ** 0.5


def detect_latent_format(
    samples: torch.Tensor, *, adapter_in_channels: int, unpatchify: int, variant: Variant | None = None,
    unreleased: str | None = None,
) -> str:
    """Pick the latent format for `samples` and a checkpoint ("auto").

    The channel count settles it except for 16 channels: FLUX.1 / Z-Image, SD3 and Qwen-Image
    latents look alike, so the checkpoint's variant (from its file name) decides, or the user must.
    unreleased: why the checkpoint is none of the released PiDs (variants.unreleased_structure), which
    is then what the message says first.
    """
    _check_samples(samples)
    channels = samples.shape[1]
    expected = adapter_in_channels * unpatchify**2
    if _pid_channels(channels) != expected:
        raise LatentError(_checkpoint_mismatch(channels, expected))
    if samples.ndim == 5:
        # Only the Wan / Qwen-Image VAE gives 5-D image latents.
        if variant is not None and variant.latent_format != "qwenimage":
            raise LatentError(
                f"This 5-D latent {list(samples.shape)} is a Qwen-Image (Wan VAE) latent, but the "
                f"checkpoint is {variant.name} ({variant.label}). Load the Qwen-Image PiD checkpoint, "
                "or set the latent format by hand if the latent really is what the checkpoint takes."
            )
        return "qwenimage"
    if channels in _FORMAT_BY_CHANNELS:
        return _FORMAT_BY_CHANNELS[channels]
    if variant is not None:
        return variant.latent_format
    candidates = sorted({v.latent_format for v in VARIANTS.values() if v.latent_channels == expected})
    alike = ("a 16-channel latent can be FLUX.1 / Z-Image ('flux'), SD3 ('sd3') or Qwen-Image ('qwenimage'), "
             "which are normalized differently")
    if unreleased:
        raise LatentError(
            f"{unreleased}, so it does not tell the latent format, and {alike}. Set the latent format to one of: "
            f"{', '.join(candidates)} (the one this checkpoint was trained on), or load a released PiD checkpoint."
        )
    raise LatentError(
        f"{alike[0].upper()}{alike[1:]}, and the checkpoint's file name does not say which backbone it was made "
        f"for. Set the latent format to one of: {', '.join(candidates)}."
    )


def noise_latent(
    z: torch.Tensor,
    sigma: float | torch.Tensor,
    noise: torch.Tensor,
    *,
    latent_format: str | LatentFormat,
) -> torch.Tensor:
    """Forward-noise a clean PiD-space latent to level sigma (docs/DESIGN.md §5).

    Flow formats: (1 - s) z + s eps. SDXL (VP frame): sqrt(max(0, 1 - s^2)) z + s eps.
    s = 0 gives z unchanged. `noise` is eps, drawn by the caller from a seeded generator.
    """
    fmt = get_latent_format(latent_format)
    if fmt.frame == "pid":
        raise LatentError(
            "noise_latent needs the backbone's latent format (flow models and SDXL are noised "
            "differently); give e.g. 'flux' or 'sdxl' instead of 'pid'."
        )
    if not isinstance(z, torch.Tensor) or z.ndim != 4:
        shape = list(getattr(z, "shape", []))
        raise LatentError(f"noise_latent takes a [B, C, h, w] latent, got {shape}.")
    if not isinstance(noise, torch.Tensor) or noise.shape != z.shape:
        raise LatentError(
            f"The noise has shape {list(getattr(noise, 'shape', []))} but the latent has "
            f"{list(z.shape)}; draw the noise with the latent's shape."
        )
    s = _sigma_vector(sigma, z.shape[0], z.device)
    if (s < 0).any() or (s > 1).any():
        raise LatentError(
            f"The noise level must lie in [0, 1] (0: clean, 1: pure noise); got {s.tolist()}."
        )
    if (s == 0).all():
        return z
    s4 = s.view(-1, 1, 1, 1).to(z.dtype)
    keep = torch.sqrt(torch.clamp(1 - s4 * s4, min=0)) if fmt.frame == "euler" else 1 - s4
    noised = keep * z + s4 * noise.to(z.dtype)
    return torch.where(s4 == 0, z, noised)


def convert_state_frame(x, sigma: float, from_frame: str | None, to_frame: str | None):
    """A sampler state at noise level sigma, from one noise frame to another: (x, sigma).

    flow: x = (1 - s) x0 + s eps (s in [0, 1]); euler: x = x0 + s eps (s >= 0). Both describe the same
    point: x_flow / (1 - s) = x0 + s / (1 - s) eps. Works in model space (after process_in), where
    the scaling is linear. Unknown frames (None) pass through.
    """
    if from_frame == to_frame or from_frame is None or to_frame is None:
        return x, float(sigma)
    s = float(sigma)
    if from_frame == "flow" and to_frame == "euler":
        if s >= 1.0:
            raise LatentError("A state at sigma 1 (pure noise) has no Euler-frame equivalent; stop later.")
        return x / (1.0 - s), s / (1.0 - s)
    if from_frame == "euler" and to_frame == "flow":
        return x / (1.0 + s), s / (1.0 + s)
    raise LatentError(f"Unknown noise frames {from_frame!r} -> {to_frame!r}.")


def vp_to_euler(x, sigma: float):
    """A VP-frame state sqrt(1 - s^2) x0 + s eps -> the Euler frame x0 + s_eu eps: (x, s_eu).

    SDXL latents are noised in PiD's VP frame; a latent with format 'sdxl' holds the Euler frame (what
    an SDXL sampler's state is), which prepare_latent converts back exactly."""
    s = float(sigma)
    if not 0.0 <= s < 1.0:
        raise LatentError(f"An SDXL latent can be noised to a sigma in [0, 1), got {s:g}.")
    keep = math.sqrt(1.0 - s * s)
    return x / keep, s / keep
