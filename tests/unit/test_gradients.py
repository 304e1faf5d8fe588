"""Central-difference gradient checks in float64 for every layer, every loss and a whole network.

Tolerance 1e-6 on the relative error ||analytic - numeric|| / (||analytic|| + ||numeric||): with
eps = 1e-6 in float64 a correct gradient lands near 1e-9 (see gpunet.gradcheck), a wrong one near 1.
"""

import numpy as np
import pytest

import gpunet as gn
from gpunet.backend import to_device, to_numpy
from gpunet.gradcheck import numerical_gradient, relative_error

TOL = 1e-6


class LinearProbe(gn.losses.Loss):
    """L = sum(c * y): its gradient is c, so a layer's own backward is checked in isolation."""

    def __init__(self, c):
        self.c = c

    def forward(self, y, target=None):
        self._shape = y.shape
        return (y * self.c).sum()

    def backward(self):
        return self.c.copy()


def away_from_zero(rng, shape, margin=0.1):
    """Inputs at least `margin` from 0, so ReLU's kink is never inside a finite difference."""
    x = rng.uniform(margin, 2.0, size=shape)
    return x * rng.choice([-1.0, 1.0], size=shape)


def check(device, model, loss, x, target):
    model = model.to(device) if hasattr(model, "to") else model
    x = to_device(x, device)
    target = to_device(target, device)
    result = gn.gradcheck(model, loss, x, target)
    assert result.ok, f"\n{result}"
    return result


@pytest.mark.parametrize("layer", ["Linear", "ReLU", "Sigmoid", "Tanh", "Softmax"])
def test_layer_gradients(device, layer):
    rng = np.random.default_rng(3)
    if layer == "Linear":
        model = gn.Sequential(gn.Linear(5, 4, init="xavier", rng=1, dtype=np.float64, device="cpu"))
        model.layers[0].b.data[...] = rng.normal(size=4)
        x = rng.normal(size=(6, 5))
        out = 4
    else:
        model = gn.Sequential(getattr(gn, layer)())
        x = away_from_zero(rng, (6, 5))
        out = 5
    c = to_device(rng.normal(size=(6, out)), device)
    res = check(device, model, LinearProbe(c), x, np.zeros(6))
    assert "input" in res.errors


@pytest.mark.parametrize(
    "loss_name", ["SoftmaxCrossEntropy-labels", "SoftmaxCrossEntropy-onehot", "MSELoss", "MAELoss"]
)
def test_loss_gradients(device, loss_name):
    """Each loss checked on a small net, so the loss gradient flows through real layers."""
    rng = np.random.default_rng(4)
    net = gn.mlp([4, 5, 3], activation="tanh", seed=2, dtype=np.float64, device="cpu")
    x = rng.normal(size=(7, 4))
    if loss_name.endswith("labels"):
        loss, target = gn.SoftmaxCrossEntropy(), rng.integers(0, 3, size=7)
    elif loss_name.endswith("onehot"):
        loss, target = gn.SoftmaxCrossEntropy(), np.eye(3)[rng.integers(0, 3, size=7)]
    elif loss_name == "MSELoss":
        loss, target = gn.MSELoss(), rng.normal(size=(7, 3))
    else:
        loss = gn.MAELoss()
        # keep |pred - target| well away from 0 (MAE's kink)
        pred = to_numpy(net.forward(x))
        target = pred + away_from_zero(rng, pred.shape, margin=0.2)
    check(device, net, loss, x, target)


