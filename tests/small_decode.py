"""Narrow-model inputs, their decode plan and an untiled or tiled student decode, shared by the tests of
the tiling, the velocity and the benchmark."""

import torch

from pid_core.plan import plan_decode
from pid_core.sampling import initial_noise, sample
from pid_core.velocity import network_velocity

SMALL = dict(text_dim=32, text_tokens=12)  # narrow_config changes: short text, few channels


def small_inputs(cfg, H, W, batch=1, seed=0):
    """(text, latent, sigma) for an H x W output; sigma 0.3 then 0."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 7, cfg.text_dim, generator=g)
    latent = torch.randn(batch, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g)
    sigma = torch.tensor([0.3, 0.0])[:batch]
    return text, latent, sigma


def small_plan(model, H, W, tiling=None, batch=1, **options):
    """The decode plan of small_inputs (a latent already in PiD space) with these tiling options."""
    text, latent, sigma = small_inputs(model.config, H, W, batch)
    return plan_decode(model, latent, text, latent_format="pid", sigma=sigma, tiling=tiling, **options)


def small_decode(model, cfg, H, W, steps, tiling=None, batch=1, seed=0, **kw):
    """The student sampler over network_velocity with `tiling` (TileOptions; None: untiled)."""
    plan = small_plan(model, H, W, tiling, batch, steps=steps)
    noise, gen = initial_noise((batch, 3, H, W), seed=seed)
    with torch.no_grad():
        return sample(network_velocity(model, plan, **kw), noise, plan.sampler.times, generator=gen)
