"""The pack inside a real ComfyUI (CPU), with tiny random models: see conftest.py and SETUP.md.

Skipped unless COMFYUI_PATH and COMFYUI_PY are set.
"""

from __future__ import annotations

import pytest
import torch

from pid_core.latents import LATENT_FORMATS

from .comfy_harness import ComfyError

EARLY = "PixelDiffusionDecoderKSamplerEarlyStop"
LOADER = "PixelDiffusionDecoderLoader"
DECODE = "PixelDiffusionDecoderDecode"
ENCODE = "PixelDiffusionDecoderEncodeDegrade"
TEXT = "PixelDiffusionDecoderTextEncode"
PACK_NODES = (EARLY, LOADER, DECODE, ENCODE, TEXT)

LATENT_PX = 64  # 64 x 64 image -> 8 x 8 FLUX latent -> 256 x 256 PiD image


def graph_base(files, *, steps=6, stop=4, sampler="euler", scheduler="simple", denoise=1.0, seed=3, finish=True,
               cond_width=2304):
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": files["flux"], "weight_dtype": "default"}},
        "cond": {"class_type": "PiDTestConditioning",
                 "inputs": {"batch": 1, "tokens": 300, "width": cond_width, "seed": 0, "scale": 1.0}},
        "empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": LATENT_PX, "height": LATENT_PX, "batch_size": 1}},
        "early": {"class_type": EARLY, "inputs": {
            "model": ["unet", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["empty", 0],
            "denoise": denoise, "stop_at_step": stop, "finish": finish}},
    }


def save_latent(graph, node_id, source, filename):
    graph[node_id] = {"class_type": "PiDTestSaveLatent", "inputs": {"latent": source, "filename": filename}}


def save_image(graph, node_id, source, filename):
    graph[node_id] = {"class_type": "PiDTestSaveImage", "inputs": {"image": source, "filename": filename}}


def add_pid_decode(graph, files, *, latent, cond=("cond", 0), seed=0, steps=2, fmt="auto", sigma=-1.0,
                   tiling="auto", tile_size=2048, tile_overlap=0, pid="pid", negative=None, cfg=-1.0, sampler="auto"):
    graph["pid"] = {"class_type": LOADER, "inputs": {"pid_name": files[pid], "weight_dtype": "fp32"}}
    graph["decode"] = {"class_type": DECODE, "inputs": {
        "pid_model": ["pid", 0], "latent": list(latent), "conditioning": list(cond), "seed": seed, "steps": steps,
        "latent_format": fmt, "sigma": sigma, "tiling": tiling, "tile_size": tile_size, "tile_overlap": tile_overlap,
        "cfg": cfg, "sampler": sampler}}
    if negative is not None:
        graph["decode"]["inputs"]["negative"] = list(negative)


def flux_in(raw):
    return LATENT_FORMATS["flux"].to_pid(raw)


# --------------------------------------------------------------------------------------------------

def test_nodes_registered_with_tooltips(comfyui):
    info = comfyui.object_info()
    for node_id in PACK_NODES:
        assert node_id in info, f"{node_id} missing from /object_info (import failed?)\n{comfyui.log_tail()}"
        node = info[node_id]
        assert node["category"] == "PiD"
        assert node["description"]
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
    assert "PiDConditioning" in info  # core's own node is untouched
    assert info[LOADER]["output"] == ["PID_DECODER_MODEL"]
    assert info[DECODE]["input"]["required"]["pid_model"][0] == "PID_DECODER_MODEL"
    assert info[EARLY]["output"] == ["LATENT", "LATENT"]
    assert info[DECODE]["output"] == ["IMAGE"]
    assert info[TEXT]["output"] == ["CONDITIONING", "CONDITIONING"]
    assert info[TEXT]["output_name"] == ["positive", "negative"]
    # new PiD Decode inputs come after the old ones: saved workflows keep their widget values
    assert info[DECODE]["input_order"]["required"][-2:] == ["cfg", "sampler"]
    assert info[DECODE]["input_order"]["optional"] == ["negative"]


