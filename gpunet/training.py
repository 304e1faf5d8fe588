"""Training and evaluation loops (course notes, point 8).

For a number of epochs, or until the epoch's cost falls under a threshold: for each instance / batch,
forward, cost, backward, update. Batch size 1 is online learning, ``None`` (or the set's size) the full
batch. Early stopping on the validation loss, with patience, restores the best weights.

The data are moved to the network's device once; each epoch's order is drawn on the host from a seeded
NumPy generator (so a CPU and a GPU run see the same batches) and every batch is gathered on the device.
Loss and accuracy are summed on the device and read back once per epoch, so a GPU step never waits for
the host. Where :mod:`gpunet.fast` knows the network, its fused step replaces the core's; else the core's
``forward``/``backward``/``step`` run (``fit(..., fast=False)`` asks for the core).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from . import checkpoint, parallel
from . import fast as fast_path
from .backend import get_array_module, synchronize, to_device, to_numpy
from .batches import as_rows
from .inputs import targets
from .metrics import confusion_counts, report


@dataclass
class History:
    """One dict per epoch (epoch, loss, accuracy, val_loss, val_accuracy, lr, seconds), and why it stopped."""

    epochs: list = field(default_factory=list)
    stop_reason: str = "max_epochs"
    best_epoch: int | None = None
    diverged_epoch: int | None = None

    def __getitem__(self, key):
        return [e[key] for e in self.epochs]

    def __len__(self):
        return len(self.epochs)


class EarlyStopping:
    """Stop after ``patience`` epochs without a validation loss ``min_delta`` below the best; keeps the
    best epoch's weights (host copies) for ``restore``."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.best_state, self.wait = None, None, None, 0

    def should_stop(self, epoch: int, val_loss: float, net) -> bool:
        if self.best_loss is None or val_loss < self.best_loss - self.min_delta:
            self.best_loss, self.best_epoch, self.best_state, self.wait = val_loss, epoch, net.state_dict(), 0
            return False
        self.wait += 1
        return self.wait >= self.patience

    def restore(self, net) -> None:
        if self.best_state is not None:
            net.load_state_dict(self.best_state)


def core_step(net, loss, optimizer):
    """The notes' step, in the core's own terms: ``step(x, y, reduce=None) -> (mean loss, output)``;
    ``reduce()`` runs between the gradients and the update (a distributed run sums them there)."""
    def step(x, y, reduce=None):
        out = net.forward(x)
        value = loss.forward(out, y, check=False) if loss.classifies else loss.forward(out, y)
        net.backward(loss.backward())
        if reduce is not None:
            reduce()
        optimizer.step()
        return value, out
    return step


def batch_size_for(batch_size, n) -> int:
    if batch_size is None or batch_size == "full":
        return max(n, 1)
    if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer or None (full batch), got {batch_size!r}")
    return int(min(batch_size, max(n, 1)))


def _dataset(x, y, net, classify, name="x"):
    """A data set through the front door (:mod:`gpunet.inputs`): the features as ``Rows`` or ``Pixels`` of
    the network's dtype on its device, the targets checked and cast there."""
    x = as_rows(x, net.dtype, net.device, name)
    y = targets(y, len(x), classify, net.out_features, net.dtype, net.device, name.replace("x", "y"))
    return x, y


class Interrupted(Exception):
    """Training stopped at a step boundary because ``interrupt()`` said so; the state reached is in the
    checkpoint (when ``fit`` was given one): ``epoch`` epochs and ``step`` steps of the next are done."""

    def __init__(self, epoch: int, step: int, checkpoint):
        super().__init__(f"interrupted after {epoch} epochs and {step} steps of the next")
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


def _finite(value: float) -> bool:
    return value == value and value not in (float("inf"), float("-inf"))


