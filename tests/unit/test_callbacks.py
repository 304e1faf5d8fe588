"""The training run's callbacks (gpunet/callbacks.py): which hooks run when, with the run's
position; a callback's stop; the per-batch transform hook (training inputs only, the gathered batch,
never the data itself); a callback's own state through a checkpoint and back; fit(augment=...)."""

import numpy as np
import pytest

import gpunet as gn
from gpunet import callbacks, checkpoint
from gpunet.training import Interrupted, fit


def blobs(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, size=n)
    x = (rng.normal(scale=3.0, size=(3, 4))[y] + rng.normal(size=(n, 4))).astype(np.float32)
    return x, y


def setup(device="cpu", seed=0):
    net = gn.mlp([4, 8, 3], seed=seed, device=device)
    return net, gn.Momentum(net.parameters(), lr=0.05, momentum=0.9), gn.SoftmaxCrossEntropy()


class Recorder:
    """Writes down every hook call with the run's position at that moment."""

    def __init__(self):
        self.calls = []

    def on_train_begin(self, run):
        self.calls.append(("train_begin", run.epoch, run.step))

    def on_epoch_begin(self, run, epoch):
        self.calls.append(("epoch_begin", epoch, run.step))

    def on_batch_end(self, run, epoch, step, steps):
        self.calls.append(("batch_end", epoch, step, steps, run.step))

    def on_epoch_end(self, run, record):
        self.calls.append(("epoch_end", record["epoch"], run.epoch, record["val_loss"] is not None))

    def on_train_end(self, run):
        self.calls.append(("train_end", run.epoch, len(run.history)))


def test_hooks_run_in_order_with_the_runs_position():
    x, y = blobs()
    net, opt, loss = setup()
    rec = Recorder()
    fit(net, loss, opt, x, y, epochs=2, batch_size=25, validation=(x[:10], y[:10]), callbacks=[rec])
    batches = lambda e: [
        ("batch_end", e, s, 3, s) for s in (1, 2, 3)
    ]  # 60 rows in batches of 25: 3 steps
    assert rec.calls == [
        ("train_begin", 0, 0),
        ("epoch_begin", 0, 0),
        *batches(0),
        ("epoch_end", 1, 1, True),
        ("epoch_begin", 1, 0),
        *batches(1),
        ("epoch_end", 2, 2, True),
        ("train_end", 2, 2),
    ]


class StopAfter:
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, run, record):
        if record["epoch"] == self.epoch:
            callbacks.stop(run, "enough")


def test_a_callback_stops_the_run_after_its_epoch_and_the_first_reason_wins():
    x, y = blobs()
    net, opt, loss = setup()
    rec = Recorder()
    # both stop after epoch 1; the callbacks given run before the target loss's, so their reason is
    # kept
    hist = fit(net, loss, opt, x, y, epochs=10, callbacks=[StopAfter(1)], target_loss=1e9)
    assert (len(hist), hist.stop_reason) == (1, "enough")
    hist = fit(net, loss, opt, x, y, epochs=10, callbacks=[StopAfter(3), rec])
    assert (len(hist), hist.stop_reason) == (3, "enough")
    assert rec.calls[-2:] == [
        ("epoch_end", 3, 3, False),
        ("train_end", 3, 3),
    ]  # its epoch finished, no more
    hist = fit(net, loss, opt, x, y, epochs=10, target_loss=1e9)
    assert (len(hist), hist.stop_reason) == (1, "target_loss")


