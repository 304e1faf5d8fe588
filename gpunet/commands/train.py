"""The training run behind ``gpunet train``: MNIST (or any IDX dataset, or a ``.npz``/CSV file of
one's own) in, model, metrics and pictures out.

``train(config, out)`` does the work: load the data (as bytes, read as float32 batch by batch), hold
out a validation set, build the MLP and its optimizer and schedule, ``fit``, evaluate on the test
set, and write ``model.npz``, ``metrics.json`` and the pictures into ``out``. The command line only
turns flags into a :class:`TrainConfig` and prints; API users can call ``train`` directly.
"""

from __future__ import annotations

import json
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from .. import __version__, backend, checkpoint, fast, files, parallel, plots
from ..augment import DEFAULTS as AUGMENT_DEFAULTS, Augment
from ..callbacks import CSVLogger, TensorBoard, summary_writer
from ..data import DataError
from ..data.datasets import load_mnist, load_table, split_validation
from ..data.rows import Pixels
from ..layers import ACTIVATIONS, INITIALIZERS, Standardize
from ..losses import MSELoss, SoftmaxCrossEntropy
from ..network import Sequential, mlp
from ..optimizers import SETTINGS, make_optimizer
from ..schedules import SCHEDULES, make_schedule
from ..training import evaluate, fit, predict
from .flags import (
    batch_size_arg,
    non_negative_float,
    positive_float,
    positive_int,
    setting as S,
    unit_interval,
    val_size_arg,
)


class ConfigError(ValueError):
    """A training setting that cannot work (names the setting, the expected and the given value)."""


class ResourceError(ValueError):
    """The run ran out of memory; the message names the batch size, the memory asked for and the
    cure."""


CHECKPOINT = "checkpoint.npz"
# settings a resumed run may change: how long, where, and what is drawn; every other one changes the
# run
OUTPUTS = (
    "model.npz",
    "metrics.json",
    CHECKPOINT,
    "curves.png",
    "confusion.png",
    "misclassified.png",
)
MAY_CHANGE_ON_RESUME = {"epochs", "device", "data_dir", "download", "plots", "log_dir"}
# each optimizer's own settings, with their defaults: PyTorch's, except the learning rates (0.05,
# the measured recipe, for SGD and momentum; 1e-3, Keras' and PyTorch's Adam's, for the adaptive
# rules)
OPTIMIZER_SETTINGS = {
    "sgd": {"lr": 0.05, "weight_decay": 0.0},
    "momentum": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    "adam": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0},
    "adamw": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 1e-2},
    "rmsprop": {"lr": 1e-3, "alpha": 0.99, "eps": 1e-8, "momentum": 0.0, "weight_decay": 0.0},
}


# ``gpunet train --preset NAME``: defaults for a whole recipe (flags given explicitly still win).
# "best" was chosen on the 5,000-image validation split, never the test set: milder distortions than
# the first try and no dropout, 120 epochs (README.md, "Augmentation and the best preset",
# lists what was tried).
PRESETS = {
    "best": {
        "hidden": [1024, 1024],
        "dropout": 0.0,
        "epochs": 120,
        "batch_size": 128,
        "optimizer": "momentum",
        "lr": 0.05,
        "momentum": 0.9,
        "schedule": "cosine",
        "augment": True,
        "aug_rotation": 8.0,
        "aug_scale": 0.08,
        "aug_shear": 0.0,
        "aug_shift": 2.0,
        "aug_sigma": 4.0,
        "aug_alpha": 25.0,
    },
}


SCALES = ("standard", "minmax", "none")  # --scale: the features of a --data file


