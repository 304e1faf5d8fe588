"""Fit time and accuracy of gpunet.sklearn.MLPClassifier against scikit-learn's MLPClassifier, the peer, in
the same run: the same data, hidden sizes, epochs, solver (adam), batch size and learning rate, each in a
StandardScaler pipeline, rounds interleaved (gpunet, scikit-learn, gpunet, ...) so that a change in the
machine's load touches both sides alike. Raw seconds per round go to the JSON file; the table shows medians.

    python benchmarks/sklearn_fit.py [--data-dir /path/to/mnist] [--rounds 3] [--threads 1] [--json PATH]

Workloads: scikit-learn's digits (1,797 x 64, 64 hidden units, 50 epochs, a 25% test split) and, when MNIST
is found (``--data-dir``, else ``$GPUNET_DATA``), its first 10,000 training images (784 inputs, 100 hidden
units: scikit-learn's default, 10 epochs) scored on the 10,000 test images. Always on the CPU (scikit-learn
has no GPU); BLAS threads are pinned with threadpoolctl for both sides.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def workloads(data_dir):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    found = [("digits", (64,), 50, (x_tr, y_tr, x_te, y_te))]
    folder = data_dir or os.environ.get("GPUNET_DATA")
    if folder:
        from gpunet.data import load_mnist

        (xm, ym), (xmt, ymt) = load_mnist(folder, download=False)
        found.append(("mnist-10k", (100,), 10, (xm[:10000], ym[:10000], xmt, ymt)))
    return found


def one_fit(side, hidden, epochs, data, seed):
    """(fit seconds, test accuracy) of one pipeline fit."""
    from sklearn import neural_network
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from gpunet.sklearn import MLPClassifier

    cls = MLPClassifier if side == "gpunet" else neural_network.MLPClassifier
    extra = {"device": "cpu"} if side == "gpunet" else {}
    x_tr, y_tr, x_te, y_te = data
    pipe = make_pipeline(StandardScaler(), cls(hidden, max_iter=epochs, random_state=seed, **extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: the epochs are fixed on purpose
        start = time.perf_counter()
        pipe.fit(x_tr, y_tr)
        seconds = time.perf_counter() - start
    return seconds, float(pipe.score(x_te, y_te))


def machine() -> dict:
    import sklearn

    import gpunet

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu, "cores": os.cpu_count(),
            "load_average": os.getloadavg(), "numpy": np.__version__, "sklearn": sklearn.__version__,
            "gpunet": gpunet.__version__, "python": platform.python_version()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", help="MNIST folder (default: $GPUNET_DATA; without it, digits only)")
    p.add_argument("--rounds", type=int, default=3, help="fits per side and workload (default: 3)")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads for both sides (default: 1)")
    p.add_argument("--json", default="benchmarks/results/latest-sklearn.json", help="where the raw rounds go")
    args = p.parse_args(argv)
    from threadpoolctl import threadpool_limits

    result = {"machine": machine(), "threads": args.threads, "rounds": args.rounds, "workloads": []}
    with threadpool_limits(args.threads):
        for name, hidden, epochs, data in workloads(args.data_dir):
            raw = {"gpunet": [], "sklearn": []}
            for r in range(args.rounds):
                for side in ("gpunet", "sklearn") if r % 2 == 0 else ("sklearn", "gpunet"):
                    raw[side].append(one_fit(side, hidden, epochs, data, seed=r))
            result["workloads"].append({"name": name, "hidden": list(hidden), "epochs": epochs,
                                        "rows": len(data[0]), "raw": raw})
    result["machine"]["load_average_after"] = os.getloadavg()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return 0


def table(result) -> str:
    """A Markdown table of medians: fit seconds, the ratio, and mean accuracies."""
    rows = ["| workload | epochs | gpunet fit (s) | scikit-learn fit (s) | scikit-learn / gpunet | accuracy gpunet | "
            "accuracy scikit-learn |", "|---|---|---|---|---|---|---|"]
    for w in result["workloads"]:
        med = {s: statistics.median(t for t, _ in w["raw"][s]) for s in ("gpunet", "sklearn")}
        acc = {s: statistics.mean(a for _, a in w["raw"][s]) for s in ("gpunet", "sklearn")}
        rows.append(f"| {w['name']} ({w['rows']} rows, hidden {w['hidden']}) | {w['epochs']} | {med['gpunet']:.2f} | "
                    f"{med['sklearn']:.2f} | {med['sklearn'] / med['gpunet']:.1f}x | {acc['gpunet']:.4f} | "
                    f"{acc['sklearn']:.4f} |")
    m = result["machine"]
    rows.append(f"\n{m['date']}, {m['cpu']}, {m['cores']} cores, {result['threads']} BLAS thread(s), "
                f"{result['rounds']} rounds per side; load average {m['load_average'][0]:.1f} before, "
                f"{m['load_average_after'][0]:.1f} after (a shared machine)")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
