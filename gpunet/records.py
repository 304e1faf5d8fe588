"""The JSON records of model files and checkpoints, checked field by field before anything is built.

A file is input from outside (a model downloaded from a colleague, a checkpoint on a shared disk):
every field of its record is checked for type and range by the small schema below, the layers' chain
of in/out features is followed, and the arrays each layer needs are worked out from the record
alone, so that the loader compares them with the arrays' ``.npy`` headers before reading a byte of
weights.

A schema is a function ``spec(value, field)`` that returns the value or raises :class:`FieldError`
naming the field (``network.layers[2].out_features``). A new field of the model record is one line
in :data:`MODEL_FIELDS`.
"""

from __future__ import annotations

import math

from .layers import BUILT_IN, INITIALIZERS, LAYERS

MAX_FEATURES = 2**31 - 1  # one layer's width; the arrays must then hold what the widths declare
MAX_LAYERS = 10_000
MAX_LIST = 1_000_000  # entries of a list in a record (a Standardize layer's shift, a history)
MAX_PARAMETERS = (
    2**31
)  # numbers in all of a model's arrays (8 GiB of float32): far past any gpunet model


class FieldError(Exception):
    """One field of a record is wrong: ``field`` names it, ``message`` says what was expected and
    got."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


def key(name) -> str:
    """A record's key as a field name shows it: as it is when plain, else quoted (a key of a crafted
    file may hold a newline, a dot or nothing at all, and the message must stay one line)."""
    plain = (
        isinstance(name, str)
        and name.isprintable()
        and name
        and not any(c in name for c in ".[] '\"")
    )
    return name if plain else repr(name)


def shown(value) -> str:
    """A value as an error message shows it: its JSON type and at most 60 characters of it."""
    kind = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}" if value is not None else kind


# --- the schema: each function makes a spec -------------------------------------------------------
def integer(lo: int = 0, hi: int = MAX_FEATURES):
    def spec(v, field):
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise FieldError(field, f"expected an integer in [{lo}, {hi}], got {shown(v)}")
        return v

    return spec


def number(
    lo: float = -math.inf, hi: float = math.inf, *, above: bool = False, below: bool = False
):
    """A finite JSON number in [lo, hi]; ``above``/``below`` make that end open."""

    def spec(v, field):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if above else v >= lo) and (v < hi if below else v <= hi)
        if not ok:
            span = f"{'(' if above else '['}{lo:g}, {hi:g}{')' if below else ']'}"
            raise FieldError(field, f"expected a finite number in {span}, got {shown(v)}")
        return v

    return spec


def string(*choices):
    def spec(v, field):
        if not isinstance(v, str) or (choices and v not in choices) or len(v) > 1000:
            want = f"one of {list(choices)}" if choices else "a string"
            raise FieldError(field, f"expected {want}, got {shown(v)}")
        return v

    return spec


def boolean(v, field):
    if not isinstance(v, bool):
        raise FieldError(field, f"expected true or false, got {shown(v)}")
    return v


def anything(v, field):
    return v


def either(*inners):
    """What the first of ``inners`` that accepts the value returns (the last one's error
    otherwise)."""

    def spec(v, field):
        for inner in inners[:-1]:
            try:
                return inner(v, field)
            except FieldError:
                pass
        return inners[-1](v, field)

    return spec


def optional(inner):
    """null, or what ``inner`` accepts."""
    return lambda v, field: None if v is None else inner(v, field)


def listing(inner, least: int = 0, most: int = MAX_LIST):
    def spec(v, field):
        if not isinstance(v, list) or not least <= len(v) <= most:
            raise FieldError(field, f"expected a list of {least} to {most} entries, got {shown(v)}")
        return [inner(item, f"{field}[{i}]") for i, item in enumerate(v)]

    return spec


def mapping(inner):
    """An object of any string keys, each value what ``inner`` accepts."""

    def spec(v, field):
        if not isinstance(v, dict):
            raise FieldError(field, f"expected an object, got {shown(v)}")
        return {k: inner(item, f"{field}.{key(k)}") for k, item in v.items()}

    return spec


def fields(required: dict, optional_fields: dict | None = None):
    """An object with exactly the ``required`` keys, any of the ``optional_fields``, and nothing
    else."""
    optional_fields = optional_fields or {}

    def spec(v, field):
        where = f"{field}." if field else ""
        if not isinstance(v, dict):
            raise FieldError(field or "record", f"expected an object, got {shown(v)}")
        extra = [k for k in v if k not in required and k not in optional_fields]
        if extra:
            raise FieldError(
                f"{where}{key(extra[0])}",
                f"unexpected field (expected only {sorted(required) + sorted(optional_fields)})",
            )
        missing = [k for k in required if k not in v]
        if missing:
            raise FieldError(f"{where}{missing[0]}", "missing")
        return {
            k: (required.get(k) or optional_fields[k])(item, f"{where}{k}") for k, item in v.items()
        }

    return spec


# --- model files ----------------------------------------------------------------------------------
FLOAT_DTYPES = ("float16", "float32", "float64")
LAYER_FIELDS = {  # the built-in layers' configs: required fields, then optional ones
    "Linear": (
        {"in_features": integer(1), "out_features": integer(1)},
        {"init": string(*INITIALIZERS)},
    ),
    "ReLU": ({}, {}),
    "Sigmoid": ({}, {}),
    "Tanh": ({}, {}),
    "Softmax": ({}, {}),
    "Dropout": ({"p": number(0, 1, below=True)}, {}),
    "BatchNorm": (
        {"features": integer(1), "momentum": number(0, 1), "eps": number(0, above=True)},
        {},
    ),
    "Standardize": ({"shift": listing(number(), 1), "scale": listing(number(0), 1)}, {}),
}


def layer_config(v, field):
    """A layer's config: a built-in's fields by :data:`LAYER_FIELDS`; a registered layer's are its
    own."""
    if not isinstance(v, dict):
        raise FieldError(field, f'expected a layer\'s object {{"type": ...}}, got {shown(v)}')
    kind = v.get("type")
    if not isinstance(kind, str):
        raise FieldError(f"{field}.type", f"expected a layer type's name, got {shown(kind)}")
    if kind not in LAYERS:
        raise FieldError(
            f"{field}.type",
            f"unknown layer type {kind!r}; expected one of {sorted(LAYERS)} "
            f"(a layer of your own: import its module, decorated with "
            f"@gpunet.register_layer, before gpunet.load)",
        )
    if kind not in BUILT_IN:
        return v
    required, extra = LAYER_FIELDS[kind]
    return fields({"type": string(kind), **required}, extra)(v, field)


NETWORK = fields({"type": string("Sequential"), "layers": listing(layer_config, 1, MAX_LAYERS)})
MODEL_FIELDS = {  # what a model file's record may hold (format and version are checked first)
    "format": string("gpunet-sequential"),
    "version": integer(1, 1),
    "dtype": string(*FLOAT_DTYPES),
    "network": NETWORK,
}
MODEL_OPTIONAL = {  # fields older files lack: one line each
    "classifies": optional(boolean),
    "feature_names": optional(listing(string())),  # a table's model: its columns, one per input
    "classes": optional(listing(either(string(), integer(-(2**63), 2**63 - 1)))),  # one per output
    "label_column": optional(string()),
}


def check_chain(layers: list, field: str = "network.layers") -> None:
    """Each layer's width against the one before it (Linear's in_features, BatchNorm's features,
    Standardize's shift and scale); a network needs a Linear layer (its inputs and outputs)."""
    width, linear = None, False
    for i, cfg in enumerate(layers):
        kind, where = cfg["type"], f"{field}[{i}]"
        if kind == "Linear":
            if width is not None and cfg["in_features"] != width:
                raise FieldError(
                    f"{where}.in_features",
                    f"expected {width} (the previous layer's width), got {cfg['in_features']}",
                )
            width, linear = cfg["out_features"], True
        elif kind in ("BatchNorm", "Standardize"):
            n = cfg["features"] if kind == "BatchNorm" else len(cfg["shift"])
            if kind == "Standardize" and len(cfg["scale"]) != n:
                raise FieldError(
                    f"{where}.scale",
                    f"expected {n} numbers (as many as shift), got {len(cfg['scale'])}",
                )
            if width is not None and n != width:
                name = "features" if kind == "BatchNorm" else "shift"
                raise FieldError(
                    f"{where}.{name}",
                    f"expected {width} features (the previous layer's width), got {n}",
                )
            width = n
    if not linear:
        raise FieldError(
            field,
            f"expected at least one Linear layer (the model's inputs and outputs), got "
            f"only {sorted({c['type'] for c in layers})}",
        )


