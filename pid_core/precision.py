"""Compute precision: fp32, or the reference's bf16 autocast semantics (docs/DESIGN.md §4) on any device."""

from __future__ import annotations

import contextlib

import torch

# Weight dtypes a user can choose by name; "auto" keeps the file's.
DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def weight_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def compute_context(model: torch.nn.Module, device: torch.device | str):
    """Autocast in the weights' dtype when they are half precision, nothing for fp32 weights.

    The reference keeps fp32 weights and autocasts to bf16; holding the weights in bf16 instead gives
    the same matmul inputs (the checkpoints are bf16), and the layers upcast norm weights and gate
    scalars themselves, so the numerics match without an fp32 copy of the model.
    """
    dtype = weight_dtype(model)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of two images in [-1, 1] (data range 2)."""
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    if mse == 0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()