@dataclass
class TrainConfig:
    """Every setting of a training run; the defaults are the recipe measured in README.md.

    Each field is also ``gpunet train``'s flag of that name (``--field-name``): its type, help and
    choices are the field's metadata (:func:`gpunet.commands.flags.setting`), which
    :func:`gpunet.commands.flags.add_flags` reads. An optimizer setting left at None takes the
    chosen optimizer's default (:data:`OPTIMIZER_SETTINGS`); one that is not the optimizer's own
    stays None (``check`` refuses it if given)."""

    data_dir: str | None = S(
        None,
        "folder holding the four MNIST files (default: $GPUNET_DATA, else ~/.cache/gpunet/mnist)",
    )
    download: bool = S(
        False,
        "download missing files into --data-dir (the default cache folder downloads anyway)",
    )
    data: str | None = S(
        None,
        "a data set of your own instead of --data-dir: FILE.npz (x_train, y_train, optionally"
        " x_test, y_test) or FILE.csv (a header row; --label-column holds the class)",
        metavar="FILE",
    )
    label_column: str = S(
        "label",
        "the CSV column of the labels: numbers 0..C-1, other numbers or words (encoded as "
        "their sorted list, kept in the model), or a regression target (default: {default})",
        metavar="NAME",
    )
    task: str = S(
        "auto",
        "--data: what the label column is; auto = regressor when its numbers are not all "
        "whole, else classifier (default: {default}; a whole-numbered target such as a count "
        "needs --task regressor)",
        choices=("auto", "classifier", "regressor"),
    )  # data.encode_labels
    scale: str = S(
        "standard",
        "how --data features are scaled, from the training rows; the model file keeps it "
        "(default: {default}: mean 0, std 1)",
        choices=SCALES,
    )
    hidden: list = S(
        help="hidden layer sizes (default: {default})",
        factory=lambda: [512, 512],
        type=positive_int,
        nargs="*",
        metavar="N",
    )
    activation: list = S(
        help="one activation, or one per hidden layer (default: {default})",
        factory=lambda: ["relu"],
        nargs="+",
        choices=sorted(ACTIVATIONS),
    )
    epochs: int = S(20, "maximum number of epochs (default: {default})", type=positive_int)
    batch_size: int | None = S(
        128,
        "examples per step: 1 = online, 'full' = full batch (default: {default})",
        type=batch_size_arg,
    )
    optimizer: str = S(
        "momentum",
        "update rule (default: {default})",
        choices=tuple(OPTIMIZER_SETTINGS),
    )
    lr: float | None = S(
        None,
        "learning rate (default: 0.05 for sgd and momentum, 0.001 for adam, adamw and rmsprop)",
        type=positive_float,
    )
    momentum: float | None = S(
        None,
        "momentum gamma for --optimizer momentum, 0 for plain SGD (default: 0.9); rmsprop's "
        "momentum (default: 0)",
        type=unit_interval,
    )
    nesterov: bool = S(False, "Nesterov momentum (--optimizer momentum)")
    weight_decay: float | None = S(
        None,
        "L2 weight decay; adamw's decoupled decay (default: 0; adamw 0.01)",
        type=non_negative_float,
    )
    beta1: float | None = S(
        None,
        "adam/adamw: first-moment decay (default: 0.9)",
        type=unit_interval,
    )
    beta2: float | None = S(
        None,
        "adam/adamw: second-moment decay (default: 0.999)",
        type=unit_interval,
    )
    eps: float | None = S(
        None,
        "adam/adamw/rmsprop: added to the denominator (default: 1e-8)",
        type=non_negative_float,
    )
    alpha: float | None = S(
        None,
        "rmsprop: decay of the squared-gradient average (default: 0.99)",
        type=unit_interval,
    )
    centered: bool = S(False, "rmsprop: divide by the gradient's variance, not its mean square")
    batch_norm: bool = S(
        False,
        "batch normalisation after each hidden Linear, before its activation",
    )
    dropout: float = S(
        0.2,
        "dropout after each hidden layer (default: {default})",
        type=unit_interval,
    )
    init: str | None = S(
        None,
        "weight initialiser (default: he for relu, xavier otherwise)",
        choices=INITIALIZERS,
    )
    schedule: str = S("cosine", "learning-rate schedule (default: {default})", choices=SCHEDULES)
    step_size: int = S(
        5,
        "epochs per decay for --schedule step (default: {default})",
        type=positive_int,
    )
    val_size: int | float | None = S(
        None,
        "training examples held out for validation: a count, or a fraction of the rows below "
        "1 (default: 5000 for MNIST, 0.2 for --data)",
        type=val_size_arg,
    )  # None: resolved in __post_init__
    patience: int | None = S(
        None,
        "stop after N epochs without val-loss improvement, keep the best weights",
        type=positive_int,
    )
    target_loss: float | None = S(
        None,
        "stop once the epoch's training loss is below this",
        type=positive_float,
    )
    seed: int = S(0, "seed for weights and shuffling (default: {default})", type=int)
    device: str | None = S(None, "cpu, gpu (cuda) or auto (default: $GPUNET_DEVICE, else auto)")
    plots: bool = S(True, "skip the pictures", name="--no-plots")
    cuda_graph: bool = S(
        False,
        "run each training step as one CUDA graph replay (a GPU; off by default until measured: "
        "`gpunet info` says whether it is available)",
    )  # fast/graph.py
    log_dir: str | None = S(
        None,
        "training logs: DIR/epochs.csv (one row per epoch) and TensorBoard event files (with "
        "tensorboardX: pip install 'gpunet[tensorboard]'); a resumed run continues them",
        metavar="DIR",
    )  # callbacks.CSVLogger, TensorBoard
    preset: str | None = S(
        None,
        "a named recipe: best = 784-1024-1024-10 with distortions, 120 epochs (README: "
        "Augmentation); flags given too win",
        choices=tuple(PRESETS),
    )
    augment: bool = S(
        False,
        "distort every training image afresh each epoch: random affine + elastic (the --aug-*"
        " flags)",
    )
    aug_rotation: float = S(
        AUGMENT_DEFAULTS["rotation"],
        "--augment: rotation uniform in [-DEG, DEG] degrees (default: {default})",
        type=non_negative_float,
        metavar="DEG",
    )
    aug_scale: float = S(
        AUGMENT_DEFAULTS["scale"],
        "--augment: scale factor uniform in [1-S, 1+S] (default: {default})",
        type=unit_interval,
        metavar="S",
    )
    aug_shear: float = S(
        AUGMENT_DEFAULTS["shear"],
        "--augment: shear uniform in [-DEG, DEG] degrees (default: {default})",
        type=non_negative_float,
        metavar="DEG",
    )
    aug_shift: float = S(
        AUGMENT_DEFAULTS["shift"],
        "--augment: shift uniform in [-PX, PX] pixels per axis (default: {default})",
        type=non_negative_float,
        metavar="PX",
    )
    aug_sigma: float = S(
        AUGMENT_DEFAULTS["sigma"],
        "--augment: elastic field's Gaussian smoothing, in pixels (default: {default})",
        type=positive_float,
    )
    aug_alpha: float = S(
        AUGMENT_DEFAULTS["alpha"],
        "--augment: elastic field's strength, in pixels; 0 = affine only (default: {default})",
        type=non_negative_float,
    )

    def __post_init__(self):
        if self.val_size is None:
            self.val_size = 0.2 if self.data is not None else 5000
        for name, value in OPTIMIZER_SETTINGS.get(self.optimizer, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)