def built_in_arrays(i: int, cfg: dict) -> dict:
    """``{name: shape}`` of the arrays a built-in layer ``i`` holds in a file (parameters, then
    buffers)."""
    if cfg["type"] == "Linear":
        return {
            f"{i}.W": (cfg["in_features"], cfg["out_features"]),
            f"{i}.b": (cfg["out_features"],),
        }
    if cfg["type"] == "BatchNorm":
        return {
            f"{i}.{name}": (cfg["features"],)
            for name in ("gamma", "beta", "running_mean", "running_var")
        }
    return {}


def check_table(record: dict) -> None:
    """A table's fields against the widths: one feature name per input, one class name per
    output."""
    linear = [c for c in record["network"]["layers"] if c["type"] == "Linear"]
    for name, want in (
        ("feature_names", linear[0]["in_features"]),
        ("classes", linear[-1]["out_features"]),
    ):
        got = record.get(name)
        if got is not None and len(got) != want:
            what = "inputs" if name == "feature_names" else "outputs"
            raise FieldError(
                name, f"expected {want} names (one per the model's {what}), got {len(got)}"
            )


def check_size(layers: list, itemsize: int, most_bytes: int, field: str = "network.layers") -> None:
    """The arrays the built-in ``layers`` declare, added up layer by layer: refused at the first
    layer that takes them past MAX_PARAMETERS numbers or ``most_bytes`` bytes (what the file can
    hold), before any array is allocated or read."""
    total = 0
    for i, cfg in enumerate(layers):
        if cfg["type"] not in BUILT_IN:
            continue
        total += sum(math.prod(shape) for shape in built_in_arrays(i, cfg).values())
        if total > MAX_PARAMETERS or total * itemsize > most_bytes:
            bound = (
                f"more than any gpunet model ({MAX_PARAMETERS})"
                if total > MAX_PARAMETERS
                else f"{total * itemsize} bytes, more than the file can hold ({most_bytes})"
            )
            raise FieldError(f"{field}[{i}]", f"declares {total} weights up to this layer, {bound}")


