"""The decode plan: everything a decode needs, decided once, before any network call.

    plan = plan_decode(model, samples, text, meta=LatentMeta(sigma=0.3), tiling=TileOptions())
    image = run_plan(model, plan, seed=0)          # decode.decode() does both

The command line, the Python API and PiD Decode build the same plan from (model, latent, what travels
with the latent, options). Each fact is decided by one function:

  latent format        resolve_latent_format   explicit choice > the latent's own > detected
  sigma                resolve_sigma           explicit value > the latent's own > 0 (clean)
  PiD-space latent     latents.prepare_latent  format, noise frame (docs/DESIGN.md §5)
  output size          output_hw               latent cells x pixels per cell
  text batch           match_text_batch        one embedding for all, or one per latent
  tiles and memory     tiling.plan_tiling      tile size, tiles per forward, working memory
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Optional, Union

import torch

from .checks import require_device
from .errors import ArgumentError, LatentError, SigmaError, TextEmbeddingError
from .latents import LATENT_FORMATS, detect_latent_format, prepare_latent
from .precision import compute_dtype, storage_dtype
from .text import validate_text_embedding
from .tiling import TileOptions, TilePlan, plan_tiling
from .variants import BACKBONES, check_output_size, variants_for_backbone

log = logging.getLogger("pid_core")

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


def resolve_latent_format(choice: Optional[str], meta: LatentMeta, model, samples: torch.Tensor) -> str:
    """The latent format to decode with: an explicit choice (a format or a backbone name such as
    zimage or flux2-klein-4b), else the format that travels with the latent, else the one the channels
    and the checkpoint's variant tell ("auto")."""
    name = check_latent_format_name(choice)
    if name == "auto" and meta.latent_format:
        name = meta.latent_format.strip().lower()
    if name == "auto":
        config = model.config
        return detect_latent_format(samples, adapter_in_channels=config.adapter_in_channels,
                                    unpatchify=config.latent_unpatchify, variant=model.variant)
    if name in LATENT_FORMATS:
        return name
    if name in BACKBONES:
        return variants_for_backbone(name)[0].latent_format
    raise LatentError(
        f"Unknown latent format {name!r}. Choose auto, one of {', '.join(LATENT_FORMATS)}, "
        f"or a backbone name ({', '.join(BACKBONES)})."
    )


def resolve_sigma(explicit: Optional[Sigma], meta: LatentMeta) -> tuple[Sigma, str]:
    """(sigma, where it came from): an explicit value (None or a negative number: not given), else the
    latent's own, else 0 (a clean latent)."""
    if _given(explicit):
        return explicit, "given"
    if meta.sigma is not None:
        return meta.sigma, f"pid_sigma of {meta.source}"
    return 0.0, "none given: taken as clean"


def _given(explicit) -> bool:
    """A negative number means "not given" (PiD Decode's -1 = auto); NaN, lists and tensors count as given
    (and are then checked as values)."""
    if explicit is None or isinstance(explicit, torch.Tensor):
        return explicit is not None
    try:
        return not float(explicit) < 0
    except (TypeError, ValueError):
        return True


def check_latent_format_name(choice: Optional[str]) -> str:
    """The lower-case name of a latent format choice: auto, a format or a backbone; anything else is an
    error (checked before anything is loaded)."""
    if choice is not None and not isinstance(choice, str):
        raise LatentError(f"latent_format must be a name such as 'auto' or 'flux', got {choice!r}.")
    name = (choice or "auto").strip().lower()
    if name != "auto" and name not in LATENT_FORMATS and name not in BACKBONES:
        raise LatentError(
            f"Unknown latent format {name!r}. Choose auto, one of {', '.join(LATENT_FORMATS)}, "
            f"or a backbone name ({', '.join(BACKBONES)})."
        )
    return name


def format_contradiction(fmt: str, variant, how: str) -> Optional[str]:
    """A warning when a latent format that was chosen (not detected) is not the one the checkpoint's
    variant takes: the channels may still match (16-channel FLUX.1, SD3, Qwen-Image), the image not."""
    if variant is None or fmt in (variant.latent_format, "pid") or (fmt, variant.latent_format) == ("flux2_raw", "flux2"):
        return None
    return (
        f"The latent format '{fmt}' ({LATENT_FORMATS[fmt].label}) was {how}, but the checkpoint is {variant.name}, "
        f"made for '{variant.latent_format}' latents ({LATENT_FORMATS[variant.latent_format].label}): the image will be wrong "
        "unless the latent really is one the checkpoint takes."
    )


