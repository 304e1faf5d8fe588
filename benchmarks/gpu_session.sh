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
# script is known to work before a GPU is ever lent; tests/system/test_gpu_session.py runs it on tiny files.
#
# Runs from the source tree (PYTHONPATH=.), so the machine needs only Python with NumPy, CuPy and pytest.
# The lent H200 machines' image also has PyTorch with CUDA (2.11, cu130, in the device notes of 2026-11):
# the speed benchmark and gpu_step.py time PyTorch eager beside gpunet there (without torch, gpunet alone
# against the floor). No memory benchmark: it trains on the CPU, which is not what a GPU machine's minutes
# are for. OUT_DIR (default $OUT, else a new temp folder) receives nine files: session.log (every
# step's output), pytest-gpu.xml (the GPU tests' JUnit report), graph-<device>.json (eager vs CUDA graph vs
# PyTorch eager, benchmarks/gpu_graph.py), latest-<device>.json and .md (benchmarks/speed.py),
# step-<device>.json (each launch-budget path's step, benchmarks/gpu_step.py), recipe-metrics.json,
# best-metrics.json (--preset best) and smoke-metrics.json. Models and pictures stay in a scratch folder. Each step has a
# time limit (seconds below), cut to what is left of the session's budget (GPU_SESSION_BUDGET seconds, 540 by
# default: a device command may run 600 s at most, and the steps' own limits add up to more than that); once
# the budget is spent the remaining steps are skipped, each with a line in the log. Every step runs even
# when an earlier one fails; the exit status is the number of failed and skipped steps.
#
# To add a step: one `step NAME SECONDS COMMAND...` line below (its output goes to session.log); a result
# file it writes goes straight into "$out", or is copied there with `keep FILE NAME` (missing: no error).
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
budget="${GPU_SESSION_BUDGET:-540}"
failed=0
skipped=0

if [ "$dry" = "1" ]; then  # the CPU rehearsal: same steps, small settings, GPU tests collected (they skip)
    device=cpu
    unset GPUNET_REQUIRE_GPU
    require_gpu=()
    bench_args=(--quick --no-torch --epochs 1 --configs 784-100-10/b128 --pause 0)
    warm_args=(--dry-run --warm-only)
    step_args=(--dry-run --repeat 3)
    graph_args=(--dry-run --steps 2)
    train_args=(--epochs 1 --hidden 32 --val-size 100 --no-plots)
    export GPUNET_SMOKE_MIN_ACCURACY=0
else
    device=gpu
    require_gpu=(GPUNET_REQUIRE_GPU=1)
    bench_args=()
    warm_args=(--warm-only)
    step_args=()
    graph_args=()
    train_args=()
fi

step() {  # step NAME SECONDS COMMAND...: run with a time limit, append its output to the log, count a failure
    local name="$1" limit="$2" left=$((budget - SECONDS))
    shift 2
    if [ "$left" -lt 5 ]; then  # the session's budget is spent: say so, and keep the rest of it for the others
        echo "=== $name: skipped: ${SECONDS} s of the session's $budget s are spent" | tee -a "$log"
        skipped=$((skipped + 1))
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name (at most $limit s): $*" | tee -a "$log"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$scratch/$name.log" 2>&1
    local rc=$?
    cat "$scratch/$name.log" >>"$log"
    [ "$rc" -eq 124 ] && echo "=== $name: stopped at its limit of $limit s" | tee -a "$log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
    tail -n 15 "$scratch/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}
keep() { cp "$1" "$out/$2" 2>/dev/null || true; }  # keep FILE NAME: a step's result file, if it wrote one

{ date -u; echo "gpu_session: device $device$([ "$dry" = 1 ] && echo ' (dry run on the CPU)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: not here"
  "$python" -V; } >"$log" 2>&1
step info 30 "$python" -m gpunet info --device "$device"
# CuPy compiles each kernel on first use (seconds each, the cache starts empty on a fresh machine): here,
# in a step of its own, so that the tests' time limit is spent on the tests
step warm 120 "$python" benchmarks/gpu_step.py "${warm_args[@]}"
# issue 37: eager against the CUDA graph step against PyTorch eager, one table, in the session's
# first minutes (the graph step's default changes only on this measurement)
step graph-compare 120 "$python" benchmarks/gpu_graph.py "${graph_args[@]}" \
    --json "$out/graph-$device.json"
step pytest-gpu 150 env "${require_gpu[@]}" "$python" -m pytest -m gpu -q -rs -p no:cacheprovider \
    --junitxml "$out/pytest-gpu.xml"
step bench 150 "$python" benchmarks/speed.py --device "$device" --data-dir "$data" \
    "${bench_args[@]}" --json "$out/latest-$device.json" --markdown "$out/latest-$device.md"
# every path with a launch budget (one GPU, dropout, a data-parallel rank, --augment, --batch-norm), gpunet
# and PyTorch eager timed alike (events around N steps, one sync); the dry run: the same path, fake CuPy
step gpu-step 90 "$python" benchmarks/gpu_step.py "${step_args[@]}" --json "$out/step-$device.json"
step recipe 120 "$python" -m gpunet train --device "$device" --data-dir "$data" --out "$scratch/recipe" \
    "${train_args[@]}"
keep "$scratch/recipe/metrics.json" recipe-metrics.json
# the best preset (issue 25: 784-1024-1024-10, 120 epochs, every training image distorted afresh each epoch on
# the GPU), bounded: metrics.json holds its test accuracy and seconds per epoch; the log has every epoch's line
# if the limit stops it (about 60 launches a step: some 0.6 ms of host time, so 120 epochs should take ~1 min)
step best 150 "$python" -m gpunet train --preset best --device "$device" --data-dir "$data" --out "$scratch/best" \
    "${train_args[@]}"
keep "$scratch/best/metrics.json" best-metrics.json
step smoke 60 env OUT_DIR="$scratch/smoke" GPUNET_DEVICE="$device" PYTHON="$python" sh docker/smoke.sh \
    --device "$device" "${train_args[@]}"
keep "$scratch/smoke/metrics.json" smoke-metrics.json
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
echo "failed steps: $failed; skipped steps: $skipped (budget $budget s, $SECONDS s spent)" | tee -a "$log"
exit $((failed + skipped))
