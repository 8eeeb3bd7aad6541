"""decode-many: items equal to the decode command's outputs, bad items reported and skipped, finished
outputs never written again, each prompt encoded once, and 2 ranks (torchrun, gloo) equal to 1 process,
also when resuming an interrupted run."""

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import save_file

import ranks_helper
from pid_core.commands import main
from pid_core.commands.decode_many import Item, in_text_order
from pid_core.images import is_complete_png
from pid_core.commands.random_checkpoints import make_random_checkpoint

CKPT = "pid_flux1_512_to_2048_4step_bf16.safetensors"  # named like the FLUX.1 2K file: format flux


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    make_random_checkpoint(str(root / CKPT), layout="v1", latent_channels=16)
    g = torch.Generator().manual_seed(0)
    save_file({"text_embedding": torch.randn(1, 300, 2304, generator=g)}, str(root / "text.safetensors"))
    save_file({"text_embedding": torch.randn(1, 300, 2304, generator=g)}, str(root / "other.safetensors"))
    sizes = [(4, 4), (2, 6), (6, 4), (2, 2), (4, 2), (2, 4)]
    for i, (h, w) in enumerate(sizes):
        save_file({"latent": torch.randn(1, 16, h, w, generator=g)}, str(root / f"l{i}.safetensors"))
    save_file({"latent": torch.randn(2, 16, 2, 2, generator=g), "pid_sigma": torch.tensor([0.2, 0.4])},
              str(root / "pair.safetensors"))
    return root


def write_manifest(path, entries):
    path.write_text("".join((e if isinstance(e, str) else json.dumps(e)) + "\n" for e in entries))
    return path


def good_entries(root):
    """Items of several sizes and options; latents live in `root`, relative to the manifest there."""
    entries = [{"latent": f"l{i}.safetensors", "out": f"l{i}.png", "seed": i, "sigma": 0.1 * i} for i in range(6)]
    entries[1]["embedding"] = "other.safetensors"
    entries[2].update(tile=64, overlap=32, steps=2)
    entries.append({"latent": "pair.safetensors", "out": "pair.png", "steps": 1})  # sigma from the file
    return entries


def decode_many(root, *args, ranks=1, out="out"):
    return ranks_helper.run(["decode-many", "--checkpoint", str(root / CKPT), "--text-embedding",
                             str(root / "text.safetensors"), "--steps", "3", "--out-dir", str(root / out), *args],
                            ranks=ranks)


def pngs(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder)) if not name.startswith(".")}


def test_items_equal_the_decode_command(shared, tmp_path, capsys):
    manifest = write_manifest(shared / "equal.jsonl", good_entries(shared))
    assert main(["decode-many", "--checkpoint", str(shared / CKPT), "--manifest", str(manifest), "--text-embedding",
                 str(shared / "text.safetensors"), "--steps", "3", "--out-dir", str(tmp_path / "many")]) == 0
    assert "7 item(s): 7 done, 0 skipped (finished before), 0 failed" in capsys.readouterr().out
    for entry in good_entries(shared):
        latent = str(shared / entry["latent"])
        args = ["decode", "--checkpoint", str(shared / CKPT), "--latent", latent, "--out", str(tmp_path / "one" / entry["out"]),
                "--text-embedding", str(shared / entry.get("embedding", "text.safetensors")),
                "--seed", str(entry.get("seed", 0)), "--steps", str(entry.get("steps", 3))]
        args += ["--sigma", str(entry["sigma"])] if "sigma" in entry else []
        args += ["--tile", str(entry["tile"]), "--overlap", str(entry["overlap"])] if "tile" in entry else []
        assert main(args) == 0
    assert pngs(tmp_path / "many") == pngs(tmp_path / "one")
    assert set(pngs(tmp_path / "many")) == {"l0.png", "l1.png", "l2.png", "l3.png", "l4.png", "l5.png", "pair_00.png", "pair_01.png"}


def test_a_folder_of_latents(shared, tmp_path, capsys):
    folder = tmp_path / "latents"
    folder.mkdir()
    for name in ("l3.safetensors", "l4.safetensors"):
        (folder / name).write_bytes((shared / name).read_bytes())
    (folder / "notes.txt").write_text("not a latent")
    assert main(["decode-many", "--checkpoint", str(shared / CKPT), "--latents", str(folder), "--out-dir",
                 str(tmp_path / "out"), "--text-embedding", str(shared / "text.safetensors"), "--steps", "1"]) == 0
    assert set(os.listdir(tmp_path / "out")) == {"l3.png", "l4.png"}
    assert main(["decode-many", "--checkpoint", str(shared / CKPT), "--latents", str(folder),
                 "--text-embedding", str(shared / "text.safetensors")]) == 2
    assert "--latents needs --out-dir" in capsys.readouterr().err


