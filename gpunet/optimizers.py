"""Optimizers (course notes, "Parameters update"), one update rule each, applied parameter by
parameter:

- SGD:      ``w = w - lr * grad``
- Momentum: ``v = gamma * v + lr * grad;  w = w - v``  (Nesterov: ``w = w - (gamma * v + lr *
  grad)``)
- Adam:     ``m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  w -= lr/(1-b1^t) * m /
  (sqrt(v)/sqrt(1-b2^t) + eps)``
- AdamW:    ``w *= 1 - lr * weight_decay``, then Adam's step on the bare gradient (decoupled decay)
- RMSprop:  ``v = alpha v + (1-alpha) g^2;  w -= lr g / (sqrt(v) + eps)`` (centered: ``sqrt(v -
  gbar^2)``, ``gbar = alpha gbar + (1-alpha) g``; momentum: ``b = mu b + g / (...); w -= lr b``)

Adam, AdamW and RMSprop follow PyTorch's definitions (``torch.optim``) to the order of the
operations, so that a recipe carries over. Optional L2 weight decay adds ``weight_decay * w`` to
every gradient (AdamW's is decoupled instead). ``lr`` may change between steps (learning-rate
schedules do). Per-parameter state (velocities, moments) lives beside each parameter, in order;
``state_dict()`` returns JSON-able scalars plus ``"arrays"``: name -> one host NumPy array per
parameter, and ``load_state_dict`` takes the same. Scalars enter the formulas in the parameters'
dtype (float32 stays float32); Adam's bias corrections are computed in float64 on the host and cast
once per step.

Each rule is written once, as DeZero writes it: ``update_one(xp, w, g, state, k)`` is the rule for
one parameter (w its weights, g the gradient the rule sees, ``state`` its arrays, ``k`` the step's
numbers by name), weight decay a hook before it (:meth:`Optimizer.decay`), and ``step`` the loop
over the parameters. The same definition runs on NumPy or CuPy arrays (the core), and the fast path
generates its compiled CPU and CUDA kernels from it (:mod:`gpunet.fast.rules`): it may use
``+ - * /``, ``xp.sqrt``, the names of ``k`` and branches on the optimizer's own settings, never a
bare number or a branch on the arrays' values. An optimizer in :data:`OPTIMIZERS` with such a rule
is on the fused path.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

from .backend import Array, device_of, get_array_module, to_device, to_numpy

Params = Iterable[Any]
"""Parameters to train: :class:`gpunet.Parameter` objects (anything with ``.data``, ``.grad``)."""


def _check_number(
    name: str, value: float, low: float, high: float = math.inf, low_open: bool = False
) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value < high
    if not ok:
        lo = "(" if low_open else "["
        raise ValueError(f"{name}: expected a number in {lo}{low}, {high}), got {value!r}")
    return float(value)


class Optimizer:
    """The rules' common part: the parameters, ``lr``, L2 ``weight_decay`` and the state dict."""

    # what a subclass names for state_dict: its scalars (options, step count) and its per-parameter
    # arrays
    scalars: tuple = ()
    slots: tuple = ()

    def __init__(self, params: Params, lr: float, weight_decay: float = 0.0) -> None:
        params = list(params)
        if not params:
            raise ValueError("params: expected at least one parameter, got an empty list")
        for i, p in enumerate(params):
            if not (hasattr(p, "data") and hasattr(p, "grad")):
                raise TypeError(
                    f"params[{i}]: expected a Parameter (with .data and .grad), got "
                    f"{type(p).__name__}"
                )
            if any(p is q for q in params[:i]):
                raise ValueError(f"params[{i}]: the same parameter is listed twice")
        self.params = params
        self.lr = lr
        self.weight_decay = _check_number("weight_decay", weight_decay, 0.0)

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _check_number("lr", value, 0.0, low_open=True)

    # the settings that change the rule's code (a kernel is generated for each combination), and
    # settings covering every combination, for the kernels' compile tests; a subclass extends both
    def flags(self) -> tuple:
        """``((name, on), ...)``: the choices of the rule's code, here: is weight decay on."""
        return (("wd", bool(self.weight_decay)),)

    examples: tuple = ({}, {"weight_decay": 1e-4})

    def constants(self) -> dict:
        """The step's numbers by name, as Python floats (cast once to the parameters' dtype)."""
        return {"lr": self.lr, **({"wd": self.weight_decay} if self.weight_decay else {})}

    def decay(self, xp: Any, w: Array, g: Array, k: dict) -> tuple:
        """The weight-decay hook, run before the rule where ``weight_decay`` is on: L2 adds
        ``weight_decay * w`` to the gradient the rule sees (``param.grad`` stays the loss's)."""
        return w, g + k["wd"] * w

    def update_one(self, xp: Any, w: Array, g: Array, state: list, k: dict) -> tuple:
        """The rule on one parameter: ``(w, *state)`` updated (in place where arrays allow)."""
        raise NotImplementedError

    def rule(self, xp: Any, w: Array, g: Array, state: list, k: dict) -> tuple:
        """The hook, then the rule: what the core runs and the fast path's kernels are made of."""
        if self.weight_decay:
            w, g = self.decay(xp, w, g, k)
        return self.update_one(xp, w, g, list(state), k)

    def begin_step(self) -> dict:
        """A step's bookkeeping (Adam counts its steps here), then :meth:`constants`. The fast path
        calls it once per step, as ``step`` does, and never writes the optimizer's state itself."""
        return self.constants()

    def buffers(self, i: int) -> list:
        """The state arrays of ``params[i]`` in the order of ``slots``: what a kernel updates."""
        return [getattr(self, name)[i] for name in self.slots]

    def update(self, i: int, k: dict, kernel: Any = None) -> None:
        """``params[i]`` updated by the rule with this step's numbers ``k`` (:meth:`begin_step`), in
        its dtype; ``kernel(w, g, *state, *scalars)``, given by the fast path, runs the rule in
        its place (the optimizer hands its own arrays to it)."""
        p = self.params[i]
        xp, t = get_array_module(p.data), p.data.dtype.type
        k = {name: t(value) for name, value in k.items()}  # nothing is promoted to float64
        state = self.buffers(i)
        if kernel is not None:
            kernel(p.data, p.grad, *state, *k.values())
            return
        for a, new in zip([p.data, *state], self.rule(xp, p.data, p.grad, state, k)):
            if new is not a:
                a[...] = new

    def step(self) -> None:
        """One update of every parameter from its ``grad``."""
        k = self.begin_step()
        for i in range(len(self.params)):
            self.update(i, k)

    def _zeros(self) -> list:
        """One zero array beside each parameter (same shape, dtype and device)."""
        return [get_array_module(p.data).zeros_like(p.data) for p in self.params]

    def state_dict(self, host: bool = True) -> dict:
        """What a resumed run needs: ``kind``, ``lr``, ``weight_decay``, the rule's other scalars,
        and ``arrays``: slot name -> host copies of its arrays, one per parameter (``{"velocities":
        [...]}``); with ``host=False`` copies on the arrays' own device (a GPU snapshot costs no
        transfer)."""
        copy = (lambda a: to_numpy(a).copy()) if host else (lambda a: a.copy())
        state = {"kind": self.kind, "lr": self.lr, "weight_decay": self.weight_decay}
        state.update({name: getattr(self, name) for name in self.scalars})
        state["arrays"] = {name: [copy(a) for a in getattr(self, name)] for name in self.slots}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s values in place (same optimizer type, options, shapes and
        dtypes)."""
        if state.get("kind") != self.kind:
            raise ValueError(
                f"state: expected the state of a {self.kind} optimizer, got {state.get('kind')!r}"
            )
        arrays = state.get("arrays", {})
        if sorted(arrays) != sorted(self.slots):
            raise ValueError(f"state: expected arrays {sorted(self.slots)}, got {sorted(arrays)}")
        for name in self.slots:
            mine, given = getattr(self, name), arrays[name]
            got, want = [tuple(a.shape) for a in given], [tuple(a.shape) for a in mine]
            if got != want:
                raise ValueError(f"state: expected {name} shaped {want}, got {got}")
            for a, value in zip(mine, given):
                if value.dtype != a.dtype:
                    raise TypeError(f"state: expected {name} of dtype {a.dtype}, got {value.dtype}")
        for name in self.scalars:
            value = state[name]
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self.lr, self.weight_decay = state["lr"], state["weight_decay"]
        for name in self.slots:
            for a, value in zip(getattr(self, name), arrays[name]):
                a[...] = to_device(value, device_of(a))


class SGD(Optimizer):
    """Plain gradient descent ``w = w - lr * (grad + weight_decay * w)``."""

    kind = "sgd"

    def update_one(self, xp: Any, w: Array, g: Array, state: list, k: dict) -> tuple:
        w -= k["lr"] * g
        return (w,)


class Momentum(Optimizer):
    """Gradient descent with momentum, ``v = momentum * v + lr * grad; w = w - v``.

    ``momentum`` (the notes' gamma) lies in [0, 1); ``nesterov=True`` looks ahead,
    ``w = w - (momentum * v + lr * grad)``. Velocities start at zero, beside each parameter.
    """

    kind = "momentum"
    scalars = ("momentum", "nesterov")
    slots = ("velocities",)

    def __init__(
        self,
        params: Params,
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov: expected True or False, got {nesterov!r}")
        if nesterov and self.momentum == 0.0:
            raise ValueError("nesterov: expected momentum > 0 with nesterov=True, got momentum=0")
        self.nesterov = nesterov
        super().__init__(params, lr, weight_decay)
        self.velocities = self._zeros()

    examples = (
        {},
        {"weight_decay": 1e-4},
        {"nesterov": True},
        {"nesterov": True, "weight_decay": 1e-4},
    )

    def velocity(self, i: int) -> Array:
        """The velocity of ``params[i]``, shaped like it."""
        return self.velocities[i]

    def flags(self) -> tuple:
        return super().flags() + (("nesterov", self.nesterov),)

    def constants(self) -> dict:
        return {**super().constants(), "gamma": self.momentum}

    def update_one(self, xp: Any, w: Array, g: Array, state: list, k: dict) -> tuple:
        (v,), gamma = state, k["gamma"]
        lr_grad = k["lr"] * g
        v *= gamma
        v += lr_grad
        w -= gamma * v + lr_grad if self.nesterov else v
        return w, v


def _check_betas(betas: tuple[float, float]) -> tuple:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas: expected a pair (beta1, beta2), got {betas!r}")
    return tuple(_check_number(f"betas[{i}]", b, 0.0, 1.0) for i, b in enumerate(betas))


class Adam(Optimizer):
    """Adam (Kingma and Ba, 2015), as ``torch.optim.Adam``: with ``g = grad + weight_decay * w`` and
    t the step count (1 at the first step),

        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        w = w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``betas = (b1, b2)`` each in [0, 1). Moments ``m``, ``v`` start at zero, beside each parameter;
    the bias corrections are computed in float64 on the host and cast once per step.
    """

    kind = "adam"
    scalars = ("betas", "eps", "t")
    slots = ("m", "v")
    decoupled = False  # AdamW: the weight decay shrinks w instead of entering g

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.betas = _check_betas(betas)
        self.eps = _check_number("eps", eps, 0.0)
        super().__init__(params, lr, weight_decay)
        self.t = 0
        self.m, self.v = self._zeros(), self._zeros()

    def corrections(self) -> tuple:
        """``(lr / (1 - b1^t), sqrt(1 - b2^t))`` for the current step count, as Python floats
        (float64)."""
        b1, b2 = self.betas
        return self.lr / (1.0 - b1**self.t), math.sqrt(1.0 - b2**self.t)

    def begin_step(self) -> dict:
        self.t += 1
        return self.constants()

    def constants(self) -> dict:
        b1, b2 = self.betas
        # before the first step there is no correction yet (a kernel's trace needs only the names)
        step, root_c2 = self.corrections() if self.t else (math.nan, math.nan)
        k = {
            "b1": b1,
            "b2": b2,
            "c1": 1.0 - b1,
            "c2": 1.0 - b2,
            "step": step,
            "root_c2": root_c2,
            "eps": self.eps,
        }
        if self.weight_decay:
            k.update(
                {"decay": 1.0 - self.lr * self.weight_decay}
                if self.decoupled
                else {"wd": self.weight_decay}
            )
        return k

    def update_one(self, xp: Any, w: Array, g: Array, state: list, k: dict) -> tuple:
        m, v = state
        m *= k["b1"]
        m += k["c1"] * g
        v *= k["b2"]
        v += k["c2"] * g * g
        w -= k["step"] * (m / (xp.sqrt(v) / k["root_c2"] + k["eps"]))
        return w, m, v


class AdamW(Adam):
    """AdamW (Loshchilov and Hutter, 2019), as ``torch.optim.AdamW``: decoupled weight decay,
    ``w = w * (1 - lr * weight_decay)`` before Adam's step on the bare gradient."""

    kind = "adamw"
    decoupled = True
    examples = ({"weight_decay": 0.0}, {})

    def decay(self, xp: Any, w: Array, g: Array, k: dict) -> tuple:
        """Decoupled: the weights shrink, ``w = w * (1 - lr * weight_decay)``; g stays bare."""
        w *= k["decay"]
        return w, g

    def __init__(
        self,
        params: Params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


class RMSprop(Optimizer):
    """RMSprop (Hinton's lecture 6e), as ``torch.optim.RMSprop``: with ``g = grad + weight_decay *
    w``,

        v = alpha v + (1 - alpha) g^2;   s = sqrt(v) + eps;   w = w - lr g / s

    ``centered=True`` divides by the variance instead: ``gbar = alpha gbar + (1 - alpha) g``,
    ``s = sqrt(v - gbar^2) + eps``. ``momentum`` mu > 0 keeps a buffer: ``b = mu b + g / s; w = w -
    lr b`` (no Nesterov variant, as in PyTorch). State: ``v``, and ``grad_avg`` / ``buffer`` when
    used.
    """

    kind = "rmsprop"
    scalars = ("alpha", "eps", "momentum", "centered")

    def __init__(
        self,
        params: Params,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        momentum: float = 0.0,
        centered: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.alpha = _check_number("alpha", alpha, 0.0, 1.0)
        self.eps = _check_number("eps", eps, 0.0)
        self.momentum = _check_number("momentum", momentum, 0.0, 1.0)
        if not isinstance(centered, bool):
            raise TypeError(f"centered: expected True or False, got {centered!r}")
        self.centered = centered
        super().__init__(params, lr, weight_decay)
        self.slots = (
            ("v",) + (("grad_avg",) if centered else ()) + (("buffer",) if self.momentum else ())
        )
        for name in self.slots:
            setattr(self, name, self._zeros())

    examples = tuple(
        {"weight_decay": wd, "centered": c, "momentum": mu}
        for wd in (0.0, 1e-4)
        for c in (False, True)
        for mu in (0.0, 0.9)
    )

    def flags(self) -> tuple:
        return super().flags() + (("centered", self.centered), ("momentum", bool(self.momentum)))

    def constants(self) -> dict:
        k = {**super().constants(), "alpha": self.alpha, "c": 1.0 - self.alpha, "eps": self.eps}
        return {**k, "mu": self.momentum} if self.momentum else k

    def update_one(self, xp: Any, w: Array, g: Array, state: list, k: dict) -> tuple:
        v, alpha, out = state[0], k["alpha"], []
        v *= alpha
        v += k["c"] * g * g
        if self.centered:
            gbar = state[1]
            gbar *= alpha
            gbar += k["c"] * g
            s = xp.sqrt(v - gbar * gbar) + k["eps"]
            out.append(gbar)
        else:
            s = xp.sqrt(v) + k["eps"]
        if self.momentum:
            b = state[-1]
            b *= k["mu"]
            b += g / s
            w -= k["lr"] * b
            out.append(b)
        else:
            w -= k["lr"] * (g / s)
        return (w, v, *out)


# --- by name: the one factory of ``gpunet train``, ``gpunet explain`` and ``gpunet.sklearn`` ------
OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "adam": Adam,
    "adamw": AdamW,
    "rmsprop": RMSprop,
}
# each rule's settings, by their flat names (``beta1``/``beta2`` are Adam's ``betas``)
SETTINGS = {
    "sgd": ("lr", "weight_decay"),
    "momentum": ("lr", "momentum", "nesterov", "weight_decay"),
    "adam": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "adamw": ("lr", "beta1", "beta2", "eps", "weight_decay"),
    "rmsprop": ("lr", "alpha", "eps", "momentum", "centered", "weight_decay"),
}


def make_optimizer(name: str, params: Params, **settings: Any) -> Optimizer:
    """The optimizer ``name`` (a key of :data:`OPTIMIZERS`) on ``params``, with ``settings`` by
    their flat names (:data:`SETTINGS`); a setting that is None (or a flag that is False) takes the
    rule's own default, and one that is not the rule's own is refused, named."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    given = {k: v for k, v in settings.items() if v is not None and v is not False}
    foreign = [k for k in given if k not in SETTINGS[name]]
    if foreign:
        raise ValueError(
            f"{foreign[0]}: expected a setting of {name} ({', '.join(SETTINGS[name])}), "
            f"got {foreign[0]}={given[foreign[0]]!r}"
        )
    if "beta1" in given or "beta2" in given:
        default = inspect.signature(OPTIMIZERS[name]).parameters["betas"].default
        given["betas"] = (given.pop("beta1", default[0]), given.pop("beta2", default[1]))
    return OPTIMIZERS[name](params, **given)
