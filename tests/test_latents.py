"""Latent spaces -> PiD input space: constants, round trips, packing order, frames, detection, errors."""

import math

import pytest
import torch

from pid_core.errors import LatentError, SigmaError
from pid_core.latent_formats import LATENT_FORMATS, Flux2BNStats
from pid_core.latents import (
    convert_state_frame,
    detect_latent_format,
    noise_latent,
    prepare_latent,
    sigma_to_pid,
    vp_to_euler,
)
from pid_core.variants import VARIANTS

def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def bn_stats(seed=1):
    g = torch.Generator().manual_seed(seed)
    return Flux2BNStats(torch.randn(128, generator=g) * 0.3, torch.rand(128, generator=g) * 2 + 0.05)


def close(a, b, tol=1e-6):
    return torch.allclose(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------- constants and conversions


# ---------------------------------------------------------------- Qwen-Image 5-D latents


def test_qwenimage_5d_single_frame():
    fmt = LATENT_FORMATS["qwenimage"]
    x5 = randn(2, 16, 1, 4, 6, scale=2.0)
    z = fmt.to_pid(x5)
    assert z.shape == (2, 16, 4, 6)
    assert torch.equal(z, fmt.to_pid(x5[:, :, 0]))
    assert close(fmt.from_pid(z).unsqueeze(2), x5)
    z, _, s = prepare_latent(x5, "qwenimage", 0.0, expected_channels=16)
    assert z.shape == (2, 16, 4, 6) and s.shape == (2,)


def test_qwenimage_video_latent_is_refused():
    with pytest.raises(LatentError, match="has 3 frames.*single-frame"):
        prepare_latent(randn(1, 16, 3, 4, 4), "qwenimage", 0.0, expected_channels=16)


def test_5d_latent_in_a_4d_format_is_refused():
    with pytest.raises(LatentError, match="5-D .*'flux'.*qwenimage"):
        prepare_latent(randn(1, 16, 1, 4, 4), "flux", 0.0, expected_channels=16)


# ---------------------------------------------------------------- noise frames


def test_sdxl_euler_frame_becomes_the_vp_frame():
    # A ComfyUI EPS sampler stopped at sigma_eu holds x_eu = x0 + sigma_eu * eps in model space and
    # returns L = process_out(x_eu) (inverse_noise_scaling is the identity).
    fmt = LATENT_FORMATS["sdxl"]
    x0, eps = randn(3, 4, 5, 6, seed=1), randn(3, 4, 5, 6, seed=2)
    sigma_eu = torch.tensor([0.0, 0.5, 14.6])
    x_eu = x0 + sigma_eu.view(-1, 1, 1, 1) * eps
    latent = fmt.from_pid(x_eu)
    z, _, s = prepare_latent(latent, "sdxl", sigma_eu, expected_channels=4)
    root = torch.sqrt(sigma_eu**2 + 1)
    assert close(z, x_eu / root.view(-1, 1, 1, 1), 1e-5)
    assert close(s, sigma_eu / root)
    # ... which is PiD's VP forward noising of x0 at sigma_vp (docs/DESIGN.md §5)
    assert close(z, noise_latent(x0, s, eps, latent_format="sdxl"), 1e-5)
    assert torch.equal(z[0], fmt.to_pid(latent)[0])  # sigma 0: process_in only
    assert s[0] == 0


def test_sdxl_scalar_sigma():
    x0, eps = randn(1, 4, 3, 3, seed=1), randn(1, 4, 3, 3, seed=2)
    latent = (x0 + 3.0 * eps) / 0.13025
    z, _, s = prepare_latent(latent, "sdxl", 3.0, expected_channels=4)
    assert close(z, (x0 + 3.0 * eps) / math.sqrt(10), 1e-5)
    assert s.tolist() == pytest.approx([3.0 / math.sqrt(10)])


@pytest.mark.parametrize("name", ["flux", "sd3", "qwenimage", "flux2"])
def test_flow_early_stop_latent_gives_x_t(name):
    # ComfyUI's flow sampler stopped at sigma returns process_out(x_t / (1 - sigma)).
    fmt = LATENT_FORMATS[name]
    c = fmt.channels
    x0, eps, sigma = randn(2, c, 4, 4, seed=1), randn(2, c, 4, 4, seed=2), torch.tensor([0.3, 0.0])
    x_t = noise_latent(x0, sigma, eps, latent_format=name)
    assert close(x_t, (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps)
    latent = fmt.from_pid(x_t / (1 - sigma.view(-1, 1, 1, 1)))
    z, _, s = prepare_latent(latent, name, sigma, expected_channels=fmt.pid_channels, undo_noise_scaling=True)
    assert close(z, x_t, 1e-5) and torch.equal(s, sigma)
    z_raw, _, _ = prepare_latent(fmt.from_pid(x_t), name, sigma, expected_channels=c, undo_noise_scaling=False)
    assert close(z_raw, x_t, 1e-5)


def test_prepare_latent_output_types():
    latent = randn(3, 16, 4, 4).bfloat16()
    z, _, s = prepare_latent(latent, "flux", torch.tensor(0.25), expected_channels=16)
    assert z.dtype == torch.float32 and s.dtype == torch.float32
    assert z.is_contiguous() and s.shape == (3,) and s.tolist() == [0.25] * 3
    assert close(z, (latent.float() - 0.1159) * 0.3611)  # x_t itself: no leftover-noise scaling by default


def test_prepare_latent_pid_format_is_taken_as_is():
    z0 = randn(2, 128, 3, 3)
    z, _, s = prepare_latent(z0, "pid", 0.4, expected_channels=128)
    assert torch.equal(z, z0) and s.tolist() == pytest.approx([0.4, 0.4])


def test_prepare_flux2_raw():
    raw, stats = randn(1, 32, 8, 8), bn_stats()
    z, _, _ = prepare_latent(raw, "flux2_raw", 0.0, expected_channels=128, bn_stats=stats)
    assert z.shape == (1, 128, 4, 4)
    assert close(z, LATENT_FORMATS["flux2_raw"].to_pid(raw, stats))


def test_sigma_to_pid():
    assert sigma_to_pid(0.5, "flux") == 0.5
    assert sigma_to_pid(1.0, "sdxl") == pytest.approx(1 / math.sqrt(2))
    assert close(sigma_to_pid(torch.tensor([0.0, 3.0]), "sdxl"), torch.tensor([0.0, 3 / math.sqrt(10)]))


# ---------------------------------------------------------------- noising


def test_noise_latent_formulas():
    z, eps = randn(2, 16, 3, 3, seed=1), randn(2, 16, 3, 3, seed=2)
    assert close(noise_latent(z, 0.4, eps, latent_format="flux"), 0.6 * z + 0.4 * eps)
    assert close(noise_latent(z, 0.6, eps, latent_format="sdxl"), 0.8 * z + 0.6 * eps)
    assert close(noise_latent(z, 1.0, eps, latent_format="sdxl"), eps)


def test_noise_latent_zero_sigma_is_unchanged():
    z, eps = randn(2, 4, 3, 3, seed=1), randn(2, 4, 3, 3, seed=2)
    assert noise_latent(z, 0.0, eps, latent_format="sdxl") is z
    out = noise_latent(z, torch.tensor([0.0, 0.5]), eps, latent_format="flux")
    assert torch.equal(out[0], z[0]) and close(out[1], 0.5 * z[1] + 0.5 * eps[1])


def test_noise_latent_errors():
    z = randn(1, 16, 3, 3)
    with pytest.raises(LatentError, match="noise has shape"):
        noise_latent(z, 0.5, randn(1, 16, 3, 4), latent_format="flux")
    with pytest.raises(LatentError, match=r"\[0, 1\]"):
        noise_latent(z, 1.5, torch.zeros_like(z), latent_format="sdxl")
    with pytest.raises(LatentError, match="instead of 'pid'"):
        noise_latent(z, 0.5, torch.zeros_like(z), latent_format="pid")
    with pytest.raises(LatentError, match=r"\[B, C, h, w\]"):
        noise_latent(randn(16, 3, 3), 0.5, randn(16, 3, 3), latent_format="flux")


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "shape, cin, unpatchify, expected",
    [
        ((1, 4, 8, 8), 4, 1, "sdxl"),
        ((1, 128, 8, 8), 128, 1, "flux2"),
        ((1, 128, 8, 8), 32, 2, "flux2"),
        ((1, 32, 8, 8), 128, 1, "flux2_raw"),
        ((1, 32, 8, 8), 32, 2, "flux2_raw"),
        ((1, 768, 4, 4), 768, 1, "dinov2"),
        ((1, 1152, 4, 4), 1152, 1, "siglip"),
        ((1, 16, 1, 8, 8), 16, 1, "qwenimage"),
    ],
)
def test_detect_by_channels(shape, cin, unpatchify, expected):
    assert detect_latent_format(torch.zeros(shape), adapter_in_channels=cin, unpatchify=unpatchify) == expected


@pytest.mark.parametrize(
    "variant, expected",
    [("flux-2k", "flux"), ("sd3-2kto4k", "sd3"), ("qwenimage-2kto4k-v1.5", "qwenimage"),
     ("flux-2kto4k-v1.5", "flux")],
)
def test_detect_16_channels_from_the_variant(variant, expected):
    v = VARIANTS[variant]
    got = detect_latent_format(torch.zeros(1, 16, 8, 8), adapter_in_channels=16, unpatchify=1, variant=v)
    assert got == expected


def test_detect_16_channels_without_a_variant_asks_the_user():
    with pytest.raises(LatentError, match="Set latent_format to one of: flux, qwenimage, sd3"):
        detect_latent_format(torch.zeros(1, 16, 8, 8), adapter_in_channels=16, unpatchify=1)


def test_detect_16_channels_for_an_unreleased_checkpoint_says_so_first():
    note = "custom.safetensors is not a released PiD checkpoint: its text layer takes 768-wide text"
    with pytest.raises(LatentError) as err:
        detect_latent_format(torch.zeros(1, 16, 8, 8), adapter_in_channels=16, unpatchify=1, unreleased=note)
    msg = str(err.value)
    assert msg.startswith(note) and "Set latent_format to one of: flux, qwenimage, sd3" in msg, msg
    assert "file name does not say" not in msg  # the name is not what is missing


def test_detect_5d_latent_with_a_non_qwen_checkpoint():
    with pytest.raises(LatentError, match="Qwen-Image .*flux-2k.*Load the Qwen-Image PiD checkpoint"):
        detect_latent_format(torch.zeros(1, 16, 1, 8, 8), adapter_in_channels=16, unpatchify=1,
                             variant=VARIANTS["flux-2k"])


def test_detect_channel_mismatch():
    with pytest.raises(LatentError, match="4-channel SDXL latent, but the checkpoint expects 16-channel.*sdxl-2kto4k"):
        detect_latent_format(torch.zeros(1, 4, 8, 8), adapter_in_channels=16, unpatchify=1)
    with pytest.raises(LatentError, match="16-channel FLUX.1 / Z-Image / SD3 / Qwen-Image latent, but the checkpoint expects 128-channel FLUX.2"):
        detect_latent_format(torch.zeros(1, 16, 8, 8), adapter_in_channels=32, unpatchify=2)


# ---------------------------------------------------------------- prepare_latent errors


def test_sdxl_latent_for_a_flux_checkpoint():
    with pytest.raises(LatentError) as err:
        prepare_latent(randn(1, 4, 8, 8), "sdxl", 0.0, expected_channels=16)
    msg = str(err.value)
    assert "this is a 4-channel sdxl latent" in msg.lower()
    assert "expects 16-channel FLUX.1 / Z-Image / SD3 / Qwen-Image latents" in msg
    assert "load the SDXL PiD checkpoint (sdxl-2kto4k)" in msg


def test_wrong_format_for_the_latent():
    # the format and the checkpoint both take 16 channels: one message says so once, with the fix for both
    with pytest.raises(LatentError) as both:
        prepare_latent(randn(1, 4, 8, 8), "flux", 0.0, expected_channels=16)
    assert str(both.value) == (
        "The latent has 4 channels (SDXL), but the latent format 'flux' (FLUX.1 / Z-Image) and the checkpoint take "
        "16-channel latents: load the SDXL PiD checkpoint (sdxl-2kto4k) and set latent_format to 'auto', or give "
        "this checkpoint a latent from a model it was made for.")
    with pytest.raises(LatentError, match=r"has 128 channels \(FLUX.2 / Klein\), but the latent format 'sdxl' \(SDXL\) "
                                          r"takes 4-channel latents and the checkpoint 16-channel ones: load the FLUX.2"):
        prepare_latent(randn(1, 128, 8, 8), "sdxl", 0.0, expected_channels=16)
    with pytest.raises(LatentError, match="has 16 channels.*format 'sdxl'.*Set latent_format to 'auto'"):
        prepare_latent(randn(1, 16, 8, 8), "sdxl", 0.0, expected_channels=16)


def test_unknown_channel_count():
    with pytest.raises(LatentError, match="7-channel latent is not one that any released PiD checkpoint takes"):
        prepare_latent(randn(1, 7, 8, 8), "pid", 0.0, expected_channels=16)


def test_raw_flux2_for_a_16_channel_checkpoint():
    with pytest.raises(LatentError, match="32-channel raw FLUX.2 VAE latent.*flux2-2k"):
        prepare_latent(randn(1, 32, 8, 8), "flux2_raw", 0.0, expected_channels=16)


@pytest.mark.parametrize("sigma", [1.5, -0.1, torch.tensor([0.2, 1.01])])
def test_flow_sigma_outside_0_1(sigma):
    with pytest.raises(LatentError, match=r"outside \[0, 1\].*0 for a finished latent"):
        prepare_latent(randn(2, 16, 4, 4), "sd3", sigma, expected_channels=16)


@pytest.mark.parametrize("name", ["flux", "sd3", "qwenimage", "flux2"])
@pytest.mark.parametrize("sigma", [1.0, [0.3, 1.0]])
def test_a_leftover_latent_at_sigma_1_is_refused(name, sigma):
    """A stock leftover latent is x_t / (1 - sigma): at sigma 1 it is undefined (and undoing it would
    multiply by 0: an all-zero latent decoded as pure noise)."""
    fmt = LATENT_FORMATS[name]
    latent = randn(2, fmt.channels, 4, 4)
    with pytest.raises(SigmaError, match=r"x_t / \(1 - sigma\), undefined at sigma 1"):
        prepare_latent(latent, name, sigma, expected_channels=fmt.pid_channels, undo_noise_scaling=True)
    z, _, _ = prepare_latent(latent, name, sigma, expected_channels=fmt.pid_channels)  # x_t itself at sigma 1: fine
    assert torch.isfinite(z).all()
    prepare_latent(randn(1, 4, 4, 4), "sdxl", 1.0, expected_channels=4, undo_noise_scaling=True)  # nothing to undo


def test_sdxl_sigma_may_exceed_1_but_not_be_negative():
    prepare_latent(randn(1, 4, 4, 4), "sdxl", 14.6, expected_channels=4)
    with pytest.raises(LatentError, match="negative.*Euler sigma"):
        prepare_latent(randn(1, 4, 4, 4), "sdxl", -1.0, expected_channels=4)


@pytest.mark.parametrize("sigma", [1001.0, 1e30, 3e38])
def test_an_absurd_sdxl_sigma_is_refused_not_decoded_as_clean(sigma):
    # in fp32, 1e30 squared overflows: the latent would become 0 with sigma 0, a "clean" decode of nothing
    with pytest.raises(LatentError, match="far beyond SDXL's noise schedule"):
        prepare_latent(randn(1, 4, 4, 4), "sdxl", sigma, expected_channels=4)
    z, _, s = prepare_latent(randn(1, 4, 4, 4), "sdxl", 1000.0, expected_channels=4)
    assert torch.isfinite(z).all() and 0.99 < s.item() <= 1.0


def test_per_sample_sigmas_as_a_list():
    _, _, s = prepare_latent(randn(2, 16, 4, 4), "flux", [0.1, 0.4], expected_channels=16)
    assert s.tolist() == pytest.approx([0.1, 0.4])
    with pytest.raises(LatentError, match="3 values but the latent batch has 2"):
        prepare_latent(randn(2, 16, 4, 4), "flux", [0.1, 0.2, 0.3], expected_channels=16)


@pytest.mark.parametrize("scale", [1e5, 1e30, 1e37])
def test_latents_far_outside_any_latent_space_are_refused(scale):
    with pytest.raises(LatentError, match="in PiD's input space, where latents are a few units"):
        prepare_latent(randn(1, 16, 4, 4, scale=scale), "sd3", 0.0, expected_channels=16)


def test_several_frames_are_named_before_the_format():
    with pytest.raises(LatentError, match="2 frames.*single images"):
        detect_latent_format(randn(1, 16, 2, 4, 4), adapter_in_channels=16, unpatchify=1,
                             variant=VARIANTS["flux-2k"])


@pytest.mark.parametrize(
    "latent, sigma, message",
    [
        (torch.full((1, 16, 4, 4), float("nan")), 0.0, "NaN or infinite"),
        (randn(1, 16, 4, 4), float("inf"), "sigma is NaN or infinite"),
        (randn(16, 4, 4), 0.0, r"shape \[16, 4, 4\]; PiD takes \[B, C, H, W\]"),
        (randn(2, 16, 4, 4), torch.tensor([0.1, 0.2, 0.3]), "3 values but the latent batch has 2"),
        (randn(2, 16, 4, 4), torch.zeros(2, 1), "1-D tensor"),
        (randn(2, 16, 4, 4), "high", "must be a number"),
        (randn(2, 16, 4, 4), torch.tensor([True, False]), "real numbers, got a torch.bool tensor"),
        (randn(2, 16, 4, 4), torch.tensor([0.3j, 0.1]), "real numbers"),
        (torch.zeros(0, 16, 4, 4), 0.0, "empty"),
        (torch.zeros(1, 16, 4, 4, dtype=torch.int64), 0.0, "floating-point"),
    ],
)
def test_prepare_latent_input_errors(latent, sigma, message):
    with pytest.raises(LatentError, match=message):
        prepare_latent(latent, "flux", sigma, expected_channels=16)


def test_unknown_format_name():
    with pytest.raises(LatentError, match="Unknown latent format 'flux3'.*flux2_raw.*qwenimage"):
        prepare_latent(randn(1, 16, 4, 4), "flux3", 0.0, expected_channels=16)


# ---------------------------------------------------------------- output size


def test_convert_state_frame_round_trip():
    x0, eps, s = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), 0.3
    flow = (1 - s) * x0 + s * eps
    euler, s_eu = convert_state_frame(flow, s, "flow", "euler")
    assert s_eu == pytest.approx(s / (1 - s))
    torch.testing.assert_close(euler, x0 + s_eu * eps)
    back, s_back = convert_state_frame(euler, s_eu, "euler", "flow")
    assert s_back == pytest.approx(s)
    torch.testing.assert_close(back, flow)
    same, s_same = convert_state_frame(flow, s, "flow", "flow")
    assert same is flow and s_same == s
    unknown, _ = convert_state_frame(flow, s, None, "flow")
    assert unknown is flow
    with pytest.raises(LatentError, match="sigma 1"):
        convert_state_frame(flow, 1.0, "flow", "euler")


def test_vp_to_euler_inverts_the_sdxl_frame_change():
    x0, eps, s = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), 0.4
    vp = math.sqrt(1 - s * s) * x0 + s * eps  # noise_latent's SDXL frame, in PiD space
    eu, s_eu = vp_to_euler(vp, s)
    raw = eu / 0.13025  # SDXL process_out
    z, _, sigma = prepare_latent(raw, "sdxl", s_eu, expected_channels=4)
    torch.testing.assert_close(z, vp, rtol=1e-5, atol=1e-5)
    assert float(sigma[0]) == pytest.approx(s, abs=1e-6)
    with pytest.raises(LatentError):
        vp_to_euler(vp, 1.0)
