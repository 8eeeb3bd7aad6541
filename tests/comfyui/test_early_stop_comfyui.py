"""KSampler Early Stop with multistep, ancestral and SDE samplers: one uninterrupted run.

`finished` must equal KSamplerAdvanced's uninterrupted run exactly, and `stopped` must be that run's
state at the stop step (observed from the model side by PiDTestCaptureState), with `finish` on or off.
Skipped unless COMFYUI_PATH and COMFYUI_PY are set.
"""

from __future__ import annotations

import pytest
import torch

from .test_comfyui_nodes import capture_state, graph_base, save_latent

SAMPLERS = ["dpmpp_2m", "res_multistep", "euler_ancestral", "dpmpp_2m_sde"]


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_finished_is_one_uninterrupted_run(comfyui, model_files, sampler):
    steps, stop, seed = 6, 4, 11
    g = graph_base(model_files, steps=steps, stop=stop, sampler=sampler, seed=seed)
    g["early_off"] = {"class_type": g["early"]["class_type"], "inputs": dict(g["early"]["inputs"], finish=False)}
    g["stock"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["unet", 0], "add_noise": "enable", "noise_seed": seed, "steps": steps, "cfg": 1.0,
        "sampler_name": sampler, "scheduler": "simple", "positive": ["cond", 0], "negative": ["cond", 0],
        "latent_image": ["empty", 0], "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    g["capture"] = capture_state(steps=steps, stop=stop, seed=seed, sampler=sampler)
    save_latent(g, "s_finished", ["early", 1], f"one_run_finished_{sampler}.safetensors")
    save_latent(g, "s_stopped", ["early", 0], f"one_run_stopped_{sampler}.safetensors")
    save_latent(g, "s_stopped_off", ["early_off", 0], f"one_run_stopped_off_{sampler}.safetensors")
    save_latent(g, "s_stock", ["stock", 0], f"one_run_stock_{sampler}.safetensors")
    save_latent(g, "s_state", ["capture", 0], f"one_run_state_{sampler}.safetensors")
    comfyui.run(g)

    read = lambda name: comfyui.read_tensors(f"one_run_{name}_{sampler}.safetensors")[0]["samples"]  # noqa: E731
    finished, stock = read("finished"), read("stock")
    assert finished.abs().max() > 0.1
    assert torch.equal(finished, stock), f"finished differs from the uninterrupted run by {(finished - stock).abs().max()}"
    stopped = read("stopped")
    torch.testing.assert_close(stopped, read("state"), rtol=0, atol=1e-5)
    assert torch.equal(stopped, read("stopped_off")), "the stopped state depends on 'finish'"


def test_split_samplers_still_stop_and_finish(comfyui, model_files):
    """uni_pc does not report its state per step: the run is split at the stop step, as before."""
    g = graph_base(model_files, steps=6, stop=4, sampler="uni_pc", seed=5)
    g["early_off"] = {"class_type": g["early"]["class_type"], "inputs": dict(g["early"]["inputs"], finish=False)}
    save_latent(g, "s_finished", ["early", 1], "split_finished.safetensors")
    save_latent(g, "s_stopped", ["early", 0], "split_stopped.safetensors")
    save_latent(g, "s_stopped_off", ["early_off", 0], "split_stopped_off.safetensors")
    comfyui.run(g)
    stopped, meta = comfyui.read_tensors("split_stopped.safetensors")
    finished, _ = comfyui.read_tensors("split_finished.safetensors")
    assert 0.0 < meta["pid_sigma"] < 1.0
    assert torch.isfinite(finished["samples"]).all() and finished["samples"].abs().max() > 0.1
    assert torch.equal(stopped["samples"], comfyui.read_tensors("split_stopped_off.safetensors")[0]["samples"])
