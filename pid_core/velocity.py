"""The functions the samplers call: the network on the whole canvas, or tiles fused per step.

This is where the network meets the samplers. The network runs on the compute device under the
weights' precision (precision.compute_context) with the plan's pixel-block chunking; the sampler's
state may live elsewhere (the CPU, for large canvases on small cards): tiles travel to the device and
their results come back.

  network_velocity   v(x, t) for the student sampler (sampling.sample)
  network_denoiser   the guided x0(x, t) for the teacher sampler (teacher.dpm_solver_pp): both text
                     branches per tile (one batched forward or two), guided, then fused over tiles
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .compile import use_compiled_blocks
from .network.prepared import PreparedCache
from .precision import compute_context
from .teacher import branches_may_share_forward, data_prediction
from .tiling import TiledVelocity, TilePlan


def network_velocity(
    model,
    text: torch.Tensor,
    latent: torch.Tensor,
    sigma: torch.Tensor,
    plan: TilePlan,
    *,
    device=None,
    callback_per_tile: Optional[Callable[[int, int], None]] = None,
    after_forward: Optional[Callable[[], None]] = None,
    compile: bool = False,
    autocast: bool = True,
    max_batches: Optional[int] = None,
    batch_runner=None,
):
    """The velocity function for `sampling.sample`: v(x, t) of the whole canvas for an untiled plan,
    else a TiledVelocity (which the sampler drives row band by row band, never holding a whole-canvas v).

    text [B|1, T, text_dim], latent [B, C, h, w] (PiD space), sigma [B]|[1]. The network runs on `device`
    (default: the latent's). callback_per_tile(done, total) after each batch of tiles; after_forward()
    after every network call (cancel checks). compile: False, True or a torch.compile mode: the
    network's blocks compiled (compile.use_compiled_blocks), every tile batch padded to one shape. max_batches:
    benchmarks only (see TiledVelocity). batch_runner: where tile batches run (TiledVelocity; None: all
    in this process)."""
    forward = _network_forward(model, plan, device or latent.device, compile=compile, autocast=autocast,
                               after_forward=after_forward)

    def call(x, t, z, y, s, key=None):
        return forward(x, t, z, y, s, key=key)

    return _over_canvas(call, model, latent, (_batch_text(text, latent), _batch_sigma(sigma, latent)), plan,
                        device=device, callback_per_tile=callback_per_tile, max_batches=max_batches, pad=compile,
                        batch_runner=batch_runner)


def network_denoiser(
    model,
    text: torch.Tensor,
    latent: torch.Tensor,
    sigma: torch.Tensor,
    plan: TilePlan,
    *,
    cfg: float = 1.0,
    negative: Optional[torch.Tensor] = None,
    device=None,
    callback_per_tile: Optional[Callable[[int, int], None]] = None,
    after_forward: Optional[Callable[[], None]] = None,
    compile: bool = False,
    autocast: bool = True,
    batch_runner=None,
):
    """The guided data prediction x0(x, t) of the whole canvas for `teacher.dpm_solver_pp`.

    Classifier-free guidance on the text only: `negative` [B|1, T, text_dim] replaces the text in the
    unconditional branch, the latent and sigma stay. cfg 1 runs the conditional branch alone (as the
    reference does). plan.branches == 2 runs both branches as one forward of twice the batch
    ([uncond; cond], when the plan found the memory for it and t is not near 1:
    teacher.REFERENCE_ORDER_FROM_T), else two forwards, uncond first. The
    guidance and x0 are formed per tile (`teacher.data_prediction`), and tiles fuse x0, which is the
    same as fusing the guided v (weights summing to 1): one state for the canvas at every step. Other
    arguments as network_velocity."""
    forward = _network_forward(model, plan, device or latent.device, compile=compile, autocast=autocast,
                               after_forward=after_forward)
    guided = cfg != 1.0
    if guided and negative is None:
        raise ValueError("a guided decode (cfg != 1) needs the negative (unconditional) text")
    conditioning = [_batch_text(text, latent), _batch_sigma(sigma, latent)]
    if guided:
        conditioning.append(_batch_text(negative, latent))
    batched = plan.branches == 2 and guided and negative.shape[1:] == text.shape[1:]

    def call(x, t, z, y, s, y_neg=None, key=None):
        if not guided:
            return data_prediction(x, t, forward(x, t, z, y, s, key=key))
        if batched and branches_may_share_forward(t):
            v_uncond, v_cond = forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([z, z]),
                                       torch.cat([y_neg, y]), torch.cat([s, s]), key=_branch(key, "both")).chunk(2)
        else:  # batched plans run this only near t = 1 (the first step): nothing to keep
            v_uncond = forward(x, t, z, y_neg, s, key=None if batched else _branch(key, "uncond"))
            v_cond = forward(x, t, z, y, s, key=None if batched else _branch(key, "cond"))
        return data_prediction(x, t, v_cond, v_uncond, cfg)

    return _over_canvas(call, model, latent, tuple(conditioning), plan, device=device,
                        callback_per_tile=callback_per_tile, pad=compile, batch_runner=batch_runner)


def _branch(key, name: str):
    return None if key is None else (key, name)


def _network_forward(model, plan: TilePlan, device, *, compile: bool | str = False, autocast: bool = True,
                     after_forward: Optional[Callable[[], None]] = None):
    """(x, t, latent, text, sigma, key=None) -> v: one network call on `device`, with the plan's chunking.
    key names the call's (latent, text, sigma) for the decode's step cache (plan.step_cache): what does
    not depend on the step is made at a key's first call and reused (network/prepared.py)."""
    network = use_compiled_blocks(model, compile)
    chunk = plan.pixel_chunk_tokens
    device = torch.device(device)
    cache = PreparedCache(model, plan.step_cache, chunk) if plan.step_cache != "off" else None

    def forward(x, t, z, y, s, key=None):
        precision = compute_context(model, device) if autocast else contextlib.nullcontext()
        with torch.no_grad(), precision:
            prepared = cache.get(key, x, z, y, s) if cache is not None and key is not None else None
            v = network(x, t, y, z, s, chunk_tokens=chunk, prepared=prepared)
        if after_forward is not None:
            after_forward()
        return v

    return forward


def _batch_text(text: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    B = latent.shape[0]
    return text.expand(B, -1, -1) if text.shape[0] == 1 and B > 1 else text


def _batch_sigma(sigma: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    sigma = sigma.reshape(-1).float()
    return sigma.expand(latent.shape[0]) if sigma.numel() == 1 else sigma


def _over_canvas(call, model, latent, conditioning, plan: TilePlan, *, device=None, callback_per_tile=None,
                 max_batches=None, pad=False, batch_runner=None):
    """call(x, t, latent, *conditioning) over the canvas: once for an untiled plan (on `device`, the result
    back on x's device), else per tile, fused (TiledVelocity)."""
    device = torch.device(device) if device is not None else latent.device
    if not plan.tiled:
        latent_d = latent.to(device)
        conditioning_d = [c.to(device) for c in conditioning]

        def whole(x, t):
            out = call(x.to(device), t.reshape(-1).expand(x.shape[0]).to(device), latent_d, *conditioning_d,
                       key="canvas")
            return out.to(x.device)

        return whole
    return TiledVelocity(
        call, latent, plan.tiles, scale=model.config.scale, batch_tiles=plan.batch_tiles,
        conditioning=conditioning, device=device, callback_per_tile=callback_per_tile,
        max_batches=max_batches, pad_batches=pad, batch_runner=batch_runner, keyed=True,
    )
