#!/bin/sh
# gpunet smoke test: `gpunet info`, one epoch of training on the MNIST files, and a check of the
# test accuracy it reached.
#
# Works inside the Docker image (installed there as /usr/local/bin/gpunet-smoke) and on any
# machine where gpunet is installed: it calls `gpunet` from PATH, else `python3 -m gpunet`.
#
#   GPUNET_DATA                 folder with the MNIST files            (default /data)
#   OUT_DIR                     where model.npz and metrics.json go    (default: a new temp folder)
#   GPUNET_SMOKE_MIN_ACCURACY   lowest test accuracy that passes       (default 0.90)
#   GPUNET_DEVICE               cpu, gpu or auto, read by gpunet       (default auto)
#   PYTHON                      interpreter for the fallback and the JSON check (default python3)
#
# Extra arguments go to `gpunet train`, e.g. `gpunet-smoke --device gpu`.
# Exit status: 0 when training ran and reached the floor, non-zero otherwise.
set -eu

PYTHON="${PYTHON:-python3}"
DATA_DIR="${GPUNET_DATA:-/data}"
MIN_ACCURACY="${GPUNET_SMOKE_MIN_ACCURACY:-0.90}"
if [ -z "${OUT_DIR:-}" ]; then
    OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/gpunet-smoke.XXXXXX")"
fi

if command -v gpunet >/dev/null 2>&1; then
    run_gpunet() { gpunet "$@"; }
    how="gpunet ($(command -v gpunet))"
else
    run_gpunet() { "$PYTHON" -m gpunet "$@"; }
    how="$PYTHON -m gpunet"
fi

echo "smoke: using $how"
echo "smoke: data $DATA_DIR, output $OUT_DIR, accuracy floor $MIN_ACCURACY"

echo "smoke: --- gpunet info ---"
if ! run_gpunet info; then
    echo "smoke: FAILED: 'gpunet info' exited non-zero" >&2
    exit 1
fi

echo "smoke: --- gpunet train (1 epoch) ---"
status=0
run_gpunet train --data-dir "$DATA_DIR" --epochs 1 --out "$OUT_DIR" "$@" || status=$?
if [ "$status" -ne 0 ]; then
    echo "smoke: FAILED: 'gpunet train' exited with status $status" >&2
    exit "$status"
fi

metrics="$OUT_DIR/metrics.json"
if [ ! -f "$metrics" ]; then
    echo "smoke: FAILED: training wrote no $metrics" >&2
    exit 1
fi

echo "smoke: --- result ---"
if ! "$PYTHON" - "$metrics" "$MIN_ACCURACY" <<'PYEOF'
import json
import math
import sys

path, floor_text = sys.argv[1], sys.argv[2]
try:
    floor = float(floor_text)
except ValueError:
    sys.exit(f"smoke: GPUNET_SMOKE_MIN_ACCURACY must be a number, got {floor_text!r}")
with open(path, encoding="utf-8") as f:
    metrics = json.load(f)
acc = metrics.get("test_accuracy")
if not isinstance(acc, (int, float)) or isinstance(acc, bool) or not math.isfinite(acc):
    sys.exit(f"smoke: {path} has no numeric test_accuracy (got {acc!r})")
device = metrics.get("device")
if isinstance(device, dict):
    device = device.get("device", device)
print(f"test_accuracy: {acc:.4f} (floor {floor:.4f}, device {device})")
sys.exit(0 if acc >= floor else 1)
PYEOF
then
    echo "smoke: FAILED: test accuracy below $MIN_ACCURACY (or unreadable metrics), see $metrics" >&2
    exit 1
fi
echo "smoke: OK (results in $OUT_DIR)"
