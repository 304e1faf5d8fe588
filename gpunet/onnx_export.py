"""ONNX export: a gpunet network as an ONNX graph that ONNX Runtime (or any ONNX runtime) can serve.

The graph is written with the ``onnx`` package (the ``onnx`` extra), at opset 17 and IR version 8,
which every current runtime loads (the newest ``onnx`` writes a newer IR by default, which runtimes
may refuse). One input ``input`` of shape [batch, features] float32, the batch dimension dynamic. A
classifier has two outputs named as skl2onnx names them with ``zipmap=False``: ``probabilities``
[batch, classes] float32, the softmax of the network's output exactly as
:func:`gpunet.training.predict_proba` computes it, and ``label`` int64 [batch], its argmax (what
``gpunet predict`` shows). A regressor has one, ``output``.

Layer by layer: Linear is ``Gemm`` (W is stored (in, out), as gpunet holds it), the activations and
Softmax their ONNX operators, Dropout the identity (what it is in eval mode), BatchNorm
``BatchNormalization`` with its running statistics (its eval form), Standardize ``Sub`` then ``Mul``
(by 1 / scale, as it computes). The inputs are the values the network was fed: for an MNIST model
that is ``pixel / 255`` in [0, 1], which the model's metadata (``inputs``) says. Weights come to the
host first, so a model trained on a GPU exports the same; they are written as float32 whatever the
network's dtype (ONNX's input here is float32).
"""

from __future__ import annotations

import json

import numpy as np

from . import layers
from .backend import to_numpy
from .files import atomic_write
from .training import classifies

OPSET = 17
IR_VERSION = 8
TASKS = ("classifier", "regressor")
INPUT, PROBABILITIES, LABEL, OUTPUT = "input", "probabilities", "label", "output"
ACTIVATION_OPS = {layers.ReLU: "Relu", layers.Sigmoid: "Sigmoid", layers.Tanh: "Tanh"}
EXPORTABLE = ("Linear", "ReLU", "Sigmoid", "Tanh", "Softmax", "Dropout", "BatchNorm", "Standardize")


def require_onnx():
    """The ``onnx`` module, or an ImportError in one line naming the extra that brings it."""
    try:
        import onnx
    except ImportError:  # a ModuleNotFoundError naming the module, as Python's own would
        raise ModuleNotFoundError(
            "ONNX export needs the onnx package: pip install 'gpunet[onnx]'", name="onnx"
        ) from None
    return onnx


def _float32(onnx, name, array):
    array = getattr(array, "data", array)  # a Parameter's array, or a buffer itself
    return onnx.numpy_helper.from_array(
        np.ascontiguousarray(to_numpy(array), dtype=np.float32), name
    )


def layer_nodes(onnx, layer, index: int, x: str, y: str):
    """The ONNX nodes and initializers computing layer ``index`` (eval mode) from tensor ``x`` into
    ``y``: ``(nodes, initializers)``. Raises ValueError naming the layer when ONNX has no
    counterpart here."""
    make, name = onnx.helper.make_node, f"layers.{index}"
    if isinstance(layer, layers.Linear):
        w, b = _float32(onnx, f"{name}.W", layer.W.data), _float32(onnx, f"{name}.b", layer.b.data)
        return [make("Gemm", [x, w.name, b.name], [y], name=name)], [w, b]
    for cls, op in ACTIVATION_OPS.items():
        if isinstance(layer, cls):
            return [make(op, [x], [y], name=name)], []
    if isinstance(layer, layers.Softmax):
        return [make("Softmax", [x], [y], name=name, axis=1)], []
    if isinstance(layer, layers.Dropout):
        return [make("Identity", [x], [y], name=name)], []
    if isinstance(
        layer, layers.BatchNorm
    ):  # eval form: (x - running_mean) / sqrt(running_var + eps) ...
        inits = [
            _float32(onnx, f"{name}.{part}", getattr(layer, part))
            for part in ("gamma", "beta", "running_mean", "running_var")
        ]
        return [
            make(
                "BatchNormalization",
                [x] + [t.name for t in inits],
                [y],
                name=name,
                epsilon=float(layer.eps),
            )
        ], inits
    if isinstance(
        layer, layers.Standardize
    ):  # as its forward computes it: (x - shift) * (1 / scale), in float32
        shift = _float32(onnx, f"{name}.shift", layer.shift.astype(np.float32))
        inverse = _float32(onnx, f"{name}.inverse_scale", (1 / layer.scale).astype(np.float32))
        return [
            make("Sub", [x, shift.name], [f"{name}.centred"], name=f"{name}.sub"),
            make("Mul", [f"{name}.centred", inverse.name], [y], name=name),
        ], [shift, inverse]
    raise ValueError(
        f"layers[{index}]: expected a layer ONNX export knows ({', '.join(EXPORTABLE)}), "
        f"got {type(layer).__name__}"
    )