@pytest.mark.parametrize(
    "sampler,scheduler,steps,stop,denoise",
    [
        ("euler", "simple", 6, 4, 1.0),
        ("dpm_2", "normal", 5, 3, 1.0),  # drops the penultimate sigma
        ("euler", "simple", 8, 3, 0.6),  # denoise < 1: the tail of a longer schedule
    ],
)
def test_early_stop_is_the_sampler_state(comfyui, model_files, sampler, scheduler, steps, stop, denoise):
    tag = f"{sampler}_{scheduler}_{steps}_{stop}_{denoise}"
    g = graph_base(model_files, steps=steps, stop=stop, sampler=sampler, scheduler=scheduler, denoise=denoise)
    # reference: one full stock run, state observed from the model side at step `stop`
    g["capture"] = {"class_type": "PiDTestCaptureState", "inputs": {
        "model": ["unet", 0], "seed": 3, "steps": steps, "cfg": 1.0, "sampler_name": sampler, "scheduler": scheduler,
        "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["empty", 0], "denoise": denoise,
        "capture_step": stop}}
    save_latent(g, "s_early", ["early", 0], f"early_{tag}.safetensors")
    save_latent(g, "s_finished", ["early", 1], f"finished_{tag}.safetensors")
    save_latent(g, "s_state", ["capture", 0], f"state_{tag}.safetensors")
    save_latent(g, "s_full", ["capture", 1], f"full_{tag}.safetensors")
    if denoise == 1.0:
        g["stock"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["unet", 0], "add_noise": "enable", "noise_seed": 3, "steps": steps, "cfg": 1.0,
            "sampler_name": sampler, "scheduler": scheduler, "positive": ["cond", 0], "negative": ["cond", 0],
            "latent_image": ["empty", 0], "start_at_step": 0, "end_at_step": stop, "return_with_leftover_noise": "enable"}}
        save_latent(g, "s_stock", ["stock", 0], f"stock_{tag}.safetensors")
    comfyui.run(g)

    early, meta = comfyui.read_tensors(f"early_{tag}.safetensors")
    state, state_meta = comfyui.read_tensors(f"state_{tag}.safetensors")
    finished, fmeta = comfyui.read_tensors(f"finished_{tag}.safetensors")
    full, _ = comfyui.read_tensors(f"full_{tag}.safetensors")
    sigma = meta["pid_sigma"]

    assert meta["pid_latent_format"] == "flux"
    assert sigma == pytest.approx(state_meta["captured_sigma"], abs=1e-6), "pid_sigma is not the sigma reached"
    assert 0.0 < sigma < 1.0
    # the early latent is the sampler's internal state at the stop step (process_out(x_t))
    torch.testing.assert_close(early["samples"], state["samples"], rtol=0, atol=1e-5)
    # the finished output reproduces one full run (deterministic one-step samplers)
    torch.testing.assert_close(finished["samples"], full["samples"], rtol=0, atol=1e-5)
    assert fmeta["pid_sigma"] == 0.0
    if denoise == 1.0:
        # stock KSamplerAdvanced leftover = x_t / (1 - sigma) in model space
        stock, _ = comfyui.read_tensors(f"stock_{tag}.safetensors")
        torch.testing.assert_close((1 - sigma) * flux_in(stock["samples"]), flux_in(early["samples"]),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(stock["samples"], early["samples"], atol=1e-3)


def test_auto_stop_step_scales_the_recommendation(comfyui, model_files):
    # tiny model = FLUX.1 [dev] config: recommended 24 of 28 -> round(14 * 24 / 28) = 12 of 14
    g = graph_base(model_files, steps=14, stop=0, finish=False)
    g["capture"] = {"class_type": "PiDTestCaptureState", "inputs": {
        "model": ["unet", 0], "seed": 3, "steps": 14, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["empty", 0], "denoise": 1.0,
        "capture_step": 12}}
    save_latent(g, "s_early", ["early", 0], "auto_early.safetensors")
    save_latent(g, "s_state", ["capture", 0], "auto_state.safetensors")
    comfyui.run(g)
    early, meta = comfyui.read_tensors("auto_early.safetensors")
    state, smeta = comfyui.read_tensors("auto_state.safetensors")
    assert meta["pid_sigma"] == pytest.approx(smeta["captured_sigma"], abs=1e-6)
    torch.testing.assert_close(early["samples"], state["samples"], rtol=0, atol=1e-5)


def test_early_stop_to_pid_decode(comfyui, model_files):
    g = graph_base(model_files, steps=6, stop=4, finish=False)
    add_pid_decode(g, model_files, latent=("early", 0))
    save_image(g, "s_img", ["decode", 0], "decoded.safetensors")
    entry = comfyui.run(g)
    out, _ = comfyui.read_tensors("decoded.safetensors")
    img = out["image"]
    assert img.shape == (1, LATENT_PX * 4, LATENT_PX * 4, 3)  # 8x8 latent x 8 (VAE) x 4 (PiD)
    assert torch.isfinite(img).all() and img.min() >= 0 and img.max() <= 1 and img.std() > 0
    text = entry["outputs"]["pid"]["text"][0]
    assert "PiD v1" in text and "16-channel" in text, text


def test_tiled_decode_in_comfyui(comfyui, model_files):
    # 192 px image -> 24x24 latent -> 768 px PiD image in 512 px tiles: the tiled path end to end
    g = graph_base(model_files, steps=3, stop=2, finish=False)
    g["empty"]["inputs"].update(width=192, height=192)
    add_pid_decode(g, model_files, latent=("early", 0), steps=1, tiling="manual", tile_size=512, tile_overlap=128)
    save_image(g, "s_img", ["decode", 0], "tiled.safetensors")
    comfyui.run(g)
    out, _ = comfyui.read_tensors("tiled.safetensors")
    assert out["image"].shape == (1, 768, 768, 3)
    assert torch.isfinite(out["image"]).all()


def test_finish_off_blocks_only_the_finished_output(comfyui, model_files):
    # finish off: the stopped output works, a node on the 'finished' output is blocked (ComfyUI sends the
    # blocker's message to the browser as an execution error) instead of getting a wrong latent
    g = graph_base(model_files, steps=4, stop=2, finish=False)
    save_latent(g, "s_early", ["early", 0], "unblocked.safetensors")
    save_latent(g, "s_finished", ["early", 1], "blocked.safetensors")
    comfyui.run(g)
    assert (comfyui.output_dir / "unblocked.safetensors").exists()
    assert not (comfyui.output_dir / "blocked.safetensors").exists()


def test_bad_conditioning_gets_a_clear_error(comfyui, model_files):
    g = graph_base(model_files, steps=3, stop=2, finish=False)
    g["t5"] = {"class_type": "PiDTestConditioning",
               "inputs": {"batch": 1, "tokens": 300, "width": 4096, "seed": 1, "scale": 1.0}}
    add_pid_decode(g, model_files, latent=("early", 0), cond=("t5", 0))
    save_image(g, "s_img", ["decode", 0], "never.safetensors")
    with pytest.raises(ComfyError) as err:
        comfyui.run(g)
    e = err.value.execution_error
    assert e.get("node_type") == DECODE
    message = e.get("exception_message", "")
    assert "4096" in message and "2304" in message, message
    assert "Traceback" not in message


def test_invalid_input_is_reported_before_running(comfyui, model_files):
    g = graph_base(model_files)
    g["early"]["inputs"]["stop_at_step"] = -5  # below the widget's minimum
    save_latent(g, "s_early", ["early", 0], "never2.safetensors")
    with pytest.raises(ComfyError) as err:
        comfyui.queue(g)
    assert err.value.status == 400
    assert "early" in err.value.node_errors, err.value.body


def test_encode_degrade_to_decode(comfyui, model_files):
    g = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": LATENT_PX, "height": LATENT_PX, "batch_size": 1,
                                                       "color": 0x8040C0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": model_files["vae"]}},
        "cond": {"class_type": "PiDTestConditioning",
                 "inputs": {"batch": 1, "tokens": 300, "width": 2304, "seed": 0, "scale": 1.0}},
        "enc": {"class_type": ENCODE, "inputs": {"image": ["img", 0], "vae": ["vae", 0], "sigma": 0.3, "seed": 1,
                                                 "latent_format": "flux"}},
        "clean": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["vae", 0]}},
    }
    save_latent(g, "s_enc", ["enc", 0], "enc.safetensors")
    save_latent(g, "s_clean", ["clean", 0], "clean.safetensors")
    add_pid_decode(g, model_files, latent=("enc", 0))
    save_image(g, "s_img", ["decode", 0], "enc_decoded.safetensors")
    comfyui.run(g)
    enc, meta = comfyui.read_tensors("enc.safetensors")
    clean, _ = comfyui.read_tensors("clean.safetensors")
    assert meta["pid_sigma"] == pytest.approx(0.3) and meta["pid_latent_format"] == "flux"
    assert enc["samples"].shape == clean["samples"].shape == (1, 16, LATENT_PX // 8, LATENT_PX // 8)
    # noised in PiD space: z_s = 0.7 z + 0.3 eps, so z_s - 0.7 z is the noise part, of std about 0.3
    noise_part = flux_in(enc["samples"]) - 0.7 * flux_in(clean["samples"])
    assert 0.2 < noise_part.std().item() < 0.4
    out, _ = comfyui.read_tensors("enc_decoded.safetensors")
    assert out["image"].shape == (1, LATENT_PX * 4, LATENT_PX * 4, 3)


def test_encode_degrade_auto_format_asks_for_16_channel_vaes(comfyui, model_files):
    g = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": model_files["vae"]}},
        "enc": {"class_type": ENCODE, "inputs": {"image": ["img", 0], "vae": ["vae", 0], "sigma": 0.3, "seed": 1,
                                                 "latent_format": "auto"}},
    }
    save_latent(g, "s_enc", ["enc", 0], "never3.safetensors")
    with pytest.raises(ComfyError) as err:
        comfyui.run(g)
    assert "'flux' or 'sd3'" in err.value.execution_error.get("exception_message", "")


