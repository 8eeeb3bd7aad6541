"""The pack inside a real ComfyUI (CPU), with tiny random models: see conftest.py and SETUP.md.

Skipped unless COMFYUI_PATH and COMFYUI_PY are set (failed instead under PID_REQUIRE_COMFYUI=1).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from pid_core.latent_formats import LATENT_FORMATS

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


def capture_state(*, steps, stop, seed=3, sampler="euler", scheduler="simple", denoise=1.0, cond="cond"):
    """PiDTestCaptureState: one full stock run of graph_base's model and latent, its state observed from the
    model side at step `stop` (what KSampler Early Stop's `stopped` must equal)."""
    return {"class_type": "PiDTestCaptureState", "inputs": {
        "model": ["unet", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler,
        "scheduler": scheduler, "positive": [cond, 0], "negative": [cond, 0], "latent_image": ["empty", 0],
        "denoise": denoise, "capture_step": stop}}


def save_latent(graph, node_id, source, filename):
    graph[node_id] = {"class_type": "PiDTestSaveLatent", "inputs": {"latent": source, "filename": filename}}


def save_image(graph, node_id, source, filename):
    graph[node_id] = {"class_type": "PiDTestSaveImage", "inputs": {"image": source, "filename": filename}}


def pid_decode_node(latent, *, cond=("cond", 0), pid=("pid", 0), fmt="auto", sigma=-1.0, steps=2, seed=0,
                    tiling="auto", tile_size=2048, tile_overlap=0, negative=None, cfg=-1.0, sampler="auto",
                    color_reference=None, color_match=1.0, compile=None):
    node = {"class_type": DECODE, "inputs": {
        "pid_model": list(pid), "latent": list(latent), "conditioning": list(cond), "seed": seed, "steps": steps,
        "latent_format": fmt, "sigma": sigma, "tiling": tiling, "tile_size": tile_size, "tile_overlap": tile_overlap,
        "cfg": cfg, "sampler": sampler, "color_match": color_match}}
    if negative is not None:
        node["inputs"]["negative"] = list(negative)
    if color_reference is not None:
        node["inputs"]["color_reference"] = list(color_reference)
    if compile is not None:
        node["inputs"]["compile"] = compile
    return node


def add_pid_decode(graph, files, *, latent, pid="pid", **decode_inputs):
    """PiD Loader ("pid": files[pid], by default the 16-channel checkpoint, in fp32) and PiD Decode
    ("decode") of `latent`."""
    graph["pid"] = {"class_type": LOADER, "inputs": {"pid_name": files[pid], "weight_dtype": "fp32"}}
    graph["decode"] = pid_decode_node(latent, **decode_inputs)


def flux_in(raw):
    return LATENT_FORMATS["flux"].to_pid(raw)


def sdxl_in(raw):
    return LATENT_FORMATS["sdxl"].to_pid(raw)  # raw VAE space * 0.13025, as ComfyUI's SDXL process_in


def failure_message(comfyui, g, node_type=None) -> str:
    """Run g, which must fail while executing (in `node_type`, when given) with a message and no
    traceback; that message."""
    with pytest.raises(ComfyError) as err:
        comfyui.run(g)
    e = err.value.execution_error
    if node_type is not None:
        assert e.get("node_type") == node_type, e
    message = e.get("exception_message", "").rstrip("\n")  # ComfyUI ends it with a newline
    assert "Traceback" not in message, e
    return message


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
    assert info[DECODE]["input_order"]["required"][-3:] == ["cfg", "sampler", "color_match"]
    # optional: API prompts written before compile still validate
    assert info[DECODE]["input_order"]["optional"] == ["negative", "color_reference", "compile"]
    for node_id in (DECODE, ENCODE):  # torch's CPU generator keeps a seed's low 32 bits (tests/test_decode.py)
        assert "multiple of 2^32" in info[node_id]["input"]["required"]["seed"][1]["tooltip"], node_id


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
    g["capture"] = capture_state(steps=steps, stop=stop, sampler=sampler, scheduler=scheduler, denoise=denoise)
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
    g["capture"] = capture_state(steps=14, stop=12)
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


def test_colour_reference_matches_the_decode_and_reports_it(comfyui, model_files):
    """The finished latent through the VAE as PiD Decode's color_reference: the image takes its colours, the
    node shows the colour error before and after; a reference of another aspect ratio is refused."""
    from pid_core.colour import colour_error

    g = graph_base(model_files, steps=6, stop=4)
    g["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": model_files["vae"]}}
    g["reference"] = {"class_type": "VAEDecode", "inputs": {"samples": ["early", 1], "vae": ["vae", 0]}}
    add_pid_decode(g, model_files, latent=("early", 0), color_reference=("reference", 0))
    g["plain"] = pid_decode_node(("early", 0), color_reference=("reference", 0), color_match=0.0)
    save_image(g, "s_img", ["decode", 0], "coloured.safetensors")
    save_image(g, "s_plain", ["plain", 0], "plain.safetensors")
    save_image(g, "s_ref", ["reference", 0], "reference.safetensors")
    entry = comfyui.run(g)
    text = entry["outputs"]["decode"]["text"][0]
    assert text.startswith("Colour against the reference: mean CIEDE2000") and "after matching (strength 1)" in text
    images = {name: comfyui.read_tensors(f"{name}.safetensors")[0]["image"].permute(0, 3, 1, 2)
              for name in ("coloured", "plain", "reference")}
    matched, unmatched = (colour_error(images[name], images["reference"]) for name in ("coloured", "plain"))
    assert matched.delta_e.item() < unmatched.delta_e.item() and matched.levels.item() < unmatched.levels.item()
    g["wide"] = {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 1, "color": 0}}
    g["decode"]["inputs"]["color_reference"] = ["wide", 0]
    del g["s_ref"]
    message = failure_message(comfyui, g, DECODE)
    assert "96x64" in message and "256x256" in message, message


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="torch.compile on CPU needs a C++ compiler")
def test_compile_input_decodes_what_eager_does(comfyui, model_files):
    """PiD Decode's compile input inside ComfyUI (its model patcher, comfy.ops layers): the blocks run
    compiled (inductor's CPU code here) and give the eager image."""
    g = graph_base(model_files, steps=6, stop=4)
    add_pid_decode(g, model_files, latent=("early", 0), steps=2)
    g["compiled"] = pid_decode_node(("early", 0), steps=2, compile=True)
    for name, node in (("eager", "decode"), ("compiled", "compiled")):
        save_image(g, f"s_{name}", [node, 0], f"{name}.safetensors")
    comfyui.run(g)
    eager, compiled = (comfyui.read_tensors(f"{name}.safetensors")[0]["image"] for name in ("eager", "compiled"))
    assert torch.isfinite(compiled).all()
    difference = (eager - compiled).abs().max().item()
    print(f"compiled vs eager: max difference {difference:.3g}")
    assert difference < 1e-3, difference


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
    message = failure_message(comfyui, g, node_type=DECODE)
    assert "4096" in message and "2304" in message, message


