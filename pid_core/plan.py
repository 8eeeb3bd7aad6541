"""The decode plan: everything a decode needs, decided once, before any network call.

    plan = plan_decode(model, samples, text, meta=LatentMeta(sigma=0.3), tiling=TileOptions())
    image = run_plan(model, plan, seed=0)          # decode.decode() does both

The command line, the Python API and PiD Decode build the same plan from (model, latent, what travels
with the latent, options); what runs after it (decode.run_plan, velocity, tiling) reads the plan and
decides nothing again. Each fact is decided by one function:

  latent format        resolve_latent_format     explicit choice > the latent's own > detected
  sigma                resolve_sigma             explicit value > the latent's own > 0 (clean)
  PiD-space latent     latents.prepare_latent    format, noise frame (docs/DESIGN.md §5), on the device
  output size          output_hw                 latent cells x pixels per cell
  text batch           match_text_batch          one embedding for all, or one per latent
  sampler              samplers.resolve_sampler  student or teacher (chosen > file name), steps, cfg,
                                                 shift, the times it visits
  negative text        (guided decodes)          the unconditional text, matched to the batch
  compute device/dtype precision.compute_dtype   fp32 on the CPU, the weights' half dtype on GPUs
  tiles and memory     tiling.plan_tiling        tile size, tiles per forward, guidance batching, memory,
                                                 where the sampler's state lives
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

import torch

from .checks import require_device
from .colour import check_colour_reference
from .errors import ArgumentError, LatentError, SigmaError, TextEmbeddingError
from .latent_formats import LATENT_FORMATS
from .latents import NO_META, LatentMeta, Sigma, detect_latent_format, prepare_latent
from .precision import compute_dtype, storage_dtype
from .samplers import SamplerPlan, resolve_sampler
from .text import validate_text_embedding
from .tiling import TileOptions, TilePlan, plan_tiling
from .variants import BACKBONES, check_output_size, unreleased_structure, variants_for_backbone
from .wording import term

log = logging.getLogger("pid_core")




def resolve_latent_format(choice: Optional[str], meta: LatentMeta, model, samples: torch.Tensor) -> str:
    """The latent format to decode with: an explicit choice (a format or a backbone name such as
    zimage or flux2-klein-4b), else the format that travels with the latent, else the one the channels
    and the checkpoint's variant tell ("auto")."""
    name = check_latent_format_name(choice)
    if name == "auto" and meta.latent_format:
        name = check_latent_format_name(meta.latent_format)
    if name == "auto":
        config = model.config
        return detect_latent_format(samples, adapter_in_channels=config.adapter_in_channels,
                                    unpatchify=config.latent_unpatchify, variant=model.variant,
                                    unreleased=unreleased_checkpoint(model))
    return name if name in LATENT_FORMATS else variants_for_backbone(name)[0].latent_format


def unreleased_checkpoint(model) -> Optional[str]:
    """Why the loaded checkpoint is none of the released PiDs (variants.unreleased_structure), or None."""
    path = model.checkpoint.path if getattr(model, "checkpoint", None) is not None else None
    return unreleased_structure(os.path.basename(path) if path else "This checkpoint", model.config)


def resolve_sigma(explicit: Optional[Sigma], meta: LatentMeta) -> tuple[Sigma, str]:
    """(sigma, where it came from): an explicit value (None: not given), else the latent's own, else 0
    (a clean latent). PiD Decode's -1 = auto becomes None in the node; a negative value given here is
    checked, and refused, like any other."""
    if explicit is not None:
        return explicit, "given"
    if meta.sigma is not None:
        return meta.sigma, f"pid_sigma of {meta.source}"
    return 0.0, "none given: taken as clean"


def check_latent_format_name(choice: Optional[str]) -> str:
    """The lower-case name of a latent format choice: auto, a format or a backbone; anything else is an
    error (checked before anything is loaded)."""
    if choice is not None and not isinstance(choice, str):
        raise LatentError(f"{term.latent_format} must be a name such as 'auto' or 'flux', got {choice!r}.")
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


NegativeText = Union[torch.Tensor, Callable[[], torch.Tensor], None]


@dataclass(frozen=True)
class ColourMatch:
    """A decode's colour reference and how strongly its colours replace the decode's (colour.match_colour)."""

    reference: torch.Tensor  # [1 or B, 3, h, w] in [0, 1], the output's aspect ratio (colour.check_colour_reference)
    strength: float  # 0 (keep the decode's colours) .. 1 (the reference's low-frequency colour)


