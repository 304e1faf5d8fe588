"""gpunet explain: the recorded numbers are the training path's, two textbook steps worked out by
hand agree (one of them against the article's published figures), the renderers draw each formula in
the notes' sign convention within a terminal's width, and the command line takes every option and
refuses every bad input in one line."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpunet as gn
import gpunet.data.pictures
import gpunet.training  # noqa: F401  (gn.training below)
from gpunet import cli
from gpunet.explain.build import EXAMPLE, build_network
from gpunet.explain.record import SCHEMA, to_json
from gpunet.explain.render import WIDTH, latex, render_json, render_markdown, render_text, steps

ROOT = Path(__file__).resolve().parents[2]

# The classic 2-2-2 worked example (Mazur, "A step by step backpropagation example"): W (inputs,
# outputs)
MAZUR = {
    "layers": [
        {"W": [[0.15, 0.25], [0.20, 0.30]], "b": [0.35, 0.35]},
        {"W": [[0.40, 0.50], [0.45, 0.55]], "b": [0.60, 0.60]},
    ]
}
X, CLASS, ALPHA = [0.05, 0.10], 1, 0.5


def test_the_default_example_is_the_article_s():
    assert (
        EXAMPLE["weights"] == MAZUR and EXAMPLE["input"] == X and EXAMPLE["target"] == [0.01, 0.99]
    )
    assert EXAMPLE["lr"] == ALPHA and EXAMPLE["activation"] == "sigmoid"


def hand_step():
    """One SGD step of MAZUR with a sigmoid hidden layer and softmax cross-entropy, by hand, scalar
    by scalar, in the notes' notation (delta^L = y^D - y^L; Delta w_ij = alpha y_i delta_j; w = w +
    Delta w)."""
    (W1, b1), (W2, b2) = [(layer["W"], layer["b"]) for layer in MAZUR["layers"]]
    x = X
    # forward, layer 1: z_j = b_j + sum_i x_i w_ij, y_j = 1 / (1 + e^-z_j)
    z1 = [b1[j] + x[0] * W1[0][j] + x[1] * W1[1][j] for j in range(2)]
    assert z1[0] == pytest.approx(0.3775, abs=1e-15) and z1[1] == pytest.approx(0.3925, abs=1e-15)
    y1 = [1 / (1 + math.exp(-z)) for z in z1]
    # forward, layer 2 (output): z_j = b_j + sum_i y_i w_ij, y^L = softmax(z)
    z2 = [b2[j] + y1[0] * W2[0][j] + y1[1] * W2[1][j] for j in range(2)]
    e = [math.exp(z) for z in z2]
    yL = [v / sum(e) for v in e]
    yD = [1.0 if j == CLASS else 0.0 for j in range(2)]
    cost = -sum(d * math.log(p) for d, p in zip(yD, yL))
    # backward: output delta, then the hidden delta f'(z) * sum_k delta_k w_jk with f' = y (1 - y)
    d2 = [yD[j] - yL[j] for j in range(2)]
    d1 = [y1[j] * (1 - y1[j]) * sum(d2[k] * W2[j][k] for k in range(2)) for j in range(2)]
    # corrections and the update (N = 1, so the notes' rule is the library's step)
    W2_new = [[W2[i][j] + ALPHA * y1[i] * d2[j] for j in range(2)] for i in range(2)]
    b2_new = [b2[j] + ALPHA * d2[j] for j in range(2)]
    W1_new = [[W1[i][j] + ALPHA * x[i] * d1[j] for j in range(2)] for i in range(2)]
    b1_new = [b1[j] + ALPHA * d1[j] for j in range(2)]
    return {
        "z1": z1,
        "y1": y1,
        "z2": z2,
        "yL": yL,
        "cost": cost,
        "d2": d2,
        "d1": d1,
        "W1": W1_new,
        "b1": b1_new,
        "W2": W2_new,
        "b2": b2_new,
    }


def check_against_hand(rec):
    """rec: a record or its JSON (lists); float64 throughout."""
    hand = hand_step()
    st, lay = rec["stages"], rec["layers"]

    def close(got, want):
        np.testing.assert_allclose(
            np.asarray(got, dtype=np.float64).reshape(np.shape(want)), want, rtol=0, atol=1e-9
        )

    close(st[0]["z"], [hand["z1"]])
    close(st[0]["y"], [hand["y1"]])
    close(st[1]["z"], [hand["z2"]])
    close(rec["y_L"], [hand["yL"]])
    close(rec["loss"]["value"], hand["cost"])
    close(st[1]["delta"], [hand["d2"]])
    close(st[0]["delta"], [hand["d1"]])
    close(lay[0]["params"]["W"]["after"], hand["W1"])
    close(lay[0]["params"]["b"]["after"], hand["b1"])
    close(lay[2]["params"]["W"]["after"], hand["W2"])
    close(lay[2]["params"]["b"]["after"], hand["b2"])


def test_textbook_step_by_hand_float64():
    hand = hand_step()
    assert hand["y1"][0] == pytest.approx(0.593269992, abs=1e-9)  # the textbook's out_h1
    net = build_network(weights=MAZUR, activation="sigmoid", dtype=np.float64)
    rec = gn.explain_step(
        net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=ALPHA), X, [CLASS]
    )
    assert rec["dtype"] == "float64" and rec["sizes"] == [2, 2, 2] and rec["batch"] == 1
    check_against_hand(rec)
    check_against_hand(json.loads(render_json(rec)))


def clone(net):
    def twin_of(layer):
        if isinstance(layer, gn.Linear):
            return gn.Linear(layer.in_features, layer.out_features, dtype=layer.W.data.dtype)
        if isinstance(layer, gn.BatchNorm):
            return gn.BatchNorm(layer.features, dtype=layer.gamma.data.dtype)
        return type(layer)()

    twin = gn.Sequential(*[twin_of(layer) for layer in net.layers])
    twin.load_state_dict(net.state_dict())
    return twin


CASES = [  # sizes, activation, loss, optimizer, batch
    ([2, 2, 2], "sigmoid", gn.SoftmaxCrossEntropy, "sgd", 1),
    ([3, 5, 4, 3], ["relu", "tanh"], gn.SoftmaxCrossEntropy, "momentum", 4),
    ([4, 6, 2], "relu", gn.MSELoss, "nesterov", 3),
    ([2, 3, 2], "tanh", gn.MAELoss, "sgd_wd", 2),
    ([3, 4, 2], "sigmoid", gn.SoftmaxCrossEntropy, "adam", 3),
    ([3, 4, 2], "relu", gn.MSELoss, "adamw", 2),
    ([2, 4, 3], "tanh", gn.SoftmaxCrossEntropy, "rmsprop", 2),
    ([2, 4, 3], "sigmoid", gn.MAELoss, "rmsprop_centered_momentum", 3),
]


def make_opt(kind, params):
    return {
        "sgd": lambda: gn.SGD(params, lr=0.3),
        "sgd_wd": lambda: gn.SGD(params, lr=0.3, weight_decay=0.01),
        "momentum": lambda: gn.Momentum(params, lr=0.1, momentum=0.9),
        "nesterov": lambda: gn.Momentum(params, lr=0.1, momentum=0.8, nesterov=True),
        "adam": lambda: gn.Adam(params, lr=0.01, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.1),
        "adamw": lambda: gn.AdamW(params, lr=0.01, weight_decay=0.5),
        "rmsprop": lambda: gn.RMSprop(params, lr=0.01, alpha=0.9, eps=1e-3),
        "rmsprop_centered_momentum": lambda: gn.RMSprop(
            params, lr=0.01, alpha=0.9, eps=1e-3, momentum=0.5, centered=True, weight_decay=0.1
        ),
    }[kind]()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(
    "sizes, act, loss_cls, opt_kind, n", CASES, ids=[c[3] + "-" + c[2].__name__ for c in CASES]
)
def test_record_equals_the_training_path(sizes, act, loss_cls, opt_kind, n, dtype):
    """explain_step on one network, Sequential.forward/backward + step on an identical one: same
    numbers, twice in a row (so that the second step starts from a non-zero momentum velocity)."""
    rng = np.random.default_rng(1)
    net = gn.mlp(sizes, activation=act, seed=5, dtype=dtype, device="cpu")
    twin = clone(net)
    opt, opt2 = make_opt(opt_kind, net.parameters()), make_opt(opt_kind, twin.parameters())
    loss, loss2 = loss_cls(), loss_cls()
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    for _ in range(2):
        x = rng.normal(size=(n, sizes[0])).astype(dtype)
        y = (
            rng.integers(0, sizes[-1], n)
            if loss_cls is gn.SoftmaxCrossEntropy
            else rng.normal(size=(n, sizes[-1])).astype(dtype)
        )
        rec = gn.explain_step(net, loss, opt, x, y)
        out = twin.forward(x)
        value = loss2.forward(out, y)
        dx = twin.backward(loss2.backward())
        grads = [p.grad.copy() for p in twin.parameters()]
        opt2.step()
        doc = json.loads(render_json(rec))
        for r in (rec, doc):  # the record and its JSON
            np.testing.assert_allclose(np.asarray(r["layers"][-1]["output"], dtype), out, **tol)
            np.testing.assert_allclose(r["loss"]["value"], float(value), **tol)
            np.testing.assert_allclose(np.asarray(r["layers"][0]["grad_input"], dtype), dx, **tol)
            recorded = [
                lay["params"][k] for lay in r["layers"] if lay["params"] for k in ("W", "b")
            ]
            params = twin.parameters()
            assert len(recorded) == len(params)
            arrays = opt2.state_dict()["arrays"]
            for i, (got, p, g) in enumerate(zip(recorded, params, grads)):
                np.testing.assert_allclose(np.asarray(got["grad"], dtype), g, **tol)
                np.testing.assert_allclose(np.asarray(got["after"], dtype), p.data, **tol)
                assert sorted(got["state"]) == sorted(arrays)  # {} for SGD
                for name, state in got["state"].items():
                    np.testing.assert_allclose(np.asarray(state, dtype), arrays[name][i], **tol)
        # the notes' output delta: y^D - y^L (cross-entropy, MSE with no output activation),
        # sign(...) for MAE
        diff = rec["y_D"] - rec["y_L"]
        want = np.sign(diff) if loss_cls is gn.MAELoss else diff
        np.testing.assert_allclose(rec["stages"][-1]["delta"], want, **tol)
        # the update lines the text prints, in the notes' sign convention, hold of the library's
        # numbers
        for lay in rec["layers"]:
            for p in (lay["params"] or {}).values():
                check_update_line(opt_kind, p, tol)
    assert np.any(list(rec["layers"][0]["params"]["W"]["state_before"].values())) == (
        opt_kind not in ("sgd", "sgd_wd")
    )
    text, md = render_text(rec), render_markdown(rec)
    balanced_displays(md)
    assert RULES[opt_kind] in " ".join(text.split())  # a long formula wraps onto the next line
    within_a_terminal(text)
    assert {
        "SoftmaxCrossEntropy": "delta^L = y^D - y^L",
        "MSELoss": "delta^L = y^D - y^L (no output activation",
        "MAELoss": "delta^L = sign(y^D - y^L)",
    }[loss_cls.__name__] in text


# the update rule each optimizer's text prints for W^1, and what it claims of the numbers (Delta =
# -alpha grad)
ADAM = "alpha / (1 - beta1^t) m(W^1) / (sqrt(v(W^1)) / sqrt(1 - beta2^t) + epsilon)"
RULES = {
    "sgd": "W^1 (new) = W^1 + Delta W^1",
    "sgd_wd": "W^1 (new) = W^1 + Delta W^1 - alpha lambda W^1",
    "momentum": "W^1 (new) = W^1 - v(W^1)",
    "nesterov": "W^1 (new) = W^1 - gamma v(W^1) + Delta W^1",
    "adam": f"W^1 (new) = W^1 - {ADAM}",
    "adamw": f"W^1 (new) = (1 - alpha lambda) W^1 - {ADAM}",
    "rmsprop": "W^1 (new) = W^1 - alpha g / (sqrt(v(W^1)) + epsilon)",
    "rmsprop_centered_momentum": "buf(W^1) = mu buf(W^1) + g / (sqrt(v(W^1) - gbar(W^1)^2) + "
    "epsilon)",
}


def check_update_line(kind, p, tol):
    """One parameter's record against the printed rule: SGD (lr 0.3, weight decay 0.01 for sgd_wd),
    momentum (lr 0.1, gamma 0.9) and Nesterov (lr 0.1, gamma 0.8), as make_opt builds them; float64
    arithmetic."""
    if kind.startswith(("adam", "rmsprop")):
        return check_adaptive_line(kind, p, tol)
    before, delta = p["before"].astype(np.float64), p["correction"].astype(np.float64)
    lr, gamma = (0.3, None) if kind.startswith("sgd") else (0.1, 0.9 if kind == "momentum" else 0.8)
    np.testing.assert_allclose(delta, -lr * p["grad"].astype(np.float64), **tol)
    if gamma is None:
        want = before + delta - (lr * 0.01 * before if kind == "sgd_wd" else 0)
    else:
        v = (
            gamma * p["state_before"]["velocities"].astype(np.float64) - delta
        )  # v = gamma v - Delta
        np.testing.assert_allclose(p["state"]["velocities"], v, **tol)
        want = before - v if kind == "momentum" else before - gamma * v + delta
    np.testing.assert_allclose(p["after"], want, **tol)


def check_adaptive_line(kind, p, tol):
    """Adam, AdamW and RMSprop as the text prints them (PyTorch's definitions, torch.optim's docs),
    in NumPy float64 from the recorded state before, with make_opt's settings; t is the step count
    the record shows."""
    f = {k: v.astype(np.float64) for k, v in p.items() if isinstance(v, np.ndarray)}
    s0 = {k: v.astype(np.float64) for k, v in p["state_before"].items()}
    w, delta = f["before"], f["correction"]
    if kind.startswith("adam"):
        lr, (b1, b2), eps, wd = (
            (0.01, (0.8, 0.9), 1e-3, 0.1) if kind == "adam" else (0.01, (0.9, 0.999), 1e-8, 0.5)
        )
        g = -delta / lr + (wd * w if kind == "adam" else 0)
        m, v = b1 * s0["m"] + (1 - b1) * g, b2 * s0["v"] + (1 - b2) * g * g
        t = 1 if not s0["m"].any() else 2  # the test takes two steps
        start = w if kind == "adam" else (1 - lr * wd) * w
        want = start - lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
        np.testing.assert_allclose(p["state"]["m"], m, **tol)
        np.testing.assert_allclose(p["state"]["v"], v, **tol)
    else:
        lr, rho, eps = 0.01, 0.9, 1e-3
        g = -delta / lr + (0.1 * w if kind != "rmsprop" else 0)
        v = rho * s0["v"] + (1 - rho) * g * g
        np.testing.assert_allclose(p["state"]["v"], v, **tol)
        if kind == "rmsprop":
            want = w - lr * g / (np.sqrt(v) + eps)
        else:
            gbar = rho * s0["grad_avg"] + (1 - rho) * g
            buf = 0.5 * s0["buffer"] + g / (np.sqrt(v - gbar * gbar) + eps)
            np.testing.assert_allclose(p["state"]["buffer"], buf, **tol)
            want = w - lr * buf
    np.testing.assert_allclose(p["after"], want, **tol)


def within_a_terminal(text):
    widest = max(text.splitlines(), key=len)
    assert len(widest) <= WIDTH == 100, widest


def batch_norm_oracle(rec, s, eps=1e-5, training=True):
    """The BatchNorm lines explain prints for layer s (1-based; Linear -> BatchNorm -> f), in NumPy
    float64 from the record's z^s, its scale and shift and the delta of u^s: (u, delta^s, Delta
    scale, Delta shift)."""
    st = rec["stages"][s - 1]
    bn = rec["layers"][st["layers"][1]]
    z = st["z"].astype(np.float64)
    scale, shift = (bn["params"][k]["before"].astype(np.float64) for k in ("gamma", "beta"))
    if training:
        mean, var = z.mean(axis=0), z.var(axis=0)  # the batch's mean and biased variance
    else:
        mean, var = 0.0, 1.0  # a new layer's running statistics (the test's eval case)
    sigma = np.sqrt(var + eps)
    xhat = (z - mean) / sigma
    d_u = -rec["loss"]["delta_scale"] * bn["grad_output"].astype(np.float64)
    if training:
        delta = scale / sigma * (d_u - d_u.mean(axis=0) - xhat * (d_u * xhat).mean(axis=0))
    else:
        delta = scale / sigma * d_u
    alpha_c = rec["optimizer"]["lr"] / rec["loss"]["delta_scale"]
    return (
        scale * xhat + shift,
        delta,
        alpha_c * (d_u * xhat).sum(axis=0),
        alpha_c * d_u.sum(axis=0),
        z,
    )


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
def test_batch_norm_step_as_printed(training):
    """A 3-5-4-2 network with BatchNorm after each hidden Linear: the record is the training path's,
    and the printed BatchNorm formulas (forward, delta^s through it, its corrections, the running
    statistics) hold of its numbers, computed again in NumPy float64."""
    net = gn.mlp(
        [3, 5, 4, 2],
        activation=["relu", "sigmoid"],
        seed=2,
        dtype=np.float64,
        device="cpu",
        batch_norm=True,
    )
    net.train(training)
    twin = clone(net)
    twin.train(training)
    x = np.random.default_rng(3).normal(size=(4, 3))
    rec = gn.explain_step(
        net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.2), x, np.array([0, 1, 1, 0])
    )
    loss = gn.SoftmaxCrossEntropy()
    loss.forward(twin.forward(x), np.array([0, 1, 1, 0]))
    twin.backward(loss.backward())
    recorded = [p for lay in rec["layers"] if lay["params"] for p in lay["params"].values()]
    tol = dict(rtol=1e-12, atol=1e-14)  # float64 both ways, the same operations
    for got, p in zip(recorded, twin.parameters(), strict=True):
        np.testing.assert_allclose(got["grad"], p.grad, **tol)
    loose = dict(rtol=1e-10, atol=1e-13)  # the oracle sums in another order
    for s in (1, 2):
        u, delta, d_scale, d_shift, z = batch_norm_oracle(rec, s, training=training)
        bn = rec["layers"][rec["stages"][s - 1]["layers"][1]]
        np.testing.assert_allclose(bn["output"], u, **loose)
        np.testing.assert_allclose(rec["stages"][s - 1]["delta"], delta, **loose)
        np.testing.assert_allclose(bn["params"]["gamma"]["correction"], d_scale, **loose)
        np.testing.assert_allclose(bn["params"]["beta"]["correction"], d_shift, **loose)
        if training:  # PyTorch's running update: momentum 0.1, the variance unbiased
            np.testing.assert_allclose(bn["buffers"]["running_mean"], 0.1 * z.mean(axis=0), **loose)
            np.testing.assert_allclose(
                bn["buffers"]["running_var"], 0.9 + 0.1 * z.var(axis=0, ddof=1), **loose
            )
    text = render_text(rec)
    phrases = [
        "u^1 = scale^1 * (z^1 - mean_n z^1) / sqrt(var_n z^1 + epsilon_BN) + shift^1",
        "delta_u^1 = f'(u^1) * sum_k delta_k^2 w_jk^2",
        "f'(u^1) = [u^1 > 0] (ReLU)",
        "Delta scale^2 = (alpha/c) sum_n delta_u^2 * xhat^2",
        "delta^1 = scale^1 / sigma^1 * (delta_u^1 - mean_n delta_u^1 - xhat^1 * mean_n (delta_u^1 "
        "* xhat^1))",
        "mean_run^2 (new) = (1 - 0.1) mean_run^2 + 0.1 mean_n z^2",
    ]
    if not training:
        phrases = [
            "u^1 = scale^1 * (z^1 - mean_run^1) / sqrt(var_run^1 + epsilon_BN) + shift^1",
            "delta^1 = scale^1 / sigma^1 * delta_u^1",
            "scale^1 (new) = scale^1 + Delta scale^1",
        ]
    flat = " ".join(text.split())
    for phrase in phrases:
        assert phrase in flat, phrase
    assert ("mean_run^1 (new)" in flat) == training  # eval mode leaves the running statistics alone
    within_a_terminal(text)
    check_markdown_displays(render_markdown(rec))


def test_layers_are_copies_and_the_caller_arrays_untouched():
    net = gn.mlp([3, 4, 2], activation="relu", seed=0, device="cpu")
    x = np.ones((2, 3), np.float32)
    rec = gn.explain_step(
        net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.1), x, np.array([0, 1])
    )
    assert (x == 1).all()
    before = rec["layers"][0]["params"]["W"]["before"]
    assert not np.shares_memory(before, net.layers[0].W.data)
    assert not np.array_equal(
        before, net.layers[0].W.data
    )  # the step moved the weights, not the record
    np.testing.assert_array_equal(rec["layers"][0]["params"]["W"]["after"], net.layers[0].W.data)
    # relu's derivative as the library applies it: 1 where z > 0
    np.testing.assert_array_equal(
        rec["layers"][1]["derivative"], (rec["layers"][0]["output"] > 0).astype(np.float32)
    )


def test_json_schema_and_exact_float32_values():
    net = build_network(weights=MAZUR)
    rec = gn.explain_step(
        net, gn.SoftmaxCrossEntropy(), gn.Momentum(net.parameters(), lr=0.5, momentum=0.9), X, 1
    )
    doc = json.loads(render_json(rec))
    assert doc["schema"] == SCHEMA == "gpunet-explain/2"
    assert set(doc) == {
        "schema",
        "dtype",
        "device",
        "batch",
        "sizes",
        "training",
        "input",
        "target",
        "y_D",
        "y_L",
        "prediction",
        "loss",
        "optimizer",
        "layers",
        "stages",
    }
    assert set(doc["loss"]) == {"type", "value", "gradient", "delta_scale"}
    assert doc["optimizer"] == {
        "type": "Momentum",
        "lr": 0.5,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 0.0,
    }
    assert [l["type"] for l in doc["layers"]] == ["Linear", "Sigmoid", "Linear"]
    assert set(doc["layers"][0]) == {
        "index",
        "type",
        "name",
        "config",
        "input",
        "output",
        "grad_output",
        "grad_input",
        "derivative",
        "params",
    }
    assert (
        doc["layers"][1]["config"] == {"type": "Sigmoid"}
        and doc["layers"][0]["config"]["in_features"] == 2
    )
    assert set(doc["layers"][0]["params"]["W"]) == {
        "before",
        "grad",
        "correction",
        "after",
        "change",
        "state_before",
        "state",
    }
    assert [s["layers"] for s in doc["stages"]] == [[0, 1], [2]] and doc["stages"][0][
        "activations"
    ] == ["Sigmoid"]
    assert doc["target"] == [1] and doc["y_D"] == [[0.0, 1.0]]
    # every float reads back as the very float32 the library held
    after = np.asarray(doc["layers"][2]["params"]["W"]["after"], dtype=np.float32)
    np.testing.assert_array_equal(after, net.layers[2].W.data)
    assert to_json(rec) == doc


def test_json_is_strict_nan_is_null():
    """A step that overflows (float32 logits of 1e39: softmax of inf - inf) writes null, never a
    bare NaN."""
    weights = {"layers": [{"W": [[1e38, 1e38], [1e38, 0.0]], "b": [0.0, 0.0]}]}
    net = build_network(weights=weights)
    with np.errstate(all="ignore"):
        rec = gn.explain_step(
            net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.1), [10.0, 0.0], [0]
        )
    assert math.isnan(rec["loss"]["value"])
    doc = json.loads(
        render_json(rec), parse_constant=lambda token: pytest.fail(f"not strict JSON: {token}")
    )
    assert doc["loss"]["value"] is None and None in doc["y_L"][0]
    assert doc == to_json(rec)


def numbers_after(text, label):
    """The numbers printed for the formula ``label`` (on its line, or on the matrix lines below
    it)."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.strip().startswith(label))
    block = [lines[i][lines[i].index(label) + len(label) :]]
    for line in lines[i + 1 :]:
        if not line.startswith("      "):
            break
        block.append(line)
    return [float(v) for v in re.findall(r"-?\d+\.?\d*(?:e[-+]\d+)?", " ".join(block))]


