"""The ``gpunet`` command: train, evaluate, predict, explain, serve, export, info. A thin face:
flags in, printing out; the work lives in the library (``commands.train.train`` for a training run,
``explain.record.explain_step`` for one step).

A user mistake (missing folder, bad flag value, unreadable model file) prints one line and exits
with status 2; nothing here is imported by the library.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shlex
import signal
import sys
from pathlib import Path

import numpy as np

from . import __version__, backend, callbacks, fast, parallel
from .backend import DeviceError
from .commands import flags, train as train_command
from .commands.flags import (
    buffer_mib,
    finite_float,
    non_negative_int,
    positive_float,
    positive_int,
    unit_interval,
)
from .commands.train import TrainConfig, load_data, train
from .data import DataError
from .data.datasets import default_data_dir, load_rows, load_table
from .data.pictures import image_size, load_image_file, load_images
from .data.rows import Pixels
from .explain import build as explain_build, record as explain_record, render as explain_render
from .layers import ACTIVATIONS, Standardize
from .losses import MAELoss, MSELoss, SoftmaxCrossEntropy
from .metrics import format_report
from .network import ModelFileError, load
from .optimizers import OPTIMIZERS, make_optimizer
from .predictions import prediction
from .training import Interrupted, classifies, evaluate, predict, predict_proba

USER_ERRORS = (
    DataError,
    DeviceError,
    ValueError,
    TypeError,
    KeyError,
    OSError,
    parallel.ParallelError,
)


class UserError(Exception):
    """A mistake the user can fix; shown as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The command line; train's settings are the fields of :class:`TrainConfig`."""
    p = Parser(
        prog="gpunet",
        description="Train and use feed-forward networks on MNIST or a table of your own "
        "(--data FILE.csv), on a GPU or the CPU.",
    )
    p.add_argument("--version", action="version", version=f"gpunet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train an MLP on MNIST (any dataset in MNIST's file format), or on a table "
        "of your own with --data FILE.csv|.npz",
    )
    flags.add_flags(
        t.add_argument_group("the run's settings (commands.train.TrainConfig)"), TrainConfig
    )
    run = t.add_argument_group("the run's folder")
    run.add_argument(
        "--out",
        default=None,
        help="output folder (default: runs/mnist; runs/NAME for --data NAME.csv)",
    )
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its "
        "checkpoint.npz (same flags; --epochs may be raised)",
    )
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    run.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=1,
        metavar="N",
        help="write checkpoint.npz every N epochs (default: 1; an interrupt always writes one)",
    )

    e = sub.add_parser(
        "evaluate",
        help="accuracy, per-class table and confusion matrix of a model on the MNIST "
        "test set (the t10k files only) or --data FILE (a regressor: mse, mae, r2)",
    )
    e.add_argument("model", help="model file written by gpunet train")
    e.add_argument(
        "--data-dir", help="folder holding the MNIST files (default: $GPUNET_DATA, else the cache)"
    )
    e.add_argument("--device", default=None, help="cpu, gpu or auto")
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument(
        "--data",
        metavar="FILE",
        help="a data file of your own (.npz: its x_test, y_test; .csv: every row) instead of "
        "--data-dir",
    )
    e.add_argument(
        "--label-column",
        default=None,
        metavar="NAME",
        help="the CSV column of the labels (default: the model's, else label)",
    )

    r = sub.add_parser(
        "predict",
        help="predict the digit in image files (PNG/JPEG, any size; MNIST models) or "
        ".npy arrays; a --data model: the class (or value) of each .csv/.npy row",
    )
    r.add_argument("model", help="model file written by gpunet train")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--device", default=None, help="cpu, gpu or auto")
    r.add_argument("--json", action="store_true", help="print JSON (with each file's warnings)")
    r.add_argument(
        "--save-inputs",
        metavar="DIR",
        help="write each input the model saw into DIR: a PNG "
        "per picture; for a --data model, the rows in the model's column order, DIR/inputs.csv",
    )
    r.add_argument(
        "--label-column",
        default=None,
        metavar="NAME",
        help="for a model trained with --data: the CSV "
        "column ignored if present (default: the model's, else label); columns are taken by name",
    )

    v = sub.add_parser(
        "serve", help="MNIST models only: serve a draw-a-digit page and a JSON API for a model"
    )
    v.add_argument("model", help="model file written by gpunet train")
    v.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: 127.0.0.1, this machine only)",
    )
    v.add_argument(
        "--port",
        type=non_negative_int,
        default=8000,
        help="port (default: 8000; 0 picks a free one)",
    )
    v.add_argument("--device", default=None, help="cpu, gpu or auto")
    v.add_argument(
        "--deadline",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="seconds a request may take to arrive whole, headers and body (then 408; default: 30)",
    )
    v.add_argument(
        "--max-connections",
        type=positive_int,
        default=4096,
        metavar="N",
        help="connections open at once; one more is answered 503 (default: 4096)",
    )
    v.add_argument(
        "--max-buffered",
        type=buffer_mib,
        default=512,
        metavar="MIB",
        help="MiB of unfinished requests held, all connections together; the connection whose "
        "bytes would pass it is answered 503 (default: 512; at least 16)",
    )

    o = sub.add_parser(
        "export", help="write a model as an ONNX file, for ONNX Runtime and other runtimes"
    )
    o.add_argument("model", help="model file written by gpunet train")
    o.add_argument("out", metavar="OUT.onnx", help="the ONNX file to write")
    o.add_argument(
        "--task",
        choices=("classifier", "regressor"),
        default=None,
        help="classifier: outputs probabilities and label; regressor: output (default: what the "
        "model file says it was trained for)",
    )
    o.add_argument(
        "--inputs",
        metavar="TEXT",
        help="what the inputs are, for the file's metadata (default: pixel / 255 for image models)",
    )

    c = sub.add_parser(
        "committee",
        help="join saved models into one model file whose outputs are the mean of theirs",
    )
    c.add_argument("models", nargs="+", metavar="MODEL", help="two or more model files")
    c.add_argument("--out", required=True, metavar="OUT.npz", help="the model file to write")

    x = sub.add_parser(
        "explain",
        help="one training step of a small network, formula by formula, in the course notes' "
        "notation (no flags: the classic 2-2-2 example worked by hand)",
    )
    x.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        metavar="N",
        help="layer sizes, inputs to outputs, weights drawn from --seed (default: the example's "
        "2-2-2, or those of --weights)",
    )
    x.add_argument(
        "--activation",
        nargs="+",
        choices=sorted(ACTIVATIONS),
        help="hidden activation, one or one per hidden layer (default: sigmoid)",
    )
    x.add_argument(
        "--output-activation",
        choices=explain_build.OUTPUT_ACTIVATIONS,
        help="an activation on the output layer, y^L = f(z^L), for --loss mse or mae (default: "
        "none, y^L = z^L)",
    )
    x.add_argument(
        "--batch-norm",
        action="store_true",
        help="a BatchNorm between each hidden Linear and its activation (training mode: a batch of "
        "at least 2 instances)",
    )
    x.add_argument(
        "--loss",
        choices=("ce", "mse", "mae"),
        default="ce",
        help="softmax cross-entropy, mean squared or absolute error (default: ce)",
    )
    x.add_argument("--optimizer", choices=EXPLAIN_OPTIMIZERS, default="sgd", help="default: sgd")
    x.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help="learning rate alpha (default: 0.5 for sgd and momentum, the optimizer's own for the "
        "others)",
    )
    x.add_argument(
        "--momentum",
        type=unit_interval,
        default=None,
        help="gamma for --optimizer momentum (default: 0.9)",
    )
    x.add_argument(
        "--input",
        type=finite_float,
        nargs="+",
        metavar="X",
        help="the instance x (several instances back to back make a batch; default with the "
        "example: 0.05 0.1)",
    )
    x.add_argument(
        "--target",
        type=finite_float,
        nargs="+",
        metavar="T",
        help="a class per instance, or the desired outputs y^D (default: the example's 0.01 0.99; "
        "with --model: the prediction)",
    )
    x.add_argument(
        "--seed", type=int, default=None, help="seed for the weights of --sizes (default: 0)"
    )
    x.add_argument(
        "--weights",
        metavar="FILE.json",
        help='starting weights: {"layers": [{"W": [[...], ...], "b": [...]}, ...]}, W (inputs, '
        "outputs)",
    )
    x.add_argument(
        "--model",
        help="a model file written by gpunet train (dropout off: the prediction's forward pass)",
    )
    x.add_argument(
        "--image",
        metavar="FILE",
        help="the input from an image or .npy file (as for gpunet predict)",
    )
    x.add_argument(
        "--json",
        action="store_true",
        help="print every quantity as JSON (schema gpunet-explain/2; NaN is null)",
    )
    x.add_argument(
        "--format",
        choices=("text", "markdown"),
        default="text",
        help="text, or markdown with LaTeX (default: text)",
    )
    x.add_argument(
        "--float64", action="store_true", help="compute in float64, for hand checks to many digits"
    )

    i = sub.add_parser("info", help="versions, the chosen device and why")
    i.add_argument(
        "--device", default=None, help="device to describe (default: $GPUNET_DEVICE, else auto)"
    )
    i.add_argument("--json", action="store_true", help="print JSON")
    return p


