"""Renderers of explain's record (:mod:`gpunet.explain.record`): plain text for a terminal, markdown
with LaTeX for a report, and JSON. The record holds the numbers; this module only draws them.

Each formula is written once, in the plain notation the text shows (``delta^L = f'(z^L) * (y^D -
y^L)``); its LaTeX (``\\delta^{L} = f'(z^{L}) \\odot (y^{D} - y^{L})``) is derived from it by
:func:`latex`. Prose marks its inline formulas with backticks, which the text drops and the markdown
turns into ``$...$``. The explanation is one list of steps, ("h", title), ("p", prose) and ("eq",
formula, note, value), drawn by both renderers. Every backward line is in the notes' sign convention
(delta and the corrections Delta, added); the library's own form (the gradient of the cost,
subtracted) is shown once. No text line is longer than :data:`WIDTH`.
"""

from __future__ import annotations

import json
import re
import textwrap
from typing import cast

import numpy as np

from .record import to_json

WIDTH = 100  # a terminal's width: no text line is longer
LABEL = 44  # a formula this short shares its line with a one-line value

# --- formulas: written once, in plain text; LaTeX derived -----------------------------------------
_GREEK = {"alpha", "beta", "gamma", "delta", "Delta", "lambda", "epsilon", "mu", "rho", "sigma"}
_NAMES = {
    "log": r"\log",
    "exp": r"\exp",
    "tanh": r"\tanh",
    "max": r"\max",
    "argmax": r"\arg\max",
    "sum": r"\sum",
    "sign": r"\mathrm{sign}",
    "softmax": r"\mathrm{softmax}",
    "gbar": r"\bar{g}",
    "mean": r"\mathrm{mean}",
    "var": r"\mathrm{var}",
    "xhat": r"\hat{x}",
}
_SCRIPT = r"(?:\^(?:[A-Za-z]|\d+)|_[A-Za-z0-9]+)"
_TOKEN = re.compile(
    r"(?P<frac>dC/d(?P<of>[A-Za-z]" + _SCRIPT + r"*))|(?P<call>(?:sqrt|\^)\()"
    r"|\^(?P<sup>[A-Za-z]|\d+)|_(?P<sub>[A-Za-z0-9]+)|(?P<word>[A-Za-z]+)(?P<digits>\d*)"
    r"|(?P<times>\*)|(?P<other>.)",
    re.S,
)


def _closing(text, start):
    """The index of the parenthesis that closes the one opened just before ``start``."""
    depth = 1
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"formula: expected a closing parenthesis, got {text!r}")


def latex(formula: str) -> str:
    """The LaTeX of a plain formula: ``^X``/``^(...)`` and ``_ij`` become scripts, ``dC/dW^1`` a
    fraction of partials, Greek names and ``sum``/``log``/``max``... commands, ``sqrt(...)`` a root,
    ``*`` the elementwise product; other words are set upright as text; spaces and the rest are
    kept."""
    out, i = [], 0
    while i < len(formula):
        m = cast("re.Match[str]", _TOKEN.match(formula, i))  # its last branch takes any character
        i = m.end()
        if m["frac"]:
            out.append(r"\frac{\partial C}{\partial " + latex(m["of"]) + "}")
        elif m["call"]:
            end = _closing(formula, i)
            inner = latex(formula[i:end])
            out.append(r"\sqrt{" + inner + "}" if m["call"] == "sqrt(" else "^{" + inner + "}")
            i = end + 1
        elif m["sup"] or m["sub"]:
            out.append(("^{" + m["sup"] if m["sup"] else "_{" + m["sub"]) + "}")
        elif m["word"]:
            out.append(_word(m["word"], m["digits"]))
        else:
            out.append(r"\odot" if m["times"] else m["other"])
    # math mode drops spaces: keep the one after a word set upright (\text, \mathrm) and its scripts
    return re.sub(
        r"(\\(?:text|mathrm)\{[^}]*\}(?:[_^]\{[^}]*\})*) (?=[A-Za-z0-9\\])", r"\1\\ ", "".join(out)
    )


