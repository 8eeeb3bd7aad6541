"""The side-by-side benchmark against the reference (commands/bench_reference.py), on the CPU at tiny
sizes. Runs where PID_REFERENCE_DIR names a checkout of nv-tlabs/PiD, which is never part of this
repository; skipped elsewhere (a plain skip: PID_REQUIRE_COMFYUI concerns the ComfyUI suites only)."""

import os

import pytest
import torch

from pid_core.commands import main
from pid_core.commands.bench_reference import build_reference, import_reference_network, reference_decode
from pid_core.commands.random_checkpoints import config_shapes, narrow_config, random_state_dict
from pid_core.checkpoint import build_model
from pid_core.decode import run_plan
from pid_core.plan import plan_decode
from pid_core.precision import psnr

REFERENCE = os.environ.get("PID_REFERENCE_DIR")
pytestmark = pytest.mark.skipif(not REFERENCE, reason="PID_REFERENCE_DIR does not name a checkout of nv-tlabs/PiD")


@pytest.mark.parametrize("spec", [dict(layout="v1", latent_channels=16), dict(layout="v1.5", latent_channels=16),
                                  dict(layout="v1.5", latent_channels=128)], ids=["v1", "v1.5", "v1.5-flux2"])
def test_reference_network_takes_the_weights_and_agrees(spec):
    cfg = narrow_config(**spec, text_dim=32, text_tokens=12)
    sd = random_state_dict(config_shapes(cfg), seed=0, dtype=torch.bfloat16)
    ours = build_model(sd, cfg)
    reference = build_reference(import_reference_network(REFERENCE), cfg, sd, "cpu")
    g = torch.Generator().manual_seed(0)
    H, W = 64, 96
    x = torch.randn(2, 3, H, W, generator=g)
    t = torch.tensor([0.9, 0.3])
    text = torch.randn(2, 12, 32, generator=g)
    latent = torch.randn(2, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g)
    sigma = torch.tensor([0.0, 0.4])
    with torch.no_grad():
        want = reference(x, t * 1000, text, lq_video_or_image=None, lq_latent=latent, degrade_sigma=sigma)
        got = ours(x, t, text, latent, sigma)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_reference_decode_matches_ours_with_the_same_seed():
    cfg = narrow_config(layout="v1.5", text_dim=32, text_tokens=12)
    sd = random_state_dict(config_shapes(cfg), seed=0, dtype=torch.bfloat16)
    ours = build_model(sd, cfg)
    reference = build_reference(import_reference_network(REFERENCE), cfg, sd, "cpu")
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 16, 2, 3, generator=g)
    text = torch.randn(1, 12, 32, generator=g)
    plan = plan_decode(ours, latent, text, latent_format="pid", sigma=0.0)
    image = run_plan(ours, plan, seed=7) * 2 - 1
    want = reference_decode(reference, latent, text, torch.zeros(1), (64, 96), seed=7)
    assert psnr(image, want) >= 80  # fp32 on both sides: rounding only


def test_bench_reference_runs_on_the_cpu(capsys):
    main(["bench", "--reference", REFERENCE, "--narrow", "--layout", "v1.5", "--sizes", "64,96x64", "--device", "cpu",
          "--compile", "off", "--runs", "1"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("64x64", "96x64"))]
    assert len(rows) == 2 and all(row[1] == "eager" for row in rows)
    assert all(float(row[-1]) >= 50 for row in rows)  # PSNR of the two images
