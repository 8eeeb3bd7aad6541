"""Positional encodings: 2-D NTK RoPE for image tokens, 1-D RoPE for text, pixel sin-cos table (docs/DESIGN.md §3.3)."""

from __future__ import annotations

import torch


def rope_2d(head_dim: int, grid_h: int, grid_w: int, ref_h: int, ref_w: int, device=None):
    """(cos, sin) [grid_h*grid_w, head_dim/2] for row-major tokens.

    Positions span linspace(0, 16, n) on each axis whatever the grid, and the base theta of each axis
    is NTK-scaled by (grid / reference grid) ** (d_axis / (d_axis - 2)). Angles interleave x and y.
    """
    d_axis = head_dim // 2
    theta_h = 10000.0 * ((grid_h / ref_h) ** (d_axis / (d_axis - 2)) if d_axis > 2 else 1.0)
    theta_w = 10000.0 * ((grid_w / ref_w) ** (d_axis / (d_axis - 2)) if d_axis > 2 else 1.0)
    x_pos = torch.linspace(0, 16.0, grid_w, device=device)
    y_pos = torch.linspace(0, 16.0, grid_h, device=device)
    y_pos, x_pos = torch.meshgrid(y_pos, x_pos, indexing="ij")
    exponents = torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim
    freqs_w = 1.0 / (theta_w**exponents)
    freqs_h = 1.0 / (theta_h**exponents)
    x_angles = torch.outer(x_pos.reshape(-1), freqs_w)
    y_angles = torch.outer(y_pos.reshape(-1), freqs_h)
    angles = torch.stack([x_angles, y_angles], dim=-1).reshape(grid_h * grid_w, -1)
    return torch.cos(angles), torch.sin(angles)


def rope_1d(head_dim: int, length: int, theta: float = 10000.0, device=None):
    """(cos, sin) [length, head_dim/2] for integer text positions 0..length-1."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.arange(length, device=device).float()[:, None] * freqs[None]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, rope) -> torch.Tensor:
    """Rotate adjacent pairs (2m, 2m+1) of x [B, N, heads, d] in fp32; returns x's dtype."""
    cos, sin = (f[None, :, None, :] for f in rope)
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    out = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1).flatten(3)
    return out.type_as(x)


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin(p*w_k) for k<dim/2] + [cos(p*w_k)], w_k = 10000^(-k/(dim/2)), in float64."""
    half = dim // 2
    omega = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def pixel_sincos_axes(dim: int, height: int, width: int, *, row0: int = 0, col0: int = 0, device=None, dtype=None):
    """The two halves of the pixel table: (columns [width, dim/2], rows [height, dim/2]), computed in
    float64 and cast to dtype. The table is separable: `pixel_sincos_table` broadcasts the two."""
    cols = _sincos_1d(dim // 2, torch.arange(col0, col0 + width, device=device)).to(dtype)
    rows = _sincos_1d(dim // 2, torch.arange(row0, row0 + height, device=device)).to(dtype)
    return cols, rows


def pixel_sincos_table(cols: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[height, width, dim] from `pixel_sincos_axes`: dim/2 channels for the column, then dim/2 for the row."""
    height, width, half = rows.shape[0], cols.shape[0], cols.shape[1]
    return torch.cat([cols[None, :, :].expand(height, width, half), rows[:, None, :].expand(height, width, half)], dim=-1)


def pixel_sincos(dim: int, height: int, width: int, *, row0: int = 0, col0: int = 0, device=None, dtype=None):
    """The fixed pixel table [height, width, dim]: dim/2 channels for the column, then dim/2 for the row.

    The reference builds a full [H*W, dim] float64 table; it is separable, so we build one row and one
    column and broadcast (same values, no 8K x 8K float64 table). row0/col0 offset the coordinates.
    """
    return pixel_sincos_table(*pixel_sincos_axes(dim, height, width, row0=row0, col0=col0, device=device, dtype=dtype))
