"""The ``gpunet`` command: train, evaluate, predict, serve, info.

A user mistake (missing folder, bad flag value, unreadable model file) prints one line and exits with
status 2; nothing here is imported by the library.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from . import __version__, backend, kernels, plots
from .backend import DeviceError
from .data import DataError, default_data_dir, load_mnist, split_validation
from .images import image_size, load_image_file
from .layers import ACTIVATIONS, INITIALIZERS
from .losses import SoftmaxCrossEntropy
from .metrics import format_report
from .network import load, mlp
from .optimizers import SGD, Momentum
from .pixels import Pixels
from .schedules import SCHEDULES, make_schedule
from .training import evaluate, fit, predict, predict_proba

USER_ERRORS = (DataError, DeviceError, ValueError, TypeError, KeyError, OSError)


class UserError(Exception):
    """A mistake the user can fix; shown as one line."""


# --- argument types: each names the expected and the actual value --------------------------------------
def _number(kind, test, expected):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0 and np.isfinite(v), "a positive number")
non_negative_float = _number(float, lambda v: v >= 0 and np.isfinite(v), "a number >= 0")
unit_interval = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def batch_size_arg(text):
    if text in ("full", "all"):
        return None
    return positive_int(text)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="gpunet", description="Train and use feed-forward networks on MNIST, on a GPU or the CPU.")
    p.add_argument("--version", action="version", version=f"gpunet {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    t = sub.add_parser("train", help="train an MLP on MNIST (or any dataset in MNIST's file format)")
    t.add_argument("--data-dir", help="folder holding the four MNIST files (default: $GPUNET_DATA, else ~/.cache/gpunet/mnist)")
    t.add_argument("--download", action="store_true", help="download missing files into --data-dir (the default cache folder downloads anyway)")
    t.add_argument("--hidden", type=positive_int, nargs="*", default=[512, 512], metavar="N", help="hidden layer sizes (default: 512 512)")
    t.add_argument("--activation", nargs="+", choices=sorted(ACTIVATIONS), default=["relu"], help="one activation, or one per hidden layer (default: relu)")
    t.add_argument("--epochs", type=positive_int, default=20, help="maximum number of epochs (default: 20)")
    t.add_argument("--batch-size", type=batch_size_arg, default=128, help="examples per step: 1 = online, 'full' = full batch (default: 128)")
    t.add_argument("--lr", type=positive_float, default=0.05, help="learning rate (default: 0.05)")
    t.add_argument("--momentum", type=unit_interval, default=0.9, help="momentum gamma, 0 for plain SGD (default: 0.9)")
    t.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    t.add_argument("--weight-decay", type=non_negative_float, default=0.0, help="L2 weight decay (default: 0)")
    t.add_argument("--dropout", type=unit_interval, default=0.2, help="dropout after each hidden layer (default: 0.2)")
    t.add_argument("--init", choices=INITIALIZERS, default=None, help="weight initialiser (default: he for relu, xavier otherwise)")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="learning-rate schedule (default: cosine)")
    t.add_argument("--step-size", type=positive_int, default=5, help="epochs per decay for --schedule step (default: 5)")
    t.add_argument("--val-size", type=non_negative_int, default=5000, help="training examples held out for validation (default: 5000)")
    t.add_argument("--patience", type=positive_int, default=None, help="stop after N epochs without val-loss improvement, keep the best weights")
    t.add_argument("--target-loss", type=positive_float, default=None, help="stop once the epoch's training loss is below this")
    t.add_argument("--seed", type=int, default=0, help="seed for weights and shuffling (default: 0)")
    t.add_argument("--device", default=None, help="cpu, gpu (cuda) or auto (default: $GPUNET_DEVICE, else auto)")
    t.add_argument("--out", default="runs/mnist", help="output folder (default: runs/mnist)")
    t.add_argument("--no-plots", action="store_true", help="skip the pictures")

    e = sub.add_parser("evaluate", help="accuracy, per-class table and confusion matrix of a model on the test set")
    e.add_argument("model", help="model file written by gpunet train")
    e.add_argument("--data-dir", help="folder holding the MNIST files (default: $GPUNET_DATA, else the cache)")
    e.add_argument("--device", default=None, help="cpu, gpu or auto")
    e.add_argument("--json", action="store_true", help="print JSON")

    r = sub.add_parser("predict", help="predict the digit in image files (PNG/JPEG, any size) or .npy arrays")
    r.add_argument("model", help="model file written by gpunet train")
    r.add_argument("files", nargs="+", metavar="FILE")
    r.add_argument("--device", default=None, help="cpu, gpu or auto")
    r.add_argument("--json", action="store_true", help="print JSON (with each file's warnings)")
    r.add_argument("--save-inputs", metavar="DIR", help="write each input the model saw as a PNG into DIR")

    v = sub.add_parser("serve", help="serve a draw-a-digit page and a JSON API for a model")
    v.add_argument("model", help="model file written by gpunet train")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    v.add_argument("--port", type=non_negative_int, default=8000, help="port (default: 8000; 0 picks a free one)")
    v.add_argument("--device", default=None, help="cpu, gpu or auto")

    i = sub.add_parser("info", help="versions, the chosen device and why")
    i.add_argument("--device", default=None, help="device to describe (default: $GPUNET_DEVICE, else auto)")
    i.add_argument("--json", action="store_true", help="print JSON")
    return p


# --- helpers ---------------------------------------------------------------------------------------------
def _version(dist):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    out = {"gpunet": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for dist in ("cupy-cuda12x", "cupy-cuda13x", "cupy", "numba", "tqdm", "matplotlib", "pillow"):
        v = _version(dist)
        if v:
            out[dist] = v
    return out


def _load_data(args, need_train=True):
    folder = Path(args.data_dir).expanduser() if args.data_dir else None
    if folder is not None and not folder.is_dir() and not getattr(args, "download", False):
        raise UserError(f"data folder not found: {folder} (pass --download to fetch MNIST into it)")
    explicit = folder is not None or bool(os.environ.get("GPUNET_DATA"))
    download = getattr(args, "download", False) or not explicit
    # the images stay bytes (a quarter of float32's memory), read as float32 batch by batch: see pixels.py
    return load_mnist(folder, download=download, dtype=np.uint8)


def _progress(total_epochs):
    """A tqdm bar over each epoch's batches on a terminal, else one line per epoch."""
    use_bar = sys.stderr.isatty()
    tqdm = None
    if use_bar:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
    state = {"bar": None}

    def on_batch(epoch, done, total):
        if tqdm is None:
            return
        if state["bar"] is None:
            state["bar"] = tqdm(total=total, desc=f"epoch {epoch + 1}/{total_epochs}", unit="batch", leave=False)
        state["bar"].update(1)

    def on_epoch(rec):
        if state["bar"] is not None:
            state["bar"].close()
            state["bar"] = None
        line = (f"epoch {rec['epoch']:>3}/{total_epochs}  loss {rec['loss']:.4f}  acc {rec['accuracy']:.4f}")
        if rec["val_loss"] is not None:
            line += f"  val_loss {rec['val_loss']:.4f}  val_acc {rec['val_accuracy']:.4f}"
        line += f"  lr {rec['lr']:.4g}  {rec['seconds']:.2f}s"
        print(line, flush=True)

    return on_batch, on_epoch


