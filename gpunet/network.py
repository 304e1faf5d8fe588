"""Networks: ``Sequential`` chains layers; ``mlp`` builds the usual multilayer perceptron.

The forward pass is the notes' ``y^s = f(b^s + y^(s-1) @ W^s)`` layer after layer; the backward pass
walks the layers in reverse, each turning the delta of its output into the delta of its input.

A model file (``save``/``load``) is one ``.npz`` holding the architecture as JSON and every weight
as a NumPy array, so a network trained on a GPU loads on a machine without CuPy.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from .backend import (
    Array,
    DTypeLike,
    device_of,
    get_array_module,
    resolve_device,
    to_device,
    to_numpy,
)
from .files import FileFormatError, NpzReader, write_npz
from .layers import (
    ACTIVATIONS,
    BUILT_IN,
    LAYERS,
    BatchNorm,
    Dropout,
    Layer,
    Linear,
    check_float_input,
    make_rng,
)
from .records import FieldError, built_in_arrays, check_format, check_model

FORMAT = "gpunet-sequential"
FORMAT_VERSION = 1


class Sequential(Layer):
    """A chain of layers; itself a layer (``forward``/``backward``/``parameters``).

    ``classifies``: whether the outputs are class scores, the network's own: given when it is built
    (``classifies=``, as :func:`load` does from the model file), else set by the first ``fit`` from
    its loss, and from then on never changed (a second value is refused). ``None`` until known, and
    then ``predict`` takes a network of more than one output for a classifier.
    """

    _classifies = None
    # a table's model (model files keep them): the feature columns by name, in order; what each
    # class index stands for (a label column's sorted values); the column that held the labels
    feature_names: list | None = None
    classes: list | None = None
    label_column: str | None = None

    def __init__(self, *layers: Layer, classifies: bool | None = None) -> None:
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layers[{i}]: expected a gpunet layer, got {type(layer).__name__}")
        if not layers:
            raise ValueError("layers: expected at least one layer, got none")
        width = None
        for i, layer in enumerate(layers):
            if isinstance(layer, Linear):
                if width is not None and layer.in_features != width:
                    raise ValueError(
                        f"layers[{i}]: expected in_features={width} to match the previous Linear's "
                        f"out_features, got {layer.in_features}"
                    )
                width = layer.out_features
            elif isinstance(layer, BatchNorm) and width is not None and layer.features != width:
                raise ValueError(
                    f"layers[{i}]: expected BatchNorm({width}) to match the previous Linear's "
                    f"out_features, got BatchNorm({layer.features})"
                )
        self.layers = list(layers)
        self.classifies = classifies

    @property
    def classifies(self) -> bool | None:
        return self._classifies

    @classifies.setter
    def classifies(self, value: bool | None) -> None:
        """Set once: None (unknown) may become True or False, which then stays."""
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"classifies: expected True, False or None, got {value!r}")
        if self._classifies is not None and value != self._classifies:
            task = "a classifier" if self._classifies else "a network that does not classify"
            raise ValueError(
                f"classifies: expected {self._classifies} (the network is {task}; its "
                f"task is set once: build a new network for another), got {value!r}"
            )
        self._classifies = value

    # --- the two passes ---------------------------------------------------------------------------
    def forward(self, x: Array) -> Array:
        """x (N, in_features) -> output (N, out_features), on the network's device and dtype."""
        check_float_input(x)
        if x.ndim != 2:
            raise ValueError(
                f"x: expected a 2-D array (batch, features), got shape {tuple(x.shape)}"
            )
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy: Array) -> Array:
        """dy (N, out_features) -> dx (N, in_features); fills every ``param.grad``."""
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
        return dy

    # --- structure --------------------------------------------------------------------------------
    def parameters(self) -> list:
        return [p for layer in self.layers for p in layer.parameters()]

    def named_parameters(self) -> list:
        # an unnamed parameter (a layer of the user's own) is named by its place in the layer
        return [
            (f"{i}.{p.name or j}", p)
            for i, layer in enumerate(self.layers)
            for j, p in enumerate(layer.parameters())
        ]

    def named_buffers(self) -> list:
        """``[(key, layer, attribute), ...]`` of the layers' buffers (BatchNorm's running
        statistics)."""
        return [
            (f"{i}.{name}", layer, name)
            for i, layer in enumerate(self.layers)
            for name in layer.buffer_names
        ]

    @property
    def in_features(self) -> int | None:
        first = next((l for l in self.layers if isinstance(l, Linear)), None)
        return None if first is None else first.in_features

    @property
    def out_features(self) -> int | None:
        last = next((l for l in reversed(self.layers) if isinstance(l, Linear)), None)
        return None if last is None else last.out_features

    @property
    def device(self) -> str:
        params = self.parameters()
        return device_of(params[0].data) if params else "cpu"

    @property
    def dtype(self) -> np.dtype:
        params = self.parameters()
        return params[0].data.dtype if params else np.dtype(np.float32)

    def train(self, mode: bool = True) -> Sequential:
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def random_state(self) -> list:
        """Each layer's random state (``None`` for layers that draw nothing), as JSON data."""
        return [
            layer.random_state() if hasattr(layer, "random_state") else None
            for layer in self.layers
        ]

    def set_random_state(self, states: list) -> None:
        if len(states) != len(self.layers):
            raise ValueError(
                f"states: expected {len(self.layers)} entries (one per layer), got {len(states)}"
            )
        for layer, state in zip(self.layers, states):
            if state is not None:  # a layer that draws (Dropout): random_state() gave it one
                layer.set_random_state(state)  # type: ignore[attr-defined]

    def config(self) -> dict:
        return {"type": "Sequential", "layers": [layer.config() for layer in self.layers]}

    def __repr__(self) -> str:
        inner = "".join(f"\n  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential({inner}\n)"

    # --- devices and weights ----------------------------------------------------------------------
    def to(self, device: str | None) -> Sequential:
        """Move every parameter to ``device`` ("cpu", "gpu", "auto"); returns self. Build the
        optimizer after this: its velocities live beside the parameters."""
        dev = resolve_device(device)
        for p in self.parameters():
            p.data = to_device(p.data, dev)
            p.grad = get_array_module(p.data).zeros_like(p.data)
        for _, layer, name in self.named_buffers():
            setattr(layer, name, to_device(getattr(layer, name), dev))
        return self

    def state_dict(self, host: bool = True) -> "OrderedDict[str, np.ndarray]":
        """Host (NumPy) copies of every parameter, in the order of ``parameters()``, then of every
        buffer (``"1.running_mean"``, ...); with ``host=False`` copies on the network's own
        device."""
        copy = (lambda a: to_numpy(a).copy()) if host else (lambda a: a.copy())
        state = OrderedDict((name, copy(p.data)) for name, p in self.named_parameters())
        state.update((key, copy(getattr(layer, name))) for key, layer, name in self.named_buffers())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Write ``state`` into the parameters and buffers in place (keys, shapes and dtypes must
        match)."""
        named = self.named_parameters() + [
            (key, _Held(layer, name)) for key, layer, name in self.named_buffers()
        ]
        missing = [k for k, _ in named if k not in state]
        unexpected = [k for k in state if k not in dict(named)]
        if missing or unexpected:
            raise KeyError(
                f"state: expected keys {[k for k, _ in named]}, missing {missing}, unexpected "
                f"{unexpected}"
            )
        for name, p in named:
            value = state[name]
            if tuple(value.shape) != tuple(p.data.shape):
                raise ValueError(
                    f"state[{name!r}]: expected shape {tuple(p.data.shape)}, got "
                    f"{tuple(value.shape)}"
                )
            if value.dtype != p.data.dtype:
                raise TypeError(
                    f"state[{name!r}]: expected dtype {p.data.dtype}, got {value.dtype}"
                )
            p.data[...] = to_device(value, device_of(p.data))

    def save(self, path: str | os.PathLike) -> None:
        """Write architecture and weights to one ``.npz`` file, atomically (see
        :func:`files.atomic_write`). A layer that :func:`load` could not rebuild is refused before
        anything is written."""
        for i, layer in enumerate(self.layers):
            check_rebuildable(layer, f"layers[{i}]")
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": str(self.dtype),
            "network": self.config(),
            "classifies": self.classifies,
            "feature_names": self.feature_names,
            "classes": self.classes,
            "label_column": self.label_column,
        }
        write_npz(path, self.state_dict(), RECORD, meta)

    def to_onnx(self, path: str | os.PathLike | None = None, **options: Any) -> Any:
        """This network as an ONNX model (see :func:`gpunet.onnx_export.to_onnx` for ``options``:
        ``task``, ``inputs``, ``classes``, ``metadata``), written to ``path`` when given; needs the
        ``onnx`` extra."""
        from .onnx_export import to_onnx  # the onnx package is optional: loaded only when asked for

        return to_onnx(self, path, **options)


class _Held:
    """A buffer seen as a parameter is (``.data``), so that one loop loads both."""

    def __init__(self, layer, name):
        self.data = getattr(layer, name)


def _build_layer(cfg: dict, dtype, device):
    kind = cfg.get("type")
    if kind == "Linear":
        return Linear(
            cfg["in_features"],
            cfg["out_features"],
            init=cfg.get("init", "he"),
            rng=0,
            dtype=dtype,
            device=device,
        )
    if kind == "Dropout":
        return Dropout(cfg["p"])
    if kind == "BatchNorm":
        return BatchNorm(cfg["features"], cfg["momentum"], cfg["eps"], dtype=dtype, device=device)
    if kind not in LAYERS:
        raise ValueError(
            f"unknown layer type {kind!r}; expected one of {sorted(LAYERS)} (a layer of your own: "
            f"import its module, decorated with @gpunet.register_layer, before gpunet.load)"
        )
    layer = LAYERS[kind].from_config(cfg)
    for p in (
        layer.parameters()
    ):  # made on the host in the layer's own dtype: the model's, where it lives
        p.data = to_device(to_numpy(p.data).astype(dtype), device)
        p.grad = get_array_module(p.data).zeros_like(p.data)
    return layer


def check_rebuildable(layer, name: str = "layer") -> None:
    """Raise a TypeError naming ``name`` and the fix unless :func:`load` can rebuild ``layer``: its
    class registered (:func:`gpunet.register_layer`) and ``from_config(config())`` giving parameters
    of the same shapes."""
    kind = type(layer).__name__
    if LAYERS.get(kind) is not type(layer):
        raise TypeError(
            f"{name}: expected a registered layer, got {kind}, which gpunet.load could not "
            f"rebuild; "
            f"decorate its class with @gpunet.register_layer (config() returning its constructor's "
            f"arguments)"
        )
    if kind in BUILT_IN:
        return
    cfg = layer.config()
    try:
        if cfg.get("type") != kind:
            raise ValueError(f"config()['type'] is {cfg.get('type')!r}, not {kind!r}")
        shapes = [tuple(p.data.shape) for p in _build_layer(cfg, np.float32, "cpu").parameters()]
    except Exception as exc:  # whatever the user's constructor raises
        raise TypeError(
            f"{name}: expected {kind}.from_config(config()) to rebuild the layer, got "
            f"{type(exc).__name__}: {exc}; make config() return the constructor's arguments "
            f"(with 'type': {kind!r}) or define from_config"
        ) from None
    if shapes != [tuple(p.data.shape) for p in layer.parameters()]:
        raise TypeError(
            f"{name}: expected {kind}.from_config(config()) to rebuild parameters of shapes "
            f"{[tuple(p.data.shape) for p in layer.parameters()]}, got {shapes}; config() misses "
            f"constructor arguments"
        )


class ModelFileError(FileFormatError):
    """A model file that :func:`load` refuses (damaged, foreign or crafted); the one line names the
    file and the field of its record or the array that is wrong."""


RECORD = "__gpunet__"


def _planned(cfgs: list, dtype, device) -> tuple[list, dict]:
    """``(layers, wanted)``: the registered layers of one's own already built (None for built-ins,
    built once their arrays are known good), and ``wanted`` (array name -> ((shape,), (dtype,)))
    from the record."""
    layers: list = []
    wanted: dict = {}
    for i, cfg in enumerate(cfgs):
        if cfg["type"] in BUILT_IN:
            layers.append(None)
            shapes = built_in_arrays(i, cfg)
        else:  # a registered class is the user's own code: it alone knows its arrays
            try:
                layer = _build_layer(cfg, dtype, device)
            except Exception as exc:  # whatever the user's constructor raises for this config
                raise FieldError(
                    f"network.layers[{i}]",
                    f"{cfg['type']}.from_config refused it ({type(exc).__name__}: {exc})",
                ) from None
            layers.append(layer)
            shapes = {
                f"{i}.{p.name or j}": tuple(p.data.shape) for j, p in enumerate(layer.parameters())
            }
            shapes.update({f"{i}.{b}": tuple(getattr(layer, b).shape) for b in layer.buffer_names})
        wanted.update({k: ((shape,), (np.dtype(dtype).str,)) for k, shape in shapes.items()})
    return layers, wanted


def load(path: str | os.PathLike, device: str | None = None) -> Sequential:
    """Rebuild a network (architecture and weights) from a file written by ``Sequential.save``.

    The file is not trusted: its JSON record is read and checked through first
    (:mod:`gpunet.records`: types, ranges, the chain of widths, the arrays' total size against what
    the file can hold), then the arrays' ``.npy`` headers against the shapes the record declares and
    the zip entries' sizes, then only those arrays, each of which must hold finite numbers. Anything
    wrong raises :class:`ModelFileError` (a ValueError) naming the file and the field; a missing
    file FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file not found: {path}")
    with NpzReader(path, ModelFileError, "gpunet model file", NOT_A_MODEL) as f:
        meta = f.record(RECORD)
        if meta is None:
            raise ModelFileError(
                f"{path}: not a gpunet model file (no architecture record in it; a checkpoint, "
                f"perhaps)"
            )
        try:
            check_format(meta, FORMAT, FORMAT_VERSION)
            meta = check_model(meta, f.most_bytes())
            dtype = np.dtype(meta["dtype"])
            layers, wanted = _planned(meta["network"]["layers"], dtype, "cpu")
        except FieldError as exc:
            raise ModelFileError(f"{path}: {exc}") from None
        arrays = f.arrays(wanted, skip=(RECORD,))
    # built and filled on the host, then moved: a refused file never reaches (or even probes) a GPU
    layers = [
        layer or _build_layer(c, dtype, "cpu")
        for layer, c in zip(layers, meta["network"]["layers"])
    ]
    # "classifies" is absent from older files: None, unknown
    net = Sequential(*layers, classifies=meta.get("classifies"))
    net.load_state_dict(arrays)
    dev = resolve_device(device)
    if dev != "cpu":
        net.to(dev)
    net.feature_names, net.classes, net.label_column = (
        meta.get(k) for k in ("feature_names", "classes", "label_column")
    )
    return net


