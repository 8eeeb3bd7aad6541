"""This pack next to the reference (nv-tlabs/PiD) in one process, on the same random weights.

    python -m pid_core bench --reference ../PiD [--sizes 2048,4096] [--compile off,on] [--runs 3]

--compile: off (eager), on (this pack's default compile), or a torch.compile mode for this pack
(reduce-overhead: CUDA graphs; the reference always compiles as its --compile does).

For each output size: one set of random weights in the released key layout (bf16, as the files hold
them; the 2K FLUX.1 student up to 2048 px, the v1.5 2K-to-4K one above, or --keys / --narrow), a random
latent and text embedding. This pack loads them as it loads a file (bf16 weights, compute per
precision.py) and decodes through plan_decode + run_plan (tiling auto within the device's free memory,
as the command line does). The reference's network is imported from the checkout at run time and built
as its inference builds it: its PidNet from the experiment's network arguments, the weights in fp32 on
the device, its 4-step student loop (t list, float64 x0, fresh noise) under bf16 autocast on CUDA.
Both draw the noise from the same seed on the device, so their images should agree to bf16 rounding.

Per size and mode (eager; compiled: this pack's decode(compile=True), the reference's
torch.compile(net) as its --compile does): the first call (compiling, when compiled), then the
median of --runs timed decodes; peak memory and working memory (peak minus what was allocated before
the decode: both networks' weights are loaded throughout), the time ratio (this pack / reference) and
the PSNR of the two images. Inductor's on-disk cache is off, so a first compile is a cold one.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import statistics
import sys
import time
import types

import torch

from ..errors import ArgumentError
from .measuring import model_config, peak, reset_peak, shared_keys

REFERENCE_NETWORK = os.path.join("pid", "_src", "networks", "pid_net.py")
KEYS_2K = "PiD_res2k_sr4x_official_flux_distill_4step.txt"
KEYS_4K = "PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step.txt"
STUDENT_T_LIST = (0.999, 0.866, 0.634, 0.342, 0.0)  # the reference's student_t_list (its configs)
TIMESCALE = 1000.0  # its flow-matching trainer's timescale: the network takes t * 1000


def import_reference_network(root: str):
    """The reference's PidNet class, imported from a checkout at `root`. Its network module imports two
    helpers whose own imports the network never uses at inference: a logger built on loguru and the
    distributed utilities (pynvml) behind context parallelism. When those packages are missing, the two
    helper modules are replaced by stand-ins (log: Python's logging; distributed: empty); nothing else
    is touched and nothing of the reference is copied."""
    if not os.path.isfile(os.path.join(root, REFERENCE_NETWORK)):
        raise ArgumentError(f"--reference {root}: no {REFERENCE_NETWORK} there. Give a checkout of nv-tlabs/PiD.")
    root = os.path.abspath(root)
    loaded = sys.modules.get("pid")
    if loaded is not None and not os.path.abspath(getattr(loaded, "__file__", "") or "").startswith(root):
        raise ArgumentError(f"another package named 'pid' is already imported ({loaded.__file__}); run the "
                            "reference benchmark in a fresh process.")
    if root not in sys.path:
        sys.path.insert(0, root)
    for name, stand_in in (("pid._ext.imaginaire.utils.log", _log_stand_in),
                           ("pid._ext.imaginaire.utils.distributed", _empty_stand_in)):
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = stand_in(name)
    return importlib.import_module("pid._src.networks.pid_net").PidNet


def _log_stand_in(name: str):
    module = types.ModuleType(name)
    logger = logging.getLogger("pid_reference")
    for level in ("debug", "info", "warning", "error", "critical"):
        setattr(module, level, getattr(logger, level))
    return module


def _empty_stand_in(name: str):
    return types.ModuleType(name)


def reference_arguments(cfg) -> dict:
    """The reference's PidNet arguments for a network of this shape (its experiments' network configs:
    a v1 student, or v1.5 with replicate padding, per-token gates, the pixel gate and the aux head)."""
    v15 = cfg.layout == "v1.5"
    return dict(
        in_channels=3, num_groups=cfg.num_heads, hidden_size=cfg.hidden_size, pixel_hidden_size=cfg.pixel_hidden_size,
        pixel_attn_hidden_size=cfg.pixel_attn_hidden_size, pixel_num_groups=cfg.pixel_num_heads,
        patch_depth=cfg.patch_depth, pixel_depth=cfg.pixel_depth, patch_size=cfg.patch_size,
        txt_embed_dim=cfg.text_dim, txt_max_length=cfg.text_max_tokens, use_text_rope=True, text_rope_theta=10000.0,
        rope_mode="ntk_aware", rope_ref_h=cfg.rope_ref_px, rope_ref_w=cfg.rope_ref_px, repa_encoder_index=6,
        lq_inject_mode="controlnet", lq_in_channels=0, lq_latent_channels=cfg.latent_channels,
        lq_hidden_dim=cfg.adapter_hidden, lq_num_res_blocks=cfg.adapter_res_blocks,
        lq_latent_unpatchify_factor=cfg.latent_unpatchify, lq_aux_rgb_head=cfg.has_aux_rgb_head,
        lq_conv_padding_mode=cfg.conv_padding,
        lq_gate_type="sigma_aware_per_token" if v15 else "sigma_aware_per_token_per_dim",
        lq_interval=cfg.lq_interval, zero_init_lq=True, train_lq_proj_only=v15, sr_scale=cfg.sr_scale,
        latent_spatial_down_factor=cfg.latent_down_factor, pit_lq_inject=cfg.pixel_gate,
    )


def build_reference(network_class, cfg, state_dict: dict, device) -> torch.nn.Module:
    """The reference network with these weights in fp32 on the device, in eval mode (its inference:
    fp32 parameters, autocast at run time). Its load is lenient; every key is checked here."""
    net = network_class(**reference_arguments(cfg))
    missing, unexpected = net.load_state_dict({k: v.float() for k, v in state_dict.items()}, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"the reference network does not take these weights: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return net.to(device).eval().requires_grad_(False)


def reference_decode(net, latent, text, sigma, size, *, seed: int = 0) -> torch.Tensor:
    """The reference's student decode: its generate_samples_from_batch + _student_sample_loop, for 4
    steps with its t list; noise and re-noise from one generator on the device; bf16 autocast on CUDA
    (its loop autocasts 'cuda': nothing on the CPU). Returns the image in [-1, 1]."""
    device = latent.device
    B = latent.shape[0]
    H, W = size
    generator = torch.Generator(device=device).manual_seed(int(seed))
    x = torch.randn(B, 3, H, W, device=device, generator=generator)
    t_list = torch.tensor(STUDENT_T_LIST, device=device, dtype=torch.float32)
    lq = latent.to(torch.bfloat16).float()  # it hands the latent over as bf16, then casts to its fp32 tensors
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        for t_cur, t_next in zip(t_list[:-1], t_list[1:]):
            t_batch = t_cur.expand(B)
            v = net(x, t_batch * TIMESCALE, text, lq_video_or_image=None, lq_latent=lq, degrade_sigma=sigma)
            shape = [B] + [1] * (x.ndim - 1)
            x0 = (x.double() - t_batch.double().view(*shape) * v.double()).to(x.dtype)
            if t_next.item() > 0:
                eps = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
                t_bcast = t_next.reshape(1).expand(shape)
                x = (1.0 - t_bcast) * x0 + t_bcast * eps
            else:
                x = x0
    return x.clamp(-1, 1)


def _config(args, side: int):
    if args.narrow:
        return model_config(dict(narrow=True, layout=args.layout, latent_channels=args.latent_channels))
    keys = args.keys or shared_keys(KEYS_2K if side <= 2048 else KEYS_4K)
    if keys:
        return model_config(dict(keys=keys))
    return model_config(dict(layout="v1" if side <= 2048 else "v1.5", latent_channels=16))


class _Memory:
    """Peak and working memory of one decode: CUDA's allocator counters, or the process's peak RSS."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.base = reset_peak(self.device)
        return self

    def __exit__(self, *exc):
        self.peak = peak(self.device)
        self.working = self.peak - self.base
        return False


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def measure(args) -> list[dict]:
    """Every size and mode of the comparison; prints a row each and returns them."""
    torch._inductor.config.fx_graph_cache = False  # a first compile is a cold one
    device = torch.device(args.device.split(",")[0])
    network_class = import_reference_network(args.reference)
    from ..compile import MODES

    modes = [m for m in args.compile.split(",") if m]
    unknown = [m for m in modes if m not in ("off", "on", *MODES)]
    if unknown:
        raise ArgumentError(f"--compile takes off, on or a torch.compile mode ({', '.join(MODES)}), not {unknown[0]}.")
    runs = max(1, args.runs)
    print(f"# reference: {os.path.abspath(args.reference)}; device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}; median of {runs} "
          "after the first call", flush=True)
    print(HEADER, flush=True)
    rows = []
    for size in args.sizes:
        rows += _compare(args, network_class, size, modes, runs, device)
    return rows