class Zeroes:
    """Sets each training batch to zero in place, and keeps a copy of what it was given."""

    def __init__(self):
        self.seen = []

    def transform_batch(self, run, xb):
        self.seen.append(gn.to_numpy(xb).copy())
        xb[...] = 0
        return xb


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_transform_gets_the_gathered_training_batch_and_never_the_data(device, shuffle):
    """Trained on zeroed inputs, the first layer's weights never move (dW = x^T dz = 0) while the
    output layer's bias does;
    the data given to fit (and the validation set) stay untouched, even unshuffled, where a batch is
    a slice of them."""
    x, y = blobs()
    x_before = x.copy()
    net, opt, loss = setup(device)
    w0, b0 = gn.to_numpy(net.layers[0].W.data).copy(), gn.to_numpy(net.layers[-1].b.data).copy()
    zero = Zeroes()
    hist = fit(
        net,
        loss,
        opt,
        x,
        y,
        epochs=2,
        batch_size=25,
        seed=4,
        shuffle=shuffle,
        validation=(x, y),
        augment=zero,
    )
    assert np.array_equal(x, x_before)
    order = np.random.default_rng(4).permutation(60) if shuffle else np.arange(60)
    assert [len(s) for s in zero.seen] == [25, 25, 10] * 2
    np.testing.assert_array_equal(
        np.concatenate(zero.seen[:3]), x[order]
    )  # epoch 1's batches, in order
    assert np.array_equal(gn.to_numpy(net.layers[0].W.data), w0)
    assert not np.array_equal(gn.to_numpy(net.layers[-1].b.data), b0)
    # validation read the real inputs: its loss is that of the trained net on x, not on zeros
    real = gn.evaluate(net, loss, x, y)["loss"]
    assert hist["val_loss"][-1] == pytest.approx(real, rel=1e-6)


class Counter:
    """A callback with state of its own: batches seen, and an array of per-class label counts."""

    def __init__(self):
        self.batches, self.labels = 0, np.zeros(3, np.int64)

    def on_batch_end(self, run, epoch, step, steps):
        self.batches += 1
        self.labels[epoch % 3] += step

    def state_dict(self):
        return {"batches": self.batches, "arrays": {"labels": [self.labels.copy()]}}

    def load_state_dict(self, state):
        self.batches, self.labels = state["batches"], state["arrays"]["labels"][0].copy()


def test_a_callbacks_state_travels_in_the_checkpoint(tmp_path):
    x, y = blobs()
    path = tmp_path / "ck.npz"
    net, opt, loss = setup()
    full = Counter()
    fit(net, loss, opt, x, y, epochs=4, batch_size=8, callbacks=[full])  # 8 steps per epoch
    net, opt, loss = setup()
    first = Counter()
    with pytest.raises(Interrupted):
        fit(
            net,
            loss,
            opt,
            x,
            y,
            epochs=4,
            batch_size=8,
            callbacks=[first],
            checkpoint_path=path,
            interrupt=iter([False] * 18 + [True]).__next__,
        )
    assert first.batches == 19
    meta, arrays = checkpoint.load(path)
    assert meta["callbacks"]["Counter"]["batches"] == 19 and "callbacks/Counter/labels/0" in arrays
    net, opt, loss = setup()
    resumed = Counter()
    fit(
        net,
        loss,
        opt,
        x,
        y,
        epochs=4,
        batch_size=8,
        callbacks=[resumed],
        checkpoint_path=path,
        resume=True,
    )
    assert resumed.batches == full.batches == 32
    assert np.array_equal(resumed.labels, full.labels)


def test_checkpoint_split_and_join_are_inverse():
    state = {"kind": "x", "t": 3, "arrays": {"m": [np.arange(3.0), np.ones((2, 2))], "v": []}}
    record, arrays = checkpoint.split("opt", state)
    assert record == {"kind": "x", "t": 3, "arrays": {"m": 2, "v": 0}} and sorted(arrays) == [
        "opt/m/0",
        "opt/m/1",
    ]
    back = checkpoint.join("opt", record, arrays)
    assert back["arrays"]["v"] == [] and all(
        np.array_equal(a, b) for a, b in zip(back["arrays"]["m"], state["arrays"]["m"])
    )
    with pytest.raises(KeyError, match="opt/m/1"):
        checkpoint.join("opt", record, {"opt/m/0": arrays["opt/m/0"]})
