#!/usr/bin/env bash
# The speed figures on a GPU: this pack next to the reference's network (bench --reference), the
# pixel-block chunk policy, the attention kernel choice and CUDA graphs, in one run that ends within
# RUN_BUDGET_S (default 540 s) with whatever finished. Needs no registry: torch and this checkout, plus
# the reference's Python package (never committed: .gpu/ is ignored).
#
#   tests/gpu/speed.sh --prepare REFERENCE_CHECKOUT   # here: its pid/ package and the two key lists into .gpu/reference
#   tests/gpu/speed.sh OUT_DIR                        # there, with .gpu/reference carried: OUT_DIR/speed.txt
#   tests/gpu/speed.sh OUT_DIR --dry-run              # the same steps on the CPU at 64 px (plumbing only)
#
# The steps, most wanted first (each gets the time left, so a slow one never hides the ones before it):
#   1. 2048 px, eager and compiled: times, first call, peaks, working memory, ratio, PSNR;
#   2. the chunk policy at 2048 and 4096: chunks on, whole, and what the policy chooses (time, memory);
#   3. the attention kernel: the rule, PyTorch's own order, the timing probe (2048, eager);
#   4. 4096 px, eager and compiled, against the reference;
#   5. CUDA graphs for the compiled blocks (compile mode reduce-overhead, 2048).
set -uo pipefail

KIT=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$KIT/../.." && pwd)
REFERENCE=${PID_SPEED_KIT:-$REPO/.gpu/reference}  # tests point it elsewhere
PYTHON=${PYTHON:-python3}

if [ "${1:-}" = "--prepare" ]; then
    CHECKOUT=${2:?usage: tests/gpu/speed.sh --prepare REFERENCE_CHECKOUT}
    [ -f "$CHECKOUT/pid/_src/networks/pid_net.py" ] || { echo "no nv-tlabs/PiD checkout at $CHECKOUT" >&2; exit 2; }
    SHARED=${PID_SHARED:-$REPO/../shared}
    rm -rf "$REFERENCE" && mkdir -p "$REFERENCE/shared/spec/keys"
    (cd "$CHECKOUT" && find pid -name '*.py' -print0 | tar --null -cf - -T -) | tar -xf - -C "$REFERENCE"
    for keys in PiD_res2k_sr4x_official_flux_distill_4step.txt PiD_v1pt5_res2kto4k_sr4x_official_flux_distill_4step.txt; do
        cp "$SHARED/spec/keys/$keys" "$REFERENCE/shared/spec/keys/" 2>/dev/null \
            || echo "no $keys in $SHARED/spec/keys: the benchmark builds the released v1 sizes instead"
    done
    echo "speed kit: $(du -sh "$REFERENCE" | cut -f1) in $REFERENCE (carry .gpu/reference)"
    exit 0
fi

OUT=${1:?usage: tests/gpu/speed.sh OUT_DIR [--dry-run] | --prepare REFERENCE_CHECKOUT}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
[ -f "$REFERENCE/pid/_src/networks/pid_net.py" ] || { echo "no $REFERENCE: run tests/gpu/speed.sh --prepare first" >&2; exit 2; }
export PID_SHARED=$REFERENCE/shared
BUDGET=${RUN_BUDGET_S:-540}
START=$SECONDS
cd "$REPO"

if [ "${2:-}" = "--dry-run" ]; then
    # compile stays off: the plumbing is the point, inductor's CPU code is no figure of the GPU's, and the
    # reference's compiled whole network crashes in it (torch 2.13.0+cpu)
    SMALL=(--narrow --layout v1.5 --device cpu --runs 1); BIG=64; HUGE=64; BOTH=off; GRAPHS=off
    CHUNK=(--narrow --layout v1.5 --device cpu --sizes 64); [ -z "${RUN_BUDGET_S:-}" ] && BUDGET=900
else
    SMALL=(--runs 3); BIG=2048; HUGE=4096; BOTH=off,on; GRAPHS=reduce-overhead
    CHUNK=(--device cuda --dtype bf16 --sizes "$BIG,$HUGE")
fi

step() {  # step NAME [ENV=VALUE ...] -- ARGS...: one bench command within the time left; its output into speed.txt
    local name=$1; shift
    local env=()
    while [ "$1" != "--" ]; do env+=("$1"); shift; done; shift
    local left=$((BUDGET - (SECONDS - START) - 10))
    if [ "$left" -lt 30 ]; then
        echo "## $name: not run ($left s left of $BUDGET s)" | tee -a "$OUT/speed.txt"; return
    fi
    echo "## $name" | tee -a "$OUT/speed.txt"
    echo "\$ ${env[*]} python -m pid_core bench $*" | tee -a "$OUT/speed.txt"
    local took=$SECONDS
    env "${env[@]}" timeout --kill-after=10 "$left" "$PYTHON" -m pid_core bench "$@" --json "$OUT/speed.jsonl" \
        2>&1 | tee -a "$OUT/speed.txt"
    echo "## $name: exit ${PIPESTATUS[0]} after $((SECONDS - took)) s" | tee -a "$OUT/speed.txt"
}

: > "$OUT/speed.txt"
"$PYTHON" -c "import torch; print('# torch', torch.__version__, '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" \
    | tee -a "$OUT/speed.txt"
step "1. against the reference, $BIG px" -- --reference "$REFERENCE" "${SMALL[@]}" --sizes "$BIG" --compile "$BOTH"
step "2. pixel-block chunks: on, whole, the policy's choice" -- "${CHUNK[@]}" --modes untiled --chunk on,off,auto \
    --steps 4 --no-seam
step "3a. attention: PyTorch's own kernel order" PID_ATTENTION=default -- --reference "$REFERENCE" "${SMALL[@]}" \
    --sizes "$BIG" --compile off
step "3b. attention: the timing probe" PID_ATTENTION=probe -- --reference "$REFERENCE" "${SMALL[@]}" --sizes "$BIG" \
    --compile off
step "4. against the reference, $HUGE px" -- --reference "$REFERENCE" "${SMALL[@]}" --sizes "$HUGE" --compile "$BOTH"
step "5. CUDA graphs for the compiled blocks" -- --reference "$REFERENCE" "${SMALL[@]}" --sizes "$BIG" \
    --compile "$GRAPHS"
echo "# done in $((SECONDS - START)) s" | tee -a "$OUT/speed.txt"