def test_a_conditioning_beyond_any_gemma_hidden_state_is_refused(comfyui, model_files):
    """A CONDITIONING of values around 1e30 (squared in PiD's text norm they overflow and the prompt is
    silently ignored) fails in PiD Decode naming the text embedding, as the conditioning and as the
    negative of a guided decode; no IMAGE is handed on."""
    g = graph_base(model_files, steps=3, stop=2, finish=False)
    g["huge"] = {"class_type": "PiDTestConditioning",
                 "inputs": {"batch": 1, "tokens": 300, "width": 2304, "seed": 1, "scale": 1e30}}
    add_pid_decode(g, model_files, latent=("early", 0), cond=("huge", 0))
    save_image(g, "s_img", ["decode", 0], "never_huge.safetensors")
    message = failure_message(comfyui, g, node_type=DECODE)
    assert "The text embedding reaches" in message and "Gemma-2-2b-it" in message, message
    # the guided sampler on the student file (the teacher's loader output stays uncached for its own test)
    add_pid_decode(g, model_files, latent=("early", 0), sampler="teacher", steps=2, cfg=4.0, negative=("huge", 0))
    message = failure_message(comfyui, g, node_type=DECODE)
    assert message.startswith("The negative text: The text embedding reaches"), message
    assert not (comfyui.output_dir / "never_huge.safetensors").exists()


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


