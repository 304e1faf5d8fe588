"""BLAS threads chosen by work (gpunet/fast/blas.py, threads_for) against OpenBLAS's own thread count,
on digits, wine and MNIST, interleaved: each round times every data set both ways, in alternating order,
so that a machine that drifts shows in both columns alike. Run it on a quiet machine only (a shared one
times the neighbours): ``python benchmarks/blas_threads.py --rounds 5 [--mnist DIR] [--out FILE.json]``.

"chosen" is gpunet's default (one thread below ``blas.SMALL_WORK`` multiply-adds a product); "all" sets
``GPUNET_BLAS_THREADS=all`` (OpenBLAS's count for every product). Every round's seconds per epoch are
kept raw in the JSON; the summary prints the medians and their ratio. Nothing here asserts a speed.

``--sweep`` times where the threshold belongs: one training step's products (forward, weight gradient,
input gradient) of a batch-128 layer whose width makes ``128 * in * out`` multiply-adds from 2**16 to
2**26, on one thread and on OpenBLAS's count, interleaved; a threshold is right when one thread wins
below it and the threads win above it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np

import gpunet as gn
from gpunet.training import fit


def problems(mnist_dir):
    """(name, x, y, hidden, batch): the tables scikit-learn bundles, and MNIST when a folder is given."""
    from sklearn.datasets import load_digits, load_wine

    x, y = load_digits(return_X_y=True)
    out = [("digits", x / 16, y, [100], 200)]
    x, y = load_wine(return_X_y=True)
    out.append(("wine", (x - x.mean(0)) / x.std(0), y, [100], 200))
    if mnist_dir:
        from gpunet.data.datasets import load_mnist

        (x, y), _ = load_mnist(mnist_dir, download=False)
        out.append(("mnist", x, y, [512, 512], 128))
    return out


def epoch_seconds(x, y, hidden, batch, epochs) -> float:
    net = gn.mlp([x.shape[1], *hidden, int(y.max()) + 1], seed=0)
    started = time.perf_counter()
    fit(net, gn.SoftmaxCrossEntropy(), gn.Momentum(net.parameters(), lr=0.05), x, y, epochs=epochs,
        batch_size=batch)
    return (time.perf_counter() - started) / epochs


def sweep(rounds: int) -> dict:
    """{work: {"one": [s, ...], "all": [s, ...]}}: seconds of one step's three products of a
    (128, n) @ (n, n) layer with 128 * n * n = work, per thread setting and round."""
    from gpunet.fast import blas

    get, put = blas._thread_calls()
    full, rng, out = get(), np.random.default_rng(0), {}
    for power in range(16, 27):
        n = int(round((2**power / 128) ** 0.5))
        x, W, dy = (rng.standard_normal(s, dtype=np.float32) for s in ((128, n), (n, n), (128, n)))
        y, gW, dx = np.empty((128, n), np.float32), np.empty((n, n), np.float32), np.empty((128, n), np.float32)
        reps = max(3, int(2**28 / (128 * n * n * 3)))  # about 0.1 s of work a timing at 100 GFLOP/s
        for r in range(rounds):
            for way in ("one", "all") if r % 2 == 0 else ("all", "one"):
                put(1 if way == "one" else full)
                started = time.perf_counter()
                for _ in range(reps):
                    np.matmul(x, W, out=y)
                    np.matmul(x.T, dy, out=gW)
                    np.matmul(dy, W.T, out=dx)
                seconds = (time.perf_counter() - started) / reps
                out.setdefault(128 * n * n, {}).setdefault(way, []).append(seconds)
    put(full)
    for work, ways in out.items():
        one, every = statistics.median(ways["one"]), statistics.median(ways["all"])
        print(f"work 2^{np.log2(work):4.1f}: one thread {one * 1e6:9.1f} us, {full} threads {every * 1e6:9.1f} us, "
              f"one/all {one / every:5.2f}")
    return {"threads": full, "sweep": {str(k): v for k, v in out.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--mnist", help="folder of the MNIST files (MNIST is left out without it)")
    p.add_argument("--out", help="write every round's timings here as JSON")
    p.add_argument("--sweep", action="store_true", help="time products of growing work instead (see above)")
    args = p.parse_args(argv)
    if args.sweep:
        result = sweep(args.rounds)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**result, "numpy": np.__version__}, f, indent=2)
        return 0
    rows = {}
    for name, x, y, hidden, batch in problems(args.mnist):  # warm-up, untimed: imports, first allocations
        epoch_seconds(x, y, hidden, batch, 1)
    for r in range(args.rounds):
        for name, x, y, hidden, batch in problems(args.mnist):
            ways = ("chosen", "all") if r % 2 == 0 else ("all", "chosen")
            for way in ways:
                os.environ["GPUNET_BLAS_THREADS"] = "all" if way == "all" else "chosen"
                rows.setdefault(name, {}).setdefault(way, []).append(
                    epoch_seconds(x, y, hidden, batch, args.epochs))
    os.environ.pop("GPUNET_BLAS_THREADS", None)
    for name, ways in rows.items():
        chosen, every = statistics.median(ways["chosen"]), statistics.median(ways["all"])
        print(f"{name:>7}: chosen {chosen * 1e3:8.1f} ms/epoch, all threads {every * 1e3:8.1f} ms/epoch, "
              f"all/chosen {every / chosen:5.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rounds": rows, "epochs": args.epochs, "numpy": np.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
