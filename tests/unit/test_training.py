"""The training loop: batch modes, stopping rules, schedules, determinism and batched evaluation."""

import numpy as np
import pytest
from conftest import assert_allclose, optional

import gpunet as gn
from gpunet.schedules import Cosine, Step, make_schedule
from gpunet.training import evaluate, fit, predict, predict_proba

XOR_X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
XOR_Y = np.array([0, 1, 1, 0])


def blobs(n=400, seed=0, classes=3, dim=5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(classes, dim))
    y = rng.integers(0, classes, size=n)
    return (centers[y] + rng.normal(size=(n, dim))).astype(np.float32), y


def setup(device, sizes=(5, 16, 3), seed=0, lr=0.05, **kw):
    net = gn.mlp(list(sizes), seed=seed, device=device, **kw)
    return net, gn.Momentum(net.parameters(), lr=lr, momentum=0.9), gn.SoftmaxCrossEntropy()


@pytest.mark.parametrize("batch_size", [1, None])
def test_xor_online_and_full_batch(device, batch_size):
    net = gn.mlp([2, 8, 2], activation="tanh", seed=0, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.05 if batch_size == 1 else 0.1, momentum=0.9)
    hist = fit(
        net, gn.SoftmaxCrossEntropy(), opt, XOR_X, XOR_Y, epochs=300, batch_size=batch_size, seed=1
    )
    assert gn.to_numpy(predict(net, XOR_X)).tolist() == [0, 1, 1, 0]
    assert hist["accuracy"][-1] == 1.0


def test_history_records_every_epoch(device):
    x, y = blobs()
    net, opt, loss = setup(device)
    hist = fit(
        net, loss, opt, x[:300], y[:300], epochs=4, batch_size=32, validation=(x[300:], y[300:])
    )
    assert len(hist) == 4 and hist.stop_reason == "max_epochs"
    for i, rec in enumerate(hist.epochs):
        assert rec["epoch"] == i + 1
        assert set(rec) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"}
        assert rec["seconds"] > 0 and 0 <= rec["accuracy"] <= 1
    assert hist["loss"][-1] < hist["loss"][0]
    assert hist["val_accuracy"][-1] > 0.9


def test_target_loss_stops_early():
    x, y = blobs()
    net, opt, loss = setup("cpu")
    hist = fit(net, loss, opt, x, y, epochs=200, batch_size=32, target_loss=0.05)
    assert hist.stop_reason == "target_loss"
    assert hist["loss"][-1] < 0.05 and all(l >= 0.05 for l in hist["loss"][:-1])
    assert len(hist) < 200


def test_early_stopping_restores_the_best_weights():
    """Validation labels contradict training labels, so validation loss rises once training works:
    training must stop after `patience` bad epochs and put back the weights of the best epoch."""
    x, y = blobs(seed=3)
    net, opt, loss = setup("cpu", lr=0.02)
    snapshots = {}
    hist = fit(
        net,
        loss,
        opt,
        x,
        y,
        epochs=50,
        batch_size=32,
        validation=(x[:100], (y[:100] + 1) % 3),
        patience=3,
        callback=lambda rec: snapshots.__setitem__(rec["epoch"], net.state_dict()),
    )
    assert hist.stop_reason == "early_stopping"
    best = hist.best_epoch
    assert best == int(np.argmin(hist["val_loss"])) + 1
    assert len(hist) == best + 3
    final = net.state_dict()
    assert all(np.array_equal(final[k], snapshots[best][k]) for k in final)
    assert not all(np.array_equal(final[k], snapshots[len(hist)][k]) for k in final)