def _head(onnx, task: str, last: str):
    """The classifier's softmax and argmax after the network's output ``last`` (nothing for a
    regressor)."""
    if task == "regressor":
        return []
    make = onnx.helper.make_node
    return [
        make("Softmax", [last], [PROBABILITIES], name="probabilities", axis=1),
        make("ArgMax", [PROBABILITIES], [LABEL], name="label", axis=1, keepdims=0),
    ]


def _metadata(net, task, inputs, classes, metadata) -> dict:
    from . import __version__

    meta = {
        "producer": "gpunet",
        "gpunet_version": __version__,
        "task": task,
        "inputs": inputs
        or f"float32 [batch, {net.in_features}]: the values the network was trained on, "
        f"as gpunet fed them",
        "network": json.dumps(net.config()),
    }
    if getattr(net, "feature_names", None) is not None:  # the columns by name, in the input's order
        meta["feature_names"] = json.dumps(list(net.feature_names))
    classes = classes if classes is not None else getattr(net, "classes", None)
    if classes is not None:
        meta["classes"] = json.dumps([c.item() if hasattr(c, "item") else c for c in classes])
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    return meta


def to_onnx(net, path=None, *, task: str | None = None, inputs: str | None = None, classes=None,
            metadata: dict | None = None):  # fmt: skip
    """The network ``net`` (a ``Sequential``) as an ``onnx.ModelProto``, checked with
    ``onnx.checker`` (``full_check=True``); written to ``path`` (atomically) when given.

    ``task``: ``"classifier"`` (outputs ``probabilities`` and ``label``) or ``"regressor"``
    (``output``); by default what gpunet predicts with the network
    (:func:`gpunet.training.classifies`: the loss it was trained with, else whether it has more than
    one output). ``inputs``: a sentence on what the inputs are (e.g. ``"pixel / 255"``), stored in
    the metadata; ``classes``: the class each label index stands for, stored in the metadata as JSON
    (default: the model's own ``classes``; its ``feature_names`` are stored too); ``metadata``: more
    key/value strings. Nothing of ``net`` changes (its weights are copied to the host).
    """
    onnx = require_onnx()
    if task is None:
        task = "classifier" if classifies(net) else "regressor"
    if task not in TASKS:
        raise ValueError(f"task: expected one of {', '.join(TASKS)}, got {task!r}")
    features, outputs = net.in_features, net.out_features
    if features is None:
        raise ValueError(
            "net: expected a network with a Linear layer (its inputs' width), got none"
        )
    nodes: list = []
    inits: list = []
    x = INPUT
    for i, layer in enumerate(net.layers):
        y = OUTPUT if task == "regressor" and i == len(net.layers) - 1 else f"layers.{i}.out"
        more_nodes, more_inits = layer_nodes(onnx, layer, i, x, y)
        nodes, inits, x = nodes + more_nodes, inits + more_inits, y
    nodes += _head(onnx, task, x)
    tensor = onnx.helper.make_tensor_value_info
    if task == "classifier":
        outs = [
            tensor(PROBABILITIES, onnx.TensorProto.FLOAT, ["batch", outputs]),
            tensor(LABEL, onnx.TensorProto.INT64, ["batch"]),
        ]
    else:
        outs = [tensor(OUTPUT, onnx.TensorProto.FLOAT, ["batch", outputs])]
    graph = onnx.helper.make_graph(
        nodes,
        "gpunet",
        [tensor(INPUT, onnx.TensorProto.FLOAT, ["batch", features])],
        outs,
        initializer=inits,
    )
    model = onnx.helper.make_model(
        graph,
        opset_imports=[onnx.helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="gpunet",
    )
    meta = _metadata(net, task, inputs, classes, metadata)
    model.producer_version = meta["gpunet_version"]
    model.doc_string = f"gpunet {task}; inputs: {meta['inputs']}"
    onnx.helper.set_model_props(model, meta)
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        atomic_write(path, model.SerializeToString())
    return model
