"""The CPU's BLAS update (gpunet.fast.blas.LinearUpdate) against the core's backward and rules.

The gradient product goes straight into ``param.grad``, then the rule in scal/axpy calls (the bias's
product folded into its update): the same rule with fewer roundings, so float32 agrees with the core
to a few ulps of the largest term (rtol 1e-5, atol 1e-6), float64 to 1e-12; the gradients are the
core's own product (the same sgemm), so they agree at least as closely.
"""

import numpy as np
import pytest

import gpunet as gn
from gpunet.fast import blas

TOL = {np.float32: (1e-5, 1e-6), np.float64: (1e-12, 1e-13)}


@pytest.fixture(autouse=True)
def _needs_openblas():
    if blas.routines(np.float32) is None:
        pytest.skip(
            "NumPy here ships no OpenBLAS (or GPUNET_CPU_BLAS=0): the folded update does not exist"
        )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kind, wd", [("sgd", 0.0), ("sgd", 1e-2), ("momentum", 0.0), ("momentum", 1e-2)]
)
def test_folded_update_is_the_core_rule(dtype, kind, wd):
    rtol, atol = TOL[dtype]
    rng = np.random.default_rng(0)
    core, fast = (gn.Linear(7, 5, rng=1, dtype=dtype, device="cpu") for _ in range(2))
    if kind == "sgd":
        opt = gn.SGD(core.parameters(), lr=0.1, weight_decay=wd)
        update = blas.LinearUpdate(fast.W.data, fast.b.data, fast.W.grad, fast.b.grad)
    else:
        opt = gn.Momentum(core.parameters(), lr=0.1, momentum=0.9, weight_decay=wd)
        v = [np.zeros_like(p.data) for p in fast.parameters()]
        update = blas.LinearUpdate(fast.W.data, fast.b.data, fast.W.grad, fast.b.grad, *v)
    for step in range(3):  # several steps, so that the velocity carries over
        x = rng.normal(size=(11, 7)).astype(dtype)
        dy = rng.normal(size=(11, 5)).astype(dtype)
        core.forward(x)
        core.backward(dy)
        opt.step()
        update(x, dy, 0.1, 0.9 if kind == "momentum" else 0.0, wd)
        for p, q in zip(core.parameters(), fast.parameters()):
            np.testing.assert_allclose(
                q.data, p.data, rtol=rtol, atol=atol, err_msg=f"{p.name} after step {step}"
            )
            np.testing.assert_allclose(
                q.grad, p.grad, rtol=rtol, atol=atol, err_msg=f"{p.name}.grad, step {step}"
            )
        if kind == "momentum":
            for vc, vf in zip(opt.velocities, v):
                np.testing.assert_allclose(vf, vc, rtol=rtol, atol=atol)


def test_refuses_what_it_cannot_address():
    W, b = np.zeros((4, 3), np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        blas.LinearUpdate(np.asfortranarray(W), b, W.copy(), b.copy())
    with pytest.raises(ValueError, match=r"gW, gb: expected shapes \(4, 3\) and \(3,\)"):
        blas.LinearUpdate(W, b, W.T.copy(), b.copy())
    update = blas.LinearUpdate(W, b, W.copy(), b.copy())
    with pytest.raises(ValueError, match=r"x, dy: expected C-contiguous"):
        update(np.zeros((2, 4), np.float64), np.zeros((2, 3), np.float32), 0.1)
    with pytest.raises(ValueError, match=r"x, dy"):
        update(np.zeros((2, 5), np.float32), np.zeros((2, 3), np.float32), 0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "kind, wd", [("sgd", 0.0), ("sgd", 1e-2), ("momentum", 0.0), ("momentum", 1e-2)]
)
def test_with_numba_w_and_b_are_stepped_by_the_core_rule_itself(dtype, kind, wd):
    """``rule`` (the optimizer's generated kernel, as the fused step passes it with numba): W and
    its velocity come out the core rule's bits exactly, from the same gradient (the same sgemm);
    b and its velocity are the core rule's bits from b.grad (the sgemv's sum, which is close to
    the core's ``dy.sum(0)``, not equal). W stepped by scal/axpy instead fails the equality:
    OpenBLAS's axpy fuses the multiply-add, the core's rule rounds lr * grad first; b by its two
    sgemv and axpy fails the b equality."""
    from gpunet.fast import ops

    if ops.numba_kernels() is None:
        pytest.skip("numba is not installed: the generated kernels do not exist")
    rng = np.random.default_rng(3)
    core, fast = (gn.Linear(64, 32, rng=1, dtype=dtype, device="cpu") for _ in range(2))
    settings = {"lr": 0.1, "weight_decay": wd} | ({"momentum": 0.9} if kind == "momentum" else {})
    make = gn.SGD if kind == "sgd" else gn.Momentum
    opt, opt_fast = make(core.parameters(), **settings), make(fast.parameters(), **settings)
    v = [opt_fast.buffers(i)[0] for i in range(2)] if kind == "momentum" else []
    update = blas.LinearUpdate(fast.W.data, fast.b.data, fast.W.grad, fast.b.grad, *v)
    for step in range(3):
        x = rng.normal(size=(16, 64)).astype(dtype)
        dy = rng.normal(size=(16, 32)).astype(dtype)
        core.forward(x)
        core.backward(dy)
        opt.step()
        k = opt_fast.begin_step()
        gamma = 0.9 if kind == "momentum" else 0.0
        b_before, vb_before = fast.b.data.copy(), [a.copy() for a in v[1:]]
        update(x, dy, 0.1, gamma, wd, lambda: [ops.update(opt_fast, i, k) for i in (0, 1)])
        assert np.array_equal(fast.W.grad, core.W.grad), f"W.grad, step {step}"
        assert np.array_equal(fast.W.data, core.W.data), f"W after step {step}"
        if kind == "momentum":
            assert np.array_equal(v[0], opt.velocities[0]), f"W's velocity after step {step}"
        rtol, atol = TOL[dtype]
        np.testing.assert_allclose(fast.b.grad, core.b.grad, rtol=rtol, atol=atol)
        # b: the core's rule itself, from the same b.grad and the same b and velocity before
        ks = {name: dtype(value) for name, value in k.items()}
        want = opt.rule(np, b_before, fast.b.grad, vb_before, ks)
        assert np.array_equal(fast.b.data, want[0]), f"b after step {step}"
        np.testing.assert_allclose(fast.b.data, core.b.data, rtol=rtol, atol=atol)
