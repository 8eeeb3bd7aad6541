"""PiD files quantized with ComfyUI's own layouts (comfy.quant_ops / comfy_kitchen), saved as Comfy-Org's
quantized files are: quantized weights with their scales, the layers named in the safetensors header's
`_quantization_metadata` (or, `per_layer_tensors`, in per-layer `comfy_quant` tensors).

Used with ComfyUI importable (its Python, its tree on sys.path, args parsed): loader_checks.py (narrow,
CPU) and the GPU kit's checkpoints (tests/gpu/make_checkpoints.py, full size, quantized on the GPU).
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

CONVROT_GROUP = 64  # a power of 4, dividing every quantized input width (narrow and released sizes)


def quantizable(name, shape):
    """Matmul weights of the patch and pixel blocks (the bulk of the model), as in Comfy-Org's files."""
    return (name.startswith(("patch_blocks.", "pixel_blocks.")) and name.endswith(".weight") and len(shape) == 2
            and shape[0] % 32 == 0 and shape[1] % 32 == 0)


def every_matmul(name, shape):
    """Every matmul weight: also the layers whose widths are off every block (stored padded)."""
    return name.endswith(".weight") and len(shape) == 2


def quantized_state_dict(sd, fmt, *, per_layer_tensors=False, device=None, select=quantizable):
    """(state dict in ComfyUI's layout for `fmt` "mxfp8", "nvfp4" or "int8_convrot", {layer: its config}) of
    the weights `select(name, shape)` picks. Each weight is quantized on `device` (default: where it is) and
    stored on the CPU."""
    from comfy.quant_ops import QuantizedTensor

    out, layers = {}, {}
    for key, w in sd.items():
        if not select(key, w.shape):
            out[key] = w
            continue
        layer = key[: -len(".weight")]
        w = w.to(device) if device is not None else w
        if fmt == "mxfp8":
            qt = QuantizedTensor.from_float(w, "TensorCoreMXFP8Layout")
            conf = {"format": "mxfp8"}
        elif fmt == "nvfp4":
            qt = QuantizedTensor.from_float(w, "TensorCoreNVFP4Layout")
            conf = {"format": "nvfp4"}
        elif fmt == "int8_convrot":
            qt = QuantizedTensor.from_float(w, "TensorWiseINT8Layout", per_channel=True, convrot=True,
                                            convrot_groupsize=CONVROT_GROUP)
            conf = {"format": "int8_tensorwise", "convrot": True, "convrot_groupsize": CONVROT_GROUP}
        else:
            raise ValueError(f"unknown quantized format {fmt!r}")
        for k, t in qt.state_dict(key).items():
            out[k] = (t.view(torch.uint8) if t.dtype == torch.float8_e8m0fnu else t).cpu()
        layers[layer] = conf
        if per_layer_tensors:
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)
    return out, layers


def write_quantized(sd, path, fmt, *, per_layer_tensors=False, device=None, select=quantizable):
    """Write `sd` quantized as `fmt` ("mxfp8", "nvfp4", or "int8" / "int8_convrot") to `path`; the number of
    quantized layers."""
    out, layers = quantized_state_dict(sd, "int8_convrot" if fmt == "int8" else fmt,
                                       per_layer_tensors=per_layer_tensors, device=device, select=select)
    metadata = None if per_layer_tensors else {
        "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata=metadata)
    return len(layers)
