"""Optimizers (course notes, "Parameters update"), one update rule each, applied parameter by parameter:

- SGD:      ``w = w - lr * grad``
- Momentum: ``v = gamma * v + lr * grad;  w = w - v``  (Nesterov: ``w = w - (gamma * v + lr * grad)``)

Optional L2 weight decay adds ``weight_decay * w`` to every gradient. ``lr`` may change between steps
(learning-rate schedules do). Velocities live in ``Momentum.velocities``, one per parameter, in order.
"""
from __future__ import annotations

import math

from .backend import device_of, get_array_module, to_device, to_numpy


def _check_number(name, value, low, high=math.inf, low_open=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        lo = "(" if low_open else "["
        raise ValueError(f"{name}: expected a number in {lo}{low}, {high}), got {value!r}")
    return float(value)


class Optimizer:
    def __init__(self, params, lr: float, weight_decay: float = 0.0):
        params = list(params)
        if not params:
            raise ValueError("params: expected at least one parameter, got an empty list")
        for i, p in enumerate(params):
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise TypeError(f"params[{i}]: expected a Parameter (with .data and .grad), got {type(p).__name__}")
            if any(p is q for q in params[:i]):
                raise ValueError(f"params[{i}]: the same parameter is listed twice")
        self.params = params
        self.lr = lr
        self.weight_decay = _check_number("weight_decay", weight_decay, 0.0)

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _check_number("lr", value, 0.0, low_open=True)

    def gradient(self, p):
        """The gradient the rule uses: ``grad + weight_decay * w``."""
        if not self.weight_decay:
            return p.grad
        return p.grad + p.data.dtype.type(self.weight_decay) * p.data

    def step(self):
        raise NotImplementedError

    # what a resumed run needs beyond lr and weight_decay: hyperparameter names, and per-parameter arrays
    # (names of lists, one array per parameter in order, e.g. Momentum's "velocities")
    hyperparameters: tuple = ()
    slots: tuple = ()

    def state_dict(self) -> dict:
        """JSON data (kind, lr, weight_decay, the hyperparameters) plus ``"arrays"``: ``{slot: [host copies,
        one per parameter]}`` (``{"velocities": [...]}`` for momentum)."""
        state = {"kind": self.kind, "lr": self.lr, "weight_decay": self.weight_decay}
        state.update({name: getattr(self, name) for name in self.hyperparameters})
        state["arrays"] = {slot: [to_numpy(v).copy() for v in getattr(self, slot)] for slot in self.slots}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s values in place (same optimizer type, shapes and dtypes)."""
        if state.get("kind") != self.kind:
            raise ValueError(f"state: expected the state of a {self.kind} optimizer, got {state.get('kind')!r}")
        arrays = state.get("arrays", {})
        for slot in self.slots:
            mine, given = getattr(self, slot), arrays.get(slot, [])
            want, got = [tuple(v.shape) for v in mine], [tuple(v.shape) for v in given]
            if got != want:
                raise ValueError(f"state: expected {slot} shaped {want}, got {got}")
            for v, value in zip(mine, given):
                if value.dtype != v.dtype:
                    raise TypeError(f"state: expected {slot} of dtype {v.dtype}, got {value.dtype}")
                v[...] = to_device(value, device_of(v))
        for name in self.hyperparameters:
            setattr(self, name, state[name])
        self.lr, self.weight_decay = state["lr"], state["weight_decay"]


class SGD(Optimizer):
    """Plain gradient descent ``w = w - lr * (grad + weight_decay * w)``."""

    kind = "sgd"

    def step(self):
        for p in self.params:
            p.data -= p.data.dtype.type(self.lr) * self.gradient(p)


class Momentum(Optimizer):
    """Gradient descent with momentum, ``v = momentum * v + lr * grad; w = w - v``.

    ``momentum`` (the notes' gamma) lies in [0, 1); ``nesterov=True`` looks ahead,
    ``w = w - (momentum * v + lr * grad)``. Velocities start at zero, beside each parameter.
    """

    kind = "momentum"
    hyperparameters = ("momentum", "nesterov")
    slots = ("velocities",)

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0):
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov: expected True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: expected momentum > 0 with nesterov=True, got momentum=0")
        self.nesterov = nesterov
        super().__init__(params, lr, weight_decay)
        self.velocities = [get_array_module(p.data).zeros_like(p.data) for p in self.params]

    def velocity(self, i: int):
        """The velocity of ``params[i]``, shaped like it."""
        return self.velocities[i]

    def step(self):
        for p, v in zip(self.params, self.velocities):
            t = p.data.dtype.type  # scalars in the parameters' dtype: nothing is promoted to float64
            lr_grad = t(self.lr) * self.gradient(p)
            v *= t(self.momentum)
            v += lr_grad
            p.data -= t(self.momentum) * v + lr_grad if self.nesterov else v