# --- commands --------------------------------------------------------------------------------------------
def cmd_train(args):
    device = backend.resolve_device(args.device)
    hidden = list(args.hidden)
    acts = args.activation[0] if len(args.activation) == 1 else args.activation
    if not isinstance(acts, str) and len(acts) != len(hidden):
        raise UserError(f"--activation: expected 1 or {len(hidden)} names (one per hidden layer), got {len(acts)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = _load_data(args)
    if args.val_size >= len(x_train):
        raise UserError(f"--val-size: expected fewer than {len(x_train)} (the training set), got {args.val_size}")
    (x_tr, y_tr), (x_val, y_val) = split_validation(x_train, y_train, args.val_size)
    x_tr, x_val, x_test_px = Pixels(x_tr), Pixels(x_val), Pixels(x_test)
    if args.patience and not len(x_val):
        raise UserError("--patience: needs a validation set, but --val-size is 0")
    classes = int(max(y_train.max(), y_test.max())) + 1
    net = mlp([x_train.shape[1], *hidden, classes], activation=acts, init=args.init, dropout=args.dropout,
              seed=args.seed, device=device)
    if args.momentum > 0:
        opt = Momentum(net.parameters(), lr=args.lr, momentum=args.momentum, nesterov=args.nesterov,
                       weight_decay=args.weight_decay)
    else:
        if args.nesterov:
            raise UserError("--nesterov: needs --momentum > 0")
        opt = SGD(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    schedule = make_schedule(args.schedule, args.lr, args.epochs,
                             **({"step_size": args.step_size, "gamma": 0.1} if args.schedule == "step" else {}))
    loss = SoftmaxCrossEntropy()
    info = backend.describe_device(device)
    note = f" ({info['gpu_name']})" if device == "gpu" else (f" (GPU not used: {info['reason']})" if info["reason"] else "")
    print(f"gpunet {__version__}: training {' -> '.join(map(str, [x_train.shape[1], *hidden, classes]))} "
          f"on {device}{note}; {len(x_tr)} train / {len(x_val)} validation / {len(x_test)} test examples", flush=True)
    on_batch, on_epoch = _progress(args.epochs)
    history = fit(net, loss, opt, x_tr, y_tr, epochs=args.epochs, batch_size=args.batch_size,
                  validation=(x_val, y_val) if len(x_val) else None, seed=args.seed, target_loss=args.target_loss,
                  patience=args.patience, schedule=schedule, callback=on_epoch, on_batch=on_batch)
    test = evaluate(net, loss, x_test_px, y_test, metrics=True)
    wall = time.perf_counter() - started
    model_path = out / "model.npz"
    net.save(model_path)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "command")}
    result = {
        "config": config, "device": device, "backend": info["backend"], "device_info": info, "versions": versions(),
        "history": history.epochs, "stop_reason": history.stop_reason, "best_epoch": history.best_epoch,
        "test_loss": test["loss"], "test_accuracy": test["accuracy"],
        "per_class": {k: test[k] for k in ("precision", "recall", "f1", "support")},
        "macro": {k: test["macro_" + k] for k in ("precision", "recall", "f1")},
        "confusion_matrix": test["confusion_matrix"], "wall_seconds": wall,
        "mean_epoch_seconds": float(np.mean([h["seconds"] for h in history.epochs])), "model": str(model_path),
    }
    pictures = []
    if args.no_plots:
        pass
    elif not plots.available():
        print("note: matplotlib is not installed, so no pictures were drawn (pip install 'gpunet[cli]')")
    else:
        plots.curves(history.epochs, out / "curves.png")
        plots.confusion(test["confusion_matrix"], out / "confusion.png")
        pred = backend.to_numpy(predict(net, x_test_px))
        plots.misclassified(x_test, y_test, pred, out / "misclassified.png")
        pictures = ["curves.png", "confusion.png", "misclassified.png"]
    result["pictures"] = pictures
    with open(out / "metrics.json", "w") as f:
        json.dump(result, f, indent=2)
    print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}); stopped by {history.stop_reason}; "
          f"{result['mean_epoch_seconds']:.2f}s per epoch, {wall:.1f}s in all")
    print(f"wrote {model_path}, {out / 'metrics.json'}" + "".join(f", {out / p}" for p in pictures))
    return 0


