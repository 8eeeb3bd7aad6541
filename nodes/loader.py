"""PiD Loader: a PiD checkpoint file -> a PiD model inside ComfyUI's model machinery.

Files are listed from models/pid (registered here) and models/diffusion_models (where Comfy-Org's
repackaged pid_*.safetensors files go). The file is read and checked by pid_core (strict keys, .pth only
with weights_only); the network is built from ComfyUI's own layers, the ones comfy.ops picks for the
file (docs/DESIGN.md §12): manual cast when the weights are stored in another dtype than the device
computes in, ComfyUI's mixed-precision ops when the file carries ComfyUI's quantization metadata (mxfp8,
int8 convrot, fp8, ...). Wrapped in a ModelPatcher, ComfyUI then loads it fully or partially (layer by
layer on small cards) and offloads it like its own models.
"""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.quant_ops
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..pid_core.checkpoint import (CheckpointInfo, build_model, describe, read_config, read_metadata, read_state_dict,
                                   strip_prefix)
from ..pid_core.precision import DTYPES, compute_dtype
from ..pid_core.quantized import floating_dtype, formats, quantized_layers
from ..pid_core.wording import term
from .common import CATEGORY, NODE_ID_LOADER, NodeInputError, PidModel, user_errors

log = logging.getLogger("pid_decoder")

# Weight dtypes in memory: pid_core's, plus the fp8 storage ComfyUI's layers can cast from (as core's
# Load Diffusion Model offers). fp8 applies to the matmul and conv weights; norms and biases keep the file's.
FP8 = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e4m3fn_fast": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
WEIGHT_DTYPES = {**DTYPES, **FP8}


def pid_operations(base):
    """ComfyUI's layer namespace `base` with the `layer_weights` hook pid_core's network uses where it
    reads a layer's weight itself: ComfyUI's own cast (device, dtype, dequantization, lowvram patches)."""

    class PidOperations(base):
        @staticmethod
        def layer_weights(layer, dtype, device):
            return comfy.ops.CastBiasWeightContext(layer, None, dtype=dtype, device=device, bias_dtype=dtype,
                                                   offloadable=True)

    return PidOperations


def _to_storage(sd: dict, dtype: torch.dtype) -> dict:
    """fp8: matmul and conv weights (2-D and more) only; other dtypes: every tensor."""
    if dtype in FP8.values():
        return {k: v.to(dtype) if k.endswith(".weight") and v.dim() >= 2 else v for k, v in sd.items()}
    return {k: v.to(dtype) for k, v in sd.items()}


def load_comfy_pid(path: str, weight_dtype: str = "auto"):
    """The PiD network of a file, built from comfy.ops for ComfyUI's load device."""
    name = os.path.basename(path)
    sd, key_layout = strip_prefix(read_state_dict(path))
    # ComfyUI's own reading of quantization: the header's metadata (and the legacy scaled-fp8 marks)
    # become per-layer comfy_quant tensors that its mixed-precision layers consume.
    sd, _ = comfy.utils.convert_old_quants(sd, "", metadata=read_metadata(path))
    quantized = quantized_layers(sd)
    # The file's own widths, not its stored shapes (block layouts pad them): ComfyUI's quantized layers
    # take a weight's original shape from the layer built here and read the padded weight at it.
    config, variant = read_config(sd, path, quantized)
    file_dtype = floating_dtype(sd)
    bare_fp8 = {t.dtype for t in sd.values() if t.dtype in FP8.values()} if not quantized else set()
    if bare_fp8 and weight_dtype == "auto":  # saved with an fp8 weight dtype (scale 1): keep it, cast per layer
        weight_dtype = next(k for k, v in FP8.items() if v in bare_fp8)
    device = comfy.model_management.get_torch_device()
    if quantized:
        unknown = sorted(set(formats(quantized)) - set(comfy.quant_ops.QUANT_ALGOS))
        if unknown:
            raise NodeInputError(
                f"{name} is quantized as {', '.join(unknown)}, which this ComfyUI cannot read (it reads "
                f"{', '.join(sorted(comfy.quant_ops.QUANT_ALGOS))}). Update ComfyUI and comfy-kitchen, or use the bf16 file.")
        if weight_dtype != "auto":
            log.warning("PiD Loader: %s is quantized; weight_dtype %s is ignored (the file's layout is kept).",
                        name, weight_dtype)
        storage = file_dtype
        ops = comfy.ops.pick_operations(None, file_dtype, device,
                                        model_config=SimpleNamespace(quant_config={"mixed_ops": True}))
    else:
        storage = WEIGHT_DTYPES[weight_dtype] or file_dtype
        sd = _to_storage(sd, storage) if storage != file_dtype else sd
        ops = comfy.ops.pick_operations(storage, compute_dtype(storage, device), device,
                                        fp8_optimizations=weight_dtype == "fp8_e4m3fn_fast")
    model = build_model(sd, config, name=name, operations=pid_operations(ops), quantized=quantized)
    model.variant = variant
    model.checkpoint = CheckpointInfo(path=path, key_layout=key_layout, file_dtype=file_dtype,
                                      storage=(f"{'/'.join(formats(quantized))} x {len(quantized)} layers" if quantized else
                                               str(storage).replace("torch.", "")))
    # ComfyUI sizes its cast buffers for partially loaded layers from the model's cast dtype.
    model.manual_cast_dtype = compute_dtype(storage, device)
    return model


