"""The latent format table: each format's constants, its map to PiD space and back, FLUX.2 packing, the
FLUX.2 VAE's statistics, and what is derived from the table."""

import pytest
import torch

from pid_core.errors import CheckpointError, LatentError
from pid_core.latent_formats import (
    COMFY_FORMATS,
    LATENT_FORMATS,
    Flux2BNStats,
    flux2_bn_stats_from_state_dict,
    formats_for_vae,
    patchify,
    same_shape,
    unpatchify,
)
from pid_core.network.adapter import LatentAdapter
from pid_core.network.config import PidConfig


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def bn_stats(seed=1):
    g = torch.Generator().manual_seed(seed)
    return Flux2BNStats(torch.randn(128, generator=g) * 0.3, torch.rand(128, generator=g) * 2 + 0.05)


def close(a, b, tol=1e-6):
    return torch.allclose(a, b, rtol=tol, atol=tol)


# ---------------------------------------------------------------- constants and conversions


def test_format_shapes():
    got = {n: (f.channels, f.down_factor, f.pid_channels, f.frame) for n, f in LATENT_FORMATS.items()}
    assert got == {
        "flux": (16, 8, 16, "flow"),
        "sd3": (16, 8, 16, "flow"),
        "sdxl": (4, 8, 4, "euler"),
        "flux2": (128, 16, 128, "flow"),
        "flux2_raw": (32, 8, 128, "flow"),
        "qwenimage": (16, 8, 16, "flow"),
        "dinov2": (768, 16, 768, "flow"),
        "siglip": (1152, 16, 1152, "flow"),
        "pid": (None, None, None, "pid"),
    }


@pytest.mark.parametrize("name", [n for n in LATENT_FORMATS if n != "flux2_raw"])
def test_round_trip(name):
    fmt = LATENT_FORMATS[name]
    z = randn(2, fmt.channels or 7, 4, 6, scale=3.0)
    assert close(fmt.from_pid(fmt.to_pid(z)), z)
    assert close(fmt.to_pid(fmt.from_pid(z)), z)


def test_round_trip_flux2_raw():
    fmt, stats = LATENT_FORMATS["flux2_raw"], bn_stats()
    raw = randn(2, 32, 8, 10, scale=2.0)
    packed = fmt.to_pid(raw, stats)
    assert packed.shape == (2, 128, 4, 5)
    assert close(fmt.from_pid(packed, stats), raw)
    z = randn(1, 128, 3, 4)
    assert close(fmt.to_pid(fmt.from_pid(z, stats), stats), z)


def test_conversion_keeps_dtype_and_device():
    z = randn(1, 16, 2, 2).to(torch.float64)
    assert LATENT_FORMATS["qwenimage"].to_pid(z).dtype == torch.float64
    assert LATENT_FORMATS["flux"].from_pid(z).dtype == torch.float64


# ---------------------------------------------------------------- FLUX.2 packing


def test_patchify_order():
    x = randn(2, 32, 6, 8)
    p = patchify(x)
    assert p.shape == (2, 128, 3, 4)
    for c in (0, 5, 31):
        for pi in (0, 1):
            for pj in (0, 1):
                for h in range(3):
                    for w in range(4):
                        assert p[1, c * 4 + pi * 2 + pj, h, w] == x[1, c, 2 * h + pi, 2 * w + pj]


def _unpack_as_spec_says(z, f=2):
    """channel c*f^2 + i*f + j goes to spatial offset (i, j), i the row offset."""
    b, ch, h, w = z.shape
    out = torch.empty(b, ch // f**2, h * f, w * f)
    for c in range(ch // f**2):
        for i in range(f):
            for j in range(f):
                out[:, c, i::f, j::f] = z[:, c * f * f + i * f + j]
    return out


def test_patchify_is_the_inverse_of_the_adapter_unpacking():
    z = randn(2, 128, 3, 5)
    assert torch.equal(unpatchify(z), _unpack_as_spec_says(z))
    assert torch.equal(patchify(_unpack_as_spec_says(z)), z)
    x = randn(1, 32, 4, 6)
    assert torch.equal(_unpack_as_spec_says(patchify(x)), x)


def test_patchify_is_the_inverse_of_the_network_adapter():
    cfg = PidConfig(layout="v1.5", adapter_in_channels=32, latent_unpatchify=2, latent_down_factor=16,
                    adapter_hidden=8, hidden_size=16, num_heads=1)
    x = randn(1, 32, 4, 6)
    assert torch.equal(LatentAdapter(cfg).unpack(patchify(x)), x)


def test_flux2_raw_to_pid_is_patchify_then_batchnorm():
    stats, raw = bn_stats(), randn(1, 32, 4, 4)
    expected = (patchify(raw) - stats.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        stats.running_var.view(1, -1, 1, 1) + 1e-4
    )
    assert close(LATENT_FORMATS["flux2_raw"].to_pid(raw, stats), expected)


def test_flux2_raw_needs_stats_and_even_sizes():
    with pytest.raises(LatentError, match="BatchNorm statistics.*FLUX.2 VAE"):
        LATENT_FORMATS["flux2_raw"].to_pid(randn(1, 32, 4, 4))
    with pytest.raises(LatentError, match="multiples of 2; got 5x4"):
        LATENT_FORMATS["flux2_raw"].to_pid(randn(1, 32, 5, 4), bn_stats())


def test_flux2_bn_stats_from_state_dict():
    mean, var = torch.randn(128), torch.rand(128)
    sd = {"encoder.conv_in.weight": torch.zeros(3), "bn.running_mean": mean.bfloat16(), "bn.running_var": var}
    stats = flux2_bn_stats_from_state_dict(sd)
    assert stats.running_mean.dtype == torch.float32 and torch.equal(stats.running_mean, mean.bfloat16().float())
    assert torch.equal(stats.running_var, var)
    prefixed = {"first_stage_model.bn.running_mean": mean, "first_stage_model.bn.running_var": var}
    assert torch.equal(flux2_bn_stats_from_state_dict(prefixed).running_mean, mean)


@pytest.mark.parametrize(
    "sd, message",
    [
        ({"decoder.conv_in.weight": torch.zeros(1)}, "no FLUX.2 BatchNorm statistics"),
        ({"bn.running_mean": torch.zeros(64), "bn.running_var": torch.ones(64)}, "no FLUX.2 BatchNorm"),
        ({"bn.running_mean": torch.zeros(128)}, "no FLUX.2 BatchNorm"),
        ({"bn.running_mean": torch.zeros(128), "bn.running_var": -torch.ones(128)}, "damaged"),
    ],
)
def test_flux2_bn_stats_errors(sd, message):
    with pytest.raises(CheckpointError, match=message):
        flux2_bn_stats_from_state_dict(sd)




def test_what_is_derived_from_the_table():
    assert COMFY_FORMATS == {"Flux": "flux", "SD3": "sd3", "SDXL": "sdxl", "Flux2": "flux2", "Wan21": "qwenimage"}
    assert [f.name for f in same_shape("sd3")] == ["flux", "sd3", "qwenimage"]
    nodes = list(COMFY_FORMATS.values())
    assert [f.name for f in formats_for_vae(16, False, nodes)] == ["flux", "sd3"]
    assert [f.name for f in formats_for_vae(16, True, nodes)] == ["qwenimage"]
    assert [f.name for f in formats_for_vae(128, False, nodes)] == ["flux2"]
    assert [f.name for f in formats_for_vae(4, False, nodes)] == ["sdxl"]
    assert formats_for_vae(12, False, nodes) == []
