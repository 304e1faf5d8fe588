"""A property-based fuzzer of untrusted files (issue 36): Hypothesis mutates the record and the
arrays of a valid model file and of a valid checkpoint, and loading the result must either work or
raise the one error of its kind (``gpunet.ModelFileError``, ``gpunet.checkpoint.CheckpointError``:
ValueErrors whose one line names the file), never another exception.

A mutation is a few edits of the valid record: a field replaced by any JSON value (nested lists and
objects, huge and negative integers, NaN and infinities, strings), deleted, or a new field added;
and of its arrays: one dropped, retyped, reshaped, given a NaN, or an unnamed one added. Checkpoints
are loaded by a resumed ``fit`` on a tiny table (record, arrays and the run's own checks, then
training on).

CI cost: bounded by ``max_examples`` (120 model files, 40 checkpoints: about 5 s in all on an idle
core) and a 3 s deadline per example; no example database (a fresh clone would not keep it), so each
run explores anew, and a failure prints the example and ``@reproduce_failure`` to replay it.
"""

from __future__ import annotations

import copy
import json

import numpy as np
from conftest import optional
from crafted_files import checkpoint_file, model_file, valid_model

import gpunet as gn
from gpunet import checkpoint

hypothesis = optional("hypothesis", "test")
from hypothesis import (  # noqa: E402
    HealthCheck,
    given,
    settings,
    strategies as st,  # noqa: E402
)

SETTINGS = dict(
    deadline=3000,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 2, 784, 16, 10**12, 2**64, -(2**70)])
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.sampled_from(
        ["Linear", "ReLU", "BatchNorm", "float32", "PCG64", "momentum", "gpunet-sequential"]
    )
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def paths(node, prefix=()) -> list:
    """Every place in a JSON value: the key or index path of each field and entry, itself
    included."""
    found = [prefix]
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, value in items:
        found += paths(value, (*prefix, key))
    return found


def edited(record, draw) -> dict:
    """``record`` after one to three edits drawn by ``draw``: replace, delete or add a field."""
    record = copy.deepcopy(record)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(record)))
        if not where:
            record = (
                draw(JSON) if draw(st.integers(0, 20)) == 0 else record
            )  # now and then the whole record
            continue
        parent = record
        for key in where[:-1]:
            parent = parent[key]
        op, key = draw(st.sampled_from(["replace", "replace", "delete", "add"])), where[-1]
        if op == "replace":
            parent[key] = draw(JSON)
        elif op == "delete":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent.insert(key, draw(JSON))
        if not isinstance(record, (dict, list)):
            break
    return record


def edited_arrays(arrays, draw) -> dict:
    """``arrays`` after zero to two edits: one dropped, retyped, reshaped, given a NaN, or one
    added."""
    arrays = dict(arrays)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(arrays))) if arrays else "x"
        op = draw(st.sampled_from(["drop", "retype", "reshape", "nan", "add"]))
        if op == "drop":
            arrays.pop(name, None)
        elif op == "retype" and name in arrays:
            arrays[name] = arrays[name].astype(
                draw(st.sampled_from(["float16", "float64", "int32", "uint8"]))
            )
        elif op == "reshape" and name in arrays:
            arrays[name] = arrays[name].reshape(-1)[: draw(st.integers(0, arrays[name].size))]
        elif (
            op == "nan" and name in arrays and arrays[name].size and arrays[name].dtype.kind == "f"
        ):
            arrays[name] = arrays[name].copy()
            arrays[name].flat[0] = np.nan
        elif op == "add":
            arrays[
                draw(
                    st.text(min_size=1, max_size=6).filter(
                        lambda s: "/" not in s and "\x00" not in s
                    )
                )
            ] = np.zeros(draw(st.integers(0, 5)), np.float32)
    return arrays


def test_a_mutated_model_file_loads_or_is_refused_in_one_line(tmp_path):
    record, arrays = valid_model(tmp_path)

    @settings(max_examples=120, **SETTINGS)
    @given(st.data())
    def check(data):
        path = model_file(
            tmp_path / "fuzzed.npz", edited(record, data.draw), edited_arrays(arrays, data.draw)
        )
        try:
            gn.load(path, device="cpu")
        except gn.ModelFileError as exc:
            assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)

    check()


def tiny_fit(net, **kw):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    return gn.fit(
        net,
        gn.SoftmaxCrossEntropy(),
        opt,
        x,
        y,
        batch_size=16,
        validation=(x[:8], y[:8]),
        patience=3,
        **kw,
    )


def network():
    return gn.mlp([8, 4, 3], dropout=0.2, seed=0, device="cpu")


def test_a_mutated_checkpoint_resumes_or_is_refused_in_one_line(tmp_path):
    """Interrupted mid-epoch (partial sums, the divergence guard's and early stopping's arrays), so
    every part of the record is there to mutate."""
    steps = iter(range(10**6))
    try:
        tiny_fit(
            network(),
            epochs=3,
            checkpoint_path=tmp_path / "valid.npz",
            interrupt=lambda: next(steps) == 4,
        )
    except gn.training.Interrupted:
        pass
    with np.load(tmp_path / "valid.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    record = json.loads(arrays.pop("__checkpoint__").tobytes())
    assert (
        record["step"] == 2 and record["partial"][0] is not None
    )  # mid-epoch: 3 steps an epoch, then 2 of the next

    @settings(max_examples=40, **SETTINGS)
    @given(st.data())
    def check(data):
        path = checkpoint_file(
            tmp_path / "fuzzed.npz", edited(record, data.draw), edited_arrays(arrays, data.draw)
        )
        try:
            tiny_fit(network(), epochs=2, checkpoint_path=path, resume=True)
        except checkpoint.CheckpointError as exc:
            assert f"{path}" in str(exc) and "\n" not in str(exc), str(exc)

    check()
