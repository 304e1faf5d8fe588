"""Callbacks: small objects that a training run calls at its fixed points (Keras' callbacks,
Lightning's ``Callback.state_dict``).

A callback defines any of these methods; the run (:class:`gpunet.training.Run`) calls those it has,
in the order of the list it was given:

- ``on_train_begin(run)``; ``on_epoch_begin(run, epoch)`` (``epoch`` 0-based, before the first
  batch);
- ``transform_batch(run, xb) -> xb``: the training inputs of each batch (after the gather, on the
  network's device; never the validation or test data). ``xb`` is the run's own buffer: writing into
  it is allowed, and the returned array is what the step trains on;
- ``on_batch_end(run, epoch, step, steps)`` (``step`` of ``steps`` done, 1-based; no device sync);
- ``on_epoch_end(run, record)``: ``record`` is the epoch's entry of ``run.history`` (validation
  included);
- ``on_interrupt(run)``: ``interrupt()`` stopped the run at a step boundary (mid-epoch);
- ``on_train_end(run)``; ``state_dict()`` / ``load_state_dict(state)``: the callback's own state,
  which a checkpoint carries: JSON data plus an optional ``"arrays"`` key, ``{name: [host NumPy
arrays]}``.

A callback stops the run by setting ``run.stop_training = True`` (honoured after the epoch's
``on_epoch_end`` calls) and says why in ``run.history.stop_reason``; :func:`stop` does both, and the
first reason given wins. The run's attributes (``net``, ``optimizer``, ``history``, ``epoch``,
``step``, ``epochs``, ``steps``) are the callbacks' to read.

The callbacks behind ``fit``'s keywords live here too: :class:`Schedule`, :class:`DivergenceGuard`,
:class:`EarlyStopping`, :class:`TargetLoss`, :class:`Checkpoint`, :class:`EpochEnd`,
:class:`BatchEnd` and :class:`Progress` (``fit(verbose=...)``); the training logs people read
elsewhere: :class:`CSVLogger` (one row per epoch) and :class:`TensorBoard` (event files for
TensorBoard, written by tensorboardX).
"""

from __future__ import annotations

import csv
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np

from . import checkpoint
from .backend import to_numpy

Run = Any
"""The run a hook is given: a :class:`gpunet.training.Run` (not imported: training imports this)."""

HOOKS = (
    "on_train_begin",
    "on_epoch_begin",
    "transform_batch",
    "on_batch_end",
    "on_epoch_end",
    "on_interrupt",
    "on_train_end",
)  # what the run calls; state_dict and load_state_dict are for its checkpoints


def stop(run: Run, reason: str) -> None:
    """Ask ``run`` to stop after this epoch, for ``reason`` (unless another callback already
    did)."""
    if not run.stop_training:
        run.stop_training, run.history.stop_reason = True, reason


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


class Callback:
    """A base with every hook doing nothing (subclassing it is optional: the run calls what
    exists)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Schedule(Callback):
    """``optimizer.lr = schedule(epoch)`` before each epoch (``schedule`` a function of the 0-based
    epoch, see :mod:`gpunet.schedules`); it holds no state of its own: the epoch is the run's."""

    def __init__(self, schedule: Callable[[int], float]) -> None:
        self.schedule = schedule

    def on_epoch_begin(self, run: Run, epoch: int) -> None:
        run.optimizer.lr = self.schedule(epoch)