def test_text_prints_the_library_numbers():
    net = build_network(weights=MAZUR, dtype=np.float64)
    rec = gn.explain_step(
        net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=ALPHA), X, [CLASS]
    )
    text = render_text(rec)
    hand = hand_step()
    # 12 digits printed (float64): 1e-11 is the last printed digit's half-unit for numbers below 1
    assert numbers_after(text, "C = -(1/N) sum_n sum_j y^D_nj log y^L_nj") == pytest.approx(
        [hand["cost"]], abs=1e-11
    )
    assert numbers_after(text, "delta^L = y^D - y^L") == pytest.approx(hand["d2"], abs=1e-11)
    assert numbers_after(text, "delta^1 = f'(z^1) * sum_k delta_k^L w_jk^L") == pytest.approx(
        hand["d1"], abs=1e-11
    )
    assert numbers_after(text, "W^1 (new) = W^1 + Delta W^1") == pytest.approx(
        sum(hand["W1"], []), abs=1e-11
    )
    assert numbers_after(text, "W^L (new) = W^L + Delta W^L") == pytest.approx(
        sum(hand["W2"], []), abs=1e-11
    )
    for phrase in (
        "Sign convention (the notes')",
        "f'(z^1) = y^1 (1 - y^1) (sigmoid)",
        "z^1 = b^1 + y^0 W^1",
        "y^L = softmax(z^L)",
        "Delta w_ij = (alpha/c) sum_n y_i^0 delta_j^1",
        "a batch of N = 1, K = 2",
        "dC/dz^L = -delta^L / c (loss.backward())",
    ):
        assert phrase in text, phrase
    # one sign convention: the library's gradient appears in one line (and the prose about it), no
    # other
    formulas = [step[1] for step in steps(rec) if step[0] == "eq"]
    assert [f for f in formulas if "dC/d" in f] == ["dC/dz^L = -delta^L / c"]
    assert not re.search(
        r"\bn\b|sum_i", " ".join(formulas)
    )  # one name for the batch: N, instances n
    within_a_terminal(text)


