"""Callbacks: small objects that a training run calls at its fixed points (Keras' callbacks, Lightning's
``Callback.state_dict``).

A callback defines any of these methods; the run (:class:`gpunet.training.Run`) calls those it has, in
the order of the list it was given:

- ``on_train_begin(run)``; ``on_epoch_begin(run, epoch)`` (``epoch`` 0-based, before the first batch);
- ``transform_batch(run, xb) -> xb``: the training inputs of each batch (after the gather, on the
  network's device; never the validation or test data). ``xb`` is the run's own buffer: writing into it
  is allowed, and the returned array is what the step trains on;
- ``on_batch_end(run, epoch, step, steps)`` (``step`` of ``steps`` done, 1-based; no device sync);
- ``on_epoch_end(run, record)``: ``record`` is the epoch's entry of ``run.history`` (validation included);
- ``on_interrupt(run)``: ``interrupt()`` stopped the run at a step boundary (mid-epoch);
- ``on_train_end(run)``; ``state_dict()`` / ``load_state_dict(state)``: the callback's own state, which a
  checkpoint carries: JSON data plus an optional ``"arrays"`` key, ``{name: [host NumPy arrays]}``.

A callback stops the run by setting ``run.stop_training = True`` (honoured after the epoch's
``on_epoch_end`` calls) and says why in ``run.history.stop_reason``; :func:`stop` does both, and the
first reason given wins. The run's attributes (``net``, ``optimizer``, ``history``, ``epoch``,
``step``, ``epochs``, ``steps``) are the callbacks' to read.

The callbacks behind ``fit``'s keywords live here too: :class:`Schedule`, :class:`DivergenceGuard`,
:class:`EarlyStopping`, :class:`TargetLoss`, :class:`Checkpoint`, :class:`EpochEnd`, :class:`BatchEnd` and
:class:`Progress` (``fit(verbose=...)``).
"""
from __future__ import annotations

import math
import sys
import time

from . import checkpoint
from .backend import to_numpy

HOOKS = ("on_train_begin", "on_epoch_begin", "transform_batch", "on_batch_end", "on_epoch_end", "on_interrupt",
         "on_train_end")  # what the run calls; state_dict and load_state_dict are for its checkpoints


def stop(run, reason: str) -> None:
    """Ask ``run`` to stop after this epoch, for ``reason`` (unless another callback already did)."""
    if not run.stop_training:
        run.stop_training, run.history.stop_reason = True, reason


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


class Callback:
    """A base with every hook doing nothing (subclassing it is optional: the run calls what exists)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Schedule(Callback):
    """``optimizer.lr = schedule(epoch)`` before each epoch (``schedule`` a function of the 0-based epoch,
    see :mod:`gpunet.schedules`); it holds no state of its own: the epoch is the run's."""

    def __init__(self, schedule):
        self.schedule = schedule

    def on_epoch_begin(self, run, epoch):
        run.optimizer.lr = self.schedule(epoch)


class DivergenceGuard(Callback):
    """If an epoch's training loss is NaN or infinite, the weights and optimizer state of the last finished
    epoch (or of the run's start) are put back and the run stops (``stop_reason == "diverged"``).

    It keeps copies of that state on the network's device (a GPU run copies no weights to the host for it).
    A checkpoint written at an epoch's end needs none of them (they are the run's own state then); one
    written mid-epoch carries them, so a resumed run falls back to the same.
    """

    def __init__(self):
        self.last_good, self._mid_epoch = None, False

    @staticmethod
    def _snapshot(run):
        return run.net.state_dict(host=False), run.optimizer.state_dict(host=False)

    def on_train_begin(self, run):
        if self.last_good is None:
            self.last_good = self._snapshot(run)

    def on_epoch_begin(self, run, epoch):
        self._mid_epoch = True

    def on_epoch_end(self, run, record):
        self._mid_epoch = False
        if _finite(record["loss"]):
            self.last_good = self._snapshot(run)
            return
        run.net.load_state_dict(self.last_good[0])
        run.optimizer.load_state_dict(self.last_good[1])
        run.history.diverged_epoch = record["epoch"]
        stop(run, "diverged")

    def state_dict(self) -> dict:
        if not self._mid_epoch:
            return {"mid_epoch": False}
        weights, opt = self.last_good
        opt_arrays = {k: [to_numpy(a) for a in v] for k, v in opt.get("arrays", {}).items()}
        return {"mid_epoch": True, "names": list(weights), "optimizer": {k: v for k, v in opt.items() if k != "arrays"},
                "arrays": {"weights": [to_numpy(w) for w in weights.values()],
                           **{f"optimizer.{k}": v for k, v in opt_arrays.items()}}}

    def load_state_dict(self, state: dict) -> None:
        self._mid_epoch = state["mid_epoch"]
        if not self._mid_epoch:
            self.last_good = None  # taken from the restored run by on_train_begin
            return
        arrays = state["arrays"]
        opt = {**state["optimizer"], "arrays": {k[len("optimizer."):]: v for k, v in arrays.items()
                                                 if k.startswith("optimizer.")}}
        self.last_good = (dict(zip(state["names"], arrays["weights"])), opt)


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a validation loss ``min_delta`` below the best, and put back
    the best epoch's weights when training ends (host copies kept meanwhile). A NaN validation loss never
    counts as the best."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience, self.min_delta = patience, min_delta
        self.best_loss, self.best_epoch, self.best_state, self.wait = None, None, None, 0

    def on_epoch_end(self, run, record):
        val_loss = record["val_loss"]
        if _finite(val_loss) and (self.best_loss is None or val_loss < self.best_loss - self.min_delta):
            self.best_loss, self.best_epoch, self.best_state, self.wait = val_loss, record["epoch"], run.net.state_dict(), 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                stop(run, "early_stopping")
        run.history.best_epoch = self.best_epoch

    def on_train_end(self, run):
        if self.best_state is not None:
            run.net.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        best = self.best_state or {}
        return {"best_loss": self.best_loss, "best_epoch": self.best_epoch, "wait": self.wait,
                "names": list(best), "arrays": {"best": list(best.values())}}

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.wait = state["best_loss"], state["best_epoch"], state["wait"]
        self.best_state = dict(zip(state["names"], state["arrays"]["best"])) or None