@dataclass(frozen=True)
class DecodePlan:
    """A decode, resolved: every fact the run needs, decided once. Run it with decode.run_plan."""

    latent_format: str
    latent: torch.Tensor  # [B, C, h, w] in PiD space, rounded to bf16 as the reference does, on `device`
    latent_sigma: torch.Tensor  # [B] float32: the noise level the latent carries, in its own frame (as given)
    sigma: torch.Tensor  # [B] float32 on `device`: the same in PiD's frame, what the network sees
    sigma_source: str
    text: torch.Tensor  # [B, T, text_dim] float32 on `device` (one embedding is shared by the batch)
    negative: Optional[torch.Tensor]  # [B, T', text_dim] float32 on `device`: guided decodes only
    sampler: SamplerPlan
    tiles: TilePlan
    tile_options: TileOptions
    device: torch.device  # where the network runs
    compute_dtype: torch.dtype  # what the network computes in there (precision.compute_dtype)
    colour: Optional[ColourMatch] = None  # the colour reference matched after the decode (None: none)
    warnings: tuple[str, ...] = ()

    @property
    def batch(self) -> int:
        return self.latent.shape[0]

    @property
    def output_hw(self) -> tuple[int, int]:
        return self.tiles.canvas_hw

    @property
    def canvas_device(self) -> torch.device:
        """Where the sampler's state lives: with the network, or on the CPU for canvases too large for it."""
        return self.device if self.tiles.canvas_on_device else torch.device("cpu")

    @property
    def memory_bytes(self) -> int:
        """Working memory the decode needs on the compute device beside the weights."""
        return self.tiles.memory_bytes

    def within(self, model, budget_bytes: Optional[int]) -> "DecodePlan":
        """This plan with its tiles chosen for a memory budget (None: no limit); the rest stays."""
        options = replace(self.tile_options, memory_budget_bytes=budget_bytes)
        return replace(self, tiles=_tiles(model, self.output_hw, options, self.batch, self.sampler,
                                          self.compute_dtype, _branches_batchable(self.text, self.negative),
                                          self.device),
                       tile_options=options)

    def summary(self) -> dict[str, str]:
        """What the plan says, in words: {"latent": ..., "sampler": ..., "tiling": ..., "output": ...}."""
        given = ", ".join(f"{s:.4g}" for s in self.latent_sigma.tolist())
        in_pid = ", ".join(f"{s:.4g}" for s in self.sigma.tolist())
        frame = f"; {in_pid} in PiD's frame" if in_pid != given else ""
        H, W = self.output_hw
        return {
            "latent": f"{list(self.latent.shape)} in PiD space as {self.latent_format}, sigma {given} "
                      f"({self.sigma_source}{frame})",
            "sampler": f"{self.sampler.describe()} ({self.sampler.kind_source})",
            "tiling": self.tiles.reason,
            "output": f"{self.batch} x {W}x{H} px, computed in {str(self.compute_dtype).replace('torch.', '')} "
                      f"on {self.device}",
            "colour": ("none" if self.colour is None else
                       "matched to a {}x{} reference, strength {:g}".format(*self.colour.reference.shape[-1:-3:-1],
                                                                           self.colour.strength)),
        }


def _branches_batchable(text: torch.Tensor, negative: Optional[torch.Tensor]) -> bool:
    """Guidance's two texts can share one forward only when they have the same shape."""
    return negative is not None and negative.shape[1:] == text.shape[1:]


