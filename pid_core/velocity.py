"""The functions the samplers call: the network on the whole canvas, or tiles fused per step.

This is where the network meets the samplers. Everything comes from the decode plan: the network runs
on plan.device in plan.compute_dtype (precision.compute_context) with the plan's pixel-block chunking,
on the plan's latent, text and sigma (already matched to the batch); the sampler's state lives on
plan.canvas_device (the CPU, for large canvases on small cards): tiles travel to the device and their
results come back. What does not change from step to step is made once per tile batch (the step cache,
network/prepared.py), keyed by the call's place on the canvas and its text branch.

  network_velocity   v(x, t) for the student sampler (sampling.sample)
  network_denoiser   the guided x0(x, t) for the teacher sampler (teacher.dpm_solver_pp): both text
                     branches per tile (one batched forward or two), guided, then fused over tiles
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .compile import use_compiled_blocks
from .network.prepared import PreparedCache
from .precision import compute_context
from .teacher import branches_may_share_forward, data_prediction
from .tiling import TiledVelocity


def network_velocity(
    model,
    plan,
    *,
    callback_per_tile: Optional[Callable[[int, int], None]] = None,
    after_forward: Optional[Callable[[], None]] = None,
    compile: bool | str = False,
    max_batches: Optional[int] = None,
    batch_runner=None,
):
    """The velocity function of a plan (plan.DecodePlan) for `sampling.sample`: v(x, t) of the whole
    canvas for an untiled plan, else a TiledVelocity (which the sampler drives row band by row band,
    never holding a whole-canvas v).

    callback_per_tile(done, total) after each batch of tiles; after_forward() after every network call
    (cancel checks). compile: False, True or a torch.compile mode: the network's repeated blocks compiled
    (compile.use_compiled_blocks), every tile batch padded to one shape. max_batches: benchmarks only
    (see TiledVelocity). batch_runner: where tile batches run (TiledVelocity; None: all in this process)."""
    forward = _network_forward(model, plan, compile=compile, after_forward=after_forward)
    return _over_canvas(forward, model, plan, (plan.text, plan.sigma), callback_per_tile=callback_per_tile,
                        max_batches=max_batches, pad=bool(compile), batch_runner=batch_runner)


def network_denoiser(
    model,
    plan,
    *,
    callback_per_tile: Optional[Callable[[int, int], None]] = None,
    after_forward: Optional[Callable[[], None]] = None,
    compile: bool | str = False,
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
        def call(x, t, z, y, s, key=None):
            return data_prediction(x, t, forward(x, t, z, y, s, key=key))

        return _over_canvas(call, model, plan, (plan.text, plan.sigma), callback_per_tile=callback_per_tile,
                            pad=bool(compile), batch_runner=batch_runner)
    batched = plan.tiles.branches == 2

    def guided(x, t, z, y, s, y_neg, key=None):
        if batched and branches_may_share_forward(t):
            v_uncond, v_cond = forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z]),
                                       torch.cat([y_neg, y]), torch.cat([s, s]), key=_branch(key, "both")).chunk(2)
        else:  # batched plans run this only near t = 1 (the first step): nothing to keep
            v_uncond = forward(x, t, z, y_neg, s, key=None if batched else _branch(key, "uncond"))
            v_cond = forward(x, t, z, y, s, key=None if batched else _branch(key, "cond"))
        return data_prediction(x, t, v_cond, v_uncond, cfg)

    return _over_canvas(guided, model, plan, (plan.text, plan.sigma, plan.negative),
                        callback_per_tile=callback_per_tile, pad=bool(compile), batch_runner=batch_runner)


def _branch(key, name: str):
    return None if key is None else (key, name)


def _network_forward(model, plan, *, compile: bool | str = False,
                     after_forward: Optional[Callable[[], None]] = None):
    """(x, t, latent, text, sigma, key=None) -> v: one network call on the plan's device, in its compute
    dtype, with its chunking. key names the call's (latent, text, sigma) for the step cache
    (plan.tiles.step_cache): what does not depend on the step is made at a key's first call and reused."""
    network = use_compiled_blocks(model, compile)
    chunk = plan.tiles.pixel_chunk_tokens
    device, dtype = plan.device, plan.compute_dtype
    step_cache = plan.tiles.step_cache
    cache = PreparedCache(model, step_cache, chunk) if step_cache != "off" else None

    def forward(x, t, z, y, s, key=None):
        with torch.no_grad(), compute_context(device, dtype):
            prepared = cache.get(key, x, z, y, s) if cache is not None and key is not None else None
            v = network(x, t, y, z, s, chunk_tokens=chunk, prepared=prepared)
        if after_forward is not None:
            after_forward()
        return v

    return forward


def _over_canvas(call, model, plan, conditioning, *, callback_per_tile=None, max_batches=None, pad=False,
                 batch_runner=None):
    """call(x, t, latent, *conditioning, key=...) over the canvas: once for an untiled plan (on the plan's
    device, the result back on x's device), else per tile, fused (TiledVelocity)."""
    device = plan.device
    if not plan.tiles.tiled:
        def whole(x, t):
            return call(x.to(device), t.reshape(-1).expand(x.shape[0]).to(device), plan.latent,
                        *conditioning, key="canvas").to(x.device)

        return whole
    return TiledVelocity(
        call, plan.latent, plan.tiles.tiles, scale=model.config.scale, batch_tiles=plan.tiles.batch_tiles,
        conditioning=conditioning, device=device, callback_per_tile=callback_per_tile,
        max_batches=max_batches, pad_batches=pad, batch_runner=batch_runner, keyed=True,
    )