class TargetLoss(Callback):
    """Stop once an epoch's training loss is below ``target``."""

    def __init__(self, target: float):
        self.target = target

    def on_epoch_end(self, run, record):
        if record["loss"] < self.target:
            stop(run, "target_loss")


class EpochEnd(Callback):
    """``fn(record)`` after each epoch (``fit(callback=fn)``)."""

    def __init__(self, fn):
        self.fn = fn

    def on_epoch_end(self, run, record):
        self.fn(record)


class BatchEnd(Callback):
    """``fn(epoch, step, steps)`` after each batch (``fit(on_batch=fn)``)."""

    def __init__(self, fn):
        self.fn = fn

    def on_batch_end(self, run, epoch, step, steps):
        self.fn(epoch, step, steps)


class Checkpoint(Callback):
    """The run's whole state to ``path`` every ``every`` epochs, when the run stops, and when it is
    interrupted mid-epoch (:mod:`gpunet.checkpoint`); ``restore(run)`` loads it back. Put it last: the state
    it writes is the one the other callbacks leave. ``info`` (JSON data) is stored for the caller."""

    def __init__(self, path, every: int = 1, info: dict | None = None):
        self.path, self.every, self.info = path, every, info

    def on_epoch_end(self, run, record):
        finished = run.stop_training or run.epoch >= run.epochs
        if finished or run.epoch % self.every == 0:
            self._save(run, finished)

    def on_interrupt(self, run):
        self._save(run, False)

    def _save(self, run, finished: bool):
        record, arrays = run.state_dict()  # a collective call in a distributed run: every rank makes it
        if run.rank == 0:
            checkpoint.save(self.path, {"run": self.info, "finished": finished, **record}, arrays)
        run.last_checkpoint = self.path

    def restore(self, run) -> dict:
        """Load the checkpoint into ``run`` (position, weights, optimizer, random states, callbacks)."""
        record, arrays = checkpoint.load(self.path)
        run.load_state_dict(record, arrays, self.path)
        return record


def epoch_line(record: dict, epochs: int) -> str:
    """One epoch's record in one line: ``epoch   3/20  loss 0.1234  acc 0.9600  val_loss ...  lr 0.05  1.72s``
    (no accuracy for a regression run)."""
    line = f"epoch {record['epoch']:>3}/{epochs}  loss {record['loss']:.4f}"
    if record.get("accuracy") is not None:
        line += f"  acc {record['accuracy']:.4f}"
    if record.get("val_loss") is not None:
        line += f"  val_loss {record['val_loss']:.4f}"
        if record.get("val_accuracy") is not None:
            line += f"  val_acc {record['val_accuracy']:.4f}"
    return line + f"  lr {record['lr']:.4g}  {record['seconds']:.2f}s"


VERBOSE = {0: "silent", 1: "a progress bar", 2: "one line per epoch"}


class Progress(Callback):
    """What ``fit(verbose=...)`` prints, as Keras does: 1 a progress bar over each epoch's batches (redrawn
    at most ``refresh`` times a second) ended by the epoch's line, 2 only the line (:func:`epoch_line`).
    Rank 0 alone prints in a distributed run. Written to ``file`` (default: standard output)."""

    WIDTH = 30

    def __init__(self, verbose: int = 1, file=None, refresh: float = 10.0):
        if verbose not in (1, 2):
            raise ValueError(f"verbose: expected one of {sorted(VERBOSE)} (0 {VERBOSE[0]}, 1 {VERBOSE[1]}, "
                             f"2 {VERBOSE[2]}), got {verbose!r}")
        self.verbose, self.file, self.every = int(verbose), file, 1.0 / refresh
        self._shown = 0.0

    def _write(self, run, text: str) -> None:
        if run.rank == 0:
            out = self.file or sys.stdout
            out.write(text)
            out.flush()

    def on_batch_end(self, run, epoch, step, steps):
        now = time.monotonic()
        if self.verbose != 1 or (step < steps and now - self._shown < self.every):
            return
        self._shown = now
        done = self.WIDTH * step // steps
        bar = "=" * done + (">" if done < self.WIDTH else "") + "." * (self.WIDTH - done - 1)
        self._write(run, f"\repoch {epoch + 1}/{run.epochs} [{bar[:self.WIDTH]}] {step}/{steps}")

    def on_epoch_end(self, run, record):
        end = "\r" + " " * (self.WIDTH + 40) + "\r" if self.verbose == 1 else ""  # the bar gives way to the line
        self._write(run, end + epoch_line(record, run.epochs) + "\n")
