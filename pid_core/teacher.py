"""The undistilled (teacher) sampler as plain functions (docs/DESIGN.md §7.2).

The undistilled v1.5 checkpoints are the students' network sampled the slow way: DPM-Solver++
(multistep, second order, data prediction) on a shifted flow schedule, with classifier-free guidance on
the text only (the latent conditioning is in both branches). Flow matching as in sampling.py:
x_t = (1 - t) x0 + t eps, the network predicts v = eps - x0.

    times  = teacher_schedule(steps, teacher_shift(H, W))   # t_0 < 1 ... t_N = 0
    result = dpm_solver_pp(denoise_fn, noise, times)         # one (guided) prediction per step

denoise_fn(x, t) returns the guided x0 (`data_prediction` after the network's branches; tiled, the
tiles' x0 fused). Everything follows the reference's float32 arithmetic and its order of operations:
its x0 divides by 1 - t, which amplifies rounding near t = 1 by t / (1 - t) (about 6000 at shift 6), so
the same formula, not a more accurate one, is what lands on its results.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional

import torch

from .errors import ArgumentError
from .sampling import StepCallback

# The solver's time range: from T = 1 down to 1 / 1000 (its flow schedule's 1000 training steps)
T_START, T_END = 1.0, 0.001
# Shift of the flow schedule, growing with the output: base * sqrt(sqrt(H * W) / reference side).
SHIFT_BASE, SHIFT_REFERENCE_PX = 6.0, 2048


def teacher_shift(height: int, width: int) -> float:
    """The reference's resolution-dependent shift: 6 at 2048x2048, 8.49 at 4096x4096."""
    return SHIFT_BASE * math.sqrt(math.sqrt(height * width) / SHIFT_REFERENCE_PX)


# The largest shift taken: the reference's is 6 at 2048 px, 12 at 8192 px. At 100 the first time is already
# 1 - 1e-5, where x0 = (x - t n) / (1 - t) amplifies rounding 1e5 times; at a shift of 0 or below (or far
# above) the schedule starts at t = 0 or t = 1 exactly and every x0 is infinite.
MAX_SHIFT = 100.0


def check_shift(shift) -> float:
    """A schedule shift given by the user, as a float: a number in (0, MAX_SHIFT]."""
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < float(shift) <= MAX_SHIFT:
        raise ArgumentError(f"shift must be a number above 0 and at most {MAX_SHIFT:g} (the reference's is 6 at "
                            f"2048x2048, 8.49 at 4096x4096; None: that value for the output size), got {shift!r}.")
    return float(shift)


def teacher_schedule(steps: int, shift: float) -> torch.Tensor:
    """The times visited, float32 [steps + 1], from shift(0.999) down to exactly 0.

    As the reference computes them (its "time_uniform_flow" spacing), in float32: uniform times from
    1 to 0.001, turned into s = 1 - t, shifted s' = shift s / (1 + (shift - 1) s), reversed. The
    network runs at the first `steps` of them; the last (0) is where the solver ends."""
    if steps < 1:
        raise ValueError(f"the teacher schedule needs at least one step, got {steps}")
    s = 1.0 - torch.linspace(T_START, T_END, steps + 1, dtype=torch.float32)
    return (shift * s / (1 + (shift - 1) * s)).flip(0)


# Near t = 1 the reference's x0 = (x - t n) / (1 - t) amplifies rounding by t / (1 - t): above 100x, any
# change in the order of operations (such as batching the two guidance branches into one forward, which
# changes the matmuls' rounding) moves a few-step result by about the reference cases' tolerances. There
# the branches run as two forwards, in the reference's order; below, batching changes nothing visible.
REFERENCE_ORDER_FROM_T = 0.99


def branches_may_share_forward(t: torch.Tensor) -> bool:
    """Whether the two guidance branches at times t may run as one batched forward."""
    return bool((t < REFERENCE_ORDER_FROM_T).all())


def data_prediction(x: torch.Tensor, t: torch.Tensor, v_cond: torch.Tensor, v_uncond: Optional[torch.Tensor] = None,
                    cfg: float = 1.0) -> torch.Tensor:
    """x0 from the network's velocities, with classifier-free guidance when v_uncond is given.

    The reference's arithmetic, in float32: each branch's noise prediction n = (1 - t) v + x, guided
    n_u + cfg (n_c - n_u), then x0 = (x - t n) / (1 - t). t is per sample ([B], x's rows)."""
    t = t.float().reshape(-1, *([1] * (x.ndim - 1)))
    x = x.float()
    noise = (1 - t) * v_cond.float() + x
    if v_uncond is not None:
        noise_uncond = (1 - t) * v_uncond.float() + x
        noise = noise_uncond + cfg * (noise - noise_uncond)
    return (x - t * noise) / (1 - t)


