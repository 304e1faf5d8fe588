"""MNIST's files: where they are (``GPUNET_DATA``, ``--data-dir``, a cache folder), downloading them,
loading them, and splitting off a validation set.

Any folder holding the four MNIST file names (raw or .gz) loads the same way, so Fashion-MNIST and the
like work unchanged. The file format itself is :mod:`gpunet.data.idx`, the one gpunet module imported here
(beside NumPy and the standard library). Data problems raise DataError. Pictures for prediction (image
files) are in :mod:`gpunet.data.pictures`. Data sets of one's own, as ``.npz`` or CSV files (``gpunet train
--data``), are read by :func:`load_arrays`.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import os
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from . import DataError
from .arrays import check_labels
from .idx import GZIP_MAGIC, atomic_write, load_idx_images, load_idx_labels, open_idx

MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# MD5 of the decompressed files: they identify MNIST however the files were compressed.
MNIST_MD5 = {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
             "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
             "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
             "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/")


# -------------------------------------------------------------------------------------------- MNIST
def default_data_dir() -> Path:
    """``$GPUNET_DATA`` if set, else ``$XDG_CACHE_HOME/gpunet/mnist`` (or ``~/.cache/gpunet/mnist``)."""
    if os.environ.get("GPUNET_DATA"):
        return Path(os.environ["GPUNET_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gpunet" / "mnist"


def resolve_data_dir(data_dir=None) -> Path:
    """The folder to use: `data_dir` if given, else :func:`default_data_dir`."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _missing(folder: Path, splits=("train", "test")) -> list[str]:
    return [n for k, n in MNIST_FILES.items() if k.split("_")[0] in splits
            and not any((folder / f).is_file() for f in (n, f"{n}.gz"))]


def _where_to_put(folder: Path) -> str:
    return (f"Put the four files ({', '.join(MNIST_FILES.values())}; raw or .gz) in {folder} by hand, "
            f"or select the folder holding them with GPUNET_DATA or --data-dir.")


def find_mnist_files(folder, splits=("train", "test")) -> dict[str, Path]:
    """Map each key of MNIST_FILES (of ``splits``) to NAME or NAME.gz in `folder` (the raw file wins)."""
    if missing := _missing(folder := Path(folder), splits):
        raise DataError(f"MNIST files missing in {folder}: {', '.join(missing)} (each as NAME or NAME.gz)")
    return {k: folder / n if (folder / n).is_file() else folder / f"{n}.gz" for k, n in MNIST_FILES.items()
            if k.split("_")[0] in splits}


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with open_idx(path, header=False) as (stream, _, _, _):
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_mnist(data_dir=None, *, download=True, verify=False, dtype=np.float32, splits=("train", "test")):
    """Load MNIST, or any dataset stored under its file names, from :func:`resolve_data_dir`.

    Returns ``((x_train, y_train), (x_test, y_test))``: x of `dtype` (N, rows*cols) in [0, 1] (or the raw
    0..255 bytes for ``dtype=np.uint8``, to wrap in :class:`gpunet.data.rows.Pixels`), y int64 (N,). Missing
    files are downloaded if `download`; `verify` checks the files against MNIST_MD5. ``splits=("test",)``
    reads (and downloads) only the t10k files and returns ``((x_test, y_test),)``.
    """
    folder = resolve_data_dir(data_dir)
    if (missing := _missing(folder, splits)) and not download:
        raise DataError(f"MNIST files missing in {folder}: {', '.join(missing)}. {_where_to_put(folder)}")
    if missing:
        download_mnist(folder, splits=splits)
    files = find_mnist_files(folder, splits)
    for path in files.values() if verify else ():
        want = MNIST_MD5[path.name.removesuffix(".gz")]
        if (got := _md5_of(path)) != want:
            raise DataError(f"{path}: MD5 of the decompressed data is {got}, expected {want} "
                            f"(not the original MNIST file; load other datasets without verify)")
    result = []
    for split in splits:
        x_path, y_path = files[f"{split}_images"], files[f"{split}_labels"]
        x, y = load_idx_images(x_path, dtype), load_idx_labels(y_path)
        if len(x) != len(y):
            raise DataError(f"{x_path} holds {len(x)} images but {y_path} holds {len(y)} labels")
        result.append((x, y))
    return tuple(result)


