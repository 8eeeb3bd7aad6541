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
  sampler              resolve_sampler         student or teacher (chosen > file name), steps, cfg, shift
  negative text        (guided decodes)        the unconditional text, matched to the batch
  tiles and memory     tiling.plan_tiling      tile size, tiles per forward, guidance batching, memory
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
import math
import numbers
from typing import Callable, Optional, Union

import torch

from .checks import require_device, whole_number
from .errors import ArgumentError, LatentError, SigmaError, TextEmbeddingError
from .latents import LATENT_FORMATS, detect_latent_format, prepare_latent
from .precision import compute_dtype, storage_dtype
from .teacher import MAX_TEACHER_STEPS, teacher_shift
from .text import validate_text_embedding
from .tiling import TileOptions, TilePlan, plan_tiling
from .tiling.memory import CANVASES, TEACHER_CANVASES
from .variants import (
    BACKBONES, KINDS, SAMPLER_DEFAULTS, STUDENT, TEACHER, check_output_size, kind_from_filename, variants_for_backbone,
)

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


STUDENT_MAX_STEPS = 4  # the released student schedule has 4 steps; 1-3 subsample it
# Steps at or below which an undistilled checkpoint is clearly under-sampled (its reference runs 25).
TEACHER_FEW_STEPS = 4


@dataclass(frozen=True)
class SamplerPlan:
    """How the decode samples: the student's 4-step loop or the teacher's guided DPM-Solver++."""

    kind: str  # variants.STUDENT or variants.TEACHER
    kind_source: str  # why: chosen, or what the checkpoint's name says
    steps: int
    cfg: float  # classifier-free guidance scale; 1.0 = none (always for the student)
    shift: Optional[float] = None  # the teacher's flow-schedule shift (from the output size)

    @property
    def guided(self) -> bool:
        """Two network branches per step (conditional and unconditional text)."""
        return self.kind == TEACHER and self.cfg != 1.0

    def describe(self) -> str:
        if self.kind == STUDENT:
            return f"student, {self.steps} steps"
        guidance = f"cfg {self.cfg:g}" if self.guided else "no guidance"
        return f"teacher (DPM-Solver++), {self.steps} steps, {guidance}, shift {self.shift:.3g}"


def checkpoint_kind(model) -> tuple[str, str]:
    """(STUDENT or TEACHER, why) for a loaded model: its variant, else the file name's cue, else a
    student (the weights cannot tell)."""
    if model.variant is not None:
        return model.variant.kind, f"the checkpoint is {model.variant.name}"
    path = model.checkpoint.path if getattr(model, "checkpoint", None) is not None else None
    if kind_from_filename(path) == TEACHER:
        return TEACHER, "the file name says undistilled"
    return STUDENT, "the file name does not say undistilled"


def resolve_sampler(
    model,
    output_hw: tuple[int, int],
    *,
    sampler: Optional[str] = "auto",
    steps: Optional[int] = None,
    cfg: Optional[float] = None,
    shift: Optional[float] = None,
) -> tuple[SamplerPlan, list[str]]:
    """The sampler of a decode and warnings about mismatched settings.

    sampler: "auto" (the checkpoint's kind), "student" or "teacher". steps: None or 0 for the kind's
    default (4, or 25 for the teacher); students take 1-4, the teacher 1-100. cfg: None or negative for
    the default (5 for the teacher); students take no guidance. shift: the teacher's schedule shift,
    None for the reference's value for the output size."""
    name = (sampler or "auto").strip().lower()
    checkpoint, why = checkpoint_kind(model)
    if name == "auto":
        kind, source = checkpoint, why
    elif name in KINDS:
        kind, source = name, "chosen"
    else:
        raise ArgumentError(f"Unknown sampler {sampler!r}: choose auto, {STUDENT} or {TEACHER}.")
    defaults = SAMPLER_DEFAULTS[kind]
    limit = STUDENT_MAX_STEPS if kind == STUDENT else MAX_TEACHER_STEPS
    if steps is not None and not (isinstance(steps, numbers.Integral) and not isinstance(steps, bool)):
        steps = whole_number(steps, "steps", 0, limit, "0 gives the sampler's default.")  # 2.7 is refused, 2.0 taken
    steps = int(steps) if steps else defaults.steps
    if cfg is not None and (isinstance(cfg, bool) or not isinstance(cfg, numbers.Real) or not math.isfinite(cfg)):
        raise ArgumentError(f"cfg must be a finite number (negative: the default), got {cfg!r}.")
    cfg_given = cfg is not None and float(cfg) >= 0
    cfg = float(cfg) if cfg_given else defaults.cfg
    label = model.variant.name if model.variant is not None else "this checkpoint"
    warnings = []
    if kind == STUDENT:
        if not 1 <= steps <= STUDENT_MAX_STEPS:
            raise ArgumentError(
                f"The PiD student sampler runs 1 to {STUDENT_MAX_STEPS} steps; got {steps}. Use 4 for the released "
                f"quality; many guided steps are for the undistilled checkpoints (sampler 'teacher')."
            )
        if cfg_given and cfg != 1.0:
            warnings.append(f"{label} is sampled as a 4-step student, which takes no guidance: cfg {cfg:g} is "
                            "ignored. Guidance is for the undistilled checkpoints.")
        cfg = 1.0
        if checkpoint == TEACHER:
            warnings.append(f"{label} is an undistilled checkpoint ({why}), decoded here with the 4-step student "
                            "sampler and no guidance: expect a poor image. Use sampler auto or teacher "
                            f"({SAMPLER_DEFAULTS[TEACHER].steps} steps, cfg {SAMPLER_DEFAULTS[TEACHER].cfg:g}).")
        return SamplerPlan(kind, source, steps, cfg), warnings
    if not 1 <= steps <= MAX_TEACHER_STEPS:
        raise ArgumentError(f"The teacher sampler runs 1 to {MAX_TEACHER_STEPS} steps; got {steps}. "
                       f"The reference uses {SAMPLER_DEFAULTS[TEACHER].steps}.")
    if cfg < 0:
        raise ArgumentError(f"cfg must not be negative, got {cfg}.")
    if checkpoint == STUDENT:
        warnings.append(f"{label} is a 4-step student ({why}), decoded here with the teacher's DPM-Solver++ over "
                        f"{steps} steps" + (f" with cfg {cfg:g}" if cfg != 1.0 else "") + ": students are "
                        "distilled for 4 steps without guidance, so this costs more and does not improve them. "
                        "Use sampler auto, or load an undistilled checkpoint.")
    elif steps <= TEACHER_FEW_STEPS and cfg == 1.0:
        warnings.append(f"{label} is undistilled: {steps} steps without guidance under-sample it. Use about "
                        f"{SAMPLER_DEFAULTS[TEACHER].steps} steps with cfg {SAMPLER_DEFAULTS[TEACHER].cfg:g}, or the "
                        "4-step student checkpoint for speed.")
    shift = float(shift) if shift is not None else teacher_shift(*output_hw)
    return SamplerPlan(kind, source, steps, cfg, shift), warnings


