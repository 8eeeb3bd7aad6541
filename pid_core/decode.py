"""One call from what a user has to an image: latent (+ its sigma), text, checkpoint -> RGB in [0, 1].

    image = decode(model, latent, text=embedding, sigma=0.3, seed=0)

decode() resolves a plan (plan.plan_decode: format, sigma, PiD-space latent, size, text batch, sampler,
tiles) and runs it (run_plan): the student sampler drives the network through network_velocity, the
teacher's guided DPM-Solver++ through network_denoiser (the whole canvas or tiles fused at every step);
the result is clamped and mapped to [0, 1].
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch

from .errors import PidError, TextEmbeddingError
from .plan import NO_META, DecodePlan, LatentMeta, Sigma, plan_decode
from .sampling import initial_noise, sample
from .teacher import dpm_solver_pp, teacher_schedule
from .text import NEGATIVE_PROMPT
from .variants import TEACHER
from .velocity import network_denoiser, network_velocity

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
    compile: bool = False,
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
    cfg: the teacher's guidance scale (None: 5; 1: no guidance). negative: its unconditional text, an
        embedding or prompt(s); None: the reference's negative prompt through text_encoder. shift: the
        teacher's schedule shift (None: the reference's value for the output size).
    callback(step, steps, x0): after each step with x0 in [-1, 1]; raise from it to cancel.
    tiling: None (one pass over the whole canvas) or tiling.TileOptions (auto: tiles only beyond the
        trained size or the memory budget; manual: fixed tiles).
    tile_callback(done, total): after each batch of tiles (progress, cancel).
    compile: torch.compile the network (static shapes; worth it for many decodes of one size on a GPU).
    """
    if isinstance(model, str):
        from .checkpoint import load_pid

        model = load_pid(model)
    plan = plan_decode(model, latent, encode_text(text, text_encoder), meta=meta, latent_format=latent_format,
                       sigma=sigma, leftover_noise=leftover_noise, tiling=tiling, bn_stats=bn_stats,
                       sampler=sampler, steps=steps, cfg=cfg, shift=shift,
                       negative=lambda: encode_negative(negative, text_encoder))
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
    compile: bool = False,
) -> torch.Tensor:
    """Run the plan's sampler; RGB [B, 3, H, W] in [0, 1] (arguments as decode(); after_forward() runs
    after every network call, for cancel checks)."""
    device = plan.device
    shape = (plan.batch, 3, *plan.output_hw)
    canvas_device = device if plan.tiles.canvas_on_device else torch.device("cpu")
    steps = plan.sampler.steps
    if plan.sampler.kind == TEACHER:
        if renoise is not None:
            raise PidError("The teacher sampler is an ODE solver: it draws no re-noise, so renoise does not apply.")
        if noise is None:
            noise, _ = initial_noise(shape, seed=seed, device=canvas_device, generator_device=device)
            owned = True
        elif tuple(noise.shape) != shape:
            raise PidError(f"noise has shape {tuple(noise.shape)}, the output needs {shape}.")
        else:
            owned = False
        denoiser = network_denoiser(model, plan.text, plan.latent, plan.sigma, plan.tiles, cfg=plan.sampler.cfg,
                                    negative=plan.negative, device=device, callback_per_tile=tile_callback,
                                    after_forward=after_forward, compile=compile)
        x0 = dpm_solver_pp(denoiser, noise.to(canvas_device), teacher_schedule(steps, plan.sampler.shift),
                           callback=callback, overwrite_noise=owned)
        return x0.add_(1).div_(2)
    velocity = network_velocity(model, plan.text, plan.latent, plan.sigma, plan.tiles, device=device,
                                callback_per_tile=tile_callback, after_forward=after_forward, compile=compile)
    generator = None
    if noise is None:
        # drawn on the network's device (the reference's stream there), kept where the plan puts the state
        noise, generator = initial_noise(shape, seed=seed, device=canvas_device, generator_device=device)
        owned = True
    elif tuple(noise.shape) != shape:
        raise PidError(f"noise has shape {tuple(noise.shape)}, the output needs {shape}.")
    else:
        owned = False  # the caller's tensor is left as it is
        if renoise is None:  # the re-noise draws still follow the seed
            generator = torch.Generator(device=device).manual_seed(int(seed))
    x0 = sample(velocity, noise.to(canvas_device), steps=steps, renoise=renoise, generator=generator,
                callback=callback, overwrite_noise=owned)
    return x0.add_(1).div_(2)


def encode_text(text, text_encoder):
    """Prompt(s) through the Gemma encoder; anything else is taken as a precomputed embedding (and
    checked as one by the plan)."""
    is_prompt = isinstance(text, str) or (isinstance(text, (list, tuple)) and text and all(isinstance(p, str) for p in text))
    if not is_prompt:
        return text
    if text_encoder is None:
        raise TextEmbeddingError(
            "A prompt needs a Gemma-2-2b-it text encoder: pass text_encoder (pid_core.text.GemmaTextEncoder), "
            "or give a precomputed embedding [B, 300, 2304]."
        )
    prompts = [text] if isinstance(text, str) else list(text)
    return text_encoder.encode(prompts)


def encode_negative(negative, text_encoder):
    """The unconditional text of a guided decode: an embedding as given, prompt(s) through the encoder,
    None: the reference's negative prompt through the encoder (None without an encoder: the plan then
    says what is missing)."""
    if negative is None:
        return None if text_encoder is None else text_encoder.encode([NEGATIVE_PROMPT])
    return encode_text(negative, text_encoder)