def _lambda(t: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of the flow schedule, log(1 - t) - log(t), in float32 (+inf at t = 0)."""
    return torch.log(1 - t) - torch.log(t)


def update_coefficients(t_prev: Optional[torch.Tensor], t_cur: torch.Tensor, t_next: torch.Tensor):
    """(a, b, d) of the step from t_cur to t_next, float32 0-dim tensors as the reference computes them:
    x_next = a x - b x0_cur [- (0.5 b) d (x0_cur - x0_prev)]; d is None for a first-order step.

    DPM-Solver++ (data prediction): a = sigma_next / sigma_cur, b = alpha_next expm1(-h) with h the
    change of half log-SNR; the multistep second-order term uses d = 1 / r, r = h_prev / h. To t = 0
    (h infinite) the first-order step gives a = 0, b = -1: x0_cur itself."""
    lam_cur, lam_next = _lambda(t_cur), _lambda(t_next)
    h = lam_next - lam_cur
    alpha_next = torch.exp(torch.log(1 - t_next))
    a = t_next / t_cur
    b = alpha_next * torch.expm1(-h)
    d = None if t_prev is None else 1.0 / ((lam_cur - _lambda(t_prev)) / h)
    return a, b, d


UPDATE_SLICE_ELEMENTS = 1 << 20  # per-slice temporaries of at most 4 MiB each (float32)


def solver_update_(x: torch.Tensor, x0_cur: torch.Tensor, x0_prev: Optional[torch.Tensor], a, b, d) -> torch.Tensor:
    """x <- a x - b x0_cur - (0.5 b) (d (x0_cur - x0_prev)) in place, in the reference's float32 order,
    over row slices (dim -2) so no canvas-size temporary exists; elementwise, so bit-identical to the
    whole-tensor expression."""
    a, b = a.to(x.device), b.to(x.device)
    half_b, d = 0.5 * b, None if d is None else d.to(x.device)
    rows = x.shape[-2] if x.ndim >= 3 else 1
    step = rows if x.ndim < 3 else max(1, UPDATE_SLICE_ELEMENTS // max(1, x.numel() // rows))
    for r in range(0, rows, step):
        sl = (..., slice(r, r + step), slice(None)) if x.ndim >= 3 else (...,)
        new = a * x[sl] - b * x0_cur[sl]
        if d is not None:
            new = new - half_b * (d * (x0_cur[sl] - x0_prev[sl]))
        x[sl] = new
    return x


def dpm_solver_pp(
    denoise_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    times: torch.Tensor,
    *,
    callback: Optional[StepCallback] = None,
    overwrite_noise: bool = False,
    clamp: bool = True,
) -> torch.Tensor:
    """Multistep DPM-Solver++ (second order, data prediction) from `noise` at times[0] to times[-1] = 0.

    denoise_fn(x, t[B]) -> x0 (guided; `data_prediction`). One evaluation per step, at times[:-1]. The
    first step is first order (no history yet), the middle ones second order, the last first order
    again, which returns the last evaluation's x0 (the reference's lower order at the final step): so
    1 step is x0 of the noise, 2 steps are two first-order steps.

    callback(step, steps, x0) after each evaluation, with that step's x0 (read it there; raising from
    it cancels). Memory: three canvases (x, this step's x0, the previous one); noise is copied first
    unless overwrite_noise=True. Returns the result clamped to [-1, 1] (clamp=False: the raw result).
    """
    steps = len(times) - 1
    times = times.detach().to("cpu", torch.float32)
    if steps < 1 or times[-1].item() != 0.0:
        raise ValueError("the teacher schedule must have at least two times and end at 0")
    B = noise.shape[0]
    x = noise.float()
    if x.data_ptr() == noise.data_ptr() and not overwrite_noise:
        x = x.clone()
    x0_prev = None
    for i in range(steps):
        x0 = denoise_fn(x, times[i].expand(B).to(x.device))
        if callback is not None:
            callback(i + 1, steps, x0)
        second_order = 0 < i < steps - 1
        a, b, d = update_coefficients(times[i - 1] if second_order else None, times[i], times[i + 1])
        solver_update_(x, x0, x0_prev if second_order else None, a, b, d)
        x0_prev = x0
        del x0
    return x.clamp_(-1, 1) if clamp else x
