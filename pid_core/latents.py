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
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .errors import LatentError, SigmaError
from .latent_formats import (LATENT_FORMATS, Flux2BNStats, LatentFormat, format_by_channels, format_mismatch,
                             formats_with_channels, get_latent_format, looks_like, pid_channels)
from .variants import VARIANTS, Variant
from .wording import term

Sigma = Union[float, torch.Tensor]


@dataclass(frozen=True)
class LatentMeta:
    """What travels with a latent beside its samples: its noise level and the format its writer knew.

    From a ComfyUI LATENT's pid_* keys (KSampler Early Stop, PiD Encode-Degrade) or a latent file's
    pid_* tensors. `source` says where it came from, for messages."""

    sigma: Optional[Sigma] = None
    latent_format: Optional[str] = None
    source: str = "the latent"


NO_META = LatentMeta()


def _checkpoint_mismatch(channels: int, expected: int) -> str:
    wants = f"{expected}-channel {looks_like(expected)}".rstrip()
    fix = _other_checkpoint(channels)
    if fix is None:
        return (
            f"This {channels}-channel latent is not one that any released PiD checkpoint takes; the "
            f"checkpoint expects {wants} latents. Give it a latent from a model it was made for, or "
            "decode this latent with its own VAE."
        )
    return (f"This is a {channels}-channel {looks_like(channels)} latent, but the checkpoint expects {wants} latents; "
            f"{fix}, or give this checkpoint a latent from a model it was made for.")


def _other_checkpoint(channels: int) -> Optional[str]:
    """'load the <backbone> PiD checkpoint (<variants>)' for a latent of this many channels; None when no
    released checkpoint takes it."""
    fits = [v.name for v in VARIANTS.values() if v.latent_channels == pid_channels(channels)]
    if not looks_like(channels) or not fits:
        return None
    return f"load the {looks_like(channels)} PiD checkpoint ({', '.join(fits)})"


def _format_mismatch(channels: int, fmt: LatentFormat, expected: int) -> str:
    """The chosen format does not take the latent's channels; when the checkpoint does not either, one
    message says both (each fact once) and the fix for both."""
    if pid_channels(channels) == expected:
        return format_mismatch(channels, fmt)
    what = f" ({looks_like(channels)})" if looks_like(channels) else ""
    chosen = f"the latent format '{fmt.name}' ({fmt.label})"
    if fmt.channels == expected:
        takes = f"{chosen} and the checkpoint take {expected}-channel latents"
    else:
        takes = f"{chosen} takes {fmt.channels}-channel latents and the checkpoint {expected}-channel ones"
    other = _other_checkpoint(channels)
    fix = (f"{other} and set {term.latent_format} to 'auto', or give this checkpoint a latent from a model it was "
           "made for" if other else "give the checkpoint a latent from a model it was made for, or decode this "
           "latent with its own VAE")
    return f"The latent has {channels} channels{what}, but {takes}: {fix}."


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A user's latent -> (z [B, C, h, w] float32 in PiD space, the sigma as given [B] float32 in the
    latent's own frame, degrade_sigma [B] float32 in PiD's frame).

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
    s_pid = s
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
        s_pid = sigma_to_pid(s, fmt)
    _check_pid_range(z, fmt)
    return z.contiguous(), s, s_pid


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
    if pid_channels(channels) != expected:
        raise LatentError(_checkpoint_mismatch(channels, expected))
    if samples.ndim == 5:
        video = next(f for f in LATENT_FORMATS.values() if f.video)  # only the Wan VAE gives 5-D image latents
        if variant is not None and variant.latent_format != video.name:
            raise LatentError(
                f"This 5-D latent {list(samples.shape)} is a {video.label} (Wan VAE) latent, but the "
                f"checkpoint is {variant.name} ({variant.label}). Load the {video.label} PiD checkpoint, "
                f"or set {term.latent_format} by hand if the latent really is what the checkpoint takes."
            )
        return video.name
    if format_by_channels(channels) is not None:
        return format_by_channels(channels)
    if variant is not None:
        return variant.latent_format
    group = ", ".join(f"{f.label} ('{f.name}')" for f in formats_with_channels(channels))
    candidates = sorted({v.latent_format for v in VARIANTS.values() if v.latent_channels == expected})
    alike = f"a {channels}-channel latent can be {group}, which are normalized differently"
    if unreleased:
        raise LatentError(
            f"{unreleased}, so it does not tell the latent format, and {alike}. Set {term.latent_format} to one of: "
            f"{', '.join(candidates)} (the one this checkpoint was trained on), or load a released PiD checkpoint."
        )
    raise LatentError(
        f"{alike[0].upper()}{alike[1:]}, and the checkpoint's file name does not say which backbone it was made "
        f"for. Set {term.latent_format} to one of: {', '.join(candidates)}."
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
