"""One training step, recorded: every quantity the library computed, in the course notes' notation.

``explain_step(net, loss, optimizer, x, y)`` runs exactly one step (forward, cost, backward, update)
through the very layer, loss and optimizer objects that training uses and records a host copy of
every quantity. Nothing is recomputed here: each layer's public ``forward(x)`` and ``backward(dy)``
are called one by one (``Sequential.forward`` would run the same layers but keep only the last
output, hiding the weighted sums ``z^s``), gradients are read from ``param.grad``, and the new
weights from ``param.data`` after ``optimizer.step()``. The only numbers derived here are notation:
the notes' delta and corrections (from the library's gradient, below), the one-hot ``y^D`` of class
labels, the change ``new - old`` of each parameter, and, for the cross-entropy cost, the
probabilities ``y^L`` of the library's own ``Softmax``. This is the record only;
:mod:`gpunet.explain.render` prints it as text, markdown or JSON.

Notation (course notes): ``x = y^0`` the input; layer ``s`` has weights ``W^s`` (inputs x outputs,
as in ``Linear``) and biases ``b^s``; ``z^s = b^s + y^(s-1) W^s`` is its weighted sum and ``y^s =
f(z^s)`` its output; ``y^L`` is the network's output and ``y^D`` the desired one; N instances in the
batch, K outputs.

Sign convention. The notes define the delta of the output layer as ``delta^L = y^D - y^L``
(cross-entropy) or ``f'(z^L) (y^D - y^L)`` (MSE) and *add* the corrections ``Delta w_ij = alpha y_i
delta_j``. The library computes the gradient of the cost, ``dC/dz``, which points the other way and
is averaged over the batch (``(y^L - y^D) / N`` for cross-entropy), and *subtracts* it: ``w = w -
alpha dC/dw``. Both are the same step. Here ``delta^s = -c dC/dz^s`` with ``c = N`` for
cross-entropy, ``N K / 2`` for MSE (its cost is averaged over N*K entries and its derivative carries
a 2) and ``N K`` for MAE, so that ``delta`` is exactly the notes' quantity for any N and K; the
correction is ``Delta w = -alpha dC/dw``.

JSON schema ``gpunet-explain/2`` (:func:`to_json`; matrices are nested lists, rows first, with the
exact values of the arrays: a float32 number reads back as the same float32; strict JSON, as every
file gpunet writes (:func:`gpunet.files.strict`): a NaN or an infinity is null, so that any JSON
reader takes it; version 1 wrote the strings "nan", "inf" and "-inf" and had no ``correction``):

- ``schema``: "gpunet-explain/2"; ``dtype``: "float32" or "float64"; ``device``; ``batch``: N;
  ``sizes``: [inputs, hidden..., outputs]; ``training``: whether dropout was active
- ``input``: x (N, inputs); ``target``: what the loss was given, labels (N,) or rows (N, K);
  ``y_D``: the desired outputs (N, K) (one-hot rows for labels); ``y_L``: the network's outputs (N,
  K) (softmax probabilities for cross-entropy); ``prediction``: argmax of each row of ``y_L``
- ``loss``: {``type``, ``value`` (the cost C), ``gradient`` (dC/d output, (N, K), from
  ``loss.backward()``), ``delta_scale`` (c above)}
- ``optimizer``: {``type``, ``lr`` (alpha), ``weight_decay`` (lambda), and the rule's other scalars
  as its ``state_dict()`` names them after the step: ``momentum`` (gamma) and ``nesterov`` for
  Momentum; ``betas``, ``eps`` and ``t`` (the step count, 1 for a first step) for Adam and AdamW;
  ``alpha`` (the decay rho of the squares), ``eps``, ``momentum`` and ``centered`` for RMSprop}
- ``layers``: one object per core layer, in order: {``index``, ``type``, ``name`` (its repr),
  ``config`` (its ``config()``: the type and the options, e.g. Dropout's ``p``, BatchNorm's
  ``momentum``), ``input``, ``output``, ``grad_output`` (dC/d output), ``grad_input`` (dC/d input,
  what ``backward`` returned), ``derivative`` (f' elementwise, from ``backward`` of ones; null for
  Linear, Softmax and BatchNorm), ``params`` (null for a layer without parameters, else one P per
  parameter by its name: "W" and "b" for Linear, "gamma" and "beta" for BatchNorm, with P =
  {``before``, ``grad``, ``correction`` (the notes' Delta, -alpha grad), ``after``, ``change``
  (after - before), ``state_before`` and ``state`` (the optimizer's arrays for this parameter before
  and after the step, by the names of its ``state_dict()``: {} for SGD, {"velocities"} for Momentum,
  {"m", "v"} for Adam, {"v", ...} for RMSprop)}), ``buffers`` (BatchNorm only: ``running_mean`` and
``running_var`` after the step)}
- ``stages``: the notes' layers s = 1..L, each a Linear and what follows it up to the next Linear:
  {``s``, ``layers`` (indices into ``layers``), ``linear`` (the index of its Linear),
  ``activations`` (type names), ``y_prev`` (y^(s-1)), ``z`` (z^s), ``y`` (y^s), ``gradient``
(dC/dz^s), ``delta`` (the notes' delta^s)}
"""

