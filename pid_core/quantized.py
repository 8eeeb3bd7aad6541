"""Quantized PiD files (ComfyUI's quantization format): their layers, how each layout stores a weight,
and their dequantization outside ComfyUI (docs/DESIGN.md §11).

Comfy-Org publishes quantized PiD files next to the bf16 ones (mxfp8, int8 "convrot", ...). Their
layers are described by ComfyUI's quantization metadata: a `_quantization_metadata` JSON in the
safetensors header ({"layers": {name: {"format": ...}}}) or a per-layer `<layer>.comfy_quant` tensor
(the JSON as bytes), with scale tensors beside each weight (`weight_scale`, `input_scale`, ...); the
older "scaled fp8" files mark themselves with a `scaled_fp8` tensor and `scale_weight` scales.

Inside ComfyUI, PiD Loader reads every layout through ComfyUI's own code. Here, without ComfyUI, the
layouts Comfy-Org publishes for PiD are dequantized in plain torch to the file's float dtype, as
ComfyUI's layouts define them (a test compares with ComfyUI's own dequantization):

- float8_e4m3fn / float8_e5m2: one scale per tensor, w = q * scale;
- mxfp8: fp8 values in blocks of 32 along each row, each block with a power-of-two (E8M0) scale
  stored in cuBLAS's tiled layout;
- int8_tensorwise: int8 values with a scale per tensor or per row; with "convrot" the weight was
  rotated by a normalised Hadamard matrix in groups of the input dimension before quantizing, and is
  rotated back.

Any other layout is refused with the bf16 file to use instead, so an integer or block-scaled tensor
never reaches the network as numbers it does not hold.

Block layouts pad: mxfp8 stores a weight with its rows and columns rounded up to whole blocks of 32
(nvfp4: 16, two values a byte), the padding filled with zeros, and the file keeps no other trace of
the original shape (ComfyUI keeps it in memory only, from the layer it builds). `storage_shape` gives
the stored shape of a logical one, `logical_size` reads a logical width back from the zeros; the
checkpoint reads the widths from the tensors no layout pads wherever it can (docs/DESIGN.md §11).
"""

from __future__ import annotations

import json
import math
from typing import Optional

import torch

# Tensors that accompany a quantized weight, by name after the layer's prefix.
SCALE_NAMES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "scale_weight", "scale_input",
               "weight_s_rel", "weight_s_channel", "weight_codebook", "comfy_quant")
PER_TENSOR_FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
DEQUANTIZED_HERE = (*PER_TENSOR_FP8, "mxfp8", "int8_tensorwise")
LEGACY_MARKER = "scaled_fp8"
MX_BLOCK = 32  # mxfp8: values per scale along a row
# How ComfyUI's layouts store a [rows, columns] weight: for each dimension, the block its size is rounded
# up to (the padding is zeros) and how many values one stored element packs. int8 and fp8 store the
# weight as it is (int8 "convrot" needs the input width to be a multiple of its group: it never pads);
# convrot_w4a4 packs two int4 values a byte along the row, without padding.
STORAGE = {
    "float8_e4m3fn": ((1, 1), (1, 1)),
    "float8_e5m2": ((1, 1), (1, 1)),
    "int8_tensorwise": ((1, 1), (1, 1)),
    "mxfp8": ((MX_BLOCK, 1), (MX_BLOCK, 1)),
    "nvfp4": ((16, 1), (16, 2)),
    "convrot_w4a4": ((1, 1), (1, 2)),
}


