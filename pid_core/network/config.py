"""The shape of a PiD network, read from a checkpoint's tensors.

Every size comes from the weights (docs/DESIGN.md §3.1), so the released 1.4 B models and the narrow random
models of the tests run through the same code. The few facts the tensors cannot tell (the latent's
down factor, the super-resolution scale) come from the variant registry or the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class PidConfig:
    # Backbone (PixelDiT T2I)
    hidden_size: int = 1536
    num_heads: int = 24
    patch_depth: int = 14
    mlp_hidden: int = 4096
    pixel_depth: int = 2
    pixel_hidden_size: int = 16
    pixel_attn_hidden_size: int = 1152
    pixel_num_heads: int = 16
    pixel_mlp_hidden: int = 64
    patch_size: int = 16
    text_dim: int = 2304
    text_max_tokens: int = 300
    # Latent adapter
    layout: str = "v1"  # "v1" or "v1.5"
    adapter_hidden: int = 512
    adapter_res_blocks: int = 4
    adapter_in_channels: int = 16  # channels entering the conv stack (after un-packing)
    lq_interval: int = 2
    latent_unpatchify: int = 1  # 2 for FLUX.2 v1.5: 128 packed channels -> 32
    latent_down_factor: int = 8  # VAE factor of the latent the user gives
    sr_scale: int = 4
    has_aux_rgb_head: bool = False

    # --- facts fixed by the layout (docs/DESIGN.md §3.1) ---
    @property
    def gate(self) -> str:
        return "per_token" if self.layout == "v1.5" else "per_token_per_dim"

    @property
    def conv_padding(self) -> str:
        return "replicate" if self.layout == "v1.5" else "zeros"

    @property
    def pixel_gate(self) -> bool:
        return self.layout == "v1.5"

    @property
    def rope_ref_px(self) -> int:
        return 2048 if self.layout == "v1.5" else 1024

    # --- derived sizes ---
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def pixel_head_dim(self) -> int:
        return self.pixel_attn_hidden_size // self.pixel_num_heads

    @property
    def num_lq_outputs(self) -> int:
        return math.ceil(self.patch_depth / self.lq_interval)

    @property
    def latent_channels(self) -> int:
        """Channels of the latent the network takes (before its internal un-packing)."""
        return self.adapter_in_channels * self.latent_unpatchify**2

    @property
    def scale(self) -> int:
        """Output pixels per latent cell: VAE factor x super-resolution scale."""
        return self.latent_down_factor * self.sr_scale

    def with_(self, **changes) -> "PidConfig":
        return replace(self, **changes)