def versions() -> dict:
    """Versions of Python, NumPy, gpunet and the optional libraries that are installed."""
    out = {"gpunet": __version__, "python": platform.python_version(), "numpy": np.__version__}
    for dist in ("cupy-cuda12x", "cupy-cuda13x", "cupy", "numba", "tqdm", "matplotlib", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def data_folder(data_dir, download: bool) -> Path | None:
    """The folder named by ``data_dir`` (None if none was), refused if it is missing and not to be
    made."""
    folder = Path(data_dir).expanduser() if data_dir else None
    if folder is not None and not folder.is_dir() and not download:
        raise DataError(f"data folder not found: {folder} (pass --download to fetch MNIST into it)")
    return folder


def load_data(data_dir=None, download=False, splits=("train", "test")):
    """MNIST as uint8 images and int64 labels: ``((x_train, y_train), (x_test, y_test))``.

    ``data_dir`` (else ``GPUNET_DATA``, else the cache folder); a folder that was not named
    explicitly is downloaded into when files are missing, a named one only with ``download``.
    """
    folder = data_folder(data_dir, download)
    explicit = folder is not None or bool(os.environ.get("GPUNET_DATA"))
    # the images stay bytes (a quarter of float32's memory), read as float32 batch by batch: see
    # data/rows.py
    return load_mnist(folder, download=download or not explicit, dtype=np.uint8, splits=splits)


def augmentation(config: TrainConfig, features: int = 784):
    """The :class:`gpunet.augment.Augment` that ``config`` asks for (None without ``--augment``),
    for square images of ``features`` pixels, seeded by ``--seed``."""
    if not config.augment:
        return None
    side = int(round(features**0.5))
    if side * side != features:
        raise ConfigError(
            f"--augment: expected square images (a square number of features), got {features} "
            f"features"
        )
    try:
        return Augment(
            rotation=config.aug_rotation,
            scale=config.aug_scale,
            shear=config.aug_shear,
            shift=config.aug_shift,
            sigma=config.aug_sigma,
            alpha=config.aug_alpha,
            shape=(side, side),
            seed=config.seed,
        )
    except (
        ValueError
    ) as exc:  # Augment names its argument: rotation, scale, ... are --aug-rotation, ...
        raise ConfigError(f"--aug-{exc}") from None


def check(config: TrainConfig) -> None:
    """Refuse settings that cannot work together, before any data is read."""
    if len(config.activation) not in (1, len(config.hidden)):
        raise ConfigError(
            f"--activation: expected 1 or {len(config.hidden)} names (one per hidden layer), "
            f"got {len(config.activation)}"
        )
    if config.optimizer not in OPTIMIZER_SETTINGS:
        raise ConfigError(
            f"--optimizer: expected one of {', '.join(OPTIMIZER_SETTINGS)}, got "
            f"{config.optimizer!r}"
        )
    own = OPTIMIZER_SETTINGS[config.optimizer]
    for name in ("momentum", "beta1", "beta2", "eps", "alpha"):
        if name not in own and getattr(config, name) is not None:
            users = " or ".join(k for k, v in OPTIMIZER_SETTINGS.items() if name in v)
            raise ConfigError(
                f"--{name}: a setting of --optimizer {users}, got --optimizer {config.optimizer}"
            )
    for flag, user in (("nesterov", "momentum"), ("centered", "rmsprop")):
        if getattr(config, flag) and config.optimizer != user:
            raise ConfigError(
                f"--{flag}: a setting of --optimizer {user}, got --optimizer {config.optimizer}"
            )
    if config.nesterov and config.momentum == 0:
        raise ConfigError("--nesterov: needs --momentum > 0, got --momentum 0")
    if config.patience and not config.val_size:
        raise ConfigError("--patience: needs a validation set, but --val-size is 0")
    if config.scale not in SCALES:
        raise ConfigError(f"--scale: expected one of {', '.join(SCALES)}, got {config.scale!r}")
    if config.data is not None and (config.data_dir is not None or config.download):
        raise ConfigError(
            f"--data: a file of your own replaces the MNIST folder, got --data {config.data} "
            f"together with {'--data-dir' if config.data_dir is not None else '--download'}"
        )
    if config.data is not None and not Path(config.data).is_file():
        raise DataError(f"data file not found: {config.data}")
    if config.preset is not None and config.preset not in PRESETS:
        raise ConfigError(f"--preset: expected one of {', '.join(PRESETS)}, got {config.preset!r}")
    augmentation(config)
    data_folder(config.data_dir, config.download)


def scaling(name: str, x) -> Standardize | None:
    """The fixed scaling ``name`` asks for, from the training features ``x`` (N, F): "standard"
    (mean 0, standard deviation 1 per feature), "minmax" (into [0, 1]) or "none" (None)."""
    if name == "none":
        return None
    if name == "standard":
        return Standardize(x.mean(axis=0), x.std(axis=0))
    return Standardize(x.min(axis=0), x.max(axis=0) - x.min(axis=0))


def build(config: TrainConfig, in_features: int, classes: int, device: str):
    """The network, optimizer and schedule that ``config`` describes (checked by :func:`check`)."""
    hidden = list(config.hidden)
    acts = config.activation[0] if len(config.activation) == 1 else list(config.activation)
    net = mlp(
        [in_features, *hidden, classes],
        activation=acts,
        init=config.init,
        dropout=config.dropout,
        seed=config.seed,
        device=device,
        batch_norm=config.batch_norm,
    )
    name, settings = optimizer_choice(config)
    opt = make_optimizer(name, net.parameters(), **settings)
    extra = {"step_size": config.step_size, "gamma": 0.1} if config.schedule == "step" else {}
    return net, opt, make_schedule(config.schedule, config.lr, config.epochs, **extra)


def optimizer_choice(config: TrainConfig) -> tuple[str, dict]:
    """The rule and settings ``config`` asks for, for :func:`gpunet.optimizers.make_optimizer`:
    those of its optimizer (:data:`OPTIMIZER_SETTINGS`); ``momentum`` with --momentum 0 is plain
    SGD."""
    name = "sgd" if config.optimizer == "momentum" and config.momentum == 0 else config.optimizer
    own = SETTINGS.get(name, ())
    return name, {k: getattr(config, k) for k in own}


def write_json(path, obj) -> None:
    """Strict JSON (a non-finite number becomes null), written atomically."""
    files.atomic_write(
        path, (json.dumps(files.strict(obj), indent=2, allow_nan=False) + "\n").encode()
    )


def fingerprint(x_train, y_train, x_test) -> dict:
    """Enough of the data to tell whether a resumed run reads the same set (cheap: no full hash)."""
    return {
        "train": list(x_train.shape),
        "test": list(x_test.shape),
        "labels_crc32": zlib.crc32(np.ascontiguousarray(y_train).tobytes()),
        "images_crc32": zlib.crc32(np.ascontiguousarray(x_train[:1000]).tobytes()),
    }


def check_out_folder(
    out: Path, config: TrainConfig, resume: bool, overwrite: bool, lead: bool = True
) -> dict | None:
    """Before anything is loaded: the checkpoint's record when resuming (checked against
    ``config``), or None for a new run; refuses to mix a new run into a folder that holds
    another."""
    ckpt = out / CHECKPOINT
    for name in (
        OUTPUTS if lead else ()
    ):  # half files of a killed write (files.atomic_write names them so)
        for stale in out.glob(f".{name}.*.part"):
            stale.unlink(missing_ok=True)
    if resume:
        if not ckpt.is_file():
            raise ConfigError(
                f"--resume: no checkpoint in {out} (expected {ckpt}); start without --resume"
            )
        meta = checkpoint.read_meta(ckpt)
        saved = (meta.get("run") or {}).get("config")
        if not isinstance(saved, dict):
            raise checkpoint.CheckpointError(
                f"{ckpt} was not written by gpunet train (no run settings in it)"
            )
        given = asdict(config)
        check_run_record(ckpt, meta["run"], given)
        # a setting the checkpoint's gpunet did not have yet (--optimizer, --batch-norm, ...) had
        # its default
        saved = asdict(TrainConfig(**{k: v for k, v in saved.items() if k in given}))
        for key in given:
            if key not in MAY_CHANGE_ON_RESUME and saved.get(key) != given[key]:
                flag = "--" + key.replace("_", "-")
                raise ConfigError(
                    f"{flag}: the checkpoint in {out} was trained with {saved.get(key)!r}, "
                    f"got {given[key]!r}; resume with the same value, or start a new run"
                )
        if config.epochs < meta["epoch"]:
            raise ConfigError(
                f"--epochs: the checkpoint has already finished {meta['epoch']} epochs, "
                f"got {config.epochs}"
            )
        if meta["finished"] and (
            meta["stop_reason"] != "max_epochs" or config.epochs == meta["epoch"]
        ):
            why = (
                f"stopped by {meta['stop_reason']}"
                if meta["stop_reason"] != "max_epochs"
                else f"finished all {meta['epoch']} epochs; raise --epochs to train longer"
            )
            raise ConfigError(f"--resume: the run in {out} is complete ({why})")
        return meta
    held = [name for name in ("metrics.json", CHECKPOINT) if (out / name).exists()]
    if held and not overwrite:
        raise ConfigError(
            f"--out: {out} already holds a run ({', '.join(held)}); pass --resume to continue "
            f"it or --overwrite to replace it"
        )
    if overwrite and lead and (out / CHECKPOINT).exists():
        (out / CHECKPOINT).unlink()  # a new run must not resume into the old one's state
    return None


def check_run_record(ckpt, run: dict, given: dict) -> None:
    """The run record gpunet train stores in its checkpoints: ``config`` (settings this gpunet has;
    one it lacks would be a newer gpunet's, whose run this one cannot continue as it was meant) and
    ``data``."""
    unknown = [
        f"run.{k if k.isidentifier() else repr(k)}" for k in run if k not in ("config", "data")
    ]
    unknown += [
        f"run.config.{k if k.isidentifier() else repr(k)}" for k in run["config"] if k not in given
    ]
    if unknown:
        raise checkpoint.CheckpointError(
            f"{ckpt}: {unknown[0]}: unexpected field (expected only run.config "
            f"and run.data, the settings of this gpunet's train)"
        )


def _out_of_memory(exc, config, ckpt) -> ResourceError:
    asked = " ".join(str(exc).split()) or type(exc).__name__
    kept = (
        f"the last checkpoint is kept in {ckpt}"
        if ckpt.exists()
        else "no checkpoint was written yet"
    )
    return ResourceError(
        f"out of memory with --batch-size {config.batch_size or 'full'} ({asked}); try a smaller "
        f"--batch-size or a smaller network; {kept}"
    )


def train(
    config: TrainConfig,
    out,
    *,
    on_epoch=None,
    on_batch=None,
    log=print,
    resume=False,
    overwrite=False,
    checkpoint_every: int = 1,
    interrupt=None,
    callbacks=(),
) -> dict:
    """Run the recipe; write model.npz, metrics.json and the pictures into ``out``; return the
    metrics.

    ``out/checkpoint.npz`` is written every ``checkpoint_every`` epochs; ``resume=True`` continues
    from it (settings checked against it); ``interrupt()`` stops the run at a step boundary
    (``training.Interrupted`` is raised after the checkpoint is written). A diverged run returns
    with ``stop_reason == "diverged"``. ``callbacks`` go to ``fit`` (before the logs of
    ``config.log_dir``).
    """
    check(config)
    comm = _join_ranks(config, out, resume, overwrite)
    lead = comm is None or comm.rank == 0  # rank 0 alone prints, draws and writes
    log = log if lead else (lambda line: None)
    device = backend.resolve_device(config.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    meta = check_out_folder(out, config, resume, overwrite, lead)
    started = time.perf_counter()
    *sets, data, table = _load(config, out, meta, comm, log)  # sets: train, validation, test
    trainee, why_not, info = _build_and_announce(config, device, sets, table, meta, comm, log)
    hooks = {
        "callback": on_epoch,
        "on_batch": on_batch,
        "checkpoint_every": checkpoint_every,
        "interrupt": interrupt,
        "callbacks": callbacks,
    }
    history = _fit(config, trainee, sets[:2], ckpt, meta, data, comm, log, hooks)
    net, loss = trainee[:2]
    model = net if table is None else _table_model(net, table, config)
    # a --data model is tested as it is saved: raw features in, labels (or targets in their units)
    # out
    raw_test = sets[2] if table is None else table["raw_test"]
    test = evaluate(model, loss, raw_test[0], raw_test[1], metrics=True, comm=comm)
    result = _metrics(
        config, device, info, why_not, history, test, ckpt, time.perf_counter() - started
    )
    _write_outputs(config, out, lead, log, comm, result, model, table, history, test, net, sets[2])
    return result


def _build_and_announce(config: TrainConfig, device: str, sets, table, meta, comm, log):
    """``((net, loss, optimizer, schedule), why_not, info)`` for the loaded ``sets`` (train,
    validation, test): what ``config`` builds (:func:`build`; the outputs and loss from the
    labels, :func:`_outputs`), why the fused step does not run (None when it does) and the
    device's description; the run's first line is logged."""
    (x_tr, y_tr), (x_val, y_val), (x_test, y_test) = sets
    classes, loss = _outputs(table, y_tr, y_val, y_test)
    net, opt, schedule = build(config, x_tr.shape[1], classes, device)
    # a BatchNorm network or RMSprop runs the core's step
    why_not = fast.why_not(net, loss, opt, y_tr)
    if config.cuda_graph:
        _check_cuda_graph(net, why_not, config)
    info = backend.describe_device(device)
    sizes, counts = [x_tr.shape[1], *config.hidden, classes], (len(x_tr), len(x_val), len(x_test))
    log(_start_line(config, device, info, sizes, counts, meta, comm, why_not))
    return (net, loss, opt, schedule), why_not, info


def _fit(config: TrainConfig, trainee, sets, ckpt: Path, meta, data, comm, log, hooks: dict):
    """``fit`` ``trainee`` (net, loss, optimizer, schedule) on ``sets`` (train, validation) as
    ``config`` says, checkpointing into ``ckpt`` (resumed when ``meta``, the checkpoint's record,
    is given; ``data``, the data's fingerprint, is kept in it). ``hooks``: train's ``callback``
    (its on_epoch), ``on_batch``, ``checkpoint_every``, ``interrupt`` and ``callbacks`` (the logs
    of ``config.log_dir`` come after those). Running out of memory raises a
    :class:`ResourceError` that names the cure."""
    net, loss, opt, schedule = trainee
    (x_tr, y_tr), (x_val, y_val) = sets
    try:
        return fit(
            net,
            loss,
            opt,
            x_tr,
            y_tr,
            epochs=config.epochs,
            batch_size=config.batch_size,
            validation=(x_val, y_val) if len(x_val) else None,
            seed=config.seed,
            target_loss=config.target_loss,
            patience=config.patience,
            schedule=schedule,
            callback=hooks["callback"],
            on_batch=hooks["on_batch"],
            checkpoint_path=ckpt,
            resume=meta is not None,
            checkpoint_every=hooks["checkpoint_every"],
            interrupt=hooks["interrupt"],
            cuda_graph=config.cuda_graph,
            run_info={"config": asdict(config), "data": data},
            comm=comm,
            augment=augmentation(config, x_tr.shape[1]),
            callbacks=[*hooks["callbacks"], *training_logs(config.log_dir, log)],
        )
    except Exception as exc:
        # MemoryError, or CuPy's OutOfMemoryError (tested by name: CuPy may not be installed)
        if not isinstance(exc, MemoryError) and type(exc).__name__ != "OutOfMemoryError":
            raise
        raise _out_of_memory(exc, config, ckpt) from exc


def _write_outputs(
    config, out: Path, lead, log, comm, result, model, table, history, test, net, test_set
) -> None:
    """Complete ``result`` (metrics.json's content: a --data table's task, classes and feature
    names, the pictures drawn, the process count) and write the run's files into ``out``
    (``model`` as model.npz, metrics.json: rank 0 only); the last lines are logged. ``net``, the
    trained network, predicts the ``test_set`` (features, labels) for misclassified.png."""
    if table is not None:
        result.update(
            task=table["task"], classes=table["classes"], feature_names=table["feature_names"]
        )
    if lead:
        model.save(result["model"])
    result["pictures"] = _pictures(config, lead, log, out, history, test, net, *test_set)
    if comm is not None:
        result["processes"] = comm.size
    if lead:
        write_json(out / "metrics.json", result)
    _last_lines(log, result, out)


def _outputs(table, y_tr, y_val, y_test):
    """``(outputs, loss)``: a regressor's target count and MSE; a classifier's class count and
    softmax cross-entropy (the classes a table's labels name, else the largest label + 1)."""
    if table is not None and table["task"] == "regressor":
        return (1 if y_tr.ndim == 1 else y_tr.shape[1]), MSELoss()
    if table is not None and table["classes"]:
        return len(table["classes"]), SoftmaxCrossEntropy()
    return int(
        max(y_tr.max(), y_val.max() if len(y_val) else 0, y_test.max())
    ) + 1, SoftmaxCrossEntropy()


def _check_cuda_graph(net, why_not, config: TrainConfig) -> None:
    """--cuda-graph on a run the graph step cannot take: one line naming why (before any epoch)."""
    from ..fast import graph

    reason = why_not or graph.available() or graph.why_not(net, None, config.augment)
    if reason is not None:
        raise ConfigError(
            f"--cuda-graph: expected a run the CUDA graph step can take, got one it "
            f"cannot: {reason}"
        )


def _table_model(net, table: dict, config: TrainConfig):
    """The model a --data run saves: its feature scaling first (features go in as they are), a
    regressor's target scaling undone last (outputs in the target's units), and what it keeps of the
    table (feature names, class names, label column)."""
    layers = ([table["scaling"]] if table["scaling"] is not None else []) + list(net.layers)
    if (
        table["target_scaling"] is not None
    ):  # y = z * std + mean, as Standardize: (z - (-mean/std)) / (1/std)
        mean, std = table["target_scaling"]
        layers.append(Standardize(-mean / std, 1 / std))
    model = Sequential(*layers, classifies=net.classifies)  # the trained network's, as fit set it
    model.feature_names, model.classes = table["feature_names"], table["classes"]
    model.label_column = config.label_column if str(config.data).lower().endswith(".csv") else None
    return model


def training_logs(log_dir, log=print) -> list:
    """The callbacks of ``--log-dir DIR``: ``DIR/epochs.csv`` and, with tensorboardX installed,
    TensorBoard's event files in DIR (without it, a note says how to get them)."""
    if log_dir is None:
        return []
    logs = [CSVLogger(Path(log_dir) / "epochs.csv")]
    try:
        summary_writer()
    except ImportError as exc:
        log(f"note: no TensorBoard event files in {log_dir}: {exc}")
        return logs
    return logs + [TensorBoard(log_dir)]


def _join_ranks(config: TrainConfig, out, resume: bool, overwrite: bool):
    """Under mpiexec, this process's :class:`parallel.Comm` once every rank has the same settings
    (and its own GPU); None for a single process."""
    comm = parallel.world()
    if comm is not None:
        comm.same_everywhere(
            "the training settings",
            {
                **asdict(config),
                "resume": resume,
                "overwrite": overwrite,
                "out": str(Path(out).resolve()),
            },
        )
        if backend.normalize_device(config.device) != "cpu":
            comm.use_local_gpu()  # before resolve_device's probe touches a GPU
    return comm


def _load(config: TrainConfig, out: Path, meta, comm, log=print):
    """``(train, validation, test, fingerprint, table)``: each set ``(features, labels)``
    (``Pixels`` for IDX images, whose table is None; a --data file's features scaled as its table's
    ``scaling`` says, a :class:`Standardize` or None), the data checked to be the checkpoint's (when
    resuming) and every rank's. A --data file without a test set is tested on the validation set."""
    table = None
    if config.data is not None:
        table = load_table(config.data, config.label_column, config.task)
        (x_train, y_train), test = table["train"], table["test"]
    else:
        (x_train, y_train), test = load_data(config.data_dir, config.download)
    data = fingerprint(x_train, y_train, x_train[:0] if test is None else test[0])
    _check_data(config, out, meta, comm, data, len(x_train), test is not None)
    # a table's rows are often sorted by class: its validation rows are drawn (seeded by --seed),
    # MNIST's are its last 5,000 as always
    seed = None if config.data is None else config.seed
    train_set, val_set = split_validation(x_train, y_train, config.val_size, seed=seed)
    if config.data is None or table is None:
        (x_tr, y_tr), (x_val, y_val) = train_set, val_set
        return (Pixels(x_tr), y_tr), (Pixels(x_val), y_val), (Pixels(test[0]), test[1]), data, None
    return (*_table_sets(config, table, train_set, val_set, test, log), data, table)


def _check_data(config: TrainConfig, out: Path, meta, comm, data: dict, rows: int, has_test: bool):
    """Refuse data that is not every rank's or (when resuming) the checkpoint's, by its
    ``data`` fingerprint, and a --val-size that leaves none of the ``rows`` training rows, or no
    validation set to test on when the data has no test set."""
    if comm is not None:
        comm.same_everywhere("the data", data)
    if meta is not None and meta["run"].get("data") != data:
        raise ConfigError(
            f"--data-dir: the checkpoint in {out} was trained on other data "
            f"({meta['run'].get('data')}), got {data}; resume with the same files"
        )
    if config.val_size >= rows:
        raise ConfigError(
            f"--val-size: expected fewer than {rows} (the training set), got {config.val_size}"
        )
    if not has_test and not config.val_size:
        raise ConfigError(
            f"--val-size: expected at least 1: {config.data} holds no test set, so the validation "
            f"set is the test set, got 0"
        )


def _table_sets(config: TrainConfig, table: dict, train_set, val_set, test, log) -> list:
    """A --data ``table``'s (train, validation, test) sets as the network sees them: features
    scaled by ``config.scale`` (from the training rows), a regressor's targets standardised
    likewise; ``test`` None: the validation set. ``table`` records what the model file needs:
    ``scaling``, ``target_scaling`` (mean, std) or None, ``raw_test`` (the unscaled test set)."""
    (x_tr, y_tr), (x_val, y_val) = train_set, val_set
    inferred = config.task == "auto" and table["task"] == "regressor"
    log(
        f"task: {table['task']}"
        + (" (inferred: the labels are numbers, not all whole; --task sets it)" if inferred else "")
    )
    if test is None:
        log(
            f"note: {config.data} holds no test set (x_test, y_test): the test figures are the "
            f"validation set's"
        )
        test = (x_val, y_val)
    scaled = scaling(config.scale, x_tr)
    table.update(scaling=scaled, raw_test=test, target_scaling=None)
    if (
        table["task"] == "regressor"
    ):  # trained on standard targets; the model's last layer undoes it
        mean, std = y_tr.mean(axis=0), np.where(y_tr.std(axis=0) > 0, y_tr.std(axis=0), 1.0)
        table["target_scaling"] = (np.atleast_1d(mean), np.atleast_1d(std))
        y_tr, y_val, test = (
            (y_tr - mean) / std,
            (y_val - mean) / std,
            (test[0], (test[1] - mean) / std),
        )
    return [
        (x, y) if scaled is None else ((x - scaled.shift) / scaled.scale, y)
        for x, y in ((x_tr, y_tr), (x_val, y_val), test)
    ]


def _start_line(config, device, info, sizes, counts, meta, comm, why_not) -> str:
    note = (
        f" ({info['gpu_name']})"
        if device == "gpu"
        else (f" (GPU not used: {info['reason']})" if info["reason"] else "")
    )
    where = f"; resuming after epoch {meta['epoch']}, step {meta['step']}" if meta else ""
    where += (
        f"; {comm.size} processes, each global batch split across them" if comm is not None else ""
    )
    where += f"; the core's step runs (no fused step: {why_not})" if why_not else ""
    return (
        f"gpunet {__version__}: training {' -> '.join(map(str, sizes))} on {device}{note}; "
        f"{counts[0]} train / {counts[1]} validation / {counts[2]} test examples{where}"
    )


def _metrics(config, device, info, why_not, history, test, ckpt: Path, wall: float) -> dict:
    """What metrics.json holds (the pictures and the process count are added by the caller)."""
    return {
        "config": asdict(config),
        "device": device,
        "backend": info["backend"],
        "device_info": info,
        "fast_path": fast.status(),
        "fused_step": {"used": why_not is None, "why_not": why_not},
        "versions": versions(),
        "history": history.epochs,
        "stop_reason": history.stop_reason,
        "best_epoch": history.best_epoch,
        "diverged_epoch": history.diverged_epoch,
        "checkpoint": str(ckpt),
        "test_loss": test["loss"],
        **_test_figures(test),
        "wall_seconds": wall,
        "mean_epoch_seconds": float(np.mean([h["seconds"] for h in history.epochs])),
        "epochs_seconds": float(np.sum([h["seconds"] for h in history.epochs])),
        "model": str(ckpt.parent / "model.npz"),
    }


def _test_figures(test: dict) -> dict:
    """A classifier's accuracy, per-class table and confusion matrix; a regressor's mse, mae and
    r2."""
    if "accuracy" not in test:
        return {f"test_{k}": test[k] for k in ("mse", "mae", "r2")}
    return {
        "test_accuracy": test["accuracy"],
        "per_class": {k: test[k] for k in ("precision", "recall", "f1", "support")},
        "macro": {k: test["macro_" + k] for k in ("precision", "recall", "f1")},
        "confusion_matrix": test["confusion_matrix"],
    }


def _pictures(config, lead: bool, log, out: Path, history, test, net, x_test, y_test) -> list:
    """Draw the curves, the confusion matrix and the misclassified digits (rank 0, matplotlib
    present)."""
    if not config.plots or not lead:
        return []
    if not plots.available():
        log(
            "note: matplotlib is not installed, so no pictures were drawn (pip install "
            "'gpunet[cli]')"
        )
        return []
    plots.curves(history.epochs, out / "curves.png")
    if "confusion_matrix" not in test:  # a regressor: no classes to confuse
        return ["curves.png"]
    plots.confusion(test["confusion_matrix"], out / "confusion.png")
    if not isinstance(x_test, Pixels):  # features of one's own: no digits to show
        return ["curves.png", "confusion.png"]
    pred = backend.to_numpy(predict(net, x_test))
    plots.misclassified(x_test.raw, y_test, pred, out / "misclassified.png")
    return ["curves.png", "confusion.png", "misclassified.png"]


def _last_lines(log, result: dict, out: Path) -> None:
    if result["stop_reason"] == "diverged":
        log(
            f"the training loss became NaN or infinite in epoch {result['diverged_epoch']}: the "
            f"weights of the "
            f"last finished epoch were kept"
        )
    figure = (
        f"test accuracy {result['test_accuracy']:.4f}"
        if "test_accuracy" in result
        else f"test mse {result['test_mse']:.4g}, mae {result['test_mae']:.4g}, r2 "
        f"{result['test_r2']:.4f}"
    )
    log(
        f"{figure} (loss {result['test_loss']:.4f}); stopped by {result['stop_reason']}; "
        f"{result['mean_epoch_seconds']:.2f}s per epoch over all {len(result['history'])} epochs, "
        f"{result['wall_seconds']:.1f}s in this session"
    )
    log(
        f"wrote {result['model']}, {out / 'metrics.json'}"
        + "".join(f", {out / p}" for p in result["pictures"])
    )
