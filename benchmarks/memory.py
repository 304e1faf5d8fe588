"""Peak memory of training on the CPU: gpunet, and PyTorch when it is installed, each in a fresh process.

Each child only imports, loads MNIST through gpunet and trains one epoch of 784-512-512-10 at batch 128
(``speed.py``'s sides), and reports raw figures in KiB and bytes:

* ``baseline_kib``: the RSS right after the imports (``numpy, gpunet``; plus ``torch`` for torch's child)
  and, where numba is installed, after gpunet's compiled float32 kernels are loaded (a fixed cost of
  library code, as torch's import is for torch; ``baseline_before_jit_kib`` is the figure before);
* ``peak_kib``: the process's peak RSS, Linux ``VmHWM``;
* ``train_set_bytes`` (the float32 training set, however the images are held) and ``model_bytes``.

``report.py`` computes the growth and its ratio to train set + model (the issue's target: at most 1.5).
Why VmHWM and not ``ru_maxrss``: Linux carries ``ru_maxrss`` over fork and exec, so a child of a large
parent reports the parent's RSS as its own peak; VmHWM starts fresh at exec.

    python benchmarks/memory.py [--data-dir DIR] [--pixels uint8|float32] [--json PATH]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES, BATCH = (784, 512, 512, 10), 128


def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in KiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _warm_kernels():
    """Load gpunet's compiled float32 kernels (when numba is installed) so that they join the baseline."""
    import numpy as np
    from gpunet.fast import ops

    z, labels = np.zeros((2, 2), np.float32), np.zeros(2, np.int64)
    ops.bias_relu(z, z[0])
    ops.relu_backward(z, z.copy())
    ops.softmax_xent(z, labels, np.empty_like(z), np.empty(2, np.float32))
    ops.gather_scaled(np.zeros((2, 2), np.uint8), labels, np.empty_like(z), 255)


def child(side: str, data_dir, pixels: str) -> dict:
    """In this (fresh) process: load MNIST, train one epoch with ``side``; the raw figures."""
    if side == "gpunet":
        os.environ["GPUNET_BENCH_NO_TORCH"] = "1"  # the gpunet child's baseline holds no torch
    sys.path.insert(0, str(HERE))
    import speed  # noqa: E402  (numpy, gpunet and, for torch's child, torch)

    if side == "torch" and speed.torch is None:
        return {"side": side, "error": "torch is not installed"}
    if speed.torch is not None:
        speed.torch.set_num_threads(speed._cores())
    before_jit = _proc_status("VmRSS")
    if side == "gpunet":
        _warm_kernels()
    base = _proc_status("VmRSS")
    x, y, xt, yt = speed.load_data(data_dir, pixels, "cpu")
    after_load = _proc_status("VmRSS")
    args = argparse.Namespace(seed=0, lr=0.01, momentum=0.9)
    g = speed.GpunetSide(SIZES, BATCH, (x, y, xt, yt), "cpu", args)
    params = sum(v.nbytes for v in g.initial_state.values())
    if side == "gpunet":
        g.epoch(0, speed.Sync("cpu"))
    else:
        t = speed.TorchSide(SIZES, BATCH, (x, y, xt, yt), "cpu", g.initial_state, args)
        del g  # only torch's model stays (the gpunet net was a few MB of initial weights)
        gc.collect()
        t.epoch(0, speed.Sync("cpu"))
    return {"side": side, "pixels": pixels, "baseline_before_jit_kib": before_jit, "baseline_kib": base,
            "after_load_kib": after_load, "peak_kib": _proc_status("VmHWM"),
            "train_set_bytes": len(x) * x.shape[1] * 4, "model_bytes": int(params)}


def measure(data_dir, pixels: str, sides=("gpunet", "torch")) -> dict:
    """One fresh child per side; each prints its JSON as the last line of its output."""
    out = {}
    for side in sides:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", side, "--pixels", pixels]
        if data_dir:
            cmd += ["--data-dir", str(data_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            out[side] = {"side": side, "error": proc.stderr.strip()[-2000:] or f"exit {proc.returncode}"}
        else:
            out[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None, help="MNIST folder (default: $GPUNET_DATA, else gpunet's cache)")
    p.add_argument("--pixels", choices=("uint8", "float32"), default="uint8",
                   help="how the images are held: bytes scaled batch by batch (gpunet.Pixels), or float32")
    p.add_argument("--no-torch", action="store_true", help="measure gpunet alone")
    p.add_argument("--json", default=str(HERE / "results" / "latest-memory.json"), help="where to write")
    p.add_argument("--_child", dest="child", choices=("gpunet", "torch"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.data_dir, args.pixels)))
        return 0
    sys.path.insert(0, str(HERE))
    import report
    import speed

    sides = ("gpunet",) if args.no_torch else ("gpunet", "torch")
    results = {"machine": speed.machine_info("cpu"), "settings": {"pixels": args.pixels, "sizes": list(SIZES),
                                                                  "batch_size": BATCH},
               "sides": measure(args.data_dir, args.pixels, sides)}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    print(report.render_text(results) + f"\n\nresults: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
