"""Test-only ComfyUI nodes, loaded by the integration harness beside the pack (never shipped).

* PiDTestConditioning: a seeded random CONDITIONING of any shape (stands in for Gemma-2 / T5), with
  a random pooled vector when `pooled` > 0 (SDXL-family models need one of width 1280).
* PiDTestSaveLatent / PiDTestSaveImage: write a LATENT / IMAGE to the output folder as safetensors
  (tensor + JSON of the LATENT's scalar keys), for the test process to read.
* PiDTestCaptureState: one *full* stock sampler run that records, from the model side, the input x
  and sigma of the first model evaluation of step k (a post-CFG hook; with no churn that is the
  sampler's state at sigmas[k]), independent of the pack's own capture mechanism.
* PiDTestTinyGemmaCLIP: core's own PixelDiT Gemma CLIP (comfy.sd.load_text_encoder_state_dicts, type
  PIXELDIT, or LUMINA2 for a CLIP that does not fit PiD) for the narrow Gemma-2 of make_tiny_models.py:
  core's CLIPLoader fixes Gemma's full size, so only the sizes are overridden (model_options
  "gemma2_2b_model_config"), in fp32.
* PiDTestReferenceText: pid_core.text.GemmaTextEncoder on the same file (its embedded SentencePiece
  tokenizer), the reference contract to compare PiD Text Encode with.
* PiDTestSaveConditioning: writes a CONDITIONING's tensor like PiDTestSaveLatent.
"""

import json
import os
import pathlib
import sys

import torch
from typing_extensions import override

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
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
                io.Float.Input("scale", default=1.0, min=0.0, max=1e38),  # up to values no text encoder gives
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


def _text_encoder_path(name):
    return folder_paths.get_full_path_or_raise("text_encoders", name)


def _gemma_sizes(sd):
    """The narrow Gemma-2's sizes from its tensors (Gemma's head width is 256)."""
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    return {
        "vocab_size": sd["model.embed_tokens.weight"].shape[0],
        "hidden_size": sd["model.embed_tokens.weight"].shape[1],
        "intermediate_size": sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "num_hidden_layers": layers,
        "num_attention_heads": sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // 256,
        "num_key_value_heads": sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // 256,
    }


class PiDTestTinyGemmaCLIP(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PiDTestTinyGemmaCLIP", category="_pid_tests",
                         inputs=[io.String.Input("clip_name", default="pid_test_tiny_gemma2.safetensors"),
                                 io.Combo.Input("type", options=["pixeldit", "lumina2"], default="pixeldit")],
                         outputs=[io.Clip.Output()])

    @classmethod
    def execute(cls, clip_name, type="pixeldit"):
        import comfy.sd
        import comfy.utils

        sd = comfy.utils.load_torch_file(_text_encoder_path(clip_name), safe_load=True)
        options = {"gemma2_2b_model_config": _gemma_sizes(sd), "dtype": torch.float32}
        clip_type = comfy.sd.CLIPType.PIXELDIT if type == "pixeldit" else comfy.sd.CLIPType.LUMINA2
        clip = comfy.sd.load_text_encoder_state_dicts([sd], clip_type=clip_type, model_options=options,
                                                      embedding_directory=folder_paths.get_folder_paths("embeddings"))
        return io.NodeOutput(clip)


class PiDTestReferenceText(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="PiDTestReferenceText", category="_pid_tests",
                         inputs=[io.String.Input("clip_name", default="pid_test_tiny_gemma2.safetensors"),
                                 io.String.Input("text", multiline=True, default="")],
                         outputs=[io.Conditioning.Output()])

    @classmethod
    def execute(cls, clip_name, text):
        repo = str(pathlib.Path(__file__).resolve().parents[3])  # support_nodes -> comfyui -> tests -> repo
        if repo not in sys.path:
            sys.path.insert(0, repo)
        from pid_core.text import GemmaTextEncoder

        path = _text_encoder_path(clip_name)
        width = comfy.utils.load_torch_file(path, safe_load=True)["model.embed_tokens.weight"].shape[1]
        encoder = GemmaTextEncoder.from_pretrained(path, text_dim=width, dtype=torch.float32)
        return io.NodeOutput([[encoder.encode([text]), {}]])


class PiDTestSaveConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="PiDTestSaveConditioning", category="_pid_tests", is_output_node=True,
            inputs=[io.Conditioning.Input("conditioning"), io.String.Input("filename", default="cond.safetensors")],
            outputs=[],
        )

    @classmethod
    def execute(cls, conditioning, filename):
        _save({"cond": conditioning[0][0]}, {"entries": len(conditioning)}, filename)
        return io.NodeOutput()


class PiDTestExtension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [PiDTestConditioning, PiDTestSaveLatent, PiDTestSaveImage, PiDTestCaptureState, PiDTestTinyGemmaCLIP,
                PiDTestReferenceText, PiDTestSaveConditioning]


async def comfy_entrypoint():
    return PiDTestExtension()
