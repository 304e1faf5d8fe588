"""The fast path's update kernels, generated from each optimizer's one rule (``Optimizer.rule``).

The rule is run once on symbols instead of arrays: each ``+ - * /`` and ``xp.sqrt`` on a symbol
gives the expression it stands for, so the result is the rule's formula for one element, from which
come the compiled CPU kernel (numba, a loop over the elements) and the CUDA kernel (a CuPy
ElementwiseKernel): the same operations in the same order as the core's, so a new optimizer in
``optimizers.OPTIMIZERS`` has its kernels with no line here. A rule's branches follow the
optimizer's settings (``flags()``): each combination is its own kernel, named after them
(``gpunet_momentum_wd_nesterov``).

``kernel_spec(opt)`` is the CUDA source's (in_params, out_params, operation, name),
``numba_source(opt)`` the CPU kernel's Python text; :mod:`gpunet.fast.ops` compiles and launches
them.
"""

from __future__ import annotations

import numpy as np

from ..layers import Parameter
from ..optimizers import OPTIMIZERS


class Symbol:
    """One element's value in a rule: ``code`` is its expression (C and Python alike)."""

    __slots__ = ("code",)

    def __init__(self, code: str):
        self.code = code

    def _op(self, op, other, swap=False):
        if not isinstance(other, Symbol):
            raise TypeError(
                f"a rule's numbers must be named constants (k['...']), got {other!r}: "
                "a bare number would be float64 in a float32 kernel"
            )
        a, b = (other, self) if swap else (self, other)
        return Symbol(f"({a.code} {op} {b.code})")

    def __add__(self, o):
        return self._op("+", o)

    def __radd__(self, o):
        return self._op("+", o, True)

    def __sub__(self, o):
        return self._op("-", o)

    def __rsub__(self, o):
        return self._op("-", o, True)

    def __mul__(self, o):
        return self._op("*", o)

    def __rmul__(self, o):
        return self._op("*", o, True)

    def __truediv__(self, o):
        return self._op("/", o)

    def __rtruediv__(self, o):
        return self._op("/", o, True)

    def __neg__(self):
        return Symbol(f"(-{self.code})")

    def __bool__(self):
        raise TypeError("a rule may branch on the optimizer's settings, not on the arrays' values")


class _SymbolMath:
    """The ``xp`` a rule sees while it is traced."""

    @staticmethod
    def sqrt(x):
        return Symbol(f"sqrt({x.code})")


def variant(opt) -> str:
    """The kernel's name for this optimizer's settings: kind, then each flag that is on."""
    return "gpunet_" + "_".join([opt.kind] + [name for name, on in opt.flags() if on])


def formula(opt, names) -> list:
    """The rule's outputs (w, then each state array) as expressions of the inputs, which are named
    by
    ``names(role)`` for role "w", "g", each slot, each constant."""
    state = [Symbol(names(s)) for s in opt.slots]
    k = {c: Symbol(names(c)) for c in opt.constants()}
    outs = opt.rule(_SymbolMath, Symbol(names("w")), Symbol(names("g")), state, k)
    return [out.code for out in outs]


def kernel_spec(opt) -> tuple:
    """``(in_params, out_params, operation, name)`` of the CUDA ElementwiseKernel of ``opt``'s rule:
    inputs g and the constants (T each), outputs w and the state arrays, updated in place."""
    outs = ["w", *opt.slots]
    body = " ".join(f"T {o}_ = {e};" for o, e in zip(outs, formula(opt, lambda r: r)))
    body += " " + " ".join(f"{o} = {o}_;" for o in outs)
    ins = ", ".join(f"T {n}" for n in ("g", *opt.constants()))
    return ins, ", ".join(f"T {o}" for o in outs), body, variant(opt)


def dispatch(kind: str, conditions: dict, names) -> str:
    """C statements applying the rule of optimizer ``kind`` to one element, the variant of its flags
    chosen at run time: ``conditions`` maps each flag to a C condition on the kernel's parameters
    (``{"wd": "wd != (T)0"}``), ``names(role)`` names the element's values (as :func:`formula`);
    every
    combination of the flags must be among the kind's ``examples``."""
    variants = {tuple(o.flags()): o for o in examples().values() if o.kind == kind}
    flags = [name for name, _ in next(iter(variants))]

    def branch(chosen):
        if len(chosen) < len(flags):
            name = flags[len(chosen)]
            return (
                f"if ({conditions[name]}) {{ {branch(chosen + [(name, True)])} }}"
                f" else {{ {branch(chosen + [(name, False)])} }}"
            )
        opt = variants[tuple(chosen)]
        outs = [names("w"), *(names(s) for s in opt.slots)]
        temps = " ".join(f"T o{j} = {e};" for j, e in enumerate(formula(opt, names)))
        return "{ " + temps + " " + " ".join(f"{o} = o{j};" for j, o in enumerate(outs)) + " }"

    return branch([])


def numba_source(opt) -> str:
    """The Python text of the CPU kernel ``kernel(w, g, *state, *constants)`` over flat arrays."""
    outs, consts = ["w", *opt.slots], list(opt.constants())
    lines = [
        f"def kernel({', '.join(['w', 'g', *opt.slots, *consts])}):",
        "    for i in range(w.shape[0]):",
    ]
    exprs = formula(opt, lambda r: r if r in consts else f"{r}[i]")
    lines += [f"        {o}_ = {e}" for o, e in zip(outs, exprs)]
    lines += [f"        {o}[i] = {o}_" for o in outs]
    return "\n".join(lines) + "\n"


def examples(params=None) -> dict:
    """``{kernel name: optimizer}``: one optimizer of every kind in ``optimizers.OPTIMIZERS`` for
    each combination of its flags (its ``examples`` settings, lr 0.01), on ``params()`` (default: a
    one-element parameter): what the compile tests build every kernel from, and the tests' cases."""
    found: dict = {}
    for cls in OPTIMIZERS.values():
        for settings in cls.examples:
            ps = params() if params is not None else [Parameter(np.zeros(1, np.float32))]
            opt = cls(ps, **{"lr": 0.01, **settings})
            found.setdefault(variant(opt), opt)
    return found


def mirror(opt):
    """The core's rule with a kernel's arguments ``(g, *constants, w, *state)``, on NumPy arrays, in
    place: what a test holds the CUDA source to (the fake CuPy's mirror of :func:`kernel_spec`)."""
    names, slots = list(opt.constants()), len(opt.slots)

    def run(g, *args):
        k = dict(zip(names, args[: len(names)]))
        arrays = list(args[len(names) :])
        for a, new in zip(arrays, opt.rule(np, arrays[0], g, arrays[1 : 1 + slots], k)):
            if new is not a:
                a[...] = new

    return run
