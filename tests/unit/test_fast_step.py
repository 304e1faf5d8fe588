"""The fused training step (gpunet.fast) against the core's step (forward, cost, backward, update),
step by step, and the choice of one or the other.

Tolerance: per step, float32 weights agree within rtol 1e-5, atol 1e-6 (the same operations in
another order, the gradient folded into the update with one rounding fewer); after several steps and
epochs of training the differences grow through the dynamics, so whole runs compare at rtol 1e-4,
atol 1e-5.
"""

import os
import textwrap

import numpy as np
import pytest
from conftest import assert_allclose
from fresh_python import run_code

import gpunet as gn
from gpunet import fast
from gpunet.fast import blas, ops
from gpunet.training import fit

STEP_TOL = dict(rtol=1e-5, atol=1e-6)
RUN_TOL = dict(rtol=1e-4, atol=1e-5)


def problem(device, n=64, sizes=(50, 40, 30, 10), dropout=0.0, seed=3, zero_columns=0.0):
    """x (n, inputs) in [0, 1), a ``zero_columns`` share of its columns zero (as MNIST's border
    pixels), y labels, and a maker of the network."""
    rng = np.random.default_rng(1)
    x = rng.random((n, sizes[0]), dtype=np.float32)
    if zero_columns:  # (drawn only here: the other problems keep their labels)
        x[:, rng.random(sizes[0]) < zero_columns] = 0
    x = gn.to_device(x, device)
    y = gn.to_device(rng.integers(0, sizes[-1], size=n), device)
    return x, y, lambda: gn.mlp(list(sizes), dropout=dropout, seed=seed, device=device)


