"""The velocity function the sampler calls: the network on the whole canvas, or tiles fused per step.

This is where the network meets the sampler. The network runs on the compute device under the
weights' precision (precision.compute_context) with the plan's pixel-block chunking; the sampler's
state may live elsewhere (the CPU, for large canvases on small cards): tiles travel to the device and
their velocities come back.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .precision import compute_context
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
    compile: bool = False,
    autocast: bool = True,
    max_batches: Optional[int] = None,
    batch_runner=None,
):
    """The velocity function for `sampling.sample`: v(x, t) of the whole canvas for an untiled plan,
    else a TiledVelocity (which the sampler drives row band by row band, never holding a whole-canvas v).

    text [B|1, T, text_dim], latent [B, C, h, w] (PiD space), sigma [B]|[1]. The network runs on `device`
    (default: the latent's). compile: torch.compile the network with static shapes (every tile batch
    padded to one shape); the first call of each shape compiles. max_batches: benchmarks only (see
    TiledVelocity). batch_runner: where tile batches run (TiledVelocity; None: all in this process)."""
    network = torch.compile(model, mode="default", dynamic=False) if compile else model
    B = latent.shape[0]
    device = torch.device(device) if device is not None else latent.device
    text = text.expand(B, -1, -1) if text.shape[0] == 1 and B > 1 else text
    sigma = sigma.reshape(-1).float()
    sigma = sigma.expand(B) if sigma.numel() == 1 else sigma
    chunk = plan.pixel_chunk_tokens

    def call(x, t, z, y, s):
        precision = compute_context(model, device) if autocast else contextlib.nullcontext()
        with torch.no_grad(), precision:
            return network(x, t, y, z, s, chunk_tokens=chunk)

    if not plan.tiled:
        text_d, latent_d, sigma_d = text.to(device), latent.to(device), sigma.to(device)

        def whole(x, t):
            v = call(x.to(device), t.reshape(-1).expand(x.shape[0]).to(device), latent_d, text_d, sigma_d)
            return v.to(x.device)

        return whole
    return TiledVelocity(
        call, latent, plan.tiles, scale=model.config.scale, batch_tiles=plan.batch_tiles,
        conditioning=(text, sigma), device=device, callback_per_tile=callback_per_tile,
        max_batches=max_batches, pad_batches=compile, batch_runner=batch_runner,
    )
