"""PiD Loader: a PiD checkpoint file -> a PiD model that ComfyUI loads to and offloads from the GPU.

Files are listed from models/pid (registered here) and models/diffusion_models (where Comfy-Org's
repackaged pid_*.safetensors files go). Loading is pid_core.checkpoint.load_pid (strict, safe: .pth
only with weights_only); the model is wrapped in a ModelPatcher for ComfyUI's memory management.
"""

from __future__ import annotations

import os

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io, ui

from ..pid_core.checkpoint import describe, load_pid
from ..pid_core.precision import DTYPES
from .common import CATEGORY, NODE_ID_LOADER, NodeInputError, PidModel, user_errors

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
    raise NodeInputError(f"PiD checkpoint {name!r} was not found in models/{PID_FOLDER} or models/diffusion_models.")


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
                "repackaged pid_*.safetensors, from models/pid or models/diffusion_models. Shows what it found."
            ),
            inputs=[
                io.Combo.Input("pid_name", options=list_pid_files(),
                               tooltip="The PiD checkpoint (models/pid or models/diffusion_models). PiD weights are "
                                       "NVIDIA's, non-commercial licence (NSCLv1)."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto",
                               tooltip="Precision of the weights in memory. auto keeps the file's (bf16 for the "
                                       "released files); fp32 is the safe choice on CPU."),
            ],
            outputs=[PidModel.Output("pid_model", display_name="pid_model",
                                     tooltip="The loaded PiD model, for PiD Decode.")],
        )

    @classmethod
    def execute(cls, pid_name, weight_dtype) -> io.NodeOutput:
        if weight_dtype not in DTYPES:
            raise NodeInputError(f"weight_dtype must be one of {', '.join(DTYPES)}, got {weight_dtype!r}.")
        with user_errors():
            model = load_pid(full_path(pid_name), device="cpu", dtype=DTYPES[weight_dtype])
        patcher = comfy.model_patcher.CoreModelPatcher(
            model, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())
        return io.NodeOutput(patcher, ui=ui.PreviewText(describe(model)))
