"""Where to stop a latent model's sampler and hand its state to PiD.

PiD decodes partially denoised latents, so the latent model can stop early. The reference recommends a
stop step per backbone (variants.RECOMMENDED_STOP: FLUX.1 24 of 28, ...); these functions scale it to the
run the user set up and find the sigma the sampler really reaches there (docs/DESIGN.md §5).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .errors import PidError

# Runs of this many steps or fewer go to the end: turbo / distilled models (Z-Image-Turbo, FLUX.2 Klein),
# which cannot be told from their base models, are recommended to hand PiD their final latent.
FEW_STEPS = 12


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def scale_stop_step(stop: int, total: int, steps: int) -> int:
    """A recommended stop step `stop` of `total` steps, for a run of `steps` steps (1..steps)."""
    if total <= 0 or steps <= 0:
        raise PidError(f"steps must be positive (got {steps} of {total}).")
    return max(1, min(steps, round_half_up(steps * stop / total)))


def choose_stop_step(
    stop_at_step: int,
    steps: int,
    *,
    backbone: Optional[str],
    recommended: Optional[tuple[int, int]],
    distilled: bool = False,
) -> int:
    """The step at which to stop, 1..steps (steps = run to the end, a clean latent).

    stop_at_step >= 1 is taken as is (capped at steps). 0 or -1 ("auto") uses the backbone's
    recommended point (e.g. FLUX.1 24 of 28) scaled to `steps`; a distilled model, a backbone whose
    recommendation is "the final x0" (recommended None), or a run of at most FEW_STEPS steps runs to the end.
    """
    steps = int(steps)
    if steps < 1:
        raise PidError(f"steps must be at least 1, got {steps}.")
    stop_at_step = int(stop_at_step)
    if stop_at_step >= 1:
        return min(stop_at_step, steps)
    if stop_at_step < -1:
        raise PidError(
            f"stop_at_step {stop_at_step} is not valid: give a step from 1 to {steps}, or 0 / -1 for the "
            "model's recommended stop step."
        )
    if backbone is None:
        raise PidError(
            "stop_at_step is 'auto' (0 or -1), but this model is not one PiD knows a recommended stop step "
            "for (FLUX.1, FLUX.2, SD3, SDXL, Qwen-Image, Z-Image). Set stop_at_step to a step number, "
            "e.g. about 85% of the steps."
        )
    if distilled or recommended is None or steps <= FEW_STEPS:
        return steps
    stop, total = recommended
    return scale_stop_step(stop, total, steps)


def split_sigmas(sigmas: Sequence[float], stop_step: int) -> tuple[int, float]:
    """(k, sigma_k) for the sigmas a sampler really uses (len = steps + 1, last usually 0).

    k is the stop step capped at the last index, sigma_k the level the state has after k steps.
    An empty schedule (denoise 0) gives (0, 0.0): nothing runs and the latent is returned as is.
    """
    n = len(sigmas)
    if n <= 1:
        return 0, 0.0
    k = max(0, min(int(stop_step), n - 1))
    return k, float(sigmas[k])
