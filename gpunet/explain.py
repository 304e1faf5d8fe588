"""One training step, explained in the course notes' notation, with the library's own numbers.

``explain_step(net, loss, optimizer, x, y)`` runs exactly one step (forward, cost, backward, update) through
the very layer, loss and optimizer objects that training uses and records a host copy of every quantity.
Nothing is recomputed here: each layer's public ``forward(x)`` and ``backward(dy)`` are called one by one
(not ``Sequential.forward``, which fuses Linear + ReLU and would hide the weighted sum), gradients are read
from ``param.grad``, and the new weights from ``param.data`` after ``optimizer.step()``. The only numbers
derived here are notation: the notes' delta (the library's gradient times ``-c``, below), the one-hot
``y^D`` of class labels, the change ``new - old`` of each parameter, and, for the cross-entropy cost, the
probabilities ``y^L`` computed by the library's own ``Softmax`` layer.

Notation (course notes): ``x = y^0`` the input; layer ``s`` has weights ``W^s`` (inputs x outputs, as in
``Linear``) and biases ``b^s``; ``z^s = b^s + y^(s-1) W^s`` is its weighted sum and ``y^s = f(z^s)`` its
output; ``y^L`` is the network's output and ``y^D`` the desired one.

Sign convention. The notes define the delta of the output layer as ``delta^L = y^D - y^L`` (cross-entropy)
or ``f'(z^L) (y^D - y^L)`` (MSE) and *add* the corrections ``Delta w_ij = alpha y_i delta_j``. The library
computes the gradient of the cost, ``dC/dz``, which points the other way and is averaged over the batch
(``(y^L - y^D) / N`` for cross-entropy), and *subtracts* it: ``w = w - alpha dC/dw``. Both are the same
step. Here ``delta^s = -c dC/dz^s`` with ``c = N`` for cross-entropy, ``N K / 2`` for MSE (its cost is
averaged over N*K entries and its derivative carries a 2) and ``N K`` for MAE, so that ``delta`` is
exactly the notes' quantity for any batch size N and K outputs.

JSON schema ``gpunet-explain/2`` (:func:`to_json`; matrices are nested lists, rows first, with the exact
values of the arrays: a float32 number reads back as the same float32; strict JSON, as every file gpunet
writes: a NaN or an infinity is null, so that any JSON reader takes it; version 1 wrote the strings "nan",
"inf" and "-inf"):

- ``schema``: "gpunet-explain/2"; ``dtype``: "float32" or "float64"; ``device``; ``batch``: N;
  ``sizes``: [inputs, hidden..., outputs]; ``training``: whether dropout was active
- ``input``: x (N, inputs); ``target``: what the loss was given, labels (N,) or rows (N, K);
  ``y_D``: the desired outputs (N, K) (one-hot rows for labels); ``y_L``: the network's outputs (N, K)
  (softmax probabilities for cross-entropy); ``prediction``: argmax of each row of ``y_L``
- ``loss``: {``type``, ``value`` (the cost C), ``gradient`` (dC/d output, (N, K), from ``loss.backward()``),
  ``delta_scale`` (c above)}
- ``optimizer``: {``type``, ``lr`` (alpha), ``momentum`` (gamma, null for SGD), ``nesterov``,
  ``weight_decay``}
- ``layers``: one object per core layer, in order: {``index``, ``type``, ``name`` (its repr), ``input``,
  ``output``, ``grad_output`` (dC/d output), ``grad_input`` (dC/d input, what ``backward`` returned),
  ``derivative`` (f' elementwise, from ``backward`` of ones; null for Linear and Softmax), ``params``
  (Linear only: {"W": P, "b": P} with P = {``before``, ``grad``, ``after``, ``change`` (after - before),
  ``velocity_before``, ``velocity`` (null for SGD)})}
- ``stages``: the notes' layers s = 1..L, each a Linear and what follows it up to the next Linear:
  {``s``, ``layers`` (indices into ``layers``), ``linear`` (index or null), ``activations`` (type names),
  ``y_prev`` (y^(s-1)), ``z`` (z^s), ``y`` (y^s), ``gradient`` (dC/dz^s), ``delta`` (the notes' delta^s)}
"""
from __future__ import annotations

import json
import textwrap

import numpy as np

