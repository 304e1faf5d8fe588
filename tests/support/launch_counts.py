"""Device launches of one training step of ``fit`` on the counting stand-in for CuPy (tests/support/fake_cupy.py),
for every path that has a launch budget: the source of tests/unit/test_gpu_launches.py's budgets and of
BENCHMARKS.md's launch table (benchmarks/launch_table.py writes it from :func:`table`).

A step's count is the difference between epochs of 5 and 3 steps at batch 128 of the default network
(784-512-512-10, ReLU), divided by 2, so that per-epoch work (the order's upload, the sums' read-back) is
left out. ``rank`` runs as rank 0 of a two-rank job through :class:`TwinComm`.
"""
from __future__ import annotations

import sys

import numpy as np

import gpunet as gn
from gpunet import backend
from gpunet.data.rows import Pixels
from gpunet.training import fit
import cuda_support
from fake_cupy import FakeCupy

SIZES, BATCH = [784, 512, 512, 10], 128
# (path, the settings of :func:`per_step`, its budget): a test fails when a launch is added to any
PATHS = [
    ("one GPU, momentum", {}, 19),
    ("one GPU, momentum, dropout 0.2", {"dropout": 0.2}, 21),
    ("one GPU, SGD, float inputs", {"optimizer": "sgd", "pixels": False}, 19),
    ("one GPU, Adam", {"optimizer": "adam"}, 25),
    ("one GPU, Adam, dropout 0.2", {"optimizer": "adam", "dropout": 0.2}, 27),
    ("data-parallel (per rank), momentum, dropout 0.2", {"dropout": 0.2, "ranks": 2}, 25),
    ("--augment, momentum, dropout 0.2", {"dropout": 0.2, "augment": True}, 27),
    ("--batch-norm, momentum, dropout 0.2", {"dropout": 0.2, "batch_norm": True}, 25),
]


class TwinComm:
    """Rank 0 of two whose twin computed the very same gradients: the all-reduce doubles the buffer (one
    NCCL launch on the GPU: counted as one); what fit asks of a communicator besides, on one process."""

    rank, size, local_rank = 0, 2, 0

    def __init__(self, counter=None):
        self.counter = counter

    def allreduce(self, buf):
        if self.counter is not None and type(buf) is not np.ndarray:  # a device buffer: NCCL's one launch
            self.counter.add("nccl_allreduce")
        plain = buf.view(np.ndarray)  # the doubling stands for the other rank's sum: no launch of this rank
        plain *= buf.dtype.type(2)

    def allgather(self, obj):
        return [obj, obj]

    def agree(self, device, dtype):
        """The twin is this rank's copy: same device, dtype and GPU (no host collective to count)."""


def install(monkeypatch=None):
    """CuPy replaced by a fresh counting stand-in (through ``monkeypatch`` when given); returns it."""
    fake = FakeCupy()
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, "cupy", fake)
        monkeypatch.setattr(backend, "_probe_result", None)
        monkeypatch.setattr(backend, "_gpu_index", None)
    else:
        sys.modules["cupy"] = fake
        backend._probe_result, backend._gpu_index = None, None
    cuda_support.clear_kernel_caches()
    return fake


def mnist_like(n, seed=0):
    """n rows of 784 uint8 pixels and 10-class labels (random: this counts launches, it learns nothing)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n)


def make_optimizer(net, optimizer):
    params = net.parameters()
    return {"momentum": lambda: gn.Momentum(params, lr=0.05, momentum=0.9),
            "sgd": lambda: gn.SGD(params, lr=0.05), "adam": lambda: gn.Adam(params)}[optimizer]()


def per_step(fake, dropout=0.0, pixels=True, optimizer="momentum", ranks=1, augment=False, batch_norm=False):
    """``(launches of one step, the log of the longer epoch)`` for these settings (see the module doc)."""
    from gpunet.augment import Augment

    counts = []
    for steps in (3, 5):
        x, y = mnist_like(BATCH * steps)
        net = gn.mlp(SIZES, dropout=dropout, seed=0, device="gpu", batch_norm=batch_norm)
        assert gn.get_array_module(net.parameters()[0].data) is fake
        data = Pixels(x) if pixels else x.astype(np.float32) / 255
        before = fake.counter.launches
        fit(net, gn.SoftmaxCrossEntropy(), make_optimizer(net, optimizer), data, y, epochs=1, batch_size=BATCH,
            comm=TwinComm(fake.counter) if ranks > 1 else None, augment=Augment(seed=1) if augment else None)
        counts.append((fake.counter.launches - before, list(fake.counter.log[before:])))
    (few, _), (more, log) = counts
    assert (more - few) % 2 == 0, "every step should make the same launches"
    return (more - few) // 2, log


def table(fake) -> str:
    """BENCHMARKS.md's launch table (Markdown), counted now."""
    lines = ["| path (batch 128, 784-512-512-10) | launches a step | budget |", "|---|---|---|"]
    for name, settings, budget in PATHS:
        lines.append(f"| {name} | {per_step(fake, **settings)[0]} | {budget} |")
    return "\n".join(lines) + "\n"
