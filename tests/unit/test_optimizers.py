"""Optimizers: a momentum step worked out by hand, SGD, Nesterov, weight decay, validation, lr
changes; Adam, AdamW and RMSprop against their formulas written out in float64 over 20 steps (every
option), the first Adam step by hand, their state round trip (a resumed rule continues bit for bit),
and, where PyTorch is installed, torch.optim itself."""

import numpy as np
import pytest
from conftest import assert_allclose, optional

import gpunet as gn


def tiny_net(dtype=np.float64):
    """2-2-1 net with hand-picked weights: Linear(2,2) -> ReLU -> Linear(2,1)."""
    net = gn.Sequential(
        gn.Linear(2, 2, dtype=dtype, device="cpu"),
        gn.ReLU(),
        gn.Linear(2, 1, dtype=dtype, device="cpu"),
    )
    net.load_state_dict(
        {
            "0.W": np.array([[0.1, 0.2], [0.3, 0.4]], dtype),
            "0.b": np.array([0.0, 0.0], dtype),
            "2.W": np.array([[0.5], [-0.25]], dtype),
            "2.b": np.array([0.1], dtype),
        }
    )
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
            dW2 = [[-1.12], [-1.6]], db2 = -1.6; dz1 = [-0.8, 0.4]; dW1 = [[-0.8, 0.4], [-1.6,
            0.8]]. v = 0.1 * grad, w = w - v.
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
            w[i] = (
                w[i] - (momentum * v[i] + lr * d if nesterov else v[i])
                if momentum
                else w[i] - lr * d
            )
    return w, grads, rng


@pytest.mark.parametrize(
    "momentum, nesterov, wd",
    [(0.0, False, 0.0), (0.0, False, 0.01), (0.9, False, 0.0), (0.9, True, 0.0), (0.8, True, 5e-3)],
)
def test_updates_match_the_formulas(device, momentum, nesterov, wd):
    steps = 4
    expect, grads, _ = reference_run(steps, 0.05, momentum, nesterov, wd)
    rng = np.random.default_rng(0)
    params = [
        gn.Parameter(gn.to_device(rng.normal(size=(3, 2)).astype(np.float32), device)),
        gn.Parameter(gn.to_device(rng.normal(size=2).astype(np.float32), device)),
    ]
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


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": 0.0}, r"lr: expected a number in \(0.0"),
        ({"lr": float("nan")}, "lr: expected"),
        ({"lr": "0.1"}, "lr: expected"),
        ({"lr": 0.1, "momentum": 1.0}, r"momentum: expected a number in \[0.0, 1.0\), got 1.0"),
        ({"lr": 0.1, "momentum": -0.1}, "momentum: expected"),
        ({"lr": 0.1, "weight_decay": -1.0}, "weight_decay: expected"),
        ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "nesterov: expected momentum > 0"),
    ],
)
def test_hyperparameters_are_validated(kwargs, message):
    p = gn.Parameter(np.ones(2, np.float32))
    with pytest.raises(ValueError, match=message):
        gn.Momentum([p], **kwargs)


def test_lr_setter_validates():
    opt = gn.SGD([gn.Parameter(np.ones(2, np.float32))], lr=0.1)
    with pytest.raises(ValueError, match="lr: expected .* got -1"):
        opt.lr = -1


def test_optimizers_update_the_parameters_in_place_and_keep_one_velocity_each():
    """Nothing is rebound: the arrays a user holds are the ones updated, and each parameter has its
    own velocity, shaped like it, in the order of the parameters."""
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


# ----------------------------------------------------------------------------- Adam, AdamW, RMSprop
def adaptive_reference(
    rule,
    steps,
    w,
    grads,
    lr,
    wd=0.0,
    betas=(0.9, 0.999),
    eps=1e-8,
    alpha=0.99,
    momentum=0.0,
    centered=False,
):
    """The rules' formulas (the issue's and PyTorch's documentation's), written out on float64
    arrays."""
    w = [a.copy() for a in w]
    m, v, gbar, buf = ([np.zeros_like(a) for a in w] for _ in range(4))
    b1, b2 = betas
    for t in range(1, steps + 1):
        for i, g in enumerate(grads[t - 1]):
            if rule == "adamw":
                w[i] = w[i] * (1 - lr * wd)
            else:
                g = g + wd * w[i]
            if rule in ("adam", "adamw"):
                m[i] = b1 * m[i] + (1 - b1) * g
                v[i] = b2 * v[i] + (1 - b2) * g**2
                w[i] = w[i] - lr / (1 - b1**t) * m[i] / (np.sqrt(v[i]) / np.sqrt(1 - b2**t) + eps)
                continue
            v[i] = alpha * v[i] + (1 - alpha) * g**2
            if centered:
                gbar[i] = alpha * gbar[i] + (1 - alpha) * g
            s = np.sqrt(v[i] - gbar[i] ** 2 if centered else v[i]) + eps
            if momentum:
                buf[i] = momentum * buf[i] + g / s
                w[i] = w[i] - lr * buf[i]
            else:
                w[i] = w[i] - lr * g / s
    return w


