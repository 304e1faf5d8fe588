"""Training and evaluation loops (course notes, point 8).

For a number of epochs, or until the epoch's cost falls under a threshold: for each instance / batch,
forward, cost, backward, update. Batch size 1 is online learning, ``None`` (or the set's size) the full
batch. Early stopping on the validation loss, with patience, restores the best weights.

The data are moved to the network's device once; each epoch draws one permutation on that device and
every batch is gathered there. Loss and accuracy are summed on the device and read back once per epoch,
so a GPU step never waits for the host.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .backend import get_array_module, synchronize, to_device, to_numpy
from .losses import SoftmaxCrossEntropy, check_labels
from .metrics import confusion_counts, report
from .pixels import Pixels


@dataclass
class History:
    """One dict per epoch (epoch, loss, accuracy, val_loss, val_accuracy, lr, seconds), and why it stopped."""

    epochs: list = field(default_factory=list)
    stop_reason: str = "max_epochs"
    best_epoch: int | None = None

    def __getitem__(self, key):
        return [e[key] for e in self.epochs]

    def __len__(self):
        return len(self.epochs)


def _check_dataset(x, y, name):
    if not hasattr(x, "shape") or x.ndim != 2:
        got = getattr(x, "shape", type(x).__name__)
        raise ValueError(f"{name}: expected a 2-D array of features (N, features), got {got}")
    if x.dtype.kind != "f":
        raise TypeError(f"{name}: expected floating-point features, got {x.dtype}; wrap uint8 images in "
                        f"gpunet.Pixels(x), or scale them with x.astype(np.float32) / 255")
    if len(y) != len(x):
        raise ValueError(f"{name}: expected as many targets as rows, got {len(x)} rows and {len(y)} targets")


def _on_device(x, device):
    """Features on ``device``: an array, or :class:`Pixels` (kept as bytes there)."""
    return x.to(device) if isinstance(x, Pixels) else to_device(x, device)


def _rows(x, idx, out, xp, gather):
    """Rows ``idx`` (a slice, or the batch's indices gathered into ``out``) of the features ``x``."""
    if isinstance(x, Pixels):
        return x.take(idx, out)
    if isinstance(idx, slice):
        return x[idx]
    return xp.take(x, idx, axis=0, out=out[:len(idx)], **gather)


def _batch_size(batch_size, n):
    if batch_size is None or batch_size == "full":
        return max(n, 1)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer or None (full batch), got {batch_size!r}")
    return int(min(batch_size, max(n, 1)))


def _permutation(xp, rng, n):
    if xp is np:
        return rng.permutation(n)
    return xp.argsort(rng.random(n, dtype=xp.float32))  # drawn and sorted on the GPU: no host round trip


def fit(net, loss, optimizer, x, y, *, epochs: int = 10, batch_size=128, validation=None, shuffle: bool = True,
        seed: int | None = 0, target_loss: float | None = None, patience: int | None = None,
        min_delta: float = 0.0, schedule=None, callback=None, on_batch=None, eval_batch_size: int = 4096) -> History:
    """Train ``net`` on ``x`` (N, features) float and ``y`` (N,) int labels or (N, outputs) float targets.

    ``validation=(x_val, y_val)`` is evaluated after each epoch. ``patience`` (needs validation) stops
    after that many epochs without a val-loss improvement larger than ``min_delta`` and restores the best
    weights. ``target_loss`` stops once the epoch's training loss is below it. ``schedule(epoch)`` sets
    ``optimizer.lr`` before each epoch. ``callback(record)`` runs after each epoch; ``on_batch(epoch,
    done, total)`` after each batch (no device sync). Where the optimizer offers a fused update
    (``Momentum.fused_update``: CPU, OpenBLAS), backward and update run in one walk and ``param.grad``
    is not filled.
    """
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    if patience is not None and (validation is None or patience < 1):
        raise ValueError(f"patience: expected a positive integer together with a validation set, got {patience!r}"
                         + ("" if validation is not None else " and no validation set"))
    _check_dataset(x, y, "x")
    device = net.device
    xp = get_array_module(net.parameters()[0].data)
    x, y = _on_device(x, device), to_device(y, device)
    classify = isinstance(loss, SoftmaxCrossEntropy)
    if classify:
        check_labels(y, net.out_features, "y")
    if validation is not None:
        xv, yv = validation
        _check_dataset(xv, yv, "validation x")
        if classify:
            check_labels(yv, net.out_features, "validation y")
        validation = (_on_device(xv, device), to_device(yv, device))

    n = len(x)
    bs = _batch_size(batch_size, n)
    steps = (n + bs - 1) // bs
    rng = np.random.default_rng(seed) if xp is np else xp.random.default_rng(seed)
    fused = optimizer.fused_update(net) if hasattr(optimizer, "fused_update") else None
    # NumPy's default mode="raise" copies through a new temporary (300 -> 100 us a step here); the indices
    # are a permutation, always in range. CuPy's take has no mode argument.
    gather = {"mode": "clip"} if xp is np else {}
    xb_buf = xp.empty((bs,) + x.shape[1:], dtype=x.dtype)
    yb_buf = xp.empty((bs,) + y.shape[1:], dtype=y.dtype)
    history, best, wait = History(), None, 0

    for epoch in range(epochs):
        if schedule is not None:
            optimizer.lr = schedule(epoch)
        net.train()
        start = time.perf_counter()
        order = _permutation(xp, rng, n) if shuffle and bs < n else None
        loss_sum = xp.zeros((), dtype=np.float64)
        correct = xp.zeros((), dtype=np.int64)
        for b in range(steps):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            if order is None:
                xb, yb = _rows(x, slice(lo, hi), xb_buf, xp, gather), y[lo:hi]
            else:  # into the reused buffers (their first rows, for a last partial batch)
                idx = order[lo:hi]
                xb = _rows(x, idx, xb_buf, xp, gather)
                yb = xp.take(y, idx, axis=0, out=yb_buf[:hi - lo], **gather)
            out = net.forward(xb)
            value = loss.forward(out, yb, check=False) if classify else loss.forward(out, yb)
            if fused is None:
                net.backward(loss.backward(), need_input_grad=False)
                optimizer.step()
            else:  # backward and update in one walk (CPU fast path; param.grad is not filled)
                net.backward(loss.backward(), need_input_grad=False, update=fused)
            loss_sum += value * (hi - lo)
            if classify:
                correct += (out.argmax(axis=1) == yb).sum()
            if on_batch is not None:
                on_batch(epoch, b + 1, steps)
        synchronize(loss_sum)
        seconds = time.perf_counter() - start
        record = {"epoch": epoch + 1, "loss": float(loss_sum) / n,
                  "accuracy": float(correct) / n if classify else None,
                  "val_loss": None, "val_accuracy": None, "lr": optimizer.lr, "seconds": seconds}
        if validation is not None:
            val = evaluate(net, loss, *validation, batch_size=eval_batch_size)
            record["val_loss"], record["val_accuracy"] = val["loss"], val.get("accuracy")
        history.epochs.append(record)
        if callback is not None:
            callback(record)

        if patience is not None:
            if best is None or record["val_loss"] < best[0] - min_delta:
                best, wait = (record["val_loss"], net.state_dict()), 0
                history.best_epoch = epoch + 1
            else:
                wait += 1
                if wait >= patience:
                    history.stop_reason = "early_stopping"
                    break
        if target_loss is not None and record["loss"] < target_loss:
            history.stop_reason = "target_loss"
            break
    if best is not None:
        net.load_state_dict(best[1])  # the weights of the best validation epoch
    net.eval()
    return history


def _batches(x, batch_size):
    for start in range(0, len(x), batch_size):
        yield start, x[start:start + batch_size]


def predict_proba(net, x, batch_size: int = 4096):
    """Class probabilities (N, C) on the network's device, computed batch by batch in eval mode."""
    was_training = net.training
    net.eval()
    x = _on_device(x, net.device)
    xp = get_array_module(net.parameters()[0].data)
    out = None
    for start, xb in _batches(x, batch_size):
        z = net.forward(xb)
        z = z - z.max(axis=1, keepdims=True)
        p = xp.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        if out is None:
            out = xp.empty((len(x), p.shape[1]), dtype=p.dtype)
        out[start:start + len(p)] = p
    net.train(was_training)
    return out


def predict(net, x, batch_size: int = 4096):
    """Predicted class labels (N,) int64 on the network's device."""
    return predict_proba(net, x, batch_size).argmax(axis=1)


def evaluate(net, loss, x, y, batch_size: int = 4096, metrics: bool = False) -> dict:
    """Mean loss (and, for classification, accuracy) over ``x`` in batches, in eval mode.

    ``metrics=True`` adds per-class precision/recall/F1 and the confusion matrix (see ``metrics.report``).
    """
    was_training = net.training
    net.eval()
    x, y = _on_device(x, net.device), to_device(y, net.device)
    xp = get_array_module(y)
    classify = isinstance(loss, SoftmaxCrossEntropy)
    classes = net.out_features
    loss_sum = xp.zeros((), dtype=np.float64)
    counts = xp.zeros((classes, classes), dtype=np.int64) if classify else None
    for start, xb in _batches(x, batch_size):
        yb = y[start:start + len(xb)]
        out = net.forward(xb)
        loss_sum += loss.forward(out, yb) * len(xb)
        if classify:
            counts += confusion_counts(yb, out.argmax(axis=1), classes)
    net.train(was_training)
    result = {"loss": float(loss_sum) / max(len(x), 1)}
    if classify:
        cm = to_numpy(counts)
        result["accuracy"] = float(np.trace(cm)) / max(len(x), 1)
        if metrics:
            result.update(report(cm))
    return result
