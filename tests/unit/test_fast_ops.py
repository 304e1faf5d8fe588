"""The fast path's elementwise steps (gpunet.fast.ops: numba kernels, in-place NumPy, CUDA kernels)
against the core's formulas (gpunet.layers, gpunet.losses) on the same arrays.

One checker, entry points per device and per CPU kernel kind. Tolerances: the same float32
operations in another order, or another exp/log implementation, differ by a few ulps: rtol 1e-5,
atol 1e-6 (float64: 1e-12, 1e-13). bias + ReLU and the ReLU backward have one rounding each, so they
must agree exactly.
"""

import os
import sys

import numpy as np
import pytest
from conftest import assert_allclose

import gpunet as gn
from gpunet.fast import ops, rules

TOL = {np.float32: (1e-5, 1e-6), np.float64: (1e-12, 1e-13)}


def arrays(device, dtype, n=37, c=10, seed=0):
    rng = np.random.default_rng(seed)
    z = gn.to_device((rng.normal(size=(n, c)) * 5).astype(dtype), device)
    labels = gn.to_device(rng.integers(0, c, size=n), device)
    return z, labels, rng


def check_ops_match_core(device, dtype):
    rtol, atol = TOL[dtype]
    z, labels, rng = arrays(device, dtype)
    xp = gn.get_array_module(z)
    # bias + ReLU: max(y + b, 0), as the core's Linear (+ b) then ReLU
    b = gn.to_device(rng.normal(size=z.shape[1]).astype(dtype), device)
    relu = gn.ReLU()
    pre = z.copy()
    pre[0, :3] = xp.asarray(
        [np.nan, np.inf, -np.inf], dtype=dtype
    )  # NaN and inf pass as in the core
    want = relu.forward(pre + b)
    got = ops.bias_relu(pre.copy(), b)
    assert xp.array_equal(got, want, equal_nan=True) and bool(xp.isnan(got[0, 0]))
    # ReLU backward from the output: dy * (x > 0), NaN and inf in dy kept where the core's product
    # keeps them
    dy = gn.to_device(rng.normal(size=z.shape).astype(dtype), device)
    dy[1, :3] = xp.asarray([np.nan, np.inf, -np.inf], dtype=dtype)
    assert xp.array_equal(ops.relu_backward(dy.copy(), got), relu.backward(dy), equal_nan=True)
    check_dropout_matches_core(xp, got, dy, device)
    # softmax cross-entropy: per-row losses averaged, and (softmax - onehot) / N
    loss = gn.SoftmaxCrossEntropy()
    value = loss.forward(z, labels)
    grad, rows = xp.empty_like(z), xp.empty(len(z), dtype)
    ops.softmax_xent(z, labels, grad, rows)
    assert_allclose(grad, loss.backward(), rtol, atol)
    assert_allclose(rows.mean(), value, rtol, atol)
    # strided labels (a view such as y[::2]) must be read as the values they hold, not as dense
    # memory
    z2, grad2, rows2 = z[:19].copy(), xp.empty_like(z[:19]), xp.empty(19, dtype)
    ops.softmax_xent(z2, labels[::2], grad2, rows2)
    loss.forward(z2, labels[::2].copy())
    assert_allclose(grad2, loss.backward(), rtol, atol)


def check_dropout_matches_core(xp, y, dy, device):
    """Dropout's mask and its backward through the ReLU: the core's bits exactly (the mask is 0 or
    1/(1-p), each product one rounding), for a shard whose first unit is not a word's first lane
    (row_start 3 of rows of 10 units: unit 30, lane 2)."""
    for row_start in (0, 3):
        core, fast = gn.Dropout(0.3, seed=7), gn.Dropout(0.3, seed=7)
        core.row_start = fast.row_start = row_start
        for _ in range(2):  # the second mask from the next key
            want_mask = core.new_mask(y)
            buf = xp.empty_like(y)
            got_y = y.copy()
            mask = ops.dropout(fast, got_y, buf)
            assert xp.array_equal(mask, want_mask)
            assert xp.array_equal(got_y, y * want_mask, equal_nan=True)
        relu_out = got_y  # the ReLU's output after the dropout, as the fast step keeps it
        want = (dy * want_mask) * (relu_out > 0)
        got = ops.relu_mask_backward(dy.copy(), relu_out, mask)
        assert xp.array_equal(got, want, equal_nan=True), device


