"""gpunet.data.rows: Pixels (uint8 images read as floats batch by batch) against the float32 arrays
they stand for, and Rows, the same interface over a float array.

The conversion is float32(pixel) / float32(255) on every path (the loader, the compiled gather, the
twin, CuPy), a single correctly rounded division: results are compared for exact equality, not a
tolerance.
"""

import numpy as np
import pytest
from conftest import assert_allclose, make_fake_mnist, optional

import gpunet as gn
from gpunet.data import datasets as data
from gpunet.fast import ops
from gpunet.training import evaluate, fit, predict, predict_proba


def pixels(n=300, f=784, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, f)).astype(np.uint8)


def as_float(raw, dtype=np.float32):
    return raw.astype(dtype) / dtype(255)


def test_gather_scaled_compiled_and_numpy_match_formula(monkeypatch):
    raw, idx = pixels(), np.random.default_rng(1).permutation(300)[:37]
    expected = as_float(raw)[idx]
    out = np.full((40, 784), np.nan, np.float32)
    got = ops.gather_scaled(raw, idx, out, 255)  # compiled where numba is installed
    assert got.shape == (37, 784) and np.array_equal(got, expected)
    assert np.isnan(out[37:]).all(), "rows past len(idx) must stay untouched"
    with monkeypatch.context() as m:
        m.setattr(ops, "numba_kernels", lambda: None)
        twin = ops.gather_scaled(raw, idx, np.empty((37, 784), np.float32), 255)
    assert np.array_equal(twin, expected)
    out64 = ops.gather_scaled(raw, idx, np.empty((37, 784), np.float64), 255)
    assert out64.dtype == np.float64 and np.array_equal(out64, as_float(raw, np.float64)[idx])


def test_compiled_gather_checks_indices():
    optional("numba", "numba")
    if ops.numba_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    with pytest.raises(IndexError, match="outside"):
        ops.gather_scaled(pixels(n=5), np.array([0, 5]), np.empty((2, 784), np.float32), 255)


def check_pixels_read_as_floats(device):
    raw = pixels(n=50, f=12)
    px = gn.Pixels(raw).to(device)
    assert px.shape == (50, 12) and len(px) == 50 and px.ndim == 2 and px.dtype == np.float32
    assert px.device == device
    expected = as_float(raw)
    assert np.array_equal(gn.to_numpy(px[10:20]), expected[10:20])
    assert np.array_equal(px.numpy(), expected)
    out = gn.to_device(np.zeros((8, 12), np.float32), device)
    idx = gn.to_device(np.array([49, 0, 7]), device)
    assert np.array_equal(gn.to_numpy(px.take(idx, out)), expected[[49, 0, 7]])
    assert np.array_equal(gn.to_numpy(px.take(slice(45, 50), out)), expected[45:50])
    assert px.to(device) is px


def test_pixels_read_as_floats_cpu():
    check_pixels_read_as_floats("cpu")


@pytest.mark.gpu
def test_pixels_read_as_floats_gpu():
    check_pixels_read_as_floats("gpu")


@pytest.mark.parametrize(
    "raw, match",
    [
        (np.zeros((3, 4), np.float32), "raw: expected a 2-D uint8 array.*got 2-D float32"),
        (np.zeros((3, 4, 4), np.uint8), "raw: expected a 2-D uint8 array.*got 3-D uint8"),
        ([[1, 2]], "raw: expected a NumPy or CuPy uint8 array, got list"),
    ],
)
def test_pixels_reject_what_is_not_2d_uint8(raw, match):
    with pytest.raises(TypeError, match=match):
        gn.Pixels(raw)


def test_pixels_errors_name_argument_expected_and_actual():
    px = gn.Pixels(pixels(n=5, f=4))
    with pytest.raises(TypeError, match="dtype: expected a floating type, got int32"):
        gn.Pixels(pixels(n=5, f=4), dtype=np.int32)
    with pytest.raises(
        ValueError, match=r"out: expected a \(3\+, 4\) float32 array, got \(2, 4\) float32"
    ):
        px.take(np.array([0, 1, 2]), np.empty((2, 4), np.float32))
    with pytest.raises(
        ValueError, match=r"out: expected a \(2\+, 4\) float32 array, got \(2, 4\) float64"
    ):
        px.take(slice(0, 2), np.empty((2, 4), np.float64))
    with pytest.raises(TypeError, match="key: expected a slice of rows, got int"):
        px[0]


def test_load_raw_pixels(tmp_path):
    folder = make_fake_mnist(tmp_path / "m", n_train=30, n_test=10)
    (x8, y8), (xt8, _) = data.load_mnist(folder, download=False, dtype=np.uint8)
    (x, y), (xt, _) = data.load_mnist(folder, download=False)
    assert x8.dtype == np.uint8 and x8.shape == x.shape and np.array_equal(y8, y)
    assert np.array_equal(gn.Pixels(x8).numpy(), x) and np.array_equal(gn.Pixels(xt8).numpy(), xt)
    with pytest.raises(ValueError, match="dtype: expected a floating type or uint8.*got int16"):
        data.load_idx_images(next(folder.glob("train-images*")), dtype=np.int16)


def check_training_on_pixels_equals_floats(device, tmp_path):
    """Same weights bit for bit: the batches hold the same float32 values, in the same order.
    Shuffled mini-batches with a partial last one, then unshuffled full batches (the slice path)."""
    folder = make_fake_mnist(tmp_path / "m", n_train=203, n_test=50)
    (x8, y), (xt8, yt) = data.load_mnist(folder, download=False, dtype=np.uint8)
    x, xt = as_float(x8), as_float(xt8)
    results = []
    for feats, val in ((x, xt), (gn.Pixels(x8), gn.Pixels(xt8))):
        net = gn.mlp([784, 16, 10], seed=3, device=device)
        opt, loss = gn.Momentum(net.parameters(), lr=0.05), gn.SoftmaxCrossEntropy()
        hist = fit(net, loss, opt, feats, y, epochs=2, batch_size=64, validation=(val, yt), seed=1)
        fit(net, loss, opt, feats, y, epochs=1, batch_size=None, shuffle=False)
        results.append(
            (
                net.state_dict(),
                hist.epochs,
                evaluate(net, loss, val, yt, batch_size=16),
                gn.to_numpy(predict_proba(net, val, batch_size=16)),
                gn.to_numpy(predict(net, val)),
            )
        )
    (s1, h1, e1, p1, c1), (s2, h2, e2, p2, c2) = results
    for k in s1:
        assert np.array_equal(s1[k], s2[k]), k
    assert [(r["loss"], r["val_loss"]) for r in h1] == [(r["loss"], r["val_loss"]) for r in h2]
    assert e1 == e2
    assert_allclose(p1, p2, rtol=0, atol=0)
    assert np.array_equal(c1, c2)


def test_training_on_pixels_equals_floats_cpu(tmp_path):
    check_training_on_pixels_equals_floats("cpu", tmp_path)


@pytest.mark.gpu
def test_training_on_pixels_equals_floats_gpu(tmp_path):
    check_training_on_pixels_equals_floats("gpu", tmp_path)


def test_pixels_without_compiled_kernels_give_the_same_batches(monkeypatch):
    raw, idx = pixels(), np.arange(0, 300, 7)
    fast = gn.Pixels(raw).take(idx, np.empty((len(idx), 784), np.float32)).copy()
    monkeypatch.setenv("GPUNET_FAST", "0")
    monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    assert np.array_equal(gn.Pixels(raw).take(idx, np.empty((len(idx), 784), np.float32)), fast)
