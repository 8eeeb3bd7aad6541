"""The released 4-step student sampler as plain functions (docs/DESIGN.md §7.1).

Flow matching with x_t = (1 - t) x0 + t eps; the network predicts v = eps - x0. Each step forms
x0 = x_t - t v in float64, then re-noises to the next t with *fresh* noise (no clamping in between).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
STUDENT_MAX_STEPS = len(STUDENT_T_LIST) - 1  # the released schedule's steps; fewer subsample it
ONE_STEP_T = 1.0  # a single step runs at t = 1.0, not 0.999 (the reference's student_timestep)


def student_schedule(steps: int = STUDENT_MAX_STEPS) -> torch.Tensor:
    """The t values visited, ending at 0. 1-3 steps subsample the 5-point list by rounded linspace indices."""
    if not 1 <= steps <= STUDENT_MAX_STEPS:
        raise ValueError(f"PiD students run 1 to {STUDENT_MAX_STEPS} steps, got {steps}.")
    full = torch.tensor(STUDENT_T_LIST, dtype=torch.float32)
    if steps == 1:
        return torch.tensor([ONE_STEP_T, 0.0], dtype=torch.float32)
    if steps == STUDENT_MAX_STEPS:
        return full
    return full[torch.linspace(0, STUDENT_MAX_STEPS, steps + 1).round().long()]


X0_SLICE_ELEMENTS = 1 << 20  # float64 temporaries of at most 8 MiB each per row slice


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x0 = x_t - t v computed in float64 and returned in x_t's dtype (as the reference).

    Large tensors are computed in slices of rows (dim -2): the float64 temporaries of an 8K canvas
    would be several GB at once. `out` (may be x_t itself) receives the result instead of a new
    tensor. The arithmetic is elementwise, so the result is bit-identical to the whole-tensor
    expression however it is sliced."""
    t64 = t.double().reshape(-1, *([1] * (x_t.ndim - 1)))
    if x_t.ndim < 3 or x_t.numel() <= X0_SLICE_ELEMENTS:
        result = (x_t.double() - t64 * v.double()).to(x_t.dtype)
        return result if out is None else out.copy_(result)
    v = v.expand_as(x_t)
    if out is None:
        out = torch.empty_like(x_t, memory_format=torch.contiguous_format)
    rows = x_t.shape[-2]
    step = max(1, X0_SLICE_ELEMENTS // max(1, x_t.numel() // rows))
    for r in range(0, rows, step):
        sl = (..., slice(r, r + step), slice(None))
        out[sl] = (x_t[sl].double() - t64 * v[sl].double()).to(x_t.dtype)
    return out


StepCallback = Callable[[int, int, torch.Tensor], None]


def sample(
    velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    times: torch.Tensor,
    *,
    renoise: Optional[Sequence[torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    overwrite_noise: bool = False,
) -> torch.Tensor:
    """Run the student loop over `times` (student_schedule(steps): the t of each step, ending at 0) and
    return x0 clamped to [-1, 1].

    velocity_fn(x_t, t[B]) -> v. noise is the initial x at t = 1. The fresh noise of each re-noise
    step comes from `renoise` (explicit tensors, to match a reference run) or is drawn from
    `generator` in order, one draw per step, like the reference. callback(step, steps, x0) runs after
    every step, before x0 is re-noised in place: read x0 there, clone it to keep it; raising from it
    cancels the run.

    Memory: the loop keeps one canvas-size state and updates it in place (re-noise, clamp). A
    velocity function that also has `denoise_in_place(x, t) -> x` (tiling.TiledVelocity) writes x0
    over x itself and never holds a whole-canvas v; noise is then copied first unless
    overwrite_noise=True hands its storage to the loop. The arithmetic is the reference's either way.
    """
    t_list = times.to(device=noise.device, dtype=torch.float32)
    steps = len(t_list) - 1
    B = noise.shape[0]
    x = noise.float()
    owned = overwrite_noise or x.data_ptr() != noise.data_ptr()
    in_place = getattr(velocity_fn, "denoise_in_place", None)
    for i in range(steps):
        t_cur, t_next = t_list[i], t_list[i + 1]
        if in_place is not None:
            if not owned:
                x, owned = x.clone(), True
            x0 = in_place(x, t_cur.expand(B))
        else:
            v = velocity_fn(x, t_cur.expand(B))
            x0 = velocity_to_x0(x, v, t_cur.expand(B))
            del v
        del x
        if callback is not None:
            callback(i + 1, steps, x0)
        if t_next.item() > 0:
            eps = renoise[i].to(x0) if renoise is not None else _randn_like(x0, generator)
            x = renoise_(x0, eps, t_next, eps_is_scratch=renoise is None)
            del eps  # a whole canvas: not kept through the next step's network calls
        else:
            x = x0
        del x0
    return x.clamp_(-1, 1)


def renoise_(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, *, eps_is_scratch: bool = False) -> torch.Tensor:
    """x0 <- (1 - t) x0 + t eps in place, with the rounding of the reference's out-of-place expression
    (two fp32 products, one fp32 sum). eps is scaled in place when it is scratch."""
    x0.mul_(1.0 - t)
    eps = eps.mul_(t) if eps_is_scratch else t * eps
    return x0.add_(eps)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device)


def initial_noise(shape, *, seed: int, device="cpu", generator_device=None) -> tuple[torch.Tensor, torch.Generator]:
    """The initial noise and the generator that then yields each re-noise draw (one stream per seed)."""
    gen_device = torch.device(generator_device or device)
    generator = torch.Generator(device=gen_device).manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device), generator
