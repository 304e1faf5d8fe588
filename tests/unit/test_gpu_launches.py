"""The GPU training step, run on the CPU through a counting stand-in for CuPy
(tests/support/fake_cupy.py).

Two things are checked without a GPU: how many device launches one training step of ``fit`` makes
(every elementwise operation, reduction, matmul, gather, kernel and copy counts one, as each is one
CUDA launch through CuPy), and that the GPU path's plumbing trains the same network as the core on
the CPU (the kernels run NumPy mirrors of their CUDA sources there; the sources themselves are
compiled by NVRTC in tests/unit/test_cuda_compile.py and run on a GPU by the GPU twins).

The launch budgets (issues 27 and 33) are tests/support/launch_counts.py's PATHS: at batch 128, the
default network (784-512-512-10, ReLU, momentum) takes 19 launches a step without dropout and 21
with it (the default recipe's 0.2); the data-parallel step, --augment, --batch-norm and Adam have
theirs. The counts are the difference between epochs of 5 and 3 steps, divided by 2, so that
per-epoch work (the order's upload, the sums' read-back, the validation pass) is left out.
"""

import cuda_support
import launch_counts
import numpy as np
import pytest

import gpunet as gn
from gpunet import backend
from gpunet.data.rows import Pixels
from gpunet.training import fit


@pytest.fixture
def fake_gpu(monkeypatch):
    """CuPy replaced by the counting stand-in for this test: the backend's probe finds a "GPU"."""
    with cuda_support.fake_cupy(monkeypatch) as fake:
        yield fake


mnist_like = launch_counts.mnist_like


@pytest.mark.parametrize(
    "name,settings,budget", launch_counts.PATHS, ids=[p[0] for p in launch_counts.PATHS]
)
def test_every_path_stays_within_its_launch_budget(fake_gpu, name, settings, budget):
    """Each budget is the count today (issue 33's ceilings: data-parallel <= 25, --augment <= +6
    over the same step without it, --batch-norm <= 40): one launch more fails. Mutation: the
    data-parallel step weighing its gradients before the all-reduce again (26), or augment's grid
    re-uploaded per batch (28)."""
    per_step, log = launch_counts.per_step(fake_gpu, **settings)
    assert per_step <= budget, f"{name}: {per_step} launches a step, budget {budget}: {log[-60:]}"


def test_augment_adds_at_most_six_launches(fake_gpu):
    """--augment's distortion: the codes' upload and cast, the smoothing's two products, the maps'
    upload and the resampling kernel; nothing else (no grid, centre or offsets uploaded per
    batch)."""
    plain = launch_counts.per_step(fake_gpu, dropout=0.2)[0]
    assert launch_counts.per_step(fake_gpu, dropout=0.2, augment=True)[0] - plain <= 6


def test_the_launch_count_is_the_table_in_benchmarks(fake_gpu):
    """BENCHMARKS.md's table counts, from the code: 2 gathers (x with /255, y), per layer a matmul
    and a bias(+ReLU) pass, the softmax kernel with the loss and hit sums, per layer dW's matmul and
    one update launch, per hidden layer dx's matmul and the ReLU backward; plus a dropout kernel per
    dropout layer; and the table in BENCHMARKS.md is benchmarks/launch_table.py's output of these
    counts."""
    per_step = launch_counts.per_step
    assert per_step(fake_gpu, 0.0)[0] == 2 + 3 * 2 + 1 + 3 * 2 + 2 * 2
    assert per_step(fake_gpu, 0.2)[0] == 2 + 3 * 2 + 1 + 3 * 2 + 2 * 2 + 2
    assert (
        per_step(fake_gpu, 0.0, pixels=False, optimizer="sgd")[0] == 2 + 3 * 2 + 1 + 3 * 2 + 2 * 2
    )
    # the data-parallel step: per layer dW, db, one update after the sum; the all-reduce; no
    # weighing pass
    assert per_step(fake_gpu, 0.0, ranks=2)[0] == 2 + 3 * 2 + 1 + 3 * 3 + 2 * 2 + 1
    # BatchNorm: per BatchNorm block the statistics and normalisation kernels (the bias inside), its
    # backward (ReLU's inside) and gamma/beta's update instead of the ReLU backward
    assert per_step(fake_gpu, 0.0, batch_norm=True)[0] == 2 + 2 * 3 + 2 + 1 + 3 * 2 + 2 * 3


