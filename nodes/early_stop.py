"""KSampler Early Stop: a KSampler that also hands back the sampler's state at a stop step, for PiD.

Why not KSamplerAdvanced (end_at_step + return_with_leftover_noise)? For flow models its latent holds
x_t / (1 - sigma), not the state x_t, and it says neither sigma nor format. Here the run is the stock
one (comfy.sample helpers, the same sigmas, noise, callbacks, previews), run once:

- ComfyUI's k-diffusion samplers report, at every step i, the state x at sigmas[i] (before that step's
  update) to their step callback. The node wraps the sampler function (`KSAMPLER.sampler_function`,
  so nothing else changes) and copies that state at the stop step k: the exact internal state x_k of
  the uninterrupted run, before ComfyUI's inverse noise scaling, for multistep, ancestral and SDE
  samplers alike (their history and noise continue). The run goes on to the end for the `finished`
  output (exactly one uninterrupted KSampler run), or stops right there when `finish` is off.
- Samplers whose callback does not carry that state (SPLIT_SAMPLERS: dpm_fast, dpm_adaptive, uni_pc)
  run in two parts as a KSamplerAdvanced split would: sigmas[:k+1], whose returned state is x_k,
  then sigmas[k:] from x_k without new noise (their history restarts at the split). A sampler
  unknown to the node that does not report its state gets x_k from a run to the stop step, and its
  `finished` from the uninterrupted run.

The early LATENT's samples are process_out(x_k) in the noise frame of its PiD latent format (flow:
x_k itself; SDXL: the Euler state x0 + sigma_eu * eps), with pid_sigma = sigma_k as really reached
(scheduler, denoise < 1 and the samplers that drop the penultimate sigma all come from the sigmas
the sampler ran).
"""

from __future__ import annotations

import functools
import logging

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..pid_core.early_stop import choose_stop_step, split_sigmas
from ..pid_core.latent_formats import COMFY_FORMATS, get_latent_format
from ..pid_core.latents import convert_state_frame
from ..pid_core.variants import recommended_stop_step
from .comfy_models import backbone_for_model_config, noise_frame_for_model_sampling
from .common import CATEGORY, NODE_ID_EARLY_STOP, NodeInputError, user_errors, write_pid_metadata

log = logging.getLogger("pid_decoder")


# Samplers whose step callback does not report the state at sigmas[i] (dpm_fast / dpm_adaptive pick
# their own steps; uni_pc's callback carries no sigma): their run is split at the stop step.
SPLIT_SAMPLERS = ("dpm_fast", "dpm_adaptive", "uni_pc", "uni_pc_bh2")


def _mro_names(obj) -> list[str]:
    return [c.__name__ for c in type(obj).__mro__]


def describe_model(model) -> dict:
    """What PiD needs to know about a ComfyUI MODEL: latent format, backbone, distilled, noise frame."""
    base = model.model
    latent_format = COMFY_FORMATS.get(type(base.latent_format).__name__)
    backbone, distilled = backbone_for_model_config(_mro_names(base.model_config))
    if latent_format is None:
        backbone = None
    frame = noise_frame_for_model_sampling(_mro_names(model.get_model_object("model_sampling")))
    return {"latent_format": latent_format, "backbone": backbone, "distilled": distilled, "frame": frame}


class _StopHere(Exception):
    """Raised from the step callback once the stop state is taken and no later step is wanted."""


