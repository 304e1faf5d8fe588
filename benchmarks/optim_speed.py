"""Adam's training epoch beside momentum's and PyTorch's Adam, in one run (issue 24's benchmark line).

Peers, each training its own copy of one network (gpunet's initial weights; torch gets them transposed)
on MNIST, one epoch per round, interleaved so that machine noise hits every peer alike::

    gpunet-momentum, gpunet-adam, gpunet-adam-core, torch-adam, torch-momentum, gpunet-momentum, ...

- ``gpunet-momentum``: ``fit`` with ``Momentum(lr=0.05, momentum=0.9)`` (the fused step, folded into BLAS
  on the CPU)
- ``gpunet-adam``: ``fit`` with ``Adam(lr=1e-3)`` (the fused step: one Adam update per parameter)
- ``gpunet-adam-core``: the same with ``fit(..., fast=False)`` (the core's forward, backward and step)
- ``torch-adam``, ``torch-momentum``: PyTorch eager float32, ``torch.optim.Adam(lr=1e-3)`` /
  ``SGD(lr=0.05, momentum=0.9)`` with their defaults, cross-entropy, the same batches in the same order

Round 1 is warm-up (numba compilation, first-touch page faults, thread start-up) and is reported apart;
the medians use rounds 2..R. Each epoch's wall time and its process CPU time (all threads) are recorded:
on a shared, loaded machine the CPU time is the steadier measure of the work. No dropout, so every peer
does the same work. The weights of gpunet-adam and
torch-adam, which start equal and see the same batches, are compared after the last round (float32
rounding grows with the steps: a sanity check that both did the same work, not a test).

    python benchmarks/optim_speed.py --data-dir /path/to/mnist [--rounds 5] [--threads 1] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gpunet as gn  # noqa: E402
from gpunet.data import load_mnist  # noqa: E402
from gpunet.training import fit  # noqa: E402

PEERS = ("gpunet-momentum", "gpunet-adam", "gpunet-adam-core", "torch-adam", "torch-momentum")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("GPUNET_DATA"), help="MNIST folder (default: $GPUNET_DATA)")
    p.add_argument("--sizes", default="784-512-512-10", help="layer sizes (default: 784-512-512-10)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="epochs per peer, the first a warm-up (default: 5)")
    p.add_argument("--train-rows", type=int, default=None, help="use only the first N training rows")
    p.add_argument("--no-torch", action="store_true", help="gpunet's peers only")
    p.add_argument("--threads", type=int, default=None, help="BLAS and torch threads (default: the libraries' own)")
    p.add_argument("--json", help="write the results here")
    return p.parse_args(argv)


def order(seed, n):
    """The permutation ``fit(..., seed=seed)`` draws for its first epoch, so torch sees the same batches."""
    return np.random.default_rng(seed).permutation(n)


class Gpunet:
    def __init__(self, sizes, x, y, optimizer, fast):
        self.net = gn.mlp(sizes, seed=0, device="cpu")
        self.opt = (gn.Adam(self.net.parameters(), lr=1e-3) if optimizer == "adam"
                    else gn.Momentum(self.net.parameters(), lr=0.05, momentum=0.9))
        self.x, self.y, self.fast, self.loss = x, y, fast, gn.SoftmaxCrossEntropy()

    def epoch(self, seed, bs) -> tuple:
        start, cpu = time.perf_counter(), time.process_time()
        fit(self.net, self.loss, self.opt, self.x, self.y, epochs=1, batch_size=bs, seed=seed, fast=self.fast)
        return time.perf_counter() - start, time.process_time() - cpu

    def weights(self) -> list:
        return [gn.to_numpy(p.data) for p in self.net.parameters()]


class Torch:
    def __init__(self, torch, sizes, x, y, optimizer, start):
        layers = []
        for i in range(len(sizes) - 1):
            layers += [torch.nn.Linear(sizes[i], sizes[i + 1])] + ([torch.nn.ReLU()] if i < len(sizes) - 2 else [])
        self.torch, self.model = torch, torch.nn.Sequential(*layers)
        linears = [m for m in self.model if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for m, (W, b) in zip(linears, zip(start[::2], start[1::2])):
                m.weight.copy_(torch.from_numpy(W.T.copy()))
                m.bias.copy_(torch.from_numpy(b.copy()))
        params = self.model.parameters()
        self.opt = (torch.optim.Adam(params, lr=1e-3) if optimizer == "adam"
                    else torch.optim.SGD(params, lr=0.05, momentum=0.9))
        self.x, self.y = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
        self.loss = torch.nn.CrossEntropyLoss()

    def epoch(self, seed, bs) -> tuple:
        torch, n = self.torch, len(self.x)
        idx = torch.from_numpy(order(seed, n))
        start, cpu = time.perf_counter(), time.process_time()
        for lo in range(0, n, bs):
            rows = idx[lo:lo + bs]
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.model(self.x[rows]), self.y[rows]).backward()
            self.opt.step()
        return time.perf_counter() - start, time.process_time() - cpu

    def weights(self) -> list:
        out = []
        for m in self.model:
            if isinstance(m, self.torch.nn.Linear):
                out += [m.weight.detach().numpy().T, m.bias.detach().numpy()]
        return out


def make_peers(args, sizes, x, y):
    peers = {"gpunet-momentum": Gpunet(sizes, x, y, "momentum", True), "gpunet-adam": Gpunet(sizes, x, y, "adam", True),
             "gpunet-adam-core": Gpunet(sizes, x, y, "adam", False)}
    if not args.no_torch:
        import torch

        start = peers["gpunet-adam"].weights()
        peers["torch-adam"] = Torch(torch, sizes, x, y, "adam", [w.copy() for w in start])
        peers["torch-momentum"] = Torch(torch, sizes, x, y, "momentum", [w.copy() for w in start])
    return peers


def run_rounds(args, peers) -> tuple:
    """Wall and CPU seconds of each peer's epochs, round after round (interleaved)."""
    wall, cpu = ({name: [] for name in peers} for _ in range(2))
    for r in range(args.rounds):
        for name, peer in peers.items():
            w, c = peer.epoch(r, args.batch_size)
            wall[name].append(w)
            cpu[name].append(c)
        print(f"round {r + 1}: " + "  ".join(f"{k} {wall[k][-1]:.3f}s (cpu {cpu[k][-1]:.3f}s)" for k in peers),
              flush=True)
    return wall, cpu


