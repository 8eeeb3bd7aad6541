"""PiD Loader and PiD Decode inside a real ComfyUI, imported (no server); run with ComfyUI's Python.

    python loader_checks.py COMFYUI_PATH PACK_PATH WORKDIR

Writes WORKDIR/results.json for tests/comfyui/test_loader_comfyui.py:

* a narrow random PiD in bf16, and the same network quantized with ComfyUI's own layouts
  (comfy.quant_ops / comfy_kitchen: mxfp8 as Comfy-Org publishes for the v1 students, int8 "convrot"
  for v1.5) and saved as Comfy-Org's files are: quantized weights with their scales, the layers named
  in the safetensors header's `_quantization_metadata` (a second int8 file carries per-layer
  `comfy_quant` tensors instead);
* each file through PiD Loader (its real code path: ComfyUI's mixed-precision ops) and PiD Decode;
  the images are compared with the bf16 decode (PSNR); pid_core's own dequantization (the command
  line's and the API's load_pid) is compared with ComfyUI's, weight by weight;
* a second narrow network whose widths are not multiples of the layouts' blocks (hidden 48, SwiGLU
  170, pixel width 20, text 40), every matmul weight quantized as mxfp8 and as nvfp4, which ComfyUI
  stores padded to whole blocks: PiD Loader must build the network at its own widths (ComfyUI's layers
  take their original shape from the layer pid_core builds, the file does not hold it);
* fp8 weight dtypes of PiD Loader, a partial load (ModelPatcher with a small memory budget) against
  a full load, and unload / reload of the model between decodes.
"""

import importlib.util
import json
import os
import sys

comfy_path, pack_path, work = sys.argv[1:4]
sys.path.insert(0, comfy_path)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import folder_paths  # noqa: E402
from comfy.quant_ops import QuantizedTensor  # noqa: E402
from quantized_files import every_matmul, write_quantized  # noqa: E402  (beside this script)

# The pack as the package ComfyUI would import (its modules import each other relatively).
spec = importlib.util.spec_from_file_location("pid_pack", os.path.join(pack_path, "__init__.py"),
                                              submodule_search_locations=[pack_path])
pack = importlib.util.module_from_spec(spec)
sys.modules["pid_pack"] = pack
spec.loader.exec_module(pack)
from pid_pack.nodes.decode import PiDDecode  # noqa: E402
from pid_pack.nodes.loader import PiDLoader  # noqa: E402
from pid_pack.pid_core.checkpoint import expected_shapes, load_pid  # noqa: E402
from pid_pack.pid_core.decode import run_plan  # noqa: E402
from pid_pack.pid_core.plan import plan_decode  # noqa: E402
from pid_pack.pid_core.precision import psnr  # noqa: E402
from pid_pack.pid_core.commands.random_checkpoints import config_shapes, narrow_config, random_state_dict  # noqa: E402

TEXT_DIM = 64
# Narrow, with every quantized matmul a multiple of 32 (mxfp8 blocks).
CONFIG = narrow_config(hidden_size=64, num_heads=2, mlp_hidden=192, pixel_attn_hidden_size=64, pixel_num_heads=2,
                       pixel_mlp_hidden=64, text_dim=TEXT_DIM, text_tokens=16)
# Widths off every block: ComfyUI stores such weights padded (mxfp8 to 32, nvfp4 to 16).
ODD_TEXT_DIM = 40
ODD_CONFIG = narrow_config(hidden_size=48, num_heads=2, mlp_hidden=170, pixel_attn_hidden_size=48, pixel_num_heads=2,
                           pixel_hidden_size=20, text_dim=ODD_TEXT_DIM, text_tokens=16)


