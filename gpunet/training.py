"""Training and evaluation loops (course notes, point 8).

For a number of epochs, or until the epoch's cost falls under a threshold: for each instance /
batch, forward, cost, backward, update. Batch size 1 is online learning, ``None`` (or the set's
size) the full batch. Early stopping on the validation loss, with patience, restores the best
weights.

A :class:`Run` holds one training run: its position (epochs and steps done), this epoch's sums, the
history, and the callbacks (:mod:`gpunet.callbacks`) that schedule, stop, guard and checkpoint it;
its epoch loop is :meth:`Run.fit`. :func:`fit` is the keyword front door that builds both.

The data are moved to the network's device once; each epoch's order is drawn on the host from a
seeded NumPy generator (so a CPU and a GPU run see the same batches) and every batch is gathered on
the device. Loss and accuracy are summed on the device and read back once per epoch, so a GPU step
never waits for the host. Where :mod:`gpunet.fast` knows the network, its fused step replaces the
core's; else the core's ``forward``/``backward``/``step`` run (``fit(..., fast=False)`` asks for the
core).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import callbacks as cbs, checkpoint, fast as fast_path, parallel
from .backend import (
    Array,
    ArrayLike,
    HostCopy,
    get_array_module,
    on_device_of_net,
    softmax,
    synchronize,
    to_device,
    to_numpy,
)
from .data.arrays import (  # by_name, columns_of: also for gpunet.sklearn
    by_name,
    columns_of,
    targets,
)
from .data.rows import as_rows
from .fast import graph
from .metrics import confusion_counts, report

Network = Any
"""A :class:`gpunet.Sequential` (or a layer with its forward, backward and parameters): named, not
imported (training sits beside the network, not on it)."""
Optimizer = Any
"""A :mod:`gpunet.optimizers` rule: ``step()``, ``lr``, ``state_dict()``."""
Loss = Any
"""A :mod:`gpunet.losses` loss: ``forward(pred, target)``, ``backward()``, ``classifies``."""


@dataclass
class History:
    """One dict per epoch (epoch, loss, accuracy, val_loss, val_accuracy, lr, seconds), and why it
    stopped. ``history[0]`` (an integer, or a slice) is an epoch's dict, as in a list;
    ``history["loss"]`` (a key) that quantity over the epochs."""

    epochs: list = field(default_factory=list)
    stop_reason: str = "max_epochs"
    best_epoch: int | None = None
    diverged_epoch: int | None = None

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, (int, np.integer, slice)) and not isinstance(key, bool):
            return self.epochs[key]
        return [e[key] for e in self.epochs]

    def __iter__(self) -> Iterator[dict]:  # over the epochs, as indexing goes (not over keys)
        return iter(self.epochs)

    def __len__(self) -> int:
        return len(self.epochs)


def train_step(net: Network, loss: Loss, optimizer: Optimizer, x: Array, y: Array) -> Array:
    """The notes' step on one batch: forward, cost, backward, update; returns the batch's mean loss
    (a 0-d array on the network's device). ``x``: (N, features) in the network's dtype on its
    device; ``y``: (N,) int64 class labels or (N, outputs) targets (``fit`` converts any array-like
    once, then runs this step, or a fused one that leaves the same weights, gradients and optimizer
    state). After it, ``param.grad`` holds this batch's gradients and ``param.data`` the updated
    weights.

        for epoch in range(epochs):
            for x, y in batches:
                gn.train_step(net, loss, optimizer, x, y)
    """
    out = net.forward(x)  # y^L, every layer's forward in turn
    value = loss.forward(out, y)  # the cost C(y^L, y^D)
    net.backward(loss.backward())  # dC/dz^L back through every layer: each param.grad
    optimizer.step()  # w = w - lr * dC/dw (or the optimizer's rule)
    return value


def core_step(net, loss, optimizer):
    """``train_step`` as ``fit`` runs it: ``step(x, y, reduce=None) -> (mean loss, output)``;
    ``reduce()`` runs between the gradients and the update (a distributed run sums them there), and
    the labels, checked once by ``fit``, are not checked again each step."""

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
    if (
        not isinstance(batch_size, (int, np.integer))
        or isinstance(batch_size, bool)
        or batch_size < 1
    ):
        raise ValueError(
            f"batch_size: expected a positive integer or None (full batch), got {batch_size!r}"
        )
    return int(min(batch_size, max(n, 1)))


def _dataset(x, y, net, classify, name="x"):
    """A data set through the front door (:mod:`gpunet.data.arrays`): the features as ``Rows`` or
    ``Pixels`` of the network's dtype on its device, the targets checked and cast there. A data
    frame's columns are put in the order of the network's ``feature_names`` (refused when they are
    other columns)."""
    x = _rows(net, x, name)
    y = targets(
        y, len(x), classify, net.out_features, net.dtype, net.device, name.replace("x", "y")
    )
    return x, y


def _rows(net, x, name="x"):
    """Features for ``net``: by column name where both have names, then through the front door, then
    their count checked against the network's inputs."""
    x = as_rows(by_name(x, getattr(net, "feature_names", None), name), net.dtype, net.device, name)
    if net.in_features is not None and x.shape[1] != net.in_features:
        raise ValueError(
            f"{name}: expected {net.in_features} features (the network's inputs), got {x.shape[1]}"
        )
    return x


class Interrupted(Exception):
    """Training stopped at a step boundary because ``interrupt()`` said so; the state reached is in
    the checkpoint (when ``fit`` was given one): ``epoch`` epochs and ``step`` steps of the next are
    done."""

    def __init__(self, epoch: int, step: int, checkpoint):
        super().__init__(f"interrupted after {epoch} epochs and {step} steps of the next")
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


class Run:
    """One training run of ``net`` on ``data = (x, y)`` (from :func:`_dataset`: on the network's
    device).

    Where it stands: ``epoch`` epochs are done and ``step`` steps of the next (of ``steps`` per
    epoch); ``loss_sum`` and ``correct`` are this epoch's sums so far, on the device; ``history``
    the finished epochs. ``callbacks`` are called at the points :mod:`gpunet.callbacks` lists, in
    order; one sets ``stop_training`` to end the run after the epoch. ``interrupt()``, asked after
    every step, stops it there (:class:`Interrupted`). With ``comm`` (more than one rank) each
    global batch is split over the ranks.
    """

    def __init__(self, net, loss, optimizer, data, *, validation=None, batch_size=128, shuffle=True,
                 seed=0, callbacks=(), eval_batch_size=None, fast=True, interrupt=None, comm=None,
                 cuda_graph=False):  # fmt: skip
        self.net, self.loss, self.optimizer, (self.x, self.y) = net, loss, optimizer, data
        self.validation, self.eval_batch_size, self.interrupt = (
            validation,
            eval_batch_size,
            interrupt,
        )
        self.comm = comm if comm is not None and comm.size > 1 else None
        self.rank = 0 if self.comm is None else self.comm.rank
        if (
            self.comm is not None
        ):  # before any collective that a disagreeing rank would wait on forever
            self.comm.agree(net.device, net.dtype)
        self.n, self.batch_size = len(self.x), batch_size_for(batch_size, len(self.x))
        self.steps, self.shuffle = (
            -(-self.n // self.batch_size),
            shuffle and self.batch_size < self.n,
        )
        self.order_rng = np.random.default_rng(seed)
        self.epoch_rng = (
            self.order_rng.bit_generator.state
        )  # the state this epoch's order is drawn from
        self.history, self.epoch, self.step, self.epochs, self.stop_training = (
            History(),
            0,
            0,
            None,
            False,
        )
        self.loss_sum = self.correct = self.last_checkpoint = self._partial = None
        self.callbacks = list(callbacks)
        self._hooks = {
            h: [getattr(c, h) for c in self.callbacks if hasattr(c, h)] for h in cbs.HOOKS
        }
        step = (
            fast and fast_path.select(net, loss, optimizer, self.y, self.comm is not None)
        ) or core_step(net, loss, optimizer)
        # layers that draw per row (Dropout): told where this rank's rows begin in the global batch
        self._row_keyed = [layer for layer in _layers(net) if hasattr(layer, "row_start")]
        self.row_start, self.batch_rows = 0, 0
        self._graph = self._graph_step(step, fast) if cuda_graph else None
        self._take_step = (
            None if cuda_graph else _stepper(step, optimizer, interrupt, self.comm, self._row_keyed)
        )
        self._step_sums = (
            getattr(step, "sums_in_kernel", False) and step
        )  # a GPU fused step sums itself
        xp = get_array_module(net.parameters()[0].data)
        self._xb = xp.empty((self.batch_size,) + self.x.shape[1:], dtype=self.x.dtype)
        self._yb = xp.empty((self.batch_size,) + self.y.shape[1:], dtype=self.y.dtype)

    def _graph_step(self, step, fast):
        """The CUDA graph step (:mod:`gpunet.fast.graph`) built on the fused ``step``; ValueError
        says why this run cannot take it."""
        why = (
            (None if fast else "fast=False")
            or fast_path.why_not(self.net, self.loss, self.optimizer, self.y)
            or graph.why_not(self.net, self.x, bool(self._hooks["transform_batch"]))
        )
        if why is not None:
            raise ValueError(f"cuda_graph: this run cannot take the CUDA graph step: {why}")
        summed = (
            None if self.comm is None else parallel.GradientSum(self.comm, self.optimizer.params)
        )
        return graph.GraphStep(step, self.x, self.y, self.batch_size, summed)

    def _graph_batch(self, b):
        """Step ``b`` through the graph: this rank's rows of the batch (its shard in a distributed
        run, whose Dropout layers are told where it starts), and whether any rank asked to stop."""
        lo, hi = b * self.batch_size, min(self.n, (b + 1) * self.batch_size)
        self.batch_rows = hi - lo
        if self.comm is not None:
            first = lo
            lo, hi = parallel.shard(lo, hi, self.rank, self.comm.size)
            self.row_start = lo - first
            for layer in self._row_keyed:
                layer.row_start = self.row_start
        asked = self.comm is not None and self.interrupt is not None and bool(self.interrupt())
        return self._graph(b, lo, hi, self.batch_rows, asked)

    def _call(self, hook, *args):
        for fn in self._hooks[hook]:
            fn(self, *args)

    def fit(self, epochs: int) -> History:
        """Train until ``epochs`` epochs are done or a callback stops the run; returns the
        history."""
        self.epochs, self.stop_training, self.history.stop_reason = epochs, False, "max_epochs"
        self._call("on_train_begin")
        while self.epoch < epochs and not self.stop_training:
            self._call("on_epoch_begin", self.epoch)
            self._train_epoch()
            record = self._record()
            self.history.epochs.append(record)
            self.epoch, self.step, self._partial = self.epoch + 1, 0, None
            self._call("on_epoch_end", record)
        self._call("on_train_end")
        self.net.eval()
        return self.history

    def _train_epoch(self):
        """This epoch's steps from ``self.step`` on, summed into ``loss_sum`` and ``correct``."""
        self.net.train()
        self._start_sums()
        self.epoch_rng = (
            self.order_rng.bit_generator.state
        )  # the permutation below is drawn from here
        order = (
            to_device(self.order_rng.permutation(self.n), self.net.device) if self.shuffle else None
        )
        if self._graph is not None:  # its own sums, set in place to where the epoch stands
            p = self._partial if self.step else None
            sums = (p["loss_sum"], p["correct"]) if p else ()
            self.loss_sum, self.correct = self._graph.begin_epoch(order, *sums)
        transforms, classify = self._hooks["transform_batch"], self.loss.classifies
        for b in range(self.step, self.steps):
            if self._graph is not None:  # the batch gathered inside the graph, from the permutation
                value, out, stop = self._graph_batch(b)
            else:
                xb, yb, rows, batch_rows = self._batch(order, b)
                for transform in transforms:
                    xb = transform(self, xb)
                value, out, stop = self._take_step(xb, yb, rows, batch_rows)
            if value is not None and not self._step_sums:
                self.loss_sum += value * rows
                if classify:
                    self.correct += (out.argmax(axis=1) == yb).sum()
            self.step = b + 1
            self._call("on_batch_end", self.epoch, b + 1, self.steps)
            # a single process: a signal that came during this step or its on_batch_end stops it
            # here (ranks of a distributed run agreed on stopping through the gradient sum instead)
            if stop or (
                self.comm is None and self.interrupt is not None and bool(self.interrupt())
            ):
                if self._graph is not None:  # the replays done before anything reads the state
                    self._graph.finish()
                self.last_checkpoint = None
                self._call("on_interrupt")
                raise Interrupted(self.epoch, self.step, self.last_checkpoint)
        if self._graph is not None:
            self._graph.finish()

    def _start_sums(self):
        xp, p = get_array_module(self.y), self._partial if self.step else None
        self.loss_sum = xp.asarray(p["loss_sum"] if p else 0.0, dtype=np.float64)
        self.correct = xp.asarray(p["correct"] if p else 0, dtype=np.int64)
        if self._step_sums:
            self._step_sums.use_sums(self.loss_sum, self.correct)
        self._clock = time.perf_counter() - (
            p["seconds"] if p else 0.0
        )  # seconds of the epoch before a resume

    def _batch(self, order, b):
        """Batch ``b``'s inputs and targets (this rank's part of it), its rows here and in the whole
        batch."""
        lo, hi = b * self.batch_size, min(self.n, (b + 1) * self.batch_size)
        batch_rows = hi - lo
        if self.comm is not None:  # every draw is keyed by the row's place in the global batch
            first = lo
            lo, hi = parallel.shard(lo, hi, self.rank, self.comm.size)
            self.row_start, self.batch_rows = lo - first, batch_rows
            for layer in self._row_keyed:
                layer.row_start = self.row_start
        else:
            self.batch_rows = batch_rows
        if order is None:
            xb, yb = self.x[lo:hi], self.y[lo:hi]
            if self._hooks[
                "transform_batch"
            ]:  # a transform may write into its input: not into the data
                self._xb[: hi - lo] = xb
                xb = self._xb[: hi - lo]
        else:  # gathered into the reused buffers (their first rows, for a last partial batch)
            idx = order[lo:hi]
            xb, yb = (
                self.x.take(idx, self._xb),
                get_array_module(self.y).take(self.y, idx, axis=0, out=self._yb[: hi - lo]),
            )
        return xb, yb, hi - lo, batch_rows

    def seen(self, step: int | None = None) -> int:
        """This rank's training rows in the epoch's first ``step`` steps (default: those done so
        far): what ``loss_sum`` and ``correct`` are sums over."""
        step = self.step if step is None else step
        hi = min(self.n, step * self.batch_size)
        if self.comm is None:
            return hi
        shards = (
            parallel.shard(lo, min(self.n, lo + self.batch_size), self.rank, self.comm.size)
            for lo in range(0, hi, self.batch_size)
        )
        return sum(b - a for a, b in shards)

    def _record(self) -> dict:
        """The epoch's history entry: the mean training loss and accuracy (over every rank),
        validation."""
        synchronize(self.loss_sum)
        loss_sum, correct = float(self.loss_sum), int(self.correct)
        if self.comm is not None:
            loss_sum, correct = parallel.sum_over_ranks(self.comm, loss_sum, correct)
        record = {
            "epoch": self.epoch + 1,
            "loss": loss_sum / self.n,
            "accuracy": correct / self.n if self.loss.classifies else None,
            "val_loss": None,
            "val_accuracy": None,
            "lr": self.optimizer.lr,
            "seconds": time.perf_counter() - self._clock,
        }
        if self.validation is not None and math.isfinite(
            record["loss"]
        ):  # NaN weights are not worth a pass
            x_val, y_val = self.validation
            val = evaluate(
                self.net, self.loss, x_val, y_val, batch_size=self.eval_batch_size, comm=self.comm
            )
            record["val_loss"], record["val_accuracy"] = val["loss"], val.get("accuracy")
        return record

    def _per_rank(self, value) -> list:
        """``value`` of every rank, in rank order (a collective call in a distributed run)."""
        return [value] if self.comm is None else self.comm.allgather(value)

    def _stateful(self):
        """``(name, callback)`` of each callback that has a ``state_dict``, named by its class
        (``X``, then ``X.2`` for a second one), so that a resumed run with the same callbacks finds
        each its own."""
        seen = {}
        for c in self.callbacks:
            if hasattr(c, "state_dict"):
                name = type(c).__name__
                seen[name] = seen.get(name, 0) + 1
                yield (name if seen[name] == 1 else f"{name}.{seen[name]}"), c

    def state_dict(self, wait: bool = True) -> tuple[dict, Any]:
        """``(record, arrays)``: everything a resumed run needs, as JSON data and host NumPy arrays.
        A collective call in a distributed run (each rank's random state and partial sums are
        gathered). The weights and the optimizer's arrays come back in one batched copy
        (:class:`gpunet.backend.HostCopy`); with ``wait=False`` ``arrays`` is a function that
        returns them: the copy runs behind the queued work without the host waiting, and a
        checkpoint writer collects it off the training loop."""
        mid = self.step > 0
        partial: Any = (
            {
                "loss_sum": float(self.loss_sum),
                "correct": int(self.correct),
                "seconds": time.perf_counter() - self._clock,
            }
            if mid
            else None
        )
        random, partial = self._per_rank(self.net.random_state()), self._per_rank(partial)
        opt, arrays = checkpoint.split("optimizer", self.optimizer.state_dict(host=False))
        arrays.update({f"net/{k}": v for k, v in self.net.state_dict(host=False).items()})
        names, copy = list(arrays), HostCopy(arrays.values())
        arrays = {}
        states = {}
        for name, c in self._stateful():
            state = c.state_dict()
            if state:  # most callbacks have none
                states[name], more = checkpoint.split(f"callbacks/{name}", state)
                arrays.update(more)
        h = self.history
        record = {
            "network": self.net.config(),
            "epoch": self.epoch,
            "step": self.step,
            "order_rng": self.epoch_rng if mid else self.order_rng.bit_generator.state,
            "random": random,
            "ranks": len(random),
            "partial": partial,
            "optimizer": opt,
            "callbacks": states,
            "history": [dict(r) for r in h.epochs],
            "stop_reason": h.stop_reason,
            "best_epoch": h.best_epoch,
            "diverged_epoch": h.diverged_epoch,
        }

        def fetch() -> dict:
            return {**dict(zip(names, copy.wait())), **arrays}

        return record, (fetch() if wait else fetch)

    def _check_fits(self, record: dict, path) -> None:
        """The fields of a checked record (:func:`gpunet.records.check_checkpoint`) that only this
        run can judge: the step within an epoch of its steps, the optimizer's fields those of its
        own state."""
        if record["step"] > self.steps:
            raise checkpoint.CheckpointError(
                f"{path}: step: expected at most {self.steps} (the steps of an epoch of this run: "
                f"{self.n} rows "
                f"in batches of {self.batch_size}), got {record['step']}"
            )
        mine, given = self.optimizer.state_dict(), record["optimizer"]
        for key in sorted(set(mine) | set(given)):
            if key == "arrays" or key == "kind" and given.get(key) != mine[key]:
                # the arrays are counted by the schema; another kind is named by load_state_dict
                continue
            where = f"{path}: optimizer.{key}"
            if key not in given or key not in mine:
                raise checkpoint.CheckpointError(
                    f"{where}: {'missing' if key in mine else 'unexpected field'} "
                    f"(a {mine['kind']} optimizer's state)"
                )
            if not _same_kind(mine[key], given[key]):
                raise checkpoint.CheckpointError(
                    f"{where}: expected {type(mine[key]).__name__} like "
                    f"{mine[key]!r}, got {given[key]!r:.60}"
                )

    def load_state_dict(self, record: dict, arrays: dict, path="the checkpoint") -> None:
        """Put the run where :meth:`state_dict` found it; a CheckpointError names what does not
        fit."""
        if record["network"] != self.net.config():
            raise checkpoint.CheckpointError(
                f"{path}: holds a different network ({record['network']['layers']}) "
                f"than the one given ({self.net.config()['layers']})"
            )
        size = 1 if self.comm is None else self.comm.size
        self._check_fits(record, path)
        try:
            self.net.load_state_dict({k[4:]: v for k, v in arrays.items() if k.startswith("net/")})
            self.optimizer.load_state_dict(
                checkpoint.join("optimizer", record["optimizer"], arrays)
            )
            if record["ranks"] != size:
                raise ValueError(
                    f"it was written by {record['ranks']} processes, this run has {size}; "
                    f"resume with the same number"
                )
            self.net.set_random_state(record["random"][self.rank])
        except (KeyError, ValueError, TypeError) as exc:
            raise checkpoint.CheckpointError(f"{path}: does not fit this run ({exc})") from None
        for name, c in self._stateful():
            if name in record["callbacks"]:
                try:
                    c.load_state_dict(
                        checkpoint.join(f"callbacks/{name}", record["callbacks"][name], arrays)
                    )
                except KeyError as exc:  # a field the callback's state needs, by its bare name
                    raise checkpoint.CheckpointError(
                        f"{path}: callbacks.{name}.{exc.args[0]}: missing"
                    ) from None
                except (ValueError, TypeError) as exc:
                    raise checkpoint.CheckpointError(
                        f"{path}: callbacks.{name}: does not fit this run ({exc})"
                    ) from None
        self.order_rng.bit_generator.state = record["order_rng"]
        self.epoch, self.step, self._partial = (
            record["epoch"],
            record["step"],
            record["partial"][self.rank],
        )
        h = self.history
        h.epochs, h.stop_reason = list(record["history"]), record["stop_reason"]
        h.best_epoch, h.diverged_epoch = record["best_epoch"], record["diverged_epoch"]


def _same_kind(mine, given) -> bool:
    """Whether JSON value ``given`` can stand for the run's own ``mine``: a boolean for a boolean, a
    number for a number, a list of as many such for a tuple or list, anything for None."""
    if mine is None:
        return True
    if isinstance(mine, (tuple, list)):
        return (
            isinstance(given, list)
            and len(given) == len(mine)
            and all(map(_same_kind, mine, given))
        )
    if isinstance(mine, bool) or isinstance(given, bool):
        return isinstance(mine, bool) and isinstance(given, bool)
    if isinstance(mine, (int, float)):
        return isinstance(given, (int, float)) and (
            isinstance(given, int) or not isinstance(mine, int)
        )
    return isinstance(given, type(mine))


@on_device_of_net
def fit(net: Network, loss: Loss, optimizer: Optimizer, x: ArrayLike, y: ArrayLike, *,
        epochs: int = 10, batch_size: int | str | None = 128,
        validation: tuple[ArrayLike, ArrayLike] | None = None, shuffle: bool = True,
        seed: int | None = 0, target_loss: float | None = None, patience: int | None = None,
        min_delta: float = 0.0, schedule: Callable[[int], float] | None = None,
        callback: Callable[[dict], object] | None = None,
        on_batch: Callable[[int, int, int], object] | None = None,
        eval_batch_size: int | None = None,
        fast: bool = True, checkpoint_path: str | os.PathLike | None = None,
        resume: bool = False, checkpoint_every: int = 1,
        interrupt: Callable[[], bool] | None = None, run_info: dict | None = None,
        comm: Any = None, callbacks: Iterable[object] = (), augment: object | None = None,
        verbose: int = 0, cuda_graph: bool = False) -> History:  # fmt: skip
    """Train ``net`` on ``x`` (N, features): any 2-D real array-like (converted once to the
    network's dtype and device, :mod:`gpunet.data.arrays`) or ``Pixels``; and ``y``: (N,) integer
    labels 0..C-1 or (N, outputs) targets.

    ``validation=(x_val, y_val)`` is evaluated after each epoch. ``patience`` (needs validation)
    stops after that many epochs without a val-loss improvement larger than ``min_delta`` and
    restores the best weights. ``target_loss`` stops once the epoch's training loss is below it.
    ``schedule(epoch)`` sets ``optimizer.lr`` before each epoch. ``callback(record)`` runs after
    each epoch; ``on_batch(epoch, done, total)`` after each batch (no device sync). ``callbacks``:
    objects with any of the hooks of :mod:`gpunet.callbacks` (called after those the keywords make,
    before early stopping, the target loss and the checkpoint); ``augment``: one more, whose
    ``transform_batch(run, xb)`` changes each training batch. ``verbose`` as in Keras: 0 silent, 1 a
    progress bar per epoch, 2 one line per epoch (:class:`Progress`). ``cuda_graph=True`` (off by
    default until measured) runs each step as one CUDA graph replay (:mod:`gpunet.fast.graph`: a
    GPU, the fused step's networks without BatchNorm, no augment; else a ValueError says why; a
    data-parallel run's all-reduce runs between replays).

    Long runs: ``checkpoint_path`` receives a checkpoint every ``checkpoint_every`` epochs and at
    the end; ``resume=True`` continues from it exactly (bit for bit on the same device);
    ``interrupt()``, checked after every step, stops the run there: the state reached goes to the
    checkpoint and :class:`Interrupted` is raised. ``run_info`` (JSON data) is stored in the
    checkpoint for the caller. Data-parallel: with ``comm`` (:func:`gpunet.parallel.world` under
    ``mpiexec``) each global batch is split across the ranks, their gradients summed before every
    update (so every rank holds the same weights), and the epoch's sums and the validation reduced
    over the ranks; rank 0 writes checkpoints. If the training loss of an epoch is NaN or infinite,
    the weights of the last finished epoch are restored and the run stops with ``history.stop_reason
    == "diverged"``.

    After ``fit``, ``param.grad`` holds the last step's gradients and the optimizer its state after
    that step, whichever step ran (the core's :func:`train_step` or the fast path's fused one).
    """
    _check_fit(epochs, patience, validation, resume, checkpoint_path)
    shown = [cbs.Progress(verbose)] if verbose != 0 else []  # a bad verbose fails before any work
    data, validation = _fit_data(net, loss, x, y, validation)
    saver = _checkpoint(checkpoint_path, checkpoint_every, run_info)
    stops = _stopping(patience, min_delta, target_loss)
    # hooks are called in this order: the keywords' callbacks first (see _keyword_callbacks), the
    # checkpoint last (it writes the state the others leave)
    ordered = [*_keyword_callbacks(schedule, callback, on_batch), *shown, *callbacks]
    ordered += [*([augment] if augment is not None else []), *stops, *([saver] if saver else [])]
    run = Run(net, loss, optimizer, data, validation=validation, batch_size=batch_size,
              shuffle=shuffle, seed=seed, eval_batch_size=eval_batch_size, fast=fast,
              interrupt=interrupt, comm=comm, cuda_graph=cuda_graph, callbacks=ordered)  # fmt: skip
    return _resume_and_fit(run, saver if resume else None, epochs)


def _fit_data(net, loss, x, y, validation):
    """``(data, validation)``: ``(x, y)`` and the ``validation`` pair (or None) as the run reads
    them (:func:`_dataset`: x in the network's dtype on its device, y checked for ``loss``).
    Records on ``net`` whether it classifies and, for a data frame, its column names."""
    net.classifies = loss.classifies  # set once (another task is refused): predict reads it
    if getattr(net, "feature_names", None) is None and columns_of(x) is not None:
        net.feature_names = columns_of(x)  # a data frame's columns: model files and ONNX keep them
    data = _dataset(x, y, net, loss.classifies)
    if validation is not None:
        validation = _dataset(*validation, net, loss.classifies, "validation x")
    return data, validation


def _checkpoint(path, every: int, info) -> cbs.Checkpoint | None:
    """``fit``'s checkpoint callback (``checkpoint_path``, ``checkpoint_every``, ``run_info``), or
    None without a path."""
    return cbs.Checkpoint(path, every, info) if path is not None else None


def _stopping(patience, min_delta: float, target_loss) -> list:
    """The callbacks that ``fit``'s stopping keywords ask for: early stopping on the validation
    loss, then the target loss."""
    return [
        *([cbs.EarlyStopping(patience, min_delta)] if patience is not None else []),
        *([cbs.TargetLoss(target_loss)] if target_loss is not None else []),
    ]


def _resume_and_fit(run: Run, saver: cbs.Checkpoint | None, epochs: int) -> History:
    """``run.fit(epochs)``, first restoring the run from ``saver``'s checkpoint when given
    (``fit(resume=True)``: ``_check_fit`` refuses it without a checkpoint_path). On the CPU the
    BLAS threads are chosen by the largest matrix product (small problems: one thread)."""
    if saver is not None:
        saver.restore(run)
    on_cpu = run.net.device == "cpu"
    with (
        fast_path.blas.threads_for(largest_product(run.net, run.batch_size))
        if on_cpu
        else nullcontext()
    ):
        return run.fit(epochs)


def largest_product(net, rows: int) -> int:
    """The multiply-adds of the largest matrix product in a step on ``rows`` rows: rows x in x out
    of the widest Linear layer (what :class:`gpunet.fast.blas.threads_for` decides by)."""
    sizes = [layer.W.data.size for layer in net.layers if hasattr(layer, "W")]
    return int(rows) * max(sizes, default=0)


def _check_fit(epochs, patience, validation, resume, checkpoint_path):
    if not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
    if patience is not None and (validation is None or patience < 1):
        raise ValueError(
            f"patience: expected a positive integer together with a validation set, got "
            f"{patience!r}" + ("" if validation is not None else " and no validation set")
        )
    if resume and checkpoint_path is None:
        raise ValueError("resume: expected a checkpoint_path to resume from, got none")


def _keyword_callbacks(schedule, callback, on_batch) -> list:
    """The callbacks that ``fit``'s keywords ask for, which come first: the schedule sets the
    epoch's lr, the divergence guard puts back the last good weights before anything else sees
    them."""
    made: list[cbs.Callback] = [cbs.Schedule(schedule)] if schedule is not None else []
    made.append(cbs.DivergenceGuard())
    made += [cbs.EpochEnd(callback)] if callback is not None else []
    return made + ([cbs.BatchEnd(on_batch)] if on_batch is not None else [])


def _layers(net):
    """Every layer of ``net``, those of nested networks included."""
    for layer in getattr(net, "layers", ()):
        yield layer
        yield from _layers(layer)


def _stepper(step, optimizer, interrupt, comm, row_keyed=()):
    """``take_step(x, y, rows, batch_rows) -> (mean loss or None, output, stop)``: one training
    step; in a distributed run the gradients are summed over the ranks together with their stop
    requests, so that every rank stops at the same step (``stop``, always False for a single
    process). ``row_keyed``: the Dropout layers, whose mask keys a rank without rows still draws
    (every rank's keys stay the same)."""

    def wants_stop():
        return interrupt is not None and bool(interrupt())

    if comm is None:  # a single process asks interrupt() itself, after on_batch_end

        def take_step(x, y, rows, batch_rows):
            value, out = step(x, y)
            return value, out, False

        return take_step
    gradient_sum = parallel.GradientSum(comm, optimizer.params)

    def take_step(x, y, rows, batch_rows):
        if (
            rows == 0
        ):  # fewer rows than ranks in this batch: nothing to compute here, but the sum and update
            for p in optimizer.params:
                p.grad[...] = 0
            for layer in row_keyed:  # the key the other ranks' forward draws
                if layer.active():
                    layer.next_key()
            stop = gradient_sum(0, batch_rows, wants_stop())
            optimizer.step()
            return None, None, stop
        flag = {}
        if getattr(
            step, "prescaled", False
        ):  # the GPU's fused step divides by the global batch's rows itself
            value, out = step(
                x,
                y,
                reduce=lambda: flag.update(
                    stop=gradient_sum(rows, batch_rows, wants_stop(), scaled=True)
                ),
                batch_rows=batch_rows,
            )
        else:
            value, out = step(
                x, y, reduce=lambda: flag.update(stop=gradient_sum(rows, batch_rows, wants_stop()))
            )
        return value, out, flag["stop"]

    return take_step


# Rows per evaluation batch when the caller names none: on the CPU 1024, so that a block's
# activations (1024 x 512 float32: 2 MiB) stay in cache between its products, its bias and its
# ReLU (the 10,000 MNIST test images in 1.07 of the products' own time, against 1.37 in blocks of
# 4096: BENCHMARKS.md, "Inference"); on a GPU 4096, fewer and fuller launches.
EVAL_ROWS = {"cpu": 1024, "gpu": 4096}


def _batches(x, batch_size, net):
    """``(start, rows)`` of ``x`` in batches of ``batch_size`` rows (None: ``EVAL_ROWS`` of the
    device of ``net``, where x lies)."""
    if batch_size is None:
        batch_size = EVAL_ROWS[net.device]
    for start in range(0, len(x), batch_size):
        yield start, x[start : start + batch_size]


def classifies(net) -> bool:
    """Whether ``net``'s outputs are class scores: what ``fit`` recorded from its loss (kept in
    model files), else whether it has more than one output (a single output is no softmax
    classifier)."""
    known = getattr(net, "classifies", None)
    return bool(known) if known is not None else (net.out_features or 0) > 1


def _each_batch(net, x, batch_size, then):
    """``then(forward(batch))`` for every batch of ``x`` (through the front door), in eval mode,
    gathered into one (N, outputs) array on the network's device."""
    was_training = net.training
    net.eval()
    x = _rows(net, x)
    xp = get_array_module(net.parameters()[0].data)
    forward = fast_path.forward_for(net) or net.forward
    out = None
    try:
        for start, xb in _batches(x, batch_size, net):
            z = then(forward(xb))
            if out is None:
                out = xp.empty((len(x),) + z.shape[1:], dtype=z.dtype)
            out[start : start + len(z)] = z
    finally:
        net.train(was_training)
    return out if out is not None else xp.empty((0, net.out_features or 0), dtype=net.dtype)


@on_device_of_net
def predict_proba(net: Network, x: ArrayLike, batch_size: int | None = None) -> Array:
    """Class probabilities (N, C) on the network's device, computed batch by batch in eval mode. A
    network that does not classify (see :func:`classifies`) is refused: :func:`predict` gives its
    outputs."""
    if not classifies(net):
        trained = getattr(net, "classifies", None) is False
        why = "it was trained with a regression loss" if trained else "it has a single output"
        raise ValueError(
            f"net: expected a classifier for predict_proba, got a network that does not classify "
            f"({why}); predict(net, x) returns its outputs"
        )
    return _each_batch(net, x, batch_size, softmax)


@on_device_of_net
def predict(net: Network, x: ArrayLike, batch_size: int | None = None) -> Array:
    """A classifier's predicted class labels (N,) int64; any other network's outputs (N, outputs) in
    its dtype (see :func:`classifies`). On the network's device."""
    if classifies(net):
        return predict_proba(net, x, batch_size).argmax(axis=1)
    return _each_batch(net, x, batch_size, lambda z: z)


@on_device_of_net
def evaluate(
    net: Network,
    loss: Loss,
    x: ArrayLike,
    y: ArrayLike,
    batch_size: int | None = None,
    metrics: bool = False,
    comm: Any = None,
) -> dict:
    """Mean loss over ``x`` in batches, in eval mode; for classification the accuracy, for
    regression the mean squared and absolute errors (``mse``, ``mae``, over all N x outputs entries)
    and ``r2`` (the coefficient of determination, averaged over the outputs as scikit-learn's
    ``r2_score`` does).

    ``metrics=True`` adds per-class precision/recall/F1 and the confusion matrix (see
    ``metrics.report``). With ``comm`` each rank evaluates its share of the rows and the sums are
    reduced over the ranks.
    """
    was_training = net.training
    net.eval()
    classify, classes = loss.classifies, net.out_features
    x, y = _dataset(x, y, net, classify)
    n_all = len(x)
    spread = (
        None if classify else _squares_about_mean(y)
    )  # before sharding: every rank holds every target
    if comm is not None and comm.size > 1:
        lo, hi = parallel.shard(0, n_all, comm.rank, comm.size)
        x, y = as_rows(x[lo:hi]), y[lo:hi]
    xp = get_array_module(y)
    forward = fast_path.forward_for(net) or net.forward
    mean_loss = fast_path.loss_for(loss, y) or (
        (lambda z, t: loss.forward(z, t, check=False)) if classify else loss.forward
    )
    loss_sum = xp.zeros((), dtype=np.float64)
    counts = xp.zeros((classes, classes), dtype=np.int64) if classify else 0
    for start, xb in _batches(x, batch_size, net):
        yb = y[start : start + len(xb)]
        out = forward(xb)
        loss_sum += mean_loss(out, yb) * len(xb)
        counts = counts + (
            confusion_counts(yb, out.argmax(axis=1), classes) if classify else _errors(out, yb)
        )
    net.train(was_training)
    total, counts = float(loss_sum), to_numpy(counts)
    if comm is not None and comm.size > 1:
        total, counts = parallel.sum_over_ranks(comm, total, counts)
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
    """Per output, the sum of squared deviations of the targets from their mean (R^2's
    denominator)."""
    t = _columns(y)
    return to_numpy(((t - t.mean(axis=0)) ** 2).sum(axis=0)) if len(t) else np.zeros(t.shape[1])


def _errors(out, y):
    """(2, outputs) float64: per output, the batch's sum of squared and of absolute errors."""
    d = out.astype(np.float64).reshape(len(out), -1) - _columns(y)
    xp = get_array_module(d)
    return xp.stack([(d * d).sum(axis=0), xp.abs(d).sum(axis=0)])


def _regression_report(sums, spread, n) -> dict:
    """mse, mae and r2 from the summed errors; an output with constant targets scores R^2 = 1 when
    it is predicted exactly, else 0 (scikit-learn's convention)."""
    if np.ndim(sums) == 0:  # no rows
        return {"mse": None, "mae": None, "r2": None}
    entries = max(n * sums.shape[1], 1)
    exact = sums[0] == 0
    r2 = np.where(
        spread > 0, 1 - sums[0] / np.where(spread > 0, spread, 1), np.where(exact, 1.0, 0.0)
    )
    return {
        "mse": float(sums[0].sum() / entries),
        "mae": float(sums[1].sum() / entries),
        "r2": float(r2.mean()),
    }