OPTIMIZERS = {
    "sgd": lambda p: gn.SGD(p, lr=0.1),
    "sgd-wd": lambda p: gn.SGD(p, lr=0.1, weight_decay=1e-3),
    "momentum": lambda p: gn.Momentum(p, lr=0.1, momentum=0.9),
    "momentum-wd": lambda p: gn.Momentum(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: gn.Momentum(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: gn.Adam(p, lr=1e-2),
    "adam-l2": lambda p: gn.Adam(p, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2),
    "adamw": lambda p: gn.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: gn.RMSprop(p, lr=1e-3),
    # not centered: g / sqrt(v - gbar^2) is g / |g| times a constant at step 1, so the fused
    # gradient's rounding in a tiny g comes through whole (test_fast_ops holds the centered kernels
    # to the core's bits)
    "rmsprop-mw": lambda p: gn.RMSprop(p, lr=1e-3, momentum=0.9, weight_decay=1e-2),
}
# a generated kernel a parameter, never folded
ADAM = ("adam", "adam-l2", "adamw", "rmsprop", "rmsprop-mw")


def check_fused_step_is_the_core_step(device, opt_name, dropout, fold, zero_columns=0.0):
    """Three steps of gn.train_step against three of the fused step: loss, logits, weights, every
    param.grad (the fused step must write them too: it leaves the state train_step would) and the
    optimizer's state (scalars exactly, arrays within STEP_TOL). With ``zero_columns``, a first
    layer large enough that the CPU's step multiplies only the lit columns (gpunet.fast.columns),
    which it must have done at every step."""
    sizes = (400, 64, 32, 10) if zero_columns else (50, 40, 30, 10)
    x, y, make = problem(device, sizes=sizes, dropout=dropout, zero_columns=zero_columns)
    runs = {}
    for kind in ("core", "fast"):
        net, loss = make(), gn.SoftmaxCrossEntropy()
        opt = OPTIMIZERS[opt_name](net.parameters())
        for p in net.parameters():  # a gradient left unwritten keeps this, and fails the comparison
            p.grad[...] = np.nan
        step = fast.select(net, loss, opt, y) if kind == "fast" else None
        if kind == "fast":
            assert step is not None
            assert step.fold == fold, f"expected fold={fold} here"
        trace = []
        for _ in range(3):
            if kind == "core":
                # without dropout a second forward gives train_step's logits (dropout's draws move)
                logits = gn.to_numpy(net.forward(x)).copy() if not dropout else None
                value = gn.train_step(net, loss, opt, x, y)
            else:
                value, logits = step(x, y)
                logits = gn.to_numpy(logits).copy() if not dropout else None
                if zero_columns:
                    assert step.columns.lit is not None, "the lit columns' products did not run"
            grads = {
                f"{j}:{p.name}": gn.to_numpy(p.grad).copy() for j, p in enumerate(net.parameters())
            }
            trace.append((float(value), logits, net.state_dict(), grads, opt.state_dict()))
        runs[kind] = trace
    for i, (core, fused) in enumerate(zip(runs["core"], runs["fast"])):
        assert abs(core[0] - fused[0]) <= 1e-5 * abs(core[0]), f"loss of step {i}"
        if not dropout:
            assert_allclose(fused[1], core[1], err_msg=f"logits of step {i}", **STEP_TOL)
        for k in core[2]:
            assert_allclose(fused[2][k], core[2][k], err_msg=f"{k} after step {i}", **STEP_TOL)
        assert sorted(fused[3]) == sorted(core[3])
        for k in core[3]:
            assert_allclose(fused[3][k], core[3][k], err_msg=f"{k}.grad after step {i}", **STEP_TOL)
        scalars = [{k: v for k, v in run[4].items() if k != "arrays"} for run in (fused, core)]
        assert scalars[0] == scalars[1]
        for name, arrays in core[4]["arrays"].items():  # velocities, Adam's moments
            for j, (a, b) in enumerate(zip(fused[4]["arrays"][name], arrays)):
                tol = dict(STEP_TOL)
                if name == "buffer":  # RMSprop's g / sqrt(v): a tiny g's rounding comes through
                    tol["atol"] = 1e-5 * float(np.abs(b).max())
                assert_allclose(a, b, err_msg=f"{name}[{j}] after step {i}", **tol)


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_step_is_the_core_step_cpu(opt_name, dropout):
    fold = blas.routines(np.float32) is not None and opt_name not in ("nesterov",) + ADAM
    check_fused_step_is_the_core_step("cpu", opt_name, dropout, fold)


@pytest.mark.parametrize("opt_name", ["sgd", "momentum-wd", "nesterov", "sgd-wd"])
@pytest.mark.parametrize("kernels", ["numba", "numpy"])
def test_fused_step_over_lit_columns_is_the_core_step_cpu(opt_name, kernels, monkeypatch):
    """A third of the inputs zero in every row: the first layer's products skip them (the fold,
    and Nesterov's per-parameter kernels). Not Adam or RMSprop: their first step is lr * g /
    (|g| + eps), so a gradient that cancels to nearly zero carries the rounding of its sum (whose
    blocks differ here) whole, at lr's scale."""
    if kernels == "numpy":
        monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    elif ops.numba_kernels() is None:
        pytest.skip("numba is not installed")
    fold = blas.routines(np.float32) is not None and opt_name != "nesterov"
    check_fused_step_is_the_core_step("cpu", opt_name, 0.3, fold, zero_columns=0.35)


@pytest.mark.parametrize("opt_name", ["sgd-wd", "momentum-wd", "adam-l2", "adamw"])
def test_fused_step_without_blas_or_numba_is_the_core_step(opt_name, monkeypatch):
    monkeypatch.setattr(blas, "routines", lambda dtype: None)
    monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    check_fused_step_is_the_core_step("cpu", opt_name, 0.3, fold=False)


@pytest.mark.gpu
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_step_is_the_core_step_gpu(opt_name, dropout):
    check_fused_step_is_the_core_step("gpu", opt_name, dropout, fold=False)


def test_fit_fast_and_core_agree_and_keep_the_last_gradients(device):
    """Nesterov is never folded: after fit, param.grad holds the last step's gradients on either
    path."""
    x, y, make = problem(device, n=200, dropout=0.2)
    weights = {}
    for fast_on in (True, False):
        net = make()
        opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=3, batch_size=32, seed=5, fast=fast_on)
        weights[fast_on] = (
            net.state_dict(),
            [gn.to_numpy(p.grad).copy() for p in net.parameters()],
        )
        assert all(np.abs(g).max() > 0 for g in weights[fast_on][1])
    for k in weights[True][0]:
        assert_allclose(weights[True][0][k], weights[False][0][k], err_msg=k, **RUN_TOL)
    for g_fast, g_core in zip(weights[True][1], weights[False][1]):
        assert_allclose(g_fast, g_core, **RUN_TOL)


def test_fit_fast_folded_and_core_agree_cpu():
    """The BLAS update (OpenBLAS here) leaves the last gradients in param.grad, as the core."""
    x, y, make = problem("cpu", n=200, dropout=0.2)
    weights = []
    for fast_on in (True, False):
        net = make()
        opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        h = fit(
            net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=3, batch_size=32, seed=5, fast=fast_on
        )
        weights.append((net.state_dict(), h["loss"], [p.grad.copy() for p in net.parameters()]))
    for k in weights[0][0]:
        assert_allclose(weights[0][0][k], weights[1][0][k], err_msg=k, **RUN_TOL)
    for j, (g_fast, g_core) in enumerate(zip(weights[0][2], weights[1][2])):
        assert np.abs(g_core).max() > 0
        assert_allclose(g_fast, g_core, err_msg=f"grad {j}", **RUN_TOL)
    np.testing.assert_allclose(weights[0][1], weights[1][1], rtol=1e-5)


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda net, loss, opt, y: ("off", loss, opt, y), "GPUNET_FAST=0"),
        (lambda net, loss, opt, y: (net, gn.MSELoss(), opt, y), "MSELoss"),
        (
            lambda net, loss, opt, y: (net, loss, gn.SGD(net.parameters()[:2], lr=0.1), y),
            "exactly the network's",
        ),
        (
            lambda net, loss, opt, y: (net, loss, opt, np.eye(10, dtype=np.float32)[y]),
            "integer class labels",
        ),
        (
            lambda net, loss, opt, y: (
                gn.Sequential(gn.Linear(50, 10), gn.Sigmoid(), gn.Linear(10, 10)),
                loss,
                None,
                y,
            ),
            "Sigmoid",
        ),
        (
            lambda net, loss, opt, y: (gn.Sequential(gn.Linear(50, 10), gn.ReLU()), loss, None, y),
            "does not end",
        ),
        (
            lambda net, loss, opt, y: (gn.mlp([50, 10, 10], batch_norm=True), loss, None, y),
            "layer 1 is BatchNorm, where a Linear was expected",
        ),
        (
            lambda net, loss, opt, y: (
                net,
                loss,
                type("MySGD", (gn.SGD,), {})(net.parameters(), lr=0.1),
                y,
            ),
            "the optimizer is MySGD, not one of sgd, momentum, adam, adamw, rmsprop",
        ),
    ],
)
def test_select_says_why_it_does_not_apply(change, reason, monkeypatch):
    x, y, make = problem("cpu")
    net = make()
    net, loss, opt, y = change(net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.1), y)
    if net == "off":
        monkeypatch.setenv("GPUNET_FAST", "0")
        net = make()
        opt = gn.SGD(net.parameters(), lr=0.1)
    if opt is None:
        opt = gn.SGD(net.parameters(), lr=0.1)
    assert reason in fast.why_not(net, loss, opt, y)
    assert fast.select(net, loss, opt, y) is None