# --- helpers --------------------------------------------------------------------------------------
def _progress():
    """A bar over each epoch's batches with its running loss and accuracy on a terminal (tqdm's if
    installed, on standard error), ended by the epoch's line on standard output; only the lines
    elsewhere."""
    return callbacks.Progress(1 if sys.stderr.isatty() else 2, bar_file=sys.stderr)


# --- commands -------------------------------------------------------------------------------------
class StopOnSignal:
    """SIGINT and SIGTERM ask training to stop at the end of the current step (``stop()`` turns
    true); a second one aborts at once. Installed only while a training run is in progress."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, quiet: bool = False):
        self.signum, self._old, self.quiet = None, {}, quiet

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame):
        if self.signum is not None:  # the second signal: no more waiting
            raise Aborted(signum)
        self.signum = signum
        if not self.quiet:
            print(
                f"\ngpunet train: {signal.Signals(signum).name}: stopping at the end of this step "
                f"(again to abort at once)",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self):
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Aborted(Exception):
    """A second SIGINT or SIGTERM during training: stop now, without a new checkpoint."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def train_config(args) -> TrainConfig:
    """The settings of ``gpunet train``'s flags: those given, then ``--preset``'s, then
    TrainConfig's defaults (a preset's value fills in only where no flag was given)."""
    named = flags.given(args)
    config = TrainConfig(**{**train_command.PRESETS.get(named.get("preset"), {}), **named})
    loose = sorted("--" + name.replace("_", "-") for name in named if name.startswith("aug_"))
    if loose and not config.augment:  # they would change nothing: say so, not train undistorted
        raise UserError(
            f"{', '.join(loose)}: a setting of --augment, got no --augment (add --augment, or "
            f"--preset best, which turns it on)"
        )
    return config


