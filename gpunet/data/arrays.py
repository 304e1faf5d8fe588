"""The front door for data: what a user hands to ``fit``, ``evaluate``, ``predict`` and
``predict_proba`` (and through them ``explain`` and ``serve``) is converted here, once, to the
network's dtype and device.

Features: any 2-D real-valued array-like (NumPy of any real dtype, CuPy, nested lists, pandas or
polars frames through ``np.asarray``) becomes a C-contiguous (N, features) array of the network's
dtype (float32 by default) on its device; nothing else converts features, so the fast path and the
core, with or without the CPU's folded BLAS update, see the same array and give the same result or
the same error. Targets: integer class labels (N,) in [0, classes) become int64; one-hot or
probability rows (N, classes) and regression targets (N,) or (N, outputs) become the network's
dtype. Other class labels (strings, numbers outside [0, classes)) are refused with one line saying
what to pass.
"""

from __future__ import annotations

import numpy as np

from ..backend import check_labels, device_of, get_array_module, to_device, to_numpy


def _host_array(x, name: str):
    """``x`` as a NumPy array (CuPy arrays are returned as they are); ragged rows refused by
    name."""
    if device_of(x) == "gpu":
        return x
    try:
        return np.asarray(x)
    except (ValueError, TypeError) as exc:  # NumPy refuses ragged nested lists
        raise ValueError(
            f"{name}: expected rows of equal length (a 2-D array-like), got {type(x).__name__} "
            f"that NumPy cannot make an array of ({exc})"
        ) from None


def _real(a, dtype, name: str):
    """``a`` cast to ``dtype`` (C order), refusing values that are not real numbers, by name."""
    kind = a.dtype.kind
    if kind in "biuf":
        return get_array_module(a).ascontiguousarray(a, dtype=dtype)
    if kind == "O":  # a frame of mixed columns: numbers pass, anything else is named
        try:
            return np.ascontiguousarray(a, dtype=dtype)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{name}: expected real numbers, got objects that are not ({exc}); convert or "
                f"encode the non-numeric columns first"
            ) from None
    what = {
        "U": "strings",
        "S": "bytes",
        "c": "complex numbers",
        "M": "dates",
        "m": "time spans",
    }.get(kind, kind)
    raise TypeError(
        f"{name}: expected real numbers, got {what} ({a.dtype}); convert or encode them first"
    )


def columns_of(x) -> list | None:
    """The column names of a data frame ``x`` (pandas, polars) as strings; None for anything
    else."""
    cols = getattr(x, "columns", None)
    return None if cols is None or isinstance(x, np.ndarray) else [str(c) for c in cols]


def by_name(x, names, name: str = "x"):
    """``x`` with its columns in the order ``names`` (the features a model was trained on) when
    ``x`` is a data frame holding exactly those columns; ``x`` itself when it has no names or no
    names are known. Other columns are refused in one line naming the missing and the extra ones."""
    cols = columns_of(x)
    if names is None or cols is None or cols == list(names):
        return x
    missing, extra = [c for c in names if c not in cols], [c for c in cols if c not in names]
    if missing or extra:
        raise ValueError(
            f"{name}: expected the {len(names)} feature columns the model was trained on, got "
            f"missing {missing} and extra {extra}"
        )
    return x[list(names)]


def check_finite(a, name: str = "x", columns=None) -> None:
    """Refuse NaN or an infinity in the real array ``a`` (N,) or (N, F), naming the first bad row
    and column (by name when ``columns`` are given)."""
    xp = get_array_module(a)
    if a.dtype.kind != "f" or bool(xp.isfinite(a).all()):
        return
    bad = np.argwhere(~np.isfinite(to_numpy(a)))[0]
    row = int(bad[0])
    value = to_numpy(a)[tuple(bad)]
    where = f"row {row}"
    if len(bad) > 1:
        col = int(bad[1])
        named = columns is not None and col < len(columns)
        where += f", column {columns[col]!r}" if named else f", column {col}"
    raise ValueError(
        f"{name}: expected finite numbers, got {value} at {where} (0-based); drop or fill the "
        f"missing values first"
    )


def features(x, dtype=np.float32, device: str = "cpu", name: str = "x"):
    """Any 2-D real array-like (N, F) -> a C-contiguous (N, F) array of ``dtype`` on ``device``; NaN
    and infinities (also those of a float64 value too large for float32) refused by row and
    column."""
    cols = columns_of(x)
    a = _host_array(x, name)
    if a.ndim != 2:
        hint = (
            "; for one feature pass x.reshape(-1, 1), for one example x.reshape(1, -1)"
            if a.ndim == 1
            else ""
        )
        raise ValueError(
            f"{name}: expected a 2-D array of features (N, features), got shape "
            f"{tuple(a.shape)}{hint}"
        )
    if device_of(a) != device and device == "cpu":
        a = to_numpy(a)
    a = _real(a, np.dtype(dtype), name)  # cast before a move to the GPU: fewer bytes to send
    check_finite(a, name, cols)
    return to_device(a, device)


def labels(y, classes: int, device: str = "cpu", name: str = "y"):
    """Integer class labels (N,) in [0, classes) -> int64 (N,) on ``device``; anything else
    refused."""
    a = _host_array(y, name)
    encode = (
        f"encode them as 0..{classes - 1} first, e.g. classes, {name} = np.unique({name}, "
        f"return_inverse=True) (gpunet.sklearn's classifiers do this for you)"
    )
    if a.dtype.kind == "b":  # True and False as classes 1 and 0
        a = a.astype(np.int64)
    check_labels(a, classes, name, f"; the network has {classes} outputs", encode)
    return to_device(get_array_module(a).ascontiguousarray(a, dtype=np.int64), device)


def targets(
    y, n: int, classify: bool, classes: int, dtype=np.float32, device: str = "cpu", name: str = "y"
):
    """The targets of ``n`` rows: class labels (N,) (see :func:`labels`) or one-hot rows (N,
    classes) when ``classify``, else regression targets (N,) or (N, outputs); cast and moved like
    the features."""
    a = _host_array(y, name)
    if a.ndim == 0 or len(a) != n:
        got = "a scalar" if a.ndim == 0 else f"{len(a)}"
        raise ValueError(f"{name}: expected as many targets as rows ({n}), got {got}")
    if classify and a.ndim == 1:
        return labels(a, classes, device, name)
    if a.ndim not in (1, 2):
        raise ValueError(
            f"{name}: expected targets of shape (N,) or (N, outputs), got {tuple(a.shape)}"
        )
    if device_of(a) != device and device == "cpu":
        a = to_numpy(a)
    a = _real(a, np.dtype(dtype), name)
    check_finite(a, name)
    return to_device(a, device)