def test_the_table_in_benchmarks_is_what_the_code_counts(fake_gpu, monkeypatch):
    """BENCHMARKS.md's launch and read table is benchmarks/launch_table.py's output of
    launch_counts' counts and budgets, between its markers; writing it replaces only what lies
    between them. Mutation: a budget in launch_counts.PATHS changed (augment's 27 -> 28) without
    rerunning the script fails it."""
    from conftest import benchmarks_on_path

    benchmarks_on_path()
    import launch_table

    monkeypatch.setenv("GPUNET_CUDA_CPU", "0")  # counts only (the CUDA sources run in other tests)
    text = launch_table.BENCHMARKS.read_text()
    assert launch_table.current_table(text) == launch_counts.table(fake_gpu), (
        "BENCHMARKS.md's launch table is stale: run python benchmarks/launch_table.py"
    )
    rewritten = launch_table.replace_table(text, "| x |\n")
    assert launch_table.current_table(rewritten) == "| x |\n"
    assert rewritten.replace("| x |\n", launch_table.current_table(text), 1) == text
    with pytest.raises(ValueError, match="expected one"):
        launch_table.replace_table(text.replace(launch_table.END, ""), "| x |\n")


def train(device, dropout, x, y):
    net = gn.mlp([784, 64, 32, 10], dropout=dropout, seed=1, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    history = fit(net, gn.SoftmaxCrossEntropy(), opt, Pixels(x), y, epochs=2, batch_size=50, seed=3)
    return net, history


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_gpu_path_trains_as_the_core_does(monkeypatch, dropout):
    """The GPU path (fused step, kernels as NumPy mirrors) against the core on the CPU (fast=False):
    same weights and losses within float32 reordering (rtol 1e-4, as test_fast_step's whole
    runs)."""
    x, y = mnist_like(400, seed=2)
    monkeypatch.setenv("GPUNET_FAST", "0")
    core_net, core_history = train("cpu", dropout, x, y)
    monkeypatch.delenv("GPUNET_FAST")
    with cuda_support.fake_cupy(monkeypatch) as fake:
        gpu_net, gpu_history = train("gpu", dropout, x, y)
        assert gn.get_array_module(gpu_net.parameters()[0].data) is fake
    assert any(name.startswith("gpunet_layer_momentum") for name in fake.counter.log)
    for (name, a), b in zip(core_net.state_dict().items(), gpu_net.state_dict().values()):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_allclose(gpu_history["loss"], core_history["loss"], rtol=1e-4)
    assert gpu_history["accuracy"] == core_history["accuracy"]


def test_every_entry_point_runs_in_the_networks_device_context(fake_gpu):
    """fit, evaluate, predict, predict_proba and explain_step make the GPU holding the network
    current in the calling thread (CuPy's current device is per thread: a server's request thread
    would otherwise compute on GPU 0 beside weights elsewhere); checked from a new thread, as
    serve's request threads call."""
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
        "explain_step": lambda: explain_step(
            net, loss, gn.SGD(net.parameters(), lr=0.1), x[:2] / 255.0, y[:2]
        ),
    }
    for name, call in calls.items():
        _Device.entered.clear()
        seen = []
        thread = threading.Thread(target=lambda: seen.append((threading.get_ident(), call())))
        thread.start()
        thread.join()
        assert seen, f"{name} raised in its thread"
        assert seen[0][0] in _Device.entered, (
            f"{name} did not enter the network's device in its thread"
        )


def test_training_copies_no_weights_to_the_host(fake_gpu):
    """Without checkpoints or validation, fit reads back only the epoch's two sums: the divergence
    guard's fallback stays on the device (it used to copy the whole model to the host every
    epoch)."""
    x, y = mnist_like(256)
    net = gn.mlp([784, 16, 10], seed=0, device="gpu")
    fake_gpu.counter.downloads.clear()
    fit(
        net,
        gn.SoftmaxCrossEntropy(),
        gn.Momentum(net.parameters(), lr=0.05),
        Pixels(x),
        y,
        epochs=3,
        batch_size=128,
    )
    assert all(shape == () for shape in fake_gpu.counter.downloads), fake_gpu.counter.downloads


