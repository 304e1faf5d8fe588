"""Crafted model files and checkpoints, made by code (the repository holds no binary blobs): the
corpus of issue 36 for ``tests/unit/test_untrusted_files.py`` and the fuzzer.

Every file starts from a valid one (a small network saved by ``Sequential.save``, a checkpoint
written by ``gpunet train``) and changes one thing: a field of its JSON record, an array, an
``.npy`` header or the zip itself. Zips are written by :func:`write_zip` (stored or raw-deflated
entries, the sizes and CRC as given), so that a header may lie and a zip bomb costs milliseconds to
make: its deflate stream is one compressed MiB of zeros repeated (each chunk ends in a full flush,
so the chunks are identical).

A case is ``(name, make, field)``: ``make(folder)`` writes the file and returns its path, ``field``
is the text the refusal must contain (the field of the record or the array it names).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

import gpunet as gn

RECORD = "__gpunet__"
MiB = 2**20


# --- zips and .npy entries, byte by byte ----------------------------------------------------------
class Deflated:
    """A raw deflate stream and what it inflates to: ``size`` bytes of CRC-32 ``crc``."""

    def __init__(self, data: bytes, size: int, crc: int):
        self.data, self.size, self.crc = data, size, crc


def deflated(data: bytes) -> Deflated:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return Deflated(c.compress(data) + c.flush(), len(data), zlib.crc32(data))


def zeros_bomb(head: bytes, zeros: int) -> Deflated:
    """``head`` then ``zeros`` zero bytes, deflated about 1000-fold in milliseconds."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    start = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)
    chunk = c.compress(bytes(MiB)) + c.flush(
        zlib.Z_FULL_FLUSH
    )  # a full flush: no reference to before
    whole, rest = divmod(zeros, MiB)
    crc = zlib.crc32(head)
    for _ in range(whole):
        crc = zlib.crc32(bytes(MiB), crc)
    tail = c.compress(bytes(rest)) + c.flush()
    return Deflated(start + chunk * whole + tail, len(head) + zeros, zlib.crc32(bytes(rest), crc))