class _Run:
    """The state of one ``fit`` that a checkpoint carries, and the two ways it moves: out to a file
    (``save``) and back in (``restore``)."""

    def __init__(self, net, optimizer, order_rng, history, stopper, extra, comm=None):
        self.net, self.optimizer, self.order_rng = net, optimizer, order_rng
        self.history, self.stopper, self.extra, self.comm = history, stopper, extra, comm

    def _per_rank(self, value) -> list:
        """``value`` of every rank, in rank order (a collective call in a distributed run)."""
        return [value] if self.comm is None else self.comm.allgather(value)

    def save(self, path, epoch, step, epoch_rng, partial=None, finished=False):
        random, partial = self._per_rank(self.net.random_state()), self._per_rank(partial)
        if self.comm is not None and self.comm.rank != 0:
            return  # rank 0 alone writes
        opt = self.optimizer.state_dict()
        arrays = {f"net/{k}": v for k, v in self.net.state_dict().items()}
        for name, values in opt.pop("arrays").items():  # the optimizer's state, whatever its rule
            arrays.update({f"optimizer/{name}/{i}": v for i, v in enumerate(values)})
        stopper = None
        if self.stopper is not None:
            s = self.stopper
            stopper = {"best_loss": s.best_loss, "best_epoch": s.best_epoch, "wait": s.wait}
            arrays.update({f"best/{k}": v for k, v in (s.best_state or {}).items()})
        checkpoint.save(path, {
            "run": self.extra, "network": self.net.config(), "epoch": epoch, "step": step, "finished": finished,
            "order_rng": epoch_rng, "random": random, "optimizer": opt, "ranks": len(random),
            "history": self.history.epochs, "stop_reason": self.history.stop_reason,
            "best_epoch": self.history.best_epoch, "early_stopping": stopper, "partial": partial}, arrays)

    def restore(self, path):
        """Load the checkpoint at ``path`` into the run; returns its record, with this rank's partial sums."""
        meta, arrays = checkpoint.load(path)
        rank, size = (0, 1) if self.comm is None else (self.comm.rank, self.comm.size)
        if meta["network"] != self.net.config():
            raise checkpoint.CheckpointError(f"{path}: holds a different network ({meta['network']['layers']}) "
                                             f"than the one given ({self.net.config()['layers']})")
        try:
            self.net.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("net/")})
            slots = {k.split("/")[1] for k in arrays if k.startswith("optimizer/")}
            count = len(self.optimizer.params)
            self.optimizer.load_state_dict(dict(meta["optimizer"], arrays={
                name: [arrays[f"optimizer/{name}/{i}"] for i in range(count)] for name in slots}))
            if meta["ranks"] != size:
                raise ValueError(f"it was written by {meta['ranks']} processes, this run has {size}; "
                                 f"resume with the same number")
            self.net.set_random_state(meta["random"][rank])
        except (KeyError, ValueError, TypeError) as exc:
            raise checkpoint.CheckpointError(f"{path}: does not fit this run ({exc})") from None
        self.order_rng.bit_generator.state = meta["order_rng"]
        self.history.epochs = list(meta["history"])
        self.history.stop_reason, self.history.best_epoch = meta["stop_reason"], meta["best_epoch"]
        if self.stopper is not None and meta["early_stopping"] is not None:
            es = meta["early_stopping"]
            self.stopper.best_loss, self.stopper.best_epoch, self.stopper.wait = es["best_loss"], es["best_epoch"], es["wait"]
            best = {k[5:]: v for k, v in arrays.items() if k.startswith("best/")}
            self.stopper.best_state = best or None
        meta["partial"] = meta["partial"][rank]  # None after a finished epoch
        return meta