# --- the notes' squared-error case: Mazur's step, as the article publishes it ---------------------
# "A step by step backpropagation example" (Matt Mazur, 2015): 2-2-2, sigmoid everywhere, E = sum
# 1/2 (t - o)^2, one step of gradient descent with learning rate 0.5. The figures as printed there
# (9 decimals, some 8):
PUBLISHED = {
    "out_h1": 0.593269992,
    "out_o1": 0.75136507,
    "E_total": 0.298371109,
    "w5": 0.35891648,
    "w6": 0.408666186,
    "w7": 0.511301270,
    "w8": 0.561370121,
    "w1": 0.149780716,
    "w2": 0.19956143,
    "w3": 0.24975114,
    "w4": 0.29950229,
}


def mazur_numpy():
    """The article's step in NumPy, written as the article writes it (its names, its chain rule,
    w1..w8 one by one), independently of gpunet; float64."""
    i, t = np.array([0.05, 0.10]), np.array([0.01, 0.99])
    w = dict(zip(range(1, 9), [0.15, 0.20, 0.25, 0.30, 0.40, 0.45, 0.50, 0.55]))
    b1, b2, eta = 0.35, 0.60, 0.5
    out_h = 1 / (
        1 + np.exp(-np.array([w[1] * i[0] + w[2] * i[1] + b1, w[3] * i[0] + w[4] * i[1] + b1]))
    )
    out_o = 1 / (
        1
        + np.exp(
            -np.array(
                [w[5] * out_h[0] + w[6] * out_h[1] + b2, w[7] * out_h[0] + w[8] * out_h[1] + b2]
            )
        )
    )
    d_o = -(t - out_o) * out_o * (1 - out_o)  # dE/dnet_o
    d_h = (
        np.array([d_o[0] * w[5] + d_o[1] * w[7], d_o[0] * w[6] + d_o[1] * w[8]])
        * out_h
        * (1 - out_h)
    )
    new = {
        5: w[5] - eta * d_o[0] * out_h[0],
        6: w[6] - eta * d_o[0] * out_h[1],
        7: w[7] - eta * d_o[1] * out_h[0],
        8: w[8] - eta * d_o[1] * out_h[1],
        1: w[1] - eta * d_h[0] * i[0],
        2: w[2] - eta * d_h[0] * i[1],
        3: w[3] - eta * d_h[1] * i[0],
        4: w[4] - eta * d_h[1] * i[1],
    }
    return {
        "out_h1": out_h[0],
        "out_o1": out_o[0],
        "out_o": out_o,
        "E_total": np.sum(0.5 * (t - out_o) ** 2),
        "delta_o": -d_o,
        "f'_o": out_o * (1 - out_o),
        "delta_h": -d_h,
        **{f"w{k}": v for k, v in new.items()},
    }


