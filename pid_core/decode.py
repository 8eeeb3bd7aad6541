"""One call from what a user has to an image: latent (+ its sigma), text, checkpoint -> RGB in [0, 1].

    image = decode(model, latent, text=embedding, sigma=0.3, seed=0)

decode() resolves a plan (plan.plan_decode: every fact of the decode, decided once) and runs it
(run_plan): the plan's sampler drives the network through velocity.py (the whole canvas, or tiles fused
at every step); the result is clamped and mapped to [0, 1].
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Optional, Sequence, Union

import torch

from .checks import all_finite, check_seed
from .colour import colour_error, describe_match, match_colour
from .errors import ArgumentError, DecodeError, TextEmbeddingError
from .latents import NO_META, LatentMeta, Sigma
from .plan import DecodePlan, plan_decode
from .sampling import initial_noise, sample
from .teacher import dpm_solver_pp
from .text import NEGATIVE_PROMPT
from .variants import TEACHER
from .velocity import network_denoiser, network_velocity
from .wording import term

log = logging.getLogger("pid_core")

ProgressCallback = Callable[[int, int, torch.Tensor], None]


def decode(
    model,
    latent: torch.Tensor,
    *,
    text: Union[torch.Tensor, str, Sequence[str]],
    text_encoder=None,
    latent_format: str = "auto",
    sigma: Optional[Sigma] = None,
    meta: LatentMeta = NO_META,
    leftover_noise: bool = False,
    seed: int = 0,
    steps: Optional[int] = None,
    sampler: str = "auto",
    cfg: Optional[float] = None,
    negative: Union[torch.Tensor, str, Sequence[str], None] = None,
    shift: Optional[float] = None,
    noise: Optional[torch.Tensor] = None,
    renoise: Optional[Sequence[torch.Tensor]] = None,
    callback: Optional[ProgressCallback] = None,
    tiling=None,
    tile_callback: Optional[Callable[[int, int], None]] = None,
    bn_stats=None,
    compile: bool | str = False,
    color_reference: Optional[torch.Tensor] = None,
    color_match: Optional[float] = None,
) -> torch.Tensor:
    """Decode a latent with a PiD model. Returns RGB [B, 3, H, W] float32 in [0, 1] on the model's device
    (on the CPU when the tile plan keeps the sampler's state there: TileOptions.canvas_on_device).

    model: a loaded PidNet (checkpoint.load_pid) or a checkpoint path.
    latent: what a ComfyUI LATENT's `samples` holds (raw VAE space, [B,C,h,w] or Qwen's [B,C,1,h,w]),
        with latent_format "auto", a format or a backbone name; "pid" for a latent already in PiD space.
    sigma: the latent's noise level (0 clean, or the step a sampler stopped at), float or per sample [B];
        None: the one in `meta` (what travels with the latent), else 0. The latent holds the sampler's
        state x_t at that sigma; leftover_noise=True instead takes a stock ComfyUI leftover latent
        x_t / (1 - sigma) (KSamplerAdvanced with return_with_leftover_noise).
    text: a Gemma embedding [B or 1, T, 2304], or prompt(s) encoded with text_encoder (text.GemmaTextEncoder).
    seed: the noise seed (on CUDA the same stream as the reference); noise / renoise: explicit tensors instead
        (explicit noise without renoise: the re-noise draws come from seed; the teacher draws no re-noise).
    sampler: "auto" (the checkpoint's kind: the 4-step student, or the teacher's guided DPM-Solver++ for
        the undistilled checkpoints), "student" or "teacher". steps: None for the kind's default (4 or 25).
    cfg: the teacher's guidance scale, 0 or more (None: the default, 5; 1: no guidance). negative: its
        unconditional text, an embedding or prompt(s); None: the reference's negative prompt through
        text_encoder. shift: the teacher's schedule shift (None: the reference's value for the output size).
    callback(step, steps, x0): after each step with x0 in [-1, 1]; raise from it to cancel.
    tiling: None (one pass over the whole canvas) or tiling.TileOptions (auto: tiles only beyond the
        trained size or the memory budget; manual: fixed tiles).
    tile_callback(done, total): after each batch of tiles (progress, cancel).
    compile: torch.compile the network's blocks (True, or a torch.compile mode such as "reduce-overhead";
        compiled once, reused at any size; worth it on a GPU: compile.py).
    color_reference: an image [1 or B, 3, h, w] in [0, 1] of the same scene whose colours the result keeps
        (the VAE decode of the latent, an upscale's source), any size with the output's aspect ratio;
        color_match: 0 to 1, how strongly (None: 1). The colour error before and after is logged.
    """
    check_seed(seed)  # checked again by run_plan; here before a text encoder or checkpoint loads
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_pid

        model = load_pid(model)
    plan = plan_decode(model, latent, encode_text(text, text_encoder), meta=meta, latent_format=latent_format,
                       sigma=sigma, leftover_noise=leftover_noise, tiling=tiling, bn_stats=bn_stats,
                       sampler=sampler, steps=steps, cfg=cfg, shift=shift,
                       negative=lambda: encode_negative(negative, text_encoder), color_reference=color_reference,
                       color_match=color_match)
    return run_plan(model, plan, seed=seed, noise=noise, renoise=renoise, callback=callback,
                    tile_callback=tile_callback, compile=compile)


def run_plan(
    model,
    plan: DecodePlan,
    *,
    seed: int = 0,
    noise: Optional[torch.Tensor] = None,
    renoise: Optional[Sequence[torch.Tensor]] = None,
    callback: Optional[ProgressCallback] = None,
    tile_callback: Optional[Callable[[int, int], None]] = None,
    after_forward: Optional[Callable[[], None]] = None,
    compile: bool | str = False,
    batch_runner=None,
    on_colour: Optional[Callable] = None,
) -> torch.Tensor:
    """Run the plan's sampler (the student's, or the teacher's guided DPM-Solver++); RGB [B, 3, H, W] in
    [0, 1] (arguments as decode(); after_forward() runs after every network call, for cancel checks).

    batch_runner: where a tiled plan's tile batches run (None: all in this process;
    distributed.TileParallel: shared among torchrun's ranks, docs/DESIGN.md §14).
    on_colour(before, after): with a colour reference in the plan, the colour error (colour.ColourError)
    of the decode before and after it is matched to the reference (docs/DESIGN.md §15).

    Before anything runs: the arguments are checked and the plan's memory against what is free
    (refused when it cannot fit). While it runs: every step's x0 is checked for NaN and infinity, and
    running out of memory becomes a DecodeError; so a result is never black or lost silently
    (docs/DESIGN.md §13)."""
    seed = check_seed(seed)
    spec = plan.sampler.spec
    steps, device, canvas_device = plan.sampler.steps, plan.device, plan.canvas_device
    shape = (plan.batch, 3, *plan.output_hw)
    noise = _check_noise(noise, shape, "noise")
    if renoise is not None:
        if not spec.draws_renoise:
            raise ArgumentError(f"The {spec.kind} sampler is an ODE solver: it draws no re-noise, so renoise does "
                                "not apply.")
        if not isinstance(renoise, (list, tuple)) or len(renoise) != steps - 1:
            count = len(renoise) if isinstance(renoise, (list, tuple)) else type(renoise).__name__
            raise ArgumentError(f"renoise takes {steps - 1} tensors for {steps} steps (one per re-noise), got {count}.")
        renoise = [_check_noise(eps, shape, f"renoise[{i}]") for i, eps in enumerate(renoise)]
    check_memory(plan)

    def checked(step, total, x0):
        # x0 before the final clamp: infinities are still visible (clamping would make them white)
        if not all_finite(x0):
            raise DecodeError(nonfinite_message(plan, step, total))
        if callback is not None:
            callback(step, total, x0)

    generator = None
    if noise is None:
        # drawn on the network's device (the reference's stream there), kept where the plan puts the state
        noise, generator = initial_noise(shape, seed=seed, device=canvas_device, generator_device=device)
        owned = True
    else:
        owned = False  # the caller's tensor is left as it is
        if renoise is None and spec.draws_renoise:  # the re-noise draws still follow the seed
            generator = torch.Generator(device=device).manual_seed(seed)
    network = dict(callback_per_tile=tile_callback, after_forward=after_forward, compile=compile,
                   batch_runner=batch_runner)
    failure = None
    try:
        if spec.kind == TEACHER:  # the one place the two samplers part (docs/DESIGN.md §7)
            x0 = dpm_solver_pp(network_denoiser(model, plan, **network), noise.to(canvas_device), plan.sampler.times,
                               callback=checked, overwrite_noise=owned)
        else:
            x0 = sample(network_velocity(model, plan, **network), noise.to(canvas_device), plan.sampler.times,
                        renoise=renoise, generator=generator, callback=checked, overwrite_noise=owned)
    except Exception as exc:  # only running out of memory is translated
        if not is_out_of_memory(exc):
            raise
        failure = out_of_memory_message(plan, exc)
    if failure is not None:  # raised outside the handler, so the failed run's tensors are freed first
        raise DecodeError(failure)
    image = x0.add_(1).div_(2)
    if plan.colour is not None:  # the whole canvas, after the tiles are fused: tiles cannot disagree
        image = _match_colour(image, plan.colour, on_colour)
    return image


def _match_colour(image: torch.Tensor, match, on_colour) -> torch.Tensor:
    """The decode with its colour reference's low-frequency colour (colour.match_colour), the colour error
    before and after measured (colour.colour_error), logged and handed to on_colour(before, after)."""
    before = colour_error(image, match.reference)
    image = match_colour(image, match.reference, match.strength)
    after = colour_error(image, match.reference)
    log.info("PiD colour against the reference: %s", describe_match(before, after, match.strength))
    if on_colour is not None:
        on_colour(before, after)
    return image


def _check_noise(noise, shape, name: str):
    if noise is None:
        return None
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ArgumentError(f"{name} must be a floating-point tensor of shape {shape}, got {type(noise).__name__}"
                            f"{' ' + str(noise.dtype) if isinstance(noise, torch.Tensor) else ''}.")
    if tuple(noise.shape) != shape:
        raise ArgumentError(f"{name} has shape {tuple(noise.shape)}, the output needs {shape}.")
    if not all_finite(noise):
        raise ArgumentError(f"{name} holds NaN or infinite values: draw it with torch.randn, or pass none and a seed.")
    return noise


# The Gemma-2 hidden states PiD was trained on stay far below this; larger values name the text as the cause.
LARGE_TEXT_VALUE = 1e4
# PiD-space latents are a few units (latents.MAX_PID_LATENT refuses the absurd); beyond this, name the latent.
LARGE_LATENT_VALUE = 100.0


def nonfinite_message(plan: DecodePlan, step: int, steps: int) -> str:
    """Why a decode gave NaN or infinity, most likely cause first: float16 overflow, text or latent values
    far out of their range, else damaged weights or inputs."""
    text_peak = plan.text.abs().amax().item()
    latent_peak = plan.latent.abs().amax().item()
    if plan.compute_dtype == torch.float16:
        cause = ("the network overflowed float16 (its largest value is 65504): load the weights as bf16 or fp32 "
                 f"({term.weights_bf16})")
    elif text_peak > LARGE_TEXT_VALUE:
        cause = f"the text embedding reaches {text_peak:.3g}, far beyond Gemma-2 hidden states: {term.encode_prompt}"
    elif latent_peak > LARGE_LATENT_VALUE:
        cause = (f"the latent reaches {latent_peak:.3g} in PiD's input space, where latents are a few units: check "
                 "the latent and its format")
    else:
        cause = f"the checkpoint or the inputs are damaged: check the checkpoint ({term.checkpoint_summary}) and the latent"
    return f"The decode gave NaN or infinite values at step {step} of {steps}, so no image was made: {cause}."


def check_memory(plan: DecodePlan) -> None:
    """Refuse, before anything is allocated, a decode whose working memory (tiling.memory's estimate, the
    plan's memory_bytes) exceeds what the device has free: the plan's budget, or for an untiled plan
    without one the device's free memory now. The sampler's state kept on the CPU is checked against
    free CPU memory."""
    from .tiling import device_memory_budget

    tiles, options = plan.tiles, plan.tile_options
    gib = 2**30
    budget, fits = options.memory_budget_bytes, tiles.fits_budget
    if budget is None and not tiles.tiled:  # one pass planned without a budget: what is free now decides
        budget = device_memory_budget(plan.device)
        fits = budget is None or tiles.memory_bytes <= budget
    H, W = plan.output_hw
    what = f"{W}x{H} px" + (f" x {plan.batch} images" if plan.batch > 1 else "")
    if not fits:
        need, free = tiles.memory_bytes / gib, budget / gib
        if options.mode == "off":
            fix = f"Use {term.tiling_auto}, which fits any size, or decode fewer images at once."
        elif options.mode == "manual":
            fix = f"Use {term.smaller_tile}, or {term.tiling_auto}, which picks a tile that fits."
        else:
            fix = f"Free memory (other programs or models), decode fewer images at once, or use {term.other_device}."
        raise DecodeError(f"Decoding {what} needs about {need:.1f} GiB of working memory on {plan.device}, and about "
                          f"{free:.1f} GiB are free. {fix}")
    if plan.canvas_device.type == "cpu":
        cpu_free = device_memory_budget("cpu")
        state = tiles.state_bytes
        if cpu_free is not None and state > cpu_free:
            raise DecodeError(f"The sampler's state for {what} takes about {state / gib:.1f} GiB of CPU memory, and "
                              f"about {cpu_free / gib:.1f} GiB are free. Decode fewer images at once or a smaller latent.")


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def out_of_memory_message(plan: DecodePlan, exc: BaseException) -> str:
    H, W = plan.output_hw
    tiled = "tiles of {}x{} px".format(*plan.tiles.tile_hw[::-1]) if plan.tiles.tiled else "one pass"
    if plan.tile_options.mode == "off":
        fix = f"use {term.tiling_auto}"
    else:  # auto chose one pass, or tiles that did not fit after all: tiles of a size given by hand
        fix = f"use {term.smaller_tile}" if plan.tiles.tiled else f"use tiles of a fixed size ({term.manual_tile})"
    return (f"Out of memory on {plan.device} while decoding {W}x{H} px in {tiled}: {fix}, decode fewer images at "
            "once, or free memory.")


def encode_text(text, text_encoder):
    """Prompt(s) through the Gemma encoder; anything else is taken as a precomputed embedding (and
    checked as one by the plan)."""
    is_prompt = isinstance(text, str) or (isinstance(text, (list, tuple)) and text and all(isinstance(p, str) for p in text))
    if not is_prompt:
        return text
    if text_encoder is None:
        raise TextEmbeddingError(f"A prompt needs the Gemma-2-2b-it text encoder: give {term.text_encoder}, or "
                                 f"{term.text_embedding} instead of the prompt.")
    prompts = [text] if isinstance(text, str) else list(text)
    return text_encoder.encode(prompts)


def encode_negative(negative, text_encoder):
    """The unconditional text of a guided decode: an embedding as given, prompt(s) through the encoder,
    None: the reference's negative prompt through the encoder (None without an encoder: the plan then
    says what is missing)."""
    if negative is None:
        return None if text_encoder is None else text_encoder.encode([NEGATIVE_PROMPT])
    return encode_text(negative, text_encoder)