def cmd_train(args):
    config = train_config(args)
    if args.out is None:  # a table's run is named after its file
        args.out = f"runs/{Path(config.data).stem}" if config.data else "runs/mnist"
    lead = parallel.launched_rank() == 0  # in an mpiexec job rank 0 alone speaks
    shown = [_progress()] if lead else []
    with StopOnSignal(quiet=not lead) as stop:
        try:
            result = train(
                config,
                args.out,
                callbacks=shown,
                resume=args.resume,
                overwrite=args.overwrite,
                checkpoint_every=args.checkpoint_every,
                interrupt=stop,
                log=lambda line: print(line, flush=True),
            )
        except Interrupted as exc:
            if not lead:
                return 128 + stop.signum
            again = " ".join(
                shlex.quote(a) for a in args.argv if a not in ("--resume", "--overwrite")
            )
            print(
                f"gpunet train: {signal.Signals(stop.signum).name}: stopped after {exc.epoch} "
                f"epochs and "
                f"{exc.step} steps; the state is in {exc.checkpoint}; continue with: gpunet "
                f"{again} --resume",
                file=sys.stderr,
                flush=True,
            )
            return 128 + stop.signum
    if result["stop_reason"] == "diverged":
        if not lead:
            return 3
        print(
            f"gpunet train: diverged: the loss became NaN or infinite in epoch "
            f"{result['diverged_epoch']}; "
            f"the last finished epoch's weights were saved; try a lower --lr (now {config.lr}) or "
            f"some "
            f"--weight-decay",
            file=sys.stderr,
        )
        return 3
    return 0


def _load_model(path, device):
    try:
        return load(path, device=device)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    except ModelFileError as exc:  # already one line naming the file and the field
        raise UserError(str(exc)) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read model file {path}: {exc}") from exc


def _is_table(net) -> bool:
    """A model trained on a table (--data): it scales its own features or knows their names."""
    return isinstance(net.layers[0], Standardize) or net.feature_names is not None