from __future__ import annotations

import numpy as np

from ..backend import ArrayLike, device_of, get_array_module, on_device_of_net, to_device, to_numpy
from ..data.arrays import features
from ..files import strict
from ..layers import BatchNorm, Dropout, Layer, Linear, ReLU, Sigmoid, Softmax, Tanh
from ..losses import Loss, MAELoss, MSELoss, SoftmaxCrossEntropy
from ..optimizers import Optimizer

SCHEMA = "gpunet-explain/2"
ELEMENTWISE = (ReLU, Sigmoid, Tanh, Dropout)  # backward of ones gives f' elementwise


def _host(a):
    """A host (NumPy) copy: layers and optimizers reuse their buffers, so what we keep must be
    ours."""
    return to_numpy(a).copy()


@on_device_of_net
def explain_step(net: Layer, loss: Loss, optimizer: Optimizer, x: ArrayLike, y: ArrayLike) -> dict:
    """Run one training step of ``net`` on ``(x, y)`` and return every quantity (see the module
    docstring).

    ``x``: (N, inputs) or (inputs,) array or list, cast to the network's dtype and moved to its
    device. ``y``: integer labels (N,) (or one label), or target rows (N, K) (or one row) of floats.
    ``loss``: SoftmaxCrossEntropy (on a network whose last layer is a Linear: the cost applies
    softmax itself), MSELoss or MAELoss (any output activation); ``optimizer``: any of gpunet's
    optimizers built on exactly ``net.parameters()`` (any order). The network and the optimizer are
    changed, as by a training step. Returns a dict of host NumPy arrays (the record);
    :func:`to_json` makes it JSON.
    """
    layers, linears = _check(net, loss, optimizer)
    params = net.parameters()
    dtype, device = params[0].data.dtype, device_of(params[0].data)
    x, target = _prepare(x, y, dtype, device, linears[0].in_features)
    states = _optimizer_states(optimizer, params)
    records, value, loss_grad, out = _passes(layers, loss, x, target)
    grads = {id(p): _host(p.grad) for p in params}
    optimizer.step()
    _params(layers, records, states, grads, optimizer)
    y_l, y_d, scale = _outputs(loss, out, records[-1]["output"], _host(target), dtype)
    record = {
        "schema": SCHEMA,
        "dtype": str(np.dtype(dtype)),
        "device": device,
        "batch": len(y_l),
        "sizes": [linears[0].in_features] + [lin.out_features for lin in linears],
        "training": bool(getattr(net, "training", True)),
        "input": records[0]["input"],
        "target": _host(target),
        "y_D": y_d,
        "y_L": y_l,
        "prediction": y_l.argmax(axis=1),
        "loss": {
            "type": type(loss).__name__,
            "value": float(to_numpy(value)),
            "gradient": loss_grad,
            "delta_scale": scale,
        },
        "optimizer": _optimizer(optimizer),
        "layers": records,
    }
    record["stages"] = _stages(records, scale)
    return record


def _check(net, loss, optimizer):
    """The network's layers and its Linear layers, once every argument is known to fit."""
    layers = list(getattr(net, "layers", []))
    linears = [layer for layer in layers if isinstance(layer, Linear)]
    if not linears or not isinstance(layers[0], Linear):
        raise ValueError(f"net: expected a Sequential that starts with a Linear layer, got {net!r}")
    if not isinstance(loss, (SoftmaxCrossEntropy, MSELoss, MAELoss)):
        raise TypeError(
            f"loss: expected SoftmaxCrossEntropy, MSELoss or MAELoss, got {type(loss).__name__}"
        )
    for i, layer in enumerate(layers):
        if isinstance(layer, BatchNorm) and (
            not isinstance(layers[i - 1], Linear) or layer in _last_stage(layers)
        ):
            raise ValueError(
                f"net: expected each BatchNorm right after a hidden Linear (as mlp puts it), got "
                f"layers[{i}] after {type(layers[i - 1]).__name__}"
            )
    if isinstance(loss, SoftmaxCrossEntropy) and not isinstance(layers[-1], Linear):
        raise ValueError(
            "net: expected a Linear output layer for SoftmaxCrossEntropy (the cost applies "
            f"softmax to z^L itself), got {type(layers[-1]).__name__} last"
        )
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"optimizer: expected a gpunet optimizer (SGD, Momentum, Adam, AdamW, RMSprop), "
            f"got {type(optimizer).__name__}"
        )
    slot = {id(p) for p in optimizer.params}
    params = net.parameters()
    if len(params) != len(optimizer.params) or any(id(p) not in slot for p in params):
        raise ValueError(
            f"optimizer: expected it to hold exactly the network's {len(params)} parameters, "
            f"got {len(optimizer.params)} parameters that are not the same set"
        )
    return layers, linears


def _last_stage(layers):
    """The layers from the last Linear on (the notes' layer L)."""
    last = max(i for i, layer in enumerate(layers) if isinstance(layer, Linear))
    return layers[last:]