def fit(net, loss, optimizer, x, y, *, epochs: int = 10, batch_size=128, validation=None, shuffle: bool = True,
        seed: int | None = 0, target_loss: float | None = None, patience: int | None = None,
        min_delta: float = 0.0, schedule=None, callback=None, on_batch=None, eval_batch_size: int = 4096,
        fast: bool = True, checkpoint_path=None, resume: bool = False, checkpoint_every: int = 1,
        interrupt=None, run_info: dict | None = None, comm=None) -> History:
    """Train ``net`` on ``x`` (N, features) float array or ``Pixels``, and ``y`` (N,) int labels or
    (N, outputs) float targets.

    ``validation=(x_val, y_val)`` is evaluated after each epoch. ``patience`` (needs validation) stops
    after that many epochs without a val-loss improvement larger than ``min_delta`` and restores the best
    weights. ``target_loss`` stops once the epoch's training loss is below it. ``schedule(epoch)`` sets
    ``optimizer.lr`` before each epoch. ``callback(record)`` runs after each epoch; ``on_batch(epoch,
    done, total)`` after each batch (no device sync).

    Long runs: ``checkpoint_path`` receives a checkpoint every ``checkpoint_every`` epochs and at the end;
    ``resume=True`` continues from it exactly (bit for bit on the same device); ``interrupt()``, checked
    after every step, stops the run there: the state reached goes to the checkpoint and
    :class:`Interrupted` is raised. ``run_info`` (JSON data) is stored in the checkpoint for the caller.
    Data-parallel: with ``comm`` (:func:`gpunet.parallel.world` under ``mpiexec``) each global batch is
    split across the ranks, their gradients summed before every update (so every rank holds the same
    weights), and the epoch's sums and the validation reduced over the ranks; rank 0 writes checkpoints.
    If the training loss of an epoch is NaN or infinite, the weights of the last finished epoch are
    restored and the run stops with ``history.stop_reason == "diverged"``.

    After ``fit``, ``param.grad`` holds the last step's gradients, except where the fast path folded them
    into the update (the CPU with OpenBLAS): call ``net.forward``, ``loss.forward`` and ``net.backward``
    yourself to see them, or pass ``fast=False``.
    """
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    if patience is not None and (validation is None or patience < 1):
        raise ValueError(f"patience: expected a positive integer together with a validation set, got {patience!r}"
                         + ("" if validation is not None else " and no validation set"))
    if resume and checkpoint_path is None:
        raise ValueError("resume: expected a checkpoint_path to resume from, got none")
    device, classify = net.device, loss.classifies
    net.classifies = classify  # what predict returns and model files record
    x, y = _dataset(x, y, net, classify)
    if validation is not None:
        validation = _dataset(*validation, net, classify, "validation x")
    xp = get_array_module(net.parameters()[0].data)

    n = len(x)
    bs = batch_size_for(batch_size, n)
    steps = (n + bs - 1) // bs
    order_rng = np.random.default_rng(seed)
    distributed = comm is not None and comm.size > 1
    step = (fast and fast_path.select(net, loss, optimizer, y, distributed)) or core_step(net, loss, optimizer)
    take_step = _stepper(step, optimizer, interrupt, comm if distributed else None)
    xb_buf = xp.empty((bs,) + x.shape[1:], dtype=x.dtype)
    yb_buf = xp.empty((bs,) + y.shape[1:], dtype=y.dtype)
    history = History()
    stopper = EarlyStopping(patience, min_delta) if patience is not None else None
    run = _Run(net, optimizer, order_rng, history, stopper, run_info, comm if distributed else None)
    first_epoch, first_step, partial = 0, 0, None
    if resume:
        meta = run.restore(checkpoint_path)
        first_epoch, first_step, partial = meta["epoch"], meta["step"], meta["partial"]
    last_good = (net.state_dict(), optimizer.state_dict())  # what a divergence falls back to

    for epoch in range(first_epoch, epochs):
        if schedule is not None:
            optimizer.lr = schedule(epoch)
        net.train()
        start = time.perf_counter()
        epoch_rng = order_rng.bit_generator.state  # the permutation below is drawn from here
        order = to_device(order_rng.permutation(n), device) if shuffle and bs < n else None
        b0 = first_step if epoch == first_epoch else 0
        loss_sum = xp.asarray(partial["loss_sum"] if b0 else 0.0, dtype=np.float64)
        correct = xp.asarray(partial["correct"] if b0 else 0, dtype=np.int64)
        earlier = partial["seconds"] if b0 else 0.0
        for b in range(b0, steps):
            lo, hi = b * bs, min(n, (b + 1) * bs)
            batch_rows = hi - lo
            if distributed:  # this rank's part of the global batch
                lo, hi = parallel.shard(lo, hi, comm.rank, comm.size)
            if order is None:
                xb, yb = x[lo:hi], y[lo:hi]
            else:  # gathered into the reused buffers (their first rows, for a last partial batch)
                idx = order[lo:hi]
                xb, yb = x.take(idx, xb_buf), xp.take(y, idx, axis=0, out=yb_buf[:hi - lo])
            value, out, stop = take_step(xb, yb, hi - lo, batch_rows)
            if value is not None:
                loss_sum += value * (hi - lo)
                if classify:
                    correct += (out.argmax(axis=1) == yb).sum()
            if on_batch is not None:
                on_batch(epoch, b + 1, steps)
            # a single process: a signal that came during this step or its on_batch stops it here (ranks
            # of a distributed run agreed on stopping through the gradient sum instead)
            stop = stop or (not distributed and interrupt is not None and bool(interrupt()))
            if stop:
                if checkpoint_path is not None:
                    sums = {"loss_sum": float(loss_sum), "correct": int(correct),
                            "seconds": earlier + time.perf_counter() - start}
                    run.save(checkpoint_path, epoch, b + 1, epoch_rng, sums)
                raise Interrupted(epoch, b + 1, checkpoint_path)
        synchronize(loss_sum)
        total_loss, total_correct = float(loss_sum), int(correct)
        if distributed:
            total_loss, total_correct = _sum_over_ranks(comm, total_loss, total_correct)
        record = {"epoch": epoch + 1, "loss": total_loss / n,
                  "accuracy": total_correct / n if classify else None, "val_loss": None, "val_accuracy": None,
                  "lr": optimizer.lr, "seconds": earlier + time.perf_counter() - start}
        if not _finite(record["loss"]):  # checked once per epoch, on the sum read back anyway
            history.epochs.append(record)
            history.stop_reason, history.diverged_epoch = "diverged", epoch + 1
            net.load_state_dict(last_good[0])
            optimizer.load_state_dict(last_good[1])
            break
        if validation is not None:
            val = evaluate(net, loss, *validation, batch_size=eval_batch_size, comm=comm if distributed else None)
            record["val_loss"], record["val_accuracy"] = val["loss"], val.get("accuracy")
        history.epochs.append(record)
        if callback is not None:
            callback(record)
        done = epoch + 1 == epochs
        if stopper is not None and stopper.should_stop(epoch + 1, record["val_loss"], net):
            history.stop_reason, done = "early_stopping", True
        elif target_loss is not None and record["loss"] < target_loss:
            history.stop_reason, done = "target_loss", True
        if stopper is not None:
            history.best_epoch = stopper.best_epoch
        if checkpoint_path is not None and (done or (epoch + 1) % checkpoint_every == 0):
            run.save(checkpoint_path, epoch + 1, 0, order_rng.bit_generator.state, finished=done)
        last_good = (net.state_dict(), optimizer.state_dict())
        if done:
            break
    if stopper is not None:
        stopper.restore(net)  # the weights of the best validation epoch
    net.eval()
    return history