def test_mazur_by_numpy_matches_the_published_figures():
    ours = mazur_numpy()
    for name, value in PUBLISHED.items():
        assert ours[name] == pytest.approx(value, abs=6e-9), (
            name
        )  # printed to 8 or 9 decimals: half a unit of 8


def check_mazur(rec):
    """rec: the record or its JSON of --loss mse --output-activation sigmoid, float64, against
    mazur_numpy."""
    ours = mazur_numpy()

    def close(got, want):  # float64 both ways, the sums in another order: 1e-12 is a thousand ulps
        np.testing.assert_allclose(
            np.asarray(got, np.float64).ravel(), np.ravel(want), rtol=0, atol=1e-12
        )

    close(
        rec["loss"]["value"], ours["E_total"]
    )  # the library's MSE of N = 1, K = 2 is the article's E
    close(rec["loss"]["delta_scale"], 1.0)  # c = N K / 2
    close(rec["y_L"], ours["out_o"])
    close(rec["stages"][-1]["delta"], ours["delta_o"])  # delta^L = f'(z^L) (y^D - y^L)
    close(rec["layers"][3]["derivative"], ours["f'_o"])
    close(rec["stages"][0]["delta"], ours["delta_h"])
    close(
        rec["layers"][2]["params"]["W"]["after"],
        [[ours["w5"], ours["w7"]], [ours["w6"], ours["w8"]]],
    )
    close(
        rec["layers"][0]["params"]["W"]["after"],
        [[ours["w1"], ours["w3"]], [ours["w2"], ours["w4"]]],
    )


