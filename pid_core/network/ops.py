"""Where the network's layers come from: an `operations` namespace (docs/DESIGN.md §4).

`PidNet(config, operations=...)` builds every Linear, Conv2d, GroupNorm and LayerNorm from the
namespace it is given, the way ComfyUI's models take `operations=`:

- `torch.nn` (the default): the weights compute as they are stored (fp32, or half precision under
  autocast);
- `CastOps`: the weights stay in their storage dtype (the file's bf16) and each layer casts them to
  its input's dtype and device when it runs, so fp32 compute costs half the memory of fp32 weights;
  bf16 -> fp32 is exact, so the result equals the fp32-weights network bit for bit;
- inside ComfyUI, what comfy.ops gives for the file (manual cast, quantized layouts, per-layer
  offload), built by nodes/; pid_core never imports ComfyUI.

Where the network reads a layer's weight itself instead of calling the layer (the per-pixel
modulation, the fp32 group norm), it asks the namespace's `layer_weights(layer, dtype, device)`: a
context manager giving (weight, bias) ready to compute with. A namespace without one gets
`cast_layer_weights`.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cast(tensor: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    if tensor is None:
        return None
    return tensor.to(device=like.device, dtype=like.dtype)


_scratch = threading.local()


def _cast_weight(weight: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The weight in like's dtype and device, written into one reused buffer: a fresh allocation per call
    would cost a page fault per 4 KB of every weight at every call. Safe because a layer's forward is
    the only user of its cast weight and layers do not nest."""
    if weight.dtype == like.dtype and weight.device == like.device:
        return weight
    key = (like.device, like.dtype)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < weight.numel():
        buf = buffers[key] = torch.empty(weight.numel(), dtype=like.dtype, device=like.device)
    return buf[: weight.numel()].view(weight.shape).copy_(weight)


@contextlib.contextmanager
def cast_layer_weights(layer: nn.Module, dtype: torch.dtype, device):
    """(weight, bias) of a plain torch layer in `dtype` on `device` (no copy when already there)."""
    bias = layer.bias
    yield layer.weight.to(device=device, dtype=dtype), None if bias is None else bias.to(device=device, dtype=dtype)


def layer_weights_of(operations):
    """The namespace's `layer_weights`, or `cast_layer_weights` for one that has none (torch.nn)."""
    return getattr(operations, "layer_weights", cast_layer_weights)


class CastOps:
    """Layers whose weights stay in their storage dtype and are cast per call to the input's dtype and
    device (fp32 compute from bf16 weights on CPU)."""

    layer_weights = staticmethod(cast_layer_weights)

    class Linear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, _cast_weight(self.weight, x), _cast(self.bias, x))

    class Conv2d(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self._conv_forward(x, _cast_weight(self.weight, x), _cast(self.bias, x))

    class GroupNorm(nn.GroupNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.group_norm(x, self.num_groups, _cast(self.weight, x), _cast(self.bias, x), self.eps)

    class LayerNorm(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x), _cast(self.bias, x), self.eps)