def write_zip(path, entries) -> Path:
    """A zip of ``entries`` ``[(name, bytes or Deflated), ...]``, bytes stored as they are."""
    out, central = io.BytesIO(), []
    for name, body in entries:
        raw = body.data if isinstance(body, Deflated) else body
        size = body.size if isinstance(body, Deflated) else len(body)
        crc = body.crc if isinstance(body, Deflated) else zlib.crc32(body)
        method, at, encoded = (8 if isinstance(body, Deflated) else 0), out.tell(), name.encode()
        fixed = (20, 0, method, 0, 0x21, crc, len(raw), size, len(encoded))
        out.write(struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", *fixed, 0) + encoded + raw)
        central.append(
            struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, *fixed, 0, 0, 0, 0, 0, at)
            + encoded
        )
    start = out.tell()
    out.write(b"".join(central))
    out.write(
        struct.pack(
            "<4sHHHHIIH",
            b"PK\x05\x06",
            0,
            0,
            len(central),
            len(central),
            out.tell() - start,
            start,
            0,
        )
    )
    Path(path).write_bytes(out.getvalue())
    return Path(path)


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def npy_header(shape, descr="<f4") -> bytes:
    """The ``.npy`` magic and header of an array of ``shape`` and ``descr``, without its data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()  # the magic is written with the header


def json_array(record) -> bytes:
    return npy(np.frombuffer(json.dumps(record).encode(), dtype=np.uint8))


# --- a valid model, and files made from it --------------------------------------------------------
def valid_model(folder) -> tuple[dict, dict]:
    """``(record, arrays)`` of a small MNIST model (Linear, BatchNorm, ReLU, Dropout, Linear), as
    saved."""
    net = gn.mlp([784, 16, 10], batch_norm=True, dropout=0.1, seed=0, device="cpu")
    net.classifies = True
    path = Path(folder) / "valid.npz"
    net.save(path)
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(arrays.pop(RECORD).tobytes()), arrays


def model_file(path, record, arrays, extra=()) -> Path:
    """A model file of ``record`` (JSON data, or raw bytes for the record's array) and ``arrays``
    (name -> array, or the entry's bytes or Deflated), then the ``extra`` entries."""
    entries = [(f"{RECORD}.npy", record if isinstance(record, bytes) else json_array(record))]
    entries += [
        (f"{k}.npy", v if isinstance(v, (bytes, Deflated)) else npy(v)) for k, v in arrays.items()
    ]
    return write_zip(path, entries + list(extra))


def _edit(record, where: str, value):
    """A copy of ``record`` with the field ``where`` ("network.layers.0.p") set to ``value``
    (deleted when ``value`` is ``DELETE``)."""
    record = copy.deepcopy(record)
    *parents, last = where.split(".")
    node = record
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return record


DELETE = object()


def _linear(i, o):
    return {"type": "Linear", "in_features": i, "out_features": o, "init": "he"}


def model_cases() -> list:
    """Every case of issue 36 for model files, and every field of the model record."""

    def rec(where, value, field):  # one field of the valid record changed
        return (where, lambda r, a: (_edit(r, where, value), a), field)

    def layers(cfgs, field, arrays=None):  # the network's layers replaced
        return (
            lambda r, a: (_edit(r, "network.layers", cfgs), arrays if arrays is not None else {}),
            field,
        )

    wide = [_linear(784, 1)] + [
        cfg
        for _ in range(200)
        for cfg in (_linear(1, 500_000), {"type": "ReLU"}, _linear(500_000, 1))
    ]
    cases = [
        ("meta is a list", lambda r, a: ([r], a), "record: expected an object"),
        ("meta is a string", lambda r, a: ("gpunet-sequential", a), "record: expected an object"),
        ("meta is a number", lambda r, a: (5, a), "record: expected an object"),
        rec("network.layers", {"0": r0()}, "network.layers: expected a list"),
        rec("network.layers", [1, 2, 3], "network.layers[0]: expected a layer's object"),
        rec("network.layers", [], "network.layers: expected a list of 1 to"),
        rec(
            "network", "Sequential", "network: expected an object"
        ),  # 'string indices must be integers'
        rec("network", [r0()], "network: expected an object"),  # 'list indices must be ... not str'
        rec("network.type", "Parallel", "network.type: expected one of ['Sequential']"),
        rec("network.bogus", 1, "network.bogus: unexpected field"),
        ("Linear(784, 10**12)", *layers([_linear(784, 10**12)], "network.layers[0].out_features")),
        (
            "Linear(784, 3_000_000)",
            *layers([_linear(784, 3_000_000)], "network.layers[0]: declares"),
        ),
        (
            "Linear(784, 2_000_000), ReLU",
            *layers([_linear(784, 2_000_000), {"type": "ReLU"}], "network.layers[0]: declares"),
        ),
        (
            "BatchNorm(10**12)",
            *layers(
                [
                    {"type": "BatchNorm", "features": 10**12, "momentum": 0.1, "eps": 1e-5},
                    _linear(10**12, 10),
                ],
                "network.layers[0].features",
            ),
        ),
        (
            "BatchNorm(10**9)",
            *layers(
                [
                    {"type": "BatchNorm", "features": 10**9, "momentum": 0.1, "eps": 1e-5},
                    _linear(10**9, 10),
                ],
                "network.layers[0]: declares",
            ),
        ),
        ("many 500,000-wide layers", *layers(wide, "network.layers[")),
        (
            "only ReLU",
            *layers([{"type": "ReLU"}], "network.layers: expected at least one Linear layer"),
        ),
        (
            "only Softmax",
            *layers([{"type": "Softmax"}], "network.layers: expected at least one Linear"),
        ),
        (
            "unknown layer type",
            *layers([{"type": "Square"}], "network.layers[0].type: unknown layer type"),
        ),
        (
            "layer type not a string",
            *layers([{"type": 5}], "network.layers[0].type: expected a layer type"),
        ),
        (
            "chain broken",
            *layers(
                [_linear(784, 16), _linear(17, 10)], "network.layers[1].in_features: expected 16"
            ),
        ),
        rec(
            "network.layers.0.in_features",
            "784",
            "network.layers[0].in_features: expected an integer",
        ),
        rec(
            "network.layers.0.in_features", 0, "network.layers[0].in_features: expected an integer"
        ),
        rec(
            "network.layers.0.in_features",
            True,
            "network.layers[0].in_features: expected an integer",
        ),
        rec(
            "network.layers.0.out_features",
            16.0,
            "network.layers[0].out_features: expected an integer",
        ),
        rec("network.layers.0.out_features", DELETE, "network.layers[0].out_features: missing"),
        rec("network.layers.0.init", "zeros", "network.layers[0].init: expected one of"),
        rec("network.layers.0.bias", True, "network.layers[0].bias: unexpected field"),
        rec("network.layers.1.features", 17, "network.layers[1].features: expected 16 features"),
        rec(
            "network.layers.1.momentum",
            "0.1",
            "network.layers[1].momentum: expected a finite number",
        ),
        rec(
            "network.layers.1.eps", 0, "network.layers[1].eps: expected a finite number in (0, inf]"
        ),
        rec("network.layers.3.p", DELETE, "network.layers[3].p: missing"),  # the bare 'p'
        rec(
            "network.layers.3.p", "0.5", "network.layers[3].p: expected a finite number"
        ),  # '<' int, str
        rec("network.layers.3.p", 1.0, "network.layers[3].p: expected a finite number in [0, 1)"),
        rec("dtype", DELETE, "dtype: missing"),  # the bare 'dtype'
        rec("dtype", "5", "dtype: expected one of"),  # "Cannot interpret '5' as a data type"
        rec("dtype", "object", "dtype: expected one of"),
        rec("format", "gpunet-checkpoint", "format: expected 'gpunet-sequential', got a string"),
        rec("version", 2, "version: expected 1"),
        rec("version", "1", "version: expected 1"),
        rec("classifies", "yes", "classifies: expected true or false"),
        rec("feature_names", ["a", "b"], "feature_names: expected 784 names"),
        rec(
            "feature_names", "pixels", "feature_names: expected a list"
        ),  # "'int' object is not iterable"
        rec("feature_names", [1] * 784, "feature_names[0]: expected a string"),
        rec("classes", [str(i) for i in range(9)], "classes: expected 10 names"),
        rec("classes", [[0]] * 10, "classes[0]: expected an integer"),
        rec("label_column", 5, "label_column: expected a string"),
        rec("extra", {"a": 1}, "extra: unexpected field"),
        (
            "Standardize shift a number",
            *layers(
                [{"type": "Standardize", "shift": 5, "scale": [1.0]}, _linear(1, 2)],
                "network.layers[0].shift: expected a list",
            ),
        ),
        (
            "Standardize scale shorter",
            *layers(
                [{"type": "Standardize", "shift": [0.0, 1.0], "scale": [1.0]}, _linear(2, 2)],
                "network.layers[0].scale: expected 2 numbers",
            ),
        ),
        (
            "Standardize scale negative",
            *layers(
                [{"type": "Standardize", "shift": [0.0], "scale": [-1.0]}, _linear(1, 2)],
                "network.layers[0].scale[0]: expected",
            ),
        ),
    ]
    return [(name, _from_valid(edit), field) for name, edit, field in cases] + _array_cases()


def r0():
    return _linear(784, 16)


def _array_cases() -> list:
    """The cases of arrays, headers and the zip: what the record names against what the file
    holds."""

    def arrays(edit, field):
        return lambda r, a: (r, edit(dict(a))), field

    def nan(a):
        a["0.W"] = a["0.W"].copy()
        a["0.W"][3, 5] = np.nan
        return a

    def inf(a):
        a["4.b"] = a["4.b"].copy()
        a["4.b"][1] = -np.inf
        return a

    def put(name, value):
        return lambda a: {**a, name: value}

    def drop(name):
        return lambda a: {k: v for k, v in a.items() if k != name}

    bytes_ = b'{"format": "gpunet-sequential", "version": 1, "dtype": "float32", "network": '
    cases = [
        ("NaN weight", *arrays(nan, "array '0.W': 1 of 12544 values are NaN or infinite")),
        ("-inf bias", *arrays(inf, "array '4.b': 1 of 10 values are NaN or infinite")),
        (
            "lying header: 10**11 floats",
            *arrays(
                put("0.W", npy_header((10**11,)) + bytes(100)),
                "array '0.W': its header declares shape (100000000000,)",
            ),
        ),
        (
            "lying header: right shape, short data",
            *arrays(
                put("0.W", npy_header((784, 16)) + bytes(64)),
                "array '0.W': its header declares shape (784, 16)",
            ),
        ),
        (
            "header not .npy",
            *arrays(put("0.W", b"\x93NUMPY\x01\x00garbage"), "array '0.W': not a .npy array"),
        ),
        (
            "pickled array",
            *arrays(
                put("0.W", npy_header((784, 16), "|O") + bytes(8 * 784 * 16)),
                "array '0.W': expected plain numbers",
            ),
        ),
        (
            "int32 weights",
            *arrays(
                put("0.W", np.zeros((784, 16), np.int32)),
                "array '0.W': expected dtype float32, got int32",
            ),
        ),
        (
            "float64 weights",
            *arrays(put("0.W", np.zeros((784, 16))), "array '0.W': expected dtype float32"),
        ),
        (
            "transposed weights",
            *arrays(
                put("0.W", np.zeros((16, 784), np.float32)), "array '0.W': expected shape (784, 16)"
            ),
        ),
        ("a missing array", *arrays(drop("1.running_var"), "array '1.running_var': missing")),
        (
            "an array the record does not name",
            *arrays(put("junk", np.zeros(3, np.float32)), "array 'junk': not one the record names"),
        ),
        (
            "record not JSON",
            lambda r, a: (npy(np.frombuffer(b"\xff{", np.uint8)), a),
            f"{RECORD}: not a JSON record",
        ),
        (
            "record cut short",
            lambda r, a: (npy(np.frombuffer(bytes_, np.uint8)), a),
            f"{RECORD}: not a JSON",
        ),
        (
            "record nested 100,000 deep",
            lambda r, a: (npy(np.frombuffer(b"[" * 100_000, np.uint8)), a),
            f"{RECORD}: not a JSON record",
        ),
        (
            "record with NaN",
            lambda r, a: (
                npy(np.frombuffer(json.dumps({**r, "dtype": float("nan")}).encode(), np.uint8)),
                a,
            ),
            f"{RECORD}: not a JSON record",
        ),
        (
            "record as float32",
            lambda r, a: (npy(np.zeros(8, np.float32)), a),
            f"{RECORD}: expected the JSON record",
        ),
    ]
    return [(name, _from_valid(edit), field) for name, edit, field in cases] + _file_cases()


def _file_cases() -> list:
    """Files that are no model file at all, zip bombs, and damaged zips."""

    def text(folder):
        path = Path(folder) / "notes.npz"
        path.write_text("label,a\n1,2\n")
        return path

    def truncated(folder):
        record, arrays = valid_model(folder)
        path = model_file(Path(folder) / "cut.npz", record, arrays)
        path.write_bytes(path.read_bytes()[:20_000])
        return path

    def no_record(folder):
        _, arrays = valid_model(folder)
        return write_zip(
            Path(folder) / "weights.npz", [(f"{k}.npy", npy(v)) for k, v in arrays.items()]
        )

    def bomb(folder, padding):
        """Linear(784, 80000): 251 MB of float32 zeros deflated to 250 kB; with ``padding`` a stored
        entry that makes the file large enough for the record's size check, so the inflation check
        must refuse."""
        record = _edit(valid_model(folder)[0], "network.layers", [_linear(784, 80_000)])
        big = zeros_bomb(npy_header((784, 80_000)), 784 * 80_000 * 4)
        extra = [("padding.txt", bytes(8 * MiB))] if padding else []
        name = "bomb_padded.npz" if padding else "bomb.npz"
        return model_file(
            Path(folder) / name, record, {"0.W": big, "0.b": np.zeros(80_000, np.float32)}, extra
        )

    return [
        ("a text file", text, "not a gpunet model file (a model file is a .npz archive"),
        ("an empty file", lambda f: _write(f, "empty.npz", b""), "not a gpunet model file"),
        ("a zip cut short", truncated, "not a gpunet model file"),
        ("a zip without the record", no_record, "not a gpunet model file (no architecture record"),
        ("a zip bomb", lambda f: bomb(f, False), "network.layers[0]: declares 62800000 weights"),
        ("a zip bomb in a large file", lambda f: bomb(f, True), "more than 32-fold (a zip bomb)"),
    ]


def _write(folder, name, data: bytes) -> Path:
    path = Path(folder) / name
    path.write_bytes(data)
    return path


def _from_valid(edit):
    """``make(folder)``: the valid model's record and arrays through ``edit``, written as a model
    file."""

    def make(folder, name=None):
        record, arrays = edit(*valid_model(folder))
        return model_file(Path(folder) / (name or "crafted.npz"), record, arrays)

    return make


# --- checkpoints: a run of gpunet train on a tiny table, and files made from its checkpoint -------
CHECKPOINT = "__checkpoint__"
TRAIN = [
    "--data",
    "tiny.npz",
    "--hidden",
    "4",
    "--batch-size",
    "32",
    "--device",
    "cpu",
]  # 5 steps an epoch


def tiny_run(folder) -> Path:
    """``folder/run/checkpoint.npz``: one epoch of ``gpunet train`` (in this process) on 200 rows of
    8 features (``folder/tiny.npz``); a case resumes it with ``resume_args``."""
    import gpunet.cli

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    np.savez(Path(folder) / "tiny.npz", x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    cwd = os.getcwd()
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(io.StringIO()):
            assert gpunet.cli.main(["train", *TRAIN, "--out", "run", "--epochs", "1"]) == 0
    finally:
        os.chdir(cwd)
    return Path(folder) / "run" / "checkpoint.npz"


def resume_args(out) -> list:
    return ["train", *TRAIN, "--out", str(out), "--epochs", "2", "--resume"]


def read_checkpoint(path) -> tuple[dict, dict]:
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return json.loads(arrays.pop(CHECKPOINT).tobytes()), arrays


def checkpoint_file(path, record, arrays, extra=()) -> Path:
    """A checkpoint of ``record`` and ``arrays`` (as :func:`model_file`, under the checkpoint's
    key)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    entries = [(f"{CHECKPOINT}.npy", record if isinstance(record, bytes) else json_array(record))]
    entries += [
        (f"{k}.npy", v if isinstance(v, (bytes, Deflated)) else npy(v)) for k, v in arrays.items()
    ]
    return write_zip(path, entries + list(extra))


SUMS = {"loss_sum": 12.5, "correct": 40, "seconds": 0.5}  # an epoch under way: its partial sums


def checkpoint_cases() -> list:
    """``(name, edit, field)``: ``edit(record, arrays)`` gives the crafted checkpoint's; every case
    of issue 36 for checkpoints and every field of the record."""

    def rec(where, value, field, **also):
        def edit(r, a):
            for k, v in also.items():
                r = _edit(r, k, v)
            return _edit(r, where, value), a

        return (where if not also else f"{where} ({', '.join(also)})", edit, field)

    def arrays(name, fn, field):
        return (name, lambda r, a: (r, fn(dict(a))), field)

    bomb = zeros_bomb(npy_header((256 * MiB,), "|u1"), 256 * MiB)  # 256 MiB of zeros in 250 kB
    big = zeros_bomb(npy_header((64 * MiB,), "<f4"), 256 * MiB)  # a named array, as large
    return [
        ("the record a list", lambda r, a: ([r], a), "record: expected an object"),
        rec("run", [1, 2], "run: expected an object"),
        rec("run.bogus", 1, "run.bogus: unexpected field"),
        rec("run.config.bogus", 1, "run.config.bogus: unexpected field"),
        rec("bogus", 1, "bogus: unexpected field"),
        rec("partial", [], "partial: expected a list of 1 to"),
        rec("random", [], "random: expected a list of 1 to"),
        rec("random.0", [], "random[0]: expected a list of 1 to"),
        rec("random.0", [None], "random[0]: expected 4 entries (one per layer)"),
        rec("random.0.2.numpy.state", "x", "random[0][2].numpy.state: expected an object"),
        rec("ranks", 2, "random: expected 2 entries (one per rank"),
        rec("epoch", DELETE, "epoch: missing"),  # the bare 'epoch'
        rec("epoch", "1", "epoch: expected an integer"),
        rec("finished", DELETE, "finished: missing"),  # the bare 'finished'
        rec("finished", "yes", "finished: expected true or false"),
        rec(
            "step", -1, "step: expected an integer in [0,"
        ),  # 'output array does not match ... take'
        rec("step", 10**6, "step: expected at most 5 (the steps of an epoch", partial=[SUMS]),
        rec("step", 2, "partial[0]: expected the sums of the epoch's first 2 steps, got null"),
        rec(
            "partial.0.seconds", DELETE, "partial[0].seconds: missing", step=2, partial=[SUMS]
        ),  # 'seconds'
        rec(
            "partial.0.correct",
            -1,
            "partial[0].correct: expected an integer",
            step=2,
            partial=[SUMS],
        ),
        rec("history", [], "history: expected 1 entries (one per finished epoch)"),
        rec("history.0.seconds", DELETE, "history[0].seconds: missing"),
        rec("history.0", "epoch 1", "history[0]: expected an object"),
        rec(
            "order_rng.bit_generator",
            "MT19937",
            "order_rng.bit_generator: expected one of ['PCG64']",
        ),
        rec("order_rng.state.inc", -1, "order_rng.state.inc: expected an integer"),
        rec("stop_reason", 5, "stop_reason: expected a string"),
        rec("best_epoch", "2", "best_epoch: expected an integer"),
        rec("network.layers", {"0": 1}, "network.layers: expected a list"),
        rec(
            "network.layers.0.out_features",
            10**12,
            "network.layers[0].out_features: expected an integer",
        ),
        rec("network.layers.0.out_features", 5, "network.layers[3].in_features: expected 5"),
        rec(
            "optimizer.momentum",
            DELETE,
            "optimizer.momentum: missing (a momentum optimizer's state)",
        ),
        rec("optimizer.momentum", "0.9", "optimizer.momentum: expected float"),
        rec("optimizer.nesterov", 0, "optimizer.nesterov: expected bool"),
        rec("optimizer.bogus", 0, "optimizer.bogus: unexpected field"),
        rec("optimizer.arrays.velocities", "4", "optimizer.arrays.velocities: expected an integer"),
        rec("optimizer.arrays.velocities", 6, "array 'optimizer/velocities/4': missing"),
        rec("optimizer.kind", "adam", "expected the state of a momentum optimizer, got 'adam'"),
        rec(
            "callbacks.DivergenceGuard.mid_epoch",
            DELETE,
            "callbacks.DivergenceGuard.mid_epoch: missing",
        ),
        rec("callbacks.DivergenceGuard", [], "callbacks.DivergenceGuard: expected an object"),
        rec("version", 1, "format: expected a gpunet-checkpoint version 2 file"),
        arrays(
            "a zip bomb the record does not name",
            lambda a: {**a, "junk": bomb},
            "array 'junk': not one the record names",
        ),
        arrays(
            "a zip bomb as a named array",
            lambda a: {**a, "optimizer/velocities/0": big},
            "more than 32-fold (a zip bomb)",
        ),
        arrays(
            "a lying header",
            lambda a: {**a, "net/0.W": npy_header((10**11,)) + bytes(100)},
            "array 'net/0.W': its header declares shape (100000000000,)",
        ),
        arrays(
            "transposed weights",
            lambda a: {**a, "net/0.W": a["net/0.W"].T.copy()},
            "expected shape (8, 4) (from the record), got (4, 8)",
        ),
        arrays(
            "a missing array",
            lambda a: {k: v for k, v in a.items() if k != "net/3.b"},
            "array 'net/3.b': missing",
        ),
        (
            "not JSON",
            lambda r, a: (npy(np.frombuffer(b"{", np.uint8)), a),
            f"{CHECKPOINT}: not a JSON record",
        ),
    ]
