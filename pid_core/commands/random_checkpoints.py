"""Random PiD checkpoints in the real key layout, for tests and benchmarks (no released weights needed).

Values are random but shaped like a trained model's: norms at 1, gates at their init (bias 2,
log_alpha ln 5), small random matrices, so every path of the network carries signal.
"""

from __future__ import annotations

import math
import os
import re

import torch

from ..network import PidConfig, PidNet
from ..variants import adapter_in_channels_for, latent_geometry

NARROW = dict(
    hidden_size=64, num_heads=2, patch_depth=3, mlp_hidden=170, pixel_depth=2, pixel_hidden_size=16,
    pixel_attn_hidden_size=48, pixel_num_heads=2, pixel_mlp_hidden=64, adapter_hidden=32,
)


def narrow_config(*, layout: str = "v1", latent_channels: int = 16, text_dim: int = 2304, text_tokens: int = 300, **changes) -> PidConfig:
    """A small config of the given layout for a latent of `latent_channels` channels (128 in v1.5 = FLUX.2)."""
    adapter_in = adapter_in_channels_for(layout, latent_channels)
    geometry = latent_geometry(layout, adapter_in)
    fields = dict(NARROW)
    fields.update(
        layout=layout,
        text_dim=text_dim,
        text_max_tokens=text_tokens,
        adapter_in_channels=adapter_in,
        latent_unpatchify=geometry.unpatchify,
        latent_down_factor=geometry.down_factor,
        sr_scale=geometry.sr_scale,
        has_aux_rgb_head=layout == "v1.5",
    )
    fields.update(changes)
    return PidConfig(**fields)


def _fill(name: str, shape, generator: torch.Generator) -> torch.Tensor:
    if name.endswith("log_alpha"):
        return torch.full(shape, math.log(5.0))
    if re.search(r"(norm\w*|norm_[xy]\d|block\.[03]|aux_rgb_head\.0)\.weight$", name) and len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    if name.endswith("content_proj.bias"):
        return torch.full(shape, 2.0)
    if len(shape) <= 1:
        return 0.02 * torch.randn(shape, generator=generator)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def random_state_dict(shapes: dict, *, seed: int = 0, dtype=torch.bfloat16) -> dict:
    """{name: shape} -> {name: random tensor}."""
    generator = torch.Generator().manual_seed(seed)
    return {name: _fill(name, tuple(shape), generator).to(dtype) for name, shape in shapes.items()}


def config_shapes(config: PidConfig) -> dict:
    with torch.device("meta"):
        model = PidNet(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_key_file(path: str) -> dict:
    """A keys/<experiment>.txt dump: lines `name<TAB>[d0, d1]`, comments start with #."""
    shapes = {}
    with open(path) as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            name, shape = line.rstrip("\n").split("\t")
            shapes[name] = tuple(int(d) for d in shape.strip("[]").split(",") if d.strip())
    return shapes


def save_checkpoint(sd: dict, path: str, *, prefix: str | None = None) -> str:
    """Write as .safetensors or .pth by extension; prefix None = 'net.' for .pth (official), none for safetensors."""
    if prefix is None:
        prefix = "net." if path.endswith((".pth", ".pt")) else ""
    sd = {prefix + k: v.contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, path)
    else:
        torch.save(sd, path)
    return path


def make_random_checkpoint(path: str, *, layout: str = "v1", latent_channels: int = 16, text_dim: int = 2304,
                           text_tokens: int = 300, seed: int = 0, dtype=torch.bfloat16, prefix: str | None = None,
                           **config_changes) -> PidConfig:
    """Write a narrow random PiD checkpoint to `path` and return its config."""
    config = narrow_config(layout=layout, latent_channels=latent_channels, text_dim=text_dim, text_tokens=text_tokens,
                           **config_changes)
    save_checkpoint(random_state_dict(config_shapes(config), seed=seed, dtype=dtype), path, prefix=prefix)
    return config


def random_model(config: PidConfig, *, seed: int = 0, dtype=torch.float32) -> PidNet:
    """A random PidNet in memory (no file)."""
    from ..checkpoint import build_model

    return build_model(random_state_dict(config_shapes(config), seed=seed, dtype=dtype), config)


def released_config(layout: str = "v1", latent_channels: int = 16, **changes) -> PidConfig:
    """The full size of the released students (1.36 B params in v1, 1.40 B in v1.5) for a layout and
    latent, without a key list: benchmarks and memory tests of the real shapes with random weights."""
    full = PidConfig()
    sizes = {name: getattr(full, name) for name in NARROW}
    sizes["adapter_hidden"] = 1024 if layout == "v1.5" else 512
    sizes.update(changes)
    return narrow_config(layout=layout, latent_channels=latent_channels, **sizes)