def check_model(record, most_bytes: int = MAX_PARAMETERS * 8) -> dict:
    """The model record checked through (types, ranges, the chain of widths, the table's names, the
    size of the arrays against ``most_bytes``); returns it."""
    record = fields(MODEL_FIELDS, MODEL_OPTIONAL)(record, "")
    check_chain(record["network"]["layers"])
    check_table(record)
    itemsize = {"float16": 2, "float32": 4, "float64": 8}[record["dtype"]]
    check_size(record["network"]["layers"], itemsize, most_bytes)
    return record


def check_format(record, format_: str, version: int) -> None:
    """Raise FieldError unless ``record`` is an object of the given format and version."""
    if not isinstance(record, dict):
        raise FieldError(
            "record", f'expected an object {{"format": "{format_}", ...}}, got {shown(record)}'
        )
    if record.get("format") != format_:
        raise FieldError("format", f"expected {format_!r}, got {shown(record.get('format'))}")
    if record.get("version") != version or isinstance(record.get("version"), bool):
        raise FieldError(
            "version",
            f"expected {version} (the version this gpunet reads), got "
            f"{shown(record.get('version'))}",
        )


# --- checkpoints ----------------------------------------------------------------------------------
MAX_RANKS = 65_536
COUNT = integer(
    0, 2**62
)  # steps, epochs, correct answers: far past any run, and checked in range later
PCG64 = fields(
    {
        "bit_generator": string("PCG64"),  # NumPy's default_rng, whose state every draw is from
        "state": fields({"state": integer(0, 2**128 - 1), "inc": integer(0, 2**128 - 1)}),
        "has_uint32": integer(0, 1),
        "uinteger": integer(0, 2**32 - 1),
    }
)
DROPOUT_STATE = fields(
    {"seed": optional(integer(-(2**63), 2**64)), "numpy": PCG64}, {"stream": string()}
)


