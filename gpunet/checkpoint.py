"""Checkpoint files: everything a training run needs to continue exactly where it stopped, in one
``.npz``.

A checkpoint holds arrays (the weights, the optimizer's and the callbacks' arrays, as NumPy arrays
whatever the device) and one JSON record (``__checkpoint__``): the epoch and step reached, the
history so far, the random states, the partial sums of an interrupted epoch, the optimizer's and the
callbacks' other state and the caller's description of the run. It is written atomically
(:func:`gpunet.files.atomic_write`): a crash or SIGKILL at any moment leaves the previous checkpoint
whole.

The optimizer and the callbacks hand over their state in one shape, ``state_dict()``: JSON data plus
an optional ``"arrays"`` key, ``{name: [host NumPy arrays]}``. :func:`split` and :func:`join` move
such a state in and out of the file's record and arrays, whatever the names, so nothing here knows
an optimizer.
"""

from __future__ import annotations

import os

from .files import ARRAY_DTYPES, FileFormatError, NpzReader, write_npz
from .layers import BUILT_IN
from .records import FieldError, check_checkpoint, checkpoint_arrays

FORMAT = "gpunet-checkpoint"
VERSION = 2  # 2: the optimizer and callbacks stored generically (split/join)
_META = "__checkpoint__"
NOT_A_CHECKPOINT = (
    "a checkpoint is a .npz archive, written by gpunet train or fit(checkpoint_path=...)"
)


class CheckpointError(FileFormatError):
    """A checkpoint file is missing, unreadable, foreign or does not fit the run; the message says
    which (the file, and the field of its record or the array that is wrong). A ValueError."""


def save(path, meta: dict, arrays: dict) -> None:
    """Write ``meta`` (JSON data) and ``arrays`` (name -> NumPy array) to ``path``, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_npz(path, arrays, _META, {"format": FORMAT, "version": VERSION, **meta})


def load(path, arrays: bool = True) -> tuple[dict, dict]:
    """``(meta, arrays)`` from a file written by :func:`save`, read without trusting it: the JSON
    record checked through first (:func:`gpunet.records.check_checkpoint`), then only the arrays it
    names, each after its header, the zip entry's size and the inflation are checked
    (``arrays=False``: none, and ``{}``). A CheckpointError names the file and the field or array
    that is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    with NpzReader(
        path, CheckpointError, "readable gpunet checkpoint", NOT_A_CHECKPOINT, constants=True
    ) as f:
        meta = f.record(_META)
        if meta is None:
            held = f.names()
            raise CheckpointError(
                f"{path}: not a gpunet checkpoint (it holds {', '.join(sorted(held)[:4])}"
                f"{', ...' if len(held) > 4 else ''}; a model file, perhaps)"
            )
        try:
            _check_format(meta)
            meta = check_checkpoint(meta)
        except FieldError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
        if not arrays:
            return meta, {}
        return meta, f.arrays(_wanted(meta, f.names()), skip=(_META,), finite=False)


def _check_format(meta) -> None:
    if not isinstance(meta, dict):
        raise FieldError(
            "record", f'expected an object {{"format": "{FORMAT}", ...}}, got {type(meta).__name__}'
        )
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FieldError(
            "format",
            f"expected a {FORMAT} version {VERSION} file, got "
            f"{meta.get('format')!r:.100} version {meta.get('version')!r:.100}",
        )


def _wanted(meta: dict, held: list) -> dict:
    """The arrays to read: those the record names (shapes where the record gives them), and a
    registered layer's own (``net/3.*``, any shape: its class checks them)."""
    wanted = {
        k: (
            None if shape is None else (shape,),
            None if k.startswith("callbacks/") else ARRAY_DTYPES,
        )
        for k, shape in checkpoint_arrays(meta).items()
    }  # a callback's own arrays: any plain numbers
    own = [
        f"net/{i}." for i, c in enumerate(meta["network"]["layers"]) if c["type"] not in BUILT_IN
    ]
    wanted.update({n: (None, ARRAY_DTYPES) for n in held if own and n.startswith(tuple(own))})
    return wanted


def read_meta(path) -> dict:
    """Only the JSON record, checked through (for checking a run's settings before loading any
    data)."""
    return load(path, arrays=False)[0]


def split(prefix: str, state: dict) -> tuple[dict, dict]:
    """``(record, arrays)`` of a ``state_dict()``: the record holds its JSON data and, under
    ``"arrays"``, how many arrays each name has; the arrays are named ``{prefix}/{name}/{i}``."""
    record = {k: v for k, v in state.items() if k != "arrays"}
    lists = state.get("arrays", {})
    record["arrays"] = {name: len(values) for name, values in lists.items()}
    arrays = {
        f"{prefix}/{name}/{i}": v for name, values in lists.items() for i, v in enumerate(values)
    }
    return record, arrays


def join(prefix: str, record: dict, arrays: dict) -> dict:
    """The ``state_dict()`` that :func:`split` took apart (a KeyError names a missing array)."""
    state = {k: v for k, v in record.items() if k != "arrays"}
    state["arrays"] = {
        name: [arrays[f"{prefix}/{name}/{i}"] for i in range(count)]
        for name, count in record.get("arrays", {}).items()
    }
    return state
