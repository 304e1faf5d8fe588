"""Blocking device->host reads of a GPU training run, counted on the fake CuPy
(tests/support/fake_cupy.py: ``float()``, ``int()``, ``bool()``, ``.item()``, a blocking ``.get()``,
a stream's or an event's ``synchronize``): each one makes the host wait for every queued launch, so
the loop stops feeding the GPU. Issue 33: about 20 an epoch, 12 of them the checkpoint's; now
tests/support/launch_counts.py's READS_PER_EPOCH on the training thread, none of them the
checkpoint's (one non-blocking batched copy that a writer thread collects)."""

import cuda_support
import launch_counts
import numpy as np
import pytest

import gpunet as gn
from gpunet import checkpoint
from gpunet.backend import HostCopy
from gpunet.data.rows import Pixels
from gpunet.training import fit


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setenv("GPUNET_CUDA_CPU", "0")  # counts only: the kernels' CUDA runs in other tests
    yield launch_counts.install(monkeypatch)
    cuda_support.clear_kernel_caches()


def test_an_epoch_stays_within_its_read_budget_and_the_checkpoint_adds_none(fake_gpu, tmp_path):
    """Main-thread reads an epoch with a checkpoint every epoch and validation: at most the budget,
    and exactly as many as without the checkpoint; the checkpoint's one wait (its copy's event) is
    on the writer's thread. Mutation: the checkpoint written on the training thread
    (background=False) adds the event's wait (8 > 7); the old per-array host copies added 12."""
    with_ckpt, other, log = launch_counts.reads_per_epoch(fake_gpu, tmp_path)
    without, _, _ = launch_counts.reads_per_epoch(fake_gpu, None)
    assert with_ckpt <= launch_counts.READS_PER_EPOCH, f"{with_ckpt} blocking reads an epoch: {log}"
    assert with_ckpt == without, (
        f"the checkpoint reads {with_ckpt - without} times on the main thread"
    )
    assert other == 1  # the writer waits for the one batched copy's event
    assert fake_gpu.counter.async_reads, "the checkpoint's copy should be a non-blocking get"


def test_the_background_checkpoint_holds_the_state_of_its_epoch(fake_gpu, tmp_path, monkeypatch):
    """The writer collects its copy only once a step of the next epoch has changed the weights: each
    file holds the weights, velocities and history of the epoch it was taken at (the device
    snapshot), and the last one is complete when fit returns. Mutation: the run's state handing the
    live parameters to HostCopy and HostCopy reading them when collected (no snapshot) fails it."""
    import threading

    x, y = launch_counts.mnist_like(256)
    net = gn.mlp([784, 32, 10], dropout=0.2, seed=0, device="gpu")
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    at_end, written = [], []
    stepped = [threading.Event() for _ in range(3)]  # [e]: a step of epoch e (0-based) is done

    class Snapshot(gn.callbacks.Callback):
        def on_batch_end(self, run, epoch, done, total):
            stepped[epoch].set()

        def on_epoch_end(self, run, record):
            at_end.append(
                {
                    **{f"net/{k}": v for k, v in run.net.state_dict().items()},
                    **{
                        f"optimizer/velocities/{i}": gn.to_numpy(v).copy()
                        for i, v in enumerate(run.optimizer.velocities)
                    },
                }
            )

    real_save, real_wait, waits = checkpoint.save, HostCopy.wait, []

    def slow_wait(self):  # the writer collects its copy once a step of the next epoch is done
        if threading.current_thread() is not threading.main_thread() and len(waits) < 2:
            assert stepped[len(waits) + 1].wait(10)
        waits.append(threading.current_thread().name)
        return real_wait(self)

    def save(path, meta, arrays):
        written.append((meta["epoch"], len(meta["history"]), arrays))
        real_save(path, meta, arrays)

    monkeypatch.setattr(HostCopy, "wait", slow_wait)
    monkeypatch.setattr(checkpoint, "save", save)
    path = tmp_path / "c.npz"
    fit(
        net,
        gn.SoftmaxCrossEntropy(),
        opt,
        Pixels(x),
        y,
        epochs=3,
        batch_size=64,
        checkpoint_path=path,
        callbacks=[Snapshot()],
    )
    assert [(e, h) for e, h, _ in written] == [(1, 1), (2, 2), (3, 3)]
    assert waits == ["gpunet-checkpoint"] * 3
    for (_, _, arrays), want in zip(written, at_end):
        for name, value in want.items():
            np.testing.assert_array_equal(arrays[name], value, err_msg=name)
    record, arrays = checkpoint.load(path)
    assert record["epoch"] == 3 and record["finished"]
    for name, value in at_end[-1].items():
        np.testing.assert_array_equal(arrays[name], value, err_msg=name)
