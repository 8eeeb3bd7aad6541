"""SHA-256 digests of what every way into a decode returns, for decodes of every kind, so a change of
the code's shape can prove that it changed no output bit.

    python tests/output_digests.py            prints {"fingerprint": ..., "digests": {case: sha256}} as JSON

Run in one CPU thread (the test sets OMP_NUM_THREADS=1): CPU kernels round differently with other thread
counts and instruction sets, so digests only compare on the same torch, CPU capability and thread count
(the fingerprint). tests/test_outputs_unchanged.py compares them with the digests recorded in
tests/output_digests.json before a refactor.

The cases: the shared reference cases decoded through decode() (latent format "pid"); student decodes
untiled and tiled, batched with one text for all and with per-image sigmas; a stock leftover latent; an
SDXL latent in the Euler frame; a FLUX.2 v1.5 latent (un-packed in the adapter); teacher decodes with
guidance, untiled and tiled; the command line's decode (PNG bytes) and decode-many (PNG bytes).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import sys
import tempfile

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pid_core.commands import main as command  # noqa: E402
from pid_core.commands.random_checkpoints import make_random_checkpoint  # noqa: E402
from pid_core.checkpoint import load_pid  # noqa: E402
from pid_core.decode import decode  # noqa: E402
from pid_core.tiling import TileOptions  # noqa: E402

SHARED = pathlib.Path(os.environ.get("PID_SHARED", ROOT.parent / "shared"))


def fingerprint() -> dict:
    return {"torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads()}


def digest(value) -> str:
    data = value.detach().cpu().contiguous().numpy().tobytes() if isinstance(value, torch.Tensor) else value
    return hashlib.sha256(data).hexdigest()


def _inputs(model, batch: int, hw: tuple[int, int], seed: int, channels: int | None = None):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    latent = torch.randn(batch, channels or cfg.latent_channels, *hw, generator=g)
    text = torch.randn(1, cfg.text_max_tokens, cfg.text_dim, generator=g)
    return latent, text


def _model(folder: str, name: str, **kwargs):
    path = os.path.join(folder, name)
    make_random_checkpoint(path, **kwargs)
    return load_pid(path), path


def engine_cases(folder: str) -> dict:
    out = {}
    for case in sorted((SHARED / "fixtures" / "reference").glob("*/case.json")):
        from safetensors.torch import load_file

        spec = json.loads(case.read_text())
        io = load_file(case.parent / "io.safetensors")
        overrides = {k: spec["config"][k] for k in ("latent_down_factor", "sr_scale", "latent_unpatchify")
                     if k in spec["config"]}
        model = load_pid(str(case.parent / spec["checkpoint"]), **overrides)
        out[f"shared {case.parent.name}"] = decode(model, io["lq_latent"], text=io["text"], latent_format="pid",
                                                   sigma=io["degrade_sigma"], seed=3)

    student, _ = _model(folder, "pid_flux1_512_to_2048_4step_bf16.safetensors", layout="v1", latent_channels=16,
                        seed=1)
    latent, text = _inputs(student, 2, (6, 5), 10)
    sigmas = torch.tensor([0.0, 0.4])
    out["student untiled, batch 2, one text"] = decode(student, latent, text=text, sigma=sigmas, seed=5)
    out["student 2 steps"] = decode(student, latent[:1], text=text, sigma=0.2, seed=6, steps=2)
    out["student leftover latent"] = decode(student, latent, text=text.expand(2, -1, -1), sigma=0.3,
                                            leftover_noise=True, seed=7)
    tiles = TileOptions(mode="manual", tile_px=128, overlap_px=32, max_batch_tiles=2)
    big, _ = _inputs(student, 2, (7, 9), 11)
    out["student tiled"] = decode(student, big, text=text, sigma=sigmas, seed=8, tiling=tiles)
    out["student tiled, canvas on the CPU"] = decode(
        student, big[:1], text=text, sigma=0.5, seed=8,
        tiling=TileOptions(mode="manual", tile_px=128, overlap_px=32, canvas_on_device=False))
    out["student auto tiling"] = decode(student, big[:1], text=text, sigma=0.1, seed=9, tiling=TileOptions())

    sdxl, _ = _model(folder, "pid_sdxl_1024_to_4096_4step_bf16.safetensors", layout="v1", latent_channels=4, seed=2)
    latent, text4 = _inputs(sdxl, 1, (5, 6), 12)
    out["sdxl euler sigma"] = decode(sdxl, latent, text=text4, sigma=3.5, seed=10)

    flux2, _ = _model(folder, "pid_flux2_1024_to_4096_4step_bf16.safetensors", layout="v1.5", latent_channels=128,
                      seed=3)
    latent, text2 = _inputs(flux2, 1, (3, 4), 13)
    out["flux2 v1.5 unpacked"] = decode(flux2, latent, text=text2, sigma=0.25, seed=11)

    teacher, _ = _model(folder, "PiD_v1pt5_res2kto4k_sr4x_official_flux_undistilled.safetensors", layout="v1.5",
                        latent_channels=16, seed=4)
    latent, textt = _inputs(teacher, 2, (4, 5), 14)
    negative = torch.randn(1, teacher.config.text_max_tokens, teacher.config.text_dim,
                           generator=torch.Generator().manual_seed(15))
    out["teacher cfg 5, 3 steps"] = decode(teacher, latent, text=textt, negative=negative, steps=3, cfg=5.0,
                                           sigma=0.2, seed=12)
    out["teacher cfg 1"] = decode(teacher, latent[:1], text=textt, steps=2, cfg=1.0, sigma=0.0, seed=13)
    out["teacher tiled"] = decode(teacher, latent, text=textt, negative=negative, steps=3, cfg=4.0, sigma=0.3,
                                  seed=14, tiling=TileOptions(mode="manual", tile_px=96, overlap_px=32))
    return out


def command_cases(folder: str) -> dict:
    from safetensors.torch import save_file

    out = {}
    ckpt = os.path.join(folder, "pid_flux1_512_to_2048_4step_bf16.safetensors")
    make_random_checkpoint(ckpt, layout="v1", latent_channels=16, seed=1)
    g = torch.Generator().manual_seed(20)
    save_file({"text_embedding": torch.randn(1, 300, 2304, generator=g)}, os.path.join(folder, "text.safetensors"))
    save_file({"latent": torch.randn(2, 16, 5, 6, generator=g), "pid_sigma": torch.tensor(0.3)},
              os.path.join(folder, "a.safetensors"))
    save_file({"latent": torch.randn(1, 16, 8, 4, generator=g)}, os.path.join(folder, "b.safetensors"))
    common = ["--checkpoint", ckpt, "--text-embedding", os.path.join(folder, "text.safetensors"), "--device", "cpu"]
    for name, extra in (("decode", []), ("decode tiled", ["--tile", "96", "--overlap", "32"])):
        target = os.path.join(folder, name.replace(" ", "_"), "out.png")
        assert command(["decode", *common, "--latent", os.path.join(folder, "a.safetensors"), "--seed", "4",
                        "--out", target, *extra]) == 0
        for i in range(2):
            path = target.replace(".png", f"_{i:02d}.png")
            out[f"command {name} [{i}]"] = pathlib.Path(path).read_bytes()
    with open(os.path.join(folder, "items.jsonl"), "w") as f:
        f.write(json.dumps({"latent": "a.safetensors", "seed": 1, "sigma": [0.1, 0.6]}) + "\n")
        f.write(json.dumps({"latent": "b.safetensors", "seed": 2, "steps": 3, "tile": "64"}) + "\n")
    many = os.path.join(folder, "many")
    assert command(["decode-many", *common, "--manifest", os.path.join(folder, "items.jsonl"), "--out-dir", many]) == 0
    for name in sorted(os.listdir(many)):
        out[f"command decode-many {name}"] = pathlib.Path(many, name).read_bytes()
    return out


def digests() -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(sys.stderr):  # the commands' summaries
        with torch.no_grad():
            results = {**engine_cases(folder), **command_cases(folder)}
    return {"fingerprint": fingerprint(), "digests": {name: digest(v) for name, v in results.items()}}


if __name__ == "__main__":
    json.dump(digests(), sys.stdout, indent=1, sort_keys=True)
    print()