NegativeText = Union[torch.Tensor, Callable[[], torch.Tensor], None]


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
    sampler: SamplerPlan = SamplerPlan(STUDENT, "default", SAMPLER_DEFAULTS[STUDENT].steps, 1.0)
    negative: Optional[torch.Tensor] = None  # [B, T', text_dim] float32 on `device`, guided decodes only
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
        return replace(self, tiles=_tiles(model, self.output_hw, options, self.batch, self.sampler, self.device),
                       tile_options=options)


def _tiles(model, output_hw, options: TileOptions, batch: int, sampler: SamplerPlan, device) -> TilePlan:
    return plan_tiling(model.config, output_hw, options, dtype=compute_dtype(storage_dtype(model), device), variant=model.variant,
                       batch=batch, guidance=sampler.guided,
                       state_canvases=TEACHER_CANVASES if sampler.kind == TEACHER else CANVASES, device=device)


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
) -> DecodePlan:
    """Resolve a decode of `samples` (what a ComfyUI LATENT's `samples` holds: raw VAE space) with the
    Gemma embedding `text` ([B or 1, T, text_dim]) on a loaded PidNet.

    meta: what travels with the latent (its sigma and format); latent_format and sigma override it.
    leftover_noise: the samples are a stock ComfyUI leftover latent x_t / (1 - sigma).
    tiling: None (one pass over the whole canvas, the same as TileOptions(mode="off")) or TileOptions.
    device: where the network runs (default: the model's).
    sampler, steps, cfg, shift: see resolve_sampler. negative: the unconditional text of a guided
    decode ([B or 1, T, text_dim]), or a function returning it, called only when the decode is guided
    (so a text encoder runs only when needed)."""
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
            warnings.append(contradiction)
    sampling, sampler_warnings = resolve_sampler(model, (height, width), sampler=sampler, steps=steps, cfg=cfg,
                                                 shift=shift)
    warnings += sampler_warnings
    negative_embedding = None
    if sampling.guided:
        negative_embedding = _negative_embedding(negative() if callable(negative) else negative, config, z.shape[0],
                                                 device, sampling.cfg)
    if model.variant is not None:
        size_warning = check_output_size(model.variant, height, width)
        if size_warning:
            warnings.append(size_warning)
    for warning in warnings:
        log.warning(warning)
    options = tiling or TileOptions(mode="off")
    tiles = _tiles(model, (height, width), options, z.shape[0], sampling, device)
    log.info("PiD sampler: %s (%s); tiling: %s", sampling.describe(), sampling.kind_source, tiles.reason)
    return DecodePlan(latent_format=fmt, latent=z, sigma=degrade_sigma, sigma_source=sigma_source,
                      text=embedding, tiles=tiles, tile_options=options, device=device, sampler=sampling,
                      negative=negative_embedding, warnings=tuple(warnings))


def _negative_embedding(negative, config, batch: int, device, cfg: float) -> torch.Tensor:
    """The unconditional text of a guided decode, checked and matched to the batch."""
    if negative is None:
        raise TextEmbeddingError(
            f"A guided decode (teacher, cfg {cfg:g}) needs the negative text's embedding: give a negative prompt or "
            "embedding (the reference's negative prompt is text.NEGATIVE_PROMPT, encoded like any caption), or "
            "set cfg 1 for no guidance."
        )
    try:
        negative = validate_text_embedding(negative, text_dim=config.text_dim, max_tokens=config.text_max_tokens)
        return match_text_batch(negative.to(device=device, dtype=torch.float32), batch)
    except TextEmbeddingError as e:
        raise TextEmbeddingError(f"The negative text: {e}") from None
