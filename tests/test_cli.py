"""The command line: decode latent files of every backbone's shape to PNGs of the right size."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pid_core.cli import main
from images_helper import read_png
from pid_core.testing import make_random_checkpoint

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
