"""What the benchmarks share: the model they build, the sizes they parse, and peak memory on the CPU
(the process's resident memory) and on CUDA (the allocator's counters)."""

from __future__ import annotations

import argparse
import gc
import os

import torch


def shared_keys(name: str) -> str | None:
    """A key list of the shared spec folder ($PID_SHARED, or shared/ beside the checkout), if present."""
    here = os.path.dirname(os.path.abspath(__file__))
    for root in (os.environ.get("PID_SHARED"), os.path.join(here, "..", "..", "..", "shared")):
        if root:
            path = os.path.join(root, "spec", "keys", name)
            if os.path.exists(path):
                return os.path.normpath(path)
    return None


def model_config(spec: dict):
    """The network's shape for a measurement: narrow, from a key list, or the released sizes."""
    from ..checkpoint import detect_config
    from .random_checkpoints import read_key_file, released_config

    if spec.get("narrow"):
        from .random_checkpoints import narrow_config

        return narrow_config(layout=spec.get("layout", "v1"), latent_channels=spec.get("latent_channels", 16))
    if spec.get("keys"):
        shapes = read_key_file(spec["keys"])
        cfg = detect_config({k: torch.empty(v, device="meta") for k, v in shapes.items()}, spec["keys"])
        from ..variants import variant_from_filename

        variant = variant_from_filename(spec["keys"])
        if variant is not None:
            cfg = cfg.with_(latent_down_factor=variant.latent_down_factor, sr_scale=variant.sr_scale,
                            latent_unpatchify=variant.unpatchify)
        return cfg
    return released_config(spec.get("layout", "v1"), spec.get("latent_channels", 16))


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """--sizes: comma-separated N (square) or WxH, as (H, W); a mistake ends in one line."""
    sizes = []
    for item in (s.strip().lower() for s in text.split(",") if s.strip()):
        try:
            w, h = item.split("x") if "x" in item else (item, item)
            size = int(h), int(w)
        except ValueError:
            size = (0, 0)
        if min(size) < 64:
            raise argparse.ArgumentTypeError(f"{item!r} is no output size: give N (a square) or WxH, at least 64 px")
        sizes.append(size)
    return sizes


def process_status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS", "VmSize")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak(device: torch.device) -> int:
    """Reset the peak counter; returns the baseline (bytes in use now)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return process_status()["VmRSS"]


def peak(device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return process_status()["VmHWM"]