def _wrapped_sampler(sampler_name: str, *, capture: dict, stop_at: int | None = None, start: torch.Tensor | None = None,
                     abort: bool = False):
    """ComfyUI's sampler object for this name, whose sampler function starts from `start` (if given) and
    stores in capture["x"] the internal state (before inverse_noise_scaling): with stop_at, the state its
    step callback reports at step stop_at (then raises _StopHere if abort); else what it returns."""
    sampler = comfy.samplers.sampler_object(sampler_name)
    inner = getattr(sampler, "sampler_function", None)
    if inner is None:
        raise NodeInputError(f"The sampler {sampler_name!r} cannot be stopped early by this node; pick another.")

    @functools.wraps(inner)
    def sampler_function(model, x, sigmas, *args, callback=None, **kwargs):
        if start is not None:
            x = start.to(device=x.device, dtype=x.dtype)

        def spy(info):
            if callback is not None:
                callback(info)
            sigma = info.get("sigma")
            if info.get("i") == stop_at and "x" in info and sigma is not None and float(sigma) == float(sigmas[stop_at]):
                capture["x"] = info["x"].detach().clone()  # the sampler may update x in place afterwards
                if abort:
                    raise _StopHere

        out = inner(model, x, sigmas, *args, callback=spy if stop_at is not None else callback, **kwargs)
        if stop_at is None:
            capture["x"] = out
        return out

    sampler.sampler_function = sampler_function
    return sampler


def _progress(model, total: int):
    """A callback factory like latent_preview.prepare_callback, for one bar over both parts."""
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    pbar = comfy.utils.ProgressBar(total)

    def for_part(offset: int):
        def callback(step, x0, x, total_steps):
            preview = None
            if previewer:
                if x0.is_nested:
                    x0 = x0.tensors[0]
                preview = previewer.decode_latent_to_preview_image("JPEG", x0)
            pbar.update_absolute(offset + step + 1, total, preview)
        return callback

    return for_part