def main():
    models = os.path.join(work, "pid")
    os.makedirs(models, exist_ok=True)
    folder_paths.add_model_folder_path("pid", models)
    sd = random_state_dict(config_shapes(CONFIG), seed=0, dtype=torch.bfloat16)
    files = {"bf16": "pid_narrow_bf16.safetensors", "mxfp8": "pid_narrow_mxfp8.safetensors",
             "int8_convrot": "pid_narrow_int8_convrot.safetensors",
             "int8_convrot_per_layer": "pid_narrow_int8_convrot_layers.safetensors"}
    save_file(sd, os.path.join(models, files["bf16"]))
    counts = {
        "mxfp8": write_quantized(sd, os.path.join(models, files["mxfp8"]), "mxfp8"),
        "int8_convrot": write_quantized(sd, os.path.join(models, files["int8_convrot"]), "int8"),
        "int8_convrot_per_layer": write_quantized(sd, os.path.join(models, files["int8_convrot_per_layer"]), "int8",
                                                  per_layer_tensors=True),
    }
    odd_sd = random_state_dict(config_shapes(ODD_CONFIG), seed=3, dtype=torch.bfloat16)
    files["odd_bf16"] = "pid_odd_bf16.safetensors"
    save_file(odd_sd, os.path.join(models, files["odd_bf16"]))
    for fmt in ("mxfp8", "nvfp4"):
        files[f"odd_{fmt}"] = f"pid_odd_{fmt}.safetensors"
        counts[f"odd_{fmt}"] = write_quantized(odd_sd, os.path.join(models, files[f"odd_{fmt}"]), fmt,
                                               select=every_matmul)
    g = torch.Generator().manual_seed(0)
    latent = {"samples": torch.randn(1, 16, 3, 4, generator=g) * 2}
    conditioning = [[torch.randn(1, 16, TEXT_DIM, generator=g), {}]]
    odd_latent = {"samples": torch.randn(1, 16, 2, 2, generator=g) * 2}
    odd_conditioning = [[torch.randn(1, 16, ODD_TEXT_DIM, generator=g), {}]]

    def load(name, weight_dtype="auto"):
        return PiDLoader.execute(files[name], weight_dtype).args[0]

    def decode(patcher, samples=latent, text=conditioning):
        return PiDDecode.execute(patcher, samples, text, seed=1, steps=2, latent_format="flux", sigma=0.3,
                                 tiling="off").args[0]

    results = {"quantized_layers": counts}
    bf16 = load("bf16")
    reference = decode(bf16)
    results["bf16_finite"] = bool(torch.isfinite(reference).all())

    def compare(image):
        return psnr(image.permute(0, 3, 1, 2) * 2 - 1, reference.permute(0, 3, 1, 2) * 2 - 1)

    for name in ("mxfp8", "int8_convrot", "int8_convrot_per_layer"):
        patcher = load(name)
        quantized = {n: m.weight for n, m in patcher.model.named_modules()
                     if isinstance(getattr(m, "weight", None), QuantizedTensor)}
        image = decode(patcher)
        # pid_core's own dequantization (command line, API) against ComfyUI's, layer by layer
        standalone = load_pid(os.path.join(models, files[name]))
        diff = max(float((standalone.get_parameter(f"{n}.weight") - w.dequantize()).abs().max())
                   for n, w in quantized.items())
        results[name] = {"psnr": compare(image), "finite": bool(torch.isfinite(image).all()),
                         "quantized_tensors": len(quantized), "standalone_max_diff": diff}
        comfy.model_management.unload_all_models()
    # Widths off the blocks: the network at the file's own widths, its quantized weights padded in storage
    # and read at those widths by ComfyUI's layers (QuantizedTensor.shape is the layer's original shape).
    odd_reference = decode(load("odd_bf16"), odd_latent, odd_conditioning)
    comfy.model_management.unload_all_models()
    logical = expected_shapes(ODD_CONFIG)
    for fmt in ("mxfp8", "nvfp4"):
        patcher = load(f"odd_{fmt}")
        model = patcher.model
        quantized = {n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), QuantizedTensor)}
        image = decode(patcher, odd_latent, odd_conditioning)
        result = {
            "config_matches": model.config == ODD_CONFIG,
            "quantized_tensors": len(quantized),
            "padded_tensors": sum(tuple(w.storage_shape) != tuple(w.shape) for w in quantized.values()),
            "logical_shapes": all(tuple(w.shape) == logical[f"{n}.weight"] for n, w in quantized.items()),
            "finite": bool(torch.isfinite(image).all()),
            "psnr": psnr(image.permute(0, 3, 1, 2) * 2 - 1, odd_reference.permute(0, 3, 1, 2) * 2 - 1),
        }
        if fmt == "mxfp8":  # pid_core dequantizes mxfp8 itself (nvfp4 only inside ComfyUI)
            standalone = load_pid(os.path.join(models, files[f"odd_{fmt}"]))
            result["standalone_config_matches"] = standalone.config == ODD_CONFIG
            result["standalone_max_diff"] = max(
                float((standalone.get_parameter(f"{n}.weight") - w.dequantize()).abs().max()) for n, w in quantized.items())
        results[f"odd_{fmt}"] = result
        comfy.model_management.unload_all_models()

    for dtype in ("fp8_e4m3fn", "fp8_e5m2"):
        patcher = load("bf16", dtype)
        fp8 = sum(p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) for p in patcher.model.parameters())
        results[dtype] = {"psnr": compare(decode(patcher)), "fp8_parameters": int(fp8)}
        comfy.model_management.unload_all_models()

    # Partial load: the same network in a ModelPatcher given a small budget (ComfyUI's low-VRAM load:
    # the layers that do not fit keep their weights offloaded and cast them per call).
    full = load("bf16")
    device = comfy.model_management.get_torch_device()
    patcher = comfy.model_patcher.ModelPatcher(full.model, load_device=device, offload_device=device)
    size = comfy.model_management.module_size(full.model)
    # ComfyUI reserves room for casting the largest offloaded layers: find a budget that loads some
    # layers and leaves others offloaded.
    for budget in (int(size * f) for f in (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)):
        patcher.patch_model(device_to=device, lowvram_model_memory=budget)
        if patcher.model.model_lowvram and patcher.model.model_loaded_weight_memory > 0:
            break
        patcher.unpatch_model(device_to=device)
    model = patcher.model
    casting = sum(bool(getattr(m, "comfy_cast_weights", False)) for m in model.modules())
    plan = plan_decode(model, latent["samples"], conditioning[0][0], latent_format="flux", sigma=0.3, device=device,
                       steps=2)
    partial = run_plan(model, plan, seed=1).permute(0, 2, 3, 1)
    results["partial"] = {"lowvram": bool(model.model_lowvram), "cast_layers": casting,
                          "loaded_bytes": int(model.model_loaded_weight_memory), "budget": int(budget),
                          "max_abs_diff": float((partial - reference).abs().max())}
    patcher.unpatch_model(device_to=device)

    # Unload / reload between decodes: the same image again.
    comfy.model_management.unload_all_models()
    again = decode(bf16)
    comfy.model_management.unload_all_models()
    reloaded = decode(load("bf16"))
    results["reload"] = {"same_patcher": float((again - reference).abs().max()),
                         "new_load": float((reloaded - reference).abs().max())}
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(results, f)


main()