def test_augmented_training_makes_no_host_round_trips_and_distorts_as_the_cpu(fake_gpu):
    """Issue 25 on the GPU path: with ``augment=`` the distortion runs on the network's device (its
    host draws go up, nothing of the images comes back down), and a batch distorted on the "GPU" is
    the CPU's distortion of the same batch with the same seed (float32 rounding of the same
    formulas: 1e-5)."""
    from gpunet.augment import Augment

    x, y = mnist_like(256)
    net = gn.mlp([784, 16, 10], seed=0, device="gpu")
    fake_gpu.counter.downloads.clear()
    fit(
        net,
        gn.SoftmaxCrossEntropy(),
        gn.Momentum(net.parameters(), lr=0.05),
        Pixels(x),
        y,
        epochs=2,
        batch_size=128,
        augment=Augment(seed=3),
    )
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
    """On a GPU the all-reduce's stop flag is copied to pinned memory and read one step later
    (reading it at once would make the host wait for the all-reduce every step); on the CPU it is
    read at once."""
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


def _train_both(monkeypatch, make, settings, epochs=2):
    """``(core, gpu)``: ``make(device)`` -> (net, optimizer) trained by fit with ``settings`` on the
    CPU through the core (or the CPU's own path where ``settings`` has a comm), then on the fake
    GPU."""
    x, y = mnist_like(300, seed=4)
    results = []
    for device in ("cpu", "gpu"):
        if device == "gpu":
            monkeypatch.delenv("GPUNET_FAST", raising=False)
            fake = launch_counts.install(monkeypatch)
        elif "comm" not in settings:
            monkeypatch.setenv("GPUNET_FAST", "0")
        net, opt = make(device)
        history = fit(
            net,
            gn.SoftmaxCrossEntropy(),
            opt,
            Pixels(x),
            y,
            epochs=epochs,
            batch_size=50,
            seed=3,
            **settings,
        )
        results.append((net, opt, history))
    assert gn.get_array_module(results[1][0].parameters()[0].data) is fake
    return results, fake


def _assert_same_state(core, gpu, rtol=1e-4, atol=1e-5, skip=()):
    (core_net, core_opt, core_history), (gpu_net, gpu_opt, gpu_history) = core, gpu
    for (name, a), b in zip(core_net.state_dict().items(), gpu_net.state_dict().values()):
        if name not in skip:
            np.testing.assert_allclose(b, a, rtol=rtol, atol=atol, err_msg=name)
    names = [n for n in core_net.state_dict() if "running" not in n]
    for name, a, b in zip(
        names, core_opt.params, gpu_opt.params
    ):  # the gradients: the core step's state
        if name not in skip:
            np.testing.assert_allclose(
                gn.to_numpy(b.grad), a.grad, rtol=rtol, atol=atol, err_msg=name
            )
    np.testing.assert_allclose(gpu_history["loss"], core_history["loss"], rtol=rtol)