def cmd_evaluate(args):
    net = _load_model(args.model, args.device)
    if args.data is not None and args.data_dir is not None:
        raise UserError(
            f"--data: a file of your own replaces the MNIST folder, got --data {args.data} and "
            f"--data-dir"
        )
    label = args.label_column or net.label_column or "label"
    regress = not classifies(net)
    if args.data is not None:  # features as they are: a --data model scales them itself
        table = load_table(
            args.data,
            label,
            "regressor" if regress else "classifier",
            net.classes,
            net.feature_names,
        )
        if table["test"] is None and not args.data.lower().endswith(".csv"):
            raise UserError(
                f"--data: {args.data} holds no test set (x_test, y_test) to evaluate on"
            )
        x_test, y_test = table["test"] or table["train"]
    else:  # the t10k files alone: evaluation needs no training images
        ((x_test, y_test),) = load_data(args.data_dir, splits=("test",))
        x_test = Pixels(x_test)
    if x_test.shape[1] != net.in_features:
        raise UserError(
            f"{args.model}: the model expects {net.in_features} inputs, the data have "
            f"{x_test.shape[1]}"
        )
    rep = evaluate(
        net, MSELoss() if regress else SoftmaxCrossEntropy(), x_test, y_test, metrics=True
    )
    if net.classes is not None:
        rep["classes"] = net.classes
    if args.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(
        f"model {args.model} on {net.device}, {len(x_test)} test examples, loss {rep['loss']:.4f}"
    )
    if regress:
        print(f"mse {rep['mse']:.6g}  mae {rep['mae']:.6g}  r2 {rep['r2']:.4f}")
        return 0
    if net.classes is not None:
        print("classes: " + ", ".join(f"{k} = {c}" for k, c in enumerate(net.classes)))
    print(format_report(rep))
    return 0


def _reader(net, args):
    """How predict reads one file: image files for an image model, feature rows for a table's."""
    if _is_table(net):  # a --data model: feature rows, read as they are, columns by name
        label = args.label_column or net.label_column or "label"
        return lambda f: (load_rows(f, net.in_features, label, net.feature_names), [])
    size = image_size(
        net.in_features
    )  # from the model file: a model trained on other IDX sizes works too
    return lambda f: load_image_file(f, size)


def _answer(net, out, warnings) -> dict:
    """One row's prediction: a digit reader's {"digit", ...}, a table's {"class", ...} (its class
    names) or a regressor's {"value"}."""
    if not classifies(net):
        return {"value": [float(v) for v in out], "warnings": list(warnings)}
    if not _is_table(net):
        return prediction(out, warnings)
    return prediction(out, warnings, key="class", classes=net.classes)


def cmd_predict(args):
    net = _load_model(args.model, args.device)
    read, table = _reader(net, args), _is_table(net)
    size = None if table else image_size(net.in_features)
    names, batches, notes, rows = [], [], [], []
    for f in args.files:  # a file that cannot be read is named; the others are still predicted
        try:
            x, warnings = read(f)
        except (DataError, OSError, ValueError) as exc:
            message = " ".join(str(exc).split()) or type(exc).__name__
            rows.append({"file": f, "error": message if f in message else f"{f}: {message}"})
            print(f"gpunet predict: error: {rows[-1]['error']}", file=sys.stderr, flush=True)
            continue
        batches.append(x)
        names += [f] if len(x) == 1 else [f"{f}[{i}]" for i in range(len(x))]
        notes += [warnings] * len(x)
        rows += [None] * len(x)  # filled below, in the order of the files
    if batches:
        x = np.concatenate(batches)
        saved = [None] * len(x)
        if args.save_inputs:
            save = _save_rows if table else _save_inputs
            saved = save(args.save_inputs, names, x, size if size else net.feature_names)
        outs = iter(backend.to_numpy((predict_proba if classifies(net) else predict)(net, x)))
        done = iter(
            [
                {"file": n, **_answer(net, next(outs), w), **({"input": str(path)} if path else {})}
                for n, w, path in zip(names, notes, saved)
            ]
        )
        rows = [r if r is not None else next(done) for r in rows]
    failed = any("error" in r for r in rows)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 1 if failed else 0
    for r in rows:
        if "error" not in r:
            _print_answer(r)
    return 1 if failed else 0