def test_the_notes_squared_error_case_is_mazur_s_step():
    net = build_network(weights=MAZUR, dtype=np.float64, output_activation="sigmoid")
    assert [type(l).__name__ for l in net.layers] == ["Linear", "Sigmoid", "Linear", "Sigmoid"]
    rec = gn.explain_step(net, gn.MSELoss(), gn.SGD(net.parameters(), lr=ALPHA), X, [0.01, 0.99])
    check_mazur(rec)
    check_mazur(json.loads(render_json(rec)))
    text, ours = render_text(rec), mazur_numpy()
    assert numbers_after(text, "delta^L = f'(z^L) * (y^D - y^L)") == pytest.approx(
        ours["delta_o"], abs=1e-11
    )
    assert numbers_after(text, "f'(z^L) = y^L (1 - y^L) (sigmoid)") == pytest.approx(
        ours["f'_o"], abs=1e-11
    )
    cost = "C = 1/(N K) sum_n sum_j (y^D_nj - y^L_nj)^2 (mean squared error)"
    assert numbers_after(text, cost) == pytest.approx([ours["E_total"]], abs=1e-11)
    assert numbers_after(text, "W^L (new) = W^L + Delta W^L") == pytest.approx(
        [ours["w5"], ours["w7"], ours["w6"], ours["w8"]], abs=1e-11
    )
    assert "y^L = 1 / (1 + e^(-z^L)) (sigmoid)" in text and "c = N K / 2 = 1" in text
    md = render_markdown(rec)
    assert r"\delta^{L} = f'(z^{L}) \odot (y^{D} - y^{L})" in md
    within_a_terminal(text)


def same_record(got, want, tol, path="record"):
    """Two JSON records alike: the same keys, strings and flags, numbers within ``tol`` (the device
    aside)."""
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), path
        for key in set(want) - {"device"}:
            same_record(got[key], want[key], tol, f"{path}.{key}")
    elif isinstance(want, (str, bool)) or want is None:
        assert got == want, path
    elif isinstance(want, list) and any(isinstance(v, (dict, str)) for v in want):
        assert len(got) == len(want), path
        for i, (a, b) in enumerate(zip(got, want)):
            same_record(a, b, tol, f"{path}[{i}]")
    else:  # a number, or nested lists of numbers
        np.testing.assert_allclose(
            np.asarray(got, np.float64), np.asarray(want, np.float64), **tol, err_msg=path
        )


def test_the_record_on_each_device(device):
    """One checker, two entry points: Mazur's step (float64) and a BatchNorm + Adam step (float32)
    recorded on ``device`` agree with the CPU's record. Tolerances: float64 both ways, 1e-12 (the
    sums may run in another order); float32, rtol 1e-4 and atol 1e-6, the CPU/GPU band of
    test_agreement.py."""
    net = build_network(weights=MAZUR, dtype=np.float64, output_activation="sigmoid").to(device)
    rec = gn.explain_step(net, gn.MSELoss(), gn.SGD(net.parameters(), lr=ALPHA), X, [0.01, 0.99])
    assert rec["device"] == gn.backend.device_of(net.parameters()[0].data)
    check_mazur(rec)

    def bn_adam(dev):
        net = gn.mlp([3, 5, 2], seed=4, batch_norm=True, device=dev)
        x, y = np.arange(12, dtype=np.float32).reshape(4, 3) / 10, np.array([0, 1, 0, 1])
        return to_json(
            gn.explain_step(net, gn.SoftmaxCrossEntropy(), gn.Adam(net.parameters(), lr=0.01), x, y)
        )

    here, cpu = bn_adam(device), bn_adam("cpu")
    same_record(here, cpu, dict(rtol=1e-4, atol=1e-6))
    # Adam's moments are far below atol: held relatively where nothing cancels (W^L's, from y^1 and
    # delta^L)
    for name in ("m", "v"):
        np.testing.assert_allclose(
            here["layers"][-1]["params"]["W"]["state"][name],
            cpu["layers"][-1]["params"]["W"]["state"][name],
            rtol=1e-3,
            atol=0,
        )


def test_cli_mazur_step_float32_and_float64(capsys):
    rc, out, err = run_main(
        ["--loss", "mse", "--output-activation", "sigmoid", "--float64", "--json"], capsys
    )
    assert rc == 0, err
    check_mazur(json.loads(out))
    rc, out, err = run_main(["--loss", "mse", "--output-activation", "sigmoid"], capsys)
    assert rc == 0, err
    # float32, 6 significant digits printed: half a unit of the 6th digit (5e-7) plus float32's
    # rounding
    assert numbers_after(out, "W^L (new) = W^L + Delta W^L")[0] == pytest.approx(
        PUBLISHED["w5"], abs=6e-7
    )
    cost = "C = 1/(N K) sum_n sum_j (y^D_nj - y^L_nj)^2 (mean squared error)"
    assert numbers_after(out, cost) == pytest.approx([PUBLISHED["E_total"]], abs=6e-7)


