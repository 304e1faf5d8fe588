"""gpunet.data.arrays, the front door: every form of the same data (float64, integers, lists,
Fortran order, a pandas frame) trains, evaluates and predicts exactly as the float32 array does, on
every path (the fast path with and without the CPU's folded BLAS update, and the core), and bad data
get the same one-line error on each. Expectations are the float32 run itself: the front door must
make the identical array."""

import numpy as np
import pytest
from conftest import assert_allclose, optional

import gpunet as gn
from gpunet.data import arrays as inputs
from gpunet.fast import blas

PATHS = ["fast", "fast-no-blas", "core"]


@pytest.fixture(params=PATHS)
def path(request, monkeypatch, device):
    if request.param == "fast-no-blas":
        if device == "gpu":
            pytest.skip("the folded BLAS update is a CPU path")
        monkeypatch.setenv("GPUNET_CPU_BLAS", "0")
    blas._openblas.cache_clear()  # it reads GPUNET_CPU_BLAS once
    yield request.param
    blas._openblas.cache_clear()


def digits(n=120, features=12, classes=3, seed=0):
    """Small integers 0..16 (like scikit-learn's digits) and labels that a net can learn."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = np.clip(
        rng.integers(0, 8, size=(n, features)) + 6 * (y[:, None] == np.arange(features) % classes),
        0,
        16,
    )
    return x.astype(np.int64), y


def forms(x):
    """The same values as the user may hold them (the first one is the reference, float32 C
    order)."""
    out = {
        "float32": x.astype(np.float32),
        "float64": x.astype(np.float64),
        "int64": x,
        "list": x.tolist(),
        "fortran": np.asfortranarray(x.astype(np.float32)),
        "Rows(float64)": gn.Rows(x.astype(np.float64)),
    }
    pd = optional("pandas", "test")
    out["DataFrame"] = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    return out


def train(x, y, device, path, epochs=3, batch_size=32):
    net = gn.mlp([x.shape[1] if hasattr(x, "shape") else len(x[0]), 16, 3], seed=0, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    gn.fit(
        net,
        gn.SoftmaxCrossEntropy(),
        opt,
        x,
        y,
        epochs=epochs,
        batch_size=batch_size,
        fast=path != "core",
    )
    return net


def test_every_form_trains_evaluates_and_predicts_as_float32(device, path):
    x, y = digits()
    results = {}
    for name, xf in forms(x).items():
        net = train(xf, y, device, path)
        results[name] = (
            net.state_dict(),
            gn.evaluate(net, gn.SoftmaxCrossEntropy(), xf, y),
            gn.to_numpy(gn.predict_proba(net, xf)),
            gn.to_numpy(gn.predict(net, xf)),
        )
    weights, scores, probs, labels = results.pop("float32")
    assert (
        scores["accuracy"] > 0.9
    )  # it did learn: the comparison below is between trained networks
    for name, (w, s, p, lab) in results.items():
        for key in (
            weights
        ):  # the same float32 array went in, so the same float operations ran: bit for bit
            np.testing.assert_array_equal(w[key], weights[key], err_msg=f"{name}: {key}")
        assert s == scores, name
        np.testing.assert_array_equal(p, probs, err_msg=name)
        np.testing.assert_array_equal(lab, labels, err_msg=name)


def test_a_full_batch_reads_the_converted_rows_in_place(device, path):
    """Without shuffling, batches are slices of the converted array itself (no gather into a
    buffer): a Fortran-ordered or float64 input must have become a C-ordered float32 array for the
    fast step."""
    x, y = digits()
    ref = train(x.astype(np.float32), y, device, path, epochs=2, batch_size=None).state_dict()
    for name in ("fortran", "float64", "DataFrame"):
        xf = forms(x)[name]
        got = train(xf, y, device, path, epochs=2, batch_size=None).state_dict()
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name}: {key}")


def test_labels_as_lists_series_and_narrow_integers_train_the_same(device):
    x, y = digits()
    ref = train(x, y, device, "fast").state_dict()
    others = {"list": y.tolist(), "uint8": y.astype(np.uint8), "int32": y.astype(np.int32)}
    others["Series"] = optional("pandas", "test").Series(y)
    for name, yf in others.items():
        got = train(x, yf, device, "fast").state_dict()
        for key in ref:
            np.testing.assert_array_equal(got[key], ref[key], err_msg=f"{name}: {key}")


BAD = [
    ("x", lambda x, y: (x.astype(str), y), TypeError, "x: expected real numbers, got strings"),
    (
        "x",
        lambda x, y: (x[:, 0], y),
        ValueError,
        r"x: expected a 2-D array of features .*got shape \(120,\); "
        r"for one feature pass x.reshape\(-1, 1\)",
    ),
    (
        "x",
        lambda x, y: ([[1.0, 2.0], [3.0]], y[:2]),
        ValueError,
        "x: expected rows of equal length",
    ),
    ("x", lambda x, y: (x + 1j, y), TypeError, "x: expected real numbers, got complex numbers"),
    (
        "y",
        lambda x, y: (x, np.array(["cat", "dog", "emu"])[y]),
        TypeError,
        r"y: expected integer class labels 0..2, got strings \('cat', 'dog', 'emu'\); encode them "
        r"as 0..2 first, "
        r"e.g. classes, y = np.unique\(y, return_inverse=True\)",
    ),
    (
        "y",
        lambda x, y: (x, y * 10 + 1),
        ValueError,
        r"y: expected labels in \[0, 2\] for 3 classes, got values from 1 to 21 \(1, 11, 21; the "
        r"network has 3 "
        r"outputs\); encode them as 0..2 first",
    ),
    (
        "y",
        lambda x, y: (x, y.astype(np.float64)),
        TypeError,
        r"y: expected integer class labels 0..2, got float64",
    ),
    (
        "y",
        lambda x, y: (x, y[:-1]),
        ValueError,
        r"y: expected as many targets as rows \(120\), got 119",
    ),
]


@pytest.mark.parametrize("what, spoil, error, match", BAD, ids=[b[3][:40] for b in BAD])
def test_bad_data_get_one_error_on_every_path(device, path, what, spoil, error, match):
    x, y = spoil(*digits())
    width = 2 if isinstance(x, list) else 12
    net = gn.mlp([width, 16, 3], seed=0, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(error, match=match):
        gn.fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=1, fast=path != "core")
    with pytest.raises(error, match=match):
        gn.evaluate(net, gn.SoftmaxCrossEntropy(), x, y)
    if what == "x":
        with pytest.raises(error, match=match):
            gn.predict(net, x)


def test_features_cast_once_and_keep_what_is_already_right(device):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    same = inputs.features(x, np.float32, "cpu")
    assert same is x  # no copy when nothing is to change
    got = inputs.features(x.astype(np.float64).T.T, np.float32, device)
    assert (
        got.dtype == np.float32 and got.flags.c_contiguous and gn.backend.device_of(got) == device
    )
    assert_allclose(got, x)
    f64 = inputs.features(x.tolist(), np.float64, device)
    assert f64.dtype == np.float64  # the network's dtype, not a fixed float32
    assert inputs.features(np.array([[True, False]]), np.float32).tolist() == [[1.0, 0.0]]


def test_a_dataframe_of_mixed_columns_names_the_column_problem():
    pd = optional("pandas", "test")
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": ["x", "y"]})
    with pytest.raises(TypeError, match="x: expected real numbers, got objects that are not"):
        inputs.features(frame)
    numbers = pd.DataFrame({"a": [1, 2], "b": [0.5, 1.5]})  # mixed int and float columns: numbers
    assert inputs.features(numbers).tolist() == [[1.0, 0.5], [2.0, 1.5]]


def test_regression_targets_take_the_network_dtype(device):
    y = inputs.targets([1, 2, 3], 3, classify=False, classes=1, dtype=np.float32, device=device)
    assert y.dtype == np.float32 and gn.backend.device_of(y) == device
    one_hot = inputs.targets(
        np.eye(3, dtype=np.int64), 3, classify=True, classes=3, dtype=np.float64
    )
    assert one_hot.dtype == np.float64
    with pytest.raises(TypeError, match="y: expected real numbers, got strings"):
        inputs.targets(["a", "b"], 2, classify=False, classes=1)
