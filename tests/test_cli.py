"""The command line: decode latent files of every backbone's shape to PNGs of the right size."""

import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pid_core.commands import main
from images_helper import read_png
from pid_core.commands.random_checkpoints import make_random_checkpoint

from test_decode import BACKBONES


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = {"root": root}
    for backbone, (name, layout, channels, shape) in BACKBONES.items():
        ckpt = root / backbone / name
        make_random_checkpoint(str(ckpt), layout=layout, latent_channels=channels, text_dim=2304, text_tokens=300)
        latent = root / f"{backbone}.safetensors"
        save_file({"latent": torch.randn(shape)}, str(latent))
        out[backbone] = (str(ckpt), str(latent), shape)
    emb = root / "text.safetensors"
    save_file({"text_embedding": torch.randn(1, 300, 2304)}, str(emb))
    out["text"] = str(emb)
    return out


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_decode_each_backbone_to_png(files, backbone, capsys):
    ckpt, latent, shape = files[backbone]
    out = files["root"] / f"{backbone}.png"
    code = main(["decode", "--checkpoint", ckpt, "--latent", latent, "--text-embedding", files["text"],
                 "--steps", "1", "--dtype", "fp32", "--out", str(out)])
    assert code == 0
    rgb = read_png(str(out))
    scale = 128 if backbone == "siglip" else (64 if backbone in ("flux2", "dinov2") else 32)
    assert rgb.shape == (shape[-2] * scale, shape[-1] * scale, 3)
    printed = capsys.readouterr()
    assert "peak memory" in printed.out and "decoding [" in printed.err


def test_early_stopped_latent_file_carries_its_sigma(files, tmp_path, capsys):
    ckpt, _, _ = files["flux"]
    latent = tmp_path / "stopped.safetensors"
    save_file({"latent": torch.randn(2, 16, 2, 3), "pid_sigma": torch.tensor([0.3, 0.5])}, str(latent))
    out = tmp_path / "stopped.png"
    assert main(["decode", "--checkpoint", ckpt, "--latent", str(latent), "--text-embedding", files["text"],
                 "--steps", "2", "--out", str(out)]) == 0
    assert "sigma 0.3, 0.5" in capsys.readouterr().out
    assert read_png(str(tmp_path / "stopped_00.png")).shape == (64, 96, 3)
    assert os.path.exists(tmp_path / "stopped_01.png")


def test_comfyui_latent_file(files, tmp_path):
    ckpt, _, _ = files["sdxl"]
    latent = tmp_path / "saved.latent"  # what ComfyUI's SaveLatent writes
    save_file({"latent_tensor": torch.randn(1, 4, 2, 2), "latent_format_version_0": torch.tensor([])}, str(latent))
    out = tmp_path / "x.png"
    assert main(["decode", "--checkpoint", ckpt, "--latent", str(latent), "--text-embedding", files["text"],
                 "--sigma", "0.5", "--steps", "1", "--out", str(out)]) == 0
    assert read_png(str(out)).shape == (64, 64, 3)


