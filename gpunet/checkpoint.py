"""Checkpoint files: everything a training run needs to continue exactly where it stopped, in one ``.npz``.

A checkpoint holds arrays (the weights, the optimizer's velocities, early stopping's best weights, as
NumPy arrays whatever the device) and one JSON record (``__checkpoint__``): the epoch and step reached,
the history so far, the random states, the partial sums of an interrupted epoch, the optimizer's
hyperparameters and the caller's description of the run. It is written atomically
(:func:`gpunet.files.atomic_write`): a crash or SIGKILL at any moment leaves the previous checkpoint whole.
"""
from __future__ import annotations

import os

from .files import read_npz, write_npz

FORMAT = "gpunet-checkpoint"
VERSION = 1
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
