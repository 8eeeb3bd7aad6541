"""Optional speed-ups: an attention backend and torch.compile with static tile shapes (spec 9).

Neither is used by default. Every attention of the network goes through
`pid_core.network.layers.attention` (SDPA: flash / memory-efficient kernels on CUDA, the flash kernel
on CPU); `attention_backend(fn)` routes it through another function for the duration of a block of
code, e.g. ComfyUI's selected backend: `attention_backend(heads_merged_backend(optimized_attention))`.
"""

from __future__ import annotations

import torch

from .network.layers import attention_backend, heads_merged_backend, set_attention_backend

__all__ = ["attention_backend", "heads_merged_backend", "set_attention_backend", "compile_model"]


def compile_model(model: torch.nn.Module, *, mode: str = "default", fullgraph: bool = False):
    """torch.compile(model, dynamic=False): one graph per input shape, so use it with tiles of one
    shape (`TiledVelocity(pad_batches=True)` keeps every batch the same size too). Returns the compiled
    callable; pass it as `make_velocity(..., network=compiled)`; `model` itself is left unchanged.
    The upstream --compile flag does the same (mode "default", dynamic False). The first call of each
    shape compiles (tens of seconds to minutes on a GPU)."""
    return torch.compile(model, mode=mode, dynamic=False, fullgraph=fullgraph)
