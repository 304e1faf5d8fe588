"""Optimizers: a momentum step worked out by hand, SGD, Nesterov, weight decay, validation, lr changes."""
import numpy as np
import pytest

import gpunet as gn
from conftest import assert_allclose


def tiny_net(dtype=np.float64):
    """2-2-1 net with hand-picked weights: Linear(2,2) -> ReLU -> Linear(2,1)."""
    net = gn.Sequential(gn.Linear(2, 2, dtype=dtype, device="cpu"), gn.ReLU(), gn.Linear(2, 1, dtype=dtype, device="cpu"))
    net.load_state_dict({
        "0.W": np.array([[0.1, 0.2], [0.3, 0.4]], dtype), "0.b": np.array([0.0, 0.0], dtype),
        "2.W": np.array([[0.5], [-0.25]], dtype), "2.b": np.array([0.1], dtype),
    })
    return net


def train_step(net, opt, x, t):
    loss = gn.MSELoss()
    value = loss.forward(net.forward(x), t)
    net.backward(loss.backward())
    opt.step()
    return float(value)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_two_momentum_steps_by_hand(dtype, rtol):
    """x = [1, 2], target 1, lr = 0.1, gamma = 0.9, MSE; every number below was worked out by hand.

    Step 1: z1 = [0.7, 1.0], out = 0.2, L = 0.64, dL/dout = -1.6;
            dW2 = [[-1.12], [-1.6]], db2 = -1.6; dz1 = [-0.8, 0.4]; dW1 = [[-0.8, 0.4], [-1.6, 0.8]].
            v = 0.1 * grad, w = w - v.
    Step 2: z1 = [1.18, 0.76], out = 0.91376, dL/dout = -0.17248; v = 0.9 v + 0.1 grad; w = w - v.
    """
    net = tiny_net(dtype)
    opt = gn.Momentum(net.parameters(), lr=0.1, momentum=0.9)
    x, t = np.array([[1.0, 2.0]], dtype), np.array([[1.0]], dtype)

    assert train_step(net, opt, x, t) == pytest.approx(0.64, rel=rtol)
    s = net.state_dict()
    assert_allclose(s["0.W"], [[0.18, 0.16], [0.46, 0.32]], rtol=rtol)
    assert_allclose(s["0.b"], [0.08, -0.04], rtol=rtol)
    assert_allclose(s["2.W"], [[0.612], [-0.09]], rtol=rtol)
    assert_allclose(s["2.b"], [0.26], rtol=rtol)

    assert train_step(net, opt, x, t) == pytest.approx((0.91376 - 1) ** 2, rel=rtol * 10)
    s = net.state_dict()
    assert_allclose(s["0.W"], [[0.262555776, 0.12244768], [0.625111552, 0.24489536]], rtol=rtol)
    assert_allclose(s["0.b"], [0.162555776, -0.07755232], rtol=rtol)
    assert_allclose(s["2.W"], [[0.73315264], [0.06710848]], rtol=rtol)
    assert_allclose(s["2.b"], [0.421248], rtol=rtol)
    assert_allclose(opt.velocity(3), [-0.161248], rtol=rtol)


def reference_run(steps, lr, momentum, nesterov, wd, seed=0):
    """The same updates written directly from the formulas, on plain arrays."""
    rng = np.random.default_rng(seed)
    w = [rng.normal(size=(3, 2)), rng.normal(size=2)]
    grads = [[rng.normal(size=a.shape) for a in w] for _ in range(steps)]
    v = [np.zeros_like(a) for a in w]
    for g_step in grads:
        for i, g in enumerate(g_step):
            d = g + wd * w[i]
            v[i] = momentum * v[i] + lr * d
            w[i] = w[i] - (momentum * v[i] + lr * d if nesterov else v[i]) if momentum else w[i] - lr * d
    return w, grads, rng


@pytest.mark.parametrize("momentum, nesterov, wd", [(0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0),
                                                     (0.9, True, 0.0), (0.8, True, 5e-3)])
def test_updates_match_the_formulas(device, momentum, nesterov, wd):
    steps = 4
    expect, grads, _ = reference_run(steps, 0.05, momentum, nesterov, wd)
    rng = np.random.default_rng(0)
    params = [gn.Parameter(gn.to_device(rng.normal(size=(3, 2)).astype(np.float32), device)),
              gn.Parameter(gn.to_device(rng.normal(size=2).astype(np.float32), device))]
    if momentum:
        opt = gn.Momentum(params, lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    else:
        opt = gn.SGD(params, lr=0.05, weight_decay=wd)
    for g_step in grads:
        for p, g in zip(params, g_step):
            p.grad[...] = gn.to_device(g.astype(np.float32), device)
        opt.step()
    for p, e in zip(params, expect):
        assert p.data.dtype == np.float32  # no silent promotion by float64 scalars
        # float32 parameters against a float64 reference after 4 steps: a few ulps of |w| ~ 1
        assert_allclose(p.data, e, rtol=1e-5, atol=1e-6)


def test_lr_can_change_between_steps():
    p = gn.Parameter(np.ones(3, np.float32))
    opt = gn.SGD([p], lr=0.5)
    p.grad[...] = 1
    opt.step()
    opt.lr = 0.25
    opt.step()
    assert_allclose(p.data, [0.25, 0.25, 0.25])


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": 0.0}, r"lr: expected a number in \(0.0"),
    ({"lr": float("nan")}, "lr: expected"),
    ({"lr": "0.1"}, "lr: expected"),
    ({"lr": 0.1, "momentum": 1.0}, r"momentum: expected a number in \[0.0, 1.0\), got 1.0"),
    ({"lr": 0.1, "momentum": -0.1}, "momentum: expected"),
    ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay: expected"),
    ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "nesterov: expected momentum > 0"),
])
def test_hyperparameters_are_validated(kwargs, message):
    p = gn.Parameter(np.ones(2, np.float32))
    with pytest.raises(ValueError, match=message):
        gn.Momentum([p], **kwargs)


def test_lr_setter_validates():
    opt = gn.SGD([gn.Parameter(np.ones(2, np.float32))], lr=0.1)
    with pytest.raises(ValueError, match="lr: expected .* got -1"):
        opt.lr = -1


def test_optimizers_update_the_parameters_in_place_and_keep_one_velocity_each():
    """Nothing is rebound: the arrays a user holds are the ones updated, and each parameter has its own
    velocity, shaped like it, in the order of the parameters."""
    net = gn.mlp([4, 3, 2], seed=0, device="cpu")
    held = [p.data for p in net.parameters()]
    opt = gn.Momentum(net.parameters(), lr=0.1)
    assert [v.shape for v in opt.velocities] == [p.data.shape for p in net.parameters()]
    for p in net.parameters():
        p.grad[...] = 1
    opt.step()
    for p, a, v in zip(net.parameters(), held, opt.velocities):
        assert p.data is a
        np.testing.assert_allclose(v, 0.1)


def test_optimizer_argument_errors():
    with pytest.raises(ValueError, match="params: expected at least one parameter"):
        gn.SGD([], lr=0.1)
    p = gn.Parameter(np.ones(2, np.float32))
    with pytest.raises(ValueError, match="listed twice"):
        gn.SGD([p, p], lr=0.1)
    with pytest.raises(TypeError, match=r"params\[0\]: expected a Parameter"):
        gn.SGD([np.ones(2)], lr=0.1)