@pytest.mark.parametrize(
    "formula, tex",
    [
        (
            "dC/dW^1 = (y^0)^T dC/dz^1",
            r"\frac{\partial C}{\partial W^{1}} = (y^{0})^{T} \frac{\partial C}{\partial z^{1}}",
        ),
        ("y^1 = 1 / (1 + e^(-z^1))", r"y^{1} = 1 / (1 + e^{-z^{1}})"),
        (
            "sum_k delta_k^L w_jk^L = delta^L (W^L)^T",
            r"\sum_{k} \delta_{k}^{L} w_{jk}^{L} = \delta^{L} (W^{L})^{T}",
        ),
        (
            "W^1 (new) = W^1 - gamma v(W^1) + Delta W^1",
            r"W^{1} (\text{new}) = W^{1} - \gamma v(W^{1}) + \Delta W^{1}",
        ),
        ("m = beta1 m + sqrt(v_t) * g", r"m = \beta_{1} m + \sqrt{v_{t}} \odot g"),
        ("argmax_j y^L_nj", r"\arg\max_{j} y^{L}_{nj}"),
    ],
)
def test_latex_is_derived_from_the_plain_formula(formula, tex):
    assert latex(formula) == tex


def balanced_displays(md):
    """The $$ ... $$ displays of a markdown report, each checked for balanced braces and
    matrices."""
    displays = re.findall(r"\$\$(.*?)\$\$", md, flags=re.S)
    assert md.count("$$") == 2 * len(displays) and len(displays) > 20
    for d in displays:
        assert d.count("{") == d.count("}"), d
        assert d.count(r"\begin{bmatrix}") == d.count(r"\end{bmatrix}"), d
    return displays


def check_markdown(md):
    balanced_displays(md)  # asserts that every display is balanced
    for formula in (
        r"\delta^{L} = y^{D} - y^{L}",
        r"z^{1} = b^{1} + y^{0} W^{1}",
        r"\frac{\partial C}{\partial z^{L}}",
        r"W^{1} (\text{new})",
        r"\mathrm{softmax}",
    ):
        assert formula in md, formula
    return check_markdown_displays(md)


def check_markdown_displays(md):
    """Every plain formula was turned into LaTeX: no bare Greek names, plain scripts or plain
    fractions left."""
    displays = balanced_displays(md)
    for d in displays:
        maths = re.sub(r"\\text\{[^}]*\}", "", d)  # the words of a note are prose
        assert not re.search(
            r"(?<!\\)\b(alpha|gamma|delta|lambda|sum|dC|epsilon|sigma|beta1)\b|\^\(|\^[A-Za-z0-9]",
            maths,
        ), d
    return displays


def test_markdown_has_the_formulas_in_latex():
    net = build_network(weights=MAZUR)
    md = render_markdown(
        gn.explain_step(net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.5), X, 1)
    )
    assert md.startswith("# One training step, explained")
    displays = check_markdown(md)
    assert any(r"\begin{bmatrix} 0.15 & 0.25 \\ 0.2 & 0.3 \end{bmatrix}" in d for d in displays)


def test_large_matrices_are_summarised():
    net = gn.mlp([784, 16, 10], seed=0, device="cpu")
    x = np.random.default_rng(0).random((1, 784)).astype(np.float32)
    rec = gn.explain_step(net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.1), x, [3])
    text = render_text(rec)
    assert "shape (784, 16), min " in text and "largest |entries|" in text
    within_a_terminal(text)
    assert r"\text{shape (784, 16)" in render_markdown(rec)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda net, opt: gn.explain_step(
                net, gn.SoftmaxCrossEntropy(), opt, [1.0, 2.0, 3.0], [0]
            ),
            r"x: expected shape \(N, 2\) or \(2,\), got \(1, 3\)",
        ),
        (
            lambda net, opt: gn.explain_step(
                net, gn.SoftmaxCrossEntropy(), opt, [1.0, 2.0], [0, 1]
            ),
            "y: expected 1 targets",
        ),
        (
            lambda net, opt: gn.explain_step(net, gn.SoftmaxCrossEntropy(), opt, [1.0, 2.0], [7]),
            r"target: expected labels in \[0, 1\]",
        ),
        (
            lambda net, opt: gn.explain_step(
                net,
                gn.SoftmaxCrossEntropy(),
                gn.SGD(gn.mlp([2, 2]).parameters(), lr=0.1),
                [1.0, 2.0],
                [0],
            ),
            "optimizer: expected it to hold exactly",
        ),
        (
            lambda net, opt: build_network(sizes=[2, 3, 2], weights=MAZUR),
            "sizes: expected 2 2 2 to match",
        ),
        (
            lambda net, opt: build_network(weights={"layers": [{"W": [[1, 2]], "b": [0]}]}),
            r"layers\[0\]\.b: expected 2",
        ),
        (
            lambda net, opt: build_network(
                weights={"layers": [{"W": [[1], [2]], "b": [0]}, {"W": [[1], [1]], "b": [0]}]}
            ),
            r"layers\[1\]\.W: expected 1 rows \(the previous layer's outputs\), got 2",
        ),
        (lambda net, opt: build_network(weights=[1, 2]), "weights: expected"),
        (
            lambda net, opt: gn.explain_step(
                gn.Sequential(gn.Tanh(), gn.Linear(2, 2)), gn.MSELoss(), opt, X, [1.0, 0.0]
            ),
            "net: expected a Sequential that starts with a Linear layer",
        ),
        (
            lambda net, opt: build_network(weights=MAZUR, output_activation="relu"),
            "output_activation: expected one of sigmoid, tanh or None, got 'relu'",
        ),
        (
            lambda net, opt: gn.explain_step(
                build_network(weights=MAZUR, output_activation="tanh"),
                gn.SoftmaxCrossEntropy(),
                opt,
                X,
                [1],
            ),
            "net: expected a Linear output layer for SoftmaxCrossEntropy",
        ),
    ],
)
def test_api_errors_name_the_argument(call, message):
    net = gn.mlp([2, 2, 2], seed=0, device="cpu")
    with pytest.raises(ValueError, match=message):
        call(net, gn.SGD(net.parameters(), lr=0.1))


# --- the command line -----------------------------------------------------------------------------
def run_main(args, capsys):
    """``gpunet explain ...`` in process: (exit status, stdout, stderr)."""
    try:
        rc = cli.main(["explain", *map(str, args)])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "mazur.json"
    path.write_text(json.dumps(MAZUR))
    return path


def test_cli_textbook_step_json_float64(weights_file, capsys):
    rc, out, err = run_main(
        [
            "--weights",
            weights_file,
            "--input",
            *X,
            "--target",
            CLASS,
            "--lr",
            ALPHA,
            "--float64",
            "--json",
        ],
        capsys,
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["sizes"] == [2, 2, 2] and doc["dtype"] == "float64"
    check_against_hand(doc)


def test_cli_no_flags_explains_the_default_example(capsys):
    rc, out, err = run_main([], capsys)
    assert rc == 0, err
    assert "2-2-2 network: Linear(2, 2) -> Sigmoid -> Linear(2, 2)" in out and "alpha = 0.5" in out
    assert (
        "float32" in out
        and "delta^L = y^D - y^L" in out
        and "No network given, so the default example" in out
    )
    # the same numbers as the API on the article's network, input and target
    net = build_network(weights=MAZUR)
    rec = gn.explain_step(
        net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=ALPHA), X, [0.01, 0.99]
    )
    assert out == render_text(rec, intro=EXAMPLE["about"])
    within_a_terminal(out)
    # with --sizes, the weights are drawn from the seed (0 unless --seed says otherwise)
    rc, out, err = run_main(["--sizes", 2, 2, 2, "--input", 0.05, 0.1, "--target", 1], capsys)
    assert rc == 0, err
    net = gn.mlp([2, 2, 2], activation="sigmoid", seed=0, device="cpu")
    rec = gn.explain_step(
        net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.5), [0.05, 0.1], 1
    )
    assert out == render_text(rec) and "No network given" not in out