# Model folder for PiD checkpoints (models/pid); files in diffusion_models/ are listed too.
PID_FOLDER = "pid"


def register_pid_folder():
    """models/pid, with the usual model extensions, unless the user mapped it already."""
    if PID_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[PID_FOLDER] = (
            [os.path.join(folder_paths.models_dir, PID_FOLDER)], folder_paths.supported_pt_extensions)


register_pid_folder()


def _looks_like_pid(name: str) -> bool:
    base = os.path.basename(name).lower()
    return "pid" in base or "pixeldit" in base


def list_pid_files() -> list[str]:
    """models/pid files first, then diffusion_models files (those named like PiD first)."""
    own = folder_paths.get_filename_list(PID_FOLDER)
    seen = set(own)
    diffusion = [f for f in folder_paths.get_filename_list("diffusion_models") if f not in seen]
    diffusion.sort(key=lambda f: (not _looks_like_pid(f), f.lower()))
    return list(own) + diffusion


def full_path(name: str) -> str:
    for folder in (PID_FOLDER, "diffusion_models"):
        path = folder_paths.get_full_path(folder, name)
        if path is not None:
            return path
    raise NodeInputError(f"PiD checkpoint {name!r} was not found. Check {term.checkpoint_place}.")


class PiDLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID_LOADER,
            display_name="PiD Loader",
            category=CATEGORY,
            search_aliases=["pid", "pixel diffusion decoder", "load pid", "pixeldit"],
            description=(
                "Loads a PiD (pixel-diffusion decoder) checkpoint: the official model_ema_bf16.pth or a "
                "repackaged pid_*.safetensors (bf16, or Comfy-Org's quantized mxfp8 / int8 files), from "
                "models/pid or models/diffusion_models. ComfyUI loads it fully or partially as free VRAM allows. "
                "Shows what it found."
            ),
            inputs=[
                io.Combo.Input("pid_name", options=list_pid_files(),
                               tooltip="The PiD checkpoint (models/pid or models/diffusion_models). PiD weights are "
                                       "NVIDIA's, non-commercial licence (NSCLv1)."),
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="auto",
                               tooltip="Precision of the weights in memory. auto keeps the file's (bf16, or the "
                                       "quantized layout of an mxfp8/int8 file). fp8 halves the memory of bf16 "
                                       "(matmul weights only; _fast uses fp8 matmuls where the GPU has them). The "
                                       "compute is fp32 on CPU and bf16 on GPU whatever the storage."),
            ],
            outputs=[PidModel.Output("pid_model", display_name="pid_model",
                                     tooltip="The loaded PiD model, for PiD Decode.")],
        )

    @classmethod
    def execute(cls, pid_name, weight_dtype) -> io.NodeOutput:
        if weight_dtype not in WEIGHT_DTYPES:
            raise NodeInputError(f"weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {weight_dtype!r}.")
        with user_errors():
            model = load_comfy_pid(full_path(pid_name), weight_dtype)
        patcher = comfy.model_patcher.CoreModelPatcher(
            model, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(patcher, ui=ui.PreviewText(describe(model)))