from .backend import device_of, get_array_module, to_device, to_numpy
from .layers import Dropout, Linear, ReLU, Sigmoid, Softmax, Tanh
from .losses import MAELoss, MSELoss, SoftmaxCrossEntropy
from .files import strict
from .network import mlp
from .optimizers import SGD, Momentum

SCHEMA = "gpunet-explain/2"
ELEMENTWISE = (ReLU, Sigmoid, Tanh, Dropout)  # backward of ones gives f' elementwise


def _host(a):
    """A host (NumPy) copy: layers and optimizers reuse their buffers, so what we keep must be ours."""
    return to_numpy(a).copy()


# --- the step -------------------------------------------------------------------------------------------
def explain_step(net, loss, optimizer, x, y) -> dict:
    """Run one training step of ``net`` on ``(x, y)`` and return every quantity (see the module docstring).

    ``x``: (N, inputs) or (inputs,) array or list, cast to the network's dtype and moved to its device.
    ``y``: integer labels (N,) (or one label), or target rows (N, K) (or one row) of floats.
    ``loss``: SoftmaxCrossEntropy, MSELoss or MAELoss; ``optimizer``: SGD or Momentum built on exactly
    ``net.parameters()`` (any order). The network and the optimizer are changed, as by a training step.
    Returns a dict of host NumPy arrays (the record); :func:`to_json` makes it JSON.
    """
    layers = list(getattr(net, "layers", []))
    linears = [layer for layer in layers if isinstance(layer, Linear)]
    if not linears:
        raise ValueError(f"net: expected a Sequential with at least one Linear layer, got {net!r}")
    if not isinstance(loss, (SoftmaxCrossEntropy, MSELoss, MAELoss)):
        raise TypeError(f"loss: expected SoftmaxCrossEntropy, MSELoss or MAELoss, got {type(loss).__name__}")
    if not isinstance(optimizer, (SGD, Momentum)):
        raise TypeError(f"optimizer: expected SGD or Momentum, got {type(optimizer).__name__}")
    slot = {id(p): i for i, p in enumerate(optimizer.params)}
    params = net.parameters()
    if len(params) != len(optimizer.params) or any(id(p) not in slot for p in params):
        raise ValueError(f"optimizer: expected it to hold exactly the network's {len(params)} parameters, "
                         f"got {len(optimizer.params)} parameters that are not the same set")
    dtype, device = params[0].data.dtype, device_of(params[0].data)
    x, target = _prepare(x, y, dtype, device, linears[0].in_features)

    momentum = isinstance(optimizer, Momentum)
    before = {id(p): _host(p.data) for p in params}
    v_before = {id(p): _host(optimizer.velocity(slot[id(p)])) for p in params} if momentum else {}

    # forward: each layer's own forward, in order
    records, h = [], x
    for i, layer in enumerate(layers):
        out = layer.forward(h)
        records.append({"index": i, "type": type(layer).__name__, "name": repr(layer),
                        "input": _host(h), "output": _host(out)})
        h = out
    value = loss.forward(h, target)
    grad = loss.backward()
    loss_grad = _host(grad)

    # backward: each layer's own backward, in reverse; it returns dC/d(input) and writes param.grad
    for i in range(len(layers) - 1, -1, -1):
        layer, rec = layers[i], records[i]
        dx = layer.backward(grad)
        rec["grad_output"], rec["grad_input"] = _host(grad), _host(dx)
        # f' as the library applies it: backward of ones (activations keep no state but their output)
        ones = get_array_module(grad).ones_like(grad)
        rec["derivative"] = _host(layer.backward(ones)) if isinstance(layer, ELEMENTWISE) else None
        grad = dx
    grads = {id(p): _host(p.grad) for p in params}

    optimizer.step()
    for layer, rec in zip(layers, records):
        rec["params"] = None
        if isinstance(layer, Linear):
            rec["params"] = {}
            for p, name in ((layer.W, "W"), (layer.b, "b")):
                after = _host(p.data)
                rec["params"][name] = {
                    "before": before[id(p)], "grad": grads[id(p)], "after": after,
                    "change": after - before[id(p)],
                    "velocity_before": v_before.get(id(p)),
                    "velocity": _host(optimizer.velocity(slot[id(p)])) if momentum else None,
                }

    out_host = records[-1]["output"]
    n, k = out_host.shape
    if isinstance(loss, SoftmaxCrossEntropy):
        y_l = _host(Softmax().forward(h))  # the library's softmax layer, on the output it produced
        scale = float(n)
    else:
        y_l = out_host
        scale = n * k / 2.0 if isinstance(loss, MSELoss) else float(n * k)
    target_host = _host(target)
    if target_host.ndim == 1 and target_host.dtype.kind in "iu":
        y_d = np.zeros((n, k), dtype=dtype)
        y_d[np.arange(n), target_host] = 1
    else:
        y_d = target_host.reshape(n, k)
    record = {
        "schema": SCHEMA, "dtype": str(np.dtype(dtype)), "device": device, "batch": n,
        "sizes": [linears[0].in_features] + [lin.out_features for lin in linears],
        "training": bool(getattr(net, "training", True)),
        "input": records[0]["input"], "target": target_host, "y_D": y_d, "y_L": y_l,
        "prediction": y_l.argmax(axis=1),
        "loss": {"type": type(loss).__name__, "value": float(to_numpy(value)), "gradient": loss_grad,
                 "delta_scale": scale},
        "optimizer": {"type": type(optimizer).__name__, "lr": float(optimizer.lr),
                      "momentum": float(optimizer.momentum) if momentum else None,
                      "nesterov": bool(getattr(optimizer, "nesterov", False)),
                      "weight_decay": float(optimizer.weight_decay)},
        "layers": records,
    }
    record["stages"] = _stages(records, scale)
    return record


