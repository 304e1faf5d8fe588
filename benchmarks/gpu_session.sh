#!/usr/bin/env bash
# Everything a GPU check needs, in one command, for a lent GPU machine where device time is short (about
# 10 minutes, start-up included): the GPU tests (which must not skip there), the GPU benchmark configs,
# the default MNIST recipe on the GPU, docker/smoke.sh's checks, and docker/test-image.sh --gpus all where a
# container engine works.
#
#   bash benchmarks/gpu_session.sh [--dry-run] MNIST_DIR [OUT_DIR]
#
# --dry-run (or GPUNET_DRY_RUN=1) rehearses the very same steps on the CPU with small settings (the GPU
# tests are collected and skip, one quick benchmark config, a one-epoch recipe on a small net), so the
# script is known to work before a GPU is ever lent; tests/test_gpu_session.py runs it on tiny files.
#
# Runs from the source tree (PYTHONPATH=.), so the machine needs only Python with NumPy, CuPy and pytest.
# Without torch there, the benchmark times gpunet alone. The benchmark skips its peak-memory children: they
# train on the CPU, which is not what a GPU machine's minutes are for.
# OUT_DIR (default $OUT, else a new temp folder) receives five files, since a lent machine sends back at
# most eight: session.log (every step's output), latest-<device>.json and .md (the benchmark),
# recipe-metrics.json and smoke-metrics.json. Models and pictures stay in a scratch folder. Each step has a
# time limit (seconds below) so that the whole run ends within its budget; every step runs even when an
# earlier one fails; the exit status is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

dry="${GPUNET_DRY_RUN:-0}"
if [ "${1:-}" = "--dry-run" ]; then
    dry=1
    shift
fi
data="${1:?usage: gpu_session.sh [--dry-run] MNIST_DIR [OUT_DIR]}"
out="${2:-${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpunet-gpu.XXXXXX")}}"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpunet-gpu-scratch.XXXXXX")"
mkdir -p "$out"
log="$out/session.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" GPUNET_DATA="$data" PYTHONUNBUFFERED=1
python="${PYTHON:-python3}"
failed=0

if [ "$dry" = "1" ]; then  # the CPU rehearsal: same steps, small settings, GPU tests collected (they skip)
    device=cpu
    unset GPUNET_REQUIRE_GPU
    require_gpu=()
    bench_args=(--quick --no-torch --epochs 1 --configs 784-100-10/b128)
    train_args=(--epochs 1 --hidden 32 --val-size 100 --no-plots)
    export GPUNET_SMOKE_MIN_ACCURACY=0
else
    device=gpu
    require_gpu=(GPUNET_REQUIRE_GPU=1)
    bench_args=()
    train_args=()
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, append its output to the log, count a failure
    local name="$1" limit="$2"
    shift 2
    echo "=== $name: $*" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$scratch/$name.log" 2>&1
    local rc=$?
    cat "$scratch/$name.log" >>"$log"
    [ "$rc" -eq 124 ] && echo "=== $name: stopped at its limit of $limit s" | tee -a "$log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    tail -n 15 "$scratch/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{ date -u; echo "gpu_session: device $device$([ "$dry" = 1 ] && echo ' (dry run on the CPU)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not here"
  "$python" -V; } >"$log" 2>&1
step info 30 "$python" -m gpunet info --device "$device"
step pytest-gpu 150 env "${require_gpu[@]}" "$python" -m pytest -m gpu -q -rs -p no:cacheprovider
step bench 150 "$python" benchmarks/bench_mlp.py --device "$device" --data-dir "$data" --no-memory \
    "${bench_args[@]}" --json "$out/latest-$device.json" --markdown "$out/latest-$device.md"
step recipe 120 "$python" -m gpunet train --device "$device" --data-dir "$data" --out "$scratch/recipe" \
    "${train_args[@]}"
cp "$scratch/recipe/metrics.json" "$out/recipe-metrics.json" 2>/dev/null
step smoke 60 env OUT_DIR="$scratch/smoke" GPUNET_DEVICE="$device" PYTHON="$python" sh docker/smoke.sh \
    --device "$device" "${train_args[@]}"
cp "$scratch/smoke/metrics.json" "$out/smoke-metrics.json" 2>/dev/null
# The image, where this host has a working container engine: docker/test-image.sh builds it and runs CI's
# checks with the GPU visible in the containers (--gpus all). Its base and wheelhouse need Debian's and
# PyPI's servers (or GPUNET_TEST_BASE and a filled docker/wheels/). The dry run only says what would run.
if (docker info || podman info) >/dev/null 2>&1; then
    if [ "$dry" = "1" ]; then
        echo "=== image: dry run: would run docker/test-image.sh --gpus all (a container engine is here)" | tee -a "$log"
    else
        step image 480 env GPUNET_DATA="$data" PYTHON="$python" bash docker/test-image.sh --gpus all
    fi
else
    echo "=== image: no working container engine (docker or podman) here: skipped" | tee -a "$log"
fi
echo "failed steps: $failed" | tee -a "$log"
exit "$failed"