def download_mnist(data_dir=None, *, mirrors=MNIST_MIRRORS, timeout=30.0, md5=MNIST_MD5,
                   splits=("train", "test")) -> Path:
    """Download the missing MNIST files into the folder (created if needed); return the folder.

    Each file is tried on each mirror in turn (URL = mirror + NAME + ".gz"); the MD5 of its decompressed
    payload must match ``md5[NAME]`` or the next mirror is tried. Files land as NAME.gz, atomically.
    """
    folder = resolve_data_dir(data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data folder {folder} ({exc}). {_where_to_put(folder)}") from exc
    for name in _missing(folder, splits):
        errors = []
        for mirror in mirrors:
            url = f"{mirror}{name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    blob = response.read()
                payload = gzip.decompress(blob) if blob[:2] == GZIP_MAGIC else blob
                got, want = hashlib.md5(payload).hexdigest(), (md5 or {}).get(name)
                if want and got != want:
                    raise ValueError(f"MD5 mismatch: got {got}, expected {want}")
            except (OSError, EOFError, ValueError, zlib.error, http.client.HTTPException) as exc:
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            target = folder / (f"{name}.gz" if blob[:2] == GZIP_MAGIC else name)
            atomic_write(target, lambda f: f.write(blob))
            break
        else:
            tried = "".join(f"\n  {e}" for e in errors) or " (no mirrors given)"
            raise DataError(f"download of {name} failed from every mirror:{tried}\n{_where_to_put(folder)}")
    return folder


# ------------------------------------------------------------------------------------------- splits
def split_validation(x, y, val_size, *, seed=None):
    """Hold out `val_size` rows (an int count, or a float fraction in [0, 1)) as a validation set.

    Returns ``((x_train, y_train), (x_val, y_val))``. With ``seed=None`` the last rows are held out as
    views (no copy); with a seed, a random subset from ``np.random.default_rng(seed)`` (copies, in order).
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} rows but y has {len(y)}")
    if isinstance(val_size, (int, np.integer)) and not isinstance(val_size, bool) and 0 <= val_size < n:
        n_val = int(val_size)
    elif isinstance(val_size, (float, np.floating)) and 0.0 <= val_size < 1.0:
        n_val = min(int(round(val_size * n)), max(n - 1, 0))  # keep at least one training row
    else:
        raise ValueError(f"val_size must be an int count in [0, {n}) or a float fraction in [0, 1), "
                         f"got {val_size!r}")
    if seed is None:
        return (x[:n - n_val], y[:n - n_val]), (x[n - n_val:], y[n - n_val:])
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])


# ------------------------------------------------------------------------------------- your own files
def load_arrays(path, label_column: str = "label"):
    """A data set of one's own: ``((x_train, y_train), (x_test, y_test) or None)``, x float64 (N, features),
    y int64 (N,) class labels.

    ``.npz``: arrays ``x_train`` (N, features) and ``y_train`` (N,), optionally ``x_test`` and ``y_test``.
    ``.csv``: a header row naming the columns, then one example per row; ``label_column`` holds the class,
    every other column a feature (no test set). Problems raise DataError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz_arrays(path)
    if suffix == ".csv":
        return (_csv_arrays(path, label_column), None)
    raise DataError(f"{path}: expected a .npz or .csv file, got {suffix or 'no suffix'}")


def _xy(path: Path, x, y, names: str):
    """``x`` as float64 (N, features) and ``y`` as int64 class labels (N,), checked."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or not len(x):
        raise DataError(f"{path}: expected {names} shaped (N, features) and (N,) with N > 0, got "
                        f"{x.shape} and {y.shape}")
    if x.dtype.kind not in "biuf" or not np.isfinite(x.astype(np.float64)).all():
        raise DataError(f"{path}: expected finite real features, got {x.dtype} values that are not")
    if y.dtype.kind == "b" or y.dtype.kind == "f" and np.array_equal(y, np.round(y)):
        y = y.astype(np.int64)  # whole numbers written as floats (a CSV's 1.0) are labels too
    try:
        check_labels(y, None, names.split(" and ")[-1], hint="number the classes first")
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: {exc}") from None
    return x.astype(np.float64), y.astype(np.int64)


def _npz_arrays(path: Path):
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # zip and npy errors of a damaged or foreign file
        raise DataError(f"{path}: cannot read the .npz file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("x_train", "y_train") if k not in arrays]
    if missing or (("x_test" in arrays) != ("y_test" in arrays)):
        raise DataError(f"{path}: expected arrays x_train, y_train and optionally x_test with y_test, "
                        f"got {sorted(arrays)}")
    train = _xy(path, arrays["x_train"], arrays["y_train"], "x_train and y_train")
    test = _xy(path, arrays["x_test"], arrays["y_test"], "x_test and y_test") if "x_test" in arrays else None
    if test is not None and test[0].shape[1] != train[0].shape[1]:
        raise DataError(f"{path}: expected x_test with {train[0].shape[1]} features like x_train, "
                        f"got {test[0].shape[1]}")
    return train, test


def _csv_arrays(path: Path, label_column: str):
    x, cells, _ = read_csv(path, label_column)
    y = np.array([_number(path, i + 2, label_column, c) for i, c in enumerate(cells)])
    return _xy(path, x, y, f"features and column {label_column!r}")


def _number(path, line, column, cell) -> float:
    try:
        return float(cell)
    except ValueError:
        raise DataError(f"{path}: line {line}, column {column!r}: expected a number, got {cell!r}") from None


def read_csv(path, label_column: str | None, need_label: bool = True):
    """A CSV file with a header row: ``(x, labels, feature_names)``, x float64 (N, F) of every column but
    ``label_column``, finite (NaN, blanks and infinities refused by line and column), ``labels`` that
    column's cells as they are written (strings; None when the file lacks it and ``need_label`` is false)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one example, got {len(rows)} rows")
    header = [h.strip() for h in rows[0]]
    if label_column not in header and need_label:
        raise DataError(f"{path}: no column named {label_column!r} for the labels (--label-column); the "
                        f"columns are {header}")
    at = header.index(label_column) if label_column in header else None
    names = [h for j, h in enumerate(header) if j != at]
    values = np.empty((len(rows) - 1, len(names)), dtype=np.float64)
    labels = []
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: line {i}: expected {len(header)} values like the header, got {len(row)}")
        if at is not None:
            labels.append(row[at].strip())
        cells = [c for j, c in enumerate(row) if j != at]
        for j, cell in enumerate(cells):
            values[i - 2, j] = v = _number(path, i, names[j], cell)
            if not np.isfinite(v):
                raise DataError(f"{path}: line {i}, column {names[j]!r}: expected a finite number, got "
                                f"{cell!r}; drop or fill the missing values first")
    return values, (labels if at is not None else None), names


def encode_labels(path, cells, task: str = "auto", classes=None):
    """A label column's cells -> ``(y, task, classes)``. ``task`` "regressor": float64 targets;
    "classifier": int64 indices into ``classes`` (given: a model's; else integers 0..C-1 as they are, or
    the sorted distinct labels, as scikit-learn's estimators encode them); "auto": a regressor when the
    labels are numbers not all whole, else a classifier."""
    try:
        numbers = np.array([float(c) for c in cells])
    except ValueError:
        numbers = None
    whole = numbers is not None and bool(np.all(np.isfinite(numbers) & (numbers == np.round(numbers))))
    if task == "auto":
        task = "regressor" if numbers is not None and not whole else "classifier"
    if task == "regressor":
        if numbers is None or not np.isfinite(numbers).all():
            bad = next(c for c in cells if numbers is None or not np.isfinite(float(c)))
            raise DataError(f"{path}: expected finite numbers as regression targets, got {bad!r}")
        return numbers, task, None
    if numbers is not None and not whole and classes is None:
        raise DataError(f"{path}: expected class labels, got numbers that are not whole ({cells[0]!r}, ...); "
                        f"pass --task regressor for a regression target")
    if classes is not None:
        index = {str(c): k for k, c in enumerate(classes)}
        by_number = numbers is not None and whole and all(isinstance(c, int) for c in classes)
        keys = [str(int(v)) for v in numbers] if by_number and numbers is not None else cells
        unknown = sorted({k for k in keys if k not in index})
        if unknown:
            raise DataError(f"{path}: labels the model does not know: {unknown[:5]} (its classes: {classes})")
        return np.array([index[k] for k in keys], dtype=np.int64), task, list(classes)
    if numbers is not None and whole and numbers.min() >= 0:
        return numbers.astype(np.int64), task, None
    labels = numbers.astype(np.int64) if numbers is not None and whole else np.array(cells)
    found, y = np.unique(labels, return_inverse=True)
    return y.astype(np.int64), task, [int(c) if whole else str(c) for c in found]


def by_header(path, x, names, want, ignore=None):
    """``x``'s columns (named ``names``) in the order ``want`` (a model's feature names); a column the
    model lacks or misses is refused in one line naming them (``ignore``, the label column, may be there)."""
    if want is None or names == list(want):
        return x
    missing = [n for n in want if n not in names]
    extra = [n for n in names if n not in want and n != ignore]
    if missing or extra:
        raise DataError(f"{path}: expected the {len(want)} feature columns the model was trained on, got "
                        f"missing {missing} and extra {extra}")
    return x[:, [names.index(n) for n in want]]


def load_rows(path, features: int, label_column: str = "label", feature_names=None):
    """Feature rows to predict from, as they are (float64 (N, features)): a ``.npy`` array (N, features) or
    (features,), or a CSV file with a header row (its ``label_column``, if there, is left out; its columns
    taken by name when ``feature_names`` are given)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.suffix.lower() == ".csv":  # the label column, if there, is left out: predict ignores it
        x, _, header = read_csv(path, label_column, need_label=False)
        x = by_header(path, x, header, feature_names)
    elif path.suffix.lower() == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: cannot read .npy file ({exc})") from None
        x = x.reshape(1, -1) if x.ndim == 1 else x
    else:
        raise DataError(f"{path}: expected .npy or .csv rows of {features} features, got {path.suffix or 'no suffix'}")
    if x.ndim != 2 or x.shape[1] != features or x.dtype.kind not in "biuf":
        raise DataError(f"{path}: expected rows of {features} numbers (the model's inputs), got {x.dtype} {x.shape}")
    return x.astype(np.float64)


def load_table(path, label_column: str = "label", task: str = "auto", classes=None, feature_names=None):
    """A data set of one's own with what a model keeps of it: ``{"train": (x, y), "test": (x, y) or None,
    "feature_names", "classes", "task"}``; x float64 (N, F), y int64 class indices or float64 targets
    (see :func:`encode_labels`). ``feature_names`` (a model's) puts a CSV's columns in that order."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix.lower() == ".csv":
        x, cells, names = read_csv(path, label_column)
        x = by_header(path, x, names, feature_names)
        y, task, classes = encode_labels(path, cells, task, classes)
        return {"train": (x, y), "test": None, "feature_names": list(feature_names or names),
                "classes": classes, "task": task}
    if path.suffix.lower() != ".npz":
        raise DataError(f"{path}: expected a .npz or .csv file, got {path.suffix.lower() or 'no suffix'}")
    with np.load(path, allow_pickle=False) as f:
        y = f["y_train"] if "y_train" in f.files else np.zeros(0)
    whole = y.dtype.kind in "biu" or bool(np.all(y == np.round(y)))
    if task == "regressor" or (task == "auto" and not whole):
        return {**_npz_targets(path), "feature_names": None, "classes": None, "task": "regressor"}
    train, test = _npz_arrays(path)
    return {"train": train, "test": test, "feature_names": None, "classes": classes, "task": "classifier"}


def _npz_targets(path: Path) -> dict:
    """A ``.npz`` of regression targets: x float64 (N, F), y float64 (N,) or (N, outputs), finite."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k].astype(np.float64) for k in f.files}
    sets = {}
    for split in ("train", "test"):
        if f"x_{split}" in arrays:
            x, y = arrays[f"x_{split}"], arrays.get(f"y_{split}")
            if y is None or x.ndim != 2 or len(x) != len(y) or not (np.isfinite(x).all()
                                                                      and np.isfinite(y).all()):
                raise DataError(f"{path}: expected finite x_{split} (N, features) and y_{split} (N,) or "
                                f"(N, outputs)")
            sets[split] = (x, y)
    if "train" not in sets:
        raise DataError(f"{path}: expected arrays x_train and y_train, got {sorted(arrays)}")
    return {"train": sets["train"], "test": sets.get("test")}
