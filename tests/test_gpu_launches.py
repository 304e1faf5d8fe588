"""The GPU training step, run on the CPU through a counting stand-in for CuPy (tests/fake_cupy.py).

Two things are checked without a GPU: how many device launches one training step of ``fit`` makes (every
elementwise operation, reduction, matmul, gather, kernel and copy counts one, as each is one CUDA launch
through CuPy), and that the GPU path's plumbing trains the same network as the core on the CPU (the
kernels run NumPy mirrors of their CUDA sources there; the sources themselves are compiled by NVRTC in
tests/test_cuda_compile.py and run on a GPU by the GPU twins).

The launch budget (issue 27): at batch 128, the default network (784-512-512-10, ReLU, momentum) takes at
most 20 launches a step without dropout and 24 with it (the default recipe's 0.2). The counts are the
difference between epochs of 5 and 3 steps, divided by 2, so that per-epoch work (the order's upload, the
sums' read-back, the validation pass) is left out.
"""
import sys

import numpy as np
import pytest

import gpunet as gn
from gpunet import backend
from gpunet.data.rows import Pixels
from gpunet.fast import cuda
from gpunet.training import fit
from fake_cupy import FakeCupy

BUDGET = {0.0: 20, 0.2: 24}


@pytest.fixture
def fake_gpu(monkeypatch):
    """CuPy replaced by the counting stand-in for this test: the backend's probe finds a "GPU"."""
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "_probe_result", None)
    monkeypatch.setattr(backend, "_gpu_index", None)
    cuda._elementwise.cache_clear()
    cuda._softmax_xent.cache_clear()
    yield fake
    cuda._elementwise.cache_clear()
    cuda._softmax_xent.cache_clear()


def mnist_like(n, seed=0):
    """n rows of 784 uint8 pixels and 10-class labels (random: this counts launches, it learns nothing)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 784), dtype=np.uint8), rng.integers(0, 10, n)


def launches_per_step(fake, dropout, pixels=True, optimizer="momentum"):
    """Launches of one training step of the default network at batch 128, per-epoch work excluded."""
    counts = []
    for steps in (3, 5):
        x, y = mnist_like(128 * steps)
        net = gn.mlp([784, 512, 512, 10], dropout=dropout, seed=0, device="gpu")
        assert gn.get_array_module(net.parameters()[0].data) is fake
        opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9) if optimizer == "momentum" else \
            gn.SGD(net.parameters(), lr=0.05)
        data = Pixels(x) if pixels else x.astype(np.float32) / 255
        before = fake.counter.launches
        fit(net, gn.SoftmaxCrossEntropy(), opt, data, y, epochs=1, batch_size=128)
        counts.append((fake.counter.launches - before, list(fake.counter.log[before:])))
    (few, _), (more, log) = counts
    assert (more - few) % 2 == 0, "every step should make the same launches"
    return (more - few) // 2, log


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_gpu_step_stays_within_its_launch_budget(fake_gpu, dropout):
    per_step, log = launches_per_step(fake_gpu, dropout)
    assert per_step <= BUDGET[dropout], f"{per_step} launches a step, budget {BUDGET[dropout]}: {log[-40:]}"


def test_the_launch_count_is_the_table_in_benchmarks(fake_gpu):
    """BENCHMARKS.md's table counts, from the code: 2 gathers (x with /255, y), per layer a matmul and a
    bias(+ReLU) pass, the softmax kernel with the loss and hit sums, per layer dW's matmul and one update
    launch, per hidden layer dx's matmul and the ReLU backward; plus a dropout kernel per dropout layer."""
    assert launches_per_step(fake_gpu, 0.0)[0] == 2 + 3 * 2 + 1 + 3 * 2 + 2 * 2
    assert launches_per_step(fake_gpu, 0.2)[0] == 2 + 3 * 2 + 1 + 3 * 2 + 2 * 2 + 2
    assert launches_per_step(fake_gpu, 0.0, pixels=False, optimizer="sgd")[0] == 2 + 3 * 2 + 1 + 3 * 2 + 2 * 2