def compiled_kernels():
    """gpunet.fast.numba_kernels, or skip (fail where CI requires numba: GPUNET_REQUIRE_NUMBA=1)."""
    compiled = ops.numba_kernels()
    if compiled is None:
        if os.environ.get("GPUNET_REQUIRE_NUMBA") == "1":
            pytest.fail(
                "GPUNET_REQUIRE_NUMBA=1 but the compiled CPU kernels are unavailable (numba "
                "missing?)"
            )
        pytest.skip(
            "numba is optional for users (pip install 'gpunet[numba]') and not installed here"
        )
    return compiled


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_kernels_match_the_core(dtype):
    compiled_kernels()
    check_ops_match_core("cpu", dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_ops_match_the_core(dtype, monkeypatch):
    monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    check_ops_match_core("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_kernels_match_the_core(dtype):
    check_ops_match_core("gpu", dtype)


@pytest.mark.parametrize("numba", [True, False], ids=["numba", "numpy"])
def test_softmax_xent_is_stable_for_huge_logits(numba, monkeypatch):
    if numba:
        compiled_kernels()
    else:
        monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    z = np.array([[1000.0, 0.0, -1000.0], [-1e4, 1e4, 0.0]], np.float32)
    grad, rows = np.empty_like(z), np.empty(2, np.float32)
    ops.softmax_xent(z, np.array([0, 0]), grad, rows)
    assert np.isfinite(grad).all() and np.isfinite(rows).all()
    np.testing.assert_allclose(rows, [0.0, 2e4], rtol=1e-6)


def test_compiled_softmax_xent_checks_labels():
    compiled_kernels()
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(IndexError, match="label"):
        ops.softmax_xent(z, np.array([0, 3]), np.empty_like(z), np.empty(2, np.float32))


class _FailingImport:
    """A meta-path finder that makes ``import gpunet.fast.numba_kernels`` raise ``error``."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "gpunet.fast.numba_kernels":
            raise self.error
        return None


@pytest.mark.parametrize(
    "error, says, not_says",
    [
        (ImportError("No module named 'numba'"), "pip install 'gpunet[numba]'", "NUMBA_CACHE_DIR"),
        # what numba raises at decoration time when no folder for its on-disk cache is writable
        (
            RuntimeError("cannot cache function 'bias_relu': no locator available for file 'x.py'"),
            "set NUMBA_CACHE_DIR to a writable folder",
            "pip install",
        ),
        (
            OSError("libllvmlite.so: cannot open shared object file"),
            "libllvmlite.so",
            "pip install",
        ),
    ],
)
def test_compiled_kernels_fall_back_and_say_why(monkeypatch, error, says, not_says):
    """Without usable compiled kernels in-place NumPy serves, and ``gpunet info`` gives the cause
    and the cure that fits it: a pip hint only when numba is missing."""
    import gpunet.fast

    monkeypatch.delitem(sys.modules, "gpunet.fast.numba_kernels", raising=False)
    monkeypatch.delattr(gpunet.fast, "numba_kernels", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(error)] + sys.meta_path)
    monkeypatch.setattr(ops, "_numba_why", [])
    assert ops.numba_kernels.__wrapped__() is None
    why = ops._numba_why[-1]
    assert type(error).__name__ in why and str(error) in why, why
    assert says in why and not_says not in why, why


# ------------------------------------------------------------------ every optimizer rule's kernel
RULES = sorted(rules.examples())  # each kind of optimizers.OPTIMIZERS, each combination of flags


def check_rule_matches_core(device, dtype, name, exact):
    """Five steps of ops.update (the kernel generated from the optimizer's rule) against five of the
    core's step, on a matrix and a vector, from the same weights and gradients. ``exact``: the same
    operations in the same order (numba, or the core's rule itself) give the same bits; CUDA may
    contract a multiply-add (TOL then)."""
    rng = np.random.default_rng(2)
    start = [rng.normal(size=(7, 5)).astype(dtype), rng.normal(size=5).astype(dtype)]
    grads = [[rng.normal(size=a.shape).astype(dtype) for a in start] for _ in range(5)]
    runs = []
    for _ in ("core", "fused"):
        params = [gn.Parameter(gn.to_device(a.copy(), device)) for a in start]
        runs.append((params, rules.examples(lambda: params)[name]))
    (core, core_opt), (fused, fused_opt) = runs
    for step in grads:
        for p, q, g in zip(core, fused, step):
            p.grad[...] = q.grad[...] = gn.to_device(g, device)
        core_opt.step()
        k = fused_opt.begin_step()
        for i in range(len(fused)):
            ops.update(fused_opt, i, k)
    rtol, atol = TOL[dtype]
    for i, (p, q) in enumerate(zip(core, fused)):
        for a, b in zip([q.data, *fused_opt.buffers(i)], [p.data, *core_opt.buffers(i)]):
            assert a.dtype == dtype
            if exact:
                assert np.array_equal(gn.to_numpy(a), gn.to_numpy(b)), name
            assert_allclose(a, b, rtol, atol)


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_rule_is_the_core_rule(name, dtype):
    compiled_kernels()
    check_rule_matches_core("cpu", dtype, name, exact=True)


@pytest.mark.parametrize("name", ["gpunet_adamw_wd", "gpunet_rmsprop_wd_centered_momentum"])
def test_without_numba_the_core_rule_runs(name, monkeypatch):
    monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    check_rule_matches_core("cpu", np.float32, name, exact=True)


@pytest.mark.gpu
@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_rule_is_the_core_rule(name, dtype):
    check_rule_matches_core("gpu", dtype, name, exact=False)