def _compare(args, network_class, size, modes, runs, device) -> list[dict]:
    """Both decoders at one size, in each mode: one row per mode."""
    from ..checkpoint import build_model
    from ..decode import run_plan
    from ..plan import plan_decode
    from ..precision import psnr
    from ..tiling import TileOptions, device_memory_budget
    from .random_checkpoints import config_shapes, random_state_dict

    H, W = size
    cfg = _config(args, max(H, W))
    sd = random_state_dict(config_shapes(cfg), seed=0, dtype=torch.bfloat16)
    ours = build_model({k: v.to(device) for k, v in sd.items()}, cfg)
    reference = build_reference(network_class, cfg, sd, device)
    del sd
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, cfg.latent_channels, H // cfg.scale, W // cfg.scale, generator=g).to(device)
    text = torch.randn(1, cfg.text_max_tokens, cfg.text_dim, generator=g).to(device)
    sigma = torch.zeros(1, device=device)
    plan = plan_decode(ours, latent, text, latent_format="pid", sigma=0.0, device=device,
                       tiling=TileOptions(memory_budget_bytes=device_memory_budget(device)))
    rows = []
    for mode in modes:
        compiled = mode != "off"
        option = True if mode == "on" else (mode if compiled else False)  # on, or one of compile.MODES
        net = torch.compile(reference, mode="default", dynamic=False) if compiled else reference

        def run_ours():
            return run_plan(ours, plan, seed=0, compile=option).mul_(2).sub_(1)

        def run_reference():
            return reference_decode(net, latent, text, sigma, (H, W), seed=0)

        row = dict(size=[H, W], mode="eager" if not compiled else ("compiled" if mode == "on" else mode),
                   layout=cfg.layout, plan=plan.tiles.reason)
        images = {}
        for name, fn in (("ours", run_ours), ("ref", run_reference)):
            first, images[name] = _timed(fn, device)  # compiles, when compiled
            with _Memory(device) as memory:  # the peak of a decode, not of its compile
                times = [_timed(fn, device)[0]]
            times += [_timed(fn, device)[0] for _ in range(runs - 1)]
            row.update({f"{name}_first": first, f"{name}_time": statistics.median(times),
                        f"{name}_peak": memory.peak, f"{name}_working": memory.working})
        row["ratio"] = row["ours_time"] / row["ref_time"]
        row["psnr"] = psnr(images["ours"], images["ref"])
        rows.append(row)
        print(format_row(row), flush=True)
        if args.json:
            import json

            with open(args.json, "a") as f:
                f.write(json.dumps(dict(row, kind="reference")) + "\n")
    print(f"# {W}x{H}, {cfg.layout} model: {plan.tiles.reason}", flush=True)
    return rows


HEADER = (f"{'output':>10} {'mode':<15} {'ours s':>8} {'ref s':>8} {'ratio':>6} {'1st ours':>9} {'1st ref':>8} "
          f"{'peak GiB':>15} {'working GiB':>15} {'PSNR dB':>8}")


def format_row(row: dict) -> str:
    H, W = row["size"]
    gib = 2**30
    return (f"{f'{W}x{H}':>10} {row['mode']:<15} {row['ours_time']:>8.3f} {row['ref_time']:>8.3f} "
            f"{row['ratio']:>5.3f}x {row['ours_first']:>8.2f}s {row['ref_first']:>7.2f}s "
            f"{row['ours_peak'] / gib:>6.2f} / {row['ref_peak'] / gib:<6.2f} "
            f"{row['ours_working'] / gib:>6.2f} / {row['ref_working'] / gib:<6.2f} {row['psnr']:>8.1f}")
