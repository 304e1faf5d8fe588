#!/usr/bin/env bash
# Build the image from this checkout with a real container engine and use it as a user would.
#
#   GPUNET_DATA=/path/to/mnist docker/test-image.sh [--gpus all]
#
# 1. base: a Debian bookworm image made here with mmdebstrap (no registry needed; kept in the engine as
#    gpunet-base:bookworm and reused), or GPUNET_TEST_BASE=IMAGE (any image with Python >= 3.10 or apt-get);
# 2. wheelhouse: `pip download` on the host fills docker/wheels/ for the base's Python (the host's pip cache
#    makes this quick), so the build needs no package index (--build-arg PIP_OFFLINE=1);
# 3. build docker/Dockerfile, unchanged, tagged gpunet:local (label org.gpunet.source: the checkout's digest);
# 4. run it: `gpunet info`, gpunet-smoke, training on MNIST mounted read-only into a mounted folder as uid
#    1000 and as --user 4242:4242, `stop` during training (exit 143, a checkpoint) and --resume in a new
#    container (bit-identical to an uninterrupted run), `gpunet serve` with its port published (a picture,
#    then 64 clients x 20 pictures and 400 idle connections from the host), `mpiexec -n 2 gpunet train`,
#    every CUDA kernel compiled by the image's NVRTC with its headers (tests/support/cuda_compile.py); the size.
#
# --gpus all (a GPU host with NVIDIA's container toolkit; podman gets CDI's --device nvidia.com/gpu=all)
# runs the same checks with the GPU visible, builds with the cuda12-libs extra (cuBLAS: the Debian base has
# no CUDA) and requires `gpunet info` to report the GPU.
#
# Engine: podman, else docker (GPUNET_CONTAINER_ENGINE=podman|docker to choose). podman runs with the OCI
# runtime runc where installed (crun refuses hybrid cgroups) and every container and build with ulimits
# nofile=1024:4096, nproc=4096:4096 (podman's defaults ask for more than some machines allow a process to
# raise), so no containers.conf is needed. PYTHON: the host's Python with pip (default python3).
# Files: docker/.build/ (logs, the runs' folders) and docker/wheels/, both git-ignored.
# Exit status: 0 when every check passed; 77 when no container engine works here (tests skip on it, or fail
# under GPUNET_REQUIRE_CONTAINER=1); 1 when a check failed (its name and the reason are printed).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=gpunet:local
BASE_TAG=gpunet-base:bookworm
WORK="$PWD/docker/.build"
PYTHON="${PYTHON:-python3}"
EXTRAS=cuda12,cli,numba,mpi
GPUS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) GPUS=(--gpus "${2:?--gpus needs a value, e.g. all}"); shift 2 ;;
        --gpus=*) GPUS=(--gpus "${1#--gpus=}"); shift ;;
        -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
        *) echo "test-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
DATA="${GPUNET_DATA:?test-image: set GPUNET_DATA to the folder with the four MNIST files}"
DATA="$(cd "$DATA" && pwd)"
START=$SECONDS
step_start=$SECONDS

say() { echo "test-image: $*"; }
fail() { echo "test-image: FAILED: $*" >&2; exit 1; }
step() { step_start=$SECONDS; say "--- $*"; }
passed() { say "ok: $* ($((SECONDS - step_start)) s)"; }

# --- the engine --------------------------------------------------------------------------------------------
choice="${GPUNET_CONTAINER_ENGINE:-}"
ENGINE=()
if [ "$choice" != docker ] && command -v podman >/dev/null; then
    ENGINE=(podman)
    if command -v runc >/dev/null; then ENGINE+=(--runtime "$(command -v runc)"); fi
    "${ENGINE[@]}" info >/dev/null 2>&1 || ENGINE=()