def test_cli_every_option_against_the_api(capsys):
    args = [
        "--sizes",
        3,
        4,
        4,
        2,
        "--activation",
        "relu",
        "tanh",
        "--loss",
        "mse",
        "--optimizer",
        "momentum",
        "--lr",
        0.1,
        "--momentum",
        0.5,
        "--seed",
        3,
        "--input",
        1,
        2,
        3,
        4,
        5,
        6,
        "--target",
        0.5,
        -1,
        2,
        0,
        "--json",
    ]
    rc, out, err = run_main(args, capsys)
    assert rc == 0, err
    doc = json.loads(out)
    assert (
        doc["batch"] == 2 and doc["loss"]["type"] == "MSELoss" and doc["loss"]["delta_scale"] == 2.0
    )
    assert doc["optimizer"] == {
        "type": "Momentum",
        "lr": 0.1,
        "momentum": 0.5,
        "nesterov": False,
        "weight_decay": 0.0,
    }
    assert [l["type"] for l in doc["layers"]] == ["Linear", "ReLU", "Linear", "Tanh", "Linear"]
    net = gn.mlp([3, 4, 4, 2], activation=["relu", "tanh"], seed=3, device="cpu")
    rec = gn.explain_step(
        net,
        gn.MSELoss(),
        gn.Momentum(net.parameters(), lr=0.1, momentum=0.5),
        np.arange(1, 7, dtype=np.float32).reshape(2, 3),
        np.array([[0.5, -1], [2, 0]], np.float32),
    )
    assert doc == json.loads(render_json(rec))
    # a different seed, a different start
    reseeded = [4 if a == 3 and args[i - 1] == "--seed" else a for i, a in enumerate(args)]
    _, other, _ = run_main(reseeded, capsys)
    assert (
        json.loads(other)["layers"][0]["params"]["W"]["before"]
        != doc["layers"][0]["params"]["W"]["before"]
    )


def test_cli_batch_norm(capsys):
    args = [
        "--sizes",
        2,
        3,
        2,
        "--batch-norm",
        "--activation",
        "tanh",
        "--input",
        1,
        2,
        3,
        4,
        "--target",
        0,
        1,
    ]
    rc, out, err = run_main(args + ["--json"], capsys)
    assert rc == 0, err
    net = gn.mlp([2, 3, 2], activation="tanh", seed=0, device="cpu", batch_norm=True)
    rec = gn.explain_step(
        net,
        gn.SoftmaxCrossEntropy(),
        gn.SGD(net.parameters(), lr=0.5),
        np.array([[1, 2], [3, 4]], np.float32),
        np.array([0, 1]),
    )
    assert json.loads(out) == to_json(rec)
    assert [l["type"] for l in rec["layers"]] == ["Linear", "BatchNorm", "Tanh", "Linear"]
    rc, out, err = run_main(args, capsys)
    assert rc == 0 and "delta_u^1 = f'(u^1) * sum_k delta_k^L w_jk^L" in out
    within_a_terminal(out)


@pytest.mark.parametrize(
    "kind, cls", [("adam", gn.Adam), ("adamw", gn.AdamW), ("rmsprop", gn.RMSprop)]
)
def test_cli_adaptive_optimizers_use_their_own_defaults(kind, cls, capsys):
    rc, out, err = run_main(["--optimizer", kind, "--json"], capsys)
    assert rc == 0, err
    net = build_network(weights=MAZUR)
    rec = gn.explain_step(net, gn.SoftmaxCrossEntropy(), cls(net.parameters()), X, [0.01, 0.99])
    assert json.loads(out) == to_json(rec)  # the library's lr (1e-3, 1e-2), not the example's 0.5
    rc, out, err = run_main(["--optimizer", kind, "--lr", 0.25, "--format", "markdown"], capsys)
    assert rc == 0, err
    assert "alpha = 0.25" in out and r"\sqrt{v(W^{1})" in out


def test_cli_mae_sgd_class_target_and_markdown(capsys):
    rc, out, err = run_main(
        ["--sizes", 2, 3, "--loss", "mae", "--input", 1, 1, "--target", 2, "--json"], capsys
    )
    assert rc == 0, err
    doc = json.loads(out)
    assert (
        doc["y_D"] == [[0.0, 0.0, 1.0]] and doc["loss"]["type"] == "MAELoss"
    )  # a class becomes one-hot for MAE
    rc, md, err = run_main(["--input", 0.05, 0.1, "--target", 1, "--format", "markdown"], capsys)
    assert rc == 0, err
    check_markdown(md)
    rc, out, err = run_main(["--input", 0.05, 0.1, "--target", 0.25, 0.75, "--json"], capsys)
    assert rc == 0 and json.loads(out)["y_D"] == [
        [0.25, 0.75]
    ]  # cross-entropy with a probability row


@pytest.fixture(scope="module")
def model_and_image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain-model")
    net = gn.mlp([784, 16, 10], dropout=0.2, seed=0, device="cpu")
    net.save(folder / "model.npz")
    image = np.zeros((28, 28), np.float32)
    image[6:22, 12:16] = 1.0  # a vertical stroke: a "1" of sorts
    np.save(folder / "digit.npy", image)
    return folder / "model.npz", folder / "digit.npy"


def test_cli_model_and_image(model_and_image, capsys):
    model, image = model_and_image
    rc, out, err = run_main(["--model", model, "--image", image, "--json"], capsys)
    assert rc == 0, err
    doc = json.loads(out)
    net = gn.load(model, device="cpu").eval()
    x = gpunet.data.pictures.load_images([image])
    expected = int(gn.training.predict(net, x)[0])
    assert (
        doc["target"] == [expected] == doc["prediction"]
    )  # no --target: the network's own prediction
    assert doc["training"] is False and [l["type"] for l in doc["layers"]][2] == "Dropout"
    np.testing.assert_allclose(
        np.asarray(doc["y_L"], np.float32),
        gn.to_numpy(gn.training.predict_proba(net, x)),
        rtol=1e-5,
        atol=1e-7,
    )
    rc, out, err = run_main(
        ["--model", model, "--image", image, "--target", 3, "--float64", "--optimizer", "momentum"],
        capsys,
    )
    assert rc == 0, err
    assert (
        "y^D (class 3, one-hot)" in out
        and "float64" in out
        and "(dropout, off in eval mode)" in out
    )
    within_a_terminal(out)
    assert "shape (784, 16)" in out