NOT_A_MODEL = "a model file is a .npz archive, written by gpunet train or net.save"


def mlp(
    sizes: Sequence[int],
    activation: str | Sequence[str] = "relu",
    init: str | None = None,
    dropout: float = 0.0,
    seed: int | np.random.Generator | None = None,
    dtype: DTypeLike = np.float32,
    device: str | None = None,
    batch_norm: bool = False,
) -> Sequential:
    """A multilayer perceptron: ``sizes = [784, 512, 512, 10]`` gives Linear-act-Linear-act-Linear.

    ``activation`` is one name ("relu", "sigmoid", "tanh") or one per hidden layer. ``init``
    defaults to He for ReLU layers and Xavier for sigmoid/tanh and the output layer. ``dropout``
    follows each hidden activation. ``batch_norm=True`` puts a :class:`BatchNorm` between each
    hidden Linear and its activation. The output layer emits logits (pair it with
    ``SoftmaxCrossEntropy``).
    """
    sizes = list(sizes)
    if len(sizes) < 2:
        raise ValueError(f"sizes: expected at least [inputs, outputs], got {sizes}")
    hidden = len(sizes) - 2
    acts = [activation] * hidden if isinstance(activation, str) else list(activation)
    if len(acts) != hidden:
        raise ValueError(
            f"activation: expected one name or {hidden} names (one per hidden layer), got "
            f"{len(acts)}"
        )
    for a in acts:
        if a not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {a!r}")
    rng = make_rng(seed)
    dev = resolve_device(device)
    layers: list[Layer] = []
    for i, act in enumerate(acts):
        layer_init = init or ("he" if act == "relu" else "xavier")
        layers.append(
            Linear(sizes[i], sizes[i + 1], init=layer_init, rng=rng, dtype=dtype, device=dev)
        )
        if batch_norm:
            layers.append(BatchNorm(sizes[i + 1], dtype=dtype, device=dev))
        layers.append(ACTIVATIONS[act]())
        if dropout:
            layers.append(Dropout(dropout, seed=None if seed is None else int(rng.integers(2**31))))
    layers.append(
        Linear(sizes[-2], sizes[-1], init=init or "xavier", rng=rng, dtype=dtype, device=dev)
    )
    return Sequential(*layers)
