"""One training step's time on the GPU (or, for a rehearsal, the CPU), beside PyTorch's in the same run.

    python benchmarks/gpu_step.py --device gpu --json OUT.json [--warm-only]

The step is ``fit``'s: the fused step of the default network (784-512-512-10, ReLU, momentum 0.9, batch
128), without dropout and with the default recipe's 0.2, on random MNIST-shaped data already on the
device. On a GPU it is timed with ``cupyx.profiler.benchmark`` (host time per call and device time between
CUDA events), after a warm-up; PyTorch eager (if installed) runs the same network and update in the same
process, timed with CUDA events. ``--warm-only`` compiles every CUDA kernel gpunet has (each elementwise
kernel in both dtypes, as tests/support/cuda_compile.py launches them, both softmax kernels, a short ``fit``), so
that a session's later steps find CuPy's kernel cache full. On the CPU it times the step with
``time.perf_counter`` (no warm-up of CUDA kernels): the rehearsal of benchmarks/gpu_session.sh --dry-run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gpunet as gn  # noqa: E402
from gpunet import fast  # noqa: E402
from gpunet.training import fit  # noqa: E402

SIZES, BATCH = [784, 512, 512, 10], 128


def warm(device: str) -> None:
    """Compile and run every kernel once (CuPy caches the compiled code on disk)."""
    sys.path.insert(0, str(ROOT / "tests" / "support"))  # the tests' helpers since the regroup
    import cupy
    import cuda_compile

    for dtype in cuda_compile.DTYPES:
        cuda_compile.launch_all(dtype, xp=cupy)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (512, 784), dtype=np.uint8), rng.integers(0, 10, 512)
    for dropout in (0.0, 0.2):
        net = gn.mlp(SIZES, dropout=dropout, seed=0, device=device)
        fit(net, gn.SoftmaxCrossEntropy(), gn.Momentum(net.parameters(), lr=0.05), gn.Pixels(x), y, epochs=1,
            validation=(gn.Pixels(x), y))
    cupy.cuda.get_current_stream().synchronize()


def gpunet_step(device: str, dropout: float):
    """``(step, args)``: one fused training step of fit on device-resident data."""
    rng = np.random.default_rng(1)
    net = gn.mlp(SIZES, dropout=dropout, seed=0, device=device)
    net.train()
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    x = gn.to_device(rng.random((BATCH, 784), dtype=np.float32), device)
    y = gn.to_device(rng.integers(0, 10, BATCH), device)
    step = fast.select(net, gn.SoftmaxCrossEntropy(), opt, y)
    if step is None:
        raise SystemExit(f"the fast path does not apply here: {fast.why_not(net, gn.SoftmaxCrossEntropy(), opt, y)}")
    xp = gn.get_array_module(x)
    step.use_sums(xp.zeros((), np.float64), xp.zeros((), np.int64))
    return step, (x, y)


def torch_step(dropout: float):
    """The same network and update in PyTorch eager on the GPU, or None without a CUDA torch."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    layers = []
    for i, (a, b) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers += [torch.nn.ReLU()] + ([torch.nn.Dropout(dropout)] if dropout else [])
    model = torch.nn.Sequential(*layers).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.rand(BATCH, 784, device="cuda")
    y = torch.randint(0, 10, (BATCH,), device="cuda")
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = lossf(model(x), y)
        loss.backward()
        opt.step()
    return step


def time_gpu(fn, args, repeat: int) -> dict:
    from cupyx.profiler import benchmark

    result = benchmark(fn, args, n_repeat=repeat, n_warmup=20)
    return {"host_ms": float(np.mean(result.cpu_times)) * 1e3, "device_ms": float(np.mean(result.gpu_times)) * 1e3,
            "repeat": repeat}


def time_torch(fn, repeat: int) -> dict:
    import torch

    for _ in range(20):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return {"host_ms": (time.perf_counter() - t0) / repeat * 1e3, "device_ms": start.elapsed_time(end) / repeat,
            "repeat": repeat}


def time_cpu(fn, args, repeat: int) -> dict:
    fn(*args)
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(*args)
        seconds.append(time.perf_counter() - t0)
    return {"host_ms": statistics.median(seconds) * 1e3, "device_ms": None, "repeat": repeat}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="gpu", choices=("gpu", "cpu"))
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--warm-only", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.warm_only:
        if args.device == "gpu":
            warm("gpu")
        print(f"warm: every kernel compiled and run on {args.device}")
        return 0
    report = {"date": time.strftime("%Y-%m-%d"), "device": gn.describe_device(args.device), "batch": BATCH,
              "sizes": SIZES, "steps": {}}
    for dropout in (0.0, 0.2):
        step, step_args = gpunet_step(args.device, dropout)
        timing = time_gpu(step, step_args, args.repeat) if args.device == "gpu" else time_cpu(step, step_args, args.repeat)
        entry = {"gpunet": timing}
        peer = torch_step(dropout) if args.device == "gpu" else None
        if peer is not None:
            entry["torch_eager"] = time_torch(peer, args.repeat)
        report["steps"][f"dropout={dropout}"] = entry
        print(f"dropout {dropout}: " + ", ".join(f"{k} host {v['host_ms']:.3f} ms" +
                                                (f", device {v['device_ms']:.3f} ms" if v["device_ms"] else "")
                                                for k, v in entry.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
