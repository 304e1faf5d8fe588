"""One training step's time on the GPU for every path with a launch budget, beside PyTorch eager's.

    python benchmarks/gpu_step.py [--dry-run] [--repeat N] [--json OUT.json] [--warm-only]

The steps are ``fit``'s fused steps of the default network (784-512-512-10, ReLU, momentum 0.9,
batch 128) on random MNIST-shaped data already on the device: without dropout, with the default
recipe's 0.2, a data-parallel rank's step (its share of a global batch of 256: the shard weight in
the softmax, the update after the all-reduce; the all-reduce itself, NCCL's, is not timed: one GPU
has no peer), with ``--augment``'s distortion before it, and with ``--batch-norm``. gpunet and
PyTorch eager (where a CUDA PyTorch is installed; only for the steps it has the same of: plain,
dropout, BatchNorm1d) are timed the same way: a warm-up, then a CUDA event, ``--repeat`` steps,
another event and one synchronization; ms/step is the time between the events over the steps (host
wall time beside).

``--dry-run`` takes the same code path on the CPU: gpunet's "GPU" is tests/support/fake_cupy.py
(kernels as NumPy mirrors, its events report host time), PyTorch runs on the CPU; the JSON lists
the kernels each step launched (so the test can see that each path ran its own), and the table's
title says that it measures nothing. ``--warm-only`` compiles every CUDA kernel gpunet has (each
elementwise kernel in both dtypes as tests/support/cuda_compile.py launches them, and a short
``fit`` of every path above, which builds the RawKernels), so that a session's later steps find
CuPy's kernel cache full.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIZES, BATCH = [784, 512, 512, 10], 128
# name: (dropout, ranks, augment, batch_norm, a PyTorch peer)
PATHS = {
    "dropout=0.0": (0.0, 1, False, False, True),
    "dropout=0.2": (0.2, 1, False, False, True),
    "data-parallel rank (2), dropout=0.2": (0.2, 2, False, False, False),
    "augment, dropout=0.2": (0.2, 1, True, False, False),
    "batch-norm, dropout=0.2": (0.2, 1, False, True, True),
}


def install_fake_cupy() -> None:
    """The dry run's GPU: the tests' fake CuPy (kernels as NumPy mirrors, CUDA sources off)."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))
    os.environ["GPUNET_CUDA_CPU"] = "0"
    from fake_cupy import FakeCupy

    sys.modules["cupy"] = FakeCupy()


def gpunet_step(name: str):
    """One fused training step of path ``name``, a function of no arguments (data on the GPU)."""
    import gpunet as gn
    from gpunet import fast
    from gpunet.augment import Augment

    dropout, ranks, augment, batch_norm, _ = PATHS[name]
    rng = np.random.default_rng(1)
    net = gn.mlp(SIZES, dropout=dropout, seed=0, device="gpu", batch_norm=batch_norm)
    net.train()
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    loss = gn.SoftmaxCrossEntropy()
    x = gn.to_device(rng.random((BATCH, 784), dtype=np.float32), "gpu")
    y = gn.to_device(rng.integers(0, 10, BATCH), "gpu")
    step = fast.select(net, loss, opt, y, distributed=ranks > 1)
    if step is None:
        raise SystemExit(
            f"{name}: the fused step does not apply: {fast.why_not(net, loss, opt, y)}"
        )
    xp = gn.get_array_module(x)
    step.use_sums(xp.zeros((), np.float64), xp.zeros((), np.int64))
    if (
        ranks > 1
    ):  # rank 0's share of a global batch of ranks * BATCH rows (no peer to sum with here)
        return lambda: step(x, y, reduce=lambda: None, batch_rows=ranks * BATCH)
    if augment:
        distort, run = Augment(seed=3), SimpleNamespace(batch_rows=BATCH, row_start=0)
        return lambda: step(distort.transform_batch(run, x), y)
    return lambda: step(x, y)


