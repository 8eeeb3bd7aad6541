"""Check the engine against reference case folders (formats: shared/fixtures/reference/README.md for the
students, shared/fixtures/teacher/README.md for the undistilled checkpoints).

    python -m pid_core conformance DIR [DIR ...] [--bf16]

For each case: load the checkpoint strictly, then compare in fp32 every output the case holds with the
case's tolerance. Student cases ("mode" absent or "student"): one forward and the 4-step sampler.
Teacher cases ("mode": "teacher"): the guided DPM-Solver++ run, raw and clamped, the times of its
network calls, with the two text branches both as one batched forward and as two forwards (the engine
picks either by memory). `--bf16` also runs the sampler with bf16 weights under autocast and reports its
PSNR against the fp32 result. A case that compares nothing, or names an unknown mode, fails. Ends with
`N passed, M failed` and exits non-zero on any failure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import replace

import torch

from ..checkpoint import load_pid
from ..errors import PidError
from ..plan import plan_decode
from ..precision import compute_context, psnr
from ..sampling import sample, student_schedule
from ..teacher import dpm_solver_pp
from ..tiling import TileOptions
from ..velocity import network_denoiser

# Names in case.json that must agree with what the loader read from the tensors.
CHECKED_FIELDS = (
    "hidden_size", "num_heads", "patch_depth", "pixel_depth", "pixel_hidden_size", "pixel_attn_hidden_size",
    "pixel_num_heads", "patch_size", "text_dim", "text_max_tokens", "adapter_hidden", "adapter_res_blocks",
    "lq_interval", "latent_channels", "rope_ref_px", "gate", "conv_padding", "pixel_gate", "has_aux_rgb_head",
)
MODES = ("student", "teacher")
BF16_MIN_PSNR = 40.0
# The network's time input is t * 1000 in float32; the case lists it per call.
NETWORK_TIME_TOLERANCE = 1e-3


class CaseError(ValueError):
    """A case folder this checker cannot use (unknown mode, missing tensors or tolerances)."""


def load_case(folder: str):
    with open(os.path.join(folder, "case.json")) as f:
        case = json.load(f)
    from safetensors.torch import load_file

    io = load_file(os.path.join(folder, "io.safetensors"))
    return case, io


def run_case(folder: str, *, bf16: bool = False, log=print) -> bool:
    case, io = load_case(folder)
    mode = case.get("mode", "student")
    if mode not in MODES:
        raise CaseError(f"unknown mode {mode!r} in case.json (this checker knows {', '.join(MODES)})")
    cfg = case["config"]
    overrides = {k: cfg[k] for k in ("latent_down_factor", "sr_scale", "latent_unpatchify") if k in cfg}
    model = load_pid(os.path.join(folder, case["checkpoint"]), dtype=torch.float32, **overrides)
    mismatched = [f"{k}: case {cfg[k]!r} vs detected {getattr(model.config, k)!r}"
                  for k in CHECKED_FIELDS if k in cfg and getattr(model.config, k) != cfg[k]]
    if mismatched:
        log(f"  detected config differs: {'; '.join(mismatched)}")
        return False
    checks = _Checks(case.get("tolerance", {}), log)
    with torch.no_grad():
        if "forward.out" in io:
            out = model(io["forward.x"], io["forward.t"], io["text"], io["lq_latent"], io["degrade_sigma"])
            checks.max_abs("forward", out, io["forward.out"], "forward_max_abs")
        if mode == "student":
            _student(model, case, io, checks, bf16)
        else:
            _teacher(model, case, io, checks, bf16)
    if checks.compared == 0:
        log(f"  nothing compared: the case holds no output this checker can compare for mode {mode!r} "
            "(forward.out, or the sampler's sample.* tensors)")
        return False
    return checks.ok


class _Checks:
    """Comparisons against the case's tolerances; counts them and remembers any failure."""

    def __init__(self, tolerance: dict, log):
        self.tolerance, self.log = tolerance, log
        self.ok, self.compared = True, 0

    def _limit(self, key: str) -> float:
        if key not in self.tolerance:
            raise CaseError(f"case.json has no tolerance {key!r}")
        return float(self.tolerance[key])

    def _record(self, label: str, err: float, limit: float, what: str, note: str = ""):
        self.compared += 1
        self.ok &= err <= limit
        self.log(f"  {label:<8} {what} {err:.3e}  (tolerance {limit:.0e}{note})")

    def max_abs(self, label, got, want, key, note=""):
        self._record(label, (got - want).abs().max().item(), self._limit(key), "max|diff|", note)

    def relative(self, label, got, want, key, note=""):
        err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
        self._record(label, err, self._limit(key), "max|diff|/max|ref|", note)

    def minimum(self, label, value, limit, what):
        self.compared += 1
        self.ok &= value >= limit
        self.log(f"  {label:<8} {what} {value:.1f} dB  (minimum {limit:.0f} dB)")


