"""The same decode as two ComfyUI graphs: core ComfyUI's own PiD and this pack's PiD Decode.

Core's graph is the one core documents for PiD (UNETLoader of a pid_*.safetensors, PiDConditioning,
EmptyChromaRadianceLatentImage at 4x the latent's pixel size, KSamplerSelect lcm, BasicScheduler
simple 4 steps, SamplerCustom cfg 1 against ConditioningZeroOut, VAELoader pixel_space, VAEDecode),
with the text conditioning and the latent given to both as test nodes (PiDTestConditioning,
PiDTestLatent), so both decode the same inputs. Core's schedule differs from the released one
(CORE_SIGMAS against RELEASED_SIGMAS): the images are alike, not equal.

Each graph brackets its decode with PiDTestMark / PiDTestMeasure (support_nodes), which write the time,
the peak device memory and the loaded models to output/<name>.json and the image to
output/<name>.safetensors. Used by tests/comfyui/test_core_pid_comfyui.py (narrow model, CPU) and the
GPU kit's benchmark (tests/gpu/bench_core.py, full size, CUDA).
"""

from __future__ import annotations

LOADER = "PixelDiffusionDecoderLoader"
DECODE = "PixelDiffusionDecoderDecode"

RELEASED_SIGMAS = [0.999, 0.866, 0.634, 0.342, 0.0]  # the released students' schedule (PiD Decode)
CORE_SIGMAS = [1.0, 0.818, 0.6, 0.333, 0.0]  # core: shift 1.5, scheduler "simple", 4 steps
FLUX_RAW_SCALE = 1 / 0.3611  # a raw FLUX.1 latent of unit variance in PiD's input space


def inputs(*, channels=16, latent_hw=(64, 64), seed=0, text_tokens=300, text_width=2304, text_seed=1) -> dict:
    """The latent and the text conditioning both graphs decode."""
    h, w = latent_hw
    return {
        "latent": {"class_type": "PiDTestLatent", "inputs": {"batch": 1, "channels": channels, "height": h, "width": w,
                                                             "seed": seed, "scale": FLUX_RAW_SCALE}},
        "text": {"class_type": "PiDTestConditioning", "inputs": {"batch": 1, "tokens": text_tokens,
                                                                 "width": text_width, "seed": text_seed, "scale": 1.0}},
    }


def _measured(graph: dict, name: str, nonce: int, source, decode_input: tuple[str, str]) -> None:
    """PiDTestMark between `source` (a LATENT) and the node input decode_input; PiDTestMeasure after
    the image node of graph[name + '_image']."""
    graph[f"{name}_mark"] = {"class_type": "PiDTestMark", "inputs": {"latent": source, "tag": name, "nonce": nonce}}
    node, key = decode_input
    graph[node]["inputs"][key] = [f"{name}_mark", 0]
    graph[f"{name}_measure"] = {"class_type": "PiDTestMeasure", "inputs": {
        "image": [f"{name}_image", 0], "tag": name, "filename": name, "save_image": True}}


def core_graph(model_node: dict, *, out_hw: tuple[int, int], seed: int = 0, name: str = "core", nonce: int = 0,
               latent_format: str = "flux", degrade_sigma: float = 0.0, **input_options) -> dict:
    """Core's PiD graph; `model_node` gives the MODEL (UNETLoader, or PiDTestNarrowCorePiD on the CPU)."""
    h, w = out_hw
    g = inputs(**input_options)
    g.update({
        "core_model": model_node,
        "core_negative": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["text", 0]}},
        "core_conditioning": {"class_type": "PiDConditioning", "inputs": {
            "positive": ["text", 0], "latent": ["latent", 0], "latent_format": latent_format,
            "degrade_sigma": degrade_sigma}},
        "core_canvas": {"class_type": "EmptyChromaRadianceLatentImage", "inputs": {"width": w, "height": h,
                                                                                 "batch_size": 1}},
        "core_sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "lcm"}},
        "core_sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["core_model", 0], "scheduler": "simple",
                                                                   "steps": 4, "denoise": 1.0}},
        "core_sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["core_model", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0,
            "positive": ["core_conditioning", 0], "negative": ["core_negative", 0], "sampler": ["core_sampler", 0],
            "sigmas": ["core_sigmas", 0], "latent_image": ["core_canvas", 0]}},
        "core_vae": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        f"{name}_image": {"class_type": "VAEDecode", "inputs": {"samples": ["core_sample", 0], "vae": ["core_vae", 0]}},
    })
    # the mark sits on the latent that PiDConditioning reads: everything of the decode runs after it
    _measured(g, name, nonce, ["latent", 0], ("core_conditioning", "latent"))
    return g


def unet_loader(file_name: str) -> dict:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": file_name, "weight_dtype": "default"}}


def pack_graph(pid_file: str, *, seed: int = 0, name: str = "pack", nonce: int = 0, weight_dtype: str = "auto",
               tiling: str = "auto", tile_size: int = 2048, latent_format: str = "flux", sigma: float = 0.0,
               compile: bool | None = None, **input_options) -> dict:
    """PiD Loader + PiD Decode of the same inputs (4 steps, the released schedule); compile: PiD Decode's
    optional input (None: left out)."""
    g = inputs(**input_options)
    g.update({
        "pack_model": {"class_type": LOADER, "inputs": {"pid_name": pid_file, "weight_dtype": weight_dtype}},
        f"{name}_image": {"class_type": DECODE, "inputs": {
            "pid_model": ["pack_model", 0], "latent": ["latent", 0], "conditioning": ["text", 0], "seed": seed,
            "steps": 4, "latent_format": latent_format, "sigma": sigma, "tiling": tiling, "tile_size": tile_size,
            "tile_overlap": 0, "cfg": -1.0, "sampler": "auto", "color_match": 1.0}},
    })
    if compile is not None:
        g[f"{name}_image"]["inputs"]["compile"] = compile
    _measured(g, name, nonce, ["latent", 0], (f"{name}_image", "latent"))
    return g


def read_measurement(server, name: str) -> tuple[dict, object]:
    """(the PiDTestMeasure JSON, the image [1, H, W, 3]) of a finished graph."""
    import json

    result = json.loads((server.output_dir / f"{name}.json").read_text())
    tensors, _ = server.read_tensors(f"{name}.safetensors")
    return result, tensors["image"]
