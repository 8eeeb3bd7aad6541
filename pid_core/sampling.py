"""The released 4-step student sampler as plain functions (spec 6).

Flow matching with x_t = (1 - t) x0 + t eps; the network predicts v = eps - x0. Each step forms
x0 = x_t - t v in float64, then re-noises to the next t with *fresh* noise (no clamping in between).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)
ONE_STEP_T = 1.0  # a single step runs at t = 1.0, not 0.999 (the reference's student_timestep)


def student_schedule(steps: int = 4) -> torch.Tensor:
    """The t values visited, ending at 0. 1-3 steps subsample the 5-point list by rounded linspace indices."""
    if not 1 <= steps <= 4:
        raise ValueError(f"PiD students run 1 to 4 steps, got {steps}.")
    full = torch.tensor(STUDENT_T_LIST, dtype=torch.float32)
    if steps == 1:
        return torch.tensor([ONE_STEP_T, 0.0], dtype=torch.float32)
    if steps == len(full) - 1:
        return full
    return full[torch.linspace(0, len(full) - 1, steps + 1).round().long()]


X0_SLICE_ELEMENTS = 1 << 22  # float64 temporaries of at most 32 MiB each per row slice


def velocity_to_x0(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v computed in float64 and returned in x_t's dtype (as the reference).

    Large tensors are computed in slices of rows (dim -2) into one output: the float64 temporaries
    of an 8K canvas would be several GB at once. The arithmetic is elementwise, so the result is
    bit-identical to the whole-tensor expression."""
    t64 = t.double().reshape(-1, *([1] * (x_t.ndim - 1)))
    if x_t.ndim < 3 or x_t.numel() <= X0_SLICE_ELEMENTS:
        return (x_t.double() - t64 * v.double()).to(x_t.dtype)
    v = v.expand_as(x_t)
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
    *,
    steps: int = 4,
    renoise: Optional[Sequence[torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
) -> torch.Tensor:
    """Run the student loop and return x0 clamped to [-1, 1].

    velocity_fn(x_t, t[B]) -> v. noise is the initial x at t = 1. The fresh noise of each re-noise
    step comes from `renoise` (explicit tensors, to match a reference run) or is drawn from
    `generator` in order, one draw per step, like the reference. callback(step, steps, x0) runs after
    every step; raising from it cancels the run.
    """
    t_list = student_schedule(steps).to(noise.device)
    B = noise.shape[0]
    x = noise.float()
    for i in range(steps):
        t_cur, t_next = t_list[i], t_list[i + 1]
        v = velocity_fn(x, t_cur.expand(B))
        x0 = velocity_to_x0(x, v, t_cur.expand(B))
        if t_next.item() > 0:
            eps = renoise[i] if renoise is not None else _randn_like(x0, generator)
            x = (1.0 - t_next) * x0 + t_next * eps.to(x0)
        else:
            x = x0
        if callback is not None:
            callback(i + 1, steps, x0)
    return x.clamp(-1, 1)


def _randn_like(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    gen_device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gen_device, dtype=torch.float32).to(x.device)


def initial_noise(shape, *, seed: int, device="cpu", generator_device=None) -> tuple[torch.Tensor, torch.Generator]:
    """The initial noise and the generator that then yields each re-noise draw (one stream per seed)."""
    gen_device = torch.device(generator_device or device)
    generator = torch.Generator(device=gen_device).manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=torch.float32)
    return noise.to(device), generator
