"""A committee of networks as one network: its logits are the mean of the members' logits.

Members of the same shape of chain (Linear, activation, [Dropout], ..., Linear; the same activation
at each place, the same inputs and outputs; hidden widths may differ) become one wider chain with
the same layers:

    first Linear   W = [W_1 | W_2 | ... | W_M]         every member reads the same input
    middle Linear  W = diag(W_1, W_2, ..., W_M)        each member's units see only its own
    last Linear    W = [W_1; W_2; ...; W_M] / M,  b = mean(b_m)

so ``committee(nets).forward(x)`` is ``mean(net.forward(x) for net in nets)`` up to float rounding
(the sum runs over the members' units in one dot product), and the result saves, loads, serves and
exports to ONNX as any network does. A middle layer holds M times the members' weights (zeros off
the diagonal): its products cost M times one member's, where M separate passes would cost the same
work without the zeros.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .backend import to_device, to_numpy
from .layers import ACTIVATIONS, Dropout, Linear
from .network import Sequential


def _shape(net: Sequential) -> list:
    """The chain's layer kinds (Linear as "linear", activations by class, Dropout dropped)."""
    kinds = []
    for layer in net.layers:
        if isinstance(layer, Linear):
            kinds.append("linear")
        elif type(layer) in ACTIVATIONS.values():
            kinds.append(type(layer).__name__)
        elif not isinstance(layer, Dropout):  # the identity at inference
            raise ValueError(
                "nets: a committee joins chains of Linear, ReLU/Sigmoid/Tanh and Dropout layers, "
                f"got a {type(layer).__name__}"
            )
    if not kinds or kinds[0] != "linear" or kinds[-1] != "linear":
        raise ValueError(f"nets: expected a chain from a Linear to a Linear, got {kinds}")
    return kinds


def _joined(ws: list, bs: list, place: str) -> tuple:
    """One Linear's (W, b) from the members' (host arrays), for its place in the chain."""
    if place == "only":  # a single Linear: the mean of the members' weights is the mean of outputs
        return np.mean(ws, axis=0, dtype=ws[0].dtype), np.mean(bs, axis=0, dtype=ws[0].dtype)
    if place == "first":
        return np.concatenate(ws, axis=1), np.concatenate(bs)
    if place == "last":
        m = ws[0].dtype.type(len(ws))
        return np.concatenate(ws, axis=0) / m, np.mean(bs, axis=0, dtype=ws[0].dtype)
    W = np.zeros((sum(w.shape[0] for w in ws), sum(w.shape[1] for w in ws)), ws[0].dtype)
    r = c = 0
    for w in ws:
        W[r : r + w.shape[0], c : c + w.shape[1]] = w
        r, c = r + w.shape[0], c + w.shape[1]
    return W, np.concatenate(bs)


def committee(nets: Sequence[Sequential]) -> Sequential:
    """One network whose outputs are the mean of ``nets``' outputs (logits); see the module's text.

    ``nets``: two or more networks of one chain shape, dtype, input and output size. The result
    lies on the first member's device, in eval mode, and keeps its table metadata (feature names,
    classes) and ``classifies``."""
    nets = list(nets)
    if len(nets) < 2:
        raise ValueError(f"nets: expected at least 2 networks, got {len(nets)}")
    kinds = [_shape(n) for n in nets]
    for i, (net, k) in enumerate(zip(nets, kinds)):
        same = (k, net.in_features, net.out_features, net.dtype, net.classifies)
        first = nets[0]
        want = (kinds[0], first.in_features, first.out_features, first.dtype, first.classifies)
        if same != want:
            raise ValueError(
                f"nets[{i}]: expected the chain {want[0]} from {want[1]} to {want[2]} "
                f"inputs/outputs in {want[3]} (classifies={want[4]}), got {k} from "
                f"{same[1]} to {same[2]} in {same[3]} (classifies={same[4]})"
            )
    linears = [[layer for layer in n.layers if isinstance(layer, Linear)] for n in nets]
    layers, j, count = [], 0, len(linears[0])
    for kind in kinds[0]:
        if kind != "linear":
            layers.append(ACTIVATIONS[kind.lower()]())
            continue
        place = (
            "only" if count == 1 else "first" if j == 0 else "last" if j == count - 1 else "middle"
        )
        ws = [to_numpy(ls[j].W.data) for ls in linears]
        bs = [to_numpy(ls[j].b.data) for ls in linears]
        W, b = _joined(ws, bs, place)
        layer = Linear(W.shape[0], W.shape[1], dtype=W.dtype, device=nets[0].device)
        layer.W.data[...], layer.b.data[...] = (to_device(a, nets[0].device) for a in (W, b))
        layers.append(layer)
        j += 1
    out = Sequential(*layers, classifies=nets[0].classifies)
    for name in ("feature_names", "classes", "label_column"):
        setattr(out, name, getattr(nets[0], name))
    return out.train(False)