def loose_number(v, field):
    """A JSON number, NaN and infinities included (a diverged epoch's loss is NaN in its
    history)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise FieldError(field, f"expected a number, got {shown(v)}")
    return v


def state_with_arrays(required: dict):
    """A ``state_dict()`` record of :func:`gpunet.checkpoint.split`: the ``required`` fields,
    ``arrays`` (slot name -> how many arrays, each named ``prefix/slot/i`` in the file), any other
    JSON fields (the optimizer's or the callback's own, which its ``load_state_dict`` checks)."""

    def spec(v, field):
        if not isinstance(v, dict):
            raise FieldError(field, f"expected an object, got {shown(v)}")
        for key, inner in {**required, "arrays": mapping(integer(0, MAX_LAYERS * 2))}.items():
            if key not in v:
                raise FieldError(f"{field}.{key}", "missing")
            inner(v[key], f"{field}.{key}")
        return v

    return spec


EPOCH_RECORD = fields(
    {
        "epoch": integer(1, 2**62),
        "loss": loose_number,
        "accuracy": optional(loose_number),
        "val_loss": optional(loose_number),
        "val_accuracy": optional(loose_number),
        "lr": loose_number,
        "seconds": number(0),
    }
)
PARTIAL = optional(fields({"loss_sum": loose_number, "correct": COUNT, "seconds": number(0)}))
# what Checkpoint._save writes: the run's state (Run.state_dict) and the caller's
CHECKPOINT_FIELDS = {
    "format": string("gpunet-checkpoint"),
    "version": integer(2, 2),
    "run": optional(mapping(anything)),
    "finished": boolean,
    "network": NETWORK,
    "epoch": COUNT,
    "step": COUNT,
    "order_rng": PCG64,
    "random": listing(listing(optional(DROPOUT_STATE), 1, MAX_LAYERS), 1, MAX_RANKS),
    "ranks": integer(1, MAX_RANKS),
    "partial": listing(PARTIAL, 1, MAX_RANKS),
    "optimizer": state_with_arrays({"kind": string(), "lr": number(0), "weight_decay": number(0)}),
    "callbacks": mapping(state_with_arrays({})),
    "history": listing(EPOCH_RECORD),
    "stop_reason": string(),
    "best_epoch": optional(COUNT),
    "diverged_epoch": optional(COUNT),
}


def check_checkpoint(record) -> dict:
    """A checkpoint's record checked through: every field's type and range, the network's chain, and
    the fields that must agree (one random state and one partial sum per rank, one random state per
    layer, partial sums wherever an epoch is under way, one history entry per finished epoch)."""
    record = fields(CHECKPOINT_FIELDS)(record, "")
    layers = record["network"]["layers"]
    check_chain(layers, "network.layers")
    for name in ("random", "partial"):
        if len(record[name]) != record["ranks"]:
            raise FieldError(
                name,
                f"expected {record['ranks']} entries (one per rank, as ranks says), got "
                f"{len(record[name])}",
            )
    for r, states in enumerate(record["random"]):
        if len(states) != len(layers):
            raise FieldError(
                f"random[{r}]", f"expected {len(layers)} entries (one per layer), got {len(states)}"
            )
    if record["step"] > 0 and None in record["partial"]:
        raise FieldError(
            f"partial[{record['partial'].index(None)}]",
            f"expected the sums of the epoch's first {record['step']} steps, got null",
        )
    if len(record["history"]) != record["epoch"]:
        raise FieldError(
            "history",
            f"expected {record['epoch']} entries (one per finished epoch), got "
            f"{len(record['history'])}",
        )
    return record


def checkpoint_arrays(record: dict) -> dict:
    """``{name: shape or None}`` of the arrays a checked checkpoint record names: the network's
    weights (shapes from its layers), the optimizer's and the callbacks' (any shape; their owners
    check them)."""
    wanted: dict = {}
    for i, cfg in enumerate(record["network"]["layers"]):
        if cfg["type"] in BUILT_IN:
            wanted.update({f"net/{k}": shape for k, shape in built_in_arrays(i, cfg).items()})
    owners = [("optimizer", record["optimizer"])]
    owners += [(f"callbacks/{name}", state) for name, state in record["callbacks"].items()]
    for prefix, state in owners:
        for slot, count in state["arrays"].items():
            wanted.update({f"{prefix}/{slot}/{i}": None for i in range(count)})
    return wanted