class DivergenceGuard(Callback):
    """If an epoch's training loss is NaN or infinite, the weights and optimizer state of the last
    finished epoch (or of the run's start) are put back and the run stops (``stop_reason ==
    "diverged"``).

    It keeps copies of that state on the network's device (a GPU run copies no weights to the host
    for it). A checkpoint written at an epoch's end needs none of them (they are the run's own state
    then); one written mid-epoch carries them, so a resumed run falls back to the same.
    """

    def __init__(self) -> None:
        self.last_good: Any = None  # (weights, optimizer state) of the last good epoch, or None
        self._mid_epoch = False

    @staticmethod
    def _snapshot(run: Run) -> tuple[dict, dict]:
        return run.net.state_dict(host=False), run.optimizer.state_dict(host=False)

    def on_train_begin(self, run: Run) -> None:
        if self.last_good is None:
            self.last_good = self._snapshot(run)

    def on_epoch_begin(self, run: Run, epoch: int) -> None:
        self._mid_epoch = True

    def on_epoch_end(self, run: Run, record: dict) -> None:
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
        return {
            "mid_epoch": True,
            "names": list(weights),
            "optimizer": {k: v for k, v in opt.items() if k != "arrays"},
            "arrays": {
                "weights": [to_numpy(w) for w in weights.values()],
                **{f"optimizer.{k}": v for k, v in opt_arrays.items()},
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self._mid_epoch = state["mid_epoch"]
        if not self._mid_epoch:
            self.last_good = None  # taken from the restored run by on_train_begin
            return
        arrays = state["arrays"]
        opt = {
            **state["optimizer"],
            "arrays": {
                k[len("optimizer.") :]: v for k, v in arrays.items() if k.startswith("optimizer.")
            },
        }
        self.last_good = (dict(zip(state["names"], arrays["weights"])), opt)

    def fallback_states(self) -> list:
        """``[(label, weights, optimizer state)]`` this guard may put back: the run checks them on
        resume."""
        return [] if self.last_good is None else [("fallback", *self.last_good)]


class EarlyStopping(Callback):
    """Stop after ``patience`` epochs without a validation loss ``min_delta`` below the best, and
    put back the best epoch's weights when training ends (host copies kept meanwhile). A NaN
    validation loss never counts as the best."""

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = patience, min_delta
        self.best_loss: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict | None = None  # host copies of the best epoch's weights
        self.wait = 0

    def on_epoch_end(self, run: Run, record: dict) -> None:
        val_loss = record["val_loss"]
        if _finite(val_loss) and (
            self.best_loss is None or val_loss < self.best_loss - self.min_delta
        ):
            self.best_loss, self.best_epoch, self.best_state, self.wait = (
                val_loss,
                record["epoch"],
                run.net.state_dict(),
                0,
            )
        else:
            self.wait += 1
            if self.wait >= self.patience:
                stop(run, "early_stopping")
        run.history.best_epoch = self.best_epoch

    def on_train_end(self, run: Run) -> None:
        if self.best_state is not None:
            run.net.load_state_dict(self.best_state)

    def state_dict(self) -> dict:
        best: dict = self.best_state or {}
        return {
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "names": list(best),
            "arrays": {"best": list(best.values())},
        }

    def load_state_dict(self, state: dict) -> None:
        self.best_loss, self.best_epoch, self.wait = (
            state["best_loss"],
            state["best_epoch"],
            state["wait"],
        )
        self.best_state = dict(zip(state["names"], state["arrays"]["best"])) or None

    def fallback_states(self) -> list:
        """``[(label, weights, None)]``: the best weights, put back at the end (the run checks
        them)."""
        return [("best", self.best_state, None)] if self.best_state else []


class TargetLoss(Callback):
    """Stop once an epoch's training loss is below ``target``."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_epoch_end(self, run: Run, record: dict) -> None:
        if record["loss"] < self.target:
            stop(run, "target_loss")


class EpochEnd(Callback):
    """``fn(record)`` after each epoch (``fit(callback=fn)``)."""

    def __init__(self, fn: Callable[[dict], object]) -> None:
        self.fn = fn

    def on_epoch_end(self, run: Run, record: dict) -> None:
        self.fn(record)


class BatchEnd(Callback):
    """``fn(epoch, step, steps)`` after each batch (``fit(on_batch=fn)``)."""

    def __init__(self, fn: Callable[[int, int, int], object]) -> None:
        self.fn = fn

    def on_batch_end(self, run: Run, epoch: int, step: int, steps: int) -> None:
        self.fn(epoch, step, steps)


class Checkpoint(Callback):
    """The run's whole state to ``path`` every ``every`` epochs, when the run stops, and when it is
    interrupted mid-epoch (:mod:`gpunet.checkpoint`); ``restore(run)`` loads it back. Put it last:
    the state it writes is the one the other callbacks leave. ``info`` (JSON data) is stored for the
    caller.

    On a GPU the epoch-end checkpoint stays off the training loop: the weights and the optimizer's
    arrays are snapshotted on the device and copied in one non-blocking transfer
    (:meth:`gpunet.training.Run.state_dict` with ``wait=False``), and a writer thread waits for that
    copy and writes the file while the next epoch's steps are queued. The file is complete before
    the next checkpoint starts, before ``fit`` returns and before an interrupted run raises."""

    def __init__(self, path: str | os.PathLike, every: int = 1, info: dict | None = None) -> None:
        self.path, self.every, self.info = path, every, info
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def on_epoch_end(self, run: Run, record: dict) -> None:
        finished = run.stop_training or run.epoch >= run.epochs
        if finished or run.epoch % self.every == 0:
            self._save(run, finished, background=run.net.device != "cpu")

    def on_interrupt(self, run: Run) -> None:
        self._save(run, False, background=False)

    def on_train_end(self, run: Run) -> None:
        self.wait()

    def wait(self) -> None:
        """Until the file being written is written (re-raising the writer's error, if any)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _save(self, run: Run, finished: bool, background: bool) -> None:
        self.wait()
        # a collective call in a distributed run: every rank makes it; rank 0 writes
        record, arrays = run.state_dict(wait=False)
        if run.rank == 0:
            meta = {"run": self.info, "finished": finished, **record}
            if background:
                writer = threading.Thread(
                    target=self._write, args=(meta, arrays), name="gpunet-checkpoint"
                )
                writer.start()
                self._writer = writer
            else:
                checkpoint.save(self.path, meta, arrays())
        run.last_checkpoint = self.path

    def _write(self, meta: dict, arrays: Callable[[], dict]) -> None:
        try:
            checkpoint.save(self.path, meta, arrays())
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def restore(self, run: Run) -> dict:
        """Load the checkpoint into ``run`` (position, weights, optimizer, random states,
        callbacks)."""
        self.wait()
        record, arrays = checkpoint.load(self.path)
        run.load_state_dict(record, arrays, self.path)
        return record


def epoch_line(record: dict, epochs: int) -> str:
    """One epoch's record in one line: ``epoch   3/20  loss 0.1234  acc 0.9600  val_loss ...  lr
    0.05  1.72s`` (no accuracy for a regression run)."""
    line = f"epoch {record['epoch']:>3}/{epochs}  loss {record['loss']:.4f}"
    if record.get("accuracy") is not None:
        line += f"  acc {record['accuracy']:.4f}"
    if record.get("val_loss") is not None:
        line += f"  val_loss {record['val_loss']:.4f}"
        if record.get("val_accuracy") is not None:
            line += f"  val_acc {record['val_accuracy']:.4f}"
    return line + f"  lr {record['lr']:.4g}  {record['seconds']:.2f}s"


VERBOSE = {0: "silent", 1: "a progress bar", 2: "one line per epoch"}


def _tqdm_for(out: object) -> Any:
    """tqdm.auto's bar class (the notebook's widget in Jupyter, the text bar elsewhere) if tqdm is
    installed and ``out`` is a terminal or the run is in a Jupyter kernel; else None (the plain bar:
    a log file or a captured stream gets no cursor codes)."""
    ipython = sys.modules.get("IPython")  # imported already where a kernel runs this process
    shell = (
        ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    )
    in_kernel = hasattr(shell, "kernel")  # a Jupyter kernel's shell, not a terminal IPython's
    if not (in_kernel or (hasattr(out, "isatty") and out.isatty())):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm


def running_means(run: Run, step: int) -> dict:
    """The epoch's mean training loss (and accuracy for a classifier) over its first ``step`` steps,
    from the run's sums on the device (one wait for the device). This rank's rows only in a
    distributed run."""
    rows = max(run.seen(step), 1)
    means = {"loss": float(run.loss_sum) / rows}
    if run.loss.classifies:
        means["acc"] = int(run.correct) / rows
    return means


class Progress(Callback):
    """What ``fit(verbose=...)`` prints, as Keras does: 1 a progress bar over each epoch's batches
    with the epoch's running loss and accuracy (redrawn at most ``refresh`` times a second, each
    redraw one wait for the device), ended by the epoch's line; 2 only the line
    (:func:`epoch_line`). The bar is tqdm's (``tqdm.auto``: the notebook's widget in Jupyter) when
    tqdm is installed and ``bar_file`` is a terminal or the run is in a notebook, else a plain one.
    Rank 0 alone prints in a distributed run. Lines go to ``file`` (default: standard output), the
    bar to ``bar_file`` (default: ``file``)."""

    WIDTH = 30

    def __init__(
        self,
        verbose: int = 1,
        file: IO[str] | None = None,
        refresh: float = 10.0,
        bar_file: IO[str] | None = None,
    ) -> None:
        if verbose not in (1, 2):
            raise ValueError(
                f"verbose: expected one of {sorted(VERBOSE)} (0 {VERBOSE[0]}, 1 {VERBOSE[1]}, "
                f"2 {VERBOSE[2]}), got {verbose!r}"
            )
        self.verbose, self.file, self.bar_file, self.every = (
            int(verbose),
            file,
            bar_file,
            1.0 / refresh,
        )
        self._shown, self._bar = 0.0, None

    def _out(self, bar: bool = False) -> IO[str]:
        return (self.bar_file if bar else None) or self.file or sys.stdout

    def _write(self, run: Run, text: str, bar: bool = False) -> None:
        if run.rank == 0:
            out = self._out(bar)
            out.write(text)
            out.flush()

    def on_batch_end(self, run: Run, epoch: int, step: int, steps: int) -> None:
        now = time.monotonic()
        if self.verbose != 1 or run.rank != 0 or (step < steps and now - self._shown < self.every):
            return
        self._shown = now
        means = running_means(run, step)
        if self._bar is None:
            tqdm = _tqdm_for(self._out(bar=True))
            if tqdm is not None:
                self._bar = tqdm(
                    total=steps,
                    initial=0,
                    desc=f"epoch {epoch + 1}/{run.epochs}",
                    unit="batch",
                    leave=False,
                    file=self._out(bar=True),
                    mininterval=self.every,
                )
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()}, refresh=False)
            self._bar.update(step - self._bar.n)
            return
        done = self.WIDTH * step // steps
        bar = "=" * done + (">" if done < self.WIDTH else "") + "." * (self.WIDTH - done - 1)
        live = "".join(f"  {k} {v:.4f}" for k, v in means.items())
        self._write(
            run,
            f"\repoch {epoch + 1}/{run.epochs} [{bar[: self.WIDTH]}] {step}/{steps}{live}",
            bar=True,
        )

    def on_epoch_end(self, run: Run, record: dict) -> None:
        end = ""
        if self._bar is not None:  # tqdm's bar clears itself (leave=False)
            self._bar.close()
            self._bar = None
        elif self.verbose == 1:  # the plain bar gives way to the line
            end = "\r" + " " * (self.WIDTH + 70) + "\r"
            if self._out(bar=True) is not self._out():
                self._write(run, end, bar=True)
                end = ""
        self._write(run, end + epoch_line(record, run.epochs) + "\n")

    def on_interrupt(self, run: Run) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


# --- training logs: a CSV file and TensorBoard's event files --------------------------------------
def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: expected a whole number >= 0 (0: never), got {value!r}")
    return value


class CSVLogger(Callback):
    """One row per epoch in the CSV file ``path``: the columns of :data:`FIELDS` (an empty cell
    where the record has None, e.g. no validation), floats written in full (``repr``). At the run's
    start the file is written afresh from the run's history, so that a resumed run's file holds
    every finished epoch once (rows an interrupted run wrote past its last checkpoint are replaced).
    Rank 0 alone writes. Its state is the run's history, which the checkpoint carries: it keeps none
    of its own."""

    FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def _rows(self, mode: str, records: Iterable[dict]) -> None:
        with open(self.path, mode, newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if mode == "w":
                writer.writerow(self.FIELDS)
            writer.writerows(
                [("" if r.get(k) is None else r[k]) for k in self.FIELDS] for r in records
            )

    def on_train_begin(self, run: Run) -> None:
        if run.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._rows("w", run.history.epochs)

    def on_epoch_end(self, run: Run, record: dict) -> None:
        if run.rank == 0:
            self._rows("a", [record])


def summary_writer() -> type:
    """tensorboardX's ``SummaryWriter`` class; an ImportError that says how to install it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError as exc:
        raise ImportError(
            "TensorBoard logs need tensorboardX: pip install 'gpunet[tensorboard]' "
            f"(or pip install tensorboardX); {exc}"
        ) from exc
    return SummaryWriter


def probe_gradients(run: Run, rows: int) -> list[np.ndarray]:
    """Host copies of each parameter's gradient of the loss on the first ``rows`` training rows, by
    the core's formulas in eval mode (no dropout draws, BatchNorm's running statistics), with every
    ``param.grad`` put back: the run goes on as if this had not happened."""
    net, k = run.net, min(rows, run.n)
    params = net.parameters()
    kept = [p.grad.copy() for p in params]
    was_training = net.training
    net.eval()
    try:
        out = net.forward(run.x[:k])
        y = run.y[:k]
        run.loss.forward(out, y, check=False) if run.loss.classifies else run.loss.forward(out, y)
        net.backward(run.loss.backward())
        return [to_numpy(p.grad).copy() for p in params]
    finally:
        for p, g in zip(params, kept):
            p.grad[...] = g
        net.train(was_training)


class TensorBoard(Callback):
    """Event files for TensorBoard in ``log_dir`` (written by tensorboardX: ``pip install
    'gpunet[tensorboard]'``), every point on one step axis: the optimizer steps done, ``epoch *
    steps + step``.

    - every ``batch_every`` steps (0: never): ``batch/loss`` and ``batch/accuracy``, the means over
      the rows since the last point, and ``batch/lr`` (each point is one wait for the device);
    - after each epoch: ``epoch/loss``, ``epoch/accuracy``, ``epoch/val_loss``,
      ``epoch/val_accuracy``, ``epoch/lr`` and ``epoch/seconds``, those the record has;
    - every ``histogram_every`` epochs (0: never): ``weights/NAME`` of each parameter (names as in
      ``net.named_parameters()``) and ``gradients/NAME``, the gradient on a fixed probe batch, the
      first ``probe`` training rows (:func:`probe_gradients`: the same rows at every point, so that
      the histograms compare, where the step's own ``param.grad`` is the last batch's).

    A run that starts after step s (0, or where a resumed run stands) writes TensorBoard's purge
    mark at s + 1: the reader drops what an earlier run into the same folder logged past s, so that
    a resumed run continues the same curves without a duplicate step, even after a kill past the
    last checkpoint. Its own state (the sums at the last batch point) travels in the checkpoint, so
    that a run resumed mid-epoch writes the batch points an unbroken run writes. Rank 0 alone
    writes; in a distributed run the batch points are over rank 0's share of the batches.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike,
        batch_every: int = 100,
        histogram_every: int = 1,
        probe: int = 256,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.batch_every, self.histogram_every = (
            _count("batch_every", batch_every),
            _count("histogram_every", histogram_every),
        )
        if _count("probe", probe) < 1:
            raise ValueError(f"probe: expected at least 1 row, got {probe!r}")
        self.probe, self.writer = probe, None
        self._mark: tuple[int, float, int] | None = (
            None  # (step, loss sum, correct) at the last batch point
        )

    def on_train_begin(self, run: Run) -> None:
        if run.rank == 0:
            # the file's name carries the second it was made in; the nanoseconds after it keep two
            # runs made in one second apart (tensorboardX would reopen the first's file) and in the
            # reader's order
            self.writer = summary_writer()(
                str(self.log_dir),
                purge_step=run.epoch * run.steps + run.step + 1,
                filename_suffix=f".{time.time_ns():020d}",
            )

    def on_epoch_begin(self, run: Run, epoch: int) -> None:
        if run.step == 0:  # a run resumed mid-epoch keeps the mark its checkpoint carried
            self._mark = (0, 0.0, 0)

    def on_batch_end(self, run: Run, epoch: int, step: int, steps: int) -> None:
        at = epoch * steps + step
        if self.writer is None or not self.batch_every or at % self.batch_every:
            return
        loss_sum, correct = float(run.loss_sum), int(run.correct)
        before, sum_before, correct_before = self._mark
        rows = max(run.seen(step) - run.seen(before), 1)
        self.writer.add_scalar("batch/loss", (loss_sum - sum_before) / rows, at)
        if run.loss.classifies:
            self.writer.add_scalar("batch/accuracy", (correct - correct_before) / rows, at)
        self.writer.add_scalar("batch/lr", run.optimizer.lr, at)
        self._mark = (step, loss_sum, correct)

    def on_epoch_end(self, run: Run, record: dict) -> None:
        if self.writer is None:
            return
        at = run.epoch * run.steps
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"epoch/{key}", record[key], at)
        if self.histogram_every and record["epoch"] % self.histogram_every == 0:
            names = [name for name, _ in run.net.named_parameters()]
            for name, p in zip(names, run.net.parameters()):
                self.writer.add_histogram(f"weights/{name}", to_numpy(p.data), at)
            for name, g in zip(names, probe_gradients(run, self.probe)):
                self.writer.add_histogram(f"gradients/{name}", g, at)
        self.writer.flush()

    def on_train_end(self, run: Run) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    on_interrupt = (
        on_train_end  # the run ends there: the files are complete, the writer's thread ends
    )

    def state_dict(self) -> dict:
        return {"mark": None if self._mark is None else list(self._mark)}

    def load_state_dict(self, state: dict) -> None:
        mark = state.get("mark")
        self._mark = None if mark is None else (int(mark[0]), float(mark[1]), int(mark[2]))
