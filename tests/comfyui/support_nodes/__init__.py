"""Test-only ComfyUI nodes, loaded by the integration harness beside the pack (never shipped).

* PiDTestConditioning: a seeded random CONDITIONING of any shape (stands in for Gemma-2 / T5), with
  a random pooled vector when `pooled` > 0 (SDXL-family models need one of width 1280).
* PiDTestSaveLatent / PiDTestSaveImage: write a LATENT / IMAGE to the output folder as safetensors
  (tensor + JSON of the LATENT's scalar keys), for the test process to read.
* PiDTestCaptureState: one *full* stock sampler run that records, from the model side, the input x
  and sigma of the first model evaluation of step k (a post-CFG hook; with no churn that is the
  sampler's state at sigmas[k]), independent of the pack's own capture mechanism.
"""

import json
import os

import torch
from typing_extensions import override

import comfy.model_management
import comfy.sample
import comfy.samplers
import folder_paths
from comfy_api.latest import ComfyExtension, io


def _scalar_metadata(d):
    out = {}
    for key, value in d.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[key] = value
        elif isinstance(value, torch.Tensor):
            out[key] = f"tensor{list(value.shape)}"
        else:
            out[key] = type(value).__name__
    return out


def _save(tensors, meta, filename):
    from safetensors.torch import save_file

    os.makedirs(folder_paths.get_output_directory(), exist_ok=True)
    path = os.path.join(folder_paths.get_output_directory(), filename)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, path,
              metadata={"json": json.dumps(meta)})
    return path


class PiDTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PiDTestConditioning", category="_pid_tests",
            inputs=[
                io.Int.Input("batch", default=1, min=1, max=8),
                io.Int.Input("tokens", default=300, min=1, max=1024),
                io.Int.Input("width", default=2304, min=1, max=8192),
                io.Int.Input("seed", default=0, min=0, max=2**31),
                io.Float.Input("scale", default=1.0, min=0.0, max=1e6),
                io.Int.Input("pooled", default=0, min=0, max=8192, optional=True),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, batch, tokens, width, seed, scale, pooled=0):
        g = torch.Generator().manual_seed(seed)
        emb = torch.randn(batch, tokens, width, generator=g) * scale
        pooled_output = torch.randn(batch, pooled, generator=g) if pooled else None
        return io.NodeOutput([[emb, {"pooled_output": pooled_output}]])


class PiDTestSaveLatent(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PiDTestSaveLatent", category="_pid_tests", is_output_node=True,
            inputs=[io.Latent.Input("latent"), io.String.Input("filename", default="latent.safetensors")],
            outputs=[],
        )

    @classmethod
    def execute(cls, latent, filename):
        _save({"samples": latent["samples"]}, _scalar_metadata(latent), filename)
        return io.NodeOutput()


class PiDTestSaveImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PiDTestSaveImage", category="_pid_tests", is_output_node=True,
            inputs=[io.Image.Input("image"), io.String.Input("filename", default="image.safetensors")],
            outputs=[],
        )

    @classmethod
    def execute(cls, image, filename):
        _save({"image": image}, {"dtype": str(image.dtype), "device": str(image.device)}, filename)
        return io.NodeOutput()


class PiDTestCaptureState(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PiDTestCaptureState", category="_pid_tests",
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF),
                io.Int.Input("steps", default=8, min=1, max=1000),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image"),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0),
                io.Int.Input("capture_step", default=1, min=0, max=1000),
            ],
            outputs=[io.Latent.Output(display_name="state"), io.Latent.Output(display_name="final")],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, capture_step):
        evals = []  # (sigma, x) of every model evaluation, in order
        step_first_eval = {}  # step -> index into evals of its first evaluation

        def post_cfg(args):
            evals.append((float(args["sigma"].flatten()[0]), args["input"].detach().clone()))
            return args["denoised"]

        def callback(step, x0, x, total):
            # the callback of step i comes after step i's first evaluation and before its others
            step_first_eval.setdefault(step, len(evals) - 1)

        m = model.clone()
        m.set_model_sampler_post_cfg_function(post_cfg)
        samples = latent_image["samples"]
        samples = comfy.sample.fix_empty_latent_channels(m, samples)
        noise = comfy.sample.prepare_noise(samples, seed, None)
        final = comfy.sample.sample(m, noise, steps, cfg, sampler_name, scheduler, positive, negative, samples,
                                    denoise=denoise, callback=callback, disable_pbar=True, seed=seed)
        sigma, x = evals[step_first_eval[capture_step]]
        state = m.model.process_latent_out(x.float()).to(comfy.model_management.intermediate_device())
        return io.NodeOutput({"samples": state, "captured_sigma": sigma}, {"samples": final})


class PiDTestExtension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [PiDTestConditioning, PiDTestSaveLatent, PiDTestSaveImage, PiDTestCaptureState]


async def comfy_entrypoint():
    return PiDTestExtension()
