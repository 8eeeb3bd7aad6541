"""The memory model of a decode: working memory of one forward over a batch of tiles, the sampler's
canvas-size state, and the budget a device has free (docs/DESIGN.md §9)."""

from __future__ import annotations

from typing import Optional

import torch

from ..network import PidConfig

PIXEL_CHUNK_BYTES = 128 << 20  # working set of one chunk of the pixel blocks
ESTIMATE_MARGIN = 1.15  # allocator slack and what the formula leaves out


def _act_bytes(dtype) -> int:
    return 2 if dtype in (torch.bfloat16, torch.float16) else 4


def auto_chunk_tokens(config: PidConfig, dtype=torch.float32, budget_bytes: int = PIXEL_CHUNK_BYTES) -> int:
    """Patch tokens per chunk of the pixel blocks so that one chunk's working set stays near budget."""
    return max(64, int(budget_bytes // _pixel_chunk_bytes_per_token(config, _act_bytes(dtype))) // 64 * 64)


def _pixel_chunk_bytes_per_token(cfg: PidConfig, a: int) -> int:
    """Working set per patch token of the per-pixel part of a pixel block: the modulation (6 groups of
    pixel_hidden per pixel, computed 2 then 4 at a time when chunked), the MLP's hidden layer before
    and after GELU and two fp32 stream-sized temporaries."""
    p2, d = cfg.patch_size**2, cfg.pixel_hidden_size
    return p2 * (4 * d * a + 2 * d * 4 + 2 * cfg.pixel_mlp_hidden * a)


def tile_memory_estimate(
    config: PidConfig,
    tile_hw,
    *,
    dtype=torch.float32,
    batch: int = 1,
    chunk_tokens: Optional[int] | str = "auto",
    text_tokens: Optional[int] = None,
    attention: str = "flash",
) -> int:
    """Working memory in bytes (beyond the weights) of one forward over `batch` images of tile_hw.

    From the network's sizes: the patch-block residual stream in fp32 and the largest transient of a
    patch block (SwiGLU hidden x3, or q/k/v with fp32 RoPE temporaries), one adapter head at a time,
    the pixel stream ([tokens, P*P, pixel_hidden] fp32, in and out) and the pixel blocks' per-pixel
    working set for the whole canvas (unchunked) or one chunk; attention "flash" (SDPA's flash or
    memory-efficient kernels, linear in tokens, used for every attention here on CUDA and CPU) or
    "math" (the full [heads, N, N] score matrix). dtype: the compute dtype (bf16 weights run under
    bf16 autocast). Calibrated against measurements of the full-size model on CPU (pid_core.bench).
    """
    th, tw = (tile_hw, tile_hw) if isinstance(tile_hw, int) else tile_hw
    cfg = config
    a = _act_bytes(dtype)
    P, D, M = cfg.patch_size, cfg.hidden_size, cfg.mlp_hidden
    L = (th // P) * (tw // P)
    T = text_tokens if text_tokens is not None else cfg.text_max_tokens
    N = batch * L
    p2, d, Dp = P * P, cfg.pixel_hidden_size, cfg.pixel_attn_hidden_size
    io = 3 * p2 * 4 + 3 * p2 * a  # the tile batch x (fp32) and its velocity
    # Patch phase: residual (fp32), adapter tokens, and the larger transient of a block: SwiGLU (its
    # fp32 modulated input, the bf16/fp32 copy, hidden x3) or attention (modulated input, qkv, roped
    # q and k, the concatenated [text; image] q/k/v and the output).
    mlp = 4 * D + D * a + 3 * M * a
    attn = 4 * D + 9 * D * a
    patch = N * (D * 4 + cfg.adapter_hidden * 4 + io + max(mlp, attn)) + batch * T * D * 16
    # Pixel phase: s_cond (fp32), the pixel stream (fp32), compressed tokens and attention, the per-pixel
    # working set of one chunk; unchunked, also the embedding and read-out temporaries (3 streams).
    stream = p2 * d * 4
    chunk = N if chunk_tokens in (None, 0) else (
        auto_chunk_tokens(cfg, dtype) if chunk_tokens == "auto" else int(chunk_tokens))
    chunk = min(chunk, N)
    pixel = N * (D * 4 + stream + 6 * Dp * a + io) + chunk * _pixel_chunk_bytes_per_token(cfg, a)
    if chunk == N:
        pixel = max(pixel, N * (D * 4 + 4 * stream + io))
    total = max(patch, pixel)
    if attention == "math":
        heads = max(cfg.num_heads, cfg.pixel_num_heads)
        total += batch * heads * (L + T) ** 2 * max(a, 4) * 2
    return int(total * ESTIMATE_MARGIN)


def largest_chunk_within(config: PidConfig, tile_hw, budget_bytes: int, *, dtype=torch.float32, batch: int = 1) -> Optional[int]:
    """The most patch tokens per chunk of the pixel blocks whose forward (`tile_memory_estimate`) fits
    budget_bytes, in steps of 64 tokens; None when even the smallest chunk does not fit."""
    th, tw = (tile_hw, tile_hw) if isinstance(tile_hw, int) else tile_hw
    tokens = batch * (th // config.patch_size) * (tw // config.patch_size)

    def fits(chunk):
        return tile_memory_estimate(config, (th, tw), dtype=dtype, batch=batch, chunk_tokens=chunk) <= budget_bytes

    if not fits(64):
        return None
    low, high = 1, max(1, tokens // 64)  # in units of 64 tokens; fits(64 * low) holds
    while low < high:
        mid = (low + high + 1) // 2
        if fits(64 * mid):
            low = mid
        else:
            high = mid - 1
    return 64 * low


def step_cache_bytes(config: PidConfig, tile_hw, *, dtype=torch.float32, rows: int = 1, keys: int = 1,
                     keep: str = "tokens", text_tokens: Optional[int] = None) -> int:
    """Bytes the decode's step-invariant cache (network/prepared.py, docs/DESIGN.md §3.5) holds on the
    compute device: `keys` entries (one per tile batch, or the whole canvas) of `rows` images of tile_hw
    (tiles x samples x guidance branches in one forward). The tables (RoPE, sin-cos) are shared by
    entries of one shape; each entry holds its text embedding (fp32: RMSNorm's weight is), and the
    adapter's tokens (keep "tokens") or its head outputs (keep "heads") in the compute dtype."""
    if keep == "off":
        return 0
    th, tw = (tile_hw, tile_hw) if isinstance(tile_hw, int) else tile_hw
    cfg = config
    a = _act_bytes(dtype)
    P = cfg.patch_size
    L = (th // P) * (tw // P)
    T = text_tokens if text_tokens is not None else cfg.text_max_tokens
    tables = L * (cfg.head_dim + cfg.pixel_head_dim) * 4 + T * cfg.head_dim * 4 + (th + tw) * cfg.pixel_hidden_size * 4
    entry = rows * T * cfg.hidden_size * 4
    if keep == "tokens":
        entry += rows * L * cfg.adapter_hidden * a
    elif keep == "heads":
        entry += rows * L * cfg.hidden_size * a * (cfg.num_lq_outputs + (1 if cfg.pixel_gate else 0))
    return int((tables + keys * entry) * ESTIMATE_MARGIN)


def canvas_memory_estimate(canvas_hw: tuple[int, int], batch: int, canvases: int) -> int:
    """The decode's canvas-size state (`canvases` fp32 images, 12 bytes per pixel each: how many the
    sampler keeps is samplers.SamplerSpec.state_canvases) next to the network, plus the row slices of the
    samplers' updates (bounded)."""
    H, W = canvas_hw
    return canvases * batch * 3 * H * W * 4 + (64 << 20)


def device_memory_budget(device, *, fraction: float = 0.85) -> Optional[int]:
    """A working-memory budget from what the device has free now (CUDA: free memory; CPU:
    MemAvailable); None when unknown. Inside ComfyUI prefer comfy.model_management.get_free_memory."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * fraction)
        if device.type == "cpu":
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(int(line.split()[1]) * 1024 * fraction)
    except (OSError, RuntimeError, ValueError, AssertionError):  # AssertionError: a torch built without CUDA
        return None
    return None