# -------------------------------------------------------------------------- text and undistilled checkpoints

FOX = "a red fox in snow, (sharp:1.2) \\(macro\\) embedding:none"  # core's prompt syntax must not apply


def test_pid_text_encode_is_the_reference_contract(comfyui, model_files):
    """PiD Text Encode with core's own Gemma CLIP gives pid_core.text's encoding (same narrow random Gemma,
    same SentencePiece tokenizer), for an empty and a non-empty prompt; core's CLIP Text Encode of an empty
    prompt does not (it drops the instruction prompt)."""
    from pid_core.text import NEGATIVE_PROMPT

    gemma = model_files["gemma"]
    g = {
        "clip": {"class_type": "PiDTestTinyGemmaCLIP", "inputs": {"clip_name": gemma, "type": "pixeldit"}},
        "empty": {"class_type": TEXT, "inputs": {"clip": ["clip", 0], "prompt": "", "negative_prompt": NEGATIVE_PROMPT}},
        "fox": {"class_type": TEXT, "inputs": {"clip": ["clip", 0], "prompt": FOX, "negative_prompt": ""}},
        "core_empty": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": ""}},
    }
    for name, text in (("ref_empty", ""), ("ref_fox", FOX), ("ref_negative", NEGATIVE_PROMPT)):
        g[name] = {"class_type": "PiDTestReferenceText", "inputs": {"clip_name": gemma, "text": text}}
    saved = {"pos_empty": ["empty", 0], "neg_default": ["empty", 1], "pos_fox": ["fox", 0], "neg_empty": ["fox", 1],
             "core_empty": ["core_empty", 0], "ref_empty": ["ref_empty", 0], "ref_fox": ["ref_fox", 0],
             "ref_negative": ["ref_negative", 0]}
    for name, source in saved.items():
        g[f"save_{name}"] = {"class_type": "PiDTestSaveConditioning",
                             "inputs": {"conditioning": source, "filename": f"text_{name}.safetensors"}}
    comfyui.run(g)
    cond = {name: comfyui.read_tensors(f"text_{name}.safetensors")[0]["cond"] for name in saved}
    assert cond["pos_empty"].shape == (1, 300, 64)
    for ours, reference in (("pos_empty", "ref_empty"), ("neg_empty", "ref_empty"), ("pos_fox", "ref_fox"),
                            ("neg_default", "ref_negative")):
        torch.testing.assert_close(cond[ours], cond[reference], rtol=0, atol=1e-4, msg=f"{ours} vs {reference}")
    assert (cond["pos_fox"] - cond["pos_empty"]).abs().max() > 0.1  # the caption matters
    assert (cond["core_empty"] - cond["ref_empty"]).abs().max() > 0.1  # core's empty prompt is not the reference's


