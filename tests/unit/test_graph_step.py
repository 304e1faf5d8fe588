"""The CUDA graph step (gpunet/fast/graph.py) on the fake CuPy (tests/support/fake_cupy.py), which
records stream capture: the launches made while a stream captures are kept (not run) and run at each
replay; an allocation, a host read, a copy or a synchronization during a capture raises there.

Checked without a GPU: one capture per batch shape (full batches and the last partial one), on a
non-blocking stream, nothing allocated or read inside it, one replay per step, one host-to-device
copy of the step's scalars before each; the scalars are what the eager fused step passes its
kernels; and the graph run leaves the eager run's weights, optimizer state and history over whole
epochs with dropout, Adam and a schedule (float tolerance: the GEMMs are other kernels than
cuBLAS's; the rest are the same kernels). Where g++ and CuPy's headers are here every kernel also
runs its CUDA source (tests/support/cuda_cpu.py); the networks are small so that the CPU runs them
in seconds.
"""

import json
import sys

import numpy as np
import pytest
from conftest import benchmarks_on_path
from fake_cupy import CaptureError, FakeCupy

import gpunet as gn
from gpunet import backend
from gpunet.data.rows import Pixels
from gpunet.fast import cuda, graph_kernels
from gpunet.training import Interrupted, fit

# float32 sums in other orders than cuBLAS's (the GEMMs) over an epoch of updates: a few hundred eps
# of the weights' scale; the eager run on the fake uses NumPy's matmul
RTOL, ATOL = 2e-5, 2e-6


@pytest.fixture
def fake_gpu(monkeypatch):
    fake = FakeCupy()
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "_probe_result", None)
    monkeypatch.setattr(backend, "_gpu_index", None)
    for cache in (
        cuda._elementwise,
        cuda._softmax_xent,
        graph_kernels._gemm,
        graph_kernels._elementwise,
    ):
        cache.cache_clear()
    yield fake
    for cache in (
        cuda._elementwise,
        cuda._softmax_xent,
        graph_kernels._gemm,
        graph_kernels._elementwise,
    ):
        cache.cache_clear()


def data(n=70, features=12, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, features), dtype=np.uint8), rng.integers(0, classes, n)


def run(
    fake,
    *,
    graph_on,
    optimizer="adam",
    dropout=0.25,
    epochs=2,
    batch_size=16,
    schedule=None,
    pixels=True,
    rows=70,
    **kwargs,
):
    """Train a 12-10-8-4 network on the fake GPU; returns (net, optimizer, history)."""
    x, y = data(rows)
    net = gn.mlp([12, 10, 8, 4], dropout=dropout, seed=3, device="gpu")
    assert gn.get_array_module(net.parameters()[0].data) is fake
    params = net.parameters()
    opt = {
        "adam": lambda: gn.Adam(params, lr=0.01),
        "adamw": lambda: gn.AdamW(params, lr=0.01, weight_decay=0.1),
        "rmsprop": lambda: gn.RMSprop(params, lr=0.01, momentum=0.9, centered=True),
        "momentum": lambda: gn.Momentum(params, lr=0.05, momentum=0.9, nesterov=True),
        "sgd": lambda: gn.SGD(params, lr=0.05, weight_decay=1e-3),
    }[optimizer]()
    xs = Pixels(x) if pixels else x.astype(np.float32) / 255
    history = fit(
        net,
        gn.SoftmaxCrossEntropy(),
        opt,
        xs,
        y,
        epochs=epochs,
        batch_size=batch_size,
        seed=5,
        schedule=schedule,
        cuda_graph=graph_on,
        **kwargs,
    )
    return net, opt, history


def host(a):
    return np.asarray(a.view(np.ndarray))


def assert_same_run(a, b):
    (net_a, opt_a, hist_a), (net_b, opt_b, hist_b) = a, b
    for p, q in zip(net_a.parameters(), net_b.parameters()):
        np.testing.assert_allclose(host(p.data), host(q.data), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(host(p.grad), host(q.grad), rtol=RTOL, atol=ATOL)
    for name in opt_a.slots:
        for m, n in zip(getattr(opt_a, name), getattr(opt_b, name)):
            np.testing.assert_allclose(host(m), host(n), rtol=RTOL, atol=ATOL)
    assert getattr(opt_a, "t", None) == getattr(opt_b, "t", None)
    for ra, rb in zip(hist_a.epochs, hist_b.epochs):
        assert ra["accuracy"] == rb["accuracy"] and ra["lr"] == rb["lr"]
        np.testing.assert_allclose(ra["loss"], rb["loss"], rtol=RTOL)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "rmsprop", "momentum", "sgd"])