def output_hw(config, pid_latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Output (H, W) = PiD-space latent cells x (VAE factor x super-resolution scale)."""
    return pid_latent_hw[0] * config.scale, pid_latent_hw[1] * config.scale


def match_text_batch(text: torch.Tensor, batch: int) -> torch.Tensor:
    """One embedding for every latent, or one per latent."""
    if text.shape[0] == batch:
        return text
    if text.shape[0] == 1:
        return text.expand(batch, -1, -1)
    raise TextEmbeddingError(
        f"{text.shape[0]} text embeddings for {batch} latents. Give one prompt for the whole batch "
        f"or exactly one per latent."
    )


@dataclass(frozen=True)
class DecodePlan:
    """A decode, resolved. Run it with decode.run_plan."""

    latent_format: str
    latent: torch.Tensor  # [B, C, h, w] in PiD space, rounded to bf16 as the reference does, on `device`
    sigma: torch.Tensor  # [B] float32, in PiD's frame
    sigma_source: str
    text: torch.Tensor  # [B, T, text_dim] float32 on `device`
    tiles: TilePlan
    tile_options: TileOptions
    device: torch.device
    warnings: tuple[str, ...] = ()

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.tiles.canvas_hw

    @property
    def memory_bytes(self) -> int:
        """Working memory the decode needs on the compute device beside the weights."""
        return self.tiles.memory_bytes

    def within(self, model, budget_bytes: Optional[int]) -> "DecodePlan":
        """This plan with its tiles chosen for a memory budget (None: no limit); the rest stays."""
        options = replace(self.tile_options, memory_budget_bytes=budget_bytes)
        tiles = plan_tiling(model.config, self.output_hw, options, dtype=compute_dtype(storage_dtype(model), self.device),
                            variant=model.variant, batch=self.batch)
        return replace(self, tiles=tiles, tile_options=options)


def plan_decode(
    model,
    samples: torch.Tensor,
    text: torch.Tensor,
    *,
    meta: LatentMeta = NO_META,
    latent_format: Optional[str] = "auto",
    sigma: Optional[Sigma] = None,
    leftover_noise: bool = False,
    tiling: Optional[TileOptions] = None,
    bn_stats=None,
    device=None,
) -> DecodePlan:
    """Resolve a decode of `samples` (what a ComfyUI LATENT's `samples` holds: raw VAE space) with the
    Gemma embedding `text` ([B or 1, T, text_dim]) on a loaded PidNet.

    meta: what travels with the latent (its sigma and format); latent_format and sigma override it.
    leftover_noise: the samples are a stock ComfyUI leftover latent x_t / (1 - sigma).
    tiling: None (one pass over the whole canvas, the same as TileOptions(mode="off")) or TileOptions.
    device: where the network runs (default: the model's)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ArgumentError(f"model must be a PiD model loaded with checkpoint.load_pid, got {type(model).__name__}.")
    device = require_device(device) if device is not None else next(model.parameters()).device
    if tiling is not None and not isinstance(tiling, TileOptions):
        raise ArgumentError(f"tiling must be None or a TileOptions, got {type(tiling).__name__}.")
    if not isinstance(meta, LatentMeta):
        raise ArgumentError(f"meta must be a LatentMeta, got {type(meta).__name__}.")
    if not isinstance(samples, torch.Tensor):
        raise LatentError(f"The latent must be a torch tensor, got {type(samples).__name__}.")
    config = model.config
    fmt = resolve_latent_format(latent_format, meta, model, samples)
    sigma_value, sigma_source = resolve_sigma(sigma, meta)
    try:
        z, degrade_sigma = prepare_latent(
            samples.to(device), fmt, sigma_value, expected_channels=config.latent_channels, bn_stats=bn_stats,
            undo_noise_scaling=leftover_noise,
        )
    except SigmaError as e:
        if sigma_source.startswith("pid_sigma"):
            raise SigmaError(f"{e} (This sigma is the {sigma_source}; give a sigma to override it.)") from None
        raise
    # The reference hands the latent to the network as bf16 (docs/DESIGN.md §10): keep that rounding.
    z = z.to(torch.bfloat16).float()
    embedding = validate_text_embedding(text, text_dim=config.text_dim, max_tokens=config.text_max_tokens)
    embedding = match_text_batch(embedding.to(device=device, dtype=torch.float32), z.shape[0])

    height, width = output_hw(config, z.shape[-2:])
    warnings = []
    chosen = check_latent_format_name(latent_format) != "auto"
    if chosen or meta.latent_format:
        contradiction = format_contradiction(fmt, model.variant, "given" if chosen else f"stored with {meta.source}")
        if contradiction:
            log.warning(contradiction)
            warnings.append(contradiction)
    if model.variant is not None:
        size_warning = check_output_size(model.variant, height, width)
        if size_warning:
            log.warning(size_warning)
            warnings.append(size_warning)
    options = tiling or TileOptions(mode="off")
    tiles = plan_tiling(config, (height, width), options, dtype=compute_dtype(storage_dtype(model), device),
                        variant=model.variant, batch=z.shape[0])
    log.info("PiD tiling: %s", tiles.reason)
    return DecodePlan(latent_format=fmt, latent=z, sigma=degrade_sigma, sigma_source=sigma_source,
                      text=embedding, tiles=tiles, tile_options=options, device=device, warnings=tuple(warnings))
