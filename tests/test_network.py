"""Network properties beyond the reference cases: chunked pixel blocks, precision, shapes."""

import pytest
import torch
import torch.nn.functional as F

from pid_core.network import layers
from pid_core.network.layers import attention_backend, heads_merged_backend
from pid_core.network.ops import CastOps
from pid_core.precision import compute_context, compute_dtype, psnr, storage_dtype
from pid_core.checkpoint import build_model
from pid_core.commands.random_checkpoints import config_shapes, narrow_config, random_model, random_state_dict

SMALL = dict(text_dim=32, text_tokens=12)


def _inputs(config, h=4, w=6, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    H, W = h * config.scale, w * config.scale
    return (
        torch.randn(batch, 3, H, W, generator=g),
        torch.tensor([0.9, 0.3])[:batch],
        torch.randn(batch, 7, config.text_dim, generator=g),
        torch.randn(batch, config.latent_channels, h, w, generator=g),
        torch.tensor([0.0, 0.5])[:batch],
    )


@pytest.mark.parametrize("layout", ["v1", "v1.5"])
def test_chunked_pixel_blocks_equal_whole(layout):
    config = narrow_config(layout=layout, text_dim=32, text_tokens=12)
    model = random_model(config)
    args = _inputs(config)
    with torch.no_grad():
        whole = model(*args)
        chunked = model(*args, chunk_tokens=7)  # does not divide the token count on purpose
    # float rounding only: relative to the output's size (how far rounding goes depends on the CPU's kernels)
    assert (whole - chunked).abs().max().item() < 1e-5 * whole.abs().max().item()


def test_bf16_weights_track_fp32():
    config = narrow_config(text_dim=32, text_tokens=12)
    model = random_model(config)
    args = _inputs(config)
    with torch.no_grad():
        ref = model(*args)
        model16 = model.to(torch.bfloat16)
        with compute_context("cpu", torch.bfloat16):  # the GPU's bf16 autocast, on the CPU
            out = model16(*args)
    assert out.dtype == torch.bfloat16  # the velocity leaves final_layer.linear in bf16, as in the reference
    assert psnr(out.float().clamp(-1, 1), ref.clamp(-1, 1)) > 30


@pytest.mark.parametrize("layout", ["v1", "v1.5"])
def test_bf16_storage_with_fp32_compute_equals_fp32_weights(layout):
    """CastOps (the CPU default for bf16 files): bf16 -> fp32 is exact, so casting per layer gives the
    fp32-weights network bit for bit, whole and chunked (docs/DESIGN.md §4)."""
    config = narrow_config(layout=layout, **SMALL)
    sd = random_state_dict(config_shapes(config), dtype=torch.bfloat16)
    stored = build_model(sd, config)
    fp32 = build_model({k: v.float() for k, v in sd.items()}, config)
    assert isinstance(stored.patch_blocks[0].attn.qkv_x, CastOps.Linear)
    assert type(fp32.patch_blocks[0].attn.qkv_x) is torch.nn.Linear
    assert all(p.dtype == torch.bfloat16 for p in stored.parameters())
    args = _inputs(config)
    with torch.no_grad(), compute_context("cpu", compute_dtype(storage_dtype(stored), "cpu")):  # fp32 on the CPU
        for chunk in (None, 5):
            out = stored(*args, chunk_tokens=chunk)
            assert out.dtype == torch.float32
            assert torch.equal(out, fp32(*args, chunk_tokens=chunk))


def test_parameters_outside_layers_follow_the_input_device():
    """A partial load may leave the network's own small parameters (norm weights, gate scalars, the text
    position table) on the offload device: they are cast to the input's device where used. The meta
    device stands in for the GPU: mixing it with CPU tensors raises."""
    config = narrow_config(layout="v1.5", **SMALL)
    model = random_model(config)
    own = [(m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False)
           if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert {n for _, n in own} == {"weight", "log_alpha", "y_pos_embedding"}  # RMSNorm, gates, PidNet
    kept = {(id(m), n): getattr(m, n).data for m, n in own}
    model.to("meta")
    for m, n in own:
        setattr(m, n, torch.nn.Parameter(kept[(id(m), n)], requires_grad=False))
    with torch.no_grad():
        out = model(*(a.to("meta") for a in _inputs(config)), chunk_tokens=5)
    assert out.device.type == "meta"


def test_text_longer_than_the_table_is_truncated():
    config = narrow_config(text_dim=32, text_tokens=12)
    model = random_model(config)
    x, t, text, latent, sigma = _inputs(config)
    long_text = torch.cat([text, torch.randn(2, 20, 32)], dim=1)[:, :12]
    with torch.no_grad():
        a = model(x, t, long_text, latent, sigma)
        b = model(x, t, torch.cat([long_text, torch.randn(2, 5, 32)], dim=1), latent, sigma)
    assert torch.equal(a, b)


def test_chunked_network_paths_equal_whole():
    """Chunked pixel blocks, embedding and read-out (bands of patch rows) against the reference order."""
    cfg = narrow_config(layout="v1.5", **SMALL)
    model = random_model(cfg)
    H, W = 96, 160
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 3, H, W, generator=g), torch.tensor([0.9, 0.3]), torch.randn(2, 7, 32, generator=g),
            torch.randn(2, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g), torch.tensor([0.0, 0.5]))
    with torch.no_grad():
        whole = model(*args)
        for chunk in (1, 7, 10, 25, 10_000):
            assert (model(*args, chunk_tokens=chunk) - whole).abs().max().item() < 1e-5


def test_chunked_bf16_under_autocast_matches_whole():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    H, W = 96, 160
    args = (torch.randn(1, 3, H, W, generator=g), torch.tensor([0.9]), torch.randn(1, 7, 32, generator=g),
            torch.randn(1, 16, H // 32, W // 32, generator=g), torch.tensor([0.3]))
    with torch.no_grad(), compute_context("cpu", torch.bfloat16):
        whole = model(*args)
        chunked = model(*args, chunk_tokens=7)
    assert chunked.dtype == whole.dtype == torch.bfloat16
    assert (whole.float() - chunked.float()).abs().max() <= 1e-2


def test_attention_backend_is_used_and_restored():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 64, 96
    g = torch.Generator().manual_seed(0)
    text, latent = torch.randn(1, 7, cfg.text_dim, generator=g), torch.randn(1, 16, H // 32, W // 32, generator=g)
    sigma = torch.tensor([0.3])
    x = torch.randn(1, 3, H, W)
    calls = []

    def counting(q, k, v):
        calls.append(q.shape)
        return F.scaled_dot_product_attention(q, k, v)

    def comfy_like(q, k, v, heads, skip_reshape=False):  # ComfyUI's optimized_attention contract
        assert skip_reshape and q.shape[1] == heads
        calls.append("comfy")
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

    with torch.no_grad():
        ref = model(x, torch.tensor([0.9]), text, latent, sigma)
        with attention_backend(counting):
            out = model(x, torch.tensor([0.9]), text, latent, sigma)
        assert len(calls) == cfg.patch_depth + cfg.pixel_depth
        assert layers._attention_backend is None
        with attention_backend(heads_merged_backend(comfy_like)):
            out2 = model(x, torch.tensor([0.9]), text, latent, sigma)
        assert calls.count("comfy") == cfg.patch_depth + cfg.pixel_depth
    assert layers._attention_backend is None
    assert torch.equal(ref, out)
    assert (ref - out2).abs().max() < 1e-5
