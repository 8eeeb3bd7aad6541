"""Keep only the active block on the compute device, for cards smaller than the weights.

The 14 patch blocks and 2 pixel blocks hold ~97% of PiD's 1.36-1.40 B parameters (2.7 GB in bf16).
`enable_block_offload` keeps their weights in storage memory (CPU, pinned when the device is CUDA) and,
through forward hooks, gives each block device copies of its weights just before it runs and drops
them after: the device holds the small modules (embedders, latent adapter, final layer, about 60 M
parameters), one block at a time and the activations. With `prefetch` the next block's weights are
copied on a side stream while the current block computes. The values are the same as the plain path;
only where the weights live changes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn


class BlockOffload:
    """Handle returned by `enable_block_offload`; `remove()` undoes it (weights stay in storage)."""

    def __init__(self, model: nn.Module, device, storage, prefetch: bool, pin: bool):
        self.model = model
        self.device = torch.device(device)
        self.storage = torch.device(storage)
        self.blocks = list(model.patch_blocks) + list(model.pixel_blocks)
        self.handles = []
        self.moves = 0  # blocks brought to the device (for tests and logs)
        self.stream = None
        self._prefetched: dict[int, tuple] = {}
        if prefetch and self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)
        # Storage copies of every block tensor; the parameters point at them between runs.
        self.stored: list[list[tuple[nn.Module, str, torch.Tensor]]] = []
        for block in self.blocks:
            entries = []
            for module in block.modules():
                for name, tensor in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
                    stored = tensor.data.to(self.storage)
                    if pin and self.device.type == "cuda" and self.storage.type == "cpu":
                        stored = stored.pin_memory()
                    entries.append((module, name, stored))
            self.stored.append(entries)
        self._point_at_storage_all()
        # Everything else lives on the compute device.
        for name, child in model.named_children():
            if name not in ("patch_blocks", "pixel_blocks"):
                child.to(self.device)
        for name, param in list(model.named_parameters(recurse=False)):
            self._set(model, name, param.data.to(self.device))
        for index, block in enumerate(self.blocks):
            self.handles.append(block.register_forward_pre_hook(self._make_pre(index)))
            self.handles.append(block.register_forward_hook(self._make_post(index)))

    @staticmethod
    def _set(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(tensor, requires_grad=False)
        else:
            module._buffers[name] = tensor

    def _point_at_storage(self, index: int) -> None:
        for module, name, stored in self.stored[index]:
            self._set(module, name, stored)

    def _point_at_storage_all(self) -> None:
        for index in range(len(self.stored)):
            self._point_at_storage(index)

    def _copies(self, index: int) -> tuple:
        return tuple(stored.to(self.device, non_blocking=True) for _, _, stored in self.stored[index])

    def _make_pre(self, index: int):
        def pre(module, args):
            copies = self._prefetched.pop(index, None)
            if copies is not None:
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(self.stream)
                for copy in copies:  # allocated on the side stream, used on this one
                    copy.record_stream(current)
            else:
                copies = self._copies(index)
            for (mod, name, _), copy in zip(self.stored[index], copies):
                self._set(mod, name, copy)
            self.moves += 1
            if self.stream is not None and index + 1 < len(self.blocks):
                with torch.cuda.stream(self.stream):
                    self._prefetched[index + 1] = self._copies(index + 1)
            return None

        return pre

    def _make_post(self, index: int):
        def post(module, args, output):
            self._point_at_storage(index)
            return None

        return post

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self._prefetched.clear()
        self._point_at_storage_all()


def enable_block_offload(
    model: nn.Module, device, *, storage="cpu", prefetch: bool = True, pin: Optional[bool] = None
) -> BlockOffload:
    """Run `model` on `device` with its patch and pixel blocks kept in `storage` memory, each brought to
    the device only while it runs. Inputs must be on `device`. Returns a handle; `handle.remove()`
    takes the hooks off (the block weights stay in storage, the rest on the device)."""
    device = torch.device(device)
    if pin is None:
        pin = device.type == "cuda"
    return BlockOffload(model, device, storage, prefetch, pin)


def offload_device_bytes(model: nn.Module) -> int:
    """Bytes of weights that stay on the device with block offloading (all but the blocks), plus the
    largest block: what the device must hold for the weights."""
    blocks = list(model.patch_blocks) + list(model.pixel_blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    largest = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    return rest + 2 * largest  # the running block and the prefetched one