def _json_tensor(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


def quantized_layers(sd: dict, metadata: Optional[dict] = None) -> dict[str, dict]:
    """{layer name: its quantization config ({"format": ..., ...})} for every quantized layer of a state
    dict (keys without the model prefix), from the file's metadata, its comfy_quant tensors or the
    legacy scaled-fp8 marks."""
    layers: dict[str, dict] = {}
    if metadata and "_quantization_metadata" in metadata:
        layers.update(json.loads(metadata["_quantization_metadata"]).get("layers", {}))
    for key, tensor in sd.items():
        if key.endswith(".comfy_quant"):
            layers[key[: -len(".comfy_quant")]] = _json_tensor(tensor)
    if LEGACY_MARKER in sd:
        for key in sd:
            if key.endswith(".scale_weight"):
                layers.setdefault(key[: -len(".scale_weight")], {"format": "float8_e4m3fn"})
    return layers


def formats(layers: dict[str, dict]) -> list[str]:
    return sorted({conf.get("format", "unknown") for conf in layers.values()})


def describe_layers(sd: dict, metadata: Optional[dict] = None) -> dict[str, dict]:
    """quantized_layers, plus fp8 weights the file stores without any description (a model saved with
    an fp8 weight dtype: scale 1)."""
    layers = quantized_layers(sd, metadata)
    for key, t in sd.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and t.dtype in PER_TENSOR_FP8.values() and layer not in layers:
            layers[layer] = {"format": next(name for name, dt in PER_TENSOR_FP8.items() if dt == t.dtype)}
    return layers


def without_quantization(sd: dict, layers) -> dict:
    """The state dict without the quantization side tensors (scales, format marks)."""
    extra = {f"{layer}.{name}" for layer in layers for name in SCALE_NAMES} | {LEGACY_MARKER}
    return {k: v for k, v in sd.items() if k not in extra}


def unsupported_layouts(layers: dict[str, dict]) -> list[str]:
    """The formats among `layers` that are not dequantized here, sorted."""
    return [fmt for fmt in formats(layers) if fmt not in DEQUANTIZED_HERE]


def storage_shape(conf: dict, shape) -> Optional[tuple]:
    """The shape `conf`'s layout stores a weight of logical `shape` in (mxfp8: 48 x 170 as 64 x 192);
    None for a layout STORAGE does not describe."""
    dims = STORAGE.get(conf.get("format"))
    if dims is None or len(shape) != len(dims):
        return None
    return tuple(-(-n // block) * block // pack for n, (block, pack) in zip(shape, dims))


def stores_as_is(conf: dict) -> bool:
    """Whether the layout stores a weight in its logical shape (no padding, no packing)."""
    return STORAGE.get(conf.get("format")) == ((1, 1), (1, 1))


def logical_size(q: torch.Tensor, conf: dict, dim: int) -> Optional[int]:
    """The logical size along `dim` (0: rows, 1: columns) of a weight stored as `q` in `conf`'s layout:
    the stored size (unpacked) where the layout does not pad; where it does, the padding ComfyUI's
    quantizers write is zeros, so the size runs to the last row (column) of the last block that holds a
    value other than zero. None for a layout STORAGE does not describe."""
    dims = STORAGE.get(conf.get("format"))
    if dims is None:
        return None
    block, pack = dims[dim]
    size = q.shape[dim] * pack
    if block == 1:
        return size
    stored_block = min(block // pack, q.shape[dim])
    tail = _nonzero_values(q.narrow(dim, q.shape[dim] - stored_block, stored_block), conf["format"])
    hits = tail.any(dim=1 - dim).nonzero()
    last = int(hits[-1]) + 1 if len(hits) else 1  # an all-zero last block: at most block - 1 is padding
    return size - stored_block * pack + last


def _nonzero_values(q: torch.Tensor, fmt: str) -> torch.Tensor:
    """Which stored values are not zero (either sign), packed values unpacked along the row."""
    b = q.view(torch.uint8)
    if fmt == "nvfp4":  # two e2m1 values a byte, the first in the high nibble
        return torch.stack(((b >> 4) & 0x7, b & 0x7), dim=-1).flatten(-2) != 0
    return b & 0x7F != 0  # fp8: 0x00 and 0x80 are the two zeros


def dequantize(sd: dict, layers: dict[str, dict], dtype: torch.dtype, shapes: Optional[dict] = None) -> dict:
    """The quantized layers as plain `dtype` weights (computed in fp32), side tensors dropped; weights
    stored padded (mxfp8) are cut to their logical `shapes[key]`. Only for layouts unsupported_layouts
    does not name, with stored shapes already checked (checkpoint.check_keys)."""
    out = without_quantization(sd, layers)
    for layer, conf in layers.items():
        key = f"{layer}.weight"
        w = _dequantize_weight(sd[key], sd.get(f"{layer}.weight_scale", sd.get(f"{layer}.scale_weight")), conf)
        if shapes is not None and key in shapes and tuple(w.shape) != tuple(shapes[key]):
            w = w[tuple(slice(0, n) for n in shapes[key])]
        out[key] = w.to(dtype).contiguous()
    return out


def _dequantize_weight(q: torch.Tensor, scale: Optional[torch.Tensor], conf: dict) -> torch.Tensor:
    fmt = conf.get("format")
    if fmt == "mxfp8":
        rows, cols = q.shape
        blocks = _e8m0_to_float(_unswizzle(scale.view(torch.uint8), rows, cols // MX_BLOCK))
        return (_fp8_values(q).reshape(rows, cols // MX_BLOCK, MX_BLOCK) * blocks[..., None]).reshape(rows, cols)
    if fmt == "int8_tensorwise":
        w = q.to(torch.float32) * scale.to(torch.float32)
        params = conf.get("params") if isinstance(conf.get("params"), dict) else {}
        if conf.get("convrot", params.get("convrot", False)):
            w = _rotate_back(w, int(conf.get("convrot_groupsize", params.get("convrot_groupsize", 256))))
        return w
    w = _fp8_values(q)  # per-tensor fp8
    return w if scale is None else w * scale.to(torch.float32)


def _fp8_values(q: torch.Tensor) -> torch.Tensor:
    """fp8 values as fp32; files written without an fp8 dtype store them as uint8 bytes (e4m3fn)."""
    return (q.view(torch.float8_e4m3fn) if q.dtype == torch.uint8 else q).to(torch.float32)


def _e8m0_to_float(e: torch.Tensor) -> torch.Tensor:
    """E8M0 scales: an 8-bit power-of-two exponent with bias 127; 0 reads as 0 (as ComfyUI's layout
    reads it) and 255 as NaN."""
    out = torch.exp2(e.to(torch.float32) - 127.0)
    out = torch.where(e == 0, torch.zeros_like(out), out)
    return torch.where(e == 255, torch.full_like(out, float("nan")), out)


def _unswizzle(blocked: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Block scales from cuBLAS's tiled layout (tiles of 128 rows x 4 columns, each stored as 32 x 16
    with the four 32-row groups side by side) back to [rows, cols]."""
    row_tiles, col_tiles = math.ceil(rows / 128), math.ceil(cols / 4)
    t = blocked.reshape(row_tiles, col_tiles, 32, 4, 4).transpose(2, 3)  # (tile, tile, row group, row, col)
    t = t.reshape(row_tiles, col_tiles, 128, 4).permute(0, 2, 1, 3)
    return t.reshape(row_tiles * 128, col_tiles * 4)[:rows, :cols]


def _hadamard(size: int) -> torch.Tensor:
    """The normalised regular Hadamard matrix of ConvRot: Kronecker powers of a symmetric 4 x 4 one."""
    h4 = torch.tensor([[1, 1, 1, -1], [1, 1, -1, 1], [1, -1, 1, 1], [-1, 1, 1, 1]], dtype=torch.float32)
    h = h4
    while h.shape[0] < size:
        h = torch.kron(h, h4)
    if h.shape[0] != size:
        raise ValueError(f"a ConvRot group of {size} is not a power of 4")
    return h / math.sqrt(size)


def _rotate_back(w: torch.Tensor, group: int) -> torch.Tensor:
    """W from W_rot = W H^T per group of `group` input columns (H is orthogonal and symmetric)."""
    out_f, in_f = w.shape
    h = _hadamard(group)
    return torch.matmul(w.reshape(out_f, in_f // group, group), h.T).reshape(out_f, in_f)


def floating_dtype(sd: dict) -> torch.dtype:
    """The dtype most of the file's non-quantized floating values are in (bf16 for the released files)."""
    counts: dict[torch.dtype, int] = {}
    for t in sd.values():
        if t.is_floating_point() and t.element_size() >= 2:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32