def test_encode_degrade_names_an_image_smaller_than_a_latent_cell(comfyui, model_files):
    """A 4 x 4 image for an 8x VAE has no latent: a message with the size to give, not the VAE's conv error."""
    g = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": 4, "height": 4, "batch_size": 1, "color": 0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": model_files["vae"]}},
        "enc": {"class_type": ENCODE, "inputs": {"image": ["img", 0], "vae": ["vae", 0], "sigma": 0.3, "seed": 1,
                                                 "latent_format": "flux"}},
    }
    save_latent(g, "s_enc", ["enc", 0], "never_tiny.safetensors")
    message = failure_message(comfyui, g, node_type=ENCODE)
    assert "The image is 4x4 px, smaller than one latent cell of this VAE (8x8 px)" in message, message
    g["img"]["inputs"].update(width=8, height=8)  # one latent cell: fine
    comfyui.run(g)
    assert comfyui.read_tensors("never_tiny.safetensors")[0]["samples"].shape[-2:] == (1, 1)


def test_non_finite_decode_fails_with_the_cause(comfyui, model_files):
    # a checkpoint whose weights are finite but whose output layer overflows (a damaged file): the result
    # is NaN or infinite; PiD Decode must fail with the cause and the fix, never hand on a black IMAGE
    from pid_core.checkpoint import read_state_dict
    from pid_core.commands.random_checkpoints import save_checkpoint

    pid_dir = comfyui.base_dir / "models" / "pid"
    sd = read_state_dict(str(pid_dir / model_files["pid"]))
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"].float() * 3e38
    save_checkpoint({k: v.float() for k, v in sd.items()}, str(pid_dir / "pid_test_overflowing.safetensors"))
    g = graph_base(model_files, steps=3, stop=2, finish=False)
    add_pid_decode(g, dict(model_files, pid="pid_test_overflowing.safetensors"), latent=("early", 0))
    save_image(g, "s_img", ["decode", 0], "never_black.safetensors")
    message = failure_message(comfyui, g, node_type=DECODE)
    assert "NaN or infinite" in message and "damaged" in message, message
    assert not (comfyui.output_dir / "never_black.safetensors").exists()


# --- SDXL family (EPS, 4-channel latents) ----------------------------------------------------------

