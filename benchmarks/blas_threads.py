"""BLAS threads chosen by work (gpunet/fast/blas.py, threads_for) against OpenBLAS's own thread count,
on digits, wine and MNIST, interleaved: each round times every data set both ways, in alternating order,
so that a machine that drifts shows in both columns alike. Run it on a quiet machine only (a shared one
times the neighbours): ``python benchmarks/blas_threads.py --rounds 5 [--mnist DIR] [--out FILE.json]``.

"chosen" is gpunet's default (one thread below ``blas.SMALL_WORK`` multiply-adds a product); "all" sets
``GPUNET_BLAS_THREADS=all`` (OpenBLAS's count for every product). Every round's seconds per epoch are
kept raw in the JSON; the summary prints the medians and their ratio. Nothing here asserts a speed.
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--mnist", help="folder of the MNIST files (MNIST is left out without it)")
    p.add_argument("--out", help="write every round's timings here as JSON")
    args = p.parse_args(argv)
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
