"""What the distortions cost (issue 25): one epoch's worth of gpunet.augment beside one training epoch of
the default network, and beside PyTorch doing the same distortion (affine_grid + grid_sample, the elastic
field smoothed by a separable conv1d with reflect padding), in the same run, rounds interleaved.

    python benchmarks/bench_augment.py --data-dir /path/to/mnist --rounds 3 --json out.json

Per round: (1) ``fit`` for one epoch of 784-512-512-10 (the default recipe: dropout 0.2, momentum, batch 128)
on the 55,000 training images, without and with ``augment=`` (what the distortion adds to a real epoch), the
second also timing the distortion's own seconds inside it (``augment_in_fit``: its share of the rest of that
same epoch is the steadiest of these figures, since the two are timed batch by batch, side by side, and the
machine's drift from one epoch to the next cancels out);
(2) gpunet's distortion (the settings of ``--preset best``: rotation 8, scale 0.08,
shift 2, elastic 4/25) of the same 55,000 images in batches of 128, through the fast path (the compiled CPU
kernel) and through the core's xp formula (``GPUNET_FAST=0``); (3) PyTorch's. Medians are reported, and the
median of each round's own ratio (the machine's speed drifts between rounds, less within one); the target
is the distortion's seconds <= 30% of a default epoch's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

import gpunet as gn
from gpunet.augment import DEFAULTS, Augment, gaussian_matrix
from gpunet.data.rows import Pixels
from gpunet.data import load_mnist, split_validation
from gpunet.training import fit

SETTINGS = dict(DEFAULTS)


class TimedAugment(Augment):
    """An Augment that adds up the seconds its per-batch distortions take inside ``fit``."""

    seconds = 0.0

    def transform_batch(self, run, xb):
        start = time.perf_counter()
        out = super().transform_batch(run, xb)
        self.seconds += time.perf_counter() - start
        return out


def default_epoch(x, y, augment=None):
    """One ``fit`` epoch of the default network, with ``augment`` as its per-batch transform when given."""
    net = gn.mlp([784, 512, 512, 10], dropout=0.2, seed=0, device="cpu")
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    start = time.perf_counter()
    fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=1, batch_size=128, augment=augment)
    return time.perf_counter() - start


def gpunet_epoch(images, fast: bool):
    os.environ["GPUNET_FAST"] = "1" if fast else "0"
    aug = Augment(**SETTINGS, seed=0)
    start = time.perf_counter()
    for lo in range(0, len(images), 128):
        aug(images[lo:lo + 128])
    os.environ["GPUNET_FAST"] = "1"
    return time.perf_counter() - start


def torch_epoch(images, torch):
    """The same distortion in PyTorch: draws from its generator, the field smoothed by two conv1d passes."""
    F = torch.nn.functional
    g = torch.Generator().manual_seed(0)
    x = torch.from_numpy(images).reshape(-1, 1, 28, 28)
    taps = torch.from_numpy(gaussian_matrix(60, 4.0)[30, 14:47].astype(np.float32))  # 33 interior taps
    kernel = (SETTINGS["alpha"] * taps).reshape(1, 1, -1)
    deg = np.pi / 180
    start = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, len(x), 128):
            xb = x[lo:lo + 128]
            b = len(xb)
            angle = (torch.rand(b, generator=g) * 2 - 1) * SETTINGS["rotation"] * deg
            scale = 1 + (torch.rand(b, generator=g) * 2 - 1) * SETTINGS["scale"]
            shift = (torch.rand(b, 2, generator=g) * 2 - 1) * SETTINGS["shift"] / 13.5  # grid units
            cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
            theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
            grid = F.affine_grid(theta, (b, 1, 28, 28), align_corners=True)
            field = torch.rand(b * 2, 1, 28, 28, generator=g) * 2 - 1
            field = F.conv1d(F.pad(field.reshape(-1, 1, 28), (16, 16), mode="reflect"), kernel).reshape(b * 2, 28, 28)
            field = F.conv1d(F.pad(field.transpose(1, 2).reshape(-1, 1, 28), (16, 16), mode="reflect"), kernel)
            field = field.reshape(b, 2, 28, 28).permute(0, 3, 2, 1) / 13.5  # (b, H, W, 2), grid units (a random
            # field: which axis is which changes nothing of its cost)
            F.grid_sample(xb, grid + field, mode="bilinear", padding_mode="zeros", align_corners=True)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=os.environ.get("GPUNET_DATA"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (NumPy's BLAS uses its own setting)")
    ap.add_argument("--json")
    args = ap.parse_args()
    (x, y), _ = load_mnist(args.data_dir, dtype=np.uint8)
    (x_tr, y_tr), _ = split_validation(x, y, 5000)
    images = Pixels(x_tr).numpy()
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    gpunet_epoch(images[:1280], True)  # compiles the kernel (cached on disk) before any timing
    times = {"default_epoch": [], "default_epoch_augmented": [], "augment_in_fit": [], "augment_fast": [],
             "augment_core": [], "augment_torch": []}
    for r in range(args.rounds):
        times["default_epoch"].append(default_epoch(Pixels(x_tr), y_tr))
        timed = TimedAugment(**SETTINGS, seed=0)
        times["default_epoch_augmented"].append(default_epoch(Pixels(x_tr), y_tr, timed))
        times["augment_in_fit"].append(timed.seconds)
        times["augment_fast"].append(gpunet_epoch(images, True))
        times["augment_core"].append(gpunet_epoch(images, False))
        if torch is not None:
            times["augment_torch"].append(torch_epoch(images, torch))
        print(json.dumps({k: round(v[-1], 3) for k, v in times.items() if v}), flush=True)
    med = {k: statistics.median(v) for k, v in times.items() if v}
    per_round = {"fast_share": [f / d for f, d in zip(times["augment_fast"], times["default_epoch"])],
                 "added": [a / d - 1 for a, d in zip(times["default_epoch_augmented"], times["default_epoch"])],
                 "in_fit_share": [t / (a - t) for t, a in zip(times["augment_in_fit"], times["default_epoch_augmented"])]}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor() or
              platform.machine(), "cpus": os.cpu_count(), "rounds": args.rounds, "settings": SETTINGS,
              "torch": getattr(torch, "__version__", None), "seconds": times, "median": med,
              "fast_share_of_default_epoch": med["augment_fast"] / med["default_epoch"],
              "core_share_of_default_epoch": med["augment_core"] / med["default_epoch"],
              "added_to_a_default_epoch": med["default_epoch_augmented"] / med["default_epoch"] - 1,
              "per_round": per_round, "median_of_round_fast_shares": statistics.median(per_round["fast_share"]),
              "median_of_round_added": statistics.median(per_round["added"]),
              "median_of_round_in_fit_shares": statistics.median(per_round["in_fit_share"])}
    print(json.dumps({k: result[k] for k in ("median", "fast_share_of_default_epoch", "core_share_of_default_epoch",
                                             "added_to_a_default_epoch", "median_of_round_fast_shares",
                                             "median_of_round_added", "median_of_round_in_fit_shares")}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