def test_building_the_folded_step_loads_no_numba():
    """Choosing and building the CPU's folded step imports no numba (LLVM, about 60 MB): a run
    refused before its first step (a crafted checkpoint, tests/unit/test_untrusted_files.py) stays
    under its memory bound; the first step loads it (where installed), and the step is the fold."""
    if blas.routines(np.float32) is None:
        pytest.skip("no OpenBLAS in this NumPy: the CPU step does not fold")
    code = textwrap.dedent(
        """
        import sys
        import numpy as np
        import gpunet as gn
        from gpunet import fast
        net = gn.mlp([20, 16, 10], seed=0, device="cpu")
        x = np.ones((8, 20), np.float32)
        y = np.arange(8) % 10
        step = fast.select(net, gn.SoftmaxCrossEntropy(), gn.Momentum(net.parameters(), lr=0.1), y)
        print(step.fold, "numba" in sys.modules)
        step(x, y)
        print("numba" in sys.modules)
        """
    )
    env = dict(os.environ, GPUNET_NUMBA="1")
    done = run_code(code, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    built, stepped = done.stdout.split("\n")[:2]
    assert built == "True False", done.stdout
    assert stepped == str(ops.numba_kernels() is not None), done.stdout


def test_fused_forward_and_loss_are_the_core_ones(device):
    """Inference and evaluation take the fused forward pass and loss; on the CPU the forward is the
    same float operations as the core's (bit for bit), the loss agrees to float32 rounding."""
    x, y, make = problem(device, dropout=0.3)
    net = make().eval()
    fused = fast.forward_for(net)
    assert (
        fused is not None and fast.forward_for(make()) is None
    )  # a training-mode network: the core
    want = net.forward(x)
    if device == "cpu":
        assert np.array_equal(fused(x), want)
    assert_allclose(fused(x), want, **STEP_TOL)
    assert_allclose(
        fast.loss_for(gn.SoftmaxCrossEntropy(), y)(want, y),
        gn.SoftmaxCrossEntropy().forward(want, y),
        **STEP_TOL,
    )
    assert fast.loss_for(gn.MSELoss(), y) is None
    with pytest.raises(ValueError, match=r"x: expected shape \(batch, 50\)"):
        fused(x[:, :10])


def test_predict_and_evaluate_agree_with_the_fast_path_off(monkeypatch):
    from gpunet.training import evaluate, predict_proba

    x, y, make = problem("cpu", n=300, dropout=0.3)
    net = make()
    fit(
        net,
        gn.SoftmaxCrossEntropy(),
        gn.SGD(net.parameters(), lr=0.1),
        x,
        y,
        epochs=2,
        batch_size=32,
    )
    on = (
        predict_proba(net, x),
        evaluate(net, gn.SoftmaxCrossEntropy(), x, y, batch_size=64, metrics=True),
    )
    monkeypatch.setenv("GPUNET_FAST", "0")
    off = (
        predict_proba(net, x),
        evaluate(net, gn.SoftmaxCrossEntropy(), x, y, batch_size=64, metrics=True),
    )
    assert_allclose(on[0], off[0], **STEP_TOL)
    assert on[1]["confusion_matrix"] == off[1]["confusion_matrix"]
    np.testing.assert_allclose(on[1]["loss"], off[1]["loss"], rtol=1e-6)


def check_nan_diverges_on_every_path(device):
    """A NaN reaching the network must reach the loss on the fused path as on the core's (maximum(x,
    0) keeps NaN), so that the divergence guard stops both runs at the same epoch. The front door
       refuses NaN
    in x (tests/system/test_tables.py), so here one first-layer weight is NaN (a damaged start, as a
    NaN input was): both runs stop as "diverged" in epoch 1, with the initial weights restored."""
    x, y, make = problem(device)
    histories = {}
    for fast_on in (False, True):
        net = make()
        net.parameters()[0].data[3, 0] = np.nan
        opt = gn.Momentum(net.parameters(), lr=0.1)
        start = net.state_dict()
        h = fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=4, batch_size=16, fast=fast_on)
        histories[fast_on] = h
        assert h.stop_reason == "diverged" and h.diverged_epoch == 1, (
            fast_on,
            h.stop_reason,
            h["loss"],
        )
        for (
            k,
            v,
        ) in net.state_dict().items():  # the last finished epoch is none: the initial weights
            np.testing.assert_array_equal(v, start[k])
    assert len(histories[True]) == len(histories[False])


def test_nan_diverges_on_every_path_cpu():
    check_nan_diverges_on_every_path("cpu")


@pytest.mark.parametrize("kernels", ["numpy", "numba"])
def test_nan_diverges_on_every_cpu_kernel(monkeypatch, kernels):
    if kernels == "numba" and ops.numba_kernels() is None:
        pytest.skip("numba is not installed")
    if kernels == "numpy":
        monkeypatch.setattr(ops, "numba_kernels", lambda: None)
    check_nan_diverges_on_every_path("cpu")


@pytest.mark.gpu
def test_nan_diverges_on_every_path_gpu():
    check_nan_diverges_on_every_path("gpu")
