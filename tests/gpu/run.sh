#!/usr/bin/env bash
# The GPU kit, step 2 (on the GPU machine, no registry): the pack in the real ComfyUI on CUDA.
#
#   tests/gpu/run.sh OUT_DIR              # on a GPU machine, after tests/gpu/prepare.sh here
#   tests/gpu/run.sh OUT_DIR --dry-run    # a CPU rehearsal of the same plumbing (no GPU figures)
#
# 1. setup: installs the carried wheels (.gpu/carry/wheels.tar.xz) into a scratch folder with
#    pip --no-index --target and unpacks the carried ComfyUI (.gpu/carry/comfyui.tar.xz);
# 2. checkpoints: random PiD checkpoints made on the spot (make_checkpoints.py): the full-size FLUX.1
#    2K-to-4K v1.5 layout in bf16 and its mxfp8 / int8 convrot siblings written by ComfyUI's own
#    quantization (narrow ones in the rehearsal);
# 3. pytest -m gpu tests/gpu: the real ComfyUI started on CUDA (no --cpu) with this pack, several times
#    with different flags (test_gpu_comfyui.py);
# 4. the benchmark against core ComfyUI's own PiD (bench_core.py);
# 5. OUT_DIR/gpu_report.md (report.py), with pytest.xml, bench.json, env.json, run.log and logs.tar.gz
#    (the servers' logs and the raw results without images): 6 files, within what the device tool
#    brings back.
#
# Time: planned for the device tool (10 minutes a command, 15 a session, a machine's start included):
# estimated at about 6 minutes on an H200 (setup 0.3, checkpoints 0.7, pytest 4 with 8 ComfyUI starts,
# benchmark 1.3; estimates, not measured yet). Each phase is capped so the whole run ends within
# RUN_BUDGET_S (default 480 s) with a report whatever hangs; pytest gets at most 3/4 of what is left
# (its tests that start their own servers run last), the benchmark the rest, and a test cut short
# still shows in the report with what finished before it (tests.jsonl).
#
# The dry run uses this machine's ComfyUI environment (COMFYUI_PY, as for tests/comfyui) to serve the
# carried ComfyUI tree, with every package the GPU image lacks hidden (bare_image/), and PYTHON (default
# python3, with pytest and the pack's test requirements) for the tests; the carried wheels are still
# installed into the scratch folder (for Python 3.12, so they are only checked, not imported).
set -uo pipefail

KIT=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$KIT/../.." && pwd)
CARRY=$REPO/.gpu/carry
OUT=${1:?usage: tests/gpu/run.sh OUT_DIR [--dry-run]}
MODE=gpu
[ "${2:-}" = "--dry-run" ] && MODE=rehearsal
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=${PID_GPU_WORK:-/tmp/pid-gpu-kit-$MODE}
RESULTS=$WORK/results
BUDGET=${RUN_BUDGET_S:-480}
[ "$MODE" = rehearsal ] && BUDGET=${RUN_BUDGET_S:-3600}
START=$SECONDS

rm -rf "$WORK" && mkdir -p "$RESULTS" "$WORK/logs"
exec > >(tee "$WORK/logs/run.log") 2>&1
say() { echo "[run $((SECONDS - START))s] $*"; }
left() { echo $((BUDGET - (SECONDS - START))); }
PHASES=""
phase() {  # phase NAME SECONDS_CAP COMMAND...: runs it (a program: with a time cap), records seconds and status
    local name=$1 cap=$2; shift 2
    local t0=$SECONDS rc
    [ "$cap" -lt 30 ] && cap=30
    say "$name (at most ${cap} s)"
    if declare -F "$1" > /dev/null; then "$@"; else timeout --kill-after=15 "$cap" "$@"; fi
    rc=$?
    [ $rc -eq 124 ] && say "$name: stopped at its cap of ${cap} s"
    PHASES+="{\"name\": \"$name\", \"seconds\": $((SECONDS - t0)), \"status\": $rc},"
    echo "[${PHASES%,}]" > "$RESULTS/phases.json"
    return $rc
}

for f in wheels.tar.xz comfyui.tar.xz wheels.txt; do
    [ -f "$CARRY/$f" ] || { say "error: $CARRY/$f is missing: run tests/gpu/prepare.sh first (and carry .gpu/carry)"; exit 2; }
done

if [ "$MODE" = gpu ]; then
    SERVER_PY=python3
    TEST_PY=python3
    INSTALL_FOR=()
