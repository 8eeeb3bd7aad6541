"""Narrow-model inputs and an untiled or tiled student decode, shared by the tests of the tiling, the
velocity and the benchmark."""

import torch

from pid_core.sampling import initial_noise, sample
from pid_core.tiling import TileOptions, plan_tiling
from pid_core.velocity import network_velocity

SMALL = dict(text_dim=32, text_tokens=12)  # narrow_config changes: short text, few channels


def small_inputs(cfg, H, W, batch=1, seed=0):
    """(text, latent, sigma) for an H x W output; sigma 0.3 then 0."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 7, cfg.text_dim, generator=g)
    latent = torch.randn(batch, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g)
    sigma = torch.tensor([0.3, 0.0])[:batch]
    return text, latent, sigma


def small_decode(model, cfg, H, W, steps, plan, batch=1, seed=0, **kw):
    """The student sampler over network_velocity with `plan` (None: untiled)."""
    text, latent, sigma = small_inputs(cfg, H, W, batch)
    plan = plan or plan_tiling(cfg, (H, W), TileOptions(mode="off"))
    noise, gen = initial_noise((batch, 3, H, W), seed=seed)
    with torch.no_grad():
        return sample(network_velocity(model, text, latent, sigma, plan, **kw), noise, steps=steps, generator=gen)