def _word(word, digits):
    if word in _GREEK:
        return "\\" + word + (f"_{{{digits}}}" if digits else "")
    if word in _NAMES:
        return _NAMES[word] + digits
    return word + digits if len(word) == 1 else r"\text{" + word + "}" + digits


def _prose_text(prose: str) -> str:
    return prose.replace("`", "")


def _prose_markdown(prose: str) -> str:
    """Prose with its `formulas` as inline LaTeX (markdown's emphasis characters escaped around
    them)."""
    parts = prose.split("`")
    return "".join(
        f"${latex(p)}$" if k % 2 else re.sub(r"([*_])", r"\\\1", p) for k, p in enumerate(parts)
    )


def _prose_tex(prose: str) -> str:
    """Prose inside a display: its words as ``\\text{...}``, its `formulas` as LaTeX."""
    parts = prose.split("`")
    return "".join(
        latex(p) if k % 2 else r"\text{" + re.sub(r"([_&%#$])", r"\\\1", p) + "}"
        for k, p in enumerate(parts)
        if p
    )


# --- values ---------------------------------------------------------------------------------------
def _num(v, digits):
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}g}"


def _small(a) -> bool:
    """Small enough to show whole: at most 64 entries and 16 columns."""
    return a.size <= 64 and a.ndim <= 2 and (a.ndim < 2 or a.shape[-1] <= 16)


def _brief(a, digits=6):
    if a is None:
        return "none"
    if not np.any(a):
        return "0"
    return "see the JSON" if not _small(a) else " ".join(_num(v, digits) for v in a.ravel())


def _summary(a, digits):
    """Shape, range, mean and the three entries of largest magnitude, for a matrix too large to
    show."""
    flat = np.abs(a.astype(np.float64)).ravel()
    top = np.argsort(-flat, kind="stable")[:3]
    where = ", ".join(
        f"{tuple(int(i) for i in np.unravel_index(j, a.shape))}: {_num(a.ravel()[j], digits)}"
        for j in top
    )
    return (
        f"shape {a.shape}, min {_num(a.min(), digits)}, max {_num(a.max(), digits)}, "
        f"mean {_num(a.mean(), digits)}; largest |entries| {where}"
    )