else
    : "${COMFYUI_PY:?the dry run needs COMFYUI_PY (a ComfyUI environment: eval \"\$(tests/comfyui/setup_comfyui.sh)\")}"
    SERVER_PY=$COMFYUI_PY
    TEST_PY=${PYTHON:-python3}
    # the carried wheels are for the GPU machine's Python 3.12
    INSTALL_FOR=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
                 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --only-binary=:all:)
fi

# 1. Setup: the carried wheels into a scratch folder, the carried ComfyUI, what the tests read.
setup() {
    "$SERVER_PY" "$KIT/kit_files.py" unpack "$CARRY/wheels.tar.xz" "$WORK/wheels" || return 1
    "$SERVER_PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --target "$WORK/site" "${INSTALL_FOR[@]}" "$WORK/wheels"/*.whl || return 1
    say "installed $(ls "$WORK/wheels"/*.whl | wc -l) wheels into $WORK/site"
    "$SERVER_PY" "$KIT/kit_files.py" unpack "$CARRY/comfyui.tar.xz" "$WORK/ComfyUI" || return 1
}
phase setup 150 setup || say "setup failed"
export COMFYUI_PATH=$WORK/ComfyUI COMFYUI_PY=$SERVER_PY PID_GPU_WORK=$WORK PYTHONUNBUFFERED=1
if [ "$MODE" = gpu ]; then
    export PYTHONPATH=$WORK/site${PYTHONPATH:+:$PYTHONPATH}
else
    export PID_GPU_REHEARSAL=1 PYTHONPATH=$KIT/bare_image${PYTHONPATH:+:$PYTHONPATH}
    export PID_GPU_IMAGE_PACKAGES="$KIT/gpu_image_packages.txt:$CARRY/wheels.txt:$KIT/bare_image/same_in_image.txt"
fi

# What machine and software this is (the report's first lines).
"$TEST_PY" - "$MODE" "$REPO" "$WORK/ComfyUI" > "$RESULTS/env.json" <<'EOF' || say "could not describe the machine"
import datetime, json, os, pathlib, platform, subprocess, sys
mode, repo, comfy = sys.argv[1:4]
import torch
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
version = pathlib.Path(comfy, "comfyui_version.py")
env = {"mode": mode, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
       "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {os.cpu_count()} cores",
       "driver": run("nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"),
       "comfyui": version.read_text().split("=")[-1].strip().strip("\"'") if version.is_file() else None,
       "commit": run("git", "-C", repo, "rev-parse", "--short", "HEAD")}
print(json.dumps(env))
EOF
say "$(cat "$RESULTS/env.json")"

# 2. Checkpoints made on the spot.
if [ "$MODE" = gpu ]; then SIZE=full DEVICE=cuda; else SIZE=narrow DEVICE=cpu; fi
phase checkpoints 180 "$SERVER_PY" "$KIT/make_checkpoints.py" "$COMFYUI_PATH" "$WORK/models" --size "$SIZE" --device "$DEVICE"
cp "$WORK/models/kit_checkpoints.json" "$RESULTS/checkpoints.json" 2>/dev/null

# 3. pytest -m gpu (the bench keeps at least a quarter of what is left).
TIMEOUT_OPTS=()
"$TEST_PY" -c "import pytest_timeout" 2>/dev/null && TIMEOUT_OPTS=(--timeout 150)  # one hung test fails alone
cap=$(( $(left) * 3 / 4 - 20 )); [ $cap -gt 360 ] && [ "$MODE" = gpu ] && cap=360
phase pytest "$cap" "$TEST_PY" -m pytest -m gpu "$KIT" -p no:cacheprovider -rA "${TIMEOUT_OPTS[@]}" \
    --junitxml "$RESULTS/pytest.xml" -o junit_family=xunit1  # xunit1: the figures as <properties>

# 4. The benchmark against core's PiD.
cap=$(( $(left) - 30 ))
phase benchmark "$cap" "$TEST_PY" "$KIT/bench_core.py" "$RESULTS/bench.json" --deadline $((cap - 30))

# 5. The report and what comes back.
"$TEST_PY" "$KIT/report.py" "$RESULTS" "$OUT/gpu_report.md"
for f in pytest.xml bench.json env.json; do [ -f "$RESULTS/$f" ] && cp "$RESULTS/$f" "$OUT/"; done
say "done in $((SECONDS - START)) s: $OUT/gpu_report.md"
sleep 1  # tee's last lines
cp "$WORK/logs/run.log" "$OUT/run.log"
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude '*.safetensors' logs results