def test_text_encode_refuses_another_clip(comfyui, model_files):
    from pid_core.text import NEGATIVE_PROMPT

    g = {
        "clip": {"class_type": "PiDTestTinyGemmaCLIP", "inputs": {"clip_name": model_files["gemma"], "type": "lumina2"}},
        "text": {"class_type": TEXT, "inputs": {"clip": ["clip", 0], "prompt": "x", "negative_prompt": NEGATIVE_PROMPT}},
    }
    g["save"] = {"class_type": "PiDTestSaveConditioning", "inputs": {"conditioning": ["text", 0], "filename": "never_t.safetensors"}}
    with pytest.raises(ComfyError) as err:
        comfyui.run(g)
    message = err.value.execution_error.get("exception_message", "")
    assert "pixeldit" in message and "Traceback" not in message, err.value.execution_error


def test_undistilled_decode_with_guidance(comfyui, model_files):
    """A checkpoint named undistilled runs the teacher's guided sampler; without a negative it says what to connect."""
    g = graph_base(model_files, steps=6, stop=4, finish=False)
    g["neg"] = {"class_type": "PiDTestConditioning",
                "inputs": {"batch": 1, "tokens": 300, "width": 2304, "seed": 7, "scale": 1.0}}
    add_pid_decode(g, model_files, latent=("early", 0), pid="teacher", steps=3, cfg=4.0, negative=("neg", 0))
    save_image(g, "s_img", ["decode", 0], "teacher.safetensors")
    entry = comfyui.run(g)
    img = comfyui.read_tensors("teacher.safetensors")[0]["image"]
    assert img.shape == (1, LATENT_PX * 4, LATENT_PX * 4, 3) and torch.isfinite(img).all()
    assert "undistilled" in entry["outputs"]["pid"]["text"][0]
    # cfg 1: no guidance, a different image; the student override runs too
    add_pid_decode(g, model_files, latent=("early", 0), pid="teacher", steps=3, cfg=1.0)
    save_image(g, "s_img", ["decode", 0], "teacher_cfg1.safetensors")
    comfyui.run(g)
    assert not torch.equal(comfyui.read_tensors("teacher_cfg1.safetensors")[0]["image"], img)
    add_pid_decode(g, model_files, latent=("early", 0), pid="teacher", steps=3)
    save_image(g, "s_img", ["decode", 0], "never_teacher.safetensors")
    with pytest.raises(ComfyError) as err:
        comfyui.run(g)
    message = err.value.execution_error.get("exception_message", "")
    assert "negative" in message and "PiD Text Encode" in message and "Traceback" not in message, message
