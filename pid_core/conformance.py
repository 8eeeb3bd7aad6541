"""Check the engine against reference case folders (format: shared/fixtures/reference/README.md).

    python -m pid_core.conformance DIR [DIR ...] [--bf16]

For each case: load the checkpoint strictly, run one forward and the sampler on the given tensors in
fp32, print the max errors against the case's tolerances; `--bf16` also runs the sampler with bf16
weights under autocast and reports its PSNR against the fp32 sample. Ends with `N passed, M failed`
and exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .checkpoint import load_pid
from .errors import PidError
from .precision import compute_context, psnr
from .sampling import sample

# Names in case.json that must agree with what the loader read from the tensors.
CHECKED_FIELDS = (
    "hidden_size", "num_heads", "patch_depth", "pixel_depth", "pixel_hidden_size", "pixel_attn_hidden_size",
    "pixel_num_heads", "patch_size", "text_dim", "text_max_tokens", "adapter_hidden", "adapter_res_blocks",
    "lq_interval", "latent_channels", "rope_ref_px", "gate", "conv_padding", "pixel_gate", "has_aux_rgb_head",
)
BF16_MIN_PSNR = 40.0


def load_case(folder: str):
    with open(os.path.join(folder, "case.json")) as f:
        case = json.load(f)
    from safetensors.torch import load_file

    io = load_file(os.path.join(folder, "io.safetensors"))
    return case, io


def run_case(folder: str, *, bf16: bool = False, log=print) -> bool:
    case, io = load_case(folder)
    cfg = case["config"]
    overrides = {k: cfg[k] for k in ("latent_down_factor", "sr_scale", "latent_unpatchify") if k in cfg}
    model = load_pid(os.path.join(folder, case["checkpoint"]), dtype=torch.float32, **overrides)
    mismatched = [f"{k}: case {cfg[k]!r} vs detected {getattr(model.config, k)!r}"
                  for k in CHECKED_FIELDS if k in cfg and getattr(model.config, k) != cfg[k]]
    if mismatched:
        log(f"  detected config differs: {'; '.join(mismatched)}")
        return False

    text, latent, sigma = io["text"], io["lq_latent"], io["degrade_sigma"]
    tol = case["tolerance"]
    ok = True
    with torch.no_grad():
        if "forward.out" in io:
            out = model(io["forward.x"], io["forward.t"], text, latent, sigma)
            err = (out - io["forward.out"]).abs().max().item()
            ok &= err <= tol["forward_max_abs"]
            log(f"  forward  max|diff| {err:.3e}  (tolerance {tol['forward_max_abs']:.0e})")
        steps = int(case.get("sampler_steps", 0))
        if steps and "sample.out" in io:
            renoise = [io[f"sample.eps{i}"] for i in range(1, steps)]
            velocity = lambda x, t: model(x, t, text, latent, sigma)  # noqa: E731
            result = sample(velocity, io["sample.noise"], steps=steps, renoise=renoise)
            err = (result - io["sample.out"]).abs().max().item()
            ok &= err <= tol["sample_max_abs"]
            log(f"  sample   max|diff| {err:.3e}  (tolerance {tol['sample_max_abs']:.0e}, {steps} steps)")
            if bf16:
                model = model.to(torch.bfloat16)

                def velocity_bf16(x, t):  # the GPU's bf16 autocast semantics, on whatever device runs this
                    with compute_context(model, x.device, dtype=torch.bfloat16):
                        return model(x, t, text, latent, sigma)

                result16 = sample(velocity_bf16, io["sample.noise"], steps=steps, renoise=renoise)
                db = psnr(result16, result)
                ok &= db >= BF16_MIN_PSNR
                log(f"  bf16     PSNR vs fp32 {db:.1f} dB  (minimum {BF16_MIN_PSNR:.0f} dB)")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pid_core.conformance", description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", help="case folders (each with case.json, io.safetensors, checkpoint)")
    parser.add_argument("--bf16", action="store_true", help="also check the bf16 path against fp32 (PSNR)")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