def train(device, dropout, x, y):
    net = gn.mlp([784, 64, 32, 10], dropout=dropout, seed=1, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    history = fit(net, gn.SoftmaxCrossEntropy(), opt, Pixels(x), y, epochs=2, batch_size=50, seed=3)
    return net, history


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_gpu_path_trains_as_the_core_does(monkeypatch, dropout):
    """The GPU path (fused step, kernels as NumPy mirrors) against the core on the CPU (fast=False):
    same weights and losses within float32 reordering (rtol 1e-4, as test_fast_step's whole runs)."""
    x, y = mnist_like(400, seed=2)
    monkeypatch.setenv("GPUNET_FAST", "0")
    core_net, core_history = train("cpu", dropout, x, y)
    monkeypatch.delenv("GPUNET_FAST")
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "_probe_result", None)
    cuda._elementwise.cache_clear()
    cuda._softmax_xent.cache_clear()
    try:
        gpu_net, gpu_history = train("gpu", dropout, x, y)
        assert gn.get_array_module(gpu_net.parameters()[0].data) is fake
    finally:
        cuda._elementwise.cache_clear()
        cuda._softmax_xent.cache_clear()
    assert any(name.startswith("gpunet_layer_momentum") for name in fake.counter.log)
    for (name, a), b in zip(core_net.state_dict().items(), gpu_net.state_dict().values()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(gpu_history["loss"], core_history["loss"], rtol=1e-4)
    assert gpu_history["accuracy"] == core_history["accuracy"]


def test_every_entry_point_runs_in_the_networks_device_context(fake_gpu):
    """fit, evaluate, predict, predict_proba and explain_step make the GPU holding the network current in
    the calling thread (CuPy's current device is per thread: a server's request thread would otherwise
    compute on GPU 0 beside weights elsewhere); checked from a new thread, as serve's request threads call."""
    import threading

    from fake_cupy import _Device
    from gpunet.explain import explain_step
    from gpunet.training import evaluate, predict, predict_proba

    x, y = mnist_like(64)
    net = gn.mlp([784, 16, 10], seed=0, device="gpu")
    loss = gn.SoftmaxCrossEntropy()
    calls = {
        "fit": lambda: fit(net, loss, gn.SGD(net.parameters(), lr=0.1), Pixels(x), y, epochs=1),
        "evaluate": lambda: evaluate(net, loss, Pixels(x), y),
        "predict": lambda: predict(net, Pixels(x)),
        "predict_proba": lambda: predict_proba(net, Pixels(x)),
        "explain_step": lambda: explain_step(net, loss, gn.SGD(net.parameters(), lr=0.1), x[:2] / 255.0, y[:2]),
    }
    for name, call in calls.items():
        _Device.entered.clear()
        seen = []
        thread = threading.Thread(target=lambda: seen.append((threading.get_ident(), call())))
        thread.start()
        thread.join()
        assert seen, f"{name} raised in its thread"
        assert seen[0][0] in _Device.entered, f"{name} did not enter the network's device in its thread"


def test_training_copies_no_weights_to_the_host(fake_gpu):
    """Without checkpoints or validation, fit reads back only the epoch's two sums: the divergence guard's
    fallback stays on the device (it used to copy the whole model to the host every epoch)."""
    x, y = mnist_like(256)
    net = gn.mlp([784, 16, 10], seed=0, device="gpu")
    fake_gpu.counter.downloads.clear()
    fit(net, gn.SoftmaxCrossEntropy(), gn.Momentum(net.parameters(), lr=0.05), Pixels(x), y, epochs=3,
        batch_size=128)
    assert all(shape == () for shape in fake_gpu.counter.downloads), fake_gpu.counter.downloads


def test_augmented_training_makes_no_host_round_trips_and_distorts_as_the_cpu(fake_gpu):
    """Issue 25 on the GPU path: with ``augment=`` the distortion runs on the network's device (its host
    draws go up, nothing of the images comes back down), and a batch distorted on the "GPU" is the CPU's
    distortion of the same batch with the same seed (float32 rounding of the same formulas: 1e-5)."""
    from gpunet.augment import Augment

    x, y = mnist_like(256)
    net = gn.mlp([784, 16, 10], seed=0, device="gpu")
    fake_gpu.counter.downloads.clear()
    fit(net, gn.SoftmaxCrossEntropy(), gn.Momentum(net.parameters(), lr=0.05), Pixels(x), y, epochs=2,
        batch_size=128, augment=Augment(seed=3))
    assert all(shape == () for shape in fake_gpu.counter.downloads), fake_gpu.counter.downloads
    images = x[:64].astype(np.float32) / 255
    on_gpu = Augment(seed=3)(gn.to_device(images, "gpu"))
    assert gn.get_array_module(on_gpu) is fake_gpu
    np.testing.assert_allclose(gn.to_numpy(on_gpu), Augment(seed=3)(images), rtol=0, atol=1e-5)


class OneRank:
    """A communicator of one rank: the all-reduce of one rank is the identity."""

    rank, size = 0, 1

    def allreduce(self, buf):
        pass


def stop_answers(params, asked_at, steps=5):
    from gpunet.parallel import GradientSum

    gradient_sum = GradientSum(OneRank(), params)
    return [gradient_sum(4, 4, step == asked_at) for step in range(steps)]


def test_a_gpu_rank_reads_the_stop_flag_one_step_late(fake_gpu):
    """On a GPU the all-reduce's stop flag is copied to pinned memory and read one step later (reading it
    at once would make the host wait for the all-reduce every step); on the CPU it is read at once."""
    net = gn.mlp([3, 2], seed=0, device="gpu")
    for p in net.parameters():
        p.grad[...] = 1
    fake_gpu.counter.downloads.clear()
    assert stop_answers(net.parameters(), asked_at=2) == [False, False, False, True, False]
    assert fake_gpu.counter.downloads == [(1,)] * 5  # one flag a step, into pinned memory
    cpu = gn.mlp([3, 2], seed=0, device="cpu")
    for p in cpu.parameters():
        p.grad[...] = 1
    assert stop_answers(cpu.parameters(), asked_at=2) == [False, False, True, False, False]


def test_a_rank_draws_its_rows_of_the_global_batch_on_the_gpu(fake_gpu):
    """A data-parallel rank whose shard starts at row 5 of a 12-row global batch: the GPU dropout kernel
    (its mirror) keys units by their place in the global batch and the distortion is drawn for the global
    batch, so rows 5..11 get what one process gives them. 30 units a row: row 5 starts inside a 64-bit word
    of the draw (lane 2). Mutation: the kernel's ``start`` left at 0 -> the masks differ."""
    from types import SimpleNamespace

    from gpunet.augment import Augment
    from gpunet.fast import ops
    from gpunet.layers import Dropout

    whole, rank = Dropout(0.3, seed=4), Dropout(0.3, seed=4)
    rank.row_start = 5
    want = whole.new_mask(np.ones((12, 30), np.float32))[5:]
    y = fake_gpu.asarray(np.ones((7, 30), np.float32))
    got = ops.dropout(rank, y, fake_gpu.empty_like(y))
    assert np.array_equal(backend.to_numpy(got), want) and np.array_equal(backend.to_numpy(y), want)
    images = np.random.default_rng(0).random((12, 784), dtype=np.float32)
    one = Augment(seed=3).transform_batch(SimpleNamespace(batch_rows=12, row_start=0), images)
    run = SimpleNamespace(batch_rows=12, row_start=5)
    mine = Augment(seed=3).transform_batch(run, fake_gpu.asarray(images[5:]))
    assert backend.device_of(mine) == "gpu"
    np.testing.assert_allclose(backend.to_numpy(mine), one[5:], rtol=1e-5, atol=1e-5)  # float32 resampling