def _text_value(v, digits, width):
    """Lines no longer than ``width`` for a value: a number, a small matrix with aligned columns (in
    blocks of columns where a row is too wide), or a summary."""
    a = np.asarray(v)
    if a.ndim == 0:
        return [_num(a.item(), digits)]
    if not _small(a):
        return textwrap.wrap(_summary(a, digits), width)
    rows = a.reshape(1, -1) if a.ndim == 1 else a
    cells = [[_num(x, digits) for x in row] for row in rows]
    cell = max(len(c) for row in cells for c in row)
    per_block = max(1, (width - 4) // (cell + 2))
    lines = []
    for start in range(0, rows.shape[1], per_block):
        stop = min(start + per_block, rows.shape[1])
        if per_block < rows.shape[1]:
            lines.append(f"columns {start}..{stop - 1}")
        block = ["  ".join(c.rjust(cell) for c in row[start:stop]) for row in cells]
        if a.ndim == 1:
            lines.append("[" + block[0] + "]")
        else:
            lines += [
                ("[[" if i == 0 else " [") + line + ("]]" if i == len(block) - 1 else "]")
                for i, line in enumerate(block)
            ]
    return lines


def _tex_value(v, digits):
    a = np.asarray(v)
    if a.ndim == 0:
        return _num(a.item(), digits)
    if not _small(a):
        return r"\text{" + _summary(a, digits).replace("_", r"\_") + "}"
    rows = a.reshape(1, -1) if a.ndim == 1 else a
    body = r" \\ ".join(" & ".join(_num(x, digits) for x in row) for row in rows)
    return r"\begin{bmatrix} " + body + r" \end{bmatrix}"


def _digits(record, digits):
    return digits or (12 if record["dtype"] == "float64" else 6)


# --- the two drawings of one list of steps --------------------------------------------------------
def render_text(record: dict, digits: int | None = None, intro: str | None = None) -> str:
    """Plain text, one formula per line and its value beside or below it (``digits`` significant
    digits; default 6 for float32, 12 for float64); ``intro``: prose to open with. No line exceeds
    WIDTH."""
    digits = _digits(record, digits)
    lines = [f"gpunet explain: one training step, formula by formula (schema {record['schema']})"]
    for step in steps(record, intro):
        if step[0] == "h":
            lines += [""] + textwrap.wrap(step[1], WIDTH, subsequent_indent="  ")
        elif step[0] == "p":
            lines += textwrap.wrap(
                _prose_text(step[1]), WIDTH, initial_indent="  ", subsequent_indent="  "
            )
        else:
            _, formula, note, value = step
            label = formula + (f" ({_prose_text(note)})" if note else "")
            shown = _text_value(value, digits, WIDTH - 6)
            if len(label) <= LABEL and len(shown) == 1 and 5 + LABEL + len(shown[0]) <= WIDTH:
                lines.append(f"    {label.ljust(LABEL)} {shown[0]}")
            else:
                lines += textwrap.wrap(
                    label, WIDTH, initial_indent="    ", subsequent_indent="        "
                )
                lines += [" " * 6 + line for line in shown]
    return "\n".join(lines) + "\n"


def render_markdown(record: dict, digits: int | None = None, intro: str | None = None) -> str:
    """Markdown with LaTeX: one ``$$ formula = value $$`` display per quantity, ready for a
    report."""
    digits = _digits(record, digits)
    lines = ["# One training step, explained", ""]
    for step in steps(record, intro):
        if step[0] == "h":
            lines += [f"## {step[1]}", ""]
        elif step[0] == "p":
            lines += [_prose_markdown(step[1]), ""]
        else:
            _, formula, note, value = step
            aside = r" \qquad " + _prose_tex(f"({note})") if note else ""
            lines += [f"$$ {latex(formula)} = {_tex_value(value, digits)}{aside} $$", ""]
    return "\n".join(lines)


def render_json(record: dict) -> str:
    """The JSON text (:func:`gpunet.explain.record.to_json`): one key per line, each matrix on one
    line."""
    return _dump(to_json(record), 0) + "\n"


def _dump(v, depth):
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(v, dict):
        items = [f"{inner}{json.dumps(k)}: {_dump(x, depth + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}" if items else "{}"
    if isinstance(v, list) and any(isinstance(x, dict) for x in v):
        return "[\n" + ",\n".join(inner + _dump(x, depth + 1) for x in v) + "\n" + pad + "]"
    return json.dumps(v, allow_nan=False)


# --- the steps: what the notes say, with the record's numbers -------------------------------------
# f and f' of each activation, written in terms of its argument {z} and its output {y}
_ACTS = {
    "Sigmoid": ("sigmoid", "1 / (1 + e^(-{z}))", "{y} (1 - {y})"),
    "Tanh": ("tanh", "tanh({z})", "1 - ({y})^2"),
    "ReLU": ("ReLU", "max(0, {z})", "[{z} > 0]"),
    "Dropout": ("dropout", "m * {z} / (1 - p)", "m / (1 - p)"),
    "Softmax": ("softmax", "e^({z}_j) / sum_k e^({z}_k)", None),
}
# name, C, and c (the delta scale) in words, per cost
_COSTS = {
    "SoftmaxCrossEntropy": ("softmax cross-entropy", "-(1/N) sum_n sum_j y^D_nj log y^L_nj", "N"),
    "MSELoss": ("mean squared error", "1/(N K) sum_n sum_j (y^D_nj - y^L_nj)^2", "N K / 2"),
    "MAELoss": ("mean absolute error", "1/(N K) sum_n sum_j |y^D_nj - y^L_nj|", "N K"),
}


def steps(record: dict, intro: str | None = None) -> list:
    """The explanation of a record as a list of steps (see the module docstring)."""
    return (
        _network(record, intro)
        + _forward(record)
        + _cost(record)
        + _backward(record)
        + _library(record)
        + _update(record)
    )


def _sup(record, s):
    """The notes call the last layer L."""
    return "L" if s == len(record["stages"]) else str(s)


def _act(layer, training):
    """(name, f, f') of an activation layer, for the templates above."""
    if layer["type"] == "Dropout":
        if not training:
            return "dropout, off in eval mode", "{z}", "1"
        return (f"dropout, p = {layer['config']['p']:g}, m its 0/1 mask",) + _ACTS["Dropout"][1:]
    return _ACTS.get(layer["type"], (layer["type"], f"{layer['type']}({{z}})", None))


_PARAMS = {
    "gamma": "scale",
    "beta": "shift",
}  # BatchNorm's gamma and beta: the notes' gamma is momentum's


def _chain(r, st, S):
    """(layer, its argument, its output as an expression) for each layer after the stage's Linear; a
    BatchNorm's output is named u^s."""
    out, expr = [], f"z^{S}"
    for i in st["layers"][1:]:
        layer = r["layers"][i]
        result = (
            f"u^{S}"
            if layer["type"] == "BatchNorm"
            else _act(layer, r["training"])[1].format(z=expr)
        )
        out.append((layer, expr, result))
        expr = result
    return out


def _batch_norm(r, layer, arg, S):
    """BatchNorm's forward lines: its scale and shift, then u^s (over the batch, or the running
    statistics)."""
    p, eps = layer["params"], _num(layer["config"]["eps"], 6)
    if r["training"]:
        u = f"scale^{S} * ({arg} - mean_n {arg}) / sqrt(var_n {arg} + epsilon_BN) + shift^{S}"
        note = f"BatchNorm, `epsilon_BN = {eps}`: the batch's mean and biased variance"
    else:
        u = f"scale^{S} * ({arg} - mean_run^{S}) / sqrt(var_run^{S} + epsilon_BN) + shift^{S}"
        note = f"BatchNorm in eval mode, `epsilon_BN = {eps}`: the running mean and variance"
    return [
        ("eq", f"scale^{S}", "BatchNorm's gamma", p["gamma"]["before"]),
        ("eq", f"shift^{S}", "BatchNorm's beta", p["beta"]["before"]),
        ("eq", f"u^{S} = {u}", note, layer["output"]),
    ]


def _short(layer):
    """``Linear(2, 3)``, ``Sigmoid``, ``Dropout(p=0.2)``: a layer's name in a sentence."""
    if layer["type"] == "Linear":
        return "Linear({}, {})".format(*layer["params"]["W"]["before"].shape)
    return layer["name"].removesuffix("()")


def _opt_text(opt):
    """The optimizer's rule in a few words, with its scalars."""
    n = lambda key: _num(opt[key], 6)  # noqa: E731
    kind, alpha = opt["type"], f"alpha = {n('lr')}"
    if kind == "SGD":
        rule = f"SGD, w = w + Delta w, {alpha}"
    elif kind == "Momentum":
        rule = f"momentum, v = gamma v - Delta w, w = w - v, {alpha}, gamma = {n('momentum')}" + (
            ", Nesterov" if opt["nesterov"] else ""
        )
    elif kind in ("Adam", "AdamW"):
        b1, b2 = (_num(b, 6) for b in opt["betas"])
        rule = (
            f"{kind} (PyTorch's), {alpha}, beta1 = {b1}, beta2 = {b2}, "
            f"epsilon = {n('eps')}, t = {opt['t']}"
        )
    elif kind == "RMSprop":
        rule = (
            f"RMSprop (PyTorch's), {alpha}, rho = {n('alpha')} (PyTorch's alpha), epsilon = "
            f"{n('eps')}"
            + (f", momentum mu = {n('momentum')}" if opt["momentum"] else "")
            + (", centered" if opt["centered"] else "")
        )
    else:
        rule = f"{kind}, {alpha}"
    decay = "decoupled weight decay" if kind == "AdamW" else "weight decay"
    return rule + (f", {decay} lambda = {n('weight_decay')}" if opt["weight_decay"] else "")


def _network(r, intro):
    layers, loss = r["layers"], r["loss"]
    dropout_off = not r["training"] and any(x["type"] == "Dropout" for x in layers)
    c_words = _COSTS[loss["type"]][2]
    out = [("h", "Network")] + ([("p", intro)] if intro else [])
    out.append(
        (
            "p",
            f"{'-'.join(map(str, r['sizes']))} network: "
            + " -> ".join(map(_short, layers))
            + f"; cost: {_COSTS[loss['type']][0]}; optimizer: {_opt_text(r['optimizer'])}; "
            f"{r['dtype']}, "
            + f"a batch of N = {r['batch']}, K = {r['sizes'][-1]} outputs"
            + (" (dropout off: eval mode)" if dropout_off else ""),
        )
    )
    out.append(
        (
            "p",
            "Notation (course notes): `x = y^0` the input; `W^s` (inputs x outputs) and `b^s` "
            "the weights and biases of layer s; `z^s = b^s + y^(s-1) W^s` its weighted sum; "
            "`y^s = f(z^s)` its output; `y^D` the desired output, `y^L` the network's.",
        )
    )
    out.append(
        (
            "p",
            "Sign convention (the notes'): `delta^L = y^D - y^L` for cross-entropy, "
            "`f'(z^L) * (y^D - y^L)` for MSE, points down the cost, and the corrections are added: "
            "`w = w + Delta w` with `Delta w_ij = alpha y_i delta_j`, summed over the batch. The "
            "library's cost is a mean, which divides the corrections by "
            f"`c = {c_words} = {_num(loss['delta_scale'], 6)}`. Every line below is in this "
            "convention; the library's own form is shown once, after the backward pass.",
        )
    )
    return out


def _forward(r):
    layers, stages, L = r["layers"], r["stages"], len(r["stages"])
    out = [("h", "1. Forward pass"), ("eq", "y^0 = x", "the input", r["input"])]
    for st in stages:
        s, S = st["s"], _sup(r, st["s"])
        out.append(
            (
                "p",
                f"Layer {s}"
                + (" (output, L)" if s == L else "")
                + ": "
                + " -> ".join(_short(layers[i]) for i in st["layers"]),
            )
        )
        p = layers[st["linear"]]["params"]
        out += [
            ("eq", f"W^{S}", None, p["W"]["before"]),
            ("eq", f"b^{S}", None, p["b"]["before"]),
            ("eq", f"z^{S} = b^{S} + y^{s - 1} W^{S}", None, st["z"]),
        ]
        chain = _chain(r, st, S)
        for k, (layer, arg, result) in enumerate(chain):
            last = f"y^{S} = " if k == len(chain) - 1 else ""
            if layer["type"] == "BatchNorm":
                lines = _batch_norm(r, layer, arg, S)
                out += lines[:-1] + [("eq", last + lines[-1][1], *lines[-1][2:])]
            else:
                out.append(("eq", last + result, _act(layer, r["training"])[0], layer["output"]))
        if s == L and r["loss"]["type"] == "SoftmaxCrossEntropy":
            out.append(
                (
                    "eq",
                    "y^L = softmax(z^L) = e^(z^L_j) / sum_k e^(z^L_k)",
                    "inside the cost",
                    r["y_L"],
                )
            )
        elif s == L and not chain:
            out.append(("eq", "y^L = z^L", "no output activation", r["y_L"]))
    return out


def _cost(r):
    target, loss = r["target"], r["loss"]
    what = (
        f"class {', '.join(map(str, target.tolist()))}, one-hot"
        if target.ndim == 1
        else "target rows"
    )
    name, cost, _ = _COSTS[loss["type"]]
    return [
        ("h", "2. Cost"),
        ("eq", "y^D", what, r["y_D"]),
        ("eq", f"C = {cost}", name, loss["value"]),
        ("eq", "argmax_j y^L_nj", "the prediction", r["prediction"]),
    ]


def _derivatives(r, st, S):
    """The f' lines of layer s (one, or one per activation and their product) and f's argument (z^s,
    or u^s after a BatchNorm); the argument is None where no activation follows."""
    chain = [c for c in _chain(r, st, S) if c[0]["derivative"] is not None]
    exprs, out = [], []
    for k, (layer, arg, result) in enumerate(chain):
        name, _, fprime = _act(layer, r["training"])
        exprs.append(fprime.format(z=arg, y=f"y^{S}" if k == len(chain) - 1 else result))
        if len(chain) > 1:
            out.append(("eq", exprs[-1], f"the f' of {name}", layer["derivative"]))
    if not chain:
        return out, None
    first = chain[0][1]
    if len(chain) == 1:
        out.append(
            (
                "eq",
                f"f'({first}) = {exprs[0]}",
                _act(chain[0][0], r["training"])[0],
                chain[0][0]["derivative"],
            )
        )
    else:
        product = np.prod([c[0]["derivative"] for c in chain], axis=0)
        out.append(("eq", f"f'({first}) = " + " * ".join(exprs), None, product))
    return out, first


def _backward(r):
    layers, stages, L = r["layers"], r["stages"], len(r["stages"])
    out = [
        ("h", "3. Backward pass, from the output to the input: the notes' delta and corrections")
    ]
    for st in reversed(stages):
        s, S = st["s"], _sup(r, st["s"])
        out.append(("p", f"Layer {s}" + (" (output, L)" if s == L else "")))
        derivatives, arg = _derivatives(r, st, S)
        if s == L:
            out += derivatives + [_output_delta(r["loss"]["type"], arg is not None, st["delta"])]
        else:
            out += _hidden_delta(r, st, S, derivatives, arg)
        p = layers[st["linear"]]["params"]
        out += [
            (
                "eq",
                f"Delta W^{S} = (alpha/c) (y^{s - 1})^T delta^{S}",
                f"`Delta w_ij = (alpha/c) sum_n y_i^{s - 1} delta_j^{S}`",
                p["W"]["correction"],
            ),
            ("eq", f"Delta b^{S} = (alpha/c) sum_n delta^{S}", None, p["b"]["correction"]),
        ]
    return out


def _hidden_delta(r, st, S, derivatives, arg):
    """delta^s of a hidden layer from the layer above, through f' and, where there is one,
    BatchNorm."""
    layers, c = r["layers"], r["loss"]["delta_scale"]
    n1 = _sup(r, st["s"] + 1)
    grad_in = layers[r["stages"][st["s"]]["linear"]]["grad_input"]
    back = f"sum_k delta_k^{n1} w_jk^{n1}"
    out = [
        ("eq", f"{back} = delta^{n1} (W^{n1})^T", None, grad_in * grad_in.dtype.type(-c))
    ] + derivatives
    bn = next((layers[i] for i in st["layers"] if layers[i]["type"] == "BatchNorm"), None)
    if bn is None:
        return out + [
            (
                "eq",
                f"delta^{S} = f'({arg}) * {back}" if arg else f"delta^{S} = {back}",
                None,
                st["delta"],
            )
        ]
    d_u = bn["grad_output"] * bn["grad_output"].dtype.type(-c)
    d_u_rule = f"delta_u^{S} = f'({arg}) * {back}" if arg else f"delta_u^{S} = {back}"
    out.append(("eq", d_u_rule, f"the delta of `u^{S}`", d_u))
    if r["training"]:
        rule = (
            f"scale^{S} / sigma^{S} * (delta_u^{S} - mean_n delta_u^{S} - xhat^{S} * mean_n "
            f"(delta_u^{S} "
            f"* xhat^{S}))"
        )
        note = (
            f"BatchNorm: `xhat^{S} = (z^{S} - mean_n z^{S}) / sigma^{S}`, "
            f"`sigma^{S} = sqrt(var_n z^{S} + epsilon_BN)`"
        )
    else:
        rule, note = (
            f"scale^{S} / sigma^{S} * delta_u^{S}",
            f"eval mode: `sigma^{S} = sqrt(var_run^{S} + epsilon_BN)`",
        )
    p = bn["params"]
    return out + [
        ("eq", f"delta^{S} = {rule}", note, st["delta"]),
        (
            "eq",
            f"Delta scale^{S} = (alpha/c) sum_n delta_u^{S} * xhat^{S}",
            None,
            p["gamma"]["correction"],
        ),
        ("eq", f"Delta shift^{S} = (alpha/c) sum_n delta_u^{S}", None, p["beta"]["correction"]),
    ]


def _output_delta(cost, has_f, delta):
    """The notes' delta^L for each cost, with the output activation's f' where there is one."""
    if cost == "SoftmaxCrossEntropy":
        return ("eq", "delta^L = y^D - y^L", None, delta)
    core = "y^D - y^L" if cost == "MSELoss" else "sign(y^D - y^L)"
    note = "MAE: not in the notes, the same rule" if cost == "MAELoss" else None
    if has_f:
        return ("eq", f"delta^L = f'(z^L) * ({core})", note, delta)
    return (
        "eq",
        f"delta^L = {core}",
        "no output activation: `f' = 1`" + (f"; {note}" if note else ""),
        delta,
    )


def _library(r):
    loss = r["loss"]
    c = f"`c = {_COSTS[loss['type']][2]} = {_num(loss['delta_scale'], 6)}`"
    return [
        (
            "p",
            "The library's form, where it differs: it keeps the gradient of the cost, "
            f"`dC/dz^s = -delta^s / c` with {c}, so that W.grad is `dC/dW^s = -Delta W^s / alpha` "
            "(the numbers in the JSON), and it subtracts, `w = w - alpha dC/dw`: the same step. "
            "For the output layer:",
        ),
        ("eq", "dC/dz^L = -delta^L / c", "loss.backward()", r["stages"][-1]["gradient"]),
    ]


def _update(r):
    opt, layers = r["optimizer"], r["layers"]
    rule = {"SGD": _sgd, "Momentum": _momentum, "Adam": _adam, "AdamW": _adam, "RMSprop": _rmsprop}
    out = [("h", "4. Update: " + _opt_text(opt))]
    if opt["type"] not in rule:
        out.append(("p", f"{opt['type']}: no formula to show; the new values are the library's."))
    for st in r["stages"]:
        S = _sup(r, st["s"])
        for i in st["layers"]:
            for name, p in (layers[i]["params"] or {}).items():
                sym = f"{_PARAMS.get(name, name)}^{S}"
                if opt["type"] in rule:
                    out += rule[opt["type"]](sym, p, opt)
                else:
                    out.append(("eq", f"{sym} (new)", None, p["after"]))
            if layers[i]["type"] == "BatchNorm" and r["training"]:
                out += _running(layers[i], S)
    return out


def _running(layer, S):
    """BatchNorm's running statistics after a training step (PyTorch's update: the variance
    unbiased)."""
    m, buffers = _num(layer["config"]["momentum"], 6), layer["buffers"]
    return [
        (
            "eq",
            f"mean_run^{S} (new) = (1 - {m}) mean_run^{S} + {m} mean_n z^{S}",
            None,
            buffers["running_mean"],
        ),
        (
            "eq",
            f"var_run^{S} (new) = (1 - {m}) var_run^{S} + {m} N/(N - 1) var_n z^{S}",
            None,
            buffers["running_var"],
        ),
    ]


def _sgd(sym, p, opt):
    wd = f" - alpha lambda {sym}" if opt["weight_decay"] else ""
    return [("eq", f"{sym} (new) = {sym} + Delta {sym}{wd}", None, p["after"])]


def _momentum(sym, p, opt):
    """The notes' momentum, v = gamma v + alpha dC/dw (dC/dw = -Delta w / alpha), w = w - v."""
    v, decay = f"v({sym})", opt["weight_decay"]
    wd = f" - alpha lambda {sym}" if decay else ""
    out = [
        (
            "eq",
            f"{v} = gamma {v} - Delta {sym}" + (f" + alpha lambda {sym}" if decay else ""),
            f"`{v}` before: {_brief(p['state_before']['velocities'])}",
            p["state"]["velocities"],
        )
    ]
    if opt["nesterov"]:
        out.append(
            ("eq", f"{sym} (new) = {sym} - gamma {v} + Delta {sym}{wd}", "Nesterov", p["after"])
        )
    else:
        out.append(("eq", f"{sym} (new) = {sym} - {v}", None, p["after"]))
    return out


def _gradient(sym, p, opt, coupled=True):
    """The gradient g that Adam and RMSprop use: the library's dC/dw = -Delta w / alpha (plus L2
    decay)."""
    decay = opt["weight_decay"] if coupled else 0.0
    g = p["grad"] + p["grad"].dtype.type(decay) * p["before"] if decay else p["grad"]
    return ("eq", f"g = -Delta {sym} / alpha" + (f" + lambda {sym}" if decay else ""), "`dC/dw`", g)


def _adam(sym, p, opt):
    """Adam's moments and step (PyTorch's order); AdamW decays the weight first, the gradient
    bare."""
    m, v = f"m({sym})", f"v({sym})"
    adamw = opt["type"] == "AdamW"
    start = f"(1 - alpha lambda) {sym}" if adamw and opt["weight_decay"] else sym
    return [
        _gradient(sym, p, opt, coupled=not adamw),
        (
            "eq",
            f"{m} = beta1 {m} + (1 - beta1) g",
            f"`{m}` before: {_brief(p['state_before']['m'])}",
            p["state"]["m"],
        ),
        (
            "eq",
            f"{v} = beta2 {v} + (1 - beta2) g^2",
            f"`{v}` before: {_brief(p['state_before']['v'])}",
            p["state"]["v"],
        ),
        (
            "eq",
            f"{sym} (new) = {start} - alpha / (1 - beta1^t) {m} / (sqrt({v}) / sqrt(1 - beta2^t) + "
            "epsilon)",
            None,
            p["after"],
        ),
    ]


def _rmsprop(sym, p, opt):
    """RMSprop's mean square (centered: minus the mean gradient squared) and step, with its
    momentum."""
    v, gbar, buf = f"v({sym})", f"gbar({sym})", f"buf({sym})"
    out = [
        _gradient(sym, p, opt),
        (
            "eq",
            f"{v} = rho {v} + (1 - rho) g^2",
            f"`{v}` before: {_brief(p['state_before']['v'])}",
            p["state"]["v"],
        ),
    ]
    root = f"sqrt({v})"
    if opt["centered"]:
        out.append(("eq", f"{gbar} = rho {gbar} + (1 - rho) g", None, p["state"]["grad_avg"]))
        root = f"sqrt({v} - {gbar}^2)"
    if opt["momentum"]:
        out += [
            ("eq", f"{buf} = mu {buf} + g / ({root} + epsilon)", None, p["state"]["buffer"]),
            ("eq", f"{sym} (new) = {sym} - alpha {buf}", None, p["after"]),
        ]
    else:
        out.append(("eq", f"{sym} (new) = {sym} - alpha g / ({root} + epsilon)", None, p["after"]))
    return out