def test_graph_and_eager_steps_agree_over_epochs(fake_gpu, optimizer):
    """Two epochs of 5 steps (4 of 16 rows, the last of 6) with dropout and a schedule: same
    weights, gradients, optimizer state, Adam's t, losses and accuracies as the eager fused step."""
    lr = 0.01 if "adam" in optimizer else 0.05

    def schedule(epoch):
        return lr * 0.5**epoch

    pixels = optimizer != "sgd"  # float rows: the other gather
    eager = run(fake_gpu, graph_on=False, optimizer=optimizer, schedule=schedule, pixels=pixels)
    graphed = run(fake_gpu, graph_on=True, optimizer=optimizer, schedule=schedule, pixels=pixels)
    assert_same_run(eager, graphed)
    assert [r["lr"] for r in graphed[2].epochs] == [schedule(0), schedule(1)]


def test_one_capture_per_batch_shape_and_one_replay_per_step(fake_gpu):
    """3 epochs of 5 steps (16, 16, 16, 16, 6 rows): two captures, both on one non-blocking stream
    in relaxed mode, holding the whole step (gathers, GEMMs, softmax, updates); 15 replays, each
    after one copy of the step's scalars on that stream; nothing a capture cannot hold."""
    run(fake_gpu, graph_on=True, epochs=3)
    c = fake_gpu.counter
    assert c.violations == []
    assert len(c.captures) == 2, [len(names) for _, _, names in c.captures]
    streams = {id(stream) for stream, _, _ in c.captures}
    assert len(streams) == 1
    stream, mode, names = c.captures[0]
    assert stream.non_blocking and not stream.null and mode == 2  # cudaStreamCaptureModeRelaxed
    for want in (
        "gpunet_graph_gather_scaled",
        "gpunet_graph_gather_labels",
        "gpunet_gemm_nn",
        "gpunet_gemm_nt",
        "gpunet_gemm_tn",
        "gpunet_bias_relu",
        "gpunet_graph_dropout",
        "gpunet_softmax_xent_sums",
        "gpunet_graph_adam",
        "gpunet_graph_bias_grad",
        "gpunet_relu_mask_backward",
    ):
        assert want in names, (want, names)
    assert "matmul" not in names  # cuBLAS raises while a stream captures
    assert c.replays == 15 and c.log.count("graph") == 15
    copies = [copy for where, copy in c.copies if where is stream]
    assert len(copies) == 15 and all(copy.dtype == np.uint64 for copy in copies)


