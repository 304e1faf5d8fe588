"""An epoch of the default network three ways, one table: gpunet's eager fused step, gpunet's CUDA
graph step (``fit(..., cuda_graph=True)``), and PyTorch eager, timed the same way.

    python benchmarks/gpu_graph.py [--dry-run] [--steps N] [--epochs E] [--json OUT.json]

The work: 784-512-512-10 (ReLU, dropout 0.2, momentum 0.9), batch 128, N steps an epoch on random
MNIST-shaped uint8 pixels already on the GPU, each epoch's rows in a fresh permutation, the loss
and right answers summed on the device (as ``fit`` does). Each contender first trains one epoch
(kernels compiled, graphs captured, PyTorch's allocator warm), then ``E`` epochs are timed: a CUDA
event before the first step, one after the last epoch's last step, one synchronization, the time
between the events divided by the steps (and the host's wall time beside it). gpunet's epochs end
with one synchronization each (``fit`` reads the epoch's loss); PyTorch's loop does the same (one
``.item()`` per epoch), so all three are timed over the same unit of work.

``--dry-run`` takes the same path on the CPU: gpunet's "GPU" is tests/support/fake_cupy.py (its events
report host time), PyTorch runs on the CPU, timed with ``time.perf_counter``; its table says in its
title that it measures nothing. benchmarks/gpu_session.sh runs this among its first steps.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES, BATCH, DROPOUT, LR, MOMENTUM = [784, 512, 512, 10], 128, 0.2, 0.05, 0.9


def install_fake_cupy() -> None:
    """The dry run's GPU: the fake CuPy of the tests (kernels as NumPy mirrors, CUDA sources
    off)."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    os.environ["GPUNET_CUDA_CPU"] = "0"
    from fake_cupy import FakeCupy

    sys.modules["cupy"] = FakeCupy()


def data(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = steps * BATCH
    return rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n)


def gpunet_epochs(x, y, epochs: int, cuda_graph: bool) -> dict:
    """gpunet's Run on the GPU: one warm-up epoch, then ``epochs`` timed between two CUDA events."""
    import cupy

    import gpunet as gn
    from gpunet.training import Run, _dataset

    net = gn.mlp(SIZES, dropout=DROPOUT, seed=0, device="gpu")
    opt = gn.Momentum(net.parameters(), lr=LR, momentum=MOMENTUM)
    loss = gn.SoftmaxCrossEntropy()
    run = Run(
        net,
        loss,
        opt,
        _dataset(gn.Pixels(x), y, net, True),
        batch_size=BATCH,
        seed=0,
        cuda_graph=cuda_graph,
    )
    run.fit(1)  # kernels compiled, graphs captured
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    wall = time.perf_counter()
    start.record()
    run.fit(1 + epochs)
    end.record()
    end.synchronize()
    return {
        "device_ms": cupy.cuda.get_elapsed_time(start, end),
        "wall_ms": (time.perf_counter() - wall) * 1e3,
        "steps": epochs * run.steps,
        "loss": run.history.epochs[-1]["loss"],
    }


def torch_epochs(x, y, epochs: int, on_gpu: bool) -> dict | None:
    """The same network, update and epoch in PyTorch eager (CUDA events on a GPU, perf_counter on
    the CPU), or None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    device = "cuda" if on_gpu else "cpu"
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers += [torch.nn.ReLU(), torch.nn.Dropout(DROPOUT)]
    model = torch.nn.Sequential(*layers).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    xs, ys = torch.as_tensor(x, device=device), torch.as_tensor(y, device=device)
    gen = np.random.default_rng(0)

    def epoch():
        perm = torch.as_tensor(gen.permutation(len(xs)), device=device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for lo in range(0, len(xs), BATCH):
            idx = perm[lo : lo + BATCH]
            xb, yb = xs[idx].float() / 255, ys[idx]
            out = model(xb)
            loss = torch.nn.functional.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double() * len(idx)
            correct += (out.argmax(1) == yb).sum()
        return loss_sum.item() / len(xs)  # one synchronization an epoch, as gpunet's

    epoch()
    steps = epochs * -(-len(xs) // BATCH)
    wall = time.perf_counter()
    if on_gpu:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(epochs):
        last = epoch()
    if on_gpu:
        end.record()
        end.synchronize()
    wall_ms = (time.perf_counter() - wall) * 1e3
    return {
        "device_ms": start.elapsed_time(end) if on_gpu else wall_ms,
        "wall_ms": wall_ms,
        "steps": steps,
        "loss": last,
    }


def table(rows: dict, title: str) -> str:
    """The comparison as one Markdown table: ms per step from the events, host wall ms per step,
    and each against PyTorch eager's ms per step (> 1: slower than PyTorch)."""
    base = rows.get("pytorch eager")
    lines = [
        title,
        "",
        "| step | steps timed | ms/step (events) | ms/step (wall) | / PyTorch eager |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        if r is None:
            lines.append(f"| {name} | - | - | - | not run (PyTorch is not installed) |")
            continue
        per, wall = r["device_ms"] / r["steps"], r["wall_ms"] / r["steps"]
        ratio = f"{per / (base['device_ms'] / base['steps']):.2f}" if base else "-"
        lines.append(f"| {name} | {r['steps']} | {per:.4f} | {wall:.4f} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same path on the CPU (fake CuPy)"
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps an epoch (default: 469, MNIST's; 4 for --dry-run)",
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help="epochs timed (default 3; 1 for --dry-run)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.dry_run:
        install_fake_cupy()
    sys.path.insert(0, str(ROOT))
    steps = args.steps or (4 if args.dry_run else 469)
    epochs = args.epochs or (1 if args.dry_run else 3)
    x, y = data(steps)
    rows = {
        "gpunet eager": gpunet_epochs(x, y, epochs, cuda_graph=False),
        "gpunet graph": gpunet_epochs(x, y, epochs, cuda_graph=True),
        "pytorch eager": torch_epochs(x, y, epochs, on_gpu=not args.dry_run),
    }
    day = time.strftime("%Y-%m-%d", time.gmtime())
    title = (
        f"DRY RUN on the CPU ({day}): fake CuPy and CPU PyTorch, nothing here is a GPU measurement"
        if args.dry_run
        else f"GPU epoch comparison ({day}): batch {BATCH}, "
        f"{'-'.join(map(str, SIZES))}, dropout {DROPOUT}, momentum"
    )
    print(table(rows, title))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "date": day,
                    "dry_run": args.dry_run,
                    "batch": BATCH,
                    "sizes": SIZES,
                    "steps_per_epoch": steps,
                    "epochs": epochs,
                    "rows": rows,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