def _prepare(x, y, dtype, device, inputs):
    """x as (N, inputs) and the target as the loss wants it, both in ``dtype`` on ``device``."""
    x = np.array(to_numpy(x), dtype=dtype)
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] != inputs:
        raise ValueError(f"x: expected shape (N, {inputs}) or ({inputs},), got {x.shape}")
    t = to_numpy(y)
    if t.dtype.kind in "iub":
        t = t.astype(np.int64).reshape(-1)
    else:
        t = np.array(t, dtype=dtype)
        if t.ndim == 1 and len(x) == 1:
            t = t.reshape(1, -1)
    if len(t) != len(x):
        raise ValueError(f"y: expected {len(x)} targets (one per row of x), got {len(t)}")
    return to_device(x, device), to_device(t, device)


def _stages(records, scale):
    """Group the core layers into the notes' layers: each Linear with what follows it."""
    groups = []
    for rec in records:
        if rec["type"] == "Linear" or not groups:
            groups.append([])
        groups[-1].append(rec)
    stages = []
    for s, group in enumerate(groups, 1):
        lin = group[0] if group[0]["type"] == "Linear" else None
        gradient = lin["grad_output"] if lin else None
        stages.append({
            "s": s, "layers": [r["index"] for r in group], "linear": lin["index"] if lin else None,
            "activations": [r["type"] for r in group if r is not lin],
            "y_prev": group[0]["input"], "z": lin["output"] if lin else None, "y": group[-1]["output"],
            "gradient": gradient,
            "delta": None if gradient is None else gradient * gradient.dtype.type(-scale),
        })
    return stages


# --- inputs from plain lists (the command line, notebooks) ------------------------------------------------
def build_network(sizes=None, weights=None, activation="sigmoid", seed=0, dtype=np.float32):
    """An MLP on the CPU from ``sizes`` and/or ``weights`` = {"layers": [{"W": rows, "b": values}, ...]}.

    ``W`` is shaped (inputs, outputs) as in ``Linear``. Without ``sizes`` they are read off the weights;
    with both, they must agree. Without ``weights``, the weights are drawn from ``seed``.
    """
    layers = None
    if weights is not None:
        layers = _parse_weights(weights)
        found = [layers[0][0].shape[0]] + [w.shape[1] for w, _ in layers]
        if sizes is None:
            sizes = found
        elif list(sizes) != found:
            raise ValueError(f"sizes: expected {' '.join(map(str, found))} to match the weights file, "
                             f"got {' '.join(map(str, sizes))}")
    if sizes is None:
        raise ValueError("sizes: expected layer sizes (e.g. 2 2 2) or a weights file, got neither")
    net = mlp(list(sizes), activation=activation, seed=seed, dtype=dtype, device="cpu")
    if layers is not None:
        for lin, (w, b) in zip([l for l in net.layers if isinstance(l, Linear)], layers):
            lin.W.data[...] = w
            lin.b.data[...] = b
    return net