def test_schedules():
    s = Step(0.1, step_size=2, gamma=0.5)
    assert [s(e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    c = Cosine(0.1, epochs=4, min_lr=0.0)
    assert [c(e) for e in range(4)] == pytest.approx(
        [0.1, 0.1 * (1 + np.cos(np.pi / 4)) / 2, 0.05, 0.1 * (1 + np.cos(3 * np.pi / 4)) / 2]
    )
    w = Cosine(0.1, epochs=10, warmup=1)
    assert w(0) == pytest.approx(0.05) and w(1) == pytest.approx(0.1)
    with pytest.raises(
        ValueError, match="schedule: expected one of constant, step, cosine, got 'linear'"
    ):
        make_schedule("linear", 0.1, 5)
    x, y = blobs()
    net, opt, loss = setup("cpu")
    hist = fit(net, loss, opt, x, y, epochs=4, schedule=c)
    assert hist["lr"] == pytest.approx([c(e) for e in range(4)])


def test_same_seed_same_run_and_different_seed_differs():
    x, y = blobs()
    runs = []
    for seed in (5, 5, 6):
        net, opt, loss = setup("cpu")
        fit(net, loss, opt, x, y, epochs=2, batch_size=16, seed=seed)
        runs.append(net.state_dict())
    assert all(np.array_equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not np.array_equal(runs[0]["0.W"], runs[2]["0.W"])


def test_regression_with_mse(device):
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, size=(256, 2)).astype(np.float32)
    t = (np.sin(2 * x[:, :1]) + x[:, 1:] ** 2).astype(np.float32)
    net = gn.mlp([2, 32, 1], activation="tanh", seed=0, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    hist = fit(net, gn.MSELoss(), opt, x, t, epochs=150, batch_size=32)
    assert hist["accuracy"][-1] is None
    assert hist["loss"][-1] < 0.01 < hist["loss"][0]


def test_batched_evaluation_equals_one_pass(device):
    x, y = blobs(n=103)
    net, _, loss = setup(device)
    full = gn.to_numpy(net.forward(gn.to_device(x, device)))
    probs = gn.to_numpy(predict_proba(net, x, batch_size=10))
    e = np.exp(full - full.max(1, keepdims=True))
    np.testing.assert_allclose(probs, e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7)
    r1, r2 = (
        evaluate(net, loss, x, y, batch_size=7, metrics=True),
        evaluate(net, loss, x, y, batch_size=1000),
    )
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5) and r1["accuracy"] == r2["accuracy"]
    assert sum(map(sum, r1["confusion_matrix"])) == 103


def test_fit_argument_errors():
    x, y = blobs(n=20)
    net, opt, loss = setup("cpu")
    with pytest.raises(ValueError, match="epochs: expected a positive integer, got 0"):
        fit(net, loss, opt, x, y, epochs=0)
    with pytest.raises(ValueError, match="batch_size: expected a positive integer or None"):
        fit(net, loss, opt, x, y, batch_size=0)
    with pytest.raises(ValueError, match="patience: .* no validation set"):
        fit(net, loss, opt, x, y, patience=2)
    with pytest.raises(
        ValueError, match=r"y: expected labels in \[0, 2\] for 3 classes, got values from 0 to 5"
    ):
        fit(net, loss, opt, x, np.where(y == 1, 5, y))
    with pytest.raises(ValueError, match=r"y: expected as many targets as rows \(20\), got 19"):
        fit(net, loss, opt, x, y[:19])
    with pytest.raises(TypeError, match="x: expected real numbers, got strings"):
        fit(
            net, loss, opt, x.astype(str), y
        )  # integer features are converted (tests/unit/test_inputs.py)


# --- regression: predict gives the outputs, evaluate the errors and R^2 ---------------------------
def regression_net(device, outputs=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(150, 4))  # float64, as NumPy and scikit-learn make it
    y = np.stack([x @ [1.0, -2.0, 0.5, 0.0], np.sin(x[:, 0])], axis=1)[:, :outputs]
    net = gn.mlp([4, 16, outputs], activation="tanh", seed=seed, device=device)
    gn.fit(
        net,
        gn.MSELoss(),
        gn.Momentum(net.parameters(), lr=0.05, momentum=0.9),
        x,
        y,
        epochs=30,
        batch_size=16,
    )
    return net, x, y


def test_regression_predict_returns_outputs_and_evaluate_scores_them(device, tmp_path):
    metrics = optional("sklearn.metrics", "test")
    net, x, y = regression_net(device)
    out = gn.predict(net, x)
    assert out.shape == (150, 2) and out.dtype == np.float32  # the outputs, not an argmax
    # the outputs themselves: the network's forward pass in eval mode
    assert_allclose(
        out, net.eval().forward(gn.to_device(x.astype(np.float32), device)), rtol=1e-6, atol=1e-7
    )
    got = gn.evaluate(net, gn.MSELoss(), x, y)
    pred = gn.to_numpy(out).astype(np.float64)
    # float32 outputs summed in float64 on both sides: agreement to 1e-6 relative
    np.testing.assert_allclose(got["mse"], metrics.mean_squared_error(y, pred), rtol=1e-6)
    np.testing.assert_allclose(got["mae"], metrics.mean_absolute_error(y, pred), rtol=1e-6)
    np.testing.assert_allclose(got["r2"], metrics.r2_score(y, pred), rtol=1e-6)
    np.testing.assert_allclose(got["loss"], got["mse"], rtol=1e-6)  # MSELoss is the mse
    assert got["r2"] > 0.8  # it learned: R^2 of a constant guess is 0
    with pytest.raises(
        ValueError,
        match=r"net: expected a classifier for predict_proba, got a network that "
        r"does not classify \(it was trained with a regression loss\); "
        r"predict\(net, x\) returns its outputs",
    ):
        gn.predict_proba(net, x)
    net.save(tmp_path / "reg.npz")
    back = gn.load(tmp_path / "reg.npz", device=device)
    assert back.classifies is False  # the model file keeps what the network is for
    assert_allclose(gn.predict(back, x), out)


def test_a_one_output_network_is_no_classifier_even_untrained(device):
    net = gn.mlp([3, 4, 1], seed=0, device=device)
    x = np.ones((2, 3))
    assert gn.predict(net, x).shape == (2, 1)
    with pytest.raises(ValueError, match=r"\(it has a single output\)"):
        gn.predict_proba(net, x)


def test_r2_of_constant_targets_follows_scikit_learn():
    metrics = optional("sklearn.metrics", "test")
    net, x, _ = regression_net("cpu", outputs=1)
    pred = gn.to_numpy(gn.predict(net, x)).astype(np.float64)
    for y in (
        np.full(150, 3.0),
        pred.ravel(),
    ):  # constant (R^2 = 0 unless exact), then exact (R^2 = 1)
        got = gn.evaluate(net, gn.MAELoss(), x, y)
        np.testing.assert_allclose(got["r2"], metrics.r2_score(y, pred), atol=1e-6)


# --- fit(verbose=...): Keras' 0 / 1 / 2 -----------------------------------------------------------
def test_verbose_prints_nothing_a_bar_or_one_line_per_epoch(capsys):
    x = np.random.default_rng(0).normal(size=(64, 3))
    y = (x[:, 0] > 0).astype(int)
    lines = {}
    for verbose in (0, 1, 2):
        net = gn.mlp([3, 4, 2], seed=0, device="cpu")
        gn.fit(
            net,
            gn.SoftmaxCrossEntropy(),
            gn.SGD(net.parameters(), lr=0.1),
            x,
            y,
            epochs=3,
            batch_size=16,
            validation=(x, y),
            verbose=verbose,
        )
        lines[verbose] = capsys.readouterr().out
    assert lines[0] == ""
    shown = lines[2].split("\n")[:-1]
    assert len(shown) == 3 and all(
        s.startswith(f"epoch   {i}/3  loss ") and "val_acc" in s and "\r" not in s
        for i, s in enumerate(shown, 1)
    ), lines[2]
    # the bar: its last state (4 of 4 batches) before each epoch's line, which is the same line as
    # verbose=2's
    assert lines[1].count("] 4/4") == 3 and lines[1].count("\n") == 3
    assert [s.rsplit("\r", 1)[1].split("  lr")[0] for s in lines[1].split("\n")[:-1]] == [
        s.split("  lr")[0] for s in shown
    ]


def test_verbose_line_of_a_regression_run_has_no_accuracy(capsys):
    x = np.random.default_rng(0).normal(size=(32, 2))
    net = gn.mlp([2, 3, 1], seed=0, device="cpu")
    gn.fit(
        net, gn.MSELoss(), gn.SGD(net.parameters(), lr=0.01), x, x.sum(axis=1), epochs=1, verbose=2
    )
    out = capsys.readouterr().out
    assert out.startswith("epoch   1/1  loss ") and "acc" not in out


@pytest.mark.parametrize("verbose", [3, -1, "auto", None])
def test_verbose_refuses_what_keras_does_not_mean(verbose):
    net = gn.mlp([2, 3, 2], seed=0, device="cpu")
    with pytest.raises(
        ValueError,
        match=r"verbose: expected one of \[0, 1, 2\] \(0 silent, 1 a progress bar, "
        r"2 one line per epoch\), got ",
    ):
        gn.fit(
            net,
            gn.SoftmaxCrossEntropy(),
            gn.SGD(net.parameters(), lr=0.1),
            np.ones((4, 2)),
            [0, 1, 0, 1],
            verbose=verbose,
        )


def test_train_step_is_the_notes_step_and_fit_runs_it():
    """gn.train_step: one step of forward, cost, backward, update. Oracle: a linear layer under MSE
    in NumPy float64 by hand, dC/dW = x^T (2 (x W + b - y) / (N K)), dC/db its column sums, w -= lr
    dC/dw; the step's loss is the mean squared error before the update. fit(fast=False) over one
    full batch leaves the same weights bit for bit (the same operations in the same order)."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 2))
    net = gn.Sequential(
        gn.Linear(4, 2, rng=np.random.default_rng(1), dtype=np.float64, device="cpu")
    )
    W0, b0 = net.layers[0].W.data.copy(), net.layers[0].b.data.copy()
    value = gn.train_step(net, gn.MSELoss(), gn.SGD(net.parameters(), lr=0.1), x, y)
    delta = 2 * (x @ W0 + b0 - y) / y.size
    np.testing.assert_allclose(float(value), np.mean((x @ W0 + b0 - y) ** 2), rtol=1e-12)
    np.testing.assert_allclose(
        net.layers[0].W.grad, x.T @ delta, rtol=1e-12
    )  # float64 rounding only
    np.testing.assert_allclose(net.layers[0].b.grad, delta.sum(0), rtol=1e-12)
    np.testing.assert_allclose(net.layers[0].W.data, W0 - 0.1 * (x.T @ delta), rtol=1e-12)
    np.testing.assert_allclose(net.layers[0].b.data, b0 - 0.1 * delta.sum(0), rtol=1e-12)
    again = gn.Sequential(
        gn.Linear(4, 2, rng=np.random.default_rng(1), dtype=np.float64, device="cpu")
    )
    gn.fit(
        again,
        gn.MSELoss(),
        gn.SGD(again.parameters(), lr=0.1),
        x,
        y,
        epochs=1,
        batch_size=None,
        shuffle=False,
        fast=False,
    )
    for p, q in zip(net.parameters(), again.parameters()):
        assert np.array_equal(p.data, q.data) and np.array_equal(p.grad, q.grad)


def test_evaluation_batches_default_to_the_devices_rows(monkeypatch):
    """predict and evaluate without a batch size take EVAL_ROWS of the data's device: 1024 rows on
    the CPU (a block's activations stay in cache: BENCHMARKS.md, Inference)."""
    import gpunet.training as training

    net = gn.mlp([6, 5, 3], seed=0)
    seen = []
    forward = net.forward
    monkeypatch.setattr(training.fast_path, "forward_for", lambda net: None)
    monkeypatch.setattr(net, "forward", lambda x: seen.append(len(x)) or forward(x))
    x = np.random.default_rng(0).normal(size=(2500, 6)).astype(np.float32)
    training.predict(net, x)
    assert seen == [1024, 1024, 452]
    seen.clear()
    training.predict(net, x, batch_size=2000)
    assert seen == [2000, 500]
