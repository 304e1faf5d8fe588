"""Gradient checking by central differences in float64.

``gradcheck(model, loss, x, target)`` compares the gradients that ``model.backward`` writes with
``(L(w + eps) - L(w - eps)) / (2 eps)`` for every parameter entry (or a random sample of entries for
large parameters) and for the input. It works on a float64 copy of the model, so the model itself is
untouched. Students use it to debug their own layers: any object with ``forward``, ``backward`` and
``parameters`` works.

Why float64 and eps = 1e-6: the central difference has truncation error O(eps^2) ~ 1e-12 and
rounding error ~ 1e-16 / eps ~ 1e-10, so a correct gradient shows a relative error near 1e-8 or
below, while a wrong one is off by far more than the default tolerance of 1e-6.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Array, ArrayLike, get_array_module, to_numpy


def relative_error(a: ArrayLike, b: ArrayLike) -> float:
    """``||a - b|| / (||a|| + ||b||)``, 0 when both are 0; scale-free, so one tolerance fits all."""
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    denom = np.linalg.norm(a) + np.linalg.norm(b)
    return 0.0 if denom == 0 else float(np.linalg.norm(a - b) / denom)


def numerical_gradient(
    f: Callable[[], Any], array: Array, eps: float = 1e-6, indices: Iterable[int] | None = None
) -> np.ndarray:
    """Central differences of the scalar function ``f()`` with respect to ``array`` (changed in
    place and restored). ``indices`` (flat positions) limits the entries; returns a host float64
    array shaped like ``array`` (NaN where not computed)."""
    flat = array.reshape(-1)  # a view: writing through it perturbs the array f reads
    grad = np.full(flat.shape, np.nan)
    for i in range(flat.size) if indices is None else indices:
        old = flat[i].item()
        flat[i] = old + eps
        up = float(f())
        flat[i] = old - eps
        down = float(f())
        flat[i] = old
        grad[i] = (up - down) / (2 * eps)
    return grad.reshape(array.shape)


@dataclass
class GradCheckResult:
    """Relative error per checked array (``"input"`` and each parameter name) against ``tol``."""

    errors: dict = field(default_factory=dict)
    tol: float = 1e-6

    @property
    def ok(self) -> bool:
        return all(e <= self.tol for e in self.errors.values())

    def __str__(self) -> str:
        lines = [f"{'array':<12} {'relative error':>15}  status"]
        for name, err in self.errors.items():
            lines.append(f"{name:<12} {err:>15.3e}  {'ok' if err <= self.tol else 'FAIL'}")
        return "\n".join(lines)


def gradcheck(
    model: Any,
    loss: Any,
    x: Array,
    target: Array,
    eps: float = 1e-6,
    tol: float = 1e-6,
    max_entries: int = 200,
    seed: int = 0,
    check_input: bool = True,
    training: bool = False,
) -> GradCheckResult:
    """Check ``model``'s backward pass against central differences of ``loss(model(x), target)``.

    Runs on a float64 deep copy of ``model`` (buffers such as BatchNorm's running statistics
    included), on the model's device, in eval mode (dropout off), or with ``training=True`` in
    training mode (batch statistics: for networks without dropout, whose masks would change between
    evaluations). At most ``max_entries`` entries of each array are checked, chosen at random from
    ``seed``.
    """
    model = copy.deepcopy(model)
    model.train(training) if hasattr(model, "train") else None
    params = model.parameters()
    for p in params:
        p.data = p.data.astype(np.float64)
        p.grad = get_array_module(p.data).zeros_like(p.data)
    for layer in getattr(model, "layers", [model]):
        for name in getattr(layer, "buffer_names", ()):
            setattr(layer, name, getattr(layer, name).astype(np.float64))
    x = x.astype(np.float64)
    if target.dtype.kind == "f":
        target = target.astype(np.float64)

    def value() -> Any:
        return loss.forward(model.forward(x), target)

    value()
    dx = model.backward(loss.backward())
    analytic = [("input", x, dx)] if check_input and dx is not None else []
    names = getattr(model, "named_parameters", None)
    named = names() if names else [(p.name or f"param{i}", p) for i, p in enumerate(params)]
    analytic += [(name, p.data, p.grad.copy()) for name, p in named]

    rng = np.random.default_rng(seed)
    result = GradCheckResult(tol=tol)
    for name, array, grad in analytic:
        idx = None
        if array.size > max_entries:
            idx = rng.choice(array.size, size=max_entries, replace=False)
        num = numerical_gradient(value, array, eps, idx)
        ana = to_numpy(grad)
        if idx is not None:
            num, ana = num.reshape(-1)[idx], ana.reshape(-1)[idx]
        result.errors[name] = relative_error(ana, num)
    return result