def torch_step(name: str, device: str):
    """The same network, update and batch in PyTorch eager, or None (no PyTorch, or no peer)."""
    try:
        import torch
    except ImportError:
        return None
    dropout, _, _, batch_norm, peer = PATHS[name]
    if not peer:
        return None
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers += [torch.nn.BatchNorm1d(b)] if batch_norm else []
            layers += [torch.nn.ReLU()] + ([torch.nn.Dropout(dropout)] if dropout else [])
    model = torch.nn.Sequential(*layers).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(BATCH, 784, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        lossf(model(x), y).backward()
        opt.step()

    return step


class HostClock:
    """Events that note the host's clock (PyTorch on the CPU in a dry run)."""

    class Event:
        def record(self):
            self.at = time.perf_counter()

        def synchronize(self):
            pass

    @staticmethod
    def elapsed(start, end) -> float:
        return (end.at - start.at) * 1e3


def clocks(dry_run: bool):
    """``(gpunet's, PyTorch's)``: each an ``Event`` factory with ``elapsed(start, end)`` in ms."""
    import cupy

    mine = SimpleNamespace(Event=cupy.cuda.Event, elapsed=cupy.cuda.get_elapsed_time)
    if dry_run:
        return mine, HostClock
    try:
        import torch
    except ImportError:
        return mine, None
    return mine, SimpleNamespace(
        Event=lambda: torch.cuda.Event(enable_timing=True),
        elapsed=lambda start, end: start.elapsed_time(end),
    )


def timed(step, repeat: int, clock, warmup: int) -> dict:
    """``step()`` ``warmup`` times, then ``repeat`` times between two events and one sync:
    ms per step between the events and on the host's wall clock."""
    for _ in range(warmup):
        step()
    start, end = clock.Event(), clock.Event()
    start.record()
    start.synchronize()  # the warm-up's work is not timed
    wall = time.perf_counter()
    start.record()
    for _ in range(repeat):
        step()
    end.record()
    end.synchronize()
    wall_ms = (time.perf_counter() - wall) * 1e3
    return {
        "ms_per_step": clock.elapsed(start, end) / repeat,
        "wall_ms_per_step": wall_ms / repeat,
        "repeat": repeat,
    }


def warm() -> None:
    """Compile and run every kernel once (CuPy caches the compiled code on disk)."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))  # the tests' helpers
    import cuda_compile
    import cupy

    import gpunet as gn
    from gpunet.augment import Augment
    from gpunet.training import fit

    for dtype in cuda_compile.DTYPES:
        cuda_compile.launch_all(dtype, xp=cupy)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (512, 784), dtype=np.uint8), rng.integers(0, 10, 512)
    for dropout, augment, batch_norm in ((0.0, False, False), (0.2, True, True)):
        net = gn.mlp(SIZES, dropout=dropout, seed=0, device="gpu", batch_norm=batch_norm)
        fit(
            net,
            gn.SoftmaxCrossEntropy(),
            gn.Momentum(net.parameters(), lr=0.05),
            gn.Pixels(x),
            y,
            epochs=1,
            validation=(gn.Pixels(x), y),
            augment=Augment(seed=1) if augment else None,
        )
    for name in PATHS:
        gpunet_step(name)()
    cupy.cuda.get_current_stream().synchronize()


def table(report: dict) -> str:
    """The steps as one Markdown table (ms/step from the events, host wall ms/step, gpunet over
    PyTorch where it has a peer)."""
    header = "| step | gpunet ms/step | wall | PyTorch eager ms/step | wall | gpunet / PyTorch |"
    lines = [report["title"], "", header, "|---|---:|---:|---:|---:|---:|"]
    for name, entry in report["steps"].items():
        mine, peer = entry["gpunet"], entry.get("torch_eager")
        theirs = f"{peer['ms_per_step']:.4f} | {peer['wall_ms_per_step']:.4f}" if peer else "- | -"
        ratio = f"{mine['ms_per_step'] / peer['ms_per_step']:.2f}" if peer else "-"
        lines.append(
            f"| {name} | {mine['ms_per_step']:.4f} | {mine['wall_ms_per_step']:.4f} | {theirs} | "
            f"{ratio} |"
        )
    return "\n".join(lines)


def run(dry_run: bool, repeat: int, warmup: int = 5) -> dict:
    """Every path timed after ``warmup`` steps (see the module docstring): the JSON's report."""
    import gpunet as gn

    day = time.strftime("%Y-%m-%d", time.gmtime())
    title = (
        f"DRY RUN on the CPU ({day}): fake CuPy and CPU PyTorch, nothing here is a GPU measurement"
        if dry_run
        else f"GPU step times ({day}): batch {BATCH}, {'-'.join(map(str, SIZES))}, momentum"
    )
    device = {"device": "fake CuPy on the CPU"} if dry_run else gn.describe_device("gpu")
    report = {
        "date": day,
        "dry_run": dry_run,
        "title": title,
        "device": device,
        "batch": BATCH,
        "sizes": SIZES,
        "steps": {},
    }
    mine, theirs = clocks(dry_run)
    counter = getattr(
        sys.modules["cupy"], "counter", None
    )  # the fake's: the kernels each path launched
    for name in PATHS:
        before = len(counter.log) if counter is not None else 0
        entry = {"gpunet": timed(gpunet_step(name), repeat, mine, warmup)}
        if counter is not None:
            entry["kernels"] = sorted({k for k in counter.log[before:] if k.startswith("gpunet_")})
        peer = torch_step(name, "cpu" if dry_run else "cuda") if theirs is not None else None
        if peer is not None:
            entry["torch_eager"] = timed(peer, repeat, theirs, warmup)
        report["steps"][name] = entry
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="the same path on the CPU (fake CuPy)"
    )
    parser.add_argument(
        "--repeat", type=int, default=200, help="steps timed per path (default 200)"
    )
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.dry_run:
        install_fake_cupy()
    sys.path.insert(0, str(ROOT))
    if args.warm_only:
        warm()
        print(
            "warm: every kernel compiled and run"
            + (" (dry run: the fake CuPy)" if args.dry_run else "")
        )
        return 0
    report = run(args.dry_run, args.repeat, warmup=1 if args.dry_run else 5)
    print(table(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