def _stepper(step, optimizer, interrupt, comm):
    """``take_step(x, y, rows, batch_rows) -> (mean loss or None, output, stop)``: one training step; in a
    distributed run the gradients are summed over the ranks together with their stop requests, so that
    every rank stops at the same step (``stop``, always False for a single process)."""
    def wants_stop():
        return interrupt is not None and bool(interrupt())

    if comm is None:  # a single process asks interrupt() itself, after on_batch
        def take_step(x, y, rows, batch_rows):
            value, out = step(x, y)
            return value, out, False
        return take_step
    gradient_sum = parallel.GradientSum(comm, optimizer.params)

    def take_step(x, y, rows, batch_rows):
        if rows == 0:  # fewer rows than ranks in this batch: nothing to compute here, but the sum and update
            for p in optimizer.params:
                p.grad[...] = 0
            stop = gradient_sum(0, batch_rows, wants_stop())
            optimizer.step()
            return None, None, stop
        flag = {}
        value, out = step(x, y, reduce=lambda: flag.update(stop=gradient_sum(rows, batch_rows, wants_stop())))
        return value, out, flag["stop"]
    return take_step


def _sum_over_ranks(comm, *values):
    """Each value summed over the ranks (one small all-reduce, in float64: exact for counts below 2**53)."""
    buf = np.array(values, dtype=np.float64)
    comm.allreduce(buf)
    return [type(v)(s) for v, s in zip(values, buf)]


def _batches(x, batch_size):
    for start in range(0, len(x), batch_size):
        yield start, x[start:start + batch_size]


def classifies(net) -> bool:
    """Whether ``net``'s outputs are class scores: what ``fit`` recorded from its loss (kept in model
    files), else whether it has more than one output (a single output is no softmax classifier)."""
    known = getattr(net, "classifies", None)
    return bool(known) if known is not None else (net.out_features or 0) > 1


def _each_batch(net, x, batch_size, then):
    """``then(forward(batch))`` for every batch of ``x`` (through the front door), in eval mode, gathered
    into one (N, outputs) array on the network's device."""
    was_training = net.training
    net.eval()
    x = as_rows(x, net.dtype, net.device)
    xp = get_array_module(net.parameters()[0].data)
    forward = fast_path.forward_for(net) or net.forward
    out = None
    try:
        for start, xb in _batches(x, batch_size):
            z = then(forward(xb))
            if out is None:
                out = xp.empty((len(x),) + z.shape[1:], dtype=z.dtype)
            out[start:start + len(z)] = z
    finally:
        net.train(was_training)
    return out if out is not None else xp.empty((0, net.out_features or 0), dtype=net.dtype)


def _softmax(z):
    xp = get_array_module(z)
    p = xp.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return p


