"""CPU vs GPU agreement, written once: gpunet (float32, on `device`) against a plain NumPy float64
implementation of the same formulas. The CPU entry and the GPU twin face the same reference, so
passing both means the two devices agree with each other within twice these tolerances.

Tolerances: float32 has a 6e-8 unit roundoff; a 784-term dot product accumulates a relative error of
order sqrt(784) * 6e-8 ~ 2e-6 in the typical case. We allow 1e-4 relative (atol scaled to each
array's largest entry), which is loose enough for blocked BLAS/cuBLAS summation orders and tight
enough to catch any real bug (a wrong formula is off by O(1)). TF32 stays off (CuPy's default;
CUPY_TF32 unset).
"""

import os

import numpy as np
import pytest
from conftest import assert_allclose

import gpunet as gn

SIZES = [784, 64, 32, 10]
ACTS = ["relu", "tanh"]
LR, GAMMA, STEPS = 0.05, 0.9, 5


def reference(weights, x, y):
    """Forward, loss, gradients and 5 momentum steps, straight from the notes, in float64."""
    W = [w.astype(np.float64) for w in weights]
    v = [np.zeros_like(w) for w in W]
    acts = {
        "relu": (lambda z: np.maximum(z, 0), lambda a: (a > 0).astype(np.float64)),
        "tanh": (np.tanh, lambda a: 1 - a * a),
    }
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


# ---------------------------------------------------------------------- agreement as a user sees it
# fit, evaluate, predict, save and load, on the CPU and the GPU, from the same weights and the same
# batch order (drawn on the host, so identical), with dropout: its masks are a function of
# host-drawn keys, the same bits on every device (gpunet.layers.dropout_bits).
#
# Tolerances: every float32 trajectory here stays within about 1e-6 (relative to each array's
# largest entry) of the float64 trajectory from the same weights; measured on the CPU: 5e-7 for the
# weights after 40 momentum steps with the fast path, 1.2e-6 with the core's, 1e-7 for the losses.
# The CPU and GPU sum in other orders (OpenBLAS and the numba kernels against cuBLAS and the CUDA
# kernels), so each lands somewhere in that band. We allow 1e-4: a hundred times the band, and far
# below what a wrong formula, a skipped update or a wrong batch order gives (1e-2 and more). Counts
# (accuracy, confusion, predicted classes) may flip only on an example at a near tie: at most one
# per epoch and 0.5% of predictions.
FIT_SIZES, FIT_EPOCHS, FIT_TOL = [784, 64, 32, 10], 4, 1e-4


def fit_problem():
    """1,200 noisy examples of 10 random prototypes: hard enough that the loss stays well above
    zero."""
    rng = np.random.default_rng(0)
    protos = rng.random((10, 784))
    y = rng.integers(0, 10, 1200)
    x = np.clip(protos[y] + rng.normal(0, 2.0, (1200, 784)), 0, 1).astype(np.float32)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def fit_on(device, dtype=np.float32):
    """The same network (float32 initial weights, seed 1) trained with ``fit`` on ``device``."""
    from gpunet.training import fit

    x, y, xv, yv = fit_problem()
    net = gn.mlp(FIT_SIZES, seed=1, dropout=0.2, device=device, dtype=dtype)
    net.load_state_dict(
        {
            k: v.astype(dtype)
            for k, v in gn.mlp(FIT_SIZES, seed=1, dropout=0.2, device="cpu").state_dict().items()
        }
    )
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    history = fit(
        net,
        gn.SoftmaxCrossEntropy(),
        opt,
        x.astype(dtype),
        y,
        epochs=FIT_EPOCHS,
        batch_size=100,
        validation=(xv.astype(dtype), yv),
        seed=3,
    )
    return net, history


def assert_same_training(a, b, what):
    """Two (net, history) pairs trained alike agree within FIT_TOL, counts within one example per
    epoch."""
    (net_a, hist_a), (net_b, hist_b) = a, b
    for (name, wa), wb in zip(net_a.state_dict().items(), net_b.state_dict().values()):
        close_to(wa, wb, f"{what}: {name} after {FIT_EPOCHS} epochs")
    assert len(hist_a) == len(hist_b) == FIT_EPOCHS
    for ea, eb in zip(hist_a.epochs, hist_b.epochs):
        for key in ("loss", "val_loss"):
            assert ea[key] == pytest.approx(eb[key], rel=FIT_TOL), (
                f"{what}: epoch {ea['epoch']} {key}"
            )
        assert (
            abs(ea["accuracy"] - eb["accuracy"]) <= 1 / 1000
            and abs(ea["val_accuracy"] - eb["val_accuracy"]) <= 1 / 200
        )
        assert ea["lr"] == eb["lr"]


