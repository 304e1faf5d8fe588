"""Device launches of one training step of ``fit`` on the counting stand-in for CuPy
(tests/support/fake_cupy.py), for every path that has a launch budget: the source of
tests/unit/test_gpu_launches.py's budgets and of BENCHMARKS.md's launch table
(benchmarks/launch_table.py writes it from :func:`table`; a test checks it).

A step's count is the difference between epochs of 5 and 3 steps at batch 128 of the default network
(784-512-512-10, ReLU), divided by 2, so that per-epoch work (the order's upload, the sums'
read-back) is left out. ``rank`` runs as rank 0 of a two-rank job through :class:`TwinComm`.
"""

from __future__ import annotations

import sys

import cuda_support
import numpy as np
from fake_cupy import FakeCupy

import gpunet as gn
from gpunet import backend
from gpunet.data.rows import Pixels
from gpunet.training import fit

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


# blocking device->host reads an epoch on the main thread, a GPU run of the CLI's shape
# (784-512-512-10, dropout, momentum, validation, a checkpoint every epoch): the epoch's loss and
# right answers (2), the stream's sync before them (the epoch's seconds), validation's loss,
# right-answer count and confusion counts (3), and the record's row count; the checkpoint's weights
# and velocities none (one non-blocking batched copy, collected by the writer thread)
READS_PER_EPOCH = 7


class TwinComm:
    """Rank 0 of two whose twin computed the very same gradients: the all-reduce doubles the buffer
    (one NCCL launch on the GPU: counted as one); what fit asks of a communicator besides, on one
    process."""

    rank, size, local_rank = 0, 2, 0

    def __init__(self, counter=None):
        self.counter = counter

    def allreduce(self, buf):
        if (
            self.counter is not None and type(buf) is not np.ndarray
        ):  # a device buffer: NCCL's one launch
            self.counter.add("nccl_allreduce")
        plain = buf.view(
            np.ndarray
        )  # the doubling stands for the other rank's sum: no launch of this rank
        plain *= buf.dtype.type(2)

    def allgather(self, obj):
        return [obj, obj]

    def agree(self, device, dtype):
        """The twin is this rank's copy: same device, dtype and GPU (no host collective to
        count)."""


def install(monkeypatch=None):
    """CuPy replaced by a fresh counting stand-in (through ``monkeypatch`` when given); returns
    it."""
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
    """n rows of 784 uint8 pixels and 10-class labels (random: this counts launches, it learns
    nothing)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n)


def make_optimizer(net, optimizer):
    params = net.parameters()
    return {
        "momentum": lambda: gn.Momentum(params, lr=0.05, momentum=0.9),
        "sgd": lambda: gn.SGD(params, lr=0.05),
        "adam": lambda: gn.Adam(params),
    }[optimizer]()


_COUNTED: dict = {}  # settings -> (launches, log): a property of the code, counted once a process


def per_step(
    fake, dropout=0.0, pixels=True, optimizer="momentum", ranks=1, augment=False, batch_norm=False
):
    """``(launches of one step, the log of the longer epoch)`` for these settings (see the module
    doc); counted once a process (the budget tests and BENCHMARKS.md's table share the count)."""
    key = (dropout, pixels, optimizer, ranks, augment, batch_norm)
    if key not in _COUNTED:
        _COUNTED[key] = _count(fake, *key)
    return _COUNTED[key]


def _count(fake, dropout, pixels, optimizer, ranks, augment, batch_norm):
    from gpunet.augment import Augment

    counts = []
    for steps in (3, 5):
        x, y = mnist_like(BATCH * steps)
        net = gn.mlp(SIZES, dropout=dropout, seed=0, device="gpu", batch_norm=batch_norm)
        assert gn.get_array_module(net.parameters()[0].data) is fake
        data = Pixels(x) if pixels else x.astype(np.float32) / 255
        before = fake.counter.launches
        fit(
            net,
            gn.SoftmaxCrossEntropy(),
            make_optimizer(net, optimizer),
            data,
            y,
            epochs=1,
            batch_size=BATCH,
            comm=TwinComm(fake.counter) if ranks > 1 else None,
            augment=Augment(seed=1) if augment else None,
        )
        counts.append((fake.counter.launches - before, list(fake.counter.log[before:])))
    (few, _), (more, log) = counts
    assert (more - few) % 2 == 0, "every step should make the same launches"
    return (more - few) // 2, log


def table(fake) -> str:
    """BENCHMARKS.md's launch table (Markdown), counted now: every path's launches a step and its
    budget, then the blocking reads an epoch (:func:`reads_per_epoch`) and theirs."""
    import tempfile

    lines = ["| path (batch 128, 784-512-512-10) | launches a step | budget |", "|---|---:|---:|"]
    for name, settings, budget in PATHS:
        lines.append(f"| {name} | {per_step(fake, **settings)[0]} | {budget} |")
    with tempfile.TemporaryDirectory() as folder:
        reads, other, _ = reads_per_epoch(fake, folder)
    lines += [
        "",
        "| an epoch (dropout 0.2, validation, a checkpoint every epoch) | blocking reads | budget "
        "|",
        "|---|---:|---:|",
        f"| on the training thread | {reads} | {READS_PER_EPOCH} |",
        f"| on the checkpoint writer's thread (its copy's event) | {other} | - |",
    ]
    return "\n".join(lines) + "\n"


def reads_per_epoch(fake, checkpoint_dir=None, validation=True):
    """``(main-thread reads an epoch, other threads' reads an epoch, the longer run's main-thread
    reads)``: the difference between runs of 3 and 1 epochs, halved (per-run reads left out), of the
    CLI's network with a checkpoint in ``checkpoint_dir`` every epoch (None: no checkpoint)."""
    counts = []
    for epochs in (1, 3):
        x, y = mnist_like(BATCH * 3)
        net = gn.mlp(SIZES, dropout=0.2, seed=0, device="gpu")
        fake.counter.reads.clear()
        path = None if checkpoint_dir is None else f"{checkpoint_dir}/{epochs}.npz"
        xv, yv = mnist_like(300, seed=1)
        fit(
            net,
            gn.SoftmaxCrossEntropy(),
            make_optimizer(net, "momentum"),
            Pixels(x),
            y,
            epochs=epochs,
            batch_size=BATCH,
            validation=(Pixels(xv), yv) if validation else None,
            checkpoint_path=path,
        )
        main = fake.counter.main_thread_reads()
        counts.append((len(main), len(fake.counter.reads) - len(main), main))
    (few, few_other, _), (more, more_other, log) = counts
    assert (more - few) % 2 == 0 and (more_other - few_other) % 2 == 0, "every epoch reads the same"
    return (more - few) // 2, (more_other - few_other) // 2, log
