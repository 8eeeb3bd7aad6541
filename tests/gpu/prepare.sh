#!/usr/bin/env bash
# The GPU kit, step 1 (here, with a package registry): what the bare GPU machine needs beyond its image,
# in .gpu/carry/ (ignored by git), for tests/gpu/run.sh there.
#
#   tests/gpu/prepare.sh [COMFYUI_TARBALL]
#
# 1. downloads the wheels of tests/gpu/wheels.txt (cp312 manylinux x86_64, no dependencies: each one is
#    named there) into .gpu/cache/wheels/;
# 2. repacks them for transport (kit_files.py: uncompressed wheels without comfy-kitchen's AMD backend,
#    all in one xz archive): .gpu/carry/wheels.tar.xz;
# 3. lays out ComfyUI from COMFYUI_TARBALL (default ../shared/comfyui/comfyui-v0.33.0.tar.gz beside
#    this checkout) without its tests and API nodes: .gpu/carry/comfyui.tar.xz;
# 4. prints what travels (the checkout, tracked and untracked-not-ignored files, plus .gpu/carry) and
#    fails if it is over the device tool's 64 MiB.
#
# A second run reuses what is unchanged. PYTHON (default python3) runs pip and the helpers.
set -euo pipefail

KIT=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$KIT/../.." && pwd)
TARBALL=${1:-$REPO/../shared/comfyui/comfyui-v0.33.0.tar.gz}
PY=${PYTHON:-python3}
GPU=$REPO/.gpu
CACHE=$GPU/cache
CARRY=$GPU/carry

say() { echo "[prepare] $*" >&2; }
die() { say "error: $*"; exit 1; }
stamp_of() { cat "$@" | sha256sum | cut -c1-16; }

[ -f "$TARBALL" ] || die "no ComfyUI source tarball at $TARBALL (give its path as the first argument)"
mkdir -p "$CACHE" "$CARRY"

# 1. The wheels (the cache is emptied when the list changes, so it never holds two versions of one).
wanted=$(stamp_of "$KIT/wheels.txt")
if [ "$(cat "$CACHE/wheels/.stamp" 2>/dev/null)" != "$wanted" ]; then
    rm -rf "$CACHE/wheels" && mkdir -p "$CACHE/wheels"
fi
say "downloading the wheels of tests/gpu/wheels.txt"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$CACHE/wheels" -r <(grep -v -E '^\s*(#|$)' "$KIT/wheels.txt") >&2
echo "$wanted" > "$CACHE/wheels/.stamp"
count=$(ls "$CACHE/wheels"/*.whl | wc -l)
expected=$(grep -c -v -E '^\s*(#|$)' "$KIT/wheels.txt")
[ "$count" -eq "$expected" ] || die "$count wheels downloaded for $expected pins in wheels.txt"

# 2. Repacked and archived (redone when the wheels or the repacking change).
wanted=$(stamp_of "$CACHE/wheels/.stamp" "$KIT/kit_files.py")
if [ "$(cat "$CARRY/.wheels.stamp" 2>/dev/null)" != "$wanted" ] || [ ! -f "$CARRY/wheels.tar.xz" ]; then
    say "repacking $count wheels into .gpu/carry/wheels.tar.xz (xz: a minute or two)"
    rm -rf "$CACHE/stored" && mkdir -p "$CACHE/stored"
    "$PY" "$KIT/kit_files.py" repack "$CACHE/wheels" "$CACHE/stored"
    "$PY" "$KIT/kit_files.py" pack "$CACHE/stored" "$CARRY/wheels.tar.xz"
    rm -rf "$CACHE/stored"
    echo "$wanted" > "$CARRY/.wheels.stamp"
else
    say "reusing .gpu/carry/wheels.tar.xz"
fi

# 3. ComfyUI, trimmed and archived.
wanted="$(basename "$TARBALL") $(wc -c < "$TARBALL") $(stamp_of "$KIT/kit_files.py")"
if [ "$(cat "$CARRY/.comfyui.stamp" 2>/dev/null)" != "$wanted" ] || [ ! -f "$CARRY/comfyui.tar.xz" ]; then
    say "laying out ComfyUI from $TARBALL into .gpu/carry/comfyui.tar.xz"
    rm -rf "$CACHE/ComfyUI" && mkdir -p "$CACHE/ComfyUI"
    tar -xzf "$TARBALL" -C "$CACHE/ComfyUI"
    tree=$(find "$CACHE/ComfyUI" -maxdepth 2 -name main.py -printf '%h\n' | sort | head -n 1)
    [ -n "$tree" ] || die "no main.py in $TARBALL"
    "$PY" "$KIT/kit_files.py" trim-comfyui "$tree"
    "$PY" "$KIT/kit_files.py" pack "$tree" "$CARRY/comfyui.tar.xz"
    rm -rf "$CACHE/ComfyUI"
    echo "$wanted" > "$CARRY/.comfyui.stamp"
else
    say "reusing .gpu/carry/comfyui.tar.xz"
fi
grep -v -E '^\s*(#|$)' "$KIT/wheels.txt" > "$CARRY/wheels.txt"

# 4. What travels.
read -r checkout carried < <("$PY" "$KIT/kit_files.py" size "$REPO" "$CARRY")
limit=$((64 * 1024 * 1024))
total=$((checkout + carried))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "GPU kit: checkout $(mib "$checkout") + .gpu/carry $(mib "$carried") (wheels $(mib "$(wc -c < "$CARRY/wheels.tar.xz")"), ComfyUI $(mib "$(wc -c < "$CARRY/comfyui.tar.xz")")) = $(mib "$total") of $(mib "$limit")"
[ "$total" -le "$limit" ] || die "over the device tool's limit by $(mib $((total - limit)))"
