"""CPU vs GPU agreement, written once: gpunet (float32, on `device`) against a plain NumPy float64
implementation of the same formulas. The CPU entry and the GPU twin face the same reference, so passing
both means the two devices agree with each other within twice these tolerances.

Tolerances: float32 has a 6e-8 unit roundoff; a 784-term dot product accumulates a relative error of
order sqrt(784) * 6e-8 ~ 2e-6 in the typical case. We allow 1e-4 relative (atol scaled to each array's
largest entry), which is loose enough for blocked BLAS/cuBLAS summation orders and tight enough to catch
any real bug (a wrong formula is off by O(1)). TF32 stays off (CuPy's default; CUPY_TF32 unset).
"""
import os

import numpy as np
import pytest

import gpunet as gn
from conftest import assert_allclose

SIZES = [784, 64, 32, 10]
ACTS = ["relu", "tanh"]
LR, GAMMA, STEPS = 0.05, 0.9, 5


def reference(weights, x, y):
    """Forward, loss, gradients and 5 momentum steps, straight from the notes, in float64."""
    W = [w.astype(np.float64) for w in weights]
    v = [np.zeros_like(w) for w in W]
    acts = {"relu": (lambda z: np.maximum(z, 0), lambda a: (a > 0).astype(np.float64)),
            "tanh": (np.tanh, lambda a: 1 - a * a)}
    record = {}
    for step in range(STEPS):
        hs, a = [x], x
        for i, act in enumerate(ACTS):
            a = acts[act][0](a @ W[2 * i] + W[2 * i + 1])
            hs.append(a)
        z = a @ W[-2] + W[-1]
        zs = z - z.max(1, keepdims=True)
        p = np.exp(zs) / np.exp(zs).sum(1, keepdims=True)
        loss = -np.log(p[np.arange(len(y)), y]).mean()
        delta = (p - np.eye(z.shape[1])[y]) / len(y)
        grads = [None] * len(W)
        for i in range(len(ACTS), -1, -1):
            grads[2 * i] = hs[i].T @ delta
            grads[2 * i + 1] = delta.sum(0)
            if i:
                delta = (delta @ W[2 * i].T) * acts[ACTS[i - 1]][1](hs[i])
        if step == 0:
            record.update(out=z, loss=loss, grads=grads)
        for i in range(len(W)):
            v[i] = GAMMA * v[i] + LR * grads[i]
            W[i] = W[i] - v[i]
    record["weights"] = W
    return record


def close(actual, expected, what):
    scale = float(np.abs(expected).max()) or 1.0
    assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def test_device_matches_numpy_reference(device):
    assert os.environ.get("CUPY_TF32", "0") == "0", "agreement needs full float32 matmuls"
    rng = np.random.default_rng(11)
    x = rng.random((64, 784)).astype(np.float32)
    y = rng.integers(0, 10, size=64)
    net = gn.mlp(SIZES, activation=ACTS, seed=42, device=device)
    cpu_net = gn.mlp(SIZES, activation=ACTS, seed=42, device="cpu")
    for a, b in zip(net.state_dict().values(), cpu_net.state_dict().values()):
        assert np.array_equal(a, b)  # same seed -> bit-identical initial weights on every device
    ref = reference(list(net.state_dict().values()), x.astype(np.float64), y)

    opt = gn.Momentum(net.parameters(), lr=LR, momentum=GAMMA)
    loss = gn.SoftmaxCrossEntropy()
    xd, yd = gn.to_device(x, device), gn.to_device(y, device)
    for step in range(STEPS):
        out = net.forward(xd)
        value = loss.forward(out, yd)
        net.backward(loss.backward())
        if step == 0:
            assert out.dtype == np.float32 and value.dtype == np.float32
            close(out, ref["out"], "forward output")
            assert float(value) == pytest.approx(ref["loss"], rel=1e-5)
            for (name, p), g in zip(net.named_parameters(), ref["grads"]):
                assert p.grad.dtype == np.float32
                close(p.grad, g, f"gradient of {name}")
        opt.step()
    for (name, p), w in zip(net.named_parameters(), ref["weights"]):
        close(p.data, w, f"{name} after {STEPS} momentum steps")
