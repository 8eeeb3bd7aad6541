#!/usr/bin/env bash
# Set up a ComfyUI for the integration and browser tests: its source tree and a Python environment
# with its requirements and this pack's, torch pinned to a CPU build. Used by .ci/run and SETUP.md.
#
#   tests/comfyui/setup_comfyui.sh [SOURCE] [DEST]
#
# SOURCE  a ComfyUI source tarball (default: ../shared/comfyui/comfyui-v0.33.0.tar.gz beside this
#         checkout), or a ComfyUI folder (with main.py), used where it is.
# DEST    where the extracted tree (DEST/ComfyUI) and the environment (DEST/venv) go; default .comfyui/
#         in this checkout (ignored by git).
#
# Environment: PYTHON (default python3, 3.10+), TORCH_VERSION (2.13.0), TORCHVISION_VERSION (0.28.0, the
# one that goes with that torch).
# Its only output (everything else goes to stderr) is two lines for the tests, to eval:
#   export COMFYUI_PATH=...   export COMFYUI_PY=...
# so `eval "$(tests/comfyui/setup_comfyui.sh)"` sets both. A second run reuses what a finished first run
# made (delete DEST to start again).
set -euo pipefail

PACK=$(cd "$(dirname "$0")/../.." && pwd)
SOURCE=${1:-$PACK/../shared/comfyui/comfyui-v0.33.0.tar.gz}
DEST=${2:-$PACK/.comfyui}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.28.0}

say() { echo "[setup_comfyui] $*" >&2; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" >&2; }
die() { say "error: $*"; exit 1; }

mkdir -p "$DEST"
DEST=$(cd "$DEST" && pwd)

# 1. The source tree.
if [ -d "$SOURCE" ]; then
    [ -f "$SOURCE/main.py" ] || die "$SOURCE has no main.py: give a ComfyUI folder or its source tarball"
    COMFYUI=$(cd "$SOURCE" && pwd)
elif [ -f "$SOURCE" ]; then
    stamp="$(basename "$SOURCE") $(wc -c < "$SOURCE")"
    if [ "$(cat "$DEST/ComfyUI/.extracted-from" 2>/dev/null)" != "$stamp" ]; then
        say "extracting $SOURCE into $DEST/ComfyUI"
        rm -rf "$DEST/ComfyUI" && mkdir -p "$DEST/ComfyUI"
        tar -xzf "$SOURCE" -C "$DEST/ComfyUI"
        echo "$stamp" > "$DEST/ComfyUI/.extracted-from"
    fi
    # the tarball holds the tree itself, or one folder with it
    COMFYUI=$(find "$DEST/ComfyUI" -maxdepth 2 -name main.py -printf '%h\n' | sort | head -n 1)
    [ -n "$COMFYUI" ] || die "no main.py in $SOURCE"
else
    die "no ComfyUI at $SOURCE (the source tarball is in ../shared/comfyui/ beside a checkout; or give a ComfyUI folder)"
fi

# 2. Its Python environment.
VENV=$DEST/venv
PY=$VENV/bin/python
wanted="torch $TORCH_VERSION torchvision $TORCHVISION_VERSION $(cat "$COMFYUI/requirements.txt" "$PACK/requirements.txt" | sha256sum | cut -c1-16)"
if [ "$(cat "$VENV/.pid-setup" 2>/dev/null)" != "$wanted" ]; then
    say "making $VENV (ComfyUI's requirements, torch $TORCH_VERSION CPU)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    # torch first and pinned, so nothing pulls another build; if pip would pick a CUDA build on your
    # platform, set PIP_INDEX_URL=https://download.pytorch.org/whl/cpu (torchvision/torchaudio come from there too)
    pip_install "torch==$TORCH_VERSION"
    # the torchvision that goes with that torch, and torchaudio (the newest pins another torch: no deps)
    pip_install --no-deps "torchvision==$TORCHVISION_VERSION" torchaudio
    # ComfyUI's requirements without the torch trio, torch/torchvision held where they are; then the pack's
    grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFYUI/requirements.txt" > "$DEST/comfyui-requirements.txt"
    printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$DEST/torch-pin.txt"
    pip_install -r "$DEST/comfyui-requirements.txt" -r "$PACK/requirements.txt" -c "$DEST/torch-pin.txt"

    # ComfyUI imports torchvision and torchaudio at start-up. Their PyPI wheels are CUDA builds whose
    # compiled parts do not load beside a CPU torch; CPU builds import as they are. Otherwise let both
    # run as pure Python: torchaudio loads without its libraries, and torchvision registers fake kernels
    # for nms/qnms only when those ops exist (ComfyUI's start-up path uses transforms, not those ops).
    if ! "$PY" -c 'import torchvision, torchaudio' 2>/dev/null; then
        say "torchvision/torchaudio do not import beside this torch: making them run as pure Python"
        SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        rm -f "$SITE"/torchaudio/lib/*.so
        sed -i -E 's/^@torch\.library\.register_fake\("torchvision::(q?nms)"\)/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))/' \
            "$SITE/torchvision/_meta_registrations.py"
    fi
    "$PY" -c 'import torch, torchvision, torchaudio; print("[setup_comfyui] torch", torch.__version__, "torchvision", torchvision.__version__, "torchaudio", torchaudio.__version__)' >&2 \
        || die "torch/torchvision/torchaudio do not import in $VENV"
    echo "$wanted" > "$VENV/.pid-setup"
else
    say "reusing $VENV"
fi

printf 'export COMFYUI_PATH=%q\nexport COMFYUI_PY=%q\n' "$COMFYUI" "$PY"