def _load_model(path, device):
    try:
        return load(path, device=device)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot read model file {path}: {exc}") from exc


def cmd_evaluate(args):
    net = _load_model(args.model, args.device)
    _, (x_test, y_test) = _load_data(args)
    if x_test.shape[1] != net.in_features:
        raise UserError(f"{args.model}: the model expects {net.in_features} inputs, the data have {x_test.shape[1]}")
    rep = evaluate(net, SoftmaxCrossEntropy(), Pixels(x_test), y_test, metrics=True)
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"model {args.model} on {net.device}, {len(x_test)} test examples, loss {rep['loss']:.4f}")
        print(format_report(rep))
    return 0


def cmd_predict(args):
    net = _load_model(args.model, args.device)
    size = image_size(net.in_features)  # from the model file: a model trained on other IDX sizes works too
    names, batches, notes = [], [], []
    for f in args.files:
        x, warnings = load_image_file(f, size)
        batches.append(x)
        names += [f] if len(x) == 1 else [f"{f}[{i}]" for i in range(len(x))]
        notes += [warnings] * len(x)
    x = np.concatenate(batches).astype(net.dtype, copy=False)
    saved = _save_inputs(args.save_inputs, names, x, size) if args.save_inputs else [None] * len(x)
    probs = backend.to_numpy(predict_proba(net, x))
    rows = []
    for n, p, w, path in zip(names, probs, notes, saved):
        top = [{"digit": int(k), "probability": round(float(p[k]), 6)} for k in np.argsort(-p, kind="stable")[:3]]
        rows.append({"file": n, "digit": int(p.argmax()), "top3": top,
                     "probabilities": [round(float(v), 6) for v in p], "warnings": w,
                     **({"input": str(path)} if path else {})})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        alts = ", ".join(f"{t['digit']}: {t['probability']:.3f}" for t in r["top3"])
        print(f"{r['file']}: {r['digit']}  ({alts})")
        for w in r["warnings"]:
            print(f"gpunet predict: warning: {r['file']}: {w}", file=sys.stderr)
    return 0


