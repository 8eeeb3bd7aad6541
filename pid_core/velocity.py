"""The functions the samplers call: the network on the whole canvas, or tiles fused per step.

This is where the network meets the samplers. Everything comes from the decode plan: the network runs
on plan.device in plan.compute_dtype (precision.compute_context) with the plan's pixel-block chunking,
on the plan's latent, text and sigma (already matched to the batch); the sampler's state lives on
plan.canvas_device (the CPU, for large canvases on small cards): tiles travel to the device and their
results come back.

  network_velocity   v(x, t) for the student sampler (sampling.sample)
  network_denoiser   the guided x0(x, t) for the teacher sampler (teacher.dpm_solver_pp): both text
                     branches per tile (one batched forward or two), guided, then fused over tiles
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .precision import compute_context
from .teacher import branches_may_share_forward, data_prediction
from .tiling import TiledVelocity


def network_velocity(
    model,
    plan,
    *,
    callback_per_tile: Optional[Callable[[int, int], None]] = None,
    after_forward: Optional[Callable[[], None]] = None,
    compile: bool = False,
    max_batches: Optional[int] = None,
    batch_runner=None,
):
    """The velocity function of a plan (plan.DecodePlan) for `sampling.sample`: v(x, t) of the whole
    canvas for an untiled plan, else a TiledVelocity (which the sampler drives row band by row band,
    never holding a whole-canvas v).

    callback_per_tile(done, total) after each batch of tiles; after_forward() after every network call
    (cancel checks). compile: torch.compile the network with static shapes (every tile batch padded to
    one shape); the first call of each shape compiles. max_batches: benchmarks only (see TiledVelocity).
    batch_runner: where tile batches run (TiledVelocity; None: all in this process)."""
    forward = _network_forward(model, plan, compile=compile, after_forward=after_forward)
    return _over_canvas(forward, model, plan, (plan.text, plan.sigma), callback_per_tile=callback_per_tile,
                        max_batches=max_batches, pad=compile, batch_runner=batch_runner)


def network_denoiser(
    model,
    plan,
    *,
    callback_per_tile: Optional[Callable[[int, int], None]] = None,
    after_forward: Optional[Callable[[], None]] = None,
    compile: bool = False,
    batch_runner=None,
):
    """The guided data prediction x0(x, t) of a plan's canvas for `teacher.dpm_solver_pp`.

    Classifier-free guidance on the text only: plan.negative replaces the text in the unconditional
    branch, the latent and sigma stay. Unguided (cfg 1) runs the conditional branch alone (as the
    reference does). plan.tiles.branches == 2 runs both branches as one forward of twice the batch
    ([uncond; cond], when the plan found the memory for it and t is not near 1:
    teacher.REFERENCE_ORDER_FROM_T), else two forwards, uncond first. The guidance and x0 are formed
    per tile (`teacher.data_prediction`), and tiles fuse x0, which is the same as fusing the guided v
    (weights summing to 1): one state for the canvas at every step. Other arguments as network_velocity."""
    forward = _network_forward(model, plan, compile=compile, after_forward=after_forward)
    cfg = plan.sampler.cfg
    if not plan.sampler.guided:
        def call(x, t, z, y, s):
            return data_prediction(x, t, forward(x, t, z, y, s))

        return _over_canvas(call, model, plan, (plan.text, plan.sigma), callback_per_tile=callback_per_tile,
                            pad=compile, batch_runner=batch_runner)
    batched = plan.tiles.branches == 2

    def guided(x, t, z, y, s, y_neg):
        if batched and branches_may_share_forward(t):
            v_uncond, v_cond = forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z]),
                                       torch.cat([y_neg, y]), torch.cat([s, s])).chunk(2)
        else:
            v_uncond = forward(x, t, z, y_neg, s)
            v_cond = forward(x, t, z, y, s)
        return data_prediction(x, t, v_cond, v_uncond, cfg)

    return _over_canvas(guided, model, plan, (plan.text, plan.sigma, plan.negative),
                        callback_per_tile=callback_per_tile, pad=compile, batch_runner=batch_runner)


def _network_forward(model, plan, *, compile: bool = False, after_forward: Optional[Callable[[], None]] = None):
    """(x, t, latent, text, sigma) -> v: one network call on the plan's device, in its compute dtype, with
    its chunking."""
    network = torch.compile(model, mode="default", dynamic=False) if compile else model
    chunk = plan.tiles.pixel_chunk_tokens
    device, dtype = plan.device, plan.compute_dtype

    def forward(x, t, z, y, s):
        with torch.no_grad(), compute_context(device, dtype):
            v = network(x, t, y, z, s, chunk_tokens=chunk)
        if after_forward is not None:
            after_forward()
        return v

    return forward


def _over_canvas(call, model, plan, conditioning, *, callback_per_tile=None, max_batches=None, pad=False,
                 batch_runner=None):
    """call(x, t, latent, *conditioning) over the canvas: once for an untiled plan (on the plan's device,
    the result back on x's device), else per tile, fused (TiledVelocity)."""
    device = plan.device
    if not plan.tiles.tiled:
        def whole(x, t):
            return call(x.to(device), t.reshape(-1).expand(x.shape[0]).to(device), plan.latent,
                        *conditioning).to(x.device)

        return whole
    return TiledVelocity(
        call, plan.latent, plan.tiles.tiles, scale=model.config.scale, batch_tiles=plan.tiles.batch_tiles,
        conditioning=conditioning, device=device, callback_per_tile=callback_per_tile,
        max_batches=max_batches, pad_batches=pad, batch_runner=batch_runner,
    )