def ratios(med: dict) -> dict:
    pairs = [("gpunet-adam", "gpunet-momentum"), ("gpunet-adam", "gpunet-adam-core"), ("gpunet-adam", "torch-adam"),
             ("gpunet-momentum", "torch-momentum"), ("torch-adam", "torch-momentum")]
    return {f"{a} / {b}": med[a] / med[b] for a, b in pairs if a in med and b in med}


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split("-")]
    (x, y), _ = load_mnist(args.data_dir, download=False)
    x, y = x[:args.train_rows], y[:args.train_rows]
    limits = None
    if args.threads:
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)
    peers = make_peers(args, sizes, x, y)
    if args.threads and "torch-adam" in peers:
        peers["torch-adam"].torch.set_num_threads(args.threads)
    wall, cpu = run_rounds(args, peers)
    med = {k: statistics.median(v[1:] or v) for k, v in wall.items()}
    med_cpu = {k: statistics.median(v[1:] or v) for k, v in cpu.items()}
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__, "gpunet_fast": gn.fast.status(), "threads": args.threads,
                          "load_average": os.getloadavg()},
              "sizes": sizes, "batch_size": args.batch_size, "train_rows": len(x), "rounds": args.rounds,
              "seconds": wall, "cpu_seconds": cpu, "median_seconds": med, "median_cpu_seconds": med_cpu,
              "ratios": ratios(med), "cpu_ratios": ratios(med_cpu)}
    if "torch-adam" in peers:
        result["machine"]["torch"] = peers["torch-adam"].torch.__version__
        result["machine"]["torch_threads"] = peers["torch-adam"].torch.get_num_threads()
        diffs = [float(np.abs(a - b).max()) for a, b in zip(peers["gpunet-adam"].weights(), peers["torch-adam"].weights())]
        result["adam_max_weight_difference"] = max(diffs)
    if limits is not None:
        limits.unregister()
    print("median epoch (rounds 2..): " + "  ".join(f"{k} {med[k]:.3f}s (cpu {med_cpu[k]:.3f}s)" for k in med))
    print("wall: " + "  ".join(f"{k}: {v:.3f}" for k, v in result["ratios"].items()))
    print("cpu:  " + "  ".join(f"{k}: {v:.3f}" for k, v in result["cpu_ratios"].items()))
    if "adam_max_weight_difference" in result:
        print(f"gpunet-adam vs torch-adam, largest weight difference after {args.rounds} epochs: "
              f"{result['adam_max_weight_difference']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
