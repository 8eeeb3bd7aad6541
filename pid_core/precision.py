"""Storage and compute precision (docs/DESIGN.md §4): the one place that decides how the network computes.

Two notions, kept apart:
- the *storage* dtype: what the weights are held in (the file's bf16, or what the user picked);
- the *compute* dtype: fp32 on the CPU (exact, and CPUs run bf16 matmuls far slower than fp32) and
  for fp32 weights; elsewhere the reference's bf16 autocast (fp16 autocast for fp16 weights).
When they differ on the CPU the network is built from `CastOps` (each layer casts its weights per
call), so bf16 weights compute in fp32 at half the memory of fp32 weights, bit-identical to them.
"""

from __future__ import annotations

import contextlib
import torch
import torch.nn as nn

from .network.ops import CastOps

# Storage dtypes a user can choose by name; "auto" keeps the file's.
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HALF = (torch.bfloat16, torch.float16)


def storage_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model's weights are held in (its first parameter's: the text position table,
    which keeps the file's floating dtype even when matmul weights are quantized)."""
    return next(model.parameters()).dtype


def compute_dtype(storage: torch.dtype, device) -> torch.dtype:
    """fp32 on the CPU and for fp32 weights; else the weights' half dtype (bf16 for other storage,
    such as fp8 or quantized weights), the reference's autocast."""
    if torch.device(device).type == "cpu" or storage == torch.float32:
        return torch.float32
    return storage if storage in HALF else torch.bfloat16


def operations_for(storage: torch.dtype, device):
    """The layer namespace for weights stored in `storage` computing on `device`: torch.nn when they
    compute as stored (fp32, or half precision under autocast), CastOps when half-precision weights
    compute in fp32 (on the CPU) and each layer must cast them per call."""
    return CastOps if storage in HALF and compute_dtype(storage, device) != storage else nn


def compute_context(device, dtype: torch.dtype):
    """The precision the network runs under on `device` in the compute dtype (compute_dtype, decided by
    the plan): nothing for fp32, else autocast in that dtype.

    The reference keeps fp32 weights and autocasts to bf16; holding the weights in bf16 instead gives
    the same matmul inputs (the checkpoints are bf16), and the layers upcast norm weights and gate
    scalars themselves, so the numerics match without an fp32 copy of the model.
    """
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in [-1, 1] (data range 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()
