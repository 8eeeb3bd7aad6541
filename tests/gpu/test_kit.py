"""The GPU kit's parts that run without a GPU (CI): the report writer, the repacking and archives, the
bare-image simulation, the skip path of the `gpu` tests, and the prepared kit (.gpu/carry, when
prepare.sh made it: CI does; under PID_REQUIRE_COMFYUI=1 a missing one fails)."""

from __future__ import annotations

import hashlib
import base64
import json
import os
import pathlib
import subprocess
import sys
import zipfile

import pytest

from . import kit_files, report

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
CARRY = REPO / ".gpu" / "carry"


# ------------------------------------------------------------------------------------------ the report

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="gpu.test_gpu_comfyui" name="test_loader_variant_decodes_close_to_bf16[mxfp8]" time="3.50">
<properties><property name="seconds" value="0.61"/><property name="psnr_db" value="36.2"/></properties></testcase>
<testcase classname="gpu.test_gpu_comfyui" name="test_loader_variant_decodes_close_to_bf16[fp8_e5m2]" time="2.00">
<properties><property name="psnr_db" value="24.9"/></properties>
<failure message="AssertionError: fp8_e5m2: PSNR 24.90 dB | below&#10;second line">trace</failure></testcase>
<testcase classname="gpu.test_gpu_comfyui" name="test_no_memory_leak_across_queued_decodes" time="0.00">
<skipped type="pytest.skip" message="a CUDA-only check: the CPU rehearsal skips it">x</skipped></testcase>
<testcase classname="gpu.test_gpu_comfyui" name="test_pid_decode_is_pid_core_decode" time="9.0">
<properties><property name="psnr_db" value="identical"/><property name="max_abs_difference" value="0.0"/>
<property name="pid_decode_seconds" value="0.52"/><property name="pid_core_seconds" value="0.5"/>
<property name="time_ratio" value="1.04"/></properties></testcase>
</testsuite></testsuites>"""

BENCH = {
    "rehearsal": False, "runs": 2, "sizes": [2048, 4096],
    "schedules": {"core": [1.0, 0.818, 0.6, 0.333, 0.0], "pack": [0.999, 0.866, 0.634, 0.342, 0.0]},
    "rows": [
        {"size": 2048, "graph": "core", "label": "core ComfyUI PiD", "median_seconds": 0.8, "cold_seconds": 3.1,
         "peak_allocated_GiB": 9.5, "weights_on_device_GiB": 2.6},
        {"size": 2048, "graph": "pack", "label": "PiD Decode (tiling auto)", "median_seconds": 0.6,
         "cold_seconds": 2.9, "peak_allocated_GiB": 6.0, "weights_on_device_GiB": 2.6, "psnr_vs_core_db": 27.3},
        {"size": 4096, "graph": "core", "label": "core ComfyUI PiD", "median_seconds": 5.0, "cold_seconds": 6.0,
         "peak_allocated_GiB": 30.0, "weights_on_device_GiB": 2.6},
        {"size": 4096, "graph": "pack", "label": "PiD Decode (tiling auto)", "median_seconds": 6.0,
         "cold_seconds": 7.0, "peak_allocated_GiB": 31.0, "weights_on_device_GiB": 2.6, "psnr_vs_core_db": 20.0},
        {"size": 4096, "graph": "pack_untiled", "label": "PiD Decode (tiling off)",
         "skipped": "not run: 12 s left of the --deadline 200 s"},
    ],
}


def write_results(folder: pathlib.Path, *, junit=True, bench=True, mode="gpu"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "env.json").write_text(json.dumps({"mode": mode, "date": "2027-01-01 10:00 UTC", "device": "NVIDIA H200",
                                                 "torch": "2.11.0+cu130", "cuda": "13.0", "comfyui": "0.33.0"}))
    (folder / "phases.json").write_text(json.dumps([{"name": "setup", "seconds": 21, "status": 0},
                                                    {"name": "pytest", "seconds": 160, "status": 1}]))
    (folder / "checkpoints.json").write_text(json.dumps({"size": "full", "parameters": 1401300163}))
    if junit:
        (folder / "pytest.xml").write_text(JUNIT)
    if bench:
        (folder / "bench.json").write_text(json.dumps(BENCH))
    return folder


def test_report_tables(tmp_path):
    text = report.render(write_results(tmp_path / "results"))
    assert text.startswith("# PiD node pack in ComfyUI on a GPU: kit report")
    assert "device: NVIDIA H200" in text and "1.40 B parameters" in text
    assert "pytest 160 s (exit 1); total 181 s" in text
    assert "2 passed, 1 failed, 1 skipped of 4." in text
    lines = text.splitlines()
    failed = next(line for line in lines if line.startswith("| loader_variant_decodes_close_to_bf16[fp8_e5m2]"))
    assert "**FAIL**" in failed and "PSNR 24.90 dB \\| below" in failed and "second line" not in failed
    assert any(line.startswith("| loader_variant_decodes_close_to_bf16[mxfp8] | pass | 3.5 | seconds 0.61, psnr_db 36.2")
               for line in lines)
    # PiD Decode against pid_core: 1.04x is within 5%
    assert "| 0.52 | 0.5 | 1.040 | yes | identical | 0.0 |" in text
    # against core: faster with less peak at 2048; slower with more at 4096; the skipped row says why
    row_2048 = next(line for line in lines if line.startswith("| 2048 | PiD Decode (tiling auto)"))
    assert "time 0.75x: faster; peak less" in row_2048 and "| 27.30 |" in row_2048
    row_4096 = next(line for line in lines if line.startswith("| 4096 | PiD Decode (tiling auto)"))
    assert "**slower**" in row_4096 and "peak **not less**" in row_4096
    assert "| 4096 | PiD Decode (tiling off) | not run: 12 s left" in text
    assert "shift 1.5, scheduler simple: [1, 0.818, 0.6, 0.333, 0]" in text
    assert "[0.999, 0.866, 0.634, 0.342, 0]" in text
    assert "CPU rehearsal (run.sh --dry-run)" not in text


def test_report_says_what_is_missing(tmp_path):
    text = report.render(write_results(tmp_path / "results", junit=False, bench=False, mode="rehearsal"))
    assert "CPU rehearsal" in text and "no figure here is a GPU figure" in text
    assert "No test results (pytest.xml missing" in text
    assert "No benchmark results (bench.json missing" in text
    empty = report.render(tmp_path / "nothing")  # no file at all: still a report
    assert "No test results" in empty and "No benchmark results" in empty


def test_report_reads_finished_tests_when_pytest_was_stopped(tmp_path):
    results = write_results(tmp_path / "results", junit=False)
    lines = [
        {"nodeid": "tests/gpu/test_gpu_comfyui.py::test_bf16_file_decodes", "when": "call", "outcome": "passed",
         "seconds": 1.5, "figures": {"seconds": 0.41}, "message": ""},
        {"nodeid": "tests/gpu/test_gpu_comfyui.py::test_no_memory_leak_across_queued_decodes", "when": "setup",
         "outcome": "skipped", "seconds": 0.0, "figures": {}, "message": "a CUDA-only check"},
        {"nodeid": "tests/gpu/test_gpu_comfyui.py::test_early_stop_to_pid_decode_on_device", "when": "setup",
         "outcome": "failed", "seconds": 2.0, "figures": {}, "message": "RuntimeError: ComfyUI exited"},
    ]
    (results / "tests.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    text = report.render(results)
    assert "pytest did not finish" in text and "1 passed, 1 error, 1 skipped of 3." in text
    assert "| bf16_file_decodes | pass | 1.5 | seconds 0.41 |" in text
    assert "| early_stop_to_pid_decode_on_device | **ERROR** | 2.0 |  | RuntimeError: ComfyUI exited |" in text


def test_report_command_writes_the_file(tmp_path):
    results = write_results(tmp_path / "results")
    out = tmp_path / "gpu_report.md"
    run = subprocess.run([sys.executable, str(HERE / "report.py"), str(results), str(out)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert out.read_text() == report.render(results)


# ------------------------------------------------------------------------------- repacking, archives

def make_wheel(path: pathlib.Path, files: dict) -> pathlib.Path:
    name = path.name.split("-")[0]
    record = f"{name}-1.0.dist-info/RECORD"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(record, "stale\n")
    return path


def test_repacked_wheel_is_stored_trimmed_and_recorded(tmp_path):
    src = make_wheel(tmp_path / "comfy_kitchen-1.0-cp312-abi3-manylinux_2_28_x86_64.whl", {
        "comfy_kitchen/__init__.py": b"x = 1\n" * 100,
        "comfy_kitchen/backends/cuda/_C.so": b"\x7fELF" + bytes(1000),
        "comfy_kitchen/backends/hip/_C.so": b"\x7fELF" + bytes(5000),
        "comfy_kitchen-1.0.dist-info/METADATA": b"Name: comfy-kitchen\n",
    })
    out = tmp_path / "out"
    out.mkdir()
    dst = kit_files.repack_wheel(src, out)
    with zipfile.ZipFile(dst) as z:
        names = z.namelist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())
        assert "comfy_kitchen/backends/hip/_C.so" not in names
        assert "comfy_kitchen/backends/cuda/_C.so" in names
        record = z.read("comfy_kitchen-1.0.dist-info/RECORD").decode().splitlines()
        for line in record[:-1]:
            member, digest, size = line.split(",")
            data = z.read(member)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert digest == f"sha256={expected}" and int(size) == len(data)
        assert {line.split(",")[0] for line in record} == set(names)
    # another project's wheel keeps every member
    other = make_wheel(tmp_path / "av-1.0-cp311-abi3-manylinux_2_28_x86_64.whl", {"av/backends/hip/x.py": b"1"})
    with zipfile.ZipFile(kit_files.repack_wheel(other, out)) as z:
        assert "av/backends/hip/x.py" in z.namelist()


def test_pack_unpack_round_trip(tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.txt").write_text("hello")
    (src / "top.bin").write_bytes(os.urandom(1000))
    archive = tmp_path / "x.tar.xz"
    kit_files.pack(src, archive)
    kit_files.unpack(archive, tmp_path / "dst")
    assert (tmp_path / "dst" / "a" / "b" / "f.txt").read_text() == "hello"
    assert (tmp_path / "dst" / "top.bin").read_bytes() == (src / "top.bin").read_bytes()


def test_trim_comfyui_keeps_what_runs(tmp_path):
    tree = tmp_path / "ComfyUI"
    for name in ("comfy", "comfy_extras", "tests", "tests-unit", "comfy_api_nodes", "blueprints"):
        (tree / name).mkdir(parents=True)
    (tree / "main.py").write_text("")
    (tree / "openapi.yaml").write_text("")
    kit_files.trim_comfyui(tree)
    assert sorted(p.name for p in tree.iterdir()) == ["comfy", "comfy_extras", "main.py"]


def test_travelling_files_are_the_checkout():
    files = {p.relative_to(REPO).as_posix() for p in kit_files.travelling_files(REPO)}
    assert "tests/gpu/kit_files.py" in files and "README.md" in files
    assert not any(f.startswith((".gpu/", ".venv/", ".comfyui/")) for f in files)


# ---------------------------------------------------------------------------------- the bare image

def test_bare_image_hides_what_the_image_lacks():
    """With the image's list, pytest imports (the image has it and its dependencies) and websocket-client
    (carried by the kit, not in the image) does not."""
    code = ("import pytest\n"
            "try:\n    import websocket\nexcept ModuleNotFoundError as e:\n    print('hidden:', e)\n"
            "else:\n    print('imported')\n")
    env = dict(os.environ, PYTHONPATH=str(HERE / "bare_image"),
               PID_GPU_IMAGE_PACKAGES=str(HERE / "gpu_image_packages.txt"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "hidden: No module named 'websocket' (hidden: websocket-client is not in the GPU image" in run.stdout
    env["PID_GPU_IMAGE_PACKAGES"] = ""  # the finder is off without lists
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.stdout.strip() == "imported", run.stderr


def test_image_package_list_is_read():
    names = [line for line in (HERE / "gpu_image_packages.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert {"torch", "aiohttp", "yarl", "pyyaml", "pillow", "safetensors", "transformers", "pytest"} <= set(names)
    carried = [line.split("==")[0].lower() for line in (HERE / "wheels.txt").read_text().splitlines()
               if line and not line.startswith("#")]
    assert not set(carried) & {n.lower() for n in names} - {"typing-extensions"}, "a carried package is in the image"


# ---------------------------------------------------------------------------- the gpu tests' skip path

def test_gpu_tests_skip_without_cuda_even_when_comfyui_is_required(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the gpu tests run here (tests/gpu/run.sh)")
    env = {k: v for k, v in os.environ.items() if k not in ("PID_GPU_REHEARSAL", "PID_GPU_WORK")}
    env["PID_REQUIRE_COMFYUI"] = "1"
    run = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", str(HERE), "-q", "-rs", "-p", "no:cacheprovider",
                          "--junitxml", str(tmp_path / "gpu.xml")], cwd=str(REPO), capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    cases = report.read_junit(tmp_path / "gpu.xml")
    assert len(cases) >= 10
    assert all(c["outcome"] == "skipped" and "needs CUDA" in c["message"] for c in cases), cases


# --------------------------------------------------------------------------------- the prepared kit

def test_prepared_kit_fits_and_installs(tmp_path):
    """What prepare.sh left in .gpu/carry: within the device tool's limit with the checkout; the wheels
    unpack and pip-install into a scratch folder without an index (for the GPU machine's Python 3.12);
    ComfyUI unpacks with main.py and without what was trimmed."""
    from comfyui.comfy_harness import unavailable

    if not (CARRY / "wheels.tar.xz").is_file() or not (CARRY / "comfyui.tar.xz").is_file():
        unavailable(f"no prepared GPU kit in {CARRY}: run tests/gpu/prepare.sh")
    checkout, carried = kit_files.carried_bytes(REPO, [CARRY])
    assert checkout + carried <= kit_files.LIMIT_BYTES, f"{(checkout + carried) / 2 ** 20:.1f} MiB travel"
    kit_files.unpack(CARRY / "wheels.tar.xz", tmp_path / "wheels")
    wheels = sorted((tmp_path / "wheels").glob("*.whl"))
    pins = [line for line in (CARRY / "wheels.txt").read_text().splitlines() if line.strip()]
    assert len(wheels) == len(pins)
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                          "--target", str(tmp_path / "site"), "--python-version", "3.12", "--implementation", "cp",
                          "--abi", "cp312", "--platform", "manylinux_2_28_x86_64", "--platform",
                          "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "--only-binary=:all:",
                          *map(str, wheels)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "comfy_kitchen" / "backends" / "cuda").is_dir()
    assert not (site / "comfy_kitchen" / "backends" / "hip").exists()
    for module in ("comfy_aimdo", "av", "sqlalchemy", "torchsde", "pydantic", "websocket"):
        assert (site / module).is_dir(), module
    kit_files.unpack(CARRY / "comfyui.tar.xz", tmp_path / "ComfyUI")
    tree = tmp_path / "ComfyUI"
    assert (tree / "main.py").is_file() and (tree / "comfy_extras" / "nodes_pid.py").is_file()
    assert not any((tree / name).exists() for name in kit_files.COMFYUI_TRIM)


# ------------------------------------------------------------------------------ checkpoints on the spot

def test_checkpoints_are_made_in_comfyuis_format(tmp_path):
    """make_checkpoints.py (narrow, CPU; run.sh makes the full size on the GPU): a bf16 file with the
    released key names and no prefix, and its mxfp8 / int8 convrot siblings in ComfyUI's layout (the
    header's _quantization_metadata, scales beside the weights), which pid_core reads back close to the
    bf16 weights."""
    import torch
    from safetensors import safe_open

    from comfyui.comfy_harness import find_comfyui, unavailable
    from pid_core.checkpoint import load_pid

    found, reason = find_comfyui()
    if found is None:
        unavailable(reason)
    comfy_path, comfy_py = found
    run = subprocess.run([comfy_py, str(HERE / "make_checkpoints.py"), str(comfy_path), str(tmp_path), "--size",
                          "narrow", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((tmp_path / "kit_checkpoints.json").read_text())
    folder = tmp_path / "diffusion_models"
    files = {kind: folder / name for kind, name in manifest["files"].items()}
    assert set(files) == {"bf16", "mxfp8", "int8_convrot"} and all(p.is_file() for p in files.values())
    with safe_open(str(files["bf16"]), "pt") as f:
        keys = set(f.keys())
    assert "patch_blocks.0.attn.qkv_x.weight" in keys and not any(k.startswith("net.") for k in keys)
    reference = load_pid(str(files["bf16"]))
    for kind in ("mxfp8", "int8_convrot"):
        with safe_open(str(files[kind]), "pt") as f:
            layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
        assert len(layers) == manifest["quantized_layers"][kind] > 0
        model = load_pid(str(files[kind]))
        for layer in layers:
            w, q = reference.get_parameter(f"{layer}.weight").float(), model.get_parameter(f"{layer}.weight").float()
            assert (w - q).norm() / w.norm() < 0.1, (kind, layer)
        assert not torch.equal(model.get_parameter(f"{next(iter(layers))}.weight"),
                               reference.get_parameter(f"{next(iter(layers))}.weight"))


# ------------------------------------------------------------------------------------- the speed kit

SPEED = HERE / "speed.sh"


def test_speed_kit_needs_its_prepared_reference(tmp_path):
    env = dict(os.environ, PID_SPEED_KIT=str(tmp_path / "kit"))
    run = subprocess.run(["bash", str(SPEED), str(tmp_path / "out")], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "run tests/gpu/speed.sh --prepare first" in run.stderr
    run = subprocess.run(["bash", str(SPEED), "--prepare", str(tmp_path)], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "no nv-tlabs/PiD checkout" in run.stderr


@pytest.mark.skipif(not os.environ.get("PID_REFERENCE_DIR"), reason="PID_REFERENCE_DIR does not name a checkout of nv-tlabs/PiD")
def test_speed_kit_dry_run(tmp_path):
    """--prepare copies the reference's Python package only; the dry run goes through every step on the CPU."""
    env = dict(os.environ, PID_SPEED_KIT=str(tmp_path / "kit"), PYTHON=sys.executable)
    subprocess.run(["bash", str(SPEED), "--prepare", os.environ["PID_REFERENCE_DIR"]], check=True, env=env)
    assert not [p for p in (tmp_path / "kit").rglob("*") if p.is_file() and p.suffix not in (".py", ".txt")]
    subprocess.run(["bash", str(SPEED), str(tmp_path / "out"), "--dry-run"], check=True, env=env,
                   capture_output=True, timeout=600)
    text = (tmp_path / "out" / "speed.txt").read_text()
    assert text.count(": exit 0 after ") == 6 and "# done in" in text, text[-2000:]
