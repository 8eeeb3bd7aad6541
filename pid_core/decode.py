"""One call from what a user has to an image: latent (+ its sigma), text, checkpoint -> RGB in [0, 1].

    image = decode(model, latent, text=embedding, sigma=0.3, seed=0)

Steps (spec 1): the latent goes to PiD's input space (latents.py) and is rounded to bf16 as in the
reference pipeline; the output size is latent size x VAE factor x scale; the student sampler runs
the network (whole canvas, or tiles fused at every step); the result is clamped and mapped to [0, 1].
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence, Union

import torch

from .errors import LatentError, PidError, TextEmbeddingError
from .latents import LATENT_FORMATS, detect_latent_format, prepare_latent
from .precision import compute_context
from .sampling import initial_noise, sample
from .text import validate_text_embedding

log = logging.getLogger("pid_core")

ProgressCallback = Callable[[int, int, torch.Tensor], None]


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def resolve_latent_format(name: str, model, latent: torch.Tensor) -> str:
    """'auto', a latent format name, or a backbone name (zimage -> flux, klein -> flux2, ...)."""
    name = (name or "auto").lower()
    config = model.config
    variant = model.variant
    if name == "auto":
        return detect_latent_format(
            latent, adapter_in_channels=config.adapter_in_channels, unpatchify=config.latent_unpatchify, variant=variant
        )
    if name in LATENT_FORMATS:
        return name
    from .variants import BACKBONES, variants_for_backbone

    if name in BACKBONES:
        return variants_for_backbone(name)[0].latent_format
    raise LatentError(
        f"Unknown latent format {name!r}. Choose auto, one of {', '.join(LATENT_FORMATS)}, "
        f"or a backbone name ({', '.join(BACKBONES)})."
    )


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


def output_hw(model, pid_latent: torch.Tensor) -> tuple[int, int]:
    """Output = PiD-space latent size x (VAE factor x super-resolution scale) (spec 8)."""
    scale = model.config.scale
    return pid_latent.shape[-2] * scale, pid_latent.shape[-1] * scale


def warn_about_size(model, height: int, width: int) -> Optional[str]:
    variant = model.variant
    if variant is None:
        return None
    from .variants import check_output_size

    message = check_output_size(variant, height, width)
    if message:
        log.warning(message)
    return message


def decode(
    model,
    latent: torch.Tensor,
    *,
    text: Union[torch.Tensor, str, Sequence[str]],
    text_encoder=None,
    latent_format: str = "auto",
    sigma: Union[float, torch.Tensor] = 0.0,
    leftover_noise: bool = False,
    seed: int = 0,
    steps: int = 4,
    noise: Optional[torch.Tensor] = None,
    renoise: Optional[Sequence[torch.Tensor]] = None,
    callback: Optional[ProgressCallback] = None,
    tiling=None,
    tile_callback: Optional[Callable[[int, int], None]] = None,
    bn_stats=None,
) -> torch.Tensor:
    """Decode a latent with a PiD model. Returns RGB [B, 3, H, W] float32 in [0, 1] on the model's device
    (on the CPU when the tile plan keeps the sampler's state there: TileOptions.canvas_on_device).

    model: a loaded PidNet (checkpoint.load_pid) or a checkpoint path.
    latent: what a ComfyUI LATENT's `samples` holds (raw VAE space, [B,C,h,w] or Qwen's [B,C,1,h,w]),
        with latent_format "auto", a format or a backbone name; "pid" for a latent already in PiD space.
    sigma: the latent's noise level (0 clean, or the step a sampler stopped at), float or per sample [B];
        the latent holds the sampler's state x_t at that sigma. leftover_noise=True instead takes a stock
        ComfyUI leftover latent x_t / (1 - sigma) (KSamplerAdvanced with return_with_leftover_noise).
    text: a Gemma embedding [B or 1, T, 2304], or prompt(s) encoded with text_encoder (text.GemmaTextEncoder).
    seed: the noise seed (on CUDA the same stream as the reference); noise / renoise: explicit tensors instead
        (explicit noise without renoise: the re-noise draws come from seed).
    callback(step, steps, x0): after each step with x0 in [-1, 1]; raise from it to cancel.
    tiling: None (one pass over the whole canvas, the reference's order of operations) or
        tiling.TileOptions (auto: tiles only beyond the trained size or the memory budget; manual: fixed tiles).
    tile_callback(done, total): after each batch of tiles (progress, cancel).
    """
    if isinstance(model, str):
        from .checkpoint import load_pid

        model = load_pid(model)
    if not 1 <= int(steps) <= 4:
        raise PidError(f"PiD students run 1 to 4 steps; got {steps}. Use 4 for the released quality.")
    device = model_device(model)
    config = model.config

    fmt = resolve_latent_format(latent_format, model, latent)
    z, degrade_sigma = prepare_latent(
        latent.to(device), fmt, sigma, expected_channels=config.latent_channels, bn_stats=bn_stats,
        undo_noise_scaling=leftover_noise,
    )
    # The reference hands the latent to the network as bf16 (spec 2.5): keep that quantisation.
    z = z.to(torch.bfloat16).float()
    batch = z.shape[0]

    embedding = _text_embedding(text, text_encoder)
    embedding = validate_text_embedding(embedding, text_dim=config.text_dim, max_tokens=config.text_max_tokens)
    embedding = match_text_batch(embedding.to(device=device, dtype=torch.float32), batch)

    height, width = output_hw(model, z)
    warn_about_size(model, height, width)

    velocity, canvas_device = _velocity(model, z, embedding, degrade_sigma, (height, width), device, tiling,
                                        tile_callback)
    generator = None
    if noise is None:
        # drawn on the network's device (the reference's stream there), kept where the plan puts the state
        noise, generator = initial_noise((batch, 3, height, width), seed=seed, device=canvas_device,
                                         generator_device=device)
        owned = True
    elif tuple(noise.shape) != (batch, 3, height, width):
        raise PidError(f"noise has shape {tuple(noise.shape)}, the output needs {(batch, 3, height, width)}.")
    else:
        owned = False  # the caller's tensor is left as it is
        if renoise is None:  # the re-noise draws still follow the seed
            generator = torch.Generator(device=device).manual_seed(int(seed))
    x0 = sample(velocity, noise.to(canvas_device), steps=int(steps), renoise=renoise, generator=generator,
                callback=callback, overwrite_noise=owned)
    return x0.add_(1).div_(2)


def _velocity(model, z, embedding, sigma, canvas_hw, device, tiling, tile_callback):
    """The velocity function the sampler calls (the network on the whole canvas, or tiles fused per
    step) and the device of the sampler's canvas state."""
    if tiling is None:
        def network(x, t):
            with compute_context(model, device):
                return model(x, t, embedding, z, sigma)

        return network, device
    from .precision import weight_dtype
    from .tiling import make_velocity, plan_decode

    variant = model.variant
    plan = plan_decode(model.config, canvas_hw, tiling, dtype=weight_dtype(model), variant=variant, batch=z.shape[0])
    log.info("PiD tiling: %s", plan.reason)
    canvas_device = device if plan.canvas_on_device else torch.device("cpu")
    velocity = make_velocity(model, embedding, z, sigma, plan=plan, device=device, callback_per_tile=tile_callback)
    return velocity, canvas_device


def _text_embedding(text, text_encoder) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text
    if text_encoder is None:
        raise TextEmbeddingError(
            "A prompt needs a Gemma-2-2b-it text encoder: pass text_encoder (pid_core.text.GemmaTextEncoder), "
            "or give a precomputed embedding [B, 300, 2304]."
        )
    prompts = [text] if isinstance(text, str) else list(text)
    return text_encoder.encode(prompts)