def _print_answer(r: dict) -> None:
    if "value" in r:
        print(f"{r['file']}: {' '.join(f'{v:.6g}' for v in r['value'])}")
        return
    key = "class" if "class" in r else "digit"
    alts = ", ".join(f"{t[key]}: {t['probability']:.3f}" for t in r["top3"])
    print(f"{r['file']}: {r[key]}  ({alts})")
    for w in r["warnings"]:
        print(f"gpunet predict: warning: {r['file']}: {w}", file=sys.stderr)


def _save_rows(folder, names, x, columns):
    """A table model's inputs: every row of x (N, features), in the model's column order (the order
    the network reads, after reordering by name and dropping the label), into folder/inputs.csv with
    a `file` column first; the path, once per row."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "inputs.csv"
    columns = list(columns) if columns is not None else [f"x{j}" for j in range(x.shape[1])]
    with open(path, "w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["file", *columns])
        out.writerows([name, *(repr(float(v)) for v in row)] for name, row in zip(names, x))
    return [path] * len(x)


def _save_inputs(folder, names, x, size):
    """Write each row of x (N, rows*cols) as a grey PNG in `folder`, named after its file; the
    paths."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise UserError("--save-inputs: needs Pillow: pip install pillow (or gpunet[cli])") from exc
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths, used = [], set()
    for name, row in zip(names, x):
        file, _, index = name.partition("[")  # "digits.npy[3]" -> digits-3.png
        stem = Path(file).stem + (f"-{index.rstrip(']')}" if index else "")
        path, k = folder / f"{stem}.png", 1
        while path in used:  # two inputs of the same name (from different folders)
            k += 1
            path = folder / f"{stem}-{k}.png"
        used.add(path)
        Image.fromarray((np.clip(row.reshape(size), 0, 1) * 255 + 0.5).astype(np.uint8), "L").save(
            path
        )
        paths.append(path)
    return paths


def cmd_serve(args):
    from . import serve  # the web server is loaded only for this command

    net = _load_model(args.model, args.device)
    return serve.run(
        net,
        host=args.host,
        port=args.port,
        name=Path(args.model).name,
        deadline=args.deadline,
        max_connections=args.max_connections,
        max_buffered=args.max_buffered * 2**20,
    )


def cmd_export(args):
    from .onnx_export import to_onnx  # the onnx package is optional: loaded only for this command

    net = _load_model(args.model, "cpu")
    folder = Path(args.out).expanduser().resolve().parent
    if not folder.is_dir():
        raise UserError(f"OUT.onnx: the folder {folder} does not exist (make it first)")
    rows, cols = image_size(net.in_features)
    if args.inputs or _is_table(net):  # a model that scales its own features
        inputs = args.inputs or "the features as they are: the model's first layer scales them"
    else:
        inputs = (
            f"pixel / 255: float32 in [0, 1], a {rows}x{cols} grey image row by row, white digit "
            f"on black "
            f"as in MNIST"
            if rows > 1
            else None
        )
    try:
        model = to_onnx(net, args.out, task=args.task, inputs=inputs)
    except ImportError as exc:
        raise UserError(str(exc)) from None
    outputs = " and ".join(
        f"'{o.name}' [batch{', ' + str(net.out_features) if o.name != 'label' else ''}]"
        for o in model.graph.output
    )
    print(
        f"wrote {args.out}: ONNX opset 17, input 'input' [batch, {net.in_features}] float32, "
        f"outputs {outputs}"
    )
    return 0


def cmd_committee(args):
    from .committee import committee

    if len(args.models) < 2:
        raise UserError(f"MODEL: expected two or more model files, got {len(args.models)}")
    out = Path(args.out).expanduser().resolve()
    if not out.parent.is_dir():
        raise UserError(f"--out: the folder {out.parent} does not exist (make it first)")
    if any(Path(m).expanduser().resolve() == out for m in args.models):
        raise UserError(f"--out: expected a new file, got {args.out}, one of the members")
    nets = [_load_model(m, "cpu") for m in args.models]
    try:
        joined = committee(nets)
    except ValueError as exc:  # "nets[i]: ..." names a member: here by its file
        raise UserError(
            re.sub(r"nets\[(\d+)\]", lambda m: f"MODEL {args.models[int(m[1])]}", str(exc))
        ) from None
    joined.save(out)
    size = sum(int(p.data.size) for p in joined.parameters())
    print(
        f"wrote {args.out}: the mean of {len(nets)} models' outputs, {len(joined.layers)} layers, "
        f"{size:,} parameters (gpunet evaluate {args.out} tests it)"
    )
    return 0


