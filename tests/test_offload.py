"""Block offload: each block's weights on the device only while it runs; values unchanged."""

import copy

import torch

from pid_core.offload import enable_block_offload, offload_device_bytes
from pid_core.testing import narrow_config, random_model

SMALL = dict(text_dim=32, text_tokens=12)


def _inputs(cfg, H, W, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, 7, cfg.text_dim, generator=g)
    latent = torch.randn(batch, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g)
    sigma = torch.tensor([0.3, 0.0])[:batch]
    return text, latent, sigma


def test_offload_on_cpu_equals_plain():
    cfg = narrow_config(**SMALL)
    model = random_model(cfg)
    H, W = 64, 96
    text, latent, sigma = _inputs(cfg, H, W)
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(x, torch.tensor([0.9]), text, latent, sigma)
        handle = enable_block_offload(model, "cpu")
        out = model(x, torch.tensor([0.9]), text, latent, sigma)
        assert handle.moves == cfg.patch_depth + cfg.pixel_depth
        handle.remove()
        again = model(x, torch.tensor([0.9]), text, latent, sigma)
    assert torch.equal(ref, out) and torch.equal(ref, again)
    assert offload_device_bytes(model) < sum(p.numel() * p.element_size() for p in model.parameters())


def test_offload_moves_each_block_only_while_it_runs():
    """With the meta device standing in for a GPU: each block's weights are on the device during its
    forward and back in CPU storage after; the small modules stay on the device."""
    cfg = narrow_config(**SMALL)
    model = copy.deepcopy(random_model(cfg))
    handle = enable_block_offload(model, "meta")
    during = []
    for block in list(model.patch_blocks) + list(model.pixel_blocks):
        block.register_forward_pre_hook(lambda m, a: during.append({p.device.type for p in m.parameters()}))
    assert all(p.device.type == "cpu" for b in model.patch_blocks for p in b.parameters())
    assert model.final_layer.linear.weight.device.type == "meta"
    H, W = 64, 64
    text, latent, sigma = _inputs(cfg, H, W)
    with torch.no_grad():
        out = model(torch.empty(1, 3, H, W, device="meta"), torch.tensor([0.9], device="meta"),
                    text.to("meta"), latent.to("meta"), sigma.to("meta"))
    assert out.shape == (1, 3, H, W) and out.device.type == "meta"
    assert during == [{"meta"}] * (cfg.patch_depth + cfg.pixel_depth)
    assert all(p.device.type == "cpu" for b in model.pixel_blocks for p in b.parameters())
    handle.remove()