def _student(model, case, io, checks: _Checks, bf16: bool):
    steps = int(case.get("sampler_steps", 0))
    if not steps or "sample.out" not in io:
        return
    text, latent, sigma = io["text"], io["lq_latent"], io["degrade_sigma"]
    renoise = [io[f"sample.eps{i}"] for i in range(1, steps)]
    times = student_schedule(steps)
    velocity = lambda x, t: model(x, t, text, latent, sigma)  # noqa: E731
    result = sample(velocity, io["sample.noise"], times, renoise=renoise)
    checks.max_abs("sample", result, io["sample.out"], "sample_max_abs", f", {steps} steps")
    if bf16:
        model16 = model.to(torch.bfloat16)

        def velocity_bf16(x, t):  # the GPU's bf16 autocast semantics, on whatever device runs this
            with compute_context(x.device, torch.bfloat16):
                return model16(x, t, text, latent, sigma)

        checks.minimum("bf16", psnr(sample(velocity_bf16, io["sample.noise"], times, renoise=renoise), result),
                       BF16_MIN_PSNR, "PSNR vs fp32")


def _teacher(model, case, io, checks: _Checks, bf16: bool):
    """The guided DPM-Solver++ run of a teacher case through the engine's own path (plan_decode and
    network_denoiser on the whole canvas, the reference's order of operations: no pixel-block chunking)."""
    if "sample.noise" not in io or not ({"sample.raw", "sample.out"} & set(io)):
        return
    settings = case.get("sampler") or {}
    missing = [k for k in ("steps", "cfg_scale", "shift") if k not in settings]
    if missing:
        raise CaseError(f"case.json 'sampler' lacks {', '.join(missing)}")
    steps, cfg, shift = int(settings["steps"]), float(settings["cfg_scale"]), float(settings["shift"])
    noise = io["sample.noise"]
    guided = cfg != 1.0
    if guided and "null_text" not in io:
        raise CaseError("a guided teacher case (cfg_scale != 1) needs the null_text tensor")
    with _quiet(logging.getLogger("pid_core")):  # the case's checkpoint name does not say undistilled
        plan = plan_decode(model, io["lq_latent"], io["text"], latent_format="pid", sigma=io["degrade_sigma"],
                           tiling=TileOptions(mode="off", pixel_chunk_tokens=None), sampler="teacher", steps=steps,
                           cfg=cfg, shift=shift, negative=io["null_text"] if guided else None)
    # the case holds the network's exact input: keep it as it is (a decode rounds a latent to bf16 first)
    plan = replace(plan, latent=io["lq_latent"])
    note = f", {steps} steps, cfg {cfg:g}, shift {shift:.3g}"

    def run(net, plan, seen=None):
        denoiser = network_denoiser(net, plan)
        if seen is not None:
            def denoise(x, t):
                seen.append(float(t[0]) * 1000)
                return denoiser(x, t)
        return dpm_solver_pp(denoiser if seen is None else denoise, noise, plan.sampler.times, clamp=False)

    seen: list[float] = []
    # The reference runs the branches as two calls; the engine batches them when memory allows.
    for label, branches in ([("two calls", 1), ("batched", 2)] if guided else [("", 1)]):
        raw = run(model, replace(plan, tiles=replace(plan.tiles, branches=branches)), seen if not seen else None)
        where = f"{note}; {label}" if label else note
        if "sample.raw" in io:
            checks.relative("raw", raw, io["sample.raw"], "raw_max_abs_relative_to_absmax", where)
        if "sample.out" in io:
            checks.max_abs("out", raw.clamp(-1, 1), io["sample.out"], "sample_max_abs", where)
    if "network_times" in case:
        _check_times(checks, case["network_times"], seen, 2 if guided else 1)
    if bf16:
        reference = run(model, plan).clamp(-1, 1)
        # the GPU's bf16 autocast semantics, on whatever device runs this
        result16 = run(model.to(torch.bfloat16), replace(plan, compute_dtype=torch.bfloat16)).clamp(-1, 1)
        checks.minimum("bf16", psnr(result16, reference), BF16_MIN_PSNR, "PSNR vs fp32")


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """The logger's warnings held back while the block runs."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_times(checks: _Checks, network_times, seen: list[float], calls_per_step: int):
    """Every network call's time input (t * 1000), in call order, against the case's list."""
    expected = [list(entry) if isinstance(entry, (list, tuple)) else [entry] for entry in network_times]
    ours = [[t] for t in seen for _ in range(calls_per_step)]
    if len(ours) != len(expected):
        checks.ok = False
        checks.compared += 1
        checks.log(f"  times    {len(ours)} network calls, the case has {len(expected)}")
        return
    err = max(abs(t[0] - value) for t, entry in zip(ours, expected) for value in entry)
    checks._record("times", err, NETWORK_TIME_TOLERANCE, "max|diff| of t*1000", f", {len(ours)} calls")


def add_parser(sub) -> None:
    c = sub.add_parser("conformance", help="check the engine against reference case folders",
                       description=__doc__.split("\n\n")[0])
    c.add_argument("cases", nargs="+", help="case folders (each with case.json, io.safetensors, checkpoint)")
    c.add_argument("--bf16", action="store_true", help="also check the bf16 path against fp32 (PSNR)")
    c.set_defaults(func=cmd_conformance)


def cmd_conformance(args) -> int:
    torch.manual_seed(0)
    passed = failed = 0
    for folder in args.cases:
        name = os.path.basename(os.path.normpath(folder))
        print(f"{name}:")
        try:
            ok = run_case(folder, bf16=args.bf16)
        except (PidError, OSError, KeyError, ValueError) as exc:
            print(f"  error: {exc}")
            ok = False
        print(f"  {'PASS' if ok else 'FAIL'}")
        passed += ok
        failed += not ok
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0