def test_errors_are_one_line_messages(files, tmp_path, capsys):
    ckpt, _, _ = files["flux"]
    _, sdxl_latent, _ = files["sdxl"]
    code = main(["decode", "--checkpoint", ckpt, "--latent", sdxl_latent, "--text-embedding", files["text"],
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "SDXL" in err and "Traceback" not in err
    t5 = tmp_path / "t5.safetensors"
    save_file({"text_embedding": torch.randn(1, 256, 4096)}, str(t5))
    code = main(["decode", "--checkpoint", ckpt, "--latent", files["flux"][1], "--text-embedding", str(t5),
                 "--out", str(tmp_path / "x.png")])
    assert code == 2 and "T5" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["decode", "decode-many"])
def test_seed_help_says_which_seeds_repeat(capsys, command):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 to 2^64-1" in text and "on the CPU, seeds that differ by a multiple of 2^32 repeat" in text, text


def test_info_names_the_variant(files, capsys):
    assert main(["info", files["flux2"][0]]) == 0
    out = capsys.readouterr().out
    assert "flux2-2kto4k-v1.5" in out and "un-packed to 32" in out


def test_download_fails_clearly_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["download", "flux-2k", "--dest", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 2 and "Download failed" in captured.err
    assert "non-commercial" in captured.out.lower()


def test_module_entry_point(files, tmp_path):
    ckpt, latent, _ = files["sd3"]
    out = tmp_path / "sub.png"
    result = subprocess.run(
        [sys.executable, "-m", "pid_core", "decode", "--checkpoint", ckpt, "--latent", latent,
         "--text-embedding", files["text"], "--steps", "1", "--out", str(out)],
        capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert read_png(str(out)).shape == (96, 128, 3)


def test_progress_per_tile_batch(files, tmp_path, capsys):
    ckpt, _, _ = files["flux"]
    latent = tmp_path / "wide.safetensors"
    save_file({"latent": torch.randn(1, 16, 16, 24)}, str(latent))  # 768 x 512 px
    out = tmp_path / "tiled.png"
    assert main(["decode", "--checkpoint", ckpt, "--latent", str(latent), "--text-embedding", files["text"],
                 "--steps", "1", "--tile", "512", "--overlap", "128", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "step 1/1 tiles 2/2" in err  # two tiles, one forward
    assert read_png(str(out)).shape == (512, 768, 3)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_teacher") / "PiD_v1pt5_res2kto4k_sr4x_official_qwenimage_undistilled.pth"
    make_random_checkpoint(str(path), layout="v1.5", latent_channels=16, text_dim=2304, text_tokens=300)
    return str(path)


def test_undistilled_checkpoint_decodes_guided(files, teacher_file, tmp_path, capsys):
    latent = tmp_path / "q.safetensors"
    save_file({"latent": torch.randn(1, 16, 2, 2)}, str(latent))
    negative = tmp_path / "negative.safetensors"
    save_file({"text_embedding": torch.randn(1, 300, 2304)}, str(negative))
    out = tmp_path / "guided.png"
    base = ["decode", "--checkpoint", teacher_file, "--latent", str(latent), "--text-embedding", files["text"],
            "--latent-format", "qwenimage", "--out", str(out)]
    # a precomputed prompt and no encoder: the negative embedding must be given, and the message says so
    assert main(base + ["--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "--negative-embedding" in err and "--cfg 1" in err and "Traceback" not in err
    assert main(base + ["--steps", "2", "--cfg", "4.5", "--negative-embedding", str(negative)]) == 0
    printed = capsys.readouterr().out
    assert "teacher (DPM-Solver++), 2 steps, cfg 4.5" in printed and "qwenimage-2kto4k-v1.5-undistilled" in printed
    assert read_png(str(out)).shape == (64, 64, 3)
    assert main(base + ["--steps", "2", "--cfg", "1"]) == 0  # no guidance: no negative needed
    assert "no guidance" in capsys.readouterr().out
    assert main(base + ["--steps", "101", "--cfg", "1"]) == 2
    assert "1 to 100 steps" in capsys.readouterr().err


def test_sampler_override_and_student_steps(files, tmp_path, capsys, caplog):
    ckpt, latent, _ = files["flux"]
    out = tmp_path / "s.png"
    base = ["decode", "--checkpoint", ckpt, "--latent", latent, "--text-embedding", files["text"], "--out", str(out)]
    assert main(base + ["--steps", "25"]) == 2
    assert "student sampler runs 1 to 4 steps" in capsys.readouterr().err
    assert main(base + ["--sampler", "teacher", "--steps", "2", "--cfg", "1"]) == 0
    captured = capsys.readouterr()
    assert "teacher (DPM-Solver++), 2 steps" in captured.out and "(chosen)" in captured.out
    assert "4-step student" in caplog.text  # the warning (stderr outside pytest)
    with pytest.raises(SystemExit):
        main(base + ["--negative-prompt", "blurry"])  # a prompt needs the encoder


def test_a_colour_reference_on_the_command_line(files, tmp_path, capsys):
    """--color-reference IMAGE (any size with the output's aspect ratio) and --color-match: the summary says
    the colour error before and after; a reference that does not fit is one line and nothing is written."""
    from pid_core.images import save_png

    ckpt, latent, shape = files["flux"]
    reference = tmp_path / "reference.png"
    save_png(torch.rand(3, shape[-2] * 8, shape[-1] * 8), str(reference))  # the VAE's size: 1/4 of PiD's
    out = tmp_path / "matched.png"
    base = ["decode", "--checkpoint", ckpt, "--latent", latent, "--text-embedding", files["text"], "--steps", "1",
            "--dtype", "fp32"]
    assert main([*base, "--out", str(out), "--color-reference", str(reference), "--color-match", "0.8"]) == 0
    said = capsys.readouterr().out
    assert re.search(r"colour     : matched to a \d+x\d+ reference, strength 0.8: mean CIEDE2000 .* before, "
                     r"mean CIEDE2000 .* after", said), said
    square = tmp_path / "square.png"
    save_png(torch.rand(3, 64, 64), str(square))
    assert main([*base, "--out", str(tmp_path / "no.png"), "--color-reference", str(square)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "64x64" in err[0] and not (tmp_path / "no.png").exists()
    assert main([*base, "--out", str(tmp_path / "no.png"), "--color-match", "0.5"]) == 2
    assert "--color-match needs --color-reference" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "no.png"), "--color-reference", str(tmp_path / "missing.png")]) == 2
    assert "missing.png was not found" in capsys.readouterr().err
    assert main([*base, "--out", str(reference), "--color-reference", str(reference)]) == 2  # never the input
    assert "is the input" in capsys.readouterr().err