def _flag(call, *args, **kwargs):
    """explain's helpers name their parameter first ("sizes: ..."); here that parameter is a
    flag."""
    try:
        return call(*args, **kwargs)
    except ValueError as exc:
        raise UserError(f"--{exc}") from exc


def cmd_explain(args):
    dtype = np.float64 if args.float64 else np.float32
    _explain_flags(args)
    example = not (
        args.model or args.weights or args.sizes
    )  # no network given: the default example
    net = _explain_network(args, dtype, example)
    x = _explain_input(args, net, example, dtype)
    if args.target is not None:
        target = args.target
    elif args.model:
        target = backend.to_numpy(predict(net, x)).astype(float)
    elif example:
        target = explain_build.EXAMPLE["target"]
    else:
        raise UserError(
            f"--target: expected a class or {net.out_features} desired outputs per instance, got "
            f"none"
        )
    y = _flag(explain_build.make_target, target, len(x), net.out_features, args.loss, dtype)
    opt = _explain_optimizer(args, net.parameters())
    loss = {"ce": SoftmaxCrossEntropy, "mse": MSELoss, "mae": MAELoss}[args.loss]()
    record = explain_record.explain_step(net, loss, opt, x, y)
    intro = explain_build.EXAMPLE["about"] if example else None
    if args.json:
        print(explain_render.render_json(record), end="")
    else:
        render = (
            explain_render.render_markdown
            if args.format == "markdown"
            else explain_render.render_text
        )
        print(render(record, intro=intro), end="")
    return 0


EXPLAIN_OPTIMIZERS = tuple(OPTIMIZERS)


def _explain_optimizer(args, params):
    """The optimizer of --optimizer: its own defaults, but SGD's and momentum's alpha is the
    example's (momentum 0 stays the momentum rule, so that its velocities are shown)."""
    kind, options = args.optimizer, {}
    if args.lr is not None or kind in ("sgd", "momentum"):
        options["lr"] = explain_build.EXAMPLE["lr"] if args.lr is None else args.lr
    if kind == "momentum":
        options["momentum"] = 0.9 if args.momentum is None else args.momentum
    return make_optimizer(kind, params, **options)


def _explain_flags(args):
    """The flags that do not go together, refused before any work."""
    if args.json and args.format != "text":
        raise UserError(f"--json: prints JSON, so --format {args.format} does not apply")
    if args.optimizer != "momentum" and args.momentum is not None:
        raise UserError("--momentum: only used with --optimizer momentum")
    if args.output_activation and args.loss == "ce":
        raise UserError(
            "--output-activation: expected --loss mse or mae (cross-entropy applies softmax to z^L "
            "itself), got --loss ce"
        )
    if args.model:
        given = [
            f
            for f in ("sizes", "weights", "activation", "output_activation", "seed", "batch_norm")
            if getattr(args, f) not in (None, False)
        ]
        if given:
            flag = given[0].replace("_", "-")
            raise UserError(f"--{flag}: not used with --model (the model file holds the network)")
    if args.seed is not None and (not args.sizes or args.weights):
        raise UserError(
            "--seed: draws the weights of --sizes, so it needs --sizes and no --weights"
        )


def _explain_network(args, dtype, example):
    """The network to explain: a model file, a weights file, sizes with seeded weights, or the
    example."""
    if args.model:
        net = _load_model(args.model, "cpu").eval()
        for p in net.parameters():  # before any optimizer gathers them
            p.data, p.grad = p.data.astype(dtype), np.zeros(p.data.shape, dtype)
        for layer in net.layers:  # BatchNorm's running statistics, in the same dtype
            for name in getattr(layer, "buffer_names", ()):
                setattr(layer, name, getattr(layer, name).astype(dtype))
        return net
    doc = explain_build.EXAMPLE["weights"] if example else None
    if args.weights:
        if not os.path.isfile(args.weights):
            raise UserError(f"--weights: file not found: {args.weights}")
        try:
            doc = json.loads(Path(args.weights).read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"--weights: {args.weights} is not valid JSON ({exc})") from None
    acts = args.activation or [explain_build.EXAMPLE["activation"]]
    return _flag(
        explain_build.build_network,
        args.sizes,
        doc,
        acts[0] if len(acts) == 1 else acts,
        args.seed or 0,
        dtype,
        args.output_activation,
        args.batch_norm,
    )


