"""Command-line flags from a dataclass's fields: each field of
:class:`gpunet.commands.train.TrainConfig` is declared once, with its default, and its flag's type,
help and choices in the field's metadata (:func:`setting`); :func:`add_flags` turns them into
argparse flags, and :func:`given` tells which flags the command line named (so that a preset's
values fill in the rest without parsing twice).

The argument types name the expected and the actual value, as the command line's errors do.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, field, fields

import numpy as np


# --- argument types: each names the expected and the actual value ---------------------------------
def _number(kind, test, expected):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0 and np.isfinite(v), "a positive number")
non_negative_float = _number(float, lambda v: v >= 0 and np.isfinite(v), "a number >= 0")
# gpunet serve --max-buffered: room for one whole request at least (an 8 MiB body and its headers)
buffer_mib = _number(int, lambda v: v >= 16, "a whole number of MiB >= 16")
unit_interval = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
finite_float = _number(float, np.isfinite, "a finite number")


def val_size_arg(text):
    """--val-size: a row count (an integer >= 0) or a share of the rows (a number in [0, 1))."""
    try:
        return non_negative_int(text)
    except argparse.ArgumentTypeError:
        pass
    return _number(float, lambda v: 0 <= v < 1, "a row count >= 0 or a fraction in [0, 1)")(text)


def batch_size_arg(text):
    """--batch-size: a positive count, or "full" / "all" (None: the whole set in one batch)."""
    if text in ("full", "all"):
        return None
    return positive_int(text)


# --- fields that are flags ------------------------------------------------------------------------
def setting(default=MISSING, help: str = "", *, factory=MISSING, **flag):
    """A dataclass field that is also a flag: ``help`` may show ``{default}`` (the field's default,
    as :func:`shown` writes it); ``flag`` holds argparse's ``type``, ``choices``, ``nargs``,
    ``metavar``, or ``name`` (another flag name than ``--field-name``) and ``const`` (a flag without
    a value)."""
    return field(default=default, default_factory=factory, metadata={"help": help, **flag})


def shown(value) -> str:
    """A default as ``--help`` writes it: lists as their items, floats as %g."""
    if isinstance(value, (list, tuple)):
        return " ".join(shown(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_of(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


class _Given(argparse.Action):
    """Stores a flag's value (``const`` for a flag without one) and notes its name in ``given``."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        namespace.given = getattr(namespace, "given", frozenset()) | {self.dest}


def add_flags(parser, config_class) -> None:
    """One flag per field of the dataclass ``config_class`` that has flag metadata (see
    :func:`setting`); its default is the field's, so a parse without flags holds the dataclass's
    defaults."""
    parser.set_defaults(given=frozenset())
    for f in fields(config_class):
        if "help" not in f.metadata:
            continue
        meta, default = dict(f.metadata), default_of(f)
        name = meta.pop("name", "--" + f.name.replace("_", "-"))
        text = meta.pop("help").format(default=shown(default))
        if "const" in meta or isinstance(default, bool) and "type" not in meta:
            meta.setdefault("const", not default)
            meta["nargs"] = 0
        parser.add_argument(name, dest=f.name, default=default, help=text, action=_Given, **meta)


def given(args) -> dict:
    """The settings the command line named: ``{field name: value}``."""
    return {name: getattr(args, name) for name in sorted(args.given)}