def _parse_weights(doc):
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), list) or not doc["layers"]:
        raise ValueError('weights: expected {"layers": [{"W": [[...], ...], "b": [...]}, ...]}, '
                         f"got {type(doc).__name__}{' without a non-empty list under layers' if isinstance(doc, dict) else ''}")
    out, width = [], None
    for i, entry in enumerate(doc["layers"]):
        where = f"weights: layers[{i}]"
        if not isinstance(entry, dict) or "W" not in entry or "b" not in entry:
            raise ValueError(f'{where}: expected an object with "W" and "b", got {json.dumps(entry)[:60]}')
        try:
            w = np.array(entry["W"], dtype=np.float64)
            b = np.array(entry["b"], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected numbers in W (rows of equal length) and b, "
                             f"got {json.dumps(entry)[:60]}") from None
        if w.ndim != 2 or w.size == 0:
            raise ValueError(f"{where}.W: expected a matrix (inputs x outputs), got shape {w.shape}")
        if b.shape != (w.shape[1],):
            raise ValueError(f"{where}.b: expected {w.shape[1]} values (one per output of W), got shape {b.shape}")
        if width is not None and w.shape[0] != width:
            raise ValueError(f"{where}.W: expected {width} rows (the previous layer's outputs), got {w.shape[0]}")
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
        # the notes' delta^L = y^D - y^L holds for cross-entropy when each target row is a distribution
        if loss == "ce" and ((t < 0).any() or not np.allclose(t.sum(axis=1), 1.0)):
            raise ValueError(f"target: expected {outputs} probabilities summing to 1 per row for cross-entropy "
                             f"(or one class), got {' '.join(f'{v:g}' for v in values)}")
        return t.astype(dtype)
    if len(values) != rows:
        raise ValueError(f"target: expected {rows} class(es) in [0, {outputs - 1}] or {rows * outputs} values "
                         f"({rows} row(s) of {outputs}), got {len(values)} values")
    bad = [v for v in values if v != int(v) or not 0 <= v < outputs]
    if bad:
        raise ValueError(f"target: expected a class in [0, {outputs - 1}] for {outputs} outputs, got {bad[0]:g}")
    labels = values.astype(np.int64)
    if loss == "ce":
        return labels
    return np.eye(outputs, dtype=dtype)[labels]


# --- JSON -------------------------------------------------------------------------------------------------
def to_json(record: dict) -> dict:
    """The record as strict JSON values (:func:`gpunet.files.strict`: arrays as nested lists, NaN and
    infinities as None): what ``json.dumps`` writes (schema in the module docstring)."""
    return strict(record)


def render_json(record: dict) -> str:
    """The JSON text: one key per line, each matrix on one line (``[[row], [row]]``)."""
    return _dump(to_json(record), 0) + "\n"