def _explain_input(args, net, example, dtype):
    """x (N, inputs) from --input, --image or the example."""
    if args.input is not None and args.image is not None:
        raise UserError("--input: expected the instance's values or --image FILE, got both")
    if args.image:
        x = load_images([args.image])
        if x.shape[1] != net.in_features:
            raise UserError(
                f"--image: expected {net.in_features} pixels (the network's inputs), got "
                f"{x.shape[1]}"
            )
    elif args.input is not None or example:
        x = np.array(explain_build.EXAMPLE["input"] if args.input is None else args.input)
    else:
        raise UserError("--input: expected the instance's values or --image FILE, got neither")
    if x.size % net.in_features:
        raise UserError(
            f"--input: expected {net.in_features} values (one per input of the network) or a "
            f"multiple, "
            f"got {x.size}"
        )
    return x.reshape(-1, net.in_features).astype(dtype)


def cmd_info(args):
    info = backend.describe_device(args.device)
    data_dir = default_data_dir()
    result = {
        "versions": train_command.versions(),
        "platform": platform.platform(),
        **info,
        "data_dir": str(data_dir),
        "fast_path": fast.status(),
        "cuda_graph": _cuda_graph_status(),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("gpunet " + __version__)
    print(
        "versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "gpunet")
    )
    if info["device"] == "gpu":
        print(
            f"device: gpu ({info['gpu_name']}, {info['gpu_memory_bytes'] / 2**30:.1f} GiB, "
            f"CUDA runtime {info['cuda_runtime']}, CuPy {info['cupy_version']})"
        )
    else:
        why = f"GPU not used: {info['reason']}" if info["reason"] else "requested"
        print(f"device: cpu, NumPy backend ({why})")
    fp = result["fast_path"]
    print(
        f"fast path: {'on' if fp['enabled'] else 'off (GPUNET_FAST=0)'}; CPU kernels "
        f"{fp['cpu_kernels']}; "
        f"CPU folded update {fp['cpu_blas_update']}; "
        f"CPU first layer skips zero input columns: {fp['cpu_zero_columns_skipped']}"
    )
    cg = result["cuda_graph"]
    state = "available" if cg["available"] else "not available: " + cg["why_not"]
    print(f"CUDA graph step: {state} (off by default: gpunet train --cuda-graph)")
    print(f"requested: {info['requested']} (set GPUNET_DEVICE or --device to change)")
    print(f"data folder: {data_dir} (set GPUNET_DATA or --data-dir to change)")
    return 0


def _cuda_graph_status() -> dict:
    """Whether ``gpunet train --cuda-graph`` can run here, and why not."""
    from .fast import graph

    why = graph.available()
    return {"available": why is None, "why_not": why}


COMMANDS = {
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "predict": cmd_predict,
    "explain": cmd_explain,
    "info": cmd_info,
    "serve": cmd_serve,
    "export": cmd_export,
    "committee": cmd_committee,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    where = f" (rank {parallel.launched_rank()})" if parallel.launched_size() > 1 else ""
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # output still buffered meets a closed pipe here, not at exit
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        print(f"gpunet: interrupted{where}", file=sys.stderr)
        return _end(130)
    except Aborted as exc:
        print(
            f"gpunet {args.command}{where}: {exc}: aborted at once; the last checkpoint is as it "
            f"was",
            file=sys.stderr,
        )
        return _end(128 + exc.signum)
    except (UserError, *USER_ERRORS) as exc:
        if os.environ.get("GPUNET_DEBUG") == "1":  # developers want the traceback
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gpunet {args.command}{where}: error: {message}", file=sys.stderr, flush=True)
        # An error every rank raised at once ends each rank normally: MPI_Abort would kill the
        # others while mpiexec still forwards their messages, and a run then ended with status 2 and
        # no message at all.
        return 2 if getattr(exc, "everywhere", False) else _end(2)


def _closed_pipe() -> int:
    """The reader of our output went away (``gpunet evaluate MODEL --json | head -3``): end quietly,
    with the status of a process that SIGPIPE ended (128 + 13), as ``head``'s other writers do.
    Later writes (Python's own flush at exit) go to /dev/null, so nothing is printed about it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (an embedding program's)
        pass
    return 128 + signal.SIGPIPE


def _end(code: int) -> int:
    """In an mpiexec job, a rank that stops on an error ends every rank (none waits on a
    collective)."""
    if parallel.launched_size() > 1:
        comm = parallel.world()
        sys.stderr.flush()
        comm.abort(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