def test_bad_items_are_reported_and_skipped_then_a_rerun_finishes_only_them(shared, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut off")
    latent = tmp_path / "late.safetensors"  # missing in the first run
    entries = [
        {"latent": str(shared / "l3.safetensors"), "out": "a.png"},
        {"latent": str(latent), "out": "late.png"},
        {"latent": str(shared / "l4.safetensors"), "out": "broken.png"},
        {"latent": str(shared / "l5.safetensors"), "out": "a.png"},
        {"latent": str(shared / "l5.safetensors"), "sigma": 7.0, "out": "sigma.png"},
        {"latent": str(shared / "l5.safetensors"), "out": str(shared / "l5.safetensors")[:-12] + ".png", "colour": 1},
        {"latent": str(shared / "l5.safetensors"), "out": "l5.safetensors"},
        {"latent": str(shared / "l5.safetensors"), "steps": 9, "out": "s.png"},
        "{not json",
    ]
    manifest = write_manifest(tmp_path / "items.jsonl", entries)
    args = ["decode-many", "--checkpoint", str(shared / CKPT), "--manifest", str(manifest), "--text-embedding",
            str(shared / "text.safetensors"), "--steps", "1", "--out-dir", str(out)]
    assert main(args) == 1
    printed = capsys.readouterr()
    assert "9 item(s): 1 done, 0 skipped (finished before), 8 failed" in printed.out
    for line, reason in [(2, "Latent file not found"), (3, "not a complete PNG"), (4, "items.jsonl:1 writes"),
                         (5, "sigma"), (6, "unknown key(s) colour"), (7, "must be a .png file"),
                         (8, "1 to 4 steps"), (9, "not a JSON object")]:
        assert any(f"items.jsonl:{line}: " in row and reason in row for row in printed.out.splitlines()), (line, reason)
    assert "items.jsonl:5 FAILED" in printed.err  # the decode failure is reported while the run goes on
    assert (out / "broken.png").read_bytes() == b"\x89PNG\r\n\x1a\n cut off"  # never overwritten
    first = (out / "a.png").stat().st_mtime_ns

    save_file({"latent": torch.randn(1, 16, 2, 2)}, str(latent))
    write_manifest(manifest, entries[:2])
    assert main(args) == 0
    assert "2 item(s): 1 done, 1 skipped (finished before), 0 failed" in capsys.readouterr().out
    assert (out / "a.png").stat().st_mtime_ns == first and is_complete_png(out / "late.png")
    assert not [n for n in os.listdir(out) if n.startswith(".pid-")]  # no temporary files left


def test_a_manifest_with_a_byte_order_mark_is_read(shared, tmp_path, capsys):
    manifest = tmp_path / "notepad.jsonl"  # what Windows editors save as "UTF-8 with BOM"
    manifest.write_text(json.dumps({"latent": str(shared / "l3.safetensors"), "out": "a.png"}) + "\n", encoding="utf-8-sig")
    assert main(["decode-many", "--checkpoint", str(shared / CKPT), "--manifest", str(manifest), "--text-embedding",
                 str(shared / "text.safetensors"), "--steps", "1", "--out-dir", str(tmp_path)]) == 0
    assert "1 item(s): 1 done" in capsys.readouterr().out and is_complete_png(tmp_path / "a.png")


def test_manifests_that_cannot_be_read_and_outputs_outside_the_folder(shared, tmp_path, capsys):
    base = ["decode-many", "--checkpoint", str(shared / CKPT), "--text-embedding", str(shared / "text.safetensors"),
            "--out-dir", str(tmp_path / "out")]
    empty = write_manifest(tmp_path / "empty.jsonl", ["# nothing yet"])
    for manifest, reason in [("", "Manifest not found"), (str(tmp_path), "is a folder"),
                             (str(shared / "l3.safetensors"), "not a text file"), (str(empty), "lists no items")]:
        assert main(base + ["--manifest", manifest]) == 2
        assert reason in capsys.readouterr().err, manifest
    assert main(base[:-2] + ["--latents", str(shared / "l3.safetensors"), "--out-dir", str(tmp_path)]) == 2
    assert "is a file" in capsys.readouterr().err
    escaping = write_manifest(tmp_path / "escape.jsonl", [
        {"latent": str(shared / "l3.safetensors"), "out": "../escaped.png"},
        {"latent": str(shared / "l3.safetensors"), "out": str(tmp_path / "absolute.png")},
        {"latent": str(shared / "l3.safetensors"), "out": str(tmp_path / "out" / "inside.png"), "sigma": -0.5},
    ])
    assert main(base + ["--manifest", str(escaping), "--steps", "1"]) == 1
    printed = capsys.readouterr().out
    assert printed.count("outside the output folder") == 2 and "sigma" in printed
    assert not (tmp_path / "escaped.png").exists() and not (tmp_path / "absolute.png").exists()
    assert not (tmp_path / "out" / "inside.png").exists()  # a negative sigma is refused, never taken as "not given"


def test_each_distinct_prompt_is_encoded_once(shared, tmp_path, monkeypatch, capsys):
    from test_text import TOKENIZER, tiny_model

    from pid_core.text import GemmaTextEncoder

    encoded = []

    class CountingEncoder(GemmaTextEncoder):
        def _forward(self, prompts):
            encoded.extend(prompts)
            return super()._forward(prompts)

    loads = []

    def from_pretrained(path, device="cpu", **kw):
        loads.append(path)
        return CountingEncoder(tiny_model(), TOKENIZER, cache_size=1)  # no help from the cache

    monkeypatch.setattr(GemmaTextEncoder, "from_pretrained", staticmethod(from_pretrained))
    ckpt = tmp_path / CKPT
    make_random_checkpoint(str(ckpt), layout="v1", latent_channels=16, text_dim=32)  # the tiny Gemma's width
    prompts = ["a fox", "a cat", "a fox", "a cat", "a fox"]
    entries = [{"latent": str(shared / "l3.safetensors"), "prompt": p, "out": f"p{i}.png"} for i, p in enumerate(prompts)]
    entries.append({"latent": str(shared / "l3.safetensors"), "out": "default.png"})  # the command's prompt: a fox
    manifest = write_manifest(tmp_path / "prompts.jsonl", entries)
    assert main(["decode-many", "--checkpoint", str(ckpt), "--manifest", str(manifest), "--prompt", "a fox",
                 "--text-encoder", "gemma", "--steps", "1"]) == 0
    assert sorted(encoded) == ["a cat", "a fox"] and loads == ["gemma"]
    assert len(os.listdir(tmp_path)) == len(entries) + 2


def test_items_are_grouped_by_text_in_listed_order():
    items = [Item(where=str(i), latent="l", out=f"{i}.png", prompt=p) for i, p in enumerate("abacb")]
    jobs = [type("Job", (), {"item": item})() for item in items]
    assert [job.item.where for job in in_text_order(jobs)] == ["0", "2", "1", "4", "3"]


def test_two_ranks_equal_one_process_and_resume_after_an_interruption(shared, tmp_path):
    manifest = write_manifest(shared / "ranks.jsonl", good_entries(shared))
    one = decode_many(shared, "--manifest", str(manifest), out="one")
    assert one.returncode == 0, one.stderr[-3000:]

    # interrupted: stopped (SIGTERM to torchrun and its workers) once the first image is written
    out = shared / "two"
    started = subprocess.Popen(ranks_helper.command(
        ["decode-many", "--checkpoint", str(shared / CKPT), "--text-embedding", str(shared / "text.safetensors"),
         "--steps", "3", "--out-dir", str(out), "--manifest", str(manifest)], ranks=2),
        env=ranks_helper.environment(), cwd=ranks_helper.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    deadline = time.monotonic() + ranks_helper.TIMEOUT_S
    while started.poll() is None and time.monotonic() < deadline and not (out.is_dir() and pngs(out)):
        time.sleep(0.05)
    if started.poll() is None:
        os.killpg(started.pid, signal.SIGTERM)
    started.wait(timeout=60)
    before = {name: (out / name).stat().st_mtime_ns for name in pngs(out)}
    assert before and all(is_complete_png(out / name) for name in before)

    rerun = decode_many(shared, "--manifest", str(manifest), ranks=2, out="two")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "rank 0:" in rerun.stdout and "rank 1:" in rerun.stdout
    whole_items = [name for name in before if not name.startswith("pair")]
    assert int(re.search(r"(\d+) skipped", rerun.stdout).group(1)) >= len(whole_items)
    assert pngs(out) == pngs(shared / "one")
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # finished: never rewritten
    assert not [n for n in os.listdir(out) if n.startswith(".pid-")]


def test_items_take_a_colour_reference(shared, tmp_path, capsys):
    """"color_reference" (relative to the manifest) and "color_match" per item; the item's line reports the
    colour error before and after; a strength without a reference is a bad item."""
    from pid_core.images import save_png

    save_png(torch.rand(3, 32, 32), str(shared / "reference.png"))  # l0 is 4 x 4 cells: a square output
    manifest = write_manifest(shared / "colour.jsonl", [
        {"latent": "l0.safetensors", "out": "c0.png", "color_reference": "reference.png", "color_match": 0.5},
        {"latent": "l3.safetensors", "out": "c3.png", "color_match": 0.5},
    ])
    assert main(["decode-many", "--checkpoint", str(shared / CKPT), "--manifest", str(manifest), "--text-embedding",
                 str(shared / "text.safetensors"), "--steps", "1", "--out-dir", str(tmp_path)]) == 1
    printed = capsys.readouterr()
    assert "colour against the reference: mean CIEDE2000" in printed.err and (tmp_path / "c0.png").exists()
    assert "colour.jsonl:2 FAILED" in printed.err and "needs a \"color_reference\"" in printed.err