@pytest.mark.parametrize("optimizer", ["momentum", "sgd", "adam"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_batch_norm_step_trains_as_the_core_does(monkeypatch, optimizer, dropout):
    """The GPU's fused BatchNorm step (its kernels as NumPy mirrors) against the core's BatchNorm on
    the CPU: weights, running statistics, gradients and losses within float32 reordering (rtol 1e-4,
    as test_fast_step's whole runs). Mutation: the running variance without n / (n - 1), or dx
    without the xhat * dgamma term, fails it."""

    def make(device):
        net = gn.mlp([784, 64, 32, 10], dropout=dropout, seed=1, device=device, batch_norm=True)
        return net, launch_counts.make_optimizer(net, optimizer)

    (core, gpu), fake = _train_both(monkeypatch, make, {})
    assert "gpunet_batch_norm_backward" in fake.counter.log
    # a Linear's bias before a BatchNorm has a gradient that is 0 up to rounding (BatchNorm
    # subtracts the mean it shifts): Adam divides that rounding by its own size into steps of lr, on
    # either side alike; the bias cannot change any output, and the running mean carries it.
    # Compared for SGD and momentum.
    layers = core[0].layers
    skip = (
        [
            name
            for i in range(len(layers) - 1)
            if type(layers[i + 1]).__name__ == "BatchNorm"
            for name in (f"{i}.b", f"{i + 1}.running_mean")
        ]
        if optimizer == "adam"
        else ()
    )
    _assert_same_state(core, gpu, skip=skip)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_data_parallel_gpu_step_trains_as_the_cpu_rank_does(monkeypatch, optimizer, dropout):
    """Rank 0 of two (its twin computing the same gradients, tests/support/launch_counts.TwinComm):
    the GPU's step (the shard weight in the softmax's 1/N, gradients as views into the all-reduce's
    buffer, the fused update after it) against the CPU's (weighing pass, the core rule after the
    sum), within float32 reordering. Mutation: the softmax dividing by the shard's rows (not the
    global batch's), or the update before the all-reduce, fails it."""

    def make(device):
        net = gn.mlp([784, 64, 32, 10], dropout=dropout, seed=1, device=device)
        opt = launch_counts.make_optimizer(net, optimizer)
        opt.weight_decay = 1e-4
        return net, opt

    (core, gpu), fake = _train_both(monkeypatch, make, {"comm": launch_counts.TwinComm()})
    assert any(name.endswith("_given") for name in fake.counter.log) or optimizer == "adam"
    assert "multiply" not in fake.counter.log  # no weighing pass over the gradients on the GPU
    # Adam steps about lr (1e-3) whatever the gradient's size, so for a weight whose gradient is
    # near 0 the two summation orders can change a step by a good part of lr: 5.8e-5 was seen with
    # the kernels' NumPy mirrors (no g++ harness); the 1/N mutation moved 92% of W, far beyond it
    _assert_same_state(core, gpu, atol=1e-4 if optimizer == "adam" else 1e-5)
    # the gradients are the all-reduce's one buffer itself: each starts where the one before ends
    grads = [p.grad for p in gpu[1].params]
    starts = [g.__array_interface__["data"][0] for g in grads]
    assert all(b == a + g.nbytes for a, b, g in zip(starts, starts[1:], grads)), starts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha", [0.0, 25.0])
def test_the_resampling_kernel_reads_as_the_core(fake_gpu, dtype, alpha):
    """The resampling kernel's mirror (gpunet_resample, pixel by pixel as its source) against the
    core's bilinear(source_points) on the CPU, with distortions that throw points far outside the
    image (shift 30 px, scale 0.9: clipped reads, zeros) and images of odd size (5 x 7) beside
    MNIST's; float32 within 1e-5 (the rounding of the same formulas), float64 within 1e-12.
    Mutation: a bounds test 'ri + 1 <= h' or reading fields[n, :, i, j] fails it."""
    from gpunet.augment import Augment, bilinear, source_points

    rng = np.random.default_rng(5)
    for shape, shift, scale in (((28, 28), 2.0, 0.08), ((5, 7), 30.0, 0.9)):
        h, w = shape
        images = rng.random((9, h * w)).astype(dtype)
        images[:, ::3] = 0
        aug = Augment(
            shift=shift,
            scale=scale,
            rotation=40.0,
            shear=10.0,
            alpha=alpha,
            sigma=2.0,
            shape=shape,
            seed=2,
        )
        params = aug.draw(len(images))
        on_gpu = gn.to_numpy(aug.apply(gn.to_device(images, "gpu"), params))
        assert "gpunet_resample" in fake_gpu.counter.log
        monkey = Augment(
            shift=shift,
            scale=scale,
            rotation=40.0,
            shear=10.0,
            alpha=alpha,
            sigma=2.0,
            shape=shape,
            seed=2,
        )
        import gpunet.fast as fast_path

        real = fast_path.resample
        fast_path.resample = lambda *a: None  # the core's own resampling, not a kernel
        try:
            core = monkey.apply(images, params)
        finally:
            fast_path.resample = real
        np.testing.assert_allclose(
            on_gpu, core, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12
        )
        assert bilinear is not None and source_points is not None


def test_a_rank_draws_its_rows_of_the_global_batch_on_the_gpu(fake_gpu):
    """A data-parallel rank whose shard starts at row 5 of a 12-row global batch: the GPU dropout
    kernel (its mirror) keys units by their place in the global batch and the distortion is drawn
    for the global batch, so rows 5..11 get what one process gives them. 30 units a row: row 5
    starts inside a 64-bit word of the draw (lane 2). Mutation: the kernel's ``start`` left at 0 ->
    the masks differ."""
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
    np.testing.assert_allclose(
        backend.to_numpy(mine), one[5:], rtol=1e-5, atol=1e-5
    )  # float32 resampling
