"""Inference of the 10,000 MNIST test images on the CPU: gpunet's ``predict`` against its own
matrix-product floor and against ONNX Runtime running the same network exported by
``gpunet.onnx_export``, interleaved round by round (floor, gpunet, ONNX Runtime, then the next
round, the order turned each round) so that the machine's drift hits all sides alike.

The floor runs only the three products (10,000 x 784 @ 784 x 512, then 512 x 512, 512 x 10) into
preallocated outputs, in blocks of ``--floor-block`` rows; gpunet and ONNX Runtime get the same
float32 images and return class labels. Round 1 is warm-up; the ratios are the medians of each
round's own ratio, with a 95% bootstrap interval (``report.interval``).

    python benchmarks/inference.py [--data-dir DIR] [--rounds 15] [--batch-sizes 4096] [--json F]

Nothing here asserts a speed: the figures go to BENCHMARKS.md with the date and the command.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # report.py
sys.path.insert(0, str(HERE.parent))

import report  # noqa: E402

import gpunet as gn  # noqa: E402
from gpunet.data.datasets import load_mnist  # noqa: E402
from gpunet.training import predict  # noqa: E402

SIZES = (784, 512, 512, 10)


def floor_run(x, weights, block):
    """Seconds of the products alone, block by block, into outputs made before the clock starts."""
    outs = {}
    for start in range(0, len(x), block):
        rows = min(block, len(x) - start)
        for i, W in enumerate(weights):
            outs.setdefault((i, rows), np.empty((rows, W.shape[1]), np.float32))
    started = time.perf_counter()
    for start in range(0, len(x), block):
        h = x[start : start + block]
        for i, W in enumerate(weights):
            h = np.matmul(h, W, out=outs[(i, len(h))])
    return time.perf_counter() - started


def onnx_session(net, folder):
    """An ONNX Runtime session of ``net`` (None, with the reason, when it is not installed)."""
    try:
        import onnxruntime as ort

        from gpunet.onnx_export import to_onnx
    except ImportError as exc:
        return None, f"{exc} (pip install 'gpunet[onnx]' onnxruntime)"
    path = Path(folder) / "inference-benchmark.onnx"
    to_onnx(net, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, ort.__version__


def timed(call):
    started = time.perf_counter()
    out = call()
    return time.perf_counter() - started, out


def rounds(args, x, net, session):
    """Every round's raw seconds per side; the order of the sides turns each round."""
    weights = [layer.W.data for layer in net.layers if isinstance(layer, gn.Linear)]
    name = session.get_inputs()[0].name if session is not None else None
    sides = {"floor": lambda: (floor_run(x, weights, args.floor_block), None)}
    for bs in args.batch_sizes:
        sides[f"gpunet b{bs}"] = lambda bs=bs: timed(lambda: predict(net, x, batch_size=bs))
    if session is not None:
        sides["onnxruntime"] = lambda: timed(lambda: session.run(None, {name: x})[0].argmax(1))
    out, labels = [], {}
    for r in range(args.rounds + 1):
        names = list(sides) if r % 2 == 0 else list(sides)[::-1]
        row = {}
        for side in names:
            row[side], got = sides[side]()
            if got is not None:
                labels[side] = np.asarray(got)
        out.append(row)
    first = next(iter(labels.values()))
    agree = {side: float(np.mean(v == first)) for side, v in labels.items()}
    return out, agree


def summary(result) -> str:
    """Each side's median seconds and its ratio to the floor and to ONNX Runtime, round by round."""
    timed_rounds = result["rounds"][1:]
    lines = []
    for side in timed_rounds[0]:
        med = statistics.median(r[side] for r in timed_rounds)
        text = f"{side:>14}: {med * 1e3:7.1f} ms"
        for base in ("floor", "onnxruntime"):
            if base in timed_rounds[0] and side != base:
                by_round = [r[side] / r[base] for r in timed_rounds]
                low, high = report.interval(by_round) or (float("nan"),) * 2
                text += f"  /{base} {statistics.median(by_round):.3f} [{low:.3f}, {high:.3f}]"
        lines.append(text)
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (after one warm-up round)")
    p.add_argument(
        "--batch-sizes",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[4096],
        help="gpunet's predict batch sizes, comma-separated (each a side of its own)",
    )
    p.add_argument("--floor-block", type=int, default=4096, help="rows per product of the floor")
    p.add_argument("--json", default=None, help="write the raw rounds here")
    args = p.parse_args(argv)
    ((x, _),) = load_mnist(args.data_dir, splits=("test",))
    x = np.ascontiguousarray(x, dtype=np.float32)
    net = gn.mlp(list(SIZES), activation="relu", seed=0)
    session, ort_version = onnx_session(net, Path(args.json).parent if args.json else HERE)
    if session is None:
        print(f"ONNX Runtime left out: {ort_version}", file=sys.stderr)
    raw, agree = rounds(args, x, net, session)
    result = {
        "rounds": raw,
        "labels_agree_with_first": agree,
        "onnxruntime": ort_version,
        "numpy": np.__version__,
        "images": len(x),
        "floor_block": args.floor_block,
        "gemm_flops": 2.0 * len(x) * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:])),
    }
    print(summary(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