def test_the_scalars_are_what_the_eager_step_passes(fake_gpu, monkeypatch):
    """Per step: slot 0 the batch's offset, then the two dropout layers' keys, then Adam's
    scalars (the seven of its begin_step without weight decay), bit for bit those the eager step
    hands cuda.dropout and Adam's rule kernel (its t and bias corrections, the schedule's lr); the
    permutation's offsets are b * batch_size."""
    calls = {"adam": [], "dropout": []}
    real_rule, real_dropout = cuda.rule, cuda.dropout

    def rule(opt):
        launch, slots = real_rule(opt), len(opt.slots)

        def recorded(w, g, *args):
            calls["adam"].append(tuple(np.float64(s) for s in args[slots:]))
            return launch(w, g, *args)

        return recorded

    def dropout(y, mask, key, threshold, scale, start=0):
        calls["dropout"].append(int(key))
        return real_dropout(y, mask, key, threshold, scale, start)

    monkeypatch.setattr(cuda, "rule", rule)
    monkeypatch.setattr(cuda, "dropout", dropout)
    schedule = lambda epoch: 0.01 * 0.5**epoch
    run(fake_gpu, graph_on=False, schedule=schedule)
    steps = 10  # 2 epochs of 5
    adam_steps = calls["adam"][::6]  # 3 Linears: W and b each, the same scalars
    assert len(calls["adam"]) == 6 * steps and all(
        calls["adam"][k] == adam_steps[k // 6] for k in range(60)
    )
    keys = calls["dropout"]
    assert len(keys) == 2 * steps
    before = len(fake_gpu.counter.copies)
    run(fake_gpu, graph_on=True, schedule=schedule)
    rows = [copy for _, copy in fake_gpu.counter.copies[before:]]
    assert len(rows) == steps
    for k, row in enumerate(rows):
        assert row[0] == 16 * (k % 5)
        assert [int(v) for v in row[1:3]] == keys[2 * k : 2 * k + 2]
        assert len(adam_steps[k]) == 7 and len(row) == 10
        assert tuple(row[3:10].view(np.float64)) == adam_steps[k]


def test_the_fake_refuses_what_a_capture_cannot_hold(fake_gpu):
    """The checks above can fail: inside a capture an allocation, a host read, a copy and a
    synchronization each raise, and a capture on the legacy default stream is refused."""
    a = fake_gpu.zeros(3, np.float32)
    stream = fake_gpu.cuda.Stream(non_blocking=True)
    for act in (
        lambda: fake_gpu.empty(3),
        lambda: a + 1,
        lambda: float(a[0]),
        lambda: a.get(),
        lambda: a.set(np.zeros(3, np.float32)),
        lambda: stream.synchronize(),
    ):
        with stream:
            stream.begin_capture()
            with pytest.raises(CaptureError):
                act()
            stream.end_capture()
    with pytest.raises(RuntimeError, match="legacy default stream"):
        fake_gpu.cuda.get_current_stream().begin_capture()
    with stream:  # captured work runs at the replays, not before
        stream.begin_capture()
        a += 1
        g = stream.end_capture()
    assert host(a).tolist() == [0, 0, 0]
    g.launch(stream)
    g.launch(stream)
    assert host(a).tolist() == [2, 2, 2]


def test_a_run_the_graph_cannot_take_is_refused_in_one_line(fake_gpu):
    with pytest.raises(ValueError, match="cuda_graph: .*the optimizer is MySGD"):
        x, y = data()
        net = gn.mlp([12, 10, 4], seed=3, device="gpu")
        fit(
            net,
            gn.SoftmaxCrossEntropy(),
            type("MySGD", (gn.SGD,), {})(net.parameters(), lr=0.01),  # not in OPTIMIZERS
            Pixels(x),
            y,
            epochs=1,
            cuda_graph=True,
        )
    with pytest.raises(ValueError, match="cuda_graph: .*on the CPU"):
        x, y = data()
        net = gn.mlp([12, 10, 4], seed=3, device="cpu")
        fit(
            net,
            gn.SoftmaxCrossEntropy(),
            gn.Adam(net.parameters()),
            x / 255.0,
            y,
            epochs=1,
            cuda_graph=True,
        )


def test_an_interrupted_graph_run_resumes_to_the_uninterrupted_one(fake_gpu, tmp_path):
    """Interrupted after step 7 (epoch 2, step 2; the checkpoint read after the replays), resumed:
    the same bits as the run that went through (same kernels, the resumed epoch's sums set in
    place)."""
    whole = run(fake_gpu, graph_on=True, epochs=2)
    asked = []

    def interrupt():
        asked.append(1)
        return len(asked) == 7

    path = tmp_path / "c.npz"
    with pytest.raises(Interrupted):
        run(fake_gpu, graph_on=True, epochs=2, checkpoint_path=path, interrupt=interrupt)
    resumed = run(fake_gpu, graph_on=True, epochs=2, checkpoint_path=path, resume=True)
    for p, q in zip(whole[0].parameters(), resumed[0].parameters()):
        assert host(p.data).tobytes() == host(q.data).tobytes()
    assert [r["loss"] for r in whole[2].epochs] == [r["loss"] for r in resumed[2].epochs]
    assert whole[1].t == resumed[1].t == 10


def test_the_divergence_guard_and_epoch_callbacks_see_the_graph_run(fake_gpu):
    """An lr that overflows in epoch 2: the guard puts back epoch 1's weights and stops, as in the
    eager run; the epoch callback sees each epoch's record (the replays finished before it)."""
    seen = {True: [], False: []}
    runs = {}
    for graph_on in (False, True):
        runs[graph_on] = run(
            fake_gpu,
            graph_on=graph_on,
            optimizer="sgd",
            dropout=0.0,
            epochs=3,
            schedule=lambda epoch: 0.05 if epoch == 0 else 1e30,
            callback=lambda record, on=graph_on: seen[on].append(record["loss"]),
        )
    (_, _, eager), (_, _, graphed) = runs[False], runs[True]
    assert graphed.stop_reason == eager.stop_reason == "diverged"
    assert graphed.diverged_epoch == eager.diverged_epoch == 2
    assert len(seen[True]) == len(seen[False]) == 2 and np.isfinite(seen[True][0])
    np.testing.assert_allclose(seen[True][0], seen[False][0], rtol=RTOL)
    assert_same_run(runs[False], runs[True])


def test_the_command_line_says_whether_the_graph_step_can_run(monkeypatch, capsys, tmp_path):
    """Without a GPU: ``gpunet info`` names the reason, and ``train --cuda-graph`` refuses in one
    line."""
    from gpunet import cli

    monkeypatch.setattr(backend, "gpu_available", lambda: False)
    monkeypatch.setattr(backend, "gpu_unavailable_reason", lambda: "no driver here")
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cuda_graph"] == {"available": False, "why_not": "no usable GPU (no driver here)"}
    assert cli.main(["info"]) == 0
    assert (
        "CUDA graph step: not available: no usable GPU (no driver here)" in capsys.readouterr().out
    )
    code = cli.main(
        [
            "train",
            "--cuda-graph",
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        code == 2 and len(err) == 1 and "--cuda-graph:" in err[0] and "no usable GPU" in err[0]
    ), err


def test_the_comparison_table_puts_each_step_against_pytorch_eager():
    """benchmarks/gpu_graph.py's table: ms per step from the events and the wall clock, and the
    ratio to PyTorch eager's ms per step (the session's one table; its dry run is in
    test_gpu_session.py)."""
    benchmarks_on_path()
    import gpu_graph

    rows = {
        "gpunet eager": {"device_ms": 300.0, "wall_ms": 310.0, "steps": 1000},
        "gpunet graph": {"device_ms": 100.0, "wall_ms": 101.0, "steps": 1000},
        "pytorch eager": {"device_ms": 200.0, "wall_ms": 210.0, "steps": 1000},
    }
    lines = gpu_graph.table(rows, "title").splitlines()
    assert lines[0] == "title"
    assert lines[4:] == [
        "| gpunet eager | 1000 | 0.3000 | 0.3100 | 1.50 |",
        "| gpunet graph | 1000 | 0.1000 | 0.1010 | 0.50 |",
        "| pytorch eager | 1000 | 0.2000 | 0.2100 | 1.00 |",
    ]
    rows["pytorch eager"] = None
    assert (
        gpu_graph.table(rows, "t").splitlines()[-1].endswith("not run (PyTorch is not installed) |")
    )


@pytest.mark.parametrize("optimizer,rows", [("momentum", 70), ("adam", 70), ("adam", 65)])
def test_a_data_parallel_graph_run_trains_as_the_eager_one(fake_gpu, optimizer, rows):
    """Rank 0 of two (tests/support/launch_counts.TwinComm: the twin has the same gradients),
    dropout on: the graph writes the shard's share of the gradients, the all-reduce and the update
    run after each replay on the graph's stream; the same state as the eager distributed step. 70
    rows in batches of 16: shards of 8 rows, and of 3 in the last batch of 6 (its own capture); 65
    rows: the last batch's one row is the twin's, this rank adds a zero gradient and takes the
    core's step."""
    from launch_counts import TwinComm

    eager = run(fake_gpu, graph_on=False, optimizer=optimizer, comm=TwinComm(), rows=rows)
    before = len(fake_gpu.counter.captures)
    graphed = run(fake_gpu, graph_on=True, optimizer=optimizer, comm=TwinComm(), rows=rows)
    assert_same_run(eager, graphed)
    captured = fake_gpu.counter.captures[before:]
    assert len(captured) == (2 if rows == 70 else 1) and fake_gpu.counter.violations == []
    names = captured[0][2]
    assert "gpunet_graph_layer_momentum" not in names and "gpunet_graph_adam" not in names


def test_the_graph_kernels_compile_with_nvrtc(fake_gpu, monkeypatch):
    """Every ElementwiseKernel launch of the graph step (recorded from runs with Adam, Nesterov
    momentum and SGD, pixels and float rows, float32 and float64, dropout on), compiled with NVRTC
    as CuPy would build it for those arguments, for each arch NVRTC here knows; skips without NVRTC
    (GPUNET_REQUIRE_NVRTC=1 fails). The GEMMs: tests/unit/test_graph_kernels.py."""
    import cuda_compile as cc
    import cuda_cpu
    from test_cuda_compile import toolchain_or_skip

    if cuda_cpu._cupy is None:
        pytest.skip("CuPy is not installed (its code generator and NVRTC wrapper are needed)")
    with monkeypatch.context() as real:  # NVRTC through the real CuPy, not the fake
        real.setitem(sys.modules, "cupy", cuda_cpu._cupy)
        tools = toolchain_or_skip()
    monkeypatch.setenv("GPUNET_CUDA_CPU", "0")  # the sources are compiled here, not run
    launched, real = {}, graph_kernels.launch

    def record(name, *args):
        spec = graph_kernels.spec(name)
        plain = tuple(a.view(np.ndarray) if isinstance(a, np.ndarray) else a for a in args)
        launched.setdefault(cc.elementwise_program(spec, plain)[:2], name)
        return real(name, *args)

    monkeypatch.setattr(graph_kernels, "launch", record)
    for optimizer, pixels, dtype in (
        ("adam", True, np.float32),
        ("momentum", False, np.float32),
        ("sgd", True, np.float64),
    ):
        x, y = data()
        net = gn.mlp([12, 10, 8, 4], dropout=0.25, seed=3, device="gpu", dtype=dtype)
        params = net.parameters()
        opt = (
            gn.Adam(params)
            if optimizer == "adam"
            else gn.SGD(params, lr=0.05)
            if optimizer == "sgd"
            else gn.Momentum(params, lr=0.05, nesterov=True)
        )
        xs = Pixels(x, dtype) if pixels else (x / 255).astype(dtype)
        fit(net, gn.SoftmaxCrossEntropy(), opt, xs, y, epochs=1, batch_size=16, cuda_graph=True)
    # every variant, and Adam's rule kernel (the graph variant of gpunet.fast.rules' gpunet_adam)
    assert set(launched.values()) == set(graph_kernels.variants()) | {"adam"}
    failures = []
    monkeypatch.setitem(sys.modules, "cupy", cuda_cpu._cupy)
    for name, source in launched:
        for arch in tools["archs"]:
            try:
                assert cc.compile_program(source, name, arch)[:4] == b"\x7fELF"
            except cc.CompileError as exc:
                failures.append(str(exc))
    assert not failures, "\n\n".join(failures)


def test_a_graph_step_is_one_launch_from_the_host(fake_gpu):
    """In steady state a step costs the host one graph launch and one scalar copy, nothing else: an
    epoch's launches (third epoch minus second) are the steps plus a per-epoch constant (the
    permutation's upload and copy, the sums, the divergence guard's copies), for 5 and for 10 steps
    an epoch."""
    run(fake_gpu, graph_on=True, epochs=1)  # the backend's probe (its launches) comes first
    per_epoch = {}
    for rows in (70, 150):  # 5 and 10 steps of 16 rows, the last of 6 in both
        counts, copies = [], []
        for epochs in (2, 3):
            before, copied = fake_gpu.counter.launches, len(fake_gpu.counter.copies)
            run(fake_gpu, graph_on=True, epochs=epochs, rows=rows)
            counts.append(fake_gpu.counter.launches - before)
            copies.append(len(fake_gpu.counter.copies) - copied)
        per_epoch[rows] = counts[1] - counts[0]
        assert copies[1] - copies[0] == -(-rows // 16)  # one copy of the scalars a step
    assert per_epoch[150] - per_epoch[70] == 10 - 5, per_epoch
