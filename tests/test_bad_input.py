"""Bad input never yields a wrong image or a lost file (docs/DESIGN.md §13).

Every case, on the command line and in the Python API, ends in a one-line message that names the cause
(exit code 2 or a PidError, never a traceback), with nothing written and every file that was there
before byte-identical. Narrow random checkpoints keep each case fast.
"""

from __future__ import annotations

import errno
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pid_core.checkpoint
import pid_core.tiling
from pid_core.checkpoint import load_pid
from pid_core.commands import main
from pid_core.decode import decode, run_plan
from pid_core.errors import (
    ArgumentError,
    DecodeError,
    DeviceError,
    LatentError,
    PidError,
    TextEmbeddingError,
)
from pid_core.plan import plan_decode
from pid_core.commands.random_checkpoints import (
    config_shapes,
    make_random_checkpoint,
    narrow_config,
    random_state_dict,
    save_checkpoint,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT_DIM, TEXT_TOKENS = 64, 16
FLUX = "pid_flux1_512_to_2048_4step_bf16.safetensors"
SDXL = "pid_sdxl_1024_to_4096_4step_bf16.safetensors"
GOOD_IMAGE = b"\x89PNG a good image from an earlier run"


class _Code:  # pickled by torch.save: loading it would need code
    pass


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Checkpoints, latents and text embeddings, good and bad, in one read-only-by-convention folder."""
    root = tmp_path_factory.mktemp("inputs")
    files = {}

    def path(name):
        files[name] = str(root / name)
        return files[name]

    dims = dict(text_dim=TEXT_DIM, text_tokens=TEXT_TOKENS)
    make_random_checkpoint(path(FLUX), **dims)
    make_random_checkpoint(path(SDXL), latent_channels=4, **dims)
    sd = random_state_dict(config_shapes(narrow_config(**dims)))
    nan = dict(sd, **{"final_layer.linear.weight": sd["final_layer.linear.weight"].clone()})
    nan["final_layer.linear.weight"].view(-1)[3] = float("nan")
    save_checkpoint(nan, path("pid_flux1_512_to_2048_4step_nan.safetensors"))
    save_checkpoint({k: (v * 100).to(torch.int8) for k, v in sd.items()}, path("pid_flux1_512_to_2048_4step_int8.safetensors"))
    state = load_file(files[FLUX])
    for name in ("as_pth.pth", "as_bin.bin", "no_extension"):  # safetensors content under other names
        save_file(state, path(name))
    torch.save({"net." + k: v for k, v in state.items()}, path("pth_named.safetensors"))  # and the reverse

    save_file({"latent": torch.randn(1, 16, 3, 4)}, path("latent.safetensors"))
    save_file({"latent": torch.randn(1, 4, 3, 4)}, path("sdxl_latent.safetensors"))
    save_file({"latent": torch.randn(1, 16, 3, 4) * 1e30}, path("huge_latent.safetensors"))
    save_file({"latent": torch.randn(1, 16, 3, 4) * 1e3}, path("large_latent.safetensors"))
    save_file({"latent": torch.randn(1, 16, 2, 3, 4)}, path("two_frames.safetensors"))
    save_file({"latent": torch.randn(1, 16, 3, 4), "pid_sigma": torch.tensor(1.5)}, path("bad_sigma.safetensors"))
    save_file({"latent": torch.randn(1, 16, 512, 512)}, path("giant_latent.safetensors"))
    torch.save({"latent": torch.randn(1, 16, 3, 4), "note": _Code()}, path("pickled_latent.pt"))

    save_file({"text_embedding": torch.randn(1, TEXT_TOKENS, TEXT_DIM)}, path("text.safetensors"))
    # large for fp16 (up to 8e4, beyond its 65504) but inside what a Gemma hidden state may reach (text.MAX_TEXT_VALUE)
    save_file({"text_embedding": torch.randn(1, TEXT_TOKENS, TEXT_DIM).clamp(-4, 4) * 2e4}, path("large_text.safetensors"))
    for scale in ("1e20", "1e30"):  # PiD's text norm overflows: every token 0, the prompt ignored
        save_file({"text_embedding": torch.randn(1, TEXT_TOKENS, TEXT_DIM) * float(scale)},
                  path(f"text_{scale}.safetensors"))
    make_random_checkpoint(path("custom_text768.safetensors"), text_dim=768, text_tokens=TEXT_TOKENS)
    save_file({"text_embedding": torch.randn(1, TEXT_TOKENS, 2304)}, path("gemma_text.safetensors"))
    save_file({"latent": torch.randn(1, 16, 3, 4), "pid_sigma": torch.tensor(1.0)}, path("sigma1_latent.safetensors"))
    np.save(path("text.npy"), torch.randn(1, TEXT_TOKENS, TEXT_DIM).numpy())
    torch.save({"text_embedding": torch.randn(1, TEXT_TOKENS, TEXT_DIM), "note": _Code()}, path("pickled_text.pt"))
    os.makedirs(path("a_folder"))
    return files


@pytest.fixture
def out_dir(tmp_path):
    """An output folder holding a good image from an earlier run, which no failure may touch."""
    (tmp_path / "keep.png").write_bytes(GOOD_IMAGE)
    return tmp_path


def _snapshot(*folders):
    found = {}
    for folder in folders:
        for root, dirs, names in os.walk(folder):
            for name in names + dirs:
                p = os.path.join(root, name)
                found[p] = pathlib.Path(p).read_bytes() if os.path.isfile(p) else None
    return found


def decode_args(inputs, out, *extra, checkpoint=FLUX, latent="latent.safetensors", text="text.safetensors"):
    args = ["decode", "--checkpoint", inputs.get(checkpoint, checkpoint), "--latent", inputs.get(latent, latent),
            "--text-embedding", inputs.get(text, text), "--out", str(out), "--steps", "1"]
    return args + list(extra)


def refused(capsys, argv, *causes, before_loading=False, monkeypatch=None, touched=()):
    """Run the command line; it must fail with one line naming every cause, and change no file."""
    scratch = os.path.realpath(tempfile.gettempdir())  # the tests' own folders (never /proc and the like)
    folders = {os.path.dirname(os.path.realpath(a)) for a in argv if isinstance(a, str) and os.path.isabs(a)}
    folders = [f for f in folders if os.path.isdir(f) and f.startswith(scratch + os.sep)]
    before = _snapshot(*folders)
    if before_loading:  # refused before the checkpoint is read at all
        def no_loading(*a, **k):
            raise AssertionError("the checkpoint was loaded before the arguments were checked")

        monkeypatch.setattr(pid_core.checkpoint, "load_pid", no_loading)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(message) == 1 and "Traceback" not in err, err
    for cause in causes:
        assert cause.lower() in message[0].lower(), message[0]
    assert "weights_only=False" not in err and "weights_only` set to `False" not in err
    assert _snapshot(*folders) == before, "a file was written, changed or left behind"
    return message[0]


# ------------------------------------------------------------------------------------------------
# 1. silent wrong images

def test_nan_weight_is_refused_and_info_reports_it(inputs, out_dir, capsys):
    name = "pid_flux1_512_to_2048_4step_nan.safetensors"
    refused(capsys, decode_args(inputs, out_dir / "keep.png", checkpoint=name), "NaN or infinite weights", "damaged")
    refused(capsys, ["info", inputs[name]], "NaN or infinite weights")


def test_integer_weights_are_refused_also_by_info(inputs, out_dir, capsys):
    name = "pid_flux1_512_to_2048_4step_int8.safetensors"
    refused(capsys, decode_args(inputs, out_dir / "keep.png", checkpoint=name), "int8", "floating-point", "_bf16")
    refused(capsys, ["info", inputs[name]], "int8")


def test_a_huge_latent_is_refused(inputs, out_dir, capsys):
    refused(capsys, decode_args(inputs, out_dir / "keep.png", latent="huge_latent.safetensors"), "few units")
    refused(capsys, decode_args(inputs, out_dir / "keep.png", "--dtype", "fp16", latent="huge_latent.safetensors"),
            "few units")


@pytest.mark.parametrize("latent,text", [("large_latent.safetensors", "text.safetensors"),
                                         ("latent.safetensors", "large_text.safetensors")])
def test_fp16_weights_compute_in_fp32_on_the_cpu(inputs, out_dir, capsys, latent, text):
    """fp16 storage on the CPU computes each layer in fp32 (docs/DESIGN.md §4): large inputs do not
    overflow there, and the image written is finite, never black from a silent overflow."""
    out = out_dir / "fp16.png"
    assert main(decode_args(inputs, out, "--dtype", "fp16", latent=latent, text=text)) == 0
    assert out.is_file()


def _overflowing_checkpoint(inputs, tmp_path):
    """A finite checkpoint whose output layer overflows fp32 (a damaged file the value check cannot see)."""
    from pid_core.checkpoint import read_state_dict
    from pid_core.commands.random_checkpoints import save_checkpoint

    sd = read_state_dict(inputs[FLUX])
    sd["final_layer.linear.weight"] = sd["final_layer.linear.weight"].float() * 3e38
    return save_checkpoint({k: v.float() for k, v in sd.items()}, str(tmp_path / os.path.basename(inputs[FLUX])))


def test_a_non_finite_result_raises_in_the_api(inputs, tmp_path):
    model = load_pid(_overflowing_checkpoint(inputs, tmp_path))
    with pytest.raises(DecodeError, match="NaN or infinite values at step 1 of 1.*damaged"):
        decode(model, torch.randn(1, 16, 3, 4), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM), steps=1)


def test_fp16_overflow_is_named_where_the_network_computes_in_fp16(inputs):
    """On a GPU fp16 weights compute in fp16 (autocast): an overflow there names bf16 or fp32 as the fix."""
    from dataclasses import replace

    import pid_core.decode as decode_module

    model = load_pid(inputs[FLUX], dtype="fp16")
    plan = decode_module.plan_decode(model, torch.randn(1, 16, 3, 4), torch.randn(1, TEXT_TOKENS, TEXT_DIM))
    plan = replace(plan, compute_dtype=torch.float16)  # what the plan decides for fp16 weights on a GPU
    assert "float16" in decode_module.nonfinite_message(plan, 1, 4)
    assert "bf16 or fp32" in decode_module.nonfinite_message(plan, 1, 4)


def test_non_finite_explicit_noise_is_refused(inputs):
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    latent, text = torch.randn(1, 16, 3, 4), torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    with pytest.raises(ArgumentError, match="noise holds NaN or infinite"):
        decode(model, latent, text=text, steps=1, noise=torch.full((1, 3, 96, 128), float("nan")))
    with pytest.raises(ArgumentError, match=r"renoise\[0\] holds NaN"):
        decode(model, latent, text=text, steps=2, renoise=[torch.full((1, 3, 96, 128), float("inf"))])


@pytest.mark.parametrize("text", ["text_1e20.safetensors", "text_1e30.safetensors"])
def test_a_text_embedding_that_overflows_pid_text_norm_is_refused(inputs, out_dir, capsys, text):
    """Values no Gemma hidden state has (squared in PiD's text norm they overflow: every token 0, the
    prompt silently ignored) are refused by the command line, decode-many, the API, and as the negative
    text of a guided decode."""
    refused(capsys, decode_args(inputs, out_dir / "keep.png", text=text), "text embedding reaches", "Gemma-2-2b-it")
    many = ["decode-many", "--checkpoint", inputs[FLUX], "--latents", str(out_dir), "--text-embedding", inputs[text],
            "--out-dir", str(out_dir), "--steps", "1"]
    (out_dir / "a.safetensors").write_bytes(pathlib.Path(inputs["latent.safetensors"]).read_bytes())
    assert main(many) == 1
    assert "text embedding reaches" in capsys.readouterr().out
    assert sorted(os.listdir(out_dir)) == ["a.safetensors", "keep.png"]
    refused(capsys, decode_args(inputs, out_dir / "keep.png", "--sampler", "teacher", "--cfg", "3",
                                "--negative-embedding", inputs[text]), "negative text", "text embedding reaches")
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    latent, good = torch.randn(1, 16, 3, 4), torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    huge = load_file(inputs[text])["text_embedding"]
    with pytest.raises(TextEmbeddingError, match="text embedding reaches"):
        decode(model, latent, text=huge, steps=1)
    with pytest.raises(TextEmbeddingError, match="text embedding reaches"):
        plan_decode(model, latent, huge)
    with pytest.raises(TextEmbeddingError, match="The negative text: The text embedding reaches"):
        plan_decode(model, latent, good, sampler="teacher", steps=2, cfg=3.0, negative=huge)


def test_a_checkpoint_with_a_text_layer_no_release_has_is_named(inputs, out_dir, capsys):
    """A text layer of width 768 with a correct 2304-wide embedding: the message names the checkpoint and
    says it is no released PiD (768 is not Gemma-2-2b-it's width); with the format on auto, it says that first."""
    name = "custom_text768.safetensors"
    args = decode_args(inputs, out_dir / "keep.png", checkpoint=name, text="gemma_text.safetensors")
    message = refused(capsys, args + ["--latent-format", "flux"], "The text embedding has width 2304",
                      f"{name} is not a released PiD checkpoint", "768-wide text", "Gemma-2-2b-it's hidden states, 2304")
    assert "hidden states of width 768" not in message
    message = refused(capsys, args, "Set --latent-format to one of")
    assert message.startswith(f"error: {name} is not a released PiD checkpoint: its text layer takes 768-wide"), message


def test_a_leftover_latent_at_sigma_1_is_refused_everywhere(inputs, out_dir, capsys):
    """x_t / (1 - sigma) is undefined at sigma 1: --sigma 1 --leftover-noise, a file's pid_sigma 1, the API
    and a decode-many item are refused with that reason."""
    reason = "x_t / (1 - sigma), undefined at sigma 1"
    refused(capsys, decode_args(inputs, out_dir / "keep.png", "--sigma", "1.0", "--leftover-noise"), reason)
    refused(capsys, decode_args(inputs, out_dir / "keep.png", "--leftover-noise", latent="sigma1_latent.safetensors"),
            reason, "pid_sigma of the latent file sigma1_latent.safetensors")
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    with pytest.raises(PidError, match=r"x_t / \(1 - sigma\), undefined at sigma 1"):
        decode(model, torch.randn(2, 16, 3, 4), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM), sigma=[0.5, 1.0],
               leftover_noise=True, steps=1)
    manifest = out_dir / "items.jsonl"
    manifest.write_text('{"latent": "%s", "sigma": 1.0, "leftover_noise": true, "out": "x.png"}\n'
                        % inputs["latent.safetensors"])
    assert main(["decode-many", "--checkpoint", inputs[FLUX], "--manifest", str(manifest), "--text-embedding",
                 inputs["text.safetensors"], "--out-dir", str(out_dir), "--steps", "1"]) == 1
    assert reason in capsys.readouterr().out and not (out_dir / "x.png").exists()


def test_library_warnings_never_precede_the_error(inputs, tmp_path):
    """A raw pickle (protocol 4) and a torch.save with pickle protocol 4 (torch warns "Detected pickle
    protocol 4" while reading it): stderr is our one line; --verbose shows torch's warning as a debug line."""
    import pickle

    raw, zip4 = tmp_path / "raw.pth", tmp_path / "zip4.pth"
    state = load_file(inputs[FLUX])
    with open(raw, "wb") as f:
        pickle.dump(state, f, protocol=4)
    torch.save(state, zip4, pickle_protocol=4)
    for checkpoint in (raw, zip4):
        argv = decode_args(inputs, tmp_path / "x.png", checkpoint=str(checkpoint))
        result = subprocess.run([sys.executable, "-m", "pid_core", *argv], capture_output=True, text=True, cwd=REPO,
                                check=False)
        assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
    result = subprocess.run([sys.executable, "-m", "pid_core", *argv, "--verbose"], capture_output=True, text=True,
                            cwd=REPO, check=False)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: zip4.pth"), result.stderr
    assert any(line.startswith("debug: ") and "Detected pickle protocol 4" in line for line in lines), result.stderr
    assert not (tmp_path / "x.png").exists()


# ------------------------------------------------------------------------------------------------
# 2. SDXL sigma overflow

@pytest.mark.parametrize("sigma", ["1e30", "3.4e38", "1001"])
def test_absurd_sdxl_sigma_is_refused(inputs, out_dir, capsys, sigma):
    refused(capsys, decode_args(inputs, out_dir / "keep.png", "--latent-format", "sdxl", "--sigma", sigma,
                                checkpoint=SDXL, latent="sdxl_latent.safetensors"), "far beyond SDXL's noise schedule")


# ------------------------------------------------------------------------------------------------
# 3. lost files

def test_disk_full_leaves_the_old_file(inputs, out_dir, capsys, monkeypatch):
    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    refused(capsys, decode_args(inputs, out_dir / "keep.png"), "No space left", "unchanged")
    assert (out_dir / "keep.png").read_bytes() == GOOD_IMAGE


def test_file_size_limit_leaves_the_old_file(inputs, out_dir):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    result = subprocess.run([sys.executable, "-m", "pid_core", *decode_args(inputs, out_dir / "keep.png")],
                            capture_output=True, text=True, cwd=REPO, preexec_fn=limit, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "File too large" in result.stderr and "ulimit -f" in result.stderr
    assert (out_dir / "keep.png").read_bytes() == GOOD_IMAGE
    assert sorted(os.listdir(out_dir)) == ["keep.png"]


@pytest.mark.parametrize("which", ["--latent", "--checkpoint", "--text-embedding"])
def test_an_input_is_never_the_output(inputs, tmp_path, capsys, monkeypatch, which):
    # copies named .png, so that only the input check can refuse them (the content is still read by kind)
    copies = {}
    for option, name in (("--checkpoint", FLUX), ("--latent", "latent.safetensors"), ("--text-embedding", "text.safetensors")):
        copies[option] = tmp_path / f"{option.strip('-')}.png"
        copies[option].write_bytes(pathlib.Path(inputs[name]).read_bytes())
    argv = ["decode", "--checkpoint", str(copies["--checkpoint"]), "--latent", str(copies["--latent"]),
            "--text-embedding", str(copies["--text-embedding"]), "--out", str(copies[which])]
    refused(capsys, argv, "is the input", before_loading=True, monkeypatch=monkeypatch)


def test_a_batch_file_is_never_an_input(inputs, tmp_path, capsys, monkeypatch):
    latent = tmp_path / "x_01.png"
    latent.write_bytes(pathlib.Path(inputs["latent.safetensors"]).read_bytes())
    argv = decode_args(inputs, tmp_path / "x.png", latent=str(latent))
    refused(capsys, argv, "is the input", before_loading=True, monkeypatch=monkeypatch)


# ------------------------------------------------------------------------------------------------
# 4. tracebacks -> messages, before anything is loaded

@pytest.mark.parametrize("extra,cause", [
    (["--seed", str(2**64)], "seed must be a whole number from 0 to 18446744073709551615"),
    (["--seed", "-1"], "seed must be a whole number"),
    (["--device", "gpu0"], "Unknown device 'gpu0'"),
    (["--tile", "0"], "--tile takes off, auto or a tile size"),
    (["--tile", "big"], "--tile takes off, auto or a tile size"),
    (["--overlap", "-5"], "--overlap takes 0"),
    (["--tile", "1024", "--overlap", "600"], "at most half the tile"),
    (["--sigma", "nan"], "--sigma takes"),
    (["--sigma", "-0.5"], "--sigma takes"),
    (["--latent-format", "flux3"], "Unknown latent format 'flux3'"),
    (["--device", "cpu:1"], "the CPU takes no index"),
    (["--tile", "1000000000"], "--tile takes off, auto or a tile size from 64"),
    (["--overlap", "1000000000"], "--overlap takes 0"),
    (["--tile", "off", "--overlap", "32"], "--overlap 32 applies to tiles, but --tile is off"),
    (["--compile", "fastest"], "--compile takes no value or a torch.compile mode"),
])
def test_bad_options(inputs, out_dir, capsys, monkeypatch, extra, cause):
    refused(capsys, decode_args(inputs, out_dir / "keep.png", *extra), cause, before_loading=True,
            monkeypatch=monkeypatch)


@pytest.mark.parametrize("extra,cause", [
    (["--sigma", "abc"], "argument --sigma: invalid float value"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--prompt", ""], "--prompt needs --text-encoder"),
])
def test_usage_mistakes_are_one_line(inputs, out_dir, capsys, extra, cause):
    argv = decode_args(inputs, out_dir / "keep.png", *extra)
    if "--prompt" in extra:
        argv = [a for a in argv if a != "--text-embedding" and a != inputs["text.safetensors"]]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1 and cause in err, err


def test_a_batch_that_cannot_all_be_written_replaces_nothing(inputs, tmp_path, capsys):
    latent = tmp_path / "pair.safetensors"
    save_file({"latent": torch.randn(2, 16, 3, 4)}, str(latent))
    (tmp_path / "x_00.png").write_bytes(GOOD_IMAGE)
    (tmp_path / "x_01.png").mkdir()  # in the way of the second image
    assert main(decode_args(inputs, tmp_path / "x.png", latent=str(latent))) == 2
    assert "x_01.png" in capsys.readouterr().err
    assert (tmp_path / "x_00.png").read_bytes() == GOOD_IMAGE
    assert sorted(os.listdir(tmp_path)) == ["pair.safetensors", "x_00.png", "x_01.png"]  # no temporary left


def test_missing_devices_are_named(inputs, out_dir, capsys, monkeypatch):
    if not torch.cuda.is_available():
        refused(capsys, decode_args(inputs, out_dir / "keep.png", "--device", "cuda"), "'cuda' is not available",
                "--device cpu", before_loading=True, monkeypatch=monkeypatch)
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        message = refused(capsys, decode_args(inputs, out_dir / "keep.png", "--device", "mps"),
                          "'mps' is not available", before_loading=True, monkeypatch=monkeypatch)
        assert "corrupt" not in message and "download" not in message


@pytest.mark.parametrize("out,cause", [
    ("{dir}", "is a folder"),
    ("", "output path is empty"),
    ("{dir}/keep.png/x.png", "is a file, not a folder"),
    ("/proc/pid_test.png", "Cannot write to the folder"),
    ("{dir}/x.gif", "extension '.gif'"),
    ("{dir}/x", "no extension"),
])
def test_bad_outputs_are_refused_before_loading(inputs, out_dir, capsys, monkeypatch, out, cause):
    refused(capsys, decode_args(inputs, out.format(dir=out_dir)), cause, before_loading=True, monkeypatch=monkeypatch)


def test_a_read_only_output_is_not_replaced(inputs, out_dir, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if str(p).endswith("keep.png") else real_access(p, mode))
    refused(capsys, decode_args(inputs, out_dir / "keep.png"), "read-only", before_loading=True, monkeypatch=monkeypatch)


def test_out_of_memory_is_a_message(inputs, out_dir, capsys, monkeypatch):
    from pid_core.network import PidNet

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 68719476736 bytes.")

    monkeypatch.setattr(PidNet, "forward", no_memory)
    # --tile auto (the default) chose one pass: the fix is tiles of a size given by hand
    refused(capsys, decode_args(inputs, out_dir / "keep.png"), "Out of memory", "--tile 1024")
    monkeypatch.setattr(PidNet, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    with pytest.raises(DecodeError, match="Out of memory.*tiling"):
        decode(model, torch.randn(1, 16, 3, 4), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM), steps=1)


def test_api_arguments(inputs):
    with pytest.raises(ArgumentError, match="dtype must be"):
        load_pid(inputs[FLUX], dtype="float8")
    with pytest.raises(ArgumentError, match="checkpoint's path"):
        load_pid(None)
    with pytest.raises(DeviceError, match="gpu0"):
        load_pid(inputs[FLUX], device="gpu0")
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    latent, text = torch.randn(1, 16, 3, 4), torch.randn(1, TEXT_TOKENS, TEXT_DIM)
    with pytest.raises(ArgumentError, match="renoise takes 3 tensors for 4 steps"):
        decode(model, latent, text=text, renoise=[torch.randn(1, 3, 96, 128)])
    with pytest.raises(ArgumentError, match=r"renoise\[0\] has shape \(1, 3, 9, 12\)"):
        decode(model, latent, text=text, steps=2, renoise=[torch.randn(1, 3, 9, 12)])
    with pytest.raises(ArgumentError, match="noise has shape"):
        decode(model, latent, text=text, noise=torch.randn(1, 3, 8, 8))
    for steps in (2.7, "4", True):
        with pytest.raises(ArgumentError, match="steps must be a whole number from 0 to 4"):
            decode(model, latent, text=text, steps=steps)
    for steps in (5, -1):
        with pytest.raises(ArgumentError, match="runs 1 to 4 steps"):
            decode(model, latent, text=text, steps=steps)
    for seed in (1.5, -1, 2**64, "7"):
        with pytest.raises(ArgumentError, match="seed must be a whole number"):
            decode(model, latent, text=text, seed=seed)
    plan = plan_decode(model, latent, text)
    with pytest.raises(ArgumentError, match="seed must be a whole number"):
        run_plan(model, plan, seed=2.7)
    for sigma in ("0.3", True, -0.5, [-0.5]):  # a negative sigma is refused, never taken as "not given"
        with pytest.raises(PidError, match="sigma"):
            decode(model, latent, text=text, sigma=sigma, steps=1)
    for what, kwargs in [("latent", dict(latent=latent.to("meta"), text=text)),
                         ("text", dict(latent=latent, text=text.to("meta"))),
                         ("sigma", dict(latent=latent, text=text, sigma=torch.zeros(1, device="meta")))]:
        with pytest.raises(ArgumentError, match=f"The {what} is a meta tensor"):
            decode(model, steps=1, **kwargs)


# ------------------------------------------------------------------------------------------------
# 5. the real cause named

@pytest.mark.parametrize("name", ["as_pth.pth", "as_bin.bin", "no_extension", "pth_named.safetensors"])
def test_checkpoints_load_by_content(inputs, tmp_path, capsys, name):
    out = tmp_path / "ok.png"
    assert main(decode_args(inputs, out, "--latent-format", "flux", checkpoint=name)) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_pickled_latent_and_text_files_are_refused_safely(inputs, out_dir, capsys):
    refused(capsys, decode_args(inputs, out_dir / "keep.png", latent="pickled_latent.pt"), "pickled Python objects",
            "save_file")
    refused(capsys, decode_args(inputs, out_dir / "keep.png", text="pickled_text.pt"), "pickled Python objects",
            "save_file")


def test_numpy_text_embeddings_are_embeddings(inputs, tmp_path):
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    array = np.load(inputs["text.npy"])
    assert decode(model, torch.randn(1, 16, 3, 4), text=array, steps=1).shape == (1, 3, 96, 128)
    with pytest.raises(TextEmbeddingError, match="numpy array of <U5"):
        decode(model, torch.randn(1, 16, 3, 4), text=np.array(["a fox"]), steps=1)
    assert main(decode_args(inputs, tmp_path / "npy.png", text="text.npy")) == 0


def test_a_folder_is_named_a_folder(inputs, out_dir, capsys, monkeypatch):
    for option in ("checkpoint", "latent", "text"):
        refused(capsys, decode_args(inputs, out_dir / "keep.png", **{option: "a_folder"}), "is a folder",
                before_loading=True, monkeypatch=monkeypatch)


def test_frames_and_stored_sigmas_are_named(inputs, out_dir, capsys):
    refused(capsys, decode_args(inputs, out_dir / "keep.png", latent="two_frames.safetensors"), "2 frames",
            "single images")
    message = refused(capsys, decode_args(inputs, out_dir / "keep.png", latent="bad_sigma.safetensors"),
                      "outside [0, 1]", "pid_sigma of the latent file bad_sigma.safetensors")
    assert "Qwen-Image latent" not in message


# ------------------------------------------------------------------------------------------------
# 6. giant outputs fail fast

def test_a_giant_untiled_decode_is_refused_before_allocating(inputs, out_dir, capsys, monkeypatch):
    # [1, 16, 512, 512] -> 16384 x 16384 px: untiled, far more than 8 GiB
    monkeypatch.setattr(pid_core.tiling, "device_memory_budget", lambda device, **k: 8 << 30)
    refused(capsys, decode_args(inputs, out_dir / "keep.png", "--tile", "off", latent="giant_latent.safetensors"),
            "16384x16384", "GiB", "--tile auto")
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    with pytest.raises(DecodeError, match="16384x16384.*tiling"):
        decode(model, torch.randn(1, 16, 512, 512), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM), steps=1)


def test_an_auto_plan_that_runs_untiled_is_checked_against_free_memory_too(inputs, monkeypatch):
    """TileOptions() without a budget (the API's auto) can end untiled: what is free now decides, as for off."""
    from pid_core.tiling import TileOptions

    monkeypatch.setattr(pid_core.tiling, "device_memory_budget", lambda device, **k: 1 << 20)
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    with pytest.raises(DecodeError, match="256x256 px needs about .* GiB of working memory on cpu"):
        decode(model, torch.randn(1, 16, 8, 8), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM), steps=1,
               tiling=TileOptions())


def test_the_memory_check_counts_the_teachers_three_canvases(inputs, monkeypatch):
    """A teacher's state kept on the CPU is three canvases, as the tile plan counts: a CPU with room for two is
    refused."""
    from pid_core.decode import check_memory
    from pid_core.plan import plan_decode
    from pid_core.tiling import TileOptions
    from pid_core.tiling.memory import canvas_memory_estimate

    model = load_pid(inputs[FLUX], dtype=torch.float32)
    plan = plan_decode(model, torch.randn(1, 16, 8, 8), torch.randn(1, TEXT_TOKENS, TEXT_DIM), sampler="teacher",
                       cfg=1.0, tiling=TileOptions(mode="manual", tile_px=128, canvas_on_device=False))
    two, three = (canvas_memory_estimate(plan.output_hw, 1, n) for n in (2, 3))
    assert plan.tiles.state_bytes == three
    free = {"cpu": (two + three) // 2}
    monkeypatch.setattr(pid_core.tiling, "device_memory_budget", lambda device, **k: free.get(str(device)))
    with pytest.raises(DecodeError, match="sampler's state"):
        check_memory(plan)


def test_a_raw_flux2_latent_decodes_with_the_vae_statistics(tmp_path, capsys):
    """--latent-format flux2_raw needs the FLUX.2 VAE's BatchNorm statistics: --bn-stats reads them from the
    VAE file (only those tensors); without it the message says what is missing."""
    from safetensors.torch import save_file

    from pid_core.commands.random_checkpoints import make_random_checkpoint

    ckpt = str(tmp_path / "pid_flux2_512_to_2048_4step_bf16.safetensors")
    make_random_checkpoint(ckpt, layout="v1", latent_channels=128, text_dim=TEXT_DIM, text_tokens=TEXT_TOKENS)
    vae = tmp_path / "flux2-vae.safetensors"
    save_file({"bn.running_mean": torch.zeros(128), "bn.running_var": torch.ones(128),
               "decoder.conv_in.weight": torch.zeros(4, 32, 3, 3)}, str(vae))
    save_file({"latent": torch.randn(1, 32, 8, 8)}, str(tmp_path / "raw.safetensors"))
    save_file({"text_embedding": torch.randn(1, TEXT_TOKENS, TEXT_DIM)}, str(tmp_path / "text.safetensors"))
    argv = ["decode", "--checkpoint", ckpt, "--latent", str(tmp_path / "raw.safetensors"), "--latent-format",
            "flux2_raw", "--text-embedding", str(tmp_path / "text.safetensors"), "--steps", "1", "--out",
            str(tmp_path / "out.png")]
    assert main([*argv, "--bn-stats", str(vae)]) == 0 and (tmp_path / "out.png").exists()
    assert "[1, 128, 4, 4] in PiD space as flux2_raw" in capsys.readouterr().out
    (tmp_path / "out.png").unlink()
    assert main(argv) == 2
    assert "BatchNorm statistics" in capsys.readouterr().err and not (tmp_path / "out.png").exists()
    assert main([*argv, "--bn-stats", str(tmp_path / "text.safetensors")]) == 2
    assert "no FLUX.2 BatchNorm statistics" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# 7. minor

def test_other_extensions_get_their_own_format(inputs, tmp_path, capsys, monkeypatch):
    try:
        import PIL.Image
    except ImportError:
        PIL = None
    if PIL is not None:
        assert main(decode_args(inputs, tmp_path / "x.jpg")) == 0
        assert (tmp_path / "x.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
        assert main(decode_args(inputs, tmp_path / "x.webp")) == 0
        assert (tmp_path / "x.webp").read_bytes()[8:12] == b"WEBP"
    monkeypatch.setitem(sys.modules, "PIL", None)
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    refused(capsys, decode_args(inputs, tmp_path / "y.jpg"), "needs Pillow", "pip install pillow", ".png",
            before_loading=True, monkeypatch=monkeypatch)


def test_per_sample_sigmas_as_a_list(inputs):
    model = load_pid(inputs[FLUX], dtype=torch.float32)
    image = decode(model, torch.randn(2, 16, 3, 4), text=torch.randn(1, TEXT_TOKENS, TEXT_DIM), sigma=[0.1, 0.2],
                   steps=1)
    assert image.shape[0] == 2


def test_a_format_that_contradicts_the_checkpoint_warns(inputs, tmp_path, caplog):
    assert main(decode_args(inputs, tmp_path / "sd3.png", "--latent-format", "sd3")) == 0
    assert "The latent format 'sd3' (SD3) was given, but the checkpoint is flux-2k" in caplog.text


def test_every_error_is_a_pid_error():
    # the command line and the nodes turn exactly these into messages
    for error in (ArgumentError, DecodeError, DeviceError, LatentError, TextEmbeddingError):
        assert issubclass(error, PidError)