def sdxl_graph(files, *, steps=6, stop=4, sampler="euler", scheduler="normal", seed=5):
    """The tiny SDXL-family EPS UNet (detected as KOALA-700M, an SDXL model config) with its own
    conditioning (context 2048, pooled 1280), and Gemma-shaped conditioning for PiD."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": files["sdxl"], "weight_dtype": "default"}},
        "cond_xl": {"class_type": "PiDTestConditioning", "inputs": {
            "batch": 1, "tokens": 77, "width": 2048, "seed": 0, "scale": 1.0, "pooled": 1280}},
        "cond": {"class_type": "PiDTestConditioning",
                 "inputs": {"batch": 1, "tokens": 300, "width": 2304, "seed": 0, "scale": 1.0}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": LATENT_PX, "height": LATENT_PX, "batch_size": 1}},
        "early": {"class_type": EARLY, "inputs": {
            "model": ["unet", 0], "seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["cond_xl", 0], "negative": ["cond_xl", 0],
            "latent_image": ["empty", 0], "denoise": 1.0, "stop_at_step": stop, "finish": True}},
        "capture": capture_state(steps=steps, stop=stop, seed=seed, sampler=sampler, scheduler=scheduler,
                                 cond="cond_xl"),
        "stock": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["unet", 0], "add_noise": "enable", "noise_seed": seed, "steps": steps, "cfg": 1.0,
            "sampler_name": sampler, "scheduler": scheduler, "positive": ["cond_xl", 0], "negative": ["cond_xl", 0],
            "latent_image": ["empty", 0], "start_at_step": 0, "end_at_step": stop,
            "return_with_leftover_noise": "enable"}},
        "pid": {"class_type": LOADER, "inputs": {"pid_name": files["pid_sdxl"], "weight_dtype": "fp32"}},
    }


def test_sdxl_family_early_stop_is_the_euler_state(comfyui, model_files):
    """An EPS model of the SDXL family: the stopped LATENT holds the sampler's Euler-frame state
    x0 + sigma_eu * eps (raw VAE space) with pid_sigma = the Euler sigma reached, format 'sdxl'. For EPS
    models stock KSamplerAdvanced's leftover latent is that same state (no 1/(1 - sigma) as for flow), so
    PiD Decode of the stock latent with format and sigma set by hand gives the early-stop path's image."""
    g = sdxl_graph(model_files)
    save_latent(g, "s_early", ["early", 0], "xl_early.safetensors")
    save_latent(g, "s_finished", ["early", 1], "xl_finished.safetensors")
    save_latent(g, "s_state", ["capture", 0], "xl_state.safetensors")
    save_latent(g, "s_full", ["capture", 1], "xl_full.safetensors")
    save_latent(g, "s_stock", ["stock", 0], "xl_stock.safetensors")
    comfyui.run(g)
    early, meta = comfyui.read_tensors("xl_early.safetensors")
    state, state_meta = comfyui.read_tensors("xl_state.safetensors")
    stock, _ = comfyui.read_tensors("xl_stock.safetensors")
    finished, fmeta = comfyui.read_tensors("xl_finished.safetensors")
    full, _ = comfyui.read_tensors("xl_full.safetensors")

    assert meta["pid_latent_format"] == "sdxl", meta
    sigma = meta["pid_sigma"]
    # the Euler sigma as the model saw it (a VP-frame sigma would be sigma / sqrt(sigma^2 + 1))
    assert sigma == pytest.approx(state_meta["captured_sigma"], rel=1e-6), "pid_sigma is not the Euler sigma reached"
    assert sigma > 0
    assert early["samples"].shape == (1, 4, LATENT_PX // 8, LATENT_PX // 8)
    torch.testing.assert_close(early["samples"], state["samples"], rtol=0, atol=1e-4)
    torch.testing.assert_close(early["samples"], stock["samples"], rtol=0, atol=1e-4)
    torch.testing.assert_close(finished["samples"], full["samples"], rtol=0, atol=1e-4)
    assert fmeta["pid_sigma"] == 0.0

    # PiD Decode: the early-stop LATENT (format and sigma from its keys) vs the stock latent by hand
    g["decode_auto"] = pid_decode_node(("early", 0))
    g["decode_stock"] = pid_decode_node(("stock", 0), fmt="sdxl", sigma=sigma)
    save_image(g, "s_img_auto", ["decode_auto", 0], "xl_decoded_auto.safetensors")
    save_image(g, "s_img_stock", ["decode_stock", 0], "xl_decoded_stock.safetensors")
    entry = comfyui.run(g)
    auto, _ = comfyui.read_tensors("xl_decoded_auto.safetensors")
    manual, _ = comfyui.read_tensors("xl_decoded_stock.safetensors")
    assert auto["image"].shape == (1, LATENT_PX * 4, LATENT_PX * 4, 3)
    assert torch.isfinite(auto["image"]).all() and auto["image"].std() > 0
    torch.testing.assert_close(auto["image"], manual["image"], rtol=0, atol=1e-4)
    assert "4-channel" in entry["outputs"]["pid"]["text"][0]


def test_encode_degrade_sdxl_vae(comfyui, model_files):
    """A 4-channel SDXL-style VAE: latent_format auto finds 'sdxl'; the LATENT holds the Euler frame
    z + sigma_eu * eps with sigma_eu = s / sqrt(1 - s^2) (PiD's VP-frame degrade sqrt(1 - s^2) z + s eps,
    divided by sqrt(1 - s^2)), eps being the node's seeded noise; PiD Decode takes it from there."""
    s, seed = 0.3, 1
    g = {
        "img": {"class_type": "EmptyImage", "inputs": {"width": LATENT_PX, "height": LATENT_PX, "batch_size": 1,
                                                       "color": 0x3080C0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": model_files["sdxl_vae"]}},
        "cond": {"class_type": "PiDTestConditioning",
                 "inputs": {"batch": 1, "tokens": 300, "width": 2304, "seed": 0, "scale": 1.0}},
        "enc": {"class_type": ENCODE, "inputs": {"image": ["img", 0], "vae": ["vae", 0], "sigma": s, "seed": seed,
                                                 "latent_format": "auto"}},
        "clean": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["vae", 0]}},
        "pid": {"class_type": LOADER, "inputs": {"pid_name": model_files["pid_sdxl"], "weight_dtype": "fp32"}},
    }
    g["decode"] = pid_decode_node(("enc", 0))
    save_latent(g, "s_enc", ["enc", 0], "xl_enc.safetensors")
    save_latent(g, "s_clean", ["clean", 0], "xl_clean.safetensors")
    save_image(g, "s_img", ["decode", 0], "xl_enc_decoded.safetensors")
    comfyui.run(g)
    enc, meta = comfyui.read_tensors("xl_enc.safetensors")
    clean, _ = comfyui.read_tensors("xl_clean.safetensors")
    sigma_eu = s / (1 - s * s) ** 0.5
    assert meta["pid_latent_format"] == "sdxl"
    assert meta["pid_sigma"] == pytest.approx(sigma_eu, rel=1e-6)
    assert enc["samples"].shape == clean["samples"].shape == (1, 4, LATENT_PX // 8, LATENT_PX // 8)
    eps = torch.randn(enc["samples"].shape, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(sdxl_in(enc["samples"]) - sdxl_in(clean["samples"]), sigma_eu * eps, rtol=0, atol=1e-4)
    out, _ = comfyui.read_tensors("xl_enc_decoded.safetensors")
    assert out["image"].shape == (1, LATENT_PX * 4, LATENT_PX * 4, 3)
    assert torch.isfinite(out["image"]).all() and out["image"].std() > 0


# --- the other execute paths -------------------------------------------------------------------------

@pytest.mark.parametrize("weight_dtype,shown", [("auto", "bfloat16"), ("bf16", "bfloat16"), ("fp16", "float16")])
def test_loader_weight_dtypes_decode(comfyui, model_files, weight_dtype, shown):
    """PiD Loader's weight_dtype choices (auto keeps the file's bf16) each load and decode."""
    g = graph_base(model_files, steps=3, stop=2, finish=False)
    add_pid_decode(g, model_files, latent=("early", 0), steps=1)
    g["pid"]["inputs"]["weight_dtype"] = weight_dtype
    save_image(g, "s_img", ["decode", 0], f"dtype_{weight_dtype}.safetensors")
    entry = comfyui.run(g)
    assert shown in entry["outputs"]["pid"]["text"][0], entry["outputs"]["pid"]
    out, meta = comfyui.read_tensors(f"dtype_{weight_dtype}.safetensors")
    assert out["image"].shape == (1, LATENT_PX * 4, LATENT_PX * 4, 3)
    assert meta["dtype"] == "torch.float32"  # IMAGE is float32 whatever the weights
    assert torch.isfinite(out["image"]).all()


def test_clean_latent_without_metadata_decodes_as_clean(comfyui, model_files):
    """A stock KSampler's finished LATENT has no PiD keys: sigma auto (-1) takes it as clean, the same
    image as sigma 0 set by hand. (The format is set: a 16-channel latent needs it with a checkpoint
    whose file name does not name its backbone.)"""
    g = graph_base(model_files, steps=3, stop=2, finish=False)
    g["ks"] = {"class_type": "KSampler", "inputs": {
        "model": ["unet", 0], "seed": 3, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["cond", 0], "negative": ["cond", 0], "latent_image": ["empty", 0], "denoise": 1.0}}
    g["pid"] = {"class_type": LOADER, "inputs": {"pid_name": model_files["pid"], "weight_dtype": "fp32"}}
    g["decode_auto"] = pid_decode_node(("ks", 0), fmt="flux")
    g["decode_set"] = pid_decode_node(("ks", 0), fmt="flux", sigma=0.0)
    save_image(g, "s_auto", ["decode_auto", 0], "clean_auto.safetensors")
    save_image(g, "s_set", ["decode_set", 0], "clean_set.safetensors")
    del g["early"]
    comfyui.run(g)
    auto, _ = comfyui.read_tensors("clean_auto.safetensors")
    manual, _ = comfyui.read_tensors("clean_set.safetensors")
    torch.testing.assert_close(auto["image"], manual["image"], rtol=0, atol=0)
    assert "(none given: taken as clean)" in comfyui.log_text()


# --- progress, previews, cancel, attention flags ------------------------------------------------------

def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's start-of-frame segment."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, "broken JPEG segment"
        marker, length = data[i + 1], int.from_bytes(data[i + 2:i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        i += 2 + length
    raise AssertionError("no JPEG frame header")


def test_progress_and_previews(comfyui, model_files, events):
    """Over ComfyUI's websocket: KSampler Early Stop reports one bar over both parts of its run (stop and
    finish), PiD Decode one step of its bar per PiD step, each with a JPEG preview of the image so far
    (ComfyUI scales previews to fit 512 px: a 2:1 image, 256 x 128 here, arrives as 512 x 256)."""
    g = graph_base(model_files, steps=4, stop=3, finish=True)
    g["empty"]["inputs"].update(width=LATENT_PX, height=LATENT_PX // 2)
    add_pid_decode(g, model_files, latent=("early", 0), steps=4)
    save_image(g, "s_img", ["decode", 0], "progress.safetensors")
    save_latent(g, "s_finished", ["early", 1], "progress_finished.safetensors")
    prompt_id = events.queue(g)
    comfyui.wait(prompt_id)
    events.wait_for(lambda t, d: t == "executing" and d.get("node") is None and d.get("prompt_id") == prompt_id)

    progress = events.of_prompt(prompt_id, "progress")
    decode = [(p["value"], p["max"]) for p in progress if p["node"] == "decode"]
    early = [(p["value"], p["max"]) for p in progress if p["node"] == "early"]
    assert decode == [(1, 4), (2, 4), (3, 4), (4, 4)], decode
    assert early and early[-1] == (4, 4) and all(m == 4 for _, m in early), early
    assert [v for v, _ in early] == sorted(v for v, _ in early)
    # previews: only PiD Decode sends any here (the server runs with --preview-method none)
    previews = events.previews()
    assert len(previews) == 4, [t for t, _ in previews]
    for image_type, data in previews:
        assert image_type == 1  # JPEG
        assert jpeg_size(data) == (512, 256)
    out, _ = comfyui.read_tensors("progress.safetensors")
    assert out["image"].shape == (1, LATENT_PX * 2, LATENT_PX * 4, 3)


def test_cancel_during_pid_decode(comfyui, model_files, events):
    """POST /interrupt while PiD Decode runs: the prompt ends as interrupted in PiD Decode (no image
    saved), and the next prompt runs normally."""
    g = {
        "empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 192, "height": 192, "batch_size": 1}},
        "cond": {"class_type": "PiDTestConditioning",
                 "inputs": {"batch": 1, "tokens": 300, "width": 2304, "seed": 0, "scale": 1.0}},
    }
    # 24 x 24 latent -> 768 px: a few seconds per decode here, one progress step per PiD step
    add_pid_decode(g, model_files, latent=("empty", 0), steps=4, seed=11, fmt="flux")
    save_image(g, "s_img", ["decode", 0], "cancelled.safetensors")
    prompt_id = events.queue(g)
    events.wait_for(lambda t, d: t == "progress" and d.get("prompt_id") == prompt_id and d.get("node") == "decode")
    status, _ = comfyui.post("/interrupt", {"prompt_id": prompt_id})
    assert status == 200
    with pytest.raises(ComfyError) as err:
        comfyui.wait(prompt_id)
    assert err.value.interrupted.get("node_type") == DECODE, err.value.body
    assert err.value.interrupted.get("node_id") == "decode"
    assert not (comfyui.output_dir / "cancelled.safetensors").exists()
    steps_done = [p["value"] for p in events.of_prompt(prompt_id, "progress") if p["node"] == "decode"]
    assert max(steps_done) < 4, steps_done

    # the next prompt runs normally (the same model, a smaller latent)
    g["empty"]["inputs"].update(width=64, height=64)
    g["s_img"]["inputs"]["filename"] = "after_cancel.safetensors"
    comfyui.run(g)
    out, _ = comfyui.read_tensors("after_cancel.safetensors")
    assert out["image"].shape == (1, 256, 256, 3) and torch.isfinite(out["image"]).all()


SPLIT_ATTENTION_ATOL = 1e-4  # the same maths in another kernel order: float32 rounding (5e-6 measured)


def test_split_attention_flag_decodes_the_same(comfyui, comfyui_split_attention, model_files):
    """ComfyUI started with --use-split-cross-attention: PiD Decode uses ComfyUI's split attention kernel
    (its log says so) and the same graph and seeds give the same image within SPLIT_ATTENTION_ATOL (the
    tiny FLUX model, too, runs on the other kernel there)."""
    images = []
    for server in (comfyui, comfyui_split_attention):
        g = graph_base(model_files, steps=6, stop=4, finish=False)
        add_pid_decode(g, model_files, latent=("early", 0), steps=4, seed=7)
        save_image(g, "s_img", ["decode", 0], "attention_flag.safetensors")
        server.run(g)
        out, _ = server.read_tensors("attention_flag.safetensors")
        images.append(out["image"])
    assert "Using split optimization for attention" in comfyui_split_attention.log_text()
    assert "PiD Decode: attention by ComfyUI's attention_split" in comfyui_split_attention.log_text()
    assert "PiD Decode: attention by PyTorch SDPA" in comfyui.log_text()
    assert images[0].shape == images[1].shape == (1, LATENT_PX * 4, LATENT_PX * 4, 3)
    diff = (images[0] - images[1]).abs().max().item()
    assert diff <= SPLIT_ATTENTION_ATOL, f"max |difference| {diff:.3g}"


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
    assert "pixeldit" in failure_message(comfyui, g)


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
    message = failure_message(comfyui, g)
    assert "negative" in message and "PiD Text Encode" in message, message


# --- messages in a node's words (docs/DESIGN.md §13) -------------------------------------------------

def test_a_giant_untiled_decode_names_the_tiling_input(comfyui, model_files):
    """8192 px latent image -> 32768 x 32768 px with tiling off: refused before allocating, and the fix is
    the node's tiling input, not a command-line option or a Python argument."""
    g = {"cond": graph_base(model_files)["cond"],
         "empty": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 8192, "height": 8192, "batch_size": 1}}}
    add_pid_decode(g, model_files, latent=("empty", 0), tiling="off", steps=1, fmt="flux")
    save_image(g, "s_img", ["decode", 0], "never_giant.safetensors")
    message = failure_message(comfyui, g, node_type=DECODE)
    assert message.startswith("Decoding 32768x32768 px needs about "), message
    assert message.endswith("Use tiling auto, which fits any size, or decode fewer images at once."), message
    assert "--" not in message and "TileOptions" not in message, message


def test_checkpoint_file_errors_speak_of_the_loader(comfyui, model_files):
    """A truncated checkpoint is named truncated, without the reader's own text; a model that is not PiD
    points to PiD Loader."""
    pid_dir = comfyui.base_dir / "models" / "pid"
    data = (pid_dir / model_files["pid"]).read_bytes()
    (pid_dir / "pid_test_truncated.safetensors").write_bytes(data[: len(data) // 2])
    g = graph_base(model_files, steps=3, stop=2, finish=False)
    add_pid_decode(g, dict(model_files, pid="pid_test_truncated.safetensors"), latent=("early", 0))
    save_image(g, "s_img", ["decode", 0], "never_truncated.safetensors")
    message = failure_message(comfyui, g, node_type=LOADER)
    assert message.startswith("pid_test_truncated.safetensors is truncated ("), message
    assert message.endswith("bytes its header announces): download or save it again."), message
    for library_words in ("miniz", "PytorchStreamReader", "deserializ", "metadata", "Error"):
        assert library_words not in message, message

    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, str(pid_dir / "pid_test_flux_dit.safetensors"))
    add_pid_decode(g, dict(model_files, pid="pid_test_flux_dit.safetensors"), latent=("early", 0))
    message = failure_message(comfyui, g, node_type=LOADER)
    assert message == ("pid_test_flux_dit.safetensors is not a PiD checkpoint: it looks like a FLUX diffusion model. "
                       "Pick a PiD checkpoint in PiD Loader."), message
