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
the medians use rounds 2..R. No dropout, so every peer does the same work. The weights of gpunet-adam and
torch-adam, which start equal and see the same batches, are compared after the last round (float32
rounding grows with the steps: a sanity check that both did the same work, not a test).

    python benchmarks/optim_speed.py --data-dir /path/to/mnist [--rounds 5] [--json out.json]
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

    def epoch(self, seed, bs) -> float:
        start = time.perf_counter()
        fit(self.net, self.loss, self.opt, self.x, self.y, epochs=1, batch_size=bs, seed=seed, fast=self.fast)
        return time.perf_counter() - start

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

    def epoch(self, seed, bs) -> float:
        torch, n = self.torch, len(self.x)
        idx = torch.from_numpy(order(seed, n))
        start = time.perf_counter()
        for lo in range(0, n, bs):
            rows = idx[lo:lo + bs]
            self.opt.zero_grad(set_to_none=True)
            self.loss(self.model(self.x[rows]), self.y[rows]).backward()
            self.opt.step()
        return time.perf_counter() - start

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


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split("-")]
    (x, y), _ = load_mnist(args.data_dir, download=False)
    x, y = x[:args.train_rows], y[:args.train_rows]
    peers = make_peers(args, sizes, x, y)
    times = {name: [] for name in peers}
    for r in range(args.rounds):
        for name, peer in peers.items():
            times[name].append(peer.epoch(r, args.batch_size))
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)
    later = {k: v[1:] or v for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in later.items()}
    result = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__, "gpunet_fast": gn.fast.status()},
              "sizes": sizes, "batch_size": args.batch_size, "train_rows": len(x), "rounds": args.rounds,
              "seconds": times, "median_seconds": med,
              "ratios": {"gpunet-adam / gpunet-momentum": med["gpunet-adam"] / med["gpunet-momentum"],
                         "gpunet-adam / gpunet-adam-core": med["gpunet-adam"] / med["gpunet-adam-core"]}}
    if "torch-adam" in peers:
        import torch

        result["machine"]["torch"] = torch.__version__
        result["machine"]["torch_threads"] = torch.get_num_threads()
        result["ratios"]["gpunet-adam / torch-adam"] = med["gpunet-adam"] / med["torch-adam"]
        result["ratios"]["gpunet-momentum / torch-momentum"] = med["gpunet-momentum"] / med["torch-momentum"]
        diffs = [float(np.abs(a - b).max()) for a, b in zip(peers["gpunet-adam"].weights(), peers["torch-adam"].weights())]
        result["adam_max_weight_difference"] = max(diffs)
    print("median epoch (rounds 2..): " + "  ".join(f"{k} {v:.3f}s" for k, v in med.items()))
    print("  ".join(f"{k}: {v:.3f}" for k, v in result["ratios"].items()))
    if "adam_max_weight_difference" in result:
        print(f"gpunet-adam vs torch-adam, largest weight difference after {args.rounds} epochs: "
              f"{result['adam_max_weight_difference']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