ADAPTIVE = {  # name: (class, keyword arguments); every option of each rule
    "adam": (gn.Adam, dict(lr=0.01)),
    "adam-betas-eps": (gn.Adam, dict(lr=0.02, betas=(0.8, 0.9), eps=1e-3)),
    "adam-l2": (gn.Adam, dict(lr=0.01, weight_decay=0.1)),
    "adamw": (gn.AdamW, dict(lr=0.01)),
    "adamw-strong": (gn.AdamW, dict(lr=0.01, weight_decay=0.5, betas=(0.5, 0.6))),
    "rmsprop": (gn.RMSprop, dict(lr=0.01)),
    "rmsprop-alpha-l2": (gn.RMSprop, dict(lr=0.01, alpha=0.9, eps=1e-4, weight_decay=0.1)),
    "rmsprop-momentum": (gn.RMSprop, dict(lr=0.01, momentum=0.9)),
    "rmsprop-centered": (gn.RMSprop, dict(lr=0.01, centered=True)),
    "rmsprop-all": (
        gn.RMSprop,
        dict(lr=0.005, alpha=0.95, momentum=0.8, centered=True, weight_decay=0.05),
    ),
}


def adaptive_problem(steps=20, seed=0):
    """Two parameters (a matrix and a vector) and a gradient per step, all float64, drawn on the
    host."""
    rng = np.random.default_rng(seed)
    w = [rng.normal(size=(3, 4)), rng.normal(size=4)]
    return w, [[rng.normal(size=a.shape) for a in w] for _ in range(steps)]


def run_rule(name, w, grads, device, dtype):
    cls, kwargs = ADAPTIVE[name]
    params = [gn.Parameter(gn.to_device(a.astype(dtype), device)) for a in w]
    opt = cls(params, **kwargs)
    for g_step in grads:
        for p, g in zip(params, g_step):
            p.grad[...] = gn.to_device(g.astype(dtype), device)
        opt.step()
    return params, opt


def reference_kwargs(name):
    cls, kwargs = ADAPTIVE[name]
    rule = {gn.Adam: "adam", gn.AdamW: "adamw", gn.RMSprop: "rmsprop"}[cls]
    wd = kwargs.get("weight_decay", 1e-2 if cls is gn.AdamW else 0.0)  # AdamW's default decay
    return rule, {**{k: v for k, v in kwargs.items() if k != "weight_decay"}, "wd": wd}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_rules_follow_their_formulas_over_20_steps(device, name):
    """float64: the same formulas in the same order, so only the last bits may differ (rtol 1e-12
    after 20 steps, against |w| ~ 1); float32 stays float32 and follows within 1e-5 (a few float32
    ulps per step, accumulated)."""
    w, grads = adaptive_problem()
    rule, kwargs = reference_kwargs(name)
    expect = adaptive_reference(rule, 20, w, grads, **kwargs)
    params, _ = run_rule(name, w, grads, device, np.float64)
    for p, e in zip(params, expect):
        assert_allclose(p.data, e, rtol=1e-12, atol=1e-14)
    params, opt = run_rule(name, w, grads, device, np.float32)
    for p, e in zip(params, expect):
        assert p.data.dtype == np.float32  # scalars cast, nothing promoted
        assert_allclose(p.data, e, rtol=1e-5, atol=1e-5)
    assert all(
        a.dtype == np.float32 for arrays in opt.state_dict()["arrays"].values() for a in arrays
    )


def test_adam_first_step_by_hand():
    """At t = 1 the bias corrections undo the zero start: m/(1-b1) = g and v/(1-b2) = g^2, so each
    weight moves by lr * g / (|g| + eps): by lr, against the sign of its gradient, whatever the
    gradient's size."""
    p = gn.Parameter(np.array([1.0, -2.0, 0.5], np.float64))
    p.grad[...] = [4.0, -0.001, 0.0]
    opt = gn.Adam([p], lr=0.1, eps=1e-8)
    opt.step()
    assert opt.t == 1
    # 0.1 * 4 / (4 + 1e-8) and 0.1 * 0.001 / (0.001 + 1e-8); a zero gradient moves nothing
    assert_allclose(p.data, [1.0 - 0.4 / (4 + 1e-8), -2.0 + 1e-4 / (1e-3 + 1e-8), 0.5], rtol=1e-13)
    assert_allclose(opt.m[0], [0.4, -1e-4, 0.0], rtol=1e-13)
    assert_allclose(opt.v[0], [0.016, 1e-9, 0.0], rtol=1e-12)


