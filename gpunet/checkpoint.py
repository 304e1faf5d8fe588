"""Checkpoint files: everything a training run needs to continue exactly where it stopped, in one ``.npz``.

A checkpoint holds arrays (the weights, the optimizer's and the callbacks' arrays, as NumPy arrays
whatever the device) and one JSON record (``__checkpoint__``): the epoch and step reached, the history so
far, the random states, the partial sums of an interrupted epoch, the optimizer's and the callbacks' other
state and the caller's description of the run. It is written atomically
(:func:`gpunet.files.atomic_write`): a crash or SIGKILL at any moment leaves the previous checkpoint whole.

The optimizer and the callbacks hand over their state in one shape, ``state_dict()``: JSON data plus an
optional ``"arrays"`` key, ``{name: [host NumPy arrays]}``. :func:`split` and :func:`join` move such a state
in and out of the file's record and arrays, whatever the names, so nothing here knows an optimizer.
"""
from __future__ import annotations

import os

from .files import read_npz, write_npz

FORMAT = "gpunet-checkpoint"
VERSION = 2  # 2: the optimizer and callbacks stored generically (split/join)
_META = "__checkpoint__"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, foreign or does not fit the run; the message says which."""


def save(path, meta: dict, arrays: dict) -> None:
    """Write ``meta`` (JSON data) and ``arrays`` (name -> NumPy array) to ``path``, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_npz(path, arrays, _META, {"format": FORMAT, "version": VERSION, **meta})


def load(path) -> tuple[dict, dict]:
    """``(meta, arrays)`` from a file written by :func:`save`; a CheckpointError names what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        meta, arrays = read_npz(path, _META)
    except Exception as exc:  # zip, npy and JSON errors of a damaged or foreign file
        raise CheckpointError(f"{path} is not a readable gpunet checkpoint ({type(exc).__name__}: {exc})") from None
    if meta is None:
        raise CheckpointError(f"{path} is not a gpunet checkpoint (it holds {', '.join(sorted(arrays)[:4])}"
                              f"{', ...' if len(arrays) > 4 else ''}; a model file, perhaps)")
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: expected a {FORMAT} version {VERSION} file, "
                              f"got {meta.get('format')!r} version {meta.get('version')!r}")
    return meta, arrays


def read_meta(path) -> dict:
    """Only the JSON record (for checking a run's settings before loading any data)."""
    return load(path)[0]


def split(prefix: str, state: dict) -> tuple[dict, dict]:
    """``(record, arrays)`` of a ``state_dict()``: the record holds its JSON data and, under ``"arrays"``, how
    many arrays each name has; the arrays are named ``{prefix}/{name}/{i}``."""
    record = {k: v for k, v in state.items() if k != "arrays"}
    lists = state.get("arrays", {})
    record["arrays"] = {name: len(values) for name, values in lists.items()}
    arrays = {f"{prefix}/{name}/{i}": v for name, values in lists.items() for i, v in enumerate(values)}
    return record, arrays


def join(prefix: str, record: dict, arrays: dict) -> dict:
    """The ``state_dict()`` that :func:`split` took apart (a KeyError names a missing array)."""
    state = {k: v for k, v in record.items() if k != "arrays"}
    state["arrays"] = {name: [arrays[f"{prefix}/{name}/{i}"] for i in range(count)]
                       for name, count in record.get("arrays", {}).items()}
    return state
