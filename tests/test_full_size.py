"""Every released key layout, at full size: a random checkpoint with exactly the published keys and
shapes loads strictly and runs one forward at 256x256 on CPU (slow: about a minute per file)."""

import gc
import os

import pytest
import torch

from conftest import KEY_FILES
from pid_core.checkpoint import load_pid
from pid_core.commands.random_checkpoints import random_state_dict, read_key_file, save_checkpoint

KEY_LISTS = sorted(KEY_FILES.glob("*.txt")) if KEY_FILES.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("keys_file", KEY_LISTS or [None], ids=lambda p: p.stem if p else "none")
def test_full_size_checkpoint_loads_and_runs(tmp_path, keys_file):
    if keys_file is None:
        pytest.skip(f"no key lists at {KEY_FILES}")
    shapes = read_key_file(str(keys_file))
    # Official layout and name: checkpoints/<experiment>/model_ema_bf16.pth, keys prefixed net.
    path = save_checkpoint(random_state_dict(shapes), str(tmp_path / keys_file.stem / "model_ema_bf16.pth"))
    gc.collect()
    try:
        model = load_pid(path)  # the CPU default: the file's bf16, fp32 compute per layer
    finally:
        os.remove(path)  # 2.6 GB each: keeping every layout's file would fill a CI disk
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_heads, cfg.patch_depth, cfg.pixel_depth) == (1536, 24, 14, 2)
    assert (cfg.text_dim, cfg.text_max_tokens) == (2304, 300)
    H = W = 256
    h, w = H // cfg.scale, W // cfg.scale
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(
            torch.randn(1, 3, H, W, generator=g),
            torch.tensor([0.999]),
            torch.randn(1, 300, 2304, generator=g),
            torch.randn(1, cfg.latent_channels, h, w, generator=g),
            torch.tensor([0.3]),
        )
    assert out.shape == (1, 3, H, W)
    assert torch.isfinite(out).all()