BAD = [  # arguments, the one-line message
    (
        ["--sizes", 2, 3, 2, "--weights", "WEIGHTS", "--input", 1, 2, "--target", 0],
        "--sizes: expected 2 2 2 to match the weights file, got 2 3 2",
    ),
    (["--input", 1, 2, "--target", 5], "--target: expected a class in [0, 1] for 2 outputs, got 5"),
    (
        ["--input", 1, 2, "--target", -1],
        "--target: expected a class in [0, 1] for 2 outputs, got -1",
    ),
    (
        ["--input", 1, 2, "--target", 0.5],
        "--target: expected a class in [0, 1] for 2 outputs, got 0.5",
    ),
    (
        ["--input", 1, 2, "--target", 1, 2, 3],
        "--target: expected 1 class(es) in [0, 1] or 2 values",
    ),
    (["--input", 1, 2, "--target", 0.5, 0.6], "--target: expected 2 probabilities summing to 1"),
    (
        ["--input", 1, 2, 3, "--target", 0],
        "--input: expected 2 values (one per input of the network) or a multiple, got 3",
    ),
    (
        ["--sizes", 2, 2, 2, "--input", 1, 2],
        "--target: expected a class or 2 desired outputs per instance, got none",
    ),
    (
        ["--sizes", 2, 2, 2, "--target", 1],
        "--input: expected the instance's values or --image FILE, got neither",
    ),
    (
        ["--input", 1, 2, "--image", "IMAGE"],
        "--input: expected the instance's values or --image FILE, got both",
    ),
    (
        ["--output-activation", "sigmoid"],
        "--output-activation: expected --loss mse or mae (cross-entropy applies",
    ),
    (
        ["--loss", "mse", "--output-activation", "relu"],
        "argument --output-activation: invalid choice: 'relu'",
    ),
    (["--seed", 3], "--seed: draws the weights of --sizes, so it needs --sizes and no --weights"),
    (
        ["--model", "MODEL", "--loss", "mse", "--output-activation", "tanh"],
        "--output-activation: not used with --model",
    ),
    (["--weights", "BROKEN", "--input", 1, 2, "--target", 0], "is not valid JSON"),
    (
        ["--weights", "/nonexistent/w.json", "--input", 1, 2, "--target", 0],
        "--weights: file not found: /nonexistent/w.json",
    ),
    (
        ["--weights", "RAGGED", "--input", 1, 2, "--target", 0],
        "--weights: layers[0]: expected numbers in W",
    ),
    (
        ["--weights", "SHORT_B", "--input", 1, 2, "--target", 0],
        "--weights: layers[0].b: expected 2 values",
    ),
    (
        ["--sizes", 2, 2, 2, "--activation", "relu", "tanh", "--input", 1, 2, "--target", 0],
        "--activation: expected one name",
    ),
    (
        ["--optimizer", "sgd", "--momentum", 0.5, "--input", 1, 2, "--target", 0],
        "--momentum: only used with --optimizer momentum",
    ),
    (["--optimizer", "adam", "--momentum", 0.5], "--momentum: only used with --optimizer momentum"),
    (["--batch-norm"], "x: expected a batch of at least 2 rows in training mode"),
    (["--model", "MODEL", "--batch-norm", "--input", 1, 2], "--batch-norm: not used with --model"),
    (["--json", "--format", "markdown", "--input", 1, 2, "--target", 0], "--json: prints JSON"),
    (
        ["--model", "/nonexistent/model.npz", "--input", 1, 2],
        "model file not found: /nonexistent/model.npz",
    ),
    (["--model", "MODEL", "--sizes", 784, 10, "--input", 1, 2], "--sizes: not used with --model"),
    (["--model", "MODEL", "--input", 1, 2], "--input: expected 784 values"),
    (
        ["--image", "IMAGE", "--target", 0],
        "--image: expected 2 pixels (the network's inputs), got 784",
    ),
    (
        ["--input", 1, 2, "--target", 0, "--lr", -1],
        "argument --lr: expected a positive number, got '-1'",
    ),
    (["--input", 1, "nan", "--target", 0], "argument --input: expected a finite number, got 'nan'"),
    (
        ["--loss", "hinge", "--input", 1, 2, "--target", 0],
        "argument --loss: invalid choice: 'hinge'",
    ),
    (
        ["--sizes", 2, "--input", 1, 2, "--target", 0],
        "--sizes: expected at least [inputs, outputs]",
    ),
]


def resolve(args, tmp_path, model_and_image):
    files = {
        "WEIGHTS": json.dumps(MAZUR),
        "BROKEN": '{"layers": [',
        "RAGGED": '{"layers": [{"W": [[1, 2], [3]], "b": [0, 0]}]}',
        "SHORT_B": '{"layers": [{"W": [[1, 2], [3, 4]], "b": [0]}]}',
    }
    out = []
    for a in args:
        if a in files:
            (tmp_path / f"{a}.json").write_text(files[a])
            a = tmp_path / f"{a}.json"
        a = {"MODEL": model_and_image[0], "IMAGE": model_and_image[1]}.get(a, a)
        out.append(a)
    return out


@pytest.mark.parametrize("args, message", BAD, ids=[m[:40] for _, m in BAD])
def test_cli_bad_input_is_one_line(args, message, tmp_path, model_and_image, capsys, monkeypatch):
    monkeypatch.delenv("GPUNET_DEBUG", raising=False)
    rc, out, err = run_main(resolve(args, tmp_path, model_and_image), capsys)
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("gpunet explain: error: "), err
    assert message in err, err


def subprocess_run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's gpunet, whatever is installed
    env.pop("GPUNET_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "gpunet", "explain", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def test_real_subprocess(weights_file):
    res = subprocess_run(
        "--weights", weights_file, "--input", *X, "--target", CLASS, "--float64", "--json"
    )
    assert res.returncode == 0, res.stderr
    check_against_hand(json.loads(res.stdout))
    bad = subprocess_run(
        "--weights", weights_file, "--sizes", 2, 3, 2, "--input", *X, "--target", 9
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert (
        bad.stderr
        == "gpunet explain: error: --sizes: expected 2 2 2 to match the weights file, got 2 3 2\n"
    )


def test_readme_shows_the_real_output(capsys):
    """The guide's "One step, explained" (docs/explain.md) prints what the command prints, from the
    weights it shows."""
    section = (ROOT / "docs" / "explain.md").read_text(encoding="utf-8")
    weights = json.loads(section.split("```json\n")[1].split("```")[0])
    assert weights == MAZUR
    command = section.split("```text\n")[0].rsplit("`gpunet explain", 1)[1].split("`")[0].split()
    shown = section.split("```text\n")[1].split("```")[0]
    rc, out, err = run_main(command, capsys)
    assert rc == 0, err
    assert out == shown


def test_explain_takes_its_input_through_the_front_door():
    """explain_step reads x as fit does (gpunet.data.arrays): float64, lists and frames give the
    float32 step, strings the front door's one line."""

    def step(x):
        net = gn.mlp([2, 2, 2], activation="sigmoid", seed=0)
        return gn.explain_step(
            net, gn.SoftmaxCrossEntropy(), gn.SGD(net.parameters(), lr=0.5), x, [1]
        )

    ref = step(np.array([[0.05, 0.1]], np.float32))
    for x in (np.array([[0.05, 0.1]]), [0.05, 0.1], [[0.05, 0.1]]):
        got = step(x)
        assert got["input"].dtype == np.float32 and got["loss"]["value"] == ref["loss"]["value"]
        np.testing.assert_array_equal(
            got["y_L"], ref["y_L"]
        )  # the same float32 numbers, bit for bit
    with pytest.raises(TypeError, match="x: expected real numbers, got strings"):
        step([["a", "b"]])
