#!/usr/bin/env bash
# Everything a GPU check needs, in one command, for a lent GPU machine where device time is short:
# the GPU tests, the GPU benchmark, the default MNIST recipe on the GPU, and docker/smoke.sh.
#
#   bash benchmarks/gpu_session.sh MNIST_DIR [OUT_DIR]
#
# Runs from the source tree (PYTHONPATH=.), so the machine needs only Python with NumPy, CuPy and pytest.
# Without torch there, the benchmark times gpunet alone (the GPU ratio to PyTorch stays unmeasured).
# OUT_DIR (default $OUT, else a new temp folder) receives four files only, since a lent machine sends back at
# most eight: session.log (every step's output), latest-gpu.json, latest-gpu.md and recipe-metrics.json.
# Models and pictures stay in a scratch folder. Every step runs even when an earlier one fails; the exit
# status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

data="${1:?usage: gpu_session.sh MNIST_DIR [OUT_DIR]}"
out="${2:-${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpunet-gpu.XXXXXX")}}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpunet-gpu-scratch.XXXXXX")"
mkdir -p "$out"
log="$out/session.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GPUNET_DATA="$data"
failed=0

step() {  # step NAME COMMAND...: run, append its output to the log, count a failure
    local name="$1"
    shift
    echo "=== $name: $*" | tee -a "$log"
    local start=$SECONDS
    "$@" >"$scratch/$name.log" 2>&1
    local rc=$?
    cat "$scratch/$name.log" >>"$log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    tail -n 15 "$scratch/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -V; } \
    >"$log" 2>&1
step info python3 -m gpunet info --device gpu
step pytest-gpu env GPUNET_REQUIRE_GPU=1 python3 -m pytest -m gpu -q -rs -p no:cacheprovider
step bench-gpu python3 benchmarks/bench_mlp.py --device gpu --data-dir "$data" \
    --json "$out/latest-gpu.json" --markdown "$out/latest-gpu.md"
step recipe-gpu python3 -m gpunet train --device gpu --data-dir "$data" --out "$scratch/recipe"
cp "$scratch/recipe/metrics.json" "$out/recipe-metrics.json" 2>/dev/null
step smoke env OUT_DIR="$scratch/smoke" GPUNET_DEVICE=gpu PYTHON=python3 sh docker/smoke.sh
echo "failed steps: $failed" | tee -a "$log"
exit "$failed"