def _prepare(x, y, dtype, device, inputs):
    """x as (N, inputs) and the target as the loss wants it, both in ``dtype`` on ``device``."""
    try:
        host = to_numpy(x)
    except ValueError:  # ragged rows: the front door names them
        host = x
    x = features(
        host.reshape(1, -1) if getattr(host, "ndim", 2) == 1 else host, dtype, "cpu"
    )  # gpunet.data.arrays
    if x.shape[1] != inputs:
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


def _optimizer_states(optimizer, params):
    """Each parameter's value and its optimizer arrays ({name: host array}), by ``id``."""
    slot = {id(p): i for i, p in enumerate(optimizer.params)}
    arrays = optimizer.state_dict()[
        "arrays"
    ]  # host copies, one per parameter in the optimizer's order
    return {
        id(p): (_host(p.data), {name: a[slot[id(p)]] for name, a in arrays.items()}) for p in params
    }


def _optimizer(optimizer):
    """The optimizer's type and scalars (lr, weight decay, the rule's own) after the step."""
    state = optimizer.state_dict()
    scalars = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in state.items()
        if k not in ("kind", "arrays")
    }
    return {"type": type(optimizer).__name__, **scalars}


def _passes(layers, loss, x, target):
    """Forward through each layer's own ``forward``, the cost, then each ``backward`` in reverse
    (which returns dC/d(input) and writes ``param.grad``). (records, cost, dC/d output, the
    network's output)."""
    records, h = [], x
    for i, layer in enumerate(layers):
        out = layer.forward(h)
        records.append(
            {
                "index": i,
                "type": type(layer).__name__,
                "name": repr(layer),
                "config": layer.config(),
                "input": _host(h),
                "output": _host(out),
            }
        )
        h = out
    value = loss.forward(h, target)
    grad = loss.backward()
    loss_grad = _host(grad)
    for layer, rec in zip(reversed(layers), reversed(records)):
        dx = layer.backward(grad)
        rec["grad_output"], rec["grad_input"] = _host(grad), _host(dx)
        # f' as the library applies it: backward of ones (activations keep no state but their
        # output)
        ones = get_array_module(grad).ones_like(grad)
        rec["derivative"] = _host(layer.backward(ones)) if isinstance(layer, ELEMENTWISE) else None
        grad = dx
    return records, value, loss_grad, h


def _params(layers, records, states, grads, optimizer):
    """Each layer's parameters before, their gradient and the notes' correction, after the step,
    with the optimizer's arrays before and after; BatchNorm's running statistics after."""
    after_states = _optimizer_states(optimizer, [p for layer in layers for p in layer.parameters()])
    for layer, rec in zip(layers, records):
        rec["params"] = None
        for p in layer.parameters():
            before, state_before = states[id(p)]
            grad, after = grads[id(p)], after_states[id(p)][0]
            rec["params"] = rec["params"] or {}
            rec["params"][p.name] = {
                "before": before,
                "grad": grad,
                "correction": grad * grad.dtype.type(-optimizer.lr),
                "after": after,
                "change": after - before,
                "state_before": state_before,
                "state": after_states[id(p)][1],
            }
        if getattr(layer, "buffer_names", None):
            rec["buffers"] = {name: _host(getattr(layer, name)) for name in layer.buffer_names}


def _outputs(loss, out, out_host, target, dtype):
    """(y^L, y^D, c): the network's outputs as the notes see them, the desired ones, the delta
    scale."""
    n, k = out_host.shape
    if isinstance(loss, SoftmaxCrossEntropy):
        y_l = _host(
            Softmax().forward(out)
        )  # the library's softmax layer, on the output it produced
        scale = float(n)
    else:
        y_l = out_host
        scale = n * k / 2.0 if isinstance(loss, MSELoss) else float(n * k)
    if target.ndim == 1 and target.dtype.kind in "iu":
        y_d = np.zeros((n, k), dtype=dtype)
        y_d[np.arange(n), target] = 1
    else:
        y_d = target.reshape(n, k)
    return y_l, y_d, scale


def _stages(records, scale):
    """Group the core layers into the notes' layers: each Linear with what follows it."""
    groups = []
    for rec in records:
        if rec["type"] == "Linear":
            groups.append([])
        groups[-1].append(rec)
    stages = []
    for s, group in enumerate(groups, 1):
        lin = group[0]  # explain_step makes sure that the first layer is a Linear
        gradient = lin["grad_output"]
        stages.append(
            {
                "s": s,
                "layers": [r["index"] for r in group],
                "linear": lin["index"],
                "activations": [r["type"] for r in group[1:]],
                "y_prev": lin["input"],
                "z": lin["output"],
                "y": group[-1]["output"],
                "gradient": gradient,
                "delta": gradient * gradient.dtype.type(-scale),
            }
        )
    return stages


def to_json(record: dict) -> dict:
    """The record as strict JSON values (:func:`gpunet.files.strict`: arrays as nested lists, NaN
    and infinities as None): what ``json.dumps`` writes (schema in the module docstring)."""
    return strict(record)