def _dump(v, depth):
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(v, dict):
        items = [f"{inner}{json.dumps(k)}: {_dump(x, depth + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if isinstance(v, list) and any(isinstance(x, dict) for x in v):
        return "[\n" + ",\n".join(inner + _dump(x, depth + 1) for x in v) + "\n" + pad + "]"
    return json.dumps(v, allow_nan=False)


# --- text and markdown: one list of steps, two renderings ---------------------------------------------------
_ACTS = {  # name, f in text, f in LaTeX, f' in text, f' in LaTeX
    "Sigmoid": ("sigmoid", "1 / (1 + e^-z)", r"\frac{1}{1 + e^{-z}}", "y (1 - y)", r"y\,(1 - y)"),
    "Tanh": ("tanh", "tanh(z)", r"\tanh z", "1 - y^2", r"1 - y^{2}"),
    "ReLU": ("ReLU", "max(0, z)", r"\max(0, z)", "1 if z > 0, else 0", r"[z > 0]"),
    "Dropout": ("dropout", "z * mask / (1 - p)", r"z \odot m / (1 - p)", "mask / (1 - p)", r"m / (1 - p)"),
    "Softmax": ("softmax", "e^z_j / sum_k e^z_k", r"\frac{e^{z_j}}{\sum_k e^{z_k}}", None, None),
}
_COSTS = {
    "SoftmaxCrossEntropy": ("softmax cross-entropy", "-(1/n) sum_i sum_j y^D_ij log y^L_ij",
                            r"-\frac{1}{n} \sum_i \sum_j y^{D}_{ij} \log y^{L}_{ij}", "N"),
    "MSELoss": ("mean squared error", "1/(n k) sum_i sum_j (y^D_ij - y^L_ij)^2",
                r"\frac{1}{n k} \sum_i \sum_j (y^{D}_{ij} - y^{L}_{ij})^{2}", "N K / 2"),
    "MAELoss": ("mean absolute error", "1/(n k) sum_i sum_j |y^D_ij - y^L_ij|",
                r"\frac{1}{n k} \sum_i \sum_j |y^{D}_{ij} - y^{L}_{ij}|", "N K"),
}


def _steps(r):
    """The explanation as a list of ("h", title), ("p", text, latex_text) and ("eq", text, latex, value)."""
    stages, L = r["stages"], len(r["stages"])
    layers, opt, loss = r["layers"], r["optimizer"], r["loss"]
    cost_name, cost_txt, cost_tex, c_txt = _COSTS[loss["type"]]
    ce = loss["type"] == "SoftmaxCrossEntropy"
    gamma = opt["momentum"]
    def sup(s):  # the notes call the last layer L
        return "L" if s == L else str(s)

    out = [("h", "Network"),
           ("p", f"{'-'.join(map(str, r['sizes']))} network: " + " -> ".join(map(_short, layers))
            + f"; cost: {cost_name}; optimizer: {_opt_text(opt)}; {r['dtype']}, batch of N = {r['batch']}"
            + ("" if r["training"] or not any(x["type"] == "Dropout" for x in layers) else " (dropout off: eval mode)"),
            None),
           ("p", "Notation (course notes): x = y^0 the input; W^s (inputs x outputs) and b^s the weights and "
                 "biases of layer s; z^s = b^s + y^(s-1) W^s its weighted sum; y^s = f(z^s) its output; "
                 "y^D the desired output, y^L the network's.",
            r"Notation (course notes): $x = y^{0}$ the input; $W^{s}$ (inputs $\times$ outputs) and $b^{s}$ "
            r"the weights and biases of layer $s$; $z^{s} = b^{s} + y^{s-1} W^{s}$ its weighted sum; "
            r"$y^{s} = f(z^{s})$ its output; $y^{D}$ the desired output, $y^{L}$ the network's."),
           ("p", f"Sign convention: the notes' delta (delta^L = y^D - y^L for cross-entropy, f'(z^L) (y^D - y^L) "
                 "for MSE) points down the cost and the notes add the corrections, w = w + Delta w with "
                 "Delta w_ij = alpha y_i delta_j. The library computes the gradient dC/dz = -delta / c, here "
                 f"c = {c_txt} = {_num(loss['delta_scale'], 6)} (the cost is a mean), and subtracts: "
                 "w = w - alpha dC/dw. Same step; below, delta^s = -c dC/dz^s.",
            r"Sign convention: the notes' $\delta$ ($\delta^{L} = y^{D} - y^{L}$ for cross-entropy, "
            r"$f'(z^{L})\,(y^{D} - y^{L})$ for MSE) points down the cost and the notes add the corrections, "
            r"$w = w + \Delta w$ with $\Delta w_{ij} = \alpha\, y_i\, \delta_j$. The library computes the gradient "
            r"$\partial C / \partial z = -\delta / c$, here $c = " + c_txt + " = " + _num(loss["delta_scale"], 6)
            + r"$ (the cost is a mean), and subtracts: $w = w - \alpha\, \partial C / \partial w$. Same step; "
            r"below, $\delta^{s} = -c\, \partial C / \partial z^{s}$.")]

    out.append(("h", "1. Forward pass"))
    out.append(("eq", "x = y^0", "x = y^{0}", r["input"]))
    for st in stages:
        s, S = st["s"], sup(st["s"])
        prev = f"y^{s - 1}"
        out.append(("p", f"Layer {s}" + (" (output, L)" if s == L else "") + ": "
                    + " -> ".join(_short(layers[i]) for i in st["layers"]), None))
        if st["linear"] is not None:
            p = layers[st["linear"]]["params"]
            out.append(("eq", f"W^{S}", f"W^{{{S}}}", p["W"]["before"]))
            out.append(("eq", f"b^{S}", f"b^{{{S}}}", p["b"]["before"]))
            out.append(("eq", f"z^{S} = b^{S} + {prev} W^{S}", f"z^{{{S}}} = b^{{{S}}} + y^{{{s - 1}}} W^{{{S}}}", st["z"]))
        for i in st["layers"]:
            if i == st["linear"]:
                continue
            name, f_txt, f_tex, _, _ = _act(layers[i], r["training"])
            last = i == st["layers"][-1] and not (s == L and ce)
            arg, arg_tex = (f"z^{S}", f"z^{{{S}}}") if i == st["layers"][0] + 1 else ("line above", r"\cdot")
            out.append(("eq", (f"y^{S} = " if last else "") + f"f({arg}), f = {name}: {f_txt}",
                        (f"y^{{{S}}} = " if last else "") + rf"f({arg_tex}),\ f(z) = {f_tex}", layers[i]["output"]))
        if s == L and ce:
            out.append(("eq", "y^L = softmax(z^L) = e^z_j / sum_k e^z_k (inside the cost)",
                        r"y^{L} = \mathrm{softmax}(z^{L})_j = \frac{e^{z_j}}{\sum_k e^{z_k}}", r["y_L"]))
        elif s == L and len(st["layers"]) == 1:
            out.append(("eq", "y^L = z^L (no output activation)", "y^{L} = z^{L}", r["y_L"]))

    out.append(("h", "2. Cost"))
    target = r["target"]
    what = f"class {', '.join(map(str, target.tolist()))}, one-hot" if target.ndim == 1 else "target rows"
    out.append(("eq", f"y^D ({what})", rf"y^{{D}} \ (\text{{{what}}})", r["y_D"]))
    out.append(("eq", f"C = {cost_txt}", f"C = {cost_tex}", loss["value"]))
    out.append(("eq", "prediction = argmax_j y^L_j", r"\text{prediction} = \arg\max_j y^{L}_{j}", r["prediction"]))

    out.append(("h", "3. Backward pass, from the output to the input"))
    for st in reversed(stages):
        s, S = st["s"], sup(st["s"])
        if st["linear"] is None:
            continue
        out.append(("p", f"Layer {s}" + (" (output, L)" if s == L else ""), None))
        acts = [layers[i] for i in reversed(st["layers"]) if i != st["linear"]]
        if s < L:
            nxt = stages[s]  # the layer above, s + 1
            n1 = sup(nxt["s"])
            back = layers[nxt["linear"]]["grad_input"] * layers[nxt["linear"]]["grad_input"].dtype.type(-loss["delta_scale"])
            out.append(("eq", f"sum_k delta_k^{n1} w_jk^{n1} = delta^{n1} (W^{n1})^T",
                        rf"\sum_k \delta_k^{{{n1}}} w_{{jk}}^{{{n1}}} = \delta^{{{n1}}} (W^{{{n1}}})^{{T}}", back))
        for a in acts:
            name, _, _, d_txt, d_tex = _act(a, r["training"])
            if a["derivative"] is not None:
                out.append(("eq", f"f'(z^{S}) = {d_txt} ({name})", rf"f'(z^{{{S}}}) = {d_tex} \ (\text{{{name}}})",
                            a["derivative"]))
        if s == L:
            if ce:
                txt, tex = "delta^L = y^D - y^L", r"\delta^{L} = y^{D} - y^{L}"
            else:
                core = "y^D - y^L" if loss["type"] == "MSELoss" else "sign(y^D - y^L)"
                core_tex = "y^{D} - y^{L}" if loss["type"] == "MSELoss" else r"\mathrm{sign}(y^{D} - y^{L})"
                if acts:
                    txt, tex = f"delta^L = f'(z^L) * ({core})", rf"\delta^{{L}} = f'(z^{{L}}) \odot ({core_tex})"
                else:
                    txt, tex = f"delta^L = {core} (no output activation: f' = 1)", rf"\delta^{{L}} = {core_tex} \quad (f' = 1)"
                if loss["type"] == "MAELoss":
                    txt += " [MAE: not in the notes, the same rule]"
        else:
            txt = f"delta^{s} = f'(z^{s}) * sum_k delta_k^{sup(s + 1)} w_jk^{sup(s + 1)}"
            tex = rf"\delta^{{{s}}} = f'(z^{{{s}}}) \odot \sum_k \delta_k^{{{sup(s + 1)}}} w_{{jk}}^{{{sup(s + 1)}}}"
        out.append(("eq", txt, tex, st["delta"]))
        out.append(("eq", f"dC/dz^{S} = -delta^{S} / c (library)",
                    rf"\frac{{\partial C}}{{\partial z^{{{S}}}}} = -\delta^{{{S}}} / c \ (\text{{library}})", st["gradient"]))
        p = layers[st["linear"]]["params"]
        out.append(("eq", f"dC/dW^{S} = (y^{s - 1})^T dC/dz^{S} = -(1/c) sum_n y_i^{s - 1} delta_j^{S} (W.grad)",
                    rf"\frac{{\partial C}}{{\partial W^{{{S}}}}} = (y^{{{s - 1}}})^{{T}} \frac{{\partial C}}{{\partial z^{{{S}}}}}"
                    rf" = -\frac{{1}}{{c}} \sum_n y_i^{{{s - 1}}} \delta_j^{{{S}}}", p["W"]["grad"]))
        out.append(("eq", f"dC/db^{S} = sum_n dC/dz^{S} (b.grad)",
                    rf"\frac{{\partial C}}{{\partial b^{{{S}}}}} = \sum_n \frac{{\partial C}}{{\partial z^{{{S}}}}}", p["b"]["grad"]))

    out.append(("h", "4. Update: " + _opt_text(opt)))
    wd = opt["weight_decay"]
    for st in stages:
        if st["linear"] is None:
            continue
        s, S = st["s"], sup(st["s"])
        for name, p in layers[st["linear"]]["params"].items():
            sym, tsym = f"{name}^{S}", f"{name}^{{{S}}}"
            d_tex = rf"\frac{{\partial C}}{{\partial {tsym}}}"
            g_txt = f"(dC/d{sym} + lambda {sym})" if wd else f"dC/d{sym}"
            g_tex = rf"\left({d_tex} + \lambda {tsym}\right)" if wd else d_tex
            if gamma is None:
                out.append(("eq", f"{sym} (new) = {sym} - alpha {g_txt}",
                            rf"{tsym}_{{\text{{new}}}} = {tsym} - \alpha\, {g_tex}", p["after"]))
            else:
                out.append(("eq", f"v({sym}) = gamma v + alpha {g_txt} (v before: {_brief(p['velocity_before'])})",
                            rf"v({tsym}) = \gamma\, v + \alpha\, {g_tex}", p["velocity"]))
                if opt["nesterov"]:
                    out.append(("eq", f"{sym} (new) = {sym} - (gamma v + alpha {g_txt}) (Nesterov)",
                                rf"{tsym}_{{\text{{new}}}} = {tsym} - (\gamma\, v + \alpha\, {g_tex})", p["after"]))
                else:
                    out.append(("eq", f"{sym} (new) = {sym} - v", rf"{tsym}_{{\text{{new}}}} = {tsym} - v", p["after"]))
            i_ = "ij" if name == "W" else "j"
            y_ = f" y_i^{s - 1}" if name == "W" else ""
            y_tex = rf"\, y_i^{{{s - 1}}}" if name == "W" else ""
            notes = (f"Delta {name.lower()}_{i_} = (alpha/c) sum_n{y_} delta_j^{S}" if gamma is None and not wd
                     else f"Delta {sym}")
            notes_tex = (rf"\Delta {name.lower()}_{{{i_}}} = \frac{{\alpha}}{{c}} \sum_n{y_tex}\, \delta_j^{{{S}}}"
                         if gamma is None and not wd else rf"\Delta {tsym}")
            out.append(("eq", f"{notes}: the change, new - old", rf"{notes_tex} = {tsym}_{{\text{{new}}}} - {tsym}", p["change"]))
    return out


def _act(rec, training):
    """(name, f, f in LaTeX, f', f' in LaTeX) for a layer after a Linear."""
    if rec["type"] == "Dropout" and not training:
        return "dropout (off in eval mode)", "z", "z", "1", "1"
    return _ACTS.get(rec["type"], (rec["type"], "f(z)", "f(z)", None, None))


def _short(rec):
    """``Linear(2, 3)``, ``Sigmoid``, ``Dropout(p=0.2)``: a layer's name in a sentence."""
    if rec["type"] == "Linear":
        return "Linear({}, {})".format(*rec["params"]["W"]["before"].shape)
    return rec["name"].removesuffix("()")


def _opt_text(opt):
    if opt["momentum"] is None:
        rule = f"SGD, w = w - alpha dC/dw, alpha = {_num(opt['lr'], 6)}"
    else:
        rule = (f"momentum, v = gamma v + alpha dC/dw, w = w - v, alpha = {_num(opt['lr'], 6)}, "
                f"gamma = {_num(opt['momentum'], 6)}" + (", Nesterov" if opt["nesterov"] else ""))
    return rule + (f", weight decay lambda = {_num(opt['weight_decay'], 6)}" if opt["weight_decay"] else "")


def _num(v, digits):
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}g}"


