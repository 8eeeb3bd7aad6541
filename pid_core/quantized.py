"""Quantized PiD files (ComfyUI's quantization format) outside ComfyUI (docs/DESIGN.md §11).

Comfy-Org publishes quantized PiD files next to the bf16 ones (mxfp8, int8 "convrot", ...). Their
layers are described by ComfyUI's quantization metadata: a `_quantization_metadata` JSON in the
safetensors header ({"layers": {name: {"format": ...}}}) or a per-layer `<layer>.comfy_quant` tensor
(the JSON as bytes), with scale tensors beside each weight (`weight_scale`, `input_scale`, ...); the
older "scaled fp8" files mark themselves with a `scaled_fp8` tensor and `scale_weight` scales.

Inside ComfyUI, PiD Loader reads every layout through ComfyUI's own code. Here, without ComfyUI, the
per-tensor fp8 layouts are dequantized exactly (w = q * scale); any other layout is refused with the
bf16 file to use instead, so an integer or block-scaled tensor never reaches the network as numbers
it does not hold.
"""

from __future__ import annotations

import json
from typing import Optional

import torch

# Tensors that accompany a quantized weight, by name after the layer's prefix.
SCALE_NAMES = ("weight_scale", "weight_scale_2", "input_scale", "pre_quant_scale", "scale_weight", "scale_input",
               "weight_s_rel", "weight_s_channel", "weight_codebook", "comfy_quant")
# Layouts whose dequantization is one multiply by a per-tensor scale: exact here in plain torch.
PER_TENSOR_FP8 = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
LEGACY_MARKER = "scaled_fp8"


def _json_tensor(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


def quantized_layers(sd: dict, metadata: Optional[dict] = None) -> dict[str, str]:
    """{layer name: ComfyUI format name} for every quantized layer of a state dict (keys without
    the model prefix), from the file's metadata, its comfy_quant tensors or the legacy scaled-fp8 marks."""
    layers: dict[str, str] = {}
    if metadata and "_quantization_metadata" in metadata:
        for name, conf in json.loads(metadata["_quantization_metadata"]).get("layers", {}).items():
            layers[name] = conf.get("format", "unknown")
    for key, tensor in sd.items():
        if key.endswith(".comfy_quant"):
            layers[key[: -len(".comfy_quant")]] = _json_tensor(tensor).get("format", "unknown")
    if LEGACY_MARKER in sd:
        for key in sd:
            if key.endswith(".scale_weight"):
                layers.setdefault(key[: -len(".scale_weight")], "float8_e4m3fn")
    return layers


def without_quantization(sd: dict, layers) -> dict:
    """The state dict without the quantization side tensors (scales, format marks)."""
    extra = {f"{layer}.{name}" for layer in layers for name in SCALE_NAMES} | {LEGACY_MARKER}
    return {k: v for k, v in sd.items() if k not in extra}


def unsupported_layouts(layers: dict[str, str]) -> list[str]:
    """The formats among `layers` that plain torch does not dequantize here, sorted."""
    return sorted({fmt for fmt in layers.values() if fmt not in PER_TENSOR_FP8})


def dequantize(sd: dict, layers: dict[str, str], dtype: torch.dtype) -> dict:
    """Per-tensor fp8 layers as `dtype` weights (q * scale, computed in fp32); side tensors dropped.
    Only for layouts `unsupported_layouts` does not name."""
    out = without_quantization(sd, layers)
    for layer in layers:
        q = sd[f"{layer}.weight"]
        scale = sd.get(f"{layer}.weight_scale", sd.get(f"{layer}.scale_weight"))
        w = q.to(torch.float32)
        if scale is not None:
            w = w * scale.to(torch.float32)
        out[f"{layer}.weight"] = w.to(dtype)
    return out


def floating_dtype(sd: dict) -> torch.dtype:
    """The dtype most of the file's non-quantized floating values are in (bf16 for the released files)."""
    counts: dict[torch.dtype, int] = {}
    for t in sd.values():
        if t.is_floating_point() and t.element_size() >= 2:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def describe_layers(sd: dict, metadata: Optional[dict] = None) -> dict[str, str]:
    """quantized_layers, plus fp8 weights the file stores without any description (a model saved with
    an fp8 weight dtype: scale 1)."""
    layers = quantized_layers(sd, metadata)
    for key, t in sd.items():
        layer = key[: -len(".weight")]
        if key.endswith(".weight") and t.dtype in PER_TENSOR_FP8.values() and layer not in layers:
            layers[layer] = next(name for name, dt in PER_TENSOR_FP8.items() if dt == t.dtype)
    return layers
