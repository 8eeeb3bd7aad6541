"""The pack inside the real ComfyUI on CUDA (no --cpu): what the CPU tests cannot reach.

Run by tests/gpu/run.sh on a GPU machine (conftest.py: skipped without CUDA). The checkpoints are the
kit's random full-size FLUX.1 2K-to-4K v1.5 file in bf16 and its mxfp8 / int8 convrot siblings
(make_checkpoints.py); decodes are of core_pid.inputs' latent and text at kit.decode_px (2048) unless
said. Every figure a test measures is recorded (record_property: the report's "figures" column).

Thresholds: PSNR in dB of images in [-1, 1] against the bf16 file's decode on the default server. The
tests run in this file's order, the ones that start servers of their own last (if the run's time runs
out, those are the ones cut).
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import subprocess
import sys
import time

import pytest
import torch

from comfyui import core_pid
from comfyui.comfy_harness import MODEL_FILES, EventStream
from comfyui.test_comfyui_nodes import add_pid_decode, capture_state, graph_base, save_image, save_latent
from pid_core.precision import psnr

from .kit import GIB, system_stats

pytestmark = pytest.mark.gpu

HERE = pathlib.Path(__file__).resolve().parent
PACK_MODEL = "PidNet"  # the pack's network class, as ComfyUI's loaded-model list names it
WAIT_S = 240  # one prompt, cold start included


def image_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return psnr(a.permute(0, 3, 1, 2) * 2 - 1, b.permute(0, 3, 1, 2) * 2 - 1)


def db(figure: float):
    """A PSNR as the report shows it."""
    return round(figure, 2) if math.isfinite(figure) else "identical"


def finite_not_black(image: torch.Tensor) -> None:
    assert torch.isfinite(image).all(), "the image holds NaN or infinity"
    assert image.std() > 0.01 and (image > 0.02).float().mean() > 0.1, (
        f"a black or flat image: mean {float(image.mean()):.4f}, std {float(image.std()):.4f}")


def decode(kit, server, name, *, kind="bf16", weight_dtype="auto", px=None, nonce=0, tiling="auto", compile=None):
    """PiD Loader (kit file `kind`) + PiD Decode at px x px, measured: (PiDTestMeasure JSON, image)."""
    px = px or kit.decode_px
    g = core_pid.pack_graph(kit.file(kind), name=name, nonce=nonce, weight_dtype=weight_dtype, tiling=tiling,
                            latent_hw=(px // 32, px // 32), compile=compile)
    server.run(g, timeout=WAIT_S)
    return core_pid.read_measurement(server, name)


def pack_model(result: dict) -> dict:
    found = [m for m in result["loaded_models"] if m["model"] == PACK_MODEL]
    assert found, f"PiD is not among ComfyUI's loaded models: {result['loaded_models']}"
    return found[0]


def loaded_fraction(result: dict) -> float:
    m = pack_model(result)
    return m["loaded"] / m["size"] if m["size"] else 0.0


def record_decode(record_property, result: dict, prefix: str = "") -> None:
    record_property(f"{prefix}seconds", round(result["seconds"], 3))
    if result["peak_allocated"] is not None:
        record_property(f"{prefix}peak_GiB", round(result["peak_allocated"] / GIB, 2))
    record_property(f"{prefix}loaded_fraction", round(loaded_fraction(result), 3))


@pytest.fixture(scope="session")
def reference(kit, cuda_server):
    """The bf16 file's decode on the default server: loaded (cold), then again warm (the figures and the
    image every other decode is compared with)."""
    decode(kit, cuda_server, "reference_cold")
    return decode(kit, cuda_server, "reference", nonce=1)


# --------------------------------------------------------------------------------- loader: dtypes, files

def test_bf16_file_decodes(kit, reference, record_property):
    result, image = reference
    record_decode(record_property, result)
    record_property("patcher", pack_model(result)["patcher"])
    assert image.shape == (1, kit.decode_px, kit.decode_px, 3)
    finite_not_black(image)


# Each stored form of the weights through PiD Loader: (file kind, weight_dtype, the fp8 round trip that gives
# the same stored values to pid_core, the least PSNR). The thresholds (fp8 and mxfp8 30 dB, int8
# 35 dB) are measured against the bf16 decode and recorded; with random weights the quantization itself
# costs more than that (fp8_e4m3fn 25.5 dB on the narrow model: run.sh --dry-run), so the test
# holds ComfyUI's computation to them against pid_core's decode of the same stored values in bf16
# (weight-only dequantization): equal where ComfyUI dequantizes the weights, lower where its kernels also
# quantize the activations (fp8_e4m3fn_fast: fp8 matmuls; int8: int8 matmuls).
VARIANTS = {
    "fp8_e4m3fn": ("bf16", "fp8_e4m3fn", "fp8_e4m3fn", 30.0),
    "fp8_e4m3fn_fast": ("bf16", "fp8_e4m3fn_fast", "fp8_e4m3fn", 30.0),
    "fp8_e5m2": ("bf16", "fp8_e5m2", "fp8_e5m2", 30.0),
    "mxfp8": ("mxfp8", "auto", None, 30.0),
    "int8_convrot": ("int8_convrot", "auto", None, 35.0),
}


def run_engine(kit, out_dir, jobs: dict, runs: int = 0) -> dict:
    """engine_decode.py (pid_core.decode without ComfyUI, a separate process) for {name: (kind, round
    trip)}: {name: (its JSON, image)}."""
    from safetensors.torch import load_file

    device = "cpu" if kit.rehearsal else "cuda"
    specs = [f"{name}={kit.models / 'diffusion_models' / kit.file(kind)}" + (f":{trip}" if trip else "")
             for name, (kind, trip) in jobs.items()]
    run = subprocess.run([sys.executable, str(HERE / "engine_decode.py"), str(out_dir), *specs, "--px",
                          str(kit.decode_px), "--device", device, "--runs", str(runs)],
                         capture_output=True, text=True, timeout=WAIT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    return {name: (json.loads((out_dir / f"{name}.json").read_text()),
                   load_file(str(out_dir / f"{name}.safetensors"))["image"]) for name in jobs}


@pytest.fixture(scope="session")
def same_weights(kit):
    """pid_core's decodes of every variant's stored values (one process)."""
    jobs = {name: (kind, trip) for name, (kind, _, trip, _) in VARIANTS.items()}
    return run_engine(kit, kit.results / "engine_variants", jobs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_loader_variant_decodes_close_to_bf16(kit, cuda_server, reference, same_weights, variant, record_property):
    kind, weight_dtype, _, least = VARIANTS[variant]
    result, image = decode(kit, cuda_server, f"variant_{variant}", kind=kind, weight_dtype=weight_dtype)
    record_decode(record_property, result)
    against_bf16 = image_psnr(image, reference[1])
    against_same = image_psnr(image, same_weights[variant][1])
    record_property("psnr_vs_bf16_db", db(against_bf16))
    record_property(f"vs_bf16_at_least_{least:g}", "yes" if against_bf16 >= least else "no")
    record_property("psnr_vs_same_weights_db", db(against_same))
    finite_not_black(image)
    assert against_same >= least, (f"{variant}: PSNR {against_same:.2f} dB against pid_core's decode of the same "
                                   f"stored weights, at least {least} wanted")


# ------------------------------------------------------------------------------------------- early stop

def test_early_stop_to_pid_decode_on_device(kit, cuda_server, record_property):
    """KSampler Early Stop on the tiny FLUX-style model: the stopped latent is the sampler's own state
    (observed from the model side by PiDTestCaptureState in one full stock run), and PiD Decode takes it."""
    g = graph_base(MODEL_FILES, steps=6, stop=4, finish=True)
    g["capture"] = capture_state(steps=6, stop=4)
    save_latent(g, "s_early", ["early", 0], "gpu_early.safetensors")
    save_latent(g, "s_state", ["capture", 0], "gpu_state.safetensors")
    add_pid_decode(g, MODEL_FILES, latent=("early", 0))
    save_image(g, "s_img", ["decode", 0], "gpu_early_decoded.safetensors")
    cuda_server.run(g, timeout=WAIT_S)
    early, meta = cuda_server.read_tensors("gpu_early.safetensors")
    state, state_meta = cuda_server.read_tensors("gpu_state.safetensors")
    difference = float((early["samples"] - state["samples"]).abs().max())
    record_property("max_abs_difference", difference)
    assert meta["pid_sigma"] == pytest.approx(state_meta["captured_sigma"], abs=1e-6)
    torch.testing.assert_close(early["samples"], state["samples"], rtol=0, atol=1e-4)
    image = cuda_server.read_tensors("gpu_early_decoded.safetensors")[0]["image"]
    assert image.shape[1:] == (256, 256, 3) and torch.isfinite(image).all()


# --------------------------------------------------------------------------------- interrupt, no leak

def test_interrupt_ends_within_one_step(kit, cuda_server, reference, record_property):
    """POST /interrupt after the first step of a big_px (4096) decode, tiled by auto: the prompt ends
    interrupted in PiD Decode within about one step (cancel is checked after every network call)."""
    events = EventStream(cuda_server)
    try:
        px = kit.big_px
        g = core_pid.pack_graph(kit.file("bf16"), name="interrupted", nonce=7, latent_hw=(px // 32, px // 32))
        prompt_id = events.queue(g)
        node = "interrupted_image"
        events.wait_for(lambda t, d: t == "executing" and isinstance(d, dict) and d.get("node") == node,
                        timeout=WAIT_S)
        started = time.monotonic()
        events.wait_for(lambda t, d: t == "progress" and d.get("node") == node and d.get("value", 0) >= 1,
                        timeout=WAIT_S)
        step = time.monotonic() - started
        asked = time.monotonic()
        status, _ = cuda_server.post("/interrupt", {"prompt_id": prompt_id})
        assert status == 200
        stopped = events.wait_for(lambda t, d: t in ("execution_interrupted", "execution_success")
                                  and d.get("prompt_id") == prompt_id, timeout=WAIT_S)
        latency = time.monotonic() - asked
    finally:
        events.close()
    record_property("first_step_seconds", round(step, 3))
    record_property("interrupt_seconds", round(latency, 3))
    assert stopped[0] == "execution_interrupted", "the decode finished instead of stopping"
    assert stopped[1].get("node_type") == core_pid.DECODE
    # within one step (the first step's time; 25% and 0.5 s for timing noise)
    assert latency <= 1.25 * step + 0.5, f"interrupted after {latency:.2f} s; one step took {step:.2f} s"


def test_no_memory_leak_across_queued_decodes(kit, cuda_server, reference, needs_cuda, record_property):
    """Three decodes queued at once (the model loaded before): allocated device memory after the third
    is what it was before the first."""
    px = kit.decode_px
    ids = [cuda_server.queue(core_pid.pack_graph(kit.file("bf16"), name=f"queued_{i}", nonce=100 + i,
                                                 latent_hw=(px // 32, px // 32))) for i in range(3)]
    for prompt_id in ids:
        cuda_server.wait(prompt_id, timeout=WAIT_S)
    results = [core_pid.read_measurement(cuda_server, f"queued_{i}")[0] for i in range(3)]
    before, after = results[0]["allocated_before"], results[2]["allocated_after"]
    device = system_stats(cuda_server)
    record_property("allocated_before_GiB", round(before / GIB, 3))
    record_property("allocated_after_GiB", round(after / GIB, 3))
    record_property("device_used_GiB", round((device["vram_total"] - device["vram_free"]) / GIB, 2))
    assert after - before <= 64 * 1024 ** 2, f"{(after - before) / 1024 ** 2:.0f} MiB more allocated after 3 decodes"


# ------------------------------------------------------------------------------ PiD Decode vs pid_core

def test_pid_decode_is_pid_core_decode(kit, cuda_server, reference, record_property):
    """The same file, inputs, seed and plan through pid_core.decode alone (a process without ComfyUI):
    the same image within bf16 rounding. Both times (medians of 3 warm decodes) are recorded; the report
    compares them (PiD Decode within 5% of pid_core's: a speed figure, not an assertion)."""
    ref_result, ref_image = reference
    node = [ref_result["seconds"]] + [decode(kit, cuda_server, f"timed_{i}", nonce=10 + i)[0]["seconds"]
                                      for i in range(2)]
    engine, image = run_engine(kit, kit.results / "engine_timed", {"engine": ("bf16", None)}, runs=3)["engine"]
    node_seconds, seconds = statistics.median(node), statistics.median(engine["seconds"])
    figure = image_psnr(image, ref_image)
    record_property("psnr_db", db(figure))
    record_property("max_abs_difference", float((image - ref_image).abs().max()))
    record_property("pid_decode_seconds", round(node_seconds, 3))
    record_property("pid_core_seconds", round(seconds, 3))
    record_property("time_ratio", round(node_seconds / seconds, 3))
    assert image.shape == ref_image.shape
    assert figure >= 40.0, f"PSNR {figure:.2f} dB between PiD Decode and pid_core.decode"


def test_compile_input_on_the_device(kit, cuda_server, reference, record_property):
    """PiD Decode's compile input on the default server: the first decode compiles the blocks (its time is
    the compile's), the second runs the compiled code; both give the eager image within bf16 rounding.
    The report shows the warm time next to the eager one (the speed figure, not an assertion)."""
    ref_result, ref_image = reference
    cold, _ = decode(kit, cuda_server, "compiled_cold", nonce=20, compile=True)
    warm, image = decode(kit, cuda_server, "compiled", nonce=21, compile=True)
    figure = image_psnr(image, ref_image)
    record_property("first_call_seconds", round(cold["seconds"], 3))
    record_property("seconds", round(warm["seconds"], 3))
    record_property("eager_seconds", round(ref_result["seconds"], 3))
    record_property("time_ratio", round(warm["seconds"] / ref_result["seconds"], 3))
    record_property("psnr_db", db(figure))
    finite_not_black(image)
    assert figure >= 40.0, f"PSNR {figure:.2f} dB between the compiled and the eager PiD Decode"


# ----------------------------------------------------------------------------------------- memory modes

@pytest.mark.parametrize("mode", ["dynamic", "legacy"])
def test_reserve_vram_loads_partially_and_decodes_the_same(kit, models_base, cuda_server, reference, needs_cuda, mode,
                                                           record_property):
    """--reserve-vram leaving room for about half of PiD's weights: PiD Decode completes with PiD partly
    loaded (ComfyUI's loaded fraction below 1), the same image as the fully loaded decode. `dynamic` is
    v0.33's default on NVIDIA (comfy-aimdo: --reserve-vram is its headroom), `legacy` the estimate-based
    loader (--disable-dynamic-vram: --reserve-vram is subtracted from what it loads)."""
    ref_result, ref_image = reference
    weights = pack_model(ref_result)["size"]
    working = ref_result["peak_allocated"] - ref_result["allocated_before"]
    cuda_server.free()  # the default server lets its models go (it only answers from here on)
    time.sleep(2)
    free, _ = torch.cuda.mem_get_info()
    room = 0.5 * weights + 1.25 * working + 0.5 * GIB  # what ComfyUI may use: the decode and half the weights
    reserve = (free - room) / GIB
    record_property("reserve_vram_GB", round(reserve, 2))
    record_property("room_GiB", round(room / GIB, 2))
    args = ["--reserve-vram", f"{reserve:.2f}"] + (["--disable-dynamic-vram"] if mode == "legacy" else [])
    with kit.server(f"reserve_{mode}", args) as server:
        result, image = decode(kit, server, f"reserve_{mode}")
    record_decode(record_property, result)
    figure = image_psnr(image, ref_image)
    record_property("psnr_db", db(figure))
    finite_not_black(image)
    assert loaded_fraction(result) < 1.0, f"PiD was loaded fully: {pack_model(result)}"
    assert figure >= 50.0, f"PSNR {figure:.2f} dB against the fully loaded decode"


# (extra command-line flags, the least PSNR against the default server's decode, a log line they must give)
FLAGS = {
    "lowvram": (["--lowvram"], 50.0, None),
    "lowvram_legacy": (["--disable-dynamic-vram", "--lowvram"], 50.0, None),
    "fast": (["--fast"], 30.0, None),
    "pytorch_attention": (["--use-pytorch-cross-attention"], 40.0, "PiD Decode: attention by PyTorch SDPA"),
    "split_attention": (["--use-split-cross-attention"], 35.0, "PiD Decode: attention by ComfyUI's attention_split"),
}


@pytest.mark.parametrize("flag", list(FLAGS))
def test_comfyui_flags_decode_and_agree(kit, models_base, reference, flag, record_property):
    args, least, log_line = FLAGS[flag]
    if kit.rehearsal and "--lowvram" in args:
        pytest.skip("ComfyUI refuses --lowvram with --cpu: the CPU rehearsal skips it")
    with kit.server(flag, args) as server:
        result, image = decode(kit, server, f"flag_{flag}")
        log = server.log_text()
    record_decode(record_property, result)
    figure = image_psnr(image, reference[1])
    record_property("psnr_db", db(figure))
    finite_not_black(image)
    if log_line is not None:
        assert log_line in log, f"the server's log does not say {log_line!r}"
    assert figure >= least, f"{' '.join(args)}: PSNR {figure:.2f} dB against the default decode, at least {least}"