def _save_inputs(folder, names, x, size):
    """Write each row of x (N, rows*cols) as a grey PNG in `folder`, named after its file; the paths."""
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
        Image.fromarray((np.clip(row.reshape(size), 0, 1) * 255 + 0.5).astype(np.uint8), "L").save(path)
        paths.append(path)
    return paths


def cmd_serve(args):
    from . import serve  # the web server is loaded only for this command

    net = _load_model(args.model, args.device)
    return serve.run(net, host=args.host, port=args.port, name=Path(args.model).name)


def cmd_info(args):
    info = backend.describe_device(args.device)
    data_dir = default_data_dir()
    result = {"versions": versions(), "platform": platform.platform(), **info, "data_dir": str(data_dir),
              "fused_kernels": kernels.ENABLED, "cpu_kernels": kernels.cpu_kernels_status()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print("gpunet " + __version__)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if k != "gpunet"))
    if info["device"] == "gpu":
        print(f"device: gpu ({info['gpu_name']}, {info['gpu_memory_bytes'] / 2**30:.1f} GiB, "
              f"CUDA runtime {info['cuda_runtime']}, CuPy {info['cupy_version']})")
    else:
        why = f"GPU not used: {info['reason']}" if info["reason"] else "requested"
        print(f"device: cpu, NumPy backend ({why})")
    print(f"CPU elementwise kernels: {result['cpu_kernels']}")
    print(f"requested: {info['requested']} (set GPUNET_DEVICE or --device to change)")
    print(f"data folder: {data_dir} (set GPUNET_DATA or --data-dir to change)")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "info": cmd_info,
            "serve": cmd_serve}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("gpunet: interrupted", file=sys.stderr)
        return 130
    except (UserError, *USER_ERRORS) as exc:
        if os.environ.get("GPUNET_DEBUG") == "1":  # developers want the traceback
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"gpunet {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
