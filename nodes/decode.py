"""PiD Decode: PiD model + LATENT (+ its sigma) + Gemma-2 conditioning -> IMAGE, 4x the VAE's size.

The LATENT may be clean (a finished run, VAE Encode) or stopped early (KSampler Early Stop, which
stores pid_sigma and pid_latent_format; PiD Encode-Degrade too). The checkpoint decides the sampler:
the 4-step students, or for the undistilled checkpoints DPM-Solver++ with guidance against the
negative conditioning (cfg, steps; `sampler` overrides what the file name says). All the work is
pid_core's plan_decode + run_plan; this node only translates: memory management, progress with
previews, cancel, and errors as clear messages.
"""

from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io, ui

from ..pid_core.colour import describe_match
from ..pid_core.decode import run_plan
from ..pid_core.images import preview_uint8
from ..pid_core.network.layers import attention_backend, heads_merged_backend
from ..pid_core.plan import plan_decode
from ..pid_core.tiling import TileOptions
from ..pid_core.wording import term
from .common import (CATEGORY, LATENT_FORMAT_NAMES, NODE_ID_DECODE, NodeInputError, PidModel, read_pid_metadata,
                     user_errors)

log = logging.getLogger("pid_decoder")


ENCODE_HINT = f"PiD needs Gemma-2-2b-it hidden states: {term.encode_prompt}."


def text_embedding_from_conditioning(conditioning, name: str = "conditioning") -> torch.Tensor:
    """The Gemma-2 hidden states of a CONDITIONING: the tensor of its first entry."""
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) == 0:
        raise NodeInputError(f"The {name} is empty. {ENCODE_HINT}")
    first = conditioning[0]
    emb = first[0] if isinstance(first, (list, tuple)) and len(first) > 0 else first
    if not isinstance(emb, torch.Tensor):
        raise NodeInputError(f"The {name} holds no text embedding tensor. {ENCODE_HINT}")
    if len(conditioning) > 1:
        log.warning("PiD Decode: the %s has %d entries; only the first is used.", name, len(conditioning))
    return emb


def image_to_pid(image: torch.Tensor) -> torch.Tensor:
    """A ComfyUI IMAGE [B, H, W, C] in 0..1 as pid_core's [B, 3, H, W] (an alpha channel dropped)."""
    return image[..., :3].permute(0, 3, 1, 2)


def negative_embedding(negative):
    """The negative conditioning's embedding, asked for by the plan only for a guided decode (None: the
    plan says what to connect)."""
    if negative is None:
        return None
    return text_embedding_from_conditioning(negative, "negative conditioning")


ATTENTION_FLAGS = ("use_sage_attention", "use_flash_attention", "use_split_cross_attention", "use_quad_cross_attention")


def comfy_attention_backend():
    """ComfyUI's attention kernel when the user picked one on its command line (sage, flash, split,
    quad); None otherwise, which keeps PyTorch SDPA (already ComfyUI's default choice)."""
    from comfy.cli_args import args

    if not any(getattr(args, flag, False) for flag in ATTENTION_FLAGS):
        return None
    from comfy.ldm.modules.attention import optimized_attention

    return heads_merged_backend(optimized_attention)


def progress_callbacks(steps: int):
    """(per step: progress with a preview and cancel; per tile batch: cancel). Cancel between network
    calls: run_plan's after_forward=comfy.model_management.throw_exception_if_processing_interrupted."""
    pbar = comfy.utils.ProgressBar(int(steps))

    def step_callback(step, total, x0):
        comfy.model_management.throw_exception_if_processing_interrupted()
        try:
            from PIL import Image

            preview = ("JPEG", Image.fromarray(preview_uint8(x0)), 512)
        except Exception:  # a preview must never break the decode
            preview = None
        pbar.update_absolute(step, total, preview)

    def tile_callback(done, total):
        comfy.model_management.throw_exception_if_processing_interrupted()

    return step_callback, tile_callback


class PiDDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID_DECODE,
            display_name="PiD Decode",
            category=CATEGORY,
            search_aliases=["pid", "pixel diffusion decode", "pid upscale", "decode 4x"],
            description=(
                "Decodes a latent with PiD into an image 4x the VAE's size, in 4 steps. Takes clean latents and "
                "latents stopped early (KSampler Early Stop): the noise level comes with the LATENT. Undistilled "
                "checkpoints run guided DPM-Solver++ (25 steps, cfg 5) against the negative conditioning."
            ),
            inputs=[
                PidModel.Input("pid_model", tooltip="The PiD model from PiD Loader."),
                io.Latent.Input("latent", tooltip="The latent to decode: from KSampler Early Stop, a KSampler, VAE "
                                                  "Encode or PiD Encode-Degrade."),
                io.Conditioning.Input("conditioning",
                                      tooltip="The prompt as Gemma-2 hidden states [B, 300, 2304]: PiD Text Encode's "
                                              "positive (CLIPLoader type 'pixeldit'). T5/CLIP conditionings do not fit."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The seed of PiD's own noise. On a CUDA GPU every seed gives its own noise; on the "
                                     "CPU, seeds that differ by a multiple of 2^32 give the same image (torch keeps a "
                                     "seed's low 32 bits there)."),
                io.Int.Input("steps", default=0, min=0, max=100,
                             tooltip="PiD steps. 0 = auto: 4 for the students (1-4; 4 is the released quality, "
                                     "fewer are faster and softer), 25 for undistilled checkpoints (1-100)."),
                io.Combo.Input("latent_format", options=["auto", *LATENT_FORMAT_NAMES], default="auto",
                               tooltip="The latent's model family. auto: from the LATENT (KSampler Early Stop, "
                                       "Encode-Degrade) or from the channels and the checkpoint's name."),
                io.Float.Input("sigma", default=-1.0, min=-1.0, max=1000.0, step=0.001,
                               tooltip="Noise level the latent carries. -1: auto (the LATENT's pid_sigma, else 0 = "
                                       "clean). Flow models: 0..1; SDXL: the Euler sigma."),
                io.Combo.Input("tiling", options=["auto", "off", "manual"], default="auto",
                               tooltip="auto: decode in overlapping tiles only when the image is larger than the "
                                       "checkpoint was trained for or would not fit in free GPU memory (all tiles "
                                       "share one state at every step, no seams). off: one pass over the whole "
                                       "image. manual: tiles of tile_size."),
                io.Int.Input("tile_size", default=2048, min=512, max=8192, step=64,
                             tooltip="Tile side in output pixels for tiling = manual (2048 for 2K checkpoints, up "
                                     "to 3840 for 2K-to-4K ones). Rounded to the latent grid."),
                io.Int.Input("tile_overlap", default=0, min=0, max=2048, step=32,
                             tooltip="Overlap between tiles in output pixels; 0 = automatic (an eighth of the "
                                     "tile, at least 160)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Undistilled checkpoints: what guidance steers away from, PiD Text "
                                              "Encode's negative (the reference's negative prompt by default). "
                                              "Students ignore it."),
                io.Float.Input("cfg", default=-1.0, min=-1.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Undistilled checkpoints: guidance scale. -1 = auto (5); 1 = no guidance "
                                       "(half the network calls). Students take no guidance."),
                io.Combo.Input("sampler", options=["auto", "student", "teacher"], default="auto",
                               tooltip="auto: from the checkpoint's file name (undistilled -> teacher: guided "
                                       "DPM-Solver++; else the 4-step student). Set it when a renamed file cannot "
                                       "tell."),
                io.Image.Input("color_reference", optional=True,
                               tooltip="Optional: an image of the same scene with the colours to keep, e.g. the "
                                       "finished latent through VAE Decode, or the image you upscale. PiD's colours "
                                       "are matched to it at low frequencies; its detail stays. Any size with the "
                                       "output's aspect ratio. The node shows the colour error before and after."),
                io.Float.Input("color_match", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="With a color_reference: how strongly its colours replace PiD's (0 = PiD's own, "
                                       "1 = the reference's). Without one it does nothing."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="torch.compile PiD's transformer blocks (each kind compiled once and "
                                         "reused, any image size). The first decode waits for the compile; "
                                         "later ones run faster on a GPU. Off: eager."),
            ],
            outputs=[io.Image.Output("image", display_name="IMAGE", tooltip="The decoded image, RGB in 0..1.")],
        )

    @classmethod
    def execute(cls, pid_model, latent, conditioning, seed, steps, latent_format, sigma, tiling="auto",
                tile_size=2048, tile_overlap=0, negative=None, cfg=-1.0, sampler="auto", color_reference=None,
                color_match=1.0, compile=False) -> io.NodeOutput:
        patcher = pid_model
        model = patcher.model
        meta, warning = read_pid_metadata(latent)
        if warning:
            log.warning("PiD Decode: %s", warning)
        device = comfy.model_management.get_torch_device()
        with user_errors():
            options = TileOptions(mode=tiling, tile_px=int(tile_size) if tiling == "manual" else 0,
                                  overlap_px=int(tile_overlap))
            plan = plan_decode(model, latent["samples"], text_embedding_from_conditioning(conditioning), meta=meta,
                               latent_format=latent_format, sigma=None if sigma < 0 else sigma, tiling=options,
                               device=device, sampler=sampler, steps=int(steps), cfg=None if cfg < 0 else cfg,
                               negative=lambda: negative_embedding(negative),
                               color_reference=None if color_reference is None else image_to_pid(color_reference),
                               color_match=None if color_reference is None else float(color_match))
            said = plan.summary()
            log.info("PiD Decode: latent %s; sampler %s", said["latent"], said["sampler"])
            # ComfyUI makes room for what the plan wants (unloading other models) and loads PiD fully, or
            # partially when the rest does not fit (its layers then stream their weights per call); the
            # tiles then fit what is really free.
            comfy.model_management.load_models_gpu([patcher], memory_required=plan.memory_bytes)
            plan = plan.within(model, int(comfy.model_management.get_free_memory(device) * 0.9))
            step_callback, tile_callback = progress_callbacks(plan.sampler.steps)
            attention = comfy_attention_backend()
            log.info("PiD Decode: attention by %s", f"ComfyUI's {attention.wrapped.__name__} (from its command line)"
                     if attention is not None else "PyTorch SDPA")
            colour = []
            with attention_backend(attention):
                image = run_plan(model, plan, seed=int(seed), callback=step_callback, tile_callback=tile_callback,
                                 after_forward=comfy.model_management.throw_exception_if_processing_interrupted,
                                 on_colour=lambda before, after: colour.append(
                                     f"Colour against the reference: "
                                     f"{describe_match(before, after, plan.colour.strength)}."),
                                 compile=bool(compile))
        image = image.permute(0, 2, 3, 1).to(device=comfy.model_management.intermediate_device(),
                                             dtype=torch.float32)
        return io.NodeOutput(image, ui=ui.PreviewText(colour[0]) if colour else None)