def _small(a) -> bool:
    """Small enough to print whole: at most 64 entries and 16 columns."""
    return a.size <= 64 and (a.ndim < 2 or a.shape[-1] <= 16)


def _brief(a, digits=6):
    if a is None:
        return "none"
    if not np.any(a):
        return "0"
    return "see the JSON" if not _small(a) else " ".join(_num(v, digits) for v in a.ravel())


def _summary(a, digits):
    """Shape, range, mean and the three entries of largest magnitude, for a matrix too large to print."""
    flat = np.abs(a.astype(np.float64)).ravel()
    top = np.argsort(-flat, kind="stable")[:3]
    where = ", ".join(f"{tuple(int(i) for i in np.unravel_index(j, a.shape))}: {_num(a.ravel()[j], digits)}" for j in top)
    return (f"shape {a.shape}, min {_num(a.min(), digits)}, max {_num(a.max(), digits)}, "
            f"mean {_num(a.mean(), digits)}; largest |entries| {where}")


def _text_value(v, digits):
    """Lines for a value: a number, a whole small matrix with aligned columns, or a summary."""
    a = np.asarray(v)
    if a.ndim == 0:
        return [_num(a.item(), digits)]
    if not _small(a):
        return [_summary(a, digits)]
    rows = a.reshape(1, -1) if a.ndim == 1 else a.reshape(-1, a.shape[-1])
    cells = [[_num(x, digits) for x in row] for row in rows]
    width = max(len(c) for row in cells for c in row)
    lines = ["  ".join(c.rjust(width) for c in row) for row in cells]
    if a.ndim == 1:
        return ["[" + lines[0] + "]"]
    return [("[[" if i == 0 else " [") + line + ("]]" if i == len(lines) - 1 else "]") for i, line in enumerate(lines)]