def test_loss_gradient_alone_matches_central_differences():
    """The loss gradients themselves, with no layer in between."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(6, 4))
    labels = rng.integers(0, 4, size=6)
    for loss, target in [
        (gn.SoftmaxCrossEntropy(), labels),
        (gn.MSELoss(), rng.normal(size=(6, 4))),
        (gn.MAELoss(), z + away_from_zero(rng, z.shape, 0.2)),
    ]:
        loss.forward(z, target)
        analytic = loss.backward().copy()
        numeric = numerical_gradient(lambda: loss.forward(z, target), z)
        assert relative_error(analytic, numeric) < TOL, type(loss).__name__


def test_three_layer_network_with_mixed_activations(device):
    rng = np.random.default_rng(6)
    net = gn.mlp(
        [6, 8, 7, 5, 3],
        activation=["relu", "sigmoid", "tanh"],
        seed=7,
        dtype=np.float64,
        device="cpu",
    )
    x = rng.normal(size=(9, 6))
    y = rng.integers(0, 3, size=9)
    res = check(device, net, gn.SoftmaxCrossEntropy(), x, y)
    assert len(res.errors) == 1 + 2 * 4  # input + W and b of four Linear layers


def test_float32_network_is_checked_in_float64():
    """gradcheck copies the model to float64, so float32 models get a meaningful check too."""
    net = gn.mlp([3, 4, 2], seed=0, device="cpu")
    assert net.dtype == np.float32
    rng = np.random.default_rng(0)
    res = gn.gradcheck(
        net,
        gn.SoftmaxCrossEntropy(),
        rng.normal(size=(5, 3)).astype(np.float32),
        rng.integers(0, 2, size=5),
    )
    assert res.ok and net.dtype == np.float32


def test_dropout_gradient_with_its_mask():
    drop = gn.Dropout(0.4, seed=0)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, 8))
    y = drop.forward(x)
    mask = drop._mask
    assert set(np.unique(mask)) == {0.0, 1 / 0.6}
    c = rng.normal(size=x.shape)
    dx = drop.backward(c)
    numeric = numerical_gradient(lambda: (x * mask * c).sum(), x)
    assert relative_error(dx, numeric) < TOL
    np.testing.assert_allclose(y, x * mask)
    drop.eval()
    assert np.array_equal(drop.forward(x), x)


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9])
def test_dropout_keeps_the_right_fraction(device, p):
    """Over 65,536 units the kept fraction has a standard deviation of at most 0.002: 0.01 is 5
    sigma."""
    drop = gn.Dropout(p, seed=1)
    x = gn.to_device(np.ones((128, 512), np.float32), device)
    y = gn.to_numpy(drop.forward(x))
    kept = float((y != 0).mean())
    assert abs(kept - (1 - p)) < 0.01
    np.testing.assert_allclose(y[y != 0], 1 / (1 - p), rtol=1e-6)


def test_gradcheck_catches_a_wrong_backward():
    """The checker must be able to fail: a layer with a sign error in its derivative is reported."""

    class BrokenTanh(gn.Tanh):
        def backward(self, dy):
            return dy * (1 + self._y * self._y)  # wrong: should be 1 - y**2

    net = gn.Sequential(
        gn.Linear(3, 4, rng=0, dtype=np.float64, device="cpu"),
        BrokenTanh(),
        gn.Linear(4, 2, rng=1, dtype=np.float64, device="cpu"),
    )
    rng = np.random.default_rng(8)
    res = gn.gradcheck(
        net, gn.SoftmaxCrossEntropy(), rng.normal(size=(5, 3)), rng.integers(0, 2, size=5)
    )
    assert not res.ok
    assert (
        res.errors["0.W"] > 1e-3 and res.errors["2.W"] < TOL
    )  # only what lies below the bug is wrong
    assert "FAIL" in str(res)


def test_batchnorm_gradients_in_training_mode(device):
    """BatchNorm's matrix-form backward (batch statistics: every row's output depends on every row's
    input) by central differences, inside a network: Linear -> BatchNorm -> tanh -> Linear."""
    rng = np.random.default_rng(10)
    net = gn.mlp(
        [4, 6, 3], activation="tanh", batch_norm=True, seed=3, dtype=np.float64, device="cpu"
    )
    bn = net.layers[1]
    bn.gamma.data[...] = rng.uniform(0.5, 2.0, 6)
    bn.beta.data[...] = rng.normal(size=6)
    x, y = rng.normal(size=(9, 4)), rng.integers(0, 3, size=9)
    result = gn.gradcheck(
        net.to(device),
        gn.SoftmaxCrossEntropy(),
        to_device(x, device),
        to_device(y, device),
        training=True,
    )
    # the bias of the Linear before BatchNorm has no effect (the batch mean removes it): its
    # gradient is 0 up to rounding on both sides, where a relative error means nothing; its size is
    # checked instead
    errors = {k: e for k, e in result.errors.items() if k != "0.b"}
    assert all(e <= TOL for e in errors.values()), f"\n{result}"
    assert {"input", "0.W", "1.gamma", "1.beta", "3.W", "3.b"} <= set(errors)
    loss = gn.SoftmaxCrossEntropy()
    net.train()
    loss.forward(net.forward(to_device(x, device)), to_device(y, device))
    net.backward(loss.backward())
    assert (
        float(np.abs(to_numpy(net.layers[0].b.grad)).max())
        < 1e-12
        < float(np.abs(to_numpy(net.layers[0].W.grad)).max())
    )
    # the eval-mode pass (running statistics: an affine map) checks too
    check(device, net, gn.SoftmaxCrossEntropy(), x, y)


def test_gradcheck_in_training_mode_catches_a_batchnorm_backward_without_the_mean_terms():
    """The check can fail: the eval-mode formula dx = dy * gamma / sigma used in training mode (the
    batch mean's and variance's own dependence on x forgotten) is reported."""

    class Forgetful(gn.BatchNorm):
        def backward(self, dy):
            super().backward(dy)
            return dy * self.gamma.data * self._inv_sigma

    rng = np.random.default_rng(11)
    net = gn.Sequential(
        gn.Linear(4, 5, rng=0, dtype=np.float64, device="cpu"),
        Forgetful(5, dtype=np.float64),
        gn.Tanh(),
        gn.Linear(5, 3, rng=1, dtype=np.float64, device="cpu"),
    )
    res = gn.gradcheck(
        net,
        gn.SoftmaxCrossEntropy(),
        rng.normal(size=(8, 4)),
        rng.integers(0, 3, size=8),
        training=True,
    )
    assert not res.ok and res.errors["0.W"] > 1e-3 and res.errors["1.gamma"] < TOL