def test_adamw_decays_the_weights_before_the_step():
    """A zero gradient leaves only the decay: w = w * (1 - lr * wd) exactly (Adam's step is 0 / eps
    = 0)."""
    p = gn.Parameter(np.array([2.0, -1.0], np.float64))
    gn.AdamW([p], lr=0.1, weight_decay=0.5).step()
    assert_allclose(p.data, [2.0 * 0.95, -0.95], rtol=1e-15)


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_state_round_trip_continues_bit_for_bit(device, name):
    """10 steps, state_dict, a fresh optimizer (other options) loads it and takes 10 more: the very
    bits of 20 uninterrupted steps; the state is JSON scalars plus host arrays."""
    import json

    w, grads = adaptive_problem()
    straight, _ = run_rule(name, w, grads, device, np.float32)
    first, opt = run_rule(name, w, grads[:10], device, np.float32)
    state = opt.state_dict()
    json.dumps({k: v for k, v in state.items() if k != "arrays"})
    assert all(type(a) is np.ndarray for arrays in state["arrays"].values() for a in arrays)
    cls, kwargs = ADAPTIVE[name]
    params = [gn.Parameter(p.data.copy()) for p in first]
    opt2 = cls(params, **{**kwargs, "lr": 0.5})
    opt2.load_state_dict(
        json.loads(json.dumps({k: v for k, v in state.items() if k != "arrays"}))
        | {"arrays": state["arrays"]}
    )
    for g_step in grads[10:]:
        for p, g in zip(params, g_step):
            p.grad[...] = gn.to_device(g.astype(np.float32), device)
        opt2.step()
    for a, b in zip(straight, params):
        assert np.array_equal(gn.to_numpy(a.data), gn.to_numpy(b.data))


def test_adaptive_state_of_another_shape_is_refused():
    p = gn.Parameter(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="adam optimizer, got 'rmsprop'"):
        gn.Adam([p]).load_state_dict(gn.RMSprop([p]).state_dict())
    with pytest.raises(ValueError, match=r"expected arrays \['v'\], got \['buffer', 'v'\]"):
        gn.RMSprop([p]).load_state_dict(gn.RMSprop([p], momentum=0.5).state_dict())
    with pytest.raises(TypeError, match="expected m of dtype float32, got float64"):
        gn.Adam([p]).load_state_dict(gn.Adam([gn.Parameter(np.ones(3))]).state_dict())


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda p: gn.Adam(p, betas=(0.9, 1.0)),
            r"betas\[1\]: expected a number in \[0.0, 1.0\), got 1.0",
        ),
        (lambda p: gn.Adam(p, betas=0.9), r"betas: expected a pair \(beta1, beta2\), got 0.9"),
        (lambda p: gn.AdamW(p, eps=-1.0), r"eps: expected a number in \[0.0, inf\), got -1.0"),
        (lambda p: gn.AdamW(p, lr=0.0), r"lr: expected a number in \(0.0"),
        (lambda p: gn.RMSprop(p, alpha=1.0), r"alpha: expected a number in \[0.0, 1.0\), got 1.0"),
        (lambda p: gn.RMSprop(p, momentum=-0.5), "momentum: expected"),
        (lambda p: gn.RMSprop(p, weight_decay=-1), "weight_decay: expected"),
    ],
)
def test_adaptive_hyperparameters_are_validated(make, message):
    with pytest.raises(ValueError, match=message):
        make([gn.Parameter(np.ones(2, np.float32))])
    with pytest.raises(TypeError, match="centered: expected True or False, got 1"):
        gn.RMSprop([gn.Parameter(np.ones(2, np.float32))], centered=1)


TORCH = {  # our rule -> torch.optim's, keyword for keyword
    "adam": "Adam",
    "adam-betas-eps": "Adam",
    "adam-l2": "Adam",
    "adamw": "AdamW",
    "adamw-strong": "AdamW",
    "rmsprop": "RMSprop",
    "rmsprop-alpha-l2": "RMSprop",
    "rmsprop-momentum": "RMSprop",
    "rmsprop-centered": "RMSprop",
    "rmsprop-all": "RMSprop",
}


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_adaptive_rules_equal_torch_optim(name):
    """torch.optim (the bench extra) as an independent oracle, in float64: within 1e-12 after 20
    steps (PyTorch writes m's update as a lerp, one rounding apart)."""
    torch = optional("torch", "bench")
    w, grads = adaptive_problem()
    ours, _ = run_rule(name, w, grads, "cpu", np.float64)
    cls, kwargs = ADAPTIVE[name]
    tensors = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in w]
    opt = getattr(torch.optim, TORCH[name])(tensors, **kwargs)
    for g_step in grads:
        for tensor, g in zip(tensors, g_step):
            tensor.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    for p, tensor in zip(ours, tensors):
        assert_allclose(p.data, tensor.detach().numpy(), rtol=1e-12, atol=1e-14)
