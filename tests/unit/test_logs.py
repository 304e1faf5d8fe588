"""The training logs (gpunet/callbacks.py): CSVLogger's rows and TensorBoard's event files, read
back with TensorBoard's own event reader (tensorboard's EventAccumulator); the values against a
step-by-step oracle loop and NumPy; a resumed run's logs against an unbroken run's; the live values
of the progress bar."""

import csv
import io
import sys
import types

import numpy as np
import pytest
from conftest import optional

import gpunet as gn
from gpunet import callbacks
from gpunet.training import Interrupted, fit

# the blobs of test_callbacks: 60 rows, batch 8 -> 8 steps an epoch (the last of 4 rows)
ROWS, BATCH, STEPS, EPOCHS = 60, 8, 8, 4


def blobs(n=ROWS, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = (rng.normal(scale=3.0, size=(3, 4))[y] + rng.normal(size=(n, 4))).astype(np.float32)
    return x, y


def setup():
    net = gn.mlp([4, 8, 3], seed=0, device="cpu")
    return net, gn.Momentum(net.parameters(), lr=0.05, momentum=0.9), gn.SoftmaxCrossEntropy()


def halving(epoch):
    return 0.05 * 0.5**epoch


def train(callbacks_=(), **kw):
    x, y = blobs()
    net, opt, loss = setup()
    history = fit(
        net,
        loss,
        opt,
        x,
        y,
        epochs=EPOCHS,
        batch_size=BATCH,
        shuffle=False,
        validation=(x, y),
        schedule=halving,
        callbacks=list(callbacks_),
        **kw,
    )
    return net, history


def oracle_steps():
    """Each step's mean loss, correct count, rows and lr, from the core formulas stepped by hand."""
    x, y = blobs()
    net, opt, loss = setup()
    steps = []
    for epoch in range(EPOCHS):
        opt.lr = halving(epoch)
        net.train()
        for lo in range(0, ROWS, BATCH):
            xb, yb = x[lo : lo + BATCH], y[lo : lo + BATCH]
            out = net.forward(xb)
            value = loss.forward(out, yb)
            net.backward(loss.backward())
            opt.step()
            steps.append((float(value), int((out.argmax(axis=1) == yb).sum()), len(xb), opt.lr))
    return steps


def events(folder):
    ea_module = optional("tensorboard.backend.event_processing.event_accumulator", "test")
    acc = ea_module.EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_scalars_are_the_steps_and_epochs_of_the_run(tmp_path):
    optional("tensorboardX", "tensorboard")
    _, history = train([callbacks.TensorBoard(tmp_path, batch_every=3, histogram_every=0)])
    acc = events(tmp_path)
    steps = oracle_steps()
    # batch points every 3 optimizer steps, each the mean over the rows since the last point (an
    # epoch's first point starts at the epoch). float32 sums of 8 terms: 1e-5 relative covers the
    # fast path's rounding
    want_loss, want_acc, want_lr, start = [], [], [], 0
    for at in range(1, EPOCHS * STEPS + 1):
        if (at - 1) % STEPS == 0:
            start = at - 1
        if at % 3 == 0:
            part = steps[start:at]
            rows = sum(s[2] for s in part)
            want_loss.append((at, sum(s[0] * s[2] for s in part) / rows))
            want_acc.append((at, sum(s[1] for s in part) / rows))
            want_lr.append((at, part[-1][3]))
            start = at
    for tag, want in (
        ("batch/loss", want_loss),
        ("batch/accuracy", want_acc),
        ("batch/lr", want_lr),
    ):
        got = scalars(acc, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag
        np.testing.assert_allclose(
            [v for _, v in got], [v for _, v in want], rtol=1e-5, err_msg=tag
        )
    # the epoch points at the epoch's last step: the history's values (float32 in the event file)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
        got = scalars(acc, f"epoch/{key}")
        assert [s for s, _ in got] == [STEPS * e for e in range(1, EPOCHS + 1)], key
        np.testing.assert_allclose([v for _, v in got], history[key], rtol=1e-6, err_msg=key)
    assert acc.Tags()["histograms"] == []  # histogram_every=0


def _forward_backward_by_hand(weights, x, y):
    """NumPy's gradients of the mean softmax cross-entropy of a 4-8-3 ReLU MLP (float64)."""
    w0, b0, w1, b1 = (np.asarray(weights[k], np.float64) for k in ("0.W", "0.b", "2.W", "2.b"))
    h = np.maximum(x @ w0 + b0, 0)
    z = h @ w1 + b1
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - np.eye(3)[y]) / len(x)
    dh = (dz @ w1.T) * (h > 0)
    return {"0.W": x.T @ dh, "0.b": dh.sum(0), "2.W": h.T @ dz, "2.b": dz.sum(0)}


def test_tensorboard_histograms_of_weights_and_probe_gradients_leave_the_run_as_it_was(tmp_path):
    optional("tensorboardX", "tensorboard")
    snapshots = {}
    keep = callbacks.EpochEnd(lambda record: None)
    keep.on_epoch_end = lambda run, record: snapshots.setdefault(
        record["epoch"], run.net.state_dict()
    )
    board = callbacks.TensorBoard(tmp_path, batch_every=0, histogram_every=2, probe=20)
    net, _ = train([keep, board])
    plain, _ = train()
    # the histograms change nothing of the run: weights and the last step's gradients bit-equal
    for (name, p), q in zip(net.named_parameters(), plain.parameters()):
        assert np.array_equal(p.data, q.data) and np.array_equal(p.grad, q.grad), name
    acc = events(tmp_path)
    x, y = blobs()
    for epoch in (2, 4):
        weights = snapshots[epoch]
        grads = _forward_backward_by_hand(weights, x[:20].astype(np.float64), y[:20])
        for name in ("0.W", "0.b", "2.W", "2.b"):
            for kind, values in (("weights", weights[name]), ("gradients", grads[name])):
                (h,) = [
                    e.histogram_value
                    for e in acc.Histograms(f"{kind}/{name}")
                    if e.step == STEPS * epoch
                ]
                assert h.num == values.size, (kind, name)
                # float32 weights and a float32 probe pass against float64 NumPy: 1e-5 of the
                # largest value
                scale = np.abs(values).max()
                np.testing.assert_allclose(
                    [h.sum, h.min, h.max],
                    [values.sum(), values.min(), values.max()],
                    atol=1e-5 * scale * values.size**0.5,
                    err_msg=f"{kind}/{name}",
                )
        assert len(acc.Histograms("weights/0.W")) == 2  # epochs 2 and 4 only


class Crash(Exception):
    pass


def crash_at(step):
    """A callback that raises at the run's optimizer step ``step``: a process killed mid-run."""
    cb = callbacks.BatchEnd(lambda *a: None)

    def on_batch_end(run, epoch, s, steps):
        if epoch * steps + s == step:
            raise Crash

    cb.on_batch_end = on_batch_end
    return cb


def test_a_resumed_run_continues_the_same_curves_without_a_duplicate_step(tmp_path):
    """Killed in epoch 4 (its events of epoch 3 written, its checkpoint of epoch 2 the last), then
    interrupted mid-epoch 3, then finished: the reader sees the unbroken run's points, each step
    once."""
    optional("tensorboardX", "tensorboard")
    whole = tmp_path / "whole"
    train([callbacks.TensorBoard(whole, batch_every=3, histogram_every=1, probe=8)])
    parts, ckpt = tmp_path / "parts", tmp_path / "ck.npz"
    with pytest.raises(Crash):
        train(
            [callbacks.TensorBoard(parts, batch_every=3, histogram_every=1, probe=8), crash_at(29)],
            checkpoint_path=ckpt,
            checkpoint_every=2,
        )
    with pytest.raises(
        Interrupted
    ):  # from epoch 2's checkpoint, stopped at step 20 (epoch 3's 4th)
        train(
            [callbacks.TensorBoard(parts, batch_every=3, histogram_every=1, probe=8)],
            checkpoint_path=ckpt,
            resume=True,
            interrupt=iter([False, False, False, True]).__next__,
        )
    train(
        [callbacks.TensorBoard(parts, batch_every=3, histogram_every=1, probe=8)],
        checkpoint_path=ckpt,
        resume=True,
    )
    a, b = events(whole), events(parts)
    assert sorted(a.Tags()["scalars"]) == sorted(b.Tags()["scalars"])
    for tag in a.Tags()["scalars"]:
        got, want = scalars(b, tag), scalars(a, tag)
        assert [s for s, _ in got] == [s for s, _ in want], tag  # no step twice, none missing
        if tag != "epoch/seconds":  # resumed bit for bit on the same device
            assert [v for _, v in got] == [v for _, v in want], tag
    for tag in a.Tags()["histograms"]:
        assert [(e.step, e.histogram_value.sum) for e in b.Histograms(tag)] == [
            (e.step, e.histogram_value.sum) for e in a.Histograms(tag)
        ], tag


def test_csv_logger_writes_each_epoch_once_also_across_a_resume(tmp_path):
    _, history = train([callbacks.CSVLogger(tmp_path / "whole.csv")])
    path, ckpt = tmp_path / "log" / "parts.csv", tmp_path / "ck.npz"
    with pytest.raises(
        Crash
    ):  # killed in epoch 4 after writing epoch 3's row; checkpoint of epoch 2
        train([callbacks.CSVLogger(path), crash_at(29)], checkpoint_path=ckpt, checkpoint_every=2)
    assert len(path.read_text().splitlines()) == 1 + 3
    train([callbacks.CSVLogger(path)], checkpoint_path=ckpt, resume=True)
    for file in (tmp_path / "whole.csv", path):
        rows = list(csv.DictReader(file.open()))
        assert list(rows[0]) == list(callbacks.CSVLogger.FIELDS)
        assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr"):
            assert [float(r[key]) for r in rows] == history[key], key  # repr: the float itself
    x = np.random.default_rng(0).normal(size=(16, 2))
    net = gn.mlp([2, 3, 1], seed=0, device="cpu")  # a regression run: no accuracy, no validation
    fit(
        net,
        gn.MSELoss(),
        gn.SGD(net.parameters(), lr=0.01),
        x,
        x.sum(axis=1),
        epochs=1,
        callbacks=[callbacks.CSVLogger(tmp_path / "r.csv")],
    )
    (row,) = csv.DictReader((tmp_path / "r.csv").open())
    assert (
        row["accuracy"] == row["val_loss"] == row["val_accuracy"] == "" and float(row["loss"]) > 0
    )


@pytest.mark.parametrize(
    "name,value", [("batch_every", -1), ("histogram_every", 1.5), ("probe", 0)]
)
def test_tensorboard_refuses_counts_that_are_not_counts(name, value, tmp_path):
    with pytest.raises(ValueError, match=name):
        callbacks.TensorBoard(tmp_path, **{name: value})


def test_the_progress_bar_shows_the_running_loss_and_accuracy(capsys):
    x, y = blobs()
    net, opt, loss = setup()
    fit(net, loss, opt, x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=1)
    out = capsys.readouterr().out
    steps = oracle_steps()[:STEPS]
    shown = [part for part in out.split("\r") if "] 8/8" in part]
    assert len(shown) == 1, out
    mean_loss = sum(s[0] * s[2] for s in steps) / ROWS
    mean_acc = sum(s[1] for s in steps) / ROWS
    assert shown[0].endswith(f"  loss {mean_loss:.4f}  acc {mean_acc:.4f}"), shown[0]


def test_in_a_notebook_the_bar_is_tqdm_autos(monkeypatch):
    """In a Jupyter kernel (IPython's shell has a kernel), Progress draws with tqdm.auto's class,
    which is the notebook's widget there; the postfix carries the running loss and accuracy."""
    tqdm_auto = optional("tqdm.auto", "cli")
    made = []

    class Bar:
        def __init__(self, **kw):
            self.n, self.kw, self.postfix, self.closed = 0, kw, None, False
            made.append(self)

        def set_postfix(self, values, refresh=True):
            self.postfix = values

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    monkeypatch.setattr(tqdm_auto, "tqdm", Bar)
    kernel_shell = types.SimpleNamespace(
        kernel=object()
    )  # what get_ipython() is inside a Jupyter kernel
    monkeypatch.setitem(
        sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: kernel_shell)
    )
    x, y = blobs()
    net, opt, loss = setup()
    out = io.StringIO()
    fit(
        net,
        loss,
        opt,
        x,
        y,
        epochs=2,
        batch_size=BATCH,
        shuffle=False,
        callbacks=[callbacks.Progress(1, file=out, refresh=1e9)],
    )
    assert len(made) == 2 and all(
        b.closed and b.n == STEPS and b.kw["total"] == STEPS for b in made
    )
    assert set(made[0].postfix) == {"loss", "acc"}
    assert out.getvalue().count("\n") == 2 and "\r" not in out.getvalue()  # the lines, no plain bar


