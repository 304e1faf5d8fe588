"""Fused kernels against their plain xp twins, and the twins against the formulas written naively.

CPU: twin vs naive NumPy float64 formulas. GPU: the CUDA kernel vs the twin on the same CuPy arrays,
and a whole training step with fused kernels on vs off. Tolerances: float32 elementwise results differ
only by operation order and exp/log implementations, a few ulps: rtol 1e-5, atol 1e-6.
"""
import os
import sys

import numpy as np
import pytest

import gpunet as gn
from gpunet import blas, kernels
from conftest import assert_allclose

RTOL, ATOL = 1e-5, 1e-6


def data(seed=0, n=37, c=10, dtype=np.float32):
    rng = np.random.default_rng(seed)
    z = (rng.normal(size=(n, c)) * 5).astype(dtype)
    labels = rng.integers(0, c, size=n)
    return z, labels, rng


def naive_xent(z, labels):
    z = z.astype(np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    loss = -np.log(p[np.arange(len(z)), labels])
    return (p - np.eye(z.shape[1])[labels]) / len(z), loss


def test_twins_match_naive_formulas():
    z, labels, rng = data()
    grad, rows = kernels.softmax_xent_xp(z, labels, np.empty_like(z), np.empty(len(z), np.float32))
    g_ref, l_ref = naive_xent(z, labels)
    assert_allclose(grad, g_ref, RTOL, ATOL)
    assert_allclose(rows, l_ref, RTOL, ATOL)

    b = rng.normal(size=10).astype(np.float32)
    y = z.copy()
    kernels.bias_relu_xp(y, b)
    assert_allclose(y, np.maximum(z + b, 0))

    dy = rng.normal(size=z.shape).astype(np.float32)
    out = kernels.relu_backward_xp(dy.copy(), y)
    assert_allclose(out, dy * (y > 0))

    for nesterov, wd in [(False, 0.0), (True, 0.01)]:
        w, g, v = (rng.normal(size=1000).astype(np.float32) for _ in range(3))
        lr, gamma = np.float32(0.1), np.float32(0.9)
        d = g + wd * w
        v_ref = gamma * v.astype(np.float64) + lr * d
        w_ref = w - (gamma * v_ref + lr * d if nesterov else v_ref)
        kernels.momentum_update_xp(w, g, v, lr, gamma, np.float32(wd), nesterov, np.empty_like(w))
        assert_allclose(v, v_ref, RTOL, ATOL)
        assert_allclose(w, w_ref, RTOL, ATOL)


def test_softmax_xent_is_stable_for_huge_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], np.float32)
    grad, rows = kernels.softmax_xent_xp(z, np.array([0, 0]), np.empty_like(z), np.empty(2, np.float32))
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(rows))
    assert rows[0] == pytest.approx(0.0, abs=1e-6) and rows[1] == pytest.approx(1e5, rel=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_kernels_match_twins(dtype):
    import cupy

    z, labels, rng = data(dtype=dtype)
    zg, lg = cupy.asarray(z), cupy.asarray(labels)
    g1, r1 = cupy.empty_like(zg), cupy.empty(len(z), dtype)
    g2, r2 = cupy.empty_like(zg), cupy.empty(len(z), dtype)
    assert kernels.ENABLED, "fused kernels must be on for this test (unset GPUNET_FUSED)"
    kernels.softmax_xent(zg, lg, g1, r1)          # the CUDA kernel
    kernels.softmax_xent_xp(zg, lg, g2, r2)       # its twin, on the same GPU arrays
    assert_allclose(g1, g2, RTOL, ATOL)
    assert_allclose(r1, r2, RTOL, ATOL)

    b = cupy.asarray(rng.normal(size=10).astype(dtype))
    y1, y2 = zg.copy(), zg.copy()
    kernels.bias_relu(y1, b)
    kernels.bias_relu_xp(y2, b)
    assert_allclose(y1, y2, RTOL, ATOL)

    dy = cupy.asarray(rng.normal(size=z.shape).astype(dtype))
    assert_allclose(kernels.relu_backward(dy.copy(), y1), kernels.relu_backward_xp(dy.copy(), y1), RTOL, ATOL)

    for nesterov, wd in [(False, 0.0), (True, 0.01)]:
        w, g, v = (cupy.asarray(rng.normal(size=100_003).astype(dtype)) for _ in range(3))
        w2, v2 = w.copy(), v.copy()
        t = dtype
        kernels.momentum_update(w, g, v, t(0.1), t(0.9), t(wd), nesterov, cupy.empty_like(w))
        kernels.momentum_update_xp(w2, g, v2, t(0.1), t(0.9), t(wd), nesterov, cupy.empty_like(w))
        assert_allclose(w, w2, RTOL, ATOL)
        assert_allclose(v, v2, RTOL, ATOL)


def run_steps(device, steps=3):
    rng = np.random.default_rng(1)
    x = gn.to_device(rng.random((64, 50), dtype=np.float32), device)
    y = gn.to_device(rng.integers(0, 10, size=64), device)
    net = gn.mlp([50, 40, 30, 10], seed=3, device=device)
    opt = gn.Momentum(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    loss = gn.SoftmaxCrossEntropy()
    for _ in range(steps):
        loss.forward(net.forward(x), y)
        net.backward(loss.backward(), need_input_grad=False)
        opt.step()
    return net.state_dict()


def test_fused_step_matches_plain_step(device, monkeypatch):
    """Three whole training steps with fused kernels on (CUDA on the GPU; numba on the CPU when
    installed), then off (the twins). Same float32 operations in another order: rtol 1e-5."""
    fused = run_steps(device)
    monkeypatch.setattr(kernels, "ENABLED", False)
    plain = run_steps(device)
    for k in fused:
        assert_allclose(fused[k], plain[k], RTOL, ATOL, err_msg=k)


def compiled_kernels():
    """gpunet.cpu_kernels, or skip (fail where CI requires numba: GPUNET_REQUIRE_NUMBA=1)."""
    compiled = kernels._numba_kernels()
    if compiled is None:
        if os.environ.get("GPUNET_REQUIRE_NUMBA") == "1":
            pytest.fail("GPUNET_REQUIRE_NUMBA=1 but the compiled CPU kernels are unavailable (numba missing?)")
        pytest.skip("numba is not installed: the CPU runs the NumPy twins")
    return compiled


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_compiled_cpu_kernels_match_twins(dtype):
    """The numba kernels against their NumPy twins on the same host arrays (rtol 1e-5 for float32:
    one pass instead of several, and another exp/log; 1e-12 for float64)."""
    compiled_kernels()
    rtol, atol = (RTOL, ATOL) if dtype == np.float32 else (1e-12, 1e-14)
    z, labels, rng = data(dtype=dtype, n=130)
    g1, r1, g2, r2 = np.empty_like(z), np.empty(len(z), dtype), np.empty_like(z), np.empty(len(z), dtype)
    kernels.softmax_xent(z, labels, g1, r1)
    kernels.softmax_xent_xp(z, labels, g2, r2)
    assert_allclose(g1, g2, rtol, atol)
    assert_allclose(r1, r2, rtol, atol)

    b = rng.normal(size=10).astype(dtype)
    y1, y2 = z.copy(), z.copy()
    kernels.bias_relu(y1, b)
    kernels.bias_relu_xp(y2, b)
    assert_allclose(y1, y2, rtol, atol)
    dy = rng.normal(size=z.shape).astype(dtype)
    assert_allclose(kernels.relu_backward(dy.copy(), y1), kernels.relu_backward_xp(dy.copy(), y1), rtol, atol)


def test_compiled_softmax_xent_is_stable_and_checks_labels():
    compiled_kernels()
    z = np.array([[1000.0, 0.0, -1000.0], [-5e4, 5e4, 0.0]], np.float32)
    grad, rows = kernels.softmax_xent(z, np.array([0, 0]), np.empty_like(z), np.empty(2, np.float32))
    assert np.all(np.isfinite(grad)) and np.all(np.isfinite(rows))
    assert rows[0] == pytest.approx(0.0, abs=1e-6) and rows[1] == pytest.approx(1e5, rel=1e-6)
    with pytest.raises(IndexError, match="label"):  # compiled code has no bounds checks of its own
        kernels.softmax_xent(z, np.array([0, 3]), np.empty_like(z), np.empty(2, np.float32))


class _FailingImport:
    """A meta-path finder that makes ``import gpunet.cpu_kernels`` raise ``error``."""

    def __init__(self, error):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        if name == "gpunet.cpu_kernels":
            raise self.error
        return None


@pytest.mark.parametrize("error, says, not_says", [
    (ImportError("No module named 'numba'"), "pip install 'gpunet[numba]'", "NUMBA_CACHE_DIR"),
    # what numba raises at decoration time when no folder for its on-disk cache is writable
    (RuntimeError("cannot cache function 'bias_relu': no locator available for file 'x.py'"),
     "set NUMBA_CACHE_DIR to a writable folder", "pip install"),
    (OSError("libllvmlite.so: cannot open shared object file"), "libllvmlite.so", "pip install"),
])
def test_compiled_kernels_fall_back_to_twins_and_say_why(monkeypatch, error, says, not_says):
    """Without usable compiled kernels the twins serve, and ``gpunet info`` gives the cause and the cure
    that fits it: a pip hint only when numba is missing."""
    import gpunet

    monkeypatch.delitem(sys.modules, "gpunet.cpu_kernels", raising=False)
    monkeypatch.delattr(gpunet, "cpu_kernels", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_FailingImport(error)] + sys.meta_path)
    monkeypatch.setattr(kernels, "_numba_why", [])
    assert kernels._numba_kernels.__wrapped__() is None
    why = kernels._numba_why[-1]
    assert type(error).__name__ in why and str(error) in why, why
    assert says in why and not_says not in why, why


def test_fast_cpu_step_matches_per_parameter_formulas():
    """The CPU fast path (flat buffer, in-place ops, fused bias+ReLU) against per-parameter updates."""
    fast = run_steps("cpu")
    rng = np.random.default_rng(1)
    x = rng.random((64, 50), dtype=np.float32).astype(np.float64)
    y = rng.integers(0, 10, size=64)
    W = [a.astype(np.float64) for a in gn.mlp([50, 40, 30, 10], seed=3, device="cpu").state_dict().values()]
    v = [np.zeros_like(a) for a in W]
    for _ in range(3):
        hs = [x]
        for i in range(2):
            hs.append(np.maximum(hs[-1] @ W[2 * i] + W[2 * i + 1], 0))
        z = hs[-1] @ W[4] + W[5]
        delta, _ = naive_xent(z, y)
        grads = [None] * 6
        for i in (2, 1, 0):
            grads[2 * i], grads[2 * i + 1] = hs[i].T @ delta, delta.sum(0)
            if i:
                delta = (delta @ W[2 * i].T) * (hs[i] > 0)
        for i in range(6):
            d = grads[i] + 1e-3 * W[i]
            v[i] = 0.9 * v[i] + 0.1 * d
            W[i] = W[i] - (0.9 * v[i] + 0.1 * d)
    for (k, a), b in zip(fast.items(), W):
        assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.gpu
def test_tf32_is_opt_in():
    """Off by default: a float32 matmul matches float64 to float32 accuracy; on: only to ~1e-3."""
    import cupy

    rng = np.random.default_rng(0)
    a, b = rng.random((512, 512)), rng.random((512, 512))
    exact = a @ b
    ga, gb = cupy.asarray(a, np.float32), cupy.asarray(b, np.float32)
    assert_allclose(ga @ gb, exact, rtol=1e-5)
    gn.backend.set_tf32(True)
    try:
        err = float(np.abs(gn.to_numpy(ga @ gb) - exact).max() / np.abs(exact).max())
    finally:
        gn.backend.set_tf32(False)
    assert_allclose(ga @ gb, exact, rtol=1e-5)
    assert err < 1e-2  # TF32 still close; on GPUs without tensor cores it is simply exact


def test_tf32_without_gpu_names_the_cause():
    if gn.gpu_available():
        pytest.skip("a GPU is usable here")
    with pytest.raises(gn.DeviceError, match="set_tf32 needs a usable GPU"):
        gn.backend.set_tf32(True)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nesterov, wd", [(False, 0.0), (False, 1e-3), (True, 0.0), (True, 1e-3)])
def test_cpu_update_fast_path_matches_twin(dtype, nesterov, wd):
    """The CPU optimizer path (OpenBLAS scal/axpy where NumPy ships OpenBLAS, else the blocked twin)
    against the plain twin, over a buffer large enough to take the fast path. Different operation
    order: a few ulps, rtol 1e-5 for float32 and 1e-12 for float64."""
    rng = np.random.default_rng(0)
    n = 200_003
    w, g, v = (rng.normal(size=n).astype(dtype) for _ in range(3))
    w2, v2 = w.copy(), v.copy()
    t = np.dtype(dtype).type
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    for _ in range(3):
        kernels.momentum_update(w, g, v, t(0.05), t(0.9), t(wd), nesterov, np.empty_like(w))
        kernels.momentum_update_xp(w2, g, v2, t(0.05), t(0.9), t(wd), nesterov, np.empty_like(w))
    assert w.dtype == dtype and v.dtype == dtype
    assert_allclose(v, v2, rtol, rtol)
    assert_allclose(w, w2, rtol, rtol)
    w3 = w.copy()
    kernels.sgd_update(w3, g, t(0.05), t(wd), np.empty_like(w))
    assert_allclose(w3, w - 0.05 * (g + wd * w), rtol, rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
@pytest.mark.parametrize("layout", ["C", "F"])
def test_linear_momentum_step_matches_formulas(dtype, wd, layout):
    """blas.LinearMomentum (sgemm + sgemv + axpy on one layer's slice of the flat buffers; an input
    in Fortran order takes the twin) against the notes' rule in float64, two steps. rtol 1e-5 for
    float32 (K = 64 products summed in another order), 1e-12 for float64."""
    if not blas.gemm_available(np.zeros(1 << 16, dtype)):
        pytest.skip("NumPy here ships no OpenBLAS: the fused path does not exist")
    rng = np.random.default_rng(3)
    n_in, n_out, k = 300, 20, 64
    flat_w, flat_v = rng.normal(size=(2, 7 + n_in * n_out + n_out + 5)).astype(dtype)
    wb, v_wb = flat_w[7:-5], flat_v[7:-5]   # a slice in the middle, like a hidden layer's
    step = blas.LinearMomentum(wb, v_wb, n_in, n_out)
    W, b = wb[:-n_out].reshape(n_in, n_out).astype(np.float64), wb[-n_out:].astype(np.float64)
    vW, vb = v_wb[:-n_out].reshape(n_in, n_out).astype(np.float64), v_wb[-n_out:].astype(np.float64)
    before = flat_w.copy()
    for _ in range(2):
        x = np.asarray(rng.normal(size=(k, n_in)).astype(dtype), order=layout)
        dy = rng.normal(size=(k, n_out)).astype(dtype)
        step(x, dy, 0.05, 0.9, wd)
        x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
        vW = 0.9 * vW + 0.05 * (x64.T @ dy64 + wd * W)
        vb = 0.9 * vb + 0.05 * (dy64.sum(0) + wd * b)
        W, b = W - vW, b - vb
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert wb.dtype == dtype
    assert_allclose(v_wb, np.concatenate([vW.ravel(), vb]), rtol, rtol)
    assert_allclose(wb, np.concatenate([W.ravel(), b]), rtol, rtol)
    assert np.array_equal(flat_w[:7], before[:7]) and np.array_equal(flat_w[-5:], before[-5:])  # neighbours intact


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blas_sgd_update_matches_formula(dtype):
    """blas.sgd_update (one axpy, and one scal with weight decay) against the rule in float64, where
    NumPy ships OpenBLAS; where no BLAS path applies it says so and leaves w alone. Tolerances: one
    rounding per call on values of order 1: 1e-6 (float32) and 1e-14 (float64), doubled for the two
    calls with weight decay."""
    rng = np.random.default_rng(4)
    g, w = rng.normal(size=(2, 60_000)).astype(dtype)
    if blas.routines(w) is None:
        pytest.skip("NumPy here ships no OpenBLAS: the BLAS path does not exist")
    tol = 1e-6 if dtype == np.float32 else 1e-14
    w1 = w.copy()
    assert blas.sgd_update(w1, g, 0.5, 0.0)
    assert_allclose(w1, w - 0.5 * g.astype(np.float64), tol, tol)
    w2 = w.copy()
    assert blas.sgd_update(w2, g, 0.5, 1e-2)
    assert_allclose(w2, (1 - 0.5 * 1e-2) * w.astype(np.float64) - 0.5 * g, 2 * tol, 2 * tol)
    small = w[:100].copy()
    assert not blas.sgd_update(small, g[:100], 0.5, 0.0) and np.array_equal(small, w[:100])


def fit_weights(monkeypatch, fused, **opt_kwargs):
    from gpunet.training import fit

    if not fused:  # no BLAS: the plain backward + step path
        monkeypatch.setattr(blas, "routines", lambda a, min_size=4096: None)
    rng = np.random.default_rng(0)
    x = rng.random((300, 20), dtype=np.float32)
    y = rng.integers(0, 4, size=300)
    net = gn.mlp([20, 128, 64, 4], seed=1, device="cpu")  # > 4096 parameters: large enough for BLAS
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9, **opt_kwargs)
    assert (opt.fused_update(net) is not None) == fused
    fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=2, batch_size=32, seed=0)
    monkeypatch.undo()
    return net.state_dict()


@pytest.mark.parametrize("wd", [0.0, 1e-3])
def test_fused_cpu_training_matches_plain_path(monkeypatch, wd):
    """fit's CPU fast path (GEMM folded into the momentum update) against backward + step: 20 steps,
    float32, so the two orders of rounding may drift a few ulps per step: rtol 1e-4."""
    if not blas.gemm_available(np.zeros(1 << 16, np.float32)):
        pytest.skip("NumPy here ships no OpenBLAS: the fused path does not exist")
    fused = fit_weights(monkeypatch, True, weight_decay=wd)
    plain = fit_weights(monkeypatch, False, weight_decay=wd)
    for k in fused:
        assert_allclose(fused[k], plain[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_fused_update_is_refused_where_it_does_not_apply():
    net = gn.mlp([5, 4, 3], seed=0, device="cpu")
    assert gn.Momentum(net.parameters(), lr=0.1, nesterov=True).fused_update(net) is None
    net2 = gn.mlp([5, 4, 3], seed=0, device="cpu")
    assert gn.Momentum(net2.parameters()[:2], lr=0.1).fused_update(net2) is None  # a subset: plain path