class KSamplerEarlyStop(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE_ID_EARLY_STOP,
            display_name="KSampler Early Stop (PiD)",
            category=CATEGORY,
            search_aliases=["pid early stop", "ksampler stop early", "partial denoise", "leftover noise"],
            description=(
                "A KSampler that stops at a step and returns the sampler's exact state there (with its "
                "sigma and latent format) for PiD Decode, which finishes the image in pixel space. "
                "Also returns the finished latent of the same run, for VAE Decode."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model (FLUX.1, FLUX.2, SD3, SDXL, Qwen-Image, Z-Image)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=28, min=1, max=10000,
                             tooltip="Steps of the whole schedule (the run that would finish the image)."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale, as in KSampler."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler",
                               tooltip="The sampling algorithm, as in KSampler. The run is one uninterrupted "
                                       "KSampler run; only dpm_fast, dpm_adaptive and uni_pc (which do not report "
                                       "their state per step) are split at the stop step like KSamplerAdvanced."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple",
                               tooltip="The noise schedule, as in KSampler."),
                io.Conditioning.Input("positive", tooltip="What the image should show (the model's own conditioning)."),
                io.Conditioning.Input("negative", tooltip="What to steer away from (the model's own conditioning)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (an empty latent for text-to-image)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Amount of denoising, as in KSampler (below 1: image-to-image)."),
                io.Int.Input("stop_at_step", default=0, min=-1, max=10000,
                             tooltip="Step at which to hand the latent to PiD (1..steps; steps = finished). 0 or -1: "
                                     "the model's recommended step (FLUX.1/SD3 24 of 28, SDXL 26 of 30, FLUX.2/Z-Image "
                                     "46 of 50, Qwen-Image 44 of 50), scaled to your steps; runs of 12 steps or "
                                     "fewer (turbo, Klein) go to the end."),
                io.Boolean.Input("finish", default=True,
                                 tooltip="Also run the remaining steps for the 'finished' output. Turn off to save "
                                         "those steps when only PiD Decode uses this node (the 'stopped' state is the "
                                         "same either way)."),
            ],
            outputs=[
                io.Latent.Output("stopped", display_name="stopped",
                                 tooltip="The sampler's state at the stop step, with pid_sigma and pid_latent_format: "
                                         "connect to PiD Decode."),
                io.Latent.Output("finished", display_name="finished",
                                 tooltip="The same run finished to the last step, equal to one uninterrupted KSampler "
                                         "run (dpm_fast, dpm_adaptive, uni_pc: continued from the stop step): connect "
                                         "to VAE Decode (needs 'finish')."),
            ],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, stop_at_step, finish) -> io.NodeOutput:
        info = describe_model(model)
        backbone = info["backbone"]
        with user_errors():
            wanted = choose_stop_step(stop_at_step, steps, backbone=backbone, distilled=info["distilled"],
                                      recommended=recommended_stop_step(backbone) if backbone else None)

        latent = latent_image
        samples = comfy.sample.fix_empty_latent_channels(model, latent["samples"],
                                                         latent.get("downscale_ratio_spacial", None),
                                                         latent.get("downscale_ratio_temporal", None))
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index", None))
        noise_mask = latent.get("noise_mask", None)

        # The sigmas KSampler itself would run (scheduler, denoise < 1, dropped penultimate sigma).
        ksampler = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                           scheduler=scheduler, denoise=denoise, model_options=model.model_options)
        sigmas = ksampler.sigmas
        k, sigma = split_sigmas(sigmas.tolist(), wanted)
        last = len(sigmas) - 1
        if last < 1:  # denoise 0: nothing to run, the latent is returned as is
            out = write_pid_metadata(latent, samples, sigma=0.0, latent_format=info["latent_format"])
            return io.NodeOutput(out, dict(out))

        run_to_end = k >= last
        split = not run_to_end and sampler_name in SPLIT_SAMPLERS
        total = last if (finish or run_to_end) else (k if split else k + 1)
        progress = _progress(model, total)
        disable_pbar = not comfy.utils.PROGRESS_BAR_ENABLED

        def run(sampler, run_sigmas, start_latent, run_noise, offset=0):
            return comfy.sample.sample_custom(
                model, run_noise, cfg, sampler, run_sigmas, positive, negative, start_latent, noise_mask=noise_mask,
                callback=progress(offset), disable_pbar=disable_pbar, seed=seed,
            )

        capture = {}
        stock = None  # the uninterrupted run's result, when it ran to the end
        if run_to_end or split:
            part = run(_wrapped_sampler(sampler_name, capture=capture), sigmas[: k + 1], samples, noise)
            stock = part if run_to_end else None
        else:
            try:
                stock = run(_wrapped_sampler(sampler_name, capture=capture, stop_at=k, abort=not finish), sigmas,
                            samples, noise)
            except _StopHere:
                pass
            if "x" not in capture:  # a sampler that does not report its state: x_k from a run to the stop step
                log.info("KSampler Early Stop: %s does not report its state; running to step %d for it.",
                         sampler_name, k)
                part = run(_wrapped_sampler(sampler_name, capture=capture), sigmas[: k + 1], samples, noise)
        x_k = capture["x"].to(torch.float32)
        log.info("KSampler Early Stop: stopped at step %d of %d, sigma %.6g", k, last, sigma)

        # x_k is in the model's frame; store it in the frame of its PiD latent format.
        fmt = info["latent_format"]
        target_frame = get_latent_format(fmt).frame if fmt is not None else None
        with user_errors():
            x_out, sigma_out = convert_state_frame(x_k, sigma, info["frame"], target_frame)
        stopped_samples = model.model.process_latent_out(x_out).to(
            device=comfy.model_management.intermediate_device(), dtype=comfy.model_management.intermediate_dtype())
        stopped = write_pid_metadata(latent, stopped_samples, sigma=sigma_out, latent_format=fmt)

        if finish and stock is not None:
            finished = write_pid_metadata(latent, stock, sigma=0.0, latent_format=fmt)
        elif finish:  # split samplers: the rest of the schedule from exactly x_k, no new noise
            done = run(_wrapped_sampler(sampler_name, capture={}, start=x_k), sigmas[k:], part,
                       comfy.sample.prepare_empty_noise(samples), offset=k)
            finished = write_pid_metadata(latent, done, sigma=0.0, latent_format=fmt)
        else:
            from comfy_execution.graph_utils import ExecutionBlocker

            finished = ExecutionBlocker(
                "KSampler Early Stop: 'finish' is off, so there is no finished latent. Turn 'finish' on, or "
                "disconnect the 'finished' output."
            )
        return io.NodeOutput(stopped, finished)