fi
if [ ${#ENGINE[@]} -eq 0 ] && [ "$choice" != podman ] && command -v docker >/dev/null \
        && docker info >/dev/null 2>&1; then
    ENGINE=(docker)
fi
if [ ${#ENGINE[@]} -eq 0 ]; then
    say "no container engine works here (podman or docker${choice:+, asked for $choice}): nothing tested"
    exit 77
fi
engine() { "${ENGINE[@]}" "$@"; }
LIMITS=(--ulimit nofile=1024:4096 --ulimit nproc=4096:4096)
BUILD_FORMAT=()
if [ "${ENGINE[0]}" = podman ]; then
    BUILD_FORMAT=(--format docker)  # OCI images have no SHELL: the Dockerfile's pipefail would be dropped
    if [ ${#GPUS[@]} -gt 0 ]; then GPUS=(--device "nvidia.com/gpu=${GPUS[1]}"); fi
fi
if [ ${#GPUS[@]} -gt 0 ]; then EXTRAS="$EXTRAS,cuda12-libs"; fi
RUN=(run --rm "${LIMITS[@]}" "${GPUS[@]}")
say "engine: ${ENGINE[*]} ($(engine --version)); GPUs: ${GPUS[*]:-none}; data: $DATA"

# One run at a time on this machine: checkouts share the engine's images and the gpunet-test-* names.
mkdir -p "$WORK"
if command -v flock >/dev/null; then
    exec 9>"${TMPDIR:-/tmp}/gpunet-test-image.lock"
    flock 9
fi
cleanup() {  # one name at a time: a missing one makes the engine skip the others
    local name
    for name in gpunet-test-stop gpunet-test-serve; do engine rm -f "$name" >/dev/null 2>&1 || true; done
}
trap cleanup EXIT
cleanup

# --- 1. the base -------------------------------------------------------------------------------------------
step "base"
BASE="${GPUNET_TEST_BASE:-}"
if [ -z "$BASE" ]; then
    BASE=$BASE_TAG
    if ! engine image inspect "$BASE" >/dev/null 2>&1; then
        command -v mmdebstrap >/dev/null || fail "base: mmdebstrap is needed to make the Debian base \
(apt-get install mmdebstrap), or set GPUNET_TEST_BASE to an image with Python >= 3.10"
        rm -f "$WORK/base.tar"
        mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates bookworm \
            "$WORK/base.tar" || fail "base: mmdebstrap could not make a Debian bookworm base"
        engine import "$WORK/base.tar" "$BASE" >/dev/null
        rm -f "$WORK/base.tar"
    fi
fi
read -r PY_VERSION GLIBC ARCH < <(engine "${RUN[@]}" --entrypoint python3 "$BASE" -c \
    'import platform, sys; print("%d.%d" % sys.version_info[:2], platform.libc_ver()[1], platform.machine())') \
    || fail "base: $BASE has no python3"
passed "base $BASE: Python $PY_VERSION, glibc $GLIBC, $ARCH"

# --- 2. the wheelhouse -------------------------------------------------------------------------------------
step "wheelhouse (extras $EXTRAS)"
"$PYTHON" docker/build_inputs.py requirements "$EXTRAS" >"$WORK/requirements.txt"
read -r -a TARGET < <("$PYTHON" docker/build_inputs.py pip-target "$PY_VERSION" "$GLIBC" "$ARCH")
"$PYTHON" -m pip download --quiet --disable-pip-version-check --dest docker/wheels "${TARGET[@]}" \
    -r "$WORK/requirements.txt" >"$WORK/wheelhouse.log" 2>&1 \
    || { tail -n 20 "$WORK/wheelhouse.log" >&2; fail "wheelhouse: pip download failed (docker/.build/wheelhouse.log)"; }
passed "wheelhouse docker/wheels: $(find docker/wheels -name '*.whl' | wc -l) wheels, $(du -sh docker/wheels | cut -f1)"

# --- 3. the build ------------------------------------------------------------------------------------------
step "build $IMAGE"
SOURCE="$("$PYTHON" docker/build_inputs.py digest)"
engine build "${BUILD_FORMAT[@]}" "${LIMITS[@]}" -f docker/Dockerfile -t "$IMAGE" \
    --build-arg BASE_IMAGE="$BASE" --build-arg PIP_OFFLINE=1 --build-arg GPUNET_EXTRAS="$EXTRAS" \
    --build-arg GPUNET_SOURCE="$SOURCE" . >"$WORK/build.log" 2>&1 \
    || { tail -n 40 "$WORK/build.log" >&2; fail "build: see docker/.build/build.log"; }
size=$(engine image inspect --format '{{.Size}}' "$IMAGE")
passed "built $IMAGE from $BASE: $((size / 1000000)) MB (source $SOURCE)"

# --- 4. the image, as a user runs it -----------------------------------------------------------------------
RUNS="$WORK/runs"
rm -rf "$RUNS"
mkdir -p "$RUNS/u1000" "$RUNS/u4242" "$RUNS/stop"
chown 1000:1000 "$RUNS/u1000" "$RUNS/stop" 2>/dev/null || chmod 0777 "$RUNS/u1000" "$RUNS/stop"
chown 4242:4242 "$RUNS/u4242" 2>/dev/null || chmod 0777 "$RUNS/u4242"
MOUNTS=(-v "$DATA:/data:ro" -v "$RUNS:/runs")
TRAIN=(train --hidden 32 --epochs 3 --val-size 1000)

step "gpunet info (the default command)"
info="$(engine "${RUN[@]}" "$IMAGE")" || fail "info: exit $?"
echo "$info" | sed 's/^/    /'
if [ ${#GPUS[@]} -gt 0 ]; then
    grep -q '^device: gpu (' <<<"$info" || fail "info: the GPU is not used in the container"
else
    grep -q '^device: cpu, NumPy backend (GPU not used: ' <<<"$info" || fail "info: no CPU device with its reason"
fi
grep -q 'CPU kernels compiled with numba' <<<"$info" || fail "info: numba compiles no CPU kernel"
passed "gpunet info"

step "gpunet-smoke"
engine "${RUN[@]}" "${MOUNTS[@]}" -e OUT_DIR=/runs/u1000/smoke --entrypoint gpunet-smoke "$IMAGE" \
    --hidden 32 --val-size 1000 --no-plots >"$WORK/smoke.log" 2>&1 || { tail -n 20 "$WORK/smoke.log" >&2; fail "smoke: exit status not 0"; }
grep '^test_accuracy: ' "$WORK/smoke.log" | sed 's/^/    /' || fail "smoke: no test_accuracy line"
passed "gpunet-smoke"

train_as() {  # train_as USER FOLDER: train into /runs/FOLDER as USER (uid:gid), then check what it wrote
    local user="$1" folder="$2" uid="${1%%:*}"
    local info
    info="$(engine "${RUN[@]}" "${MOUNTS[@]}" --user "$user" "$IMAGE" info)" || fail "info as $user: exit $?"
    grep -q 'CPU kernels compiled with numba' <<<"$info" \
        || fail "as $user: numba compiles no CPU kernel (its cache folder is not writable?)"
    engine "${RUN[@]}" "${MOUNTS[@]}" --user "$user" --entrypoint sh "$IMAGE" -c \
        'touch "$CUPY_CACHE_DIR/probe" "$NUMBA_CACHE_DIR/probe"' || fail "as $user: a kernel cache is not writable"
    engine "${RUN[@]}" "${MOUNTS[@]}" --user "$user" "$IMAGE" "${TRAIN[@]}" --epochs 1 --out "/runs/$folder/run" \
        >"$WORK/train-$uid.log" 2>&1 || { tail -n 20 "$WORK/train-$uid.log" >&2; fail "train as $user: exit not 0"; }
    for f in model.npz metrics.json curves.png confusion.png misclassified.png; do
        [ -s "$RUNS/$folder/run/$f" ] || fail "train as $user: no $f in the mounted folder"
        [ "$(stat -c %u "$RUNS/$folder/run/$f")" = "$uid" ] || fail "train as $user: $f is not owned by $uid"
    done
}
step "training on read-only MNIST into a mounted folder, as uid 1000 and as --user 4242:4242"
train_as 1000:1000 u1000
train_as 4242:4242 u4242
passed "training as 1000 and 4242 (model, metrics and pictures written and owned by each)"

step "stop during training, then --resume in a new container"
# 30 epochs, not TRAIN's 3: on a quiet machine an epoch of this small net takes 0.15 s, and 3 epochs ended
# before the stop (polled every 0.5 s after epoch 1) arrived: exit 0, not 143, once in CI
STOP_TRAIN=("${TRAIN[@]}" --epochs 30)
engine "${RUN[@]}" "${MOUNTS[@]}" "$IMAGE" "${STOP_TRAIN[@]}" --no-plots --out /runs/stop/whole >"$WORK/whole.log" 2>&1 \
    || { tail -n 20 "$WORK/whole.log" >&2; fail "stop: the uninterrupted run failed"; }
engine run -d --name gpunet-test-stop "${LIMITS[@]}" "${GPUS[@]}" "${MOUNTS[@]}" "$IMAGE" "${STOP_TRAIN[@]}" \
    --no-plots --out /runs/stop/cut >/dev/null
for _ in $(seq 600); do  # until the first epoch ends (at most 5 minutes)
    engine logs gpunet-test-stop 2>&1 | grep -qE 'epoch +1/30' && break
    [ "$(engine inspect --format '{{.State.Running}}' gpunet-test-stop)" = true ] || break
    sleep 0.5
done
engine stop -t 60 gpunet-test-stop >/dev/null
status=$(engine inspect --format '{{.State.ExitCode}}' gpunet-test-stop)
engine logs gpunet-test-stop >"$WORK/cut.log" 2>&1
[ "$status" = 143 ] || { tail -n 20 "$WORK/cut.log" >&2; fail "stop: exit status $status, not 143"; }
[ -s "$RUNS/stop/cut/checkpoint.npz" ] || fail "stop: no checkpoint.npz in the mounted folder"
[ ! -e "$RUNS/stop/cut/model.npz" ] || fail "stop: the run had finished before the stop"
{ grep 'SIGTERM' "$WORK/cut.log" || true; } | tail -n 1 | sed 's/^/    /'
engine "${RUN[@]}" "${MOUNTS[@]}" "$IMAGE" "${STOP_TRAIN[@]}" --no-plots --out /runs/stop/cut --resume \
    >"$WORK/resume.log" 2>&1 || { tail -n 20 "$WORK/resume.log" >&2; fail "stop: --resume failed"; }
engine "${RUN[@]}" -v "$RUNS/stop:/stop:ro" --entrypoint python "$IMAGE" -c '
import numpy as np, sys
a, b = np.load("/stop/whole/model.npz"), np.load("/stop/cut/model.npz")
same = sorted(a.files) == sorted(b.files) and all(
    a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a.files)
print("    %d arrays of model.npz, resumed vs uninterrupted: %s" % (len(a.files), "bit-identical" if same else "DIFFERENT"))
sys.exit(0 if same else 1)' || fail "stop: the resumed model differs from the uninterrupted one"
passed "stop: exit 143, checkpoint, resumed model bit-identical"

step "gpunet serve with its port published"
port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
engine run -d --name gpunet-test-serve "${LIMITS[@]}" "${GPUS[@]}" -p "127.0.0.1:$port:8000" \
    -v "$RUNS/u1000/run:/model:ro" "$IMAGE" serve /model/model.npz --host 0.0.0.0 --port 8000 >/dev/null
health=""
for _ in $(seq 120); do
    health="$("$PYTHON" -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$port/health', timeout=5).read().decode())" 2>/dev/null)" && break
    sleep 0.5
done
say "    GET /health -> ${health:-no answer}"
grep -q '"model": "model.npz"' <<<"$health" || { engine logs gpunet-test-serve >&2; fail "serve: no /health"; }
timeout 300 "$PYTHON" tests/support/serve_load.py --url "http://127.0.0.1:$port" --data "$DATA" --clients 1 --pictures 1 \
    --idle 1 | sed 's/^/    /' || fail "serve: a picture POSTed from the host was not answered"
timeout 300 "$PYTHON" tests/support/serve_load.py --url "http://127.0.0.1:$port" --data "$DATA" --clients 64 --pictures 20 \
    --idle 400 | sed 's/^/    /' || fail "serve: requests failed under load"
stop_start=$SECONDS
engine stop -t 30 gpunet-test-serve >/dev/null
status=$(engine inspect --format '{{.State.ExitCode}}' gpunet-test-serve)
[ "$status" = 0 ] || fail "serve: stop gave exit status $status, not 0 (SIGTERM ignored by PID 1?)"
passed "serve: health, a picture, 64 x 20 pictures and 400 idle connections; stopped in $((SECONDS - stop_start)) s"

step "mpiexec -n 2 gpunet train"
engine "${RUN[@]}" "${MOUNTS[@]}" --entrypoint mpiexec "$IMAGE" -n 2 gpunet "${TRAIN[@]}" --epochs 1 \
    --batch-size 1024 --no-plots --out /runs/u1000/mpi >"$WORK/mpi.log" 2>&1 || { tail -n 20 "$WORK/mpi.log" >&2; fail "mpiexec: exit not 0"; }
{ grep -E '^(gpunet|test accuracy)' "$WORK/mpi.log" || true; } | sed 's/^/    /'
[ -s "$RUNS/u1000/mpi/model.npz" ] || fail "mpiexec: no model.npz"
passed "mpiexec -n 2"

step "every CUDA kernel compiled by the image's NVRTC with its own headers and CuPy's options"
engine "${RUN[@]}" -v "$PWD/tests:/tests:ro" --entrypoint python "$IMAGE" /tests/support/cuda_compile.py \
    >"$WORK/nvrtc.log" 2>&1 || { cat "$WORK/nvrtc.log" >&2; fail "NVRTC: a kernel did not compile in the image"; }
cut -c1-100 "$WORK/nvrtc.log" | sed 's/^/    /'
passed "NVRTC in the image"

say "all checks passed in $((SECONDS - START)) s; image $IMAGE: $((size / 1000000)) MB"
