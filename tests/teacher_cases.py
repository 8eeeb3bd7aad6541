"""Teacher case folders in the shared format (shared/fixtures/teacher/README.md), made here from a narrow
random checkpoint, for the conformance command's own tests: the kinds of case it must accept beyond the
shared one (batches with per-sample sigma, cfg 1, one and two steps, the 128-channel FLUX.2 layout,
many steps at shift 6).

The expected tensors come from a plain transcription of the reference's sampling (its noise-prediction
wrapper, guidance on the noise, x0 by division, the multistep update), written here independently of
pid_core.teacher; the network is pid_core's, whose agreement with the reference is the shared cases' job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from pid_core.checkpoint import load_pid
from pid_core.commands.conformance import CHECKED_FIELDS
from pid_core.commands.random_checkpoints import make_random_checkpoint


def _times(steps: int, shift: float) -> torch.Tensor:
    s = 1.0 - torch.linspace(1.0, 0.001, steps + 1)
    return (shift * s / (1 + (shift - 1) * s)).flip(0)


def _reference_run(model, noise, text, null_text, latent, sigma, steps, cfg, shift):
    """(result before clamping, the network's time input of every call in order)."""
    calls = []

    def net(x, t, y):
        calls.append([float(v) for v in t * 1000])
        return model(x, t, y, latent, sigma)

    def x0_of(x, t):
        tb = t.expand(x.shape[0])
        one_minus = (1 - t).view(1, 1, 1, 1)
        if cfg == 1.0:
            noise_pred = one_minus * net(x, tb, text) + x
        else:
            n_u = one_minus * net(x, tb, null_text) + x
            n_c = one_minus * net(x, tb, text) + x
            noise_pred = n_u + cfg * (n_c - n_u)
        return (x - t * noise_pred) / (1 - t)

    lam = lambda t: torch.log(1 - t) - torch.log(t)  # noqa: E731
    times = _times(steps, shift)
    x = noise.clone()
    history = [(times[0], x0_of(x, times[0]))]
    for step in range(1, steps + 1):
        t = times[step]
        t0, m0 = history[-1]
        h = lam(t) - lam(t0)
        phi = torch.exp(torch.log(1 - t)) * torch.expm1(-h)
        new = (t / t0) * x - phi * m0
        if 1 < step < steps:
            t1, m1 = history[-2]
            new = new - 0.5 * phi * ((1.0 / ((lam(t0) - lam(t1)) / h)) * (m0 - m1))
        x = new
        if step < steps:
            history.append((t, x0_of(x, t)))
    return x, calls


def write_teacher_case(folder: Path, *, steps: int, cfg: float, shift: float | None = None, batch: int = 1,
                       latent_channels: int = 16, latent_hw=(2, 3), seed: int = 0) -> Path:
    """A teacher case folder: narrow v1.5 checkpoint (official .pth layout), inputs, expected outputs."""
    folder.mkdir(parents=True, exist_ok=True)
    config = make_random_checkpoint(str(folder / "checkpoint.pth"), layout="v1.5", latent_channels=latent_channels,
                                    text_dim=32, text_tokens=12, seed=seed)
    model = load_pid(str(folder / "checkpoint.pth"), dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    H, W = latent_hw[0] * config.scale, latent_hw[1] * config.scale
    shift = 6 * math.sqrt(math.sqrt(H * W) / 2048) if shift is None else shift
    io = {
        "text": torch.randn(batch, 12, 32, generator=g),
        "null_text": torch.randn(1, 12, 32, generator=g),
        "lq_latent": torch.randn(batch, config.latent_channels, *latent_hw, generator=g),
        "degrade_sigma": torch.linspace(0.0, 0.6, batch) if batch > 1 else torch.tensor([0.2]),
        "sample.noise": torch.randn(batch, 3, H, W, generator=g),
    }
    with torch.no_grad():
        raw, calls = _reference_run(model, io["sample.noise"], io["text"], io["null_text"].expand(batch, -1, -1),
                                    io["lq_latent"], io["degrade_sigma"], steps, cfg, shift)
    io["sample.raw"], io["sample.out"] = raw, raw.clamp(-1, 1)
    save_file({k: v.contiguous() for k, v in io.items()}, str(folder / "io.safetensors"))
    fields = {k: getattr(config, k) for k in CHECKED_FIELDS}
    fields.update(latent_down_factor=config.latent_down_factor, sr_scale=config.sr_scale,
                  latent_unpatchify=config.latent_unpatchify)
    case = {
        "case": folder.name, "mode": "teacher", "layout": "v1.5", "checkpoint": "checkpoint.pth",
        "config": fields, "image_hw": [H, W], "latent_hw": list(latent_hw), "batch": batch,
        "sampler": {"cfg_scale": cfg, "steps": steps, "shift": shift},
        "network_calls": len(calls), "network_times": calls,
        "tolerance": {"sample_max_abs": 0.002, "raw_max_abs_relative_to_absmax": 0.0005},
    }
    (folder / "case.json").write_text(json.dumps(case, indent=1))
    return folder
