"""explain's inputs from plain lists (the command line, notebooks): a network from sizes or a
weights document, a target from a flat list of numbers, and the default example the command explains
with no flags.

The default example is the classic 2-2-2 worked example (Matt Mazur, "A step by step backpropagation
example", 2015): inputs 0.05 and 0.10, desired outputs 0.01 and 0.99, weights w1..w8 = 0.15, 0.20,
0.25, 0.30, 0.40, 0.45, 0.50, 0.55, biases 0.35 and 0.60, sigmoid neurons and learning rate 0.5. Its
``W`` are shaped (inputs, outputs) as in ``Linear``, so ``W^1 = [[w1, w3], [w2, w4]]`` (w1 joins
input 1 to hidden neuron 1, w3 input 1 to hidden neuron 2). With ``--loss mse --output-activation
sigmoid`` it is that article's step exactly: the library's MSE of N = 1 instance and K = 2 outputs,
``1/2 sum_j (y^D_j - y^L_j)^2``, is the article's total error.
"""

from __future__ import annotations

import json

import numpy as np

from ..layers import ACTIVATIONS, Linear
from ..network import Sequential, mlp

EXAMPLE = {
    "weights": {
        "layers": [
            {"W": [[0.15, 0.25], [0.20, 0.30]], "b": [0.35, 0.35]},
            {"W": [[0.40, 0.50], [0.45, 0.55]], "b": [0.60, 0.60]},
        ]
    },
    "input": [0.05, 0.10],
    "target": [0.01, 0.99],
    "activation": "sigmoid",
    "lr": 0.5,
    "about": "No network given, so the default example: the 2-2-2 step worked by hand in Matt "
    "Mazur's "
    '"A step by step backpropagation example" (`x = 0.05 0.1`, `y^D = 0.01 0.99`, weights w1..w8 = '
    "0.15 0.2 0.25 0.3 0.4 0.45 0.5 0.55 as `W^1 = [[w1, w3], [w2, w4]]` and `W^2 = [[w5, w7], "
    "[w6, w8]]`, biases 0.35 and 0.6, sigmoid neurons). With --loss mse --output-activation "
    "sigmoid "
    "and no other flag, it is the article's step exactly; gpunet explain --help lists the flags.",
}
OUTPUT_ACTIVATIONS = ("sigmoid", "tanh")


def build_network(
    sizes=None,
    weights=None,
    activation="sigmoid",
    seed=0,
    dtype=np.float32,
    output_activation=None,
    batch_norm=False,
):
    """An MLP on the CPU from ``sizes`` and/or ``weights`` = {"layers": [{"W": rows, "b": values},
    ...]}.

    ``W`` is shaped (inputs, outputs) as in ``Linear``. Without ``sizes`` they are read off the
    weights; with both, they must agree. Without ``weights``, the weights are drawn from ``seed``.
    ``output_activation`` ("sigmoid" or "tanh", for MSE and MAE) follows the last Linear, so that
    ``y^L = f(z^L)`` as in the notes; None leaves the output linear (``y^L = z^L``). ``batch_norm``
    puts a BatchNorm between each hidden Linear and its activation, as ``mlp`` does (scale 1, shift
    0).
    """
    if output_activation is not None and output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(
            f"output_activation: expected one of {', '.join(OUTPUT_ACTIVATIONS)} or None, "
            f"got {output_activation!r}"
        )
    layers = None
    if weights is not None:
        layers = _parse_weights(weights)
        found = [layers[0][0].shape[0]] + [w.shape[1] for w, _ in layers]
        if sizes is None:
            sizes = found
        elif list(sizes) != found:
            raise ValueError(
                f"sizes: expected {' '.join(map(str, found))} to match the weights file, "
                f"got {' '.join(map(str, sizes))}"
            )
    if sizes is None:
        raise ValueError("sizes: expected layer sizes (e.g. 2 2 2) or a weights file, got neither")
    net = mlp(
        list(sizes),
        activation=activation,
        seed=seed,
        dtype=dtype,
        device="cpu",
        batch_norm=batch_norm,
    )
    if layers is not None:
        for lin, (w, b) in zip([l for l in net.layers if isinstance(l, Linear)], layers):
            lin.W.data[...] = w
            lin.b.data[...] = b
    if output_activation is not None:
        net = Sequential(*net.layers, ACTIVATIONS[output_activation]())
    return net


def _parse_weights(doc):
    """[(W, b), ...] float64 host arrays from a weights document, each layer checked against the
    last."""
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list) or not doc["layers"]:
        what = type(doc).__name__ + (
            " without a non-empty list under layers" if isinstance(doc, dict) else ""
        )
        raise ValueError(
            f'weights: expected {{"layers": [{{"W": [[...], ...], "b": [...]}}, ...]}}, got {what}'
        )
    out, width = [], None
    for i, entry in enumerate(doc["layers"]):
        where = f"weights: layers[{i}]"
        if not isinstance(entry, dict) or "W" not in entry or "b" not in entry:
            raise ValueError(
                f'{where}: expected an object with "W" and "b", got {json.dumps(entry)[:60]}'
            )
        try:
            w = np.array(entry["W"], dtype=np.float64)
            b = np.array(entry["b"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: expected numbers in W (rows of equal length) and b, "
                f"got {json.dumps(entry)[:60]}"
            ) from None
        if w.ndim != 2 or w.size == 0:
            raise ValueError(
                f"{where}.W: expected a matrix (inputs x outputs), got shape {w.shape}"
            )
        if b.shape != (w.shape[1],):
            raise ValueError(
                f"{where}.b: expected {w.shape[1]} values (one per output of W), got shape "
                f"{b.shape}"
            )
        if width is not None and w.shape[0] != width:
            raise ValueError(
                f"{where}.W: expected {width} rows (the previous layer's outputs), got {w.shape[0]}"
            )
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError(f"{where}: expected finite numbers, got NaN or infinity")
        out.append((w, b))
        width = w.shape[1]
    return out


def make_target(values, rows, outputs, loss="ce", dtype=np.float32):
    """The target for ``rows`` instances and ``outputs`` outputs from a flat list of numbers.

    ``rows * outputs`` values are target rows; ``rows`` values are classes in [0, outputs), given to
    cross-entropy as labels (N,) int64 and to MSE/MAE as one-hot rows.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) == rows * outputs:
        t = values.reshape(rows, outputs)
        # the notes' delta^L = y^D - y^L holds for cross-entropy when each target row is a
        # distribution
        if loss == "ce" and ((t < 0).any() or not np.allclose(t.sum(axis=1), 1.0)):
            raise ValueError(
                f"target: expected {outputs} probabilities summing to 1 per row for cross-entropy "
                f"(or one class), got {' '.join(f'{v:g}' for v in values)}"
            )
        return t.astype(dtype)
    if len(values) != rows:
        raise ValueError(
            f"target: expected {rows} class(es) in [0, {outputs - 1}] or {rows * outputs} values "
            f"({rows} row(s) of {outputs}), got {len(values)} values"
        )
    bad = [v for v in values if v != int(v) or not 0 <= v < outputs]
    if bad:
        raise ValueError(
            f"target: expected a class in [0, {outputs - 1}] for {outputs} outputs, got {bad[0]:g}"
        )
    labels = values.astype(np.int64)
    if loss == "ce":
        return labels
    return np.eye(outputs, dtype=dtype)[labels]