def predict_proba(net, x, batch_size: int = 4096):
    """Class probabilities (N, C) on the network's device, computed batch by batch in eval mode. A network
    that does not classify (see :func:`classifies`) is refused: :func:`predict` gives its outputs."""
    if not classifies(net):
        trained = getattr(net, "classifies", None) is False
        why = "it was trained with a regression loss" if trained else "it has a single output"
        raise ValueError(f"net: expected a classifier for predict_proba, got a network that does not classify "
                         f"({why}); predict(net, x) returns its outputs")
    return _each_batch(net, x, batch_size, _softmax)


def predict(net, x, batch_size: int = 4096):
    """A classifier's predicted class labels (N,) int64; any other network's outputs (N, outputs) in its
    dtype (see :func:`classifies`). On the network's device."""
    if classifies(net):
        return predict_proba(net, x, batch_size).argmax(axis=1)
    return _each_batch(net, x, batch_size, lambda z: z)


def evaluate(net, loss, x, y, batch_size: int = 4096, metrics: bool = False, comm=None) -> dict:
    """Mean loss over ``x`` in batches, in eval mode; for classification the accuracy, for regression the
    mean squared and absolute errors (``mse``, ``mae``, over all N x outputs entries) and ``r2`` (the
    coefficient of determination, averaged over the outputs as scikit-learn's ``r2_score`` does).

    ``metrics=True`` adds per-class precision/recall/F1 and the confusion matrix (see ``metrics.report``).
    With ``comm`` each rank evaluates its share of the rows and the sums are reduced over the ranks.
    """
    was_training = net.training
    net.eval()
    classify, classes = loss.classifies, net.out_features
    x, y = _dataset(x, y, net, classify)
    n_all = len(x)
    spread = None if classify else _squares_about_mean(y)  # before sharding: every rank holds every target
    if comm is not None and comm.size > 1:
        lo, hi = parallel.shard(0, n_all, comm.rank, comm.size)
        x, y = as_rows(x[lo:hi]), y[lo:hi]
    xp = get_array_module(y)
    forward = fast_path.forward_for(net) or net.forward
    mean_loss = fast_path.loss_for(loss, y) or (
        (lambda z, t: loss.forward(z, t, check=False)) if classify else loss.forward)
    loss_sum = xp.zeros((), dtype=np.float64)
    counts = xp.zeros((classes, classes), dtype=np.int64) if classify else 0
    for start, xb in _batches(x, batch_size):
        yb = y[start:start + len(xb)]
        out = forward(xb)
        loss_sum += mean_loss(out, yb) * len(xb)
        counts = counts + (confusion_counts(yb, out.argmax(axis=1), classes) if classify else _errors(out, yb))
    net.train(was_training)
    total, counts = float(loss_sum), to_numpy(counts)
    if comm is not None and comm.size > 1:
        buf = np.concatenate([[total], np.ravel(counts)]).astype(np.float64)
        comm.allreduce(buf)
        total, counts = float(buf[0]), buf[1:].reshape(np.shape(counts)).astype(np.asarray(counts).dtype)
    result = {"loss": total / max(n_all, 1)}
    if classify:
        result["accuracy"] = float(np.trace(counts)) / max(n_all, 1)
        if metrics:
            result.update(report(counts))
    else:
        result.update(_regression_report(counts, spread, n_all))
    return result


def _columns(y):
    """Targets as (N, outputs) float64 (a 1-D target is one output)."""
    return y.reshape(len(y), -1).astype(np.float64)


def _squares_about_mean(y) -> np.ndarray:
    """Per output, the sum of squared deviations of the targets from their mean (R^2's denominator)."""
    t = _columns(y)
    return to_numpy(((t - t.mean(axis=0)) ** 2).sum(axis=0)) if len(t) else np.zeros(t.shape[1])


def _errors(out, y):
    """(2, outputs) float64: per output, the batch's sum of squared and of absolute errors."""
    d = out.astype(np.float64).reshape(len(out), -1) - _columns(y)
    xp = get_array_module(d)
    return xp.stack([(d * d).sum(axis=0), xp.abs(d).sum(axis=0)])


def _regression_report(sums, spread, n) -> dict:
    """mse, mae and r2 from the summed errors; an output with constant targets scores R^2 = 1 when it is
    predicted exactly, else 0 (scikit-learn's convention)."""
    if np.ndim(sums) == 0:  # no rows
        return {"mse": None, "mae": None, "r2": None}
    entries = max(n * sums.shape[1], 1)
    exact = sums[0] == 0
    r2 = np.where(spread > 0, 1 - sums[0] / np.where(spread > 0, spread, 1), np.where(exact, 1.0, 0.0))
    return {"mse": float(sums[0].sum() / entries), "mae": float(sums[1].sum() / entries), "r2": float(r2.mean())}