def _digits(record, digits):
    return digits or (12 if record["dtype"] == "float64" else 6)


def render_text(record: dict, digits: int | None = None) -> str:
    """Plain text, one formula per line, its value beside it (``digits`` significant digits; default 6
    for float32, 12 for float64)."""
    digits = _digits(record, digits)
    lines = [f"gpunet explain: one training step, formula by formula (schema {record['schema']})"]
    for step in _steps(record):
        if step[0] == "h":
            lines += ["", step[1]]
        elif step[0] == "p":
            lines += textwrap.wrap(step[1], 100, initial_indent="  ", subsequent_indent="  ")
        else:
            label, value = step[1], _text_value(step[3], digits)
            if len(label) <= 44 and len(value) == 1:
                lines.append(f"    {label.ljust(44)} {value[0]}")
            else:
                lines.append(f"    {label}")
                lines += [" " * 6 + v for v in value]
    return "\n".join(lines) + "\n"


def _tex_value(v, digits):
    a = np.asarray(v)
    if a.ndim == 0:
        return _num(a.item(), digits)
    if not _small(a):
        return r"\text{" + _summary(a, digits).replace("_", r"\_") + "}"
    rows = a.reshape(1, -1) if a.ndim == 1 else a.reshape(-1, a.shape[-1])
    body = r" \\ ".join(" & ".join(_num(x, digits) for x in row) for row in rows)
    return r"\begin{bmatrix} " + body + r" \end{bmatrix}"


def render_markdown(record: dict, digits: int | None = None) -> str:
    """Markdown with LaTeX: one ``$$ formula = value $$`` display per quantity, ready for a report."""
    digits = _digits(record, digits)
    lines = ["# One training step, explained", ""]
    for step in _steps(record):
        if step[0] == "h":
            lines += [f"## {step[1]}", ""]
        elif step[0] == "p":
            lines += [step[2] if step[2] is not None else step[1], ""]
        else:
            lines += [f"$$ {step[2]} = {_tex_value(step[3], digits)} $$", ""]
    return "\n".join(lines)