def close_to(actual, expected, what):
    expected = np.asarray(expected, dtype=np.float64)
    scale = float(np.abs(expected).max()) or 1.0
    assert_allclose(actual, expected, rtol=FIT_TOL, atol=FIT_TOL * scale, err_msg=what)


def test_fit_in_float32_follows_float64(device):
    """The band the tolerances rest on, on each device: float32 ``fit`` against float64 ``fit`` on
    the CPU."""
    assert_same_training(
        fit_on(device), fit_on("cpu", np.float64), f"float32 on {device} vs float64"
    )


@pytest.mark.gpu
def test_fit_evaluate_predict_agree_between_cpu_and_gpu():
    from gpunet.training import evaluate, predict, predict_proba

    cpu, gpu = fit_on("cpu"), fit_on("gpu")
    assert gpu[0].device == "gpu" and cpu[0].device == "cpu"
    assert_same_training(gpu, cpu, "gpu vs cpu")
    _, _, xv, yv = fit_problem()
    loss = gn.SoftmaxCrossEntropy()
    rep_c, rep_g = (evaluate(n, loss, xv, yv, metrics=True) for n, _ in (cpu, gpu))
    assert rep_g["loss"] == pytest.approx(rep_c["loss"], rel=FIT_TOL)
    assert np.abs(np.array(rep_g["confusion_matrix"]) - rep_c["confusion_matrix"]).sum() <= 2
    proba_c, proba_g = (predict_proba(n, xv) for n, _ in (cpu, gpu))
    close_to(proba_g, proba_c, "predict_proba")
    agree = (gn.to_numpy(predict(gpu[0], xv)) == gn.to_numpy(predict(cpu[0], xv))).mean()
    assert agree >= 0.995


@pytest.mark.gpu
def test_a_cpu_model_loads_on_the_gpu_and_back(tmp_path):
    """Saved on the CPU, loaded on the GPU: the same weights bit for bit and the same predictions;
    saved there and loaded on the CPU again: still the same bits."""
    from gpunet.training import predict_proba

    net, _ = fit_on("cpu")
    net.save(tmp_path / "cpu.npz")
    on_gpu = gn.load(tmp_path / "cpu.npz", device="gpu")
    assert on_gpu.device == "gpu"
    for (name, a), b in zip(net.state_dict().items(), on_gpu.state_dict().values()):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    _, _, xv, _ = fit_problem()
    close_to(predict_proba(on_gpu, xv), predict_proba(net, xv), "predictions of the loaded model")
    on_gpu.save(tmp_path / "gpu.npz")
    back = gn.load(tmp_path / "gpu.npz", device="cpu")
    for (name, a), b in zip(net.state_dict().items(), back.state_dict().values()):
        assert np.array_equal(a, b), name
    assert repr(back) == repr(net)


def check_resume_across_devices(first, second, tmp_path):
    """A run interrupted on ``first`` resumes on ``second`` from the checkpoint (weights,
    velocities, order and dropout keys are host data) and ends where an uninterrupted run on
    ``first`` ends, within the agreement tolerance (bit for bit when both are the CPU)."""
    from gpunet.training import Interrupted, fit

    x, y, xv, yv = fit_problem()
    path = tmp_path / "run.npz"

    def train(device, **kw):
        net = gn.mlp(FIT_SIZES, seed=1, dropout=0.2, device=device)
        opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
        history = fit(
            net,
            gn.SoftmaxCrossEntropy(),
            opt,
            x,
            y,
            epochs=3,
            batch_size=100,
            validation=(xv, yv),
            seed=3,
            checkpoint_path=path,
            **kw,
        )
        return net, history

    whole = train(first)
    steps = []
    with pytest.raises(Interrupted) as stopped:
        train(first, interrupt=lambda: steps.append(1) or len(steps) == 15)  # mid epoch 2
    assert (stopped.value.epoch, stopped.value.step) == (1, 5)
    resumed = train(second, resume=True)
    assert resumed[0].device == second
    if first == second == "cpu":
        for (name, a), b in zip(whole[0].state_dict().items(), resumed[0].state_dict().values()):
            assert np.array_equal(a, b), name
    else:
        for (name, a), b in zip(whole[0].state_dict().items(), resumed[0].state_dict().values()):
            close_to(b, gn.to_numpy(a), f"resumed on {second}: {name}")
    assert [e["epoch"] for e in resumed[1].epochs] == [1, 2, 3]


def test_resume_on_the_cpu(tmp_path):
    check_resume_across_devices("cpu", "cpu", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("first, second", [("gpu", "cpu"), ("cpu", "gpu"), ("gpu", "gpu")])
def test_resume_across_devices(first, second, tmp_path):
    check_resume_across_devices(first, second, tmp_path)