def test_gpunet_train_log_dir_writes_both_logs_and_a_resume_continues_them(tmp_path):
    """gpunet train --log-dir: epochs.csv and the event files hold the run's history
    (metrics.json's), and `--epochs 3 --resume` after a 2-epoch run adds epoch 3 to both, each epoch
    once."""
    optional("tensorboardX", "tensorboard")
    import json
    import subprocess
    import sys

    from conftest import make_fake_mnist

    data, out, logs = make_fake_mnist(tmp_path / "data"), tmp_path / "run", tmp_path / "logs"
    base = [
        sys.executable,
        "-m",
        "gpunet",
        "train",
        "--data-dir",
        data,
        "--hidden",
        16,
        "--batch-size",
        64,
        "--val-size",
        100,
        "--out",
        out,
        "--device",
        "cpu",
        "--no-plots",
        "--log-dir",
        logs,
    ]
    for more in (["--epochs", 2], ["--epochs", 3, "--resume"]):
        res = subprocess.run(
            [str(a) for a in base + more], capture_output=True, text=True, timeout=300
        )
        assert res.returncode == 0, res.stderr
    history = json.loads((out / "metrics.json").read_text())["history"]
    rows = list(csv.DictReader((logs / "epochs.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [float(r["loss"]) for r in rows] == [h["loss"] for h in history]
    acc = events(logs)
    steps = [s for s, _ in scalars(acc, "epoch/val_accuracy")]
    assert len(steps) == 3 and steps == sorted(set(steps)) and steps[2] == 3 * steps[0]
    np.testing.assert_allclose(
        [v for _, v in scalars(acc, "epoch/loss")], [h["loss"] for h in history], rtol=1e-6
    )
    assert "weights/0.W" in acc.Tags()["histograms"]
