"""Where a CPU training epoch's time goes: the default recipe's network (784-512-512-10 ReLU,
dropout 0.2 unless ``--dropout``, momentum 0.9, batch 128) trained by ``gpunet.fit`` on MNIST, with
every piece of the fused step timed as it runs.

Each piece the step calls (the matrix products, bias + ReLU, the dropout draws, the softmax
cross-entropy, the ReLU backward, each BLAS call of the update, the batch gather) is wrapped in a
clock while the epoch runs; what no wrapper saw is "the rest" (Python per step, the loss sums, the
callbacks). The products are split into the floor's three kinds (forward, dW, dx) so that
``products / epoch`` is the share spent in the arithmetic the floor of ``speed.py`` measures. The
wrappers cost about a microsecond a call (about 20 a step): a few ms an epoch, reported as
``clock overhead``.

    python benchmarks/epoch_budget.py --data-dir DIR [--epochs 3] [--dropout 0.2] [--json FILE]

The first epoch is warm-up; the table is the median of the others, per piece.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gpunet  # noqa: E402
from gpunet.data.datasets import load_mnist  # noqa: E402
from gpunet.data.rows import Pixels  # noqa: E402
from gpunet.fast import blas, columns, ops  # noqa: E402

_MATMUL = np.matmul
TOTALS: dict = defaultdict(float)
COUNTS: dict = defaultdict(int)


def timed(name, fn, clock=time.perf_counter):
    """``fn`` with its seconds added to ``TOTALS[name]``."""

    def wrapper(*args, **kwargs):
        start = clock()
        try:
            return fn(*args, **kwargs)
        finally:
            TOTALS[name] += clock() - start
            COUNTS[name] += 1

    return wrapper


def _matmul_kind(a, b):
    """forward (x @ W), dx (dy @ W.T), and dW (x.T @ dy, where the step writes it with NumPy, not
    its sgemm): told apart by which operand is a transposed view."""
    if not b.flags.c_contiguous:
        return "product: dx = dy @ W.T"
    return (
        "product: dW = x.T @ dy (sgemm)" if not a.flags.c_contiguous else "product: forward x @ W"
    )


def instrument():
    """Wrap the pieces the fused step calls (module and class attributes are replaced)."""

    def timed_matmul(a, b, *args, clock=time.perf_counter, **kwargs):
        start = clock()
        out = _MATMUL(a, b, *args, **kwargs)
        name = _matmul_kind(a, b)
        TOTALS[name] += clock() - start
        COUNTS[name] += 1
        return out

    np.matmul = timed_matmul
    for name in ("bias_relu", "dropout", "softmax_xent", "relu_backward", "relu_mask_backward"):
        setattr(ops, name, timed(f"elementwise: {name}", getattr(ops, name)))
    routines = blas.routines(np.float32)
    names = {"gemm": "product: dW = x.T @ dy (sgemm)", "gemv": "update: bias sums (sgemv)"}
    for call in ("gemm", "gemv", "scal", "axpy"):
        label = names.get(call, f"update: {call} (velocity, weights; none with numba)")
        setattr(routines, call, timed(label, getattr(routines, call)))
    # with numba, W and b are stepped by the rule's generated kernel, one call each a layer a step
    ops.update = timed("update: W and b by the rule's kernel (numba)", ops.update)
    np.take = timed("gather: labels (np.take)", np.take)
    # the first layer over its input's lit columns (gpunet.fast.columns; GPUNET_SKIP_ZEROS=0: off)
    for name, label in (
        ("_lit", "zero columns: which are lit"),
        ("_take", "zero columns: gather x[:, lit], W[lit]"),
        ("_put", "zero columns: W.grad's rows put"),
    ):
        setattr(columns, name, timed(label, getattr(columns, name)))
    Pixels.take = timed("gather: images (uint8 to float32)", Pixels.take)


def run(args) -> dict:
    """``args.epochs`` epochs of the default recipe's network on the first 55,000 training
    images (as ``gpunet train`` holds them: uint8, scaled batch by batch), with each piece's
    seconds."""
    ((x, y),) = load_mnist(args.data_dir, dtype=np.uint8, splits=("train",))
    x, y = Pixels(x[:55_000]), y[:55_000]
    net = gpunet.mlp([784, 512, 512, 10], activation="relu", dropout=args.dropout, seed=0)
    opt = gpunet.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    loss = gpunet.SoftmaxCrossEntropy()
    rounds = []
    for epoch in range(args.epochs):
        TOTALS.clear()
        COUNTS.clear()
        start = time.perf_counter()
        hist = gpunet.fit(net, loss, opt, x, y, epochs=1, batch_size=128, seed=epoch)
        wall = time.perf_counter() - start
        rounds.append(
            {
                "wall": wall,
                "epoch": hist.epochs[0]["seconds"],
                "pieces": dict(TOTALS),
                "calls": dict(COUNTS),
            }
        )
        print(f"epoch {epoch + 1}: {hist.epochs[0]['seconds']:.3f} s", file=sys.stderr)
    return {
        "rounds": rounds,
        "dropout": args.dropout,
        "numpy": np.__version__,
        "numba": ops.numba_status(),
        "blas": blas.status(),
        "zero_columns_skipped": columns.status(),
    }


def table(result) -> str:
    """The median of the timed rounds (all but the first), per piece, as Markdown."""
    timed_rounds = result["rounds"][1:] or result["rounds"]
    epoch = float(np.median([r["epoch"] for r in timed_rounds]))
    names = sorted({n for r in timed_rounds for n in r["pieces"]})
    med = {n: float(np.median([r["pieces"].get(n, 0.0) for r in timed_rounds])) for n in names}
    calls = {n: timed_rounds[-1]["calls"].get(n, 0) for n in names}
    overhead = 1e-6 * sum(calls.values())  # about a microsecond a wrapped call, measured below
    rows = ["| piece | seconds an epoch | share | calls |", "| --- | --- | --- | --- |"]
    for n in names:
        rows.append(f"| {n} | {med[n]:.3f} | {med[n] / epoch:.1%} | {calls[n]} |")
    seen = sum(med.values())
    products = sum(v for n, v in med.items() if n.startswith("product"))
    rows.append(
        f"| the rest (Python, sums, callbacks) | {epoch - seen:.3f} | "
        f"{(epoch - seen) / epoch:.1%} | |"
    )
    rows.append(f"| **epoch** (fit's clock) | **{epoch:.3f}** | 100% | |")
    rows.append(f"| products / epoch | {products / epoch:.3f} | | |")
    rows.append(f"| clock overhead (about) | {overhead:.3f} | | |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    instrument()
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
