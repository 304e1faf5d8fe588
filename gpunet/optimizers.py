"""Optimizers (course notes, "Parameters update"):

- SGD:      ``w = w - lr * grad``
- Momentum: ``v = gamma * v + lr * grad;  w = w - v``  (Nesterov: ``w = w - (gamma * v + lr * grad)``)

Optional L2 weight decay adds ``weight_decay * w`` to every gradient. ``lr`` may be changed between
steps (learning-rate schedules do).

On construction the optimizer gathers its parameters into one flat buffer (and their gradients into
another), leaving each ``param.data``/``param.grad`` a view into it. One update then covers every
parameter: a few in-place NumPy passes on the CPU, one fused kernel launch on the GPU. Build the optimizer
*after* moving the network to its device; replacing ``param.data`` afterwards is detected and refused.
"""
from __future__ import annotations

import math

from . import blas, kernels
from .backend import get_array_module


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
        self._flatten()

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value):
        self._lr = _check_number("lr", value, 0.0, low_open=True)

    def _flatten(self):
        first = self.params[0].data
        xp, dtype = get_array_module(first), first.dtype
        for p in self.params:
            if get_array_module(p.data) is not xp or p.data.dtype != dtype:
                raise ValueError(
                    f"params: expected every parameter on one device with one dtype ({xp.__name__}, {dtype}), "
                    f"got {p!r}"
                )
        total = sum(int(p.data.size) for p in self.params)
        self._w = xp.empty(total, dtype=dtype)
        self._g = xp.zeros(total, dtype=dtype)
        self._tmp = xp.empty(total, dtype=dtype)
        offset = 0
        for p in self.params:
            n, shape = int(p.data.size), p.data.shape
            self._w[offset:offset + n] = p.data.reshape(-1)
            p.data = self._w[offset:offset + n].reshape(shape)
            p.grad = self._g[offset:offset + n].reshape(shape)
            offset += n
        self._views = [p.data for p in self.params]

    def _check_views(self):
        for p, view in zip(self.params, self._views):
            if p.data is not view:
                raise RuntimeError(
                    f"parameter {p.name or '?'} was replaced after the optimizer was built; "
                    "write new values in place (p.data[...] = value) or build the optimizer again"
                )

    def zero_grad(self):
        self._g.fill(0)

    def _scalars(self):
        t = self._w.dtype.type  # cast scalars to the parameters' dtype: nothing is promoted to float64
        return t(self.lr), t(self.weight_decay)

    def step(self):
        raise NotImplementedError


class SGD(Optimizer):
    """Plain gradient descent ``w = w - lr * (grad + weight_decay * w)``."""

    def step(self):
        self._check_views()
        lr, wd = self._scalars()
        kernels.sgd_update(self._w, self._g, lr, wd, self._tmp)


class Momentum(Optimizer):
    """Gradient descent with momentum, ``v = momentum * v + lr * grad; w = w - v``.

    ``momentum`` (the notes' gamma) lies in [0, 1); ``nesterov=True`` looks ahead,
    ``w = w - (momentum * v + lr * grad)``. Velocities start at zero, on the parameters' device.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0):
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov: expected True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: expected momentum > 0 with nesterov=True, got momentum=0")
        self.nesterov = nesterov
        super().__init__(params, lr, weight_decay)
        self._v = get_array_module(self._w).zeros_like(self._w)

    def velocity(self, i: int):
        """The velocity of ``params[i]``, shaped like it (a view into the flat buffer)."""
        start = sum(int(p.data.size) for p in self.params[:i])
        p = self.params[i]
        return self._v[start:start + p.data.size].reshape(p.data.shape)

    def step(self):
        self._check_views()
        lr, wd = self._scalars()
        gamma = self._w.dtype.type(self.momentum)
        kernels.momentum_update(self._w, self._g, self._v, lr, gamma, wd, self.nesterov, self._tmp)

    def fused_update(self, net):
        """A callback for ``net.backward(dy, update=...)`` that replaces ``backward`` + ``step``, or None.

        Each Linear layer is updated as soon as its delta is known, by a ``blas.LinearMomentum`` step:
        ``v = gamma*v + lr*(x.T @ dy)`` is one BLAS GEMM into the weight velocity and
        ``v_b = gamma*v_b + lr*dy.sum(0)`` one GEMV into the bias velocity, so the gradients are never
        written out; then one ``axpy`` applies ``w -= v`` to W and b together (they lie side by side in
        the flat buffer). Same rule, same result up to float32 rounding; ``param.grad`` is not filled on
        this path. Available on the CPU with NumPy's OpenBLAS, without Nesterov, when this optimizer holds
        exactly the network's parameters, all of them in Linear layers.
        """
        params = net.parameters()
        if (self.nesterov or len(params) != len(self.params) or any(p is not q for p, q in zip(params, self.params))
                or not blas.gemm_available(self._w)
                # by name: optimizers import only the backend and the kernels (blas), never the layers module
                or any(layer.parameters() and type(layer).__name__ != "Linear" for layer in net.layers)):
            return None
        # per Linear, in layer order: the layer and its prepared step over its slice (W then b) of the buffers
        steps, start = [], 0
        for layer in net.layers:
            if layer.parameters():
                stop = start + layer.W.data.size + layer.b.data.size
                steps.append((layer, blas.LinearMomentum(self._w[start:stop], self._v[start:stop],
                                                         layer.in_features, layer.out_features)))
                start = stop

        def update(layer, x, dy):
            if layer is steps[-1][0]:  # the first layer updated in each step
                self._check_views()
            step = next(s for lay, s in steps if lay is layer)
            step(x, dy, self.lr, self.momentum, self.weight_decay)

        return update


OPTIMIZERS = {"sgd": SGD, "momentum": Momentum}