def _tiles(model, output_hw, options: TileOptions, batch: int, sampler: SamplerPlan, dtype: torch.dtype,
           batchable: bool, device: torch.device) -> TilePlan:
    return plan_tiling(model.config, output_hw, options, dtype=dtype, variant=model.variant, batch=batch,
                       guidance=sampler.guided, batch_branches=batchable, state_canvases=sampler.spec.state_canvases,
                       device=device)


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
    sampler: Optional[str] = "auto",
    steps: Optional[int] = None,
    cfg: Optional[float] = None,
    shift: Optional[float] = None,
    negative: NegativeText = None,
    color_reference: Optional[torch.Tensor] = None,
    color_match: Optional[float] = None,
) -> DecodePlan:
    """Resolve a decode of `samples` (what a ComfyUI LATENT's `samples` holds: raw VAE space) with the
    Gemma embedding `text` ([B or 1, T, text_dim]) on a loaded PidNet.

    meta: what travels with the latent (its sigma and format); latent_format and sigma override it.
    leftover_noise: the samples are a stock ComfyUI leftover latent x_t / (1 - sigma).
    tiling: None (one pass over the whole canvas, the same as TileOptions(mode="off")) or TileOptions.
    bn_stats: the FLUX.2 VAE's statistics (latent_formats.Flux2BNStats), for the flux2_raw format.
    device: where the network runs (default: the model's).
    sampler, steps, cfg, shift: see samplers.resolve_sampler (None: the sampler's defaults). negative: the
    unconditional text of a guided decode ([B or 1, T, text_dim]), or a function returning it, called only
    when the decode is guided (so a text encoder runs only when needed). color_reference: an image of the
    same scene with the colours to keep ([1 or B, 3, h, w] in [0, 1], any size with the output's aspect
    ratio: the VAE decode of the latent, or an upscale's source); color_match: how strongly its colours
    replace the decode's, 0 to 1 (None: 1 with a reference)."""
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ArgumentError(f"model must be a PiD model loaded with checkpoint.load_pid, got {type(model).__name__}.")
    device = require_device(device) if device is not None else next(model.parameters()).device
    if tiling is not None and not isinstance(tiling, TileOptions):
        raise ArgumentError(f"tiling must be None or a TileOptions, got {type(tiling).__name__}.")
    if not isinstance(meta, LatentMeta):
        raise ArgumentError(f"meta must be a LatentMeta, got {type(meta).__name__}.")
    if not isinstance(samples, torch.Tensor):
        raise LatentError(f"The latent must be a torch tensor, got {type(samples).__name__}.")
    for name, value in (("latent", samples), ("text", text), ("sigma", sigma), ("negative", negative)):
        if isinstance(value, torch.Tensor) and value.is_meta:
            raise ArgumentError(f"The {name} is a meta tensor (a shape without values): give it on the CPU or a GPU.")
    config = model.config
    fmt = resolve_latent_format(latent_format, meta, model, samples)
    sigma_value, sigma_source = resolve_sigma(sigma, meta)
    try:
        z, latent_sigma, degrade_sigma = prepare_latent(
            samples.to(device), fmt, sigma_value, expected_channels=config.latent_channels, bn_stats=bn_stats,
            undo_noise_scaling=leftover_noise,
        )
    except SigmaError as e:
        if sigma_source.startswith("pid_sigma"):
            raise SigmaError(f"{e.template} (This sigma is the {sigma_source}; {term.sigma_override} to override "
                             "it.)") from None
        raise
    # The reference hands the latent to the network as bf16 (docs/DESIGN.md §10): keep that rounding.
    z = z.to(torch.bfloat16).float()
    batch = z.shape[0]
    embedding = validate_text_embedding(text, text_dim=config.text_dim, max_tokens=config.text_max_tokens,
                                        unreleased=unreleased_checkpoint(model))
    embedding = match_text_batch(embedding.to(device=device, dtype=torch.float32), batch)

    height, width = output_hw(config, z.shape[-2:])
    warnings = []
    chosen = check_latent_format_name(latent_format) != "auto"
    if chosen or meta.latent_format:
        contradiction = format_contradiction(fmt, model.variant, "given" if chosen else f"stored with {meta.source}")
        if contradiction:
            warnings.append(contradiction)
    sampling, sampler_warnings = resolve_sampler(model, (height, width), sampler=sampler, steps=steps, cfg=cfg,
                                                 shift=shift)
    warnings += sampler_warnings
    negative_embedding = None
    if sampling.guided:
        negative_embedding = _negative_embedding(negative() if callable(negative) else negative, model, batch,
                                                 device, sampling.cfg)
    if model.variant is not None:
        size_warning = check_output_size(model.variant, height, width)
        if size_warning:
            warnings.append(size_warning)
    for warning in warnings:
        log.warning(warning)
    options = tiling or TileOptions(mode="off")
    dtype = compute_dtype(storage_dtype(model), device)
    tiles = _tiles(model, (height, width), options, batch, sampling, dtype,
                   _branches_batchable(embedding, negative_embedding), device)
    log.info("PiD sampler: %s (%s); tiling: %s", sampling.describe(), sampling.kind_source, tiles.reason)
    colour = _colour_match(color_reference, color_match, (height, width), batch)
    return DecodePlan(latent_format=fmt, latent=z, latent_sigma=latent_sigma.cpu(), sigma=degrade_sigma,
                      sigma_source=sigma_source, text=embedding, negative=negative_embedding, sampler=sampling,
                      tiles=tiles, tile_options=options, device=device, compute_dtype=dtype, colour=colour,
                      warnings=tuple(warnings))


def _colour_match(reference, strength, output_hw, batch: int) -> Optional[ColourMatch]:
    """The colour match of a decode: a reference checked against the output (colour.check_colour_reference)
    and a strength from 0 to 1 (1 when not given); a strength without a reference is refused."""
    if reference is None:
        if strength is not None:
            raise ArgumentError(f"{term.color_match} sets how strongly a colour reference's colours are kept, and no "
                                f"{term.color_reference} was given: give one, or leave {term.color_match} out.")
        return None
    check_colour_reference(reference, output_hw, batch)
    if strength is None:
        strength = 1.0
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 <= strength <= 1:
        raise ArgumentError(f"{term.color_match} must be a number from 0 to 1 (0: the decode's own colours), got "
                            f"{strength!r}.")
    return ColourMatch(reference.detach(), float(strength))


def _negative_embedding(negative, model, batch: int, device, cfg: float) -> torch.Tensor:
    """The unconditional text of a guided decode, checked and matched to the batch."""
    if negative is None:
        raise TextEmbeddingError(f"A guided decode (teacher, cfg {cfg:g}) needs a negative text: {term.give_negative}, "
                                 f"or set {term.no_guidance} for no guidance.")
    try:
        config = model.config
        negative = validate_text_embedding(negative, text_dim=config.text_dim, max_tokens=config.text_max_tokens,
                                           unreleased=unreleased_checkpoint(model))
        return match_text_batch(negative.to(device=device, dtype=torch.float32), batch)
    except TextEmbeddingError as e:
        raise TextEmbeddingError(f"The negative text: {e.template}") from None
