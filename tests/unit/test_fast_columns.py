"""gpunet.fast.columns: the first layer's products over the lit columns of its input, against the
dense products (NumPy's), with numba's kernels and with NumPy's.

Exactness: in float64 with small integer values every sum is exact in any order, so the skipped
products must give the dense ones' bits; the NaN that a skipped row gives in the dense product
(``0 * inf``) must come out the same, by falling back (a weight) or by writing it (a delta).
"""

import numpy as np
import pytest

from gpunet.fast import columns, ops

KERNELS = ["numpy", "numba"]


@pytest.fixture(params=KERNELS)
def kernels(request, monkeypatch):
    if request.param == "numba" and ops.numba_kernels() is None:
        pytest.skip("numba is not installed")
    if request.param == "numpy":
        monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    return request.param


def integer_problem(n=64, f=300, m=80, zero=0.4, seed=0, dtype=np.float64):
    """x (n, f) with a ``zero`` share of its columns zero in every row (others with some zeros),
    W (f, m), dy (n, m): small integers, so float64 sums are exact."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, f)).astype(dtype)
    x[:, rng.random(f) < zero] = 0
    W = rng.integers(-4, 5, size=(f, m)).astype(dtype)
    dy = rng.integers(-5, 6, size=(n, m)).astype(dtype)
    return x, W, dy


def run(x, W, dy):
    """(x @ W, x.T @ dy) through LitColumns, or None where it takes the dense product."""
    lit = columns.LitColumns()
    y = np.full((x.shape[0], W.shape[1]), np.nan, dtype=W.dtype)
    if lit.forward(x, W, y) is None:
        return None
    g = np.full(W.shape, np.nan, dtype=W.dtype)  # a row left unwritten fails the comparison
    lit.gradient(dy, g)
    return y, g, lit


def test_the_lit_columns_are_those_with_a_nonzero(kernels):
    x, _, _ = integer_problem(dtype=np.float32)
    x[:, [7, 8, 9]] = 0
    x[5, 7] = np.nan  # NaN is not zero: its column is multiplied, so the NaN goes on
    x[6, 8] = -2.0  # one negative value lights its column
    x[7, 9] = -0.0  # a negative zero adds nothing either
    cols = np.empty(x.shape[1], dtype=np.int64)
    k = columns._lit(x, cols)
    np.testing.assert_array_equal(cols[:k], np.flatnonzero((x != 0).any(axis=0)))
    assert 7 in cols[:k] and 8 in cols[:k] and 9 not in cols[:k] and k < x.shape[1]


def test_the_products_over_lit_columns_are_the_dense_ones(kernels):
    x, W, dy = integer_problem()
    y, g, lit = run(x, W, dy)
    assert lit.lit[0].shape[0] < 0.7 * x.shape[1]  # columns were skipped
    np.testing.assert_array_equal(y, x @ W)
    np.testing.assert_array_equal(g, x.T @ dy)


def test_float32_products_agree_with_the_dense_ones_within_rounding(kernels):
    """float32: the same terms, summed in other blocks; sums of 300 terms of size ~1 agree within
    a few ulps of the largest partial sums (rtol 1e-5 relative to the sums' scale)."""
    rng = np.random.default_rng(2)
    x = rng.random((128, 784), dtype=np.float32)
    x[:, rng.random(784) < 0.3] = 0
    W = rng.standard_normal((784, 64), dtype=np.float32)
    dy = rng.standard_normal((128, 64), dtype=np.float32)
    y, g, _ = run(x, W, dy)
    np.testing.assert_allclose(y, x @ W, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(g, x.T @ dy, rtol=1e-5, atol=1e-4)


def test_a_weight_not_finite_in_a_skipped_row_takes_the_dense_product(kernels):
    x, W, dy = integer_problem()
    skipped = np.flatnonzero(~(x != 0).any(axis=0))[3]
    for bad in (np.nan, np.inf):
        W2 = W.copy()
        W2[skipped, 5] = bad
        with np.errstate(invalid="ignore"):
            assert run(x, W2, dy) is None  # the dense product's 0 * inf is NaN: the core's result
    W2 = W.copy()
    W2[np.flatnonzero((x != 0).any(axis=0))[0], 5] = np.inf  # a lit row: multiplied anyway
    with np.errstate(invalid="ignore"):
        assert run(x, W2, dy) is not None


def test_a_delta_not_finite_gives_the_skipped_rows_the_dense_products_nan(kernels):
    x, W, dy = integer_problem()
    dy[3, 4], dy[9, 11] = np.inf, np.nan
    with np.errstate(invalid="ignore"):
        _, g, _ = run(x, W, dy)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(g, x.T @ dy)  # NaN where NumPy's is, equal elsewhere
    skipped = ~(x != 0).any(axis=0)
    assert np.isnan(g[skipped][:, [4, 11]]).all() and np.isfinite(g[:, 5]).all()


@pytest.mark.parametrize(
    "change",
    [
        lambda x, W, dy: (np.where(x == 0, 1.0, x), W, dy),  # no zero column
        lambda x, W, dy: (x[:4], W, dy[:4]),  # too little work: 4 rows
        lambda x, W, dy: (x.astype(np.float32), W, dy),  # dtypes differ
        lambda x, W, dy: (np.asfortranarray(x), W, dy),  # not C-contiguous
    ],
    ids=["dense", "small", "dtypes", "layout"],
)
def test_the_dense_product_runs_where_skipping_does_not_apply(change):
    x, W, dy = change(*integer_problem())
    assert run(x, W, dy) is None


def test_off_with_the_environment_setting(monkeypatch):
    x, W, dy = integer_problem()
    assert run(x, W, dy) is not None
    monkeypatch.setenv("GPUNET_SKIP_ZEROS", "0")
    assert run(x, W, dy) is None


def test_each_batch_takes_its_own_columns(kernels):
    """The buffers are reused: a batch with fewer lit columns after one with more (and back)."""
    lit = columns.LitColumns()
    for zero, seed in ((0.2, 1), (0.6, 2), (0.3, 3)):
        x, W, dy = integer_problem(zero=zero, seed=seed)
        y = np.empty((x.shape[0], W.shape[1]))
        assert lit.forward(x, W, y) is not None
        g = np.full(W.shape, np.nan)
        lit.gradient(dy, g)
        np.testing.assert_array_equal(y, x @ W)
        np.testing.assert_array_equal(g, x.T @ dy)
