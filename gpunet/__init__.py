"""gpunet: feed-forward networks with hand-written matrix backpropagation on NumPy (CPU) or CuPy
(GPU).

import gpunet as gn
net = gn.mlp([784, 512, 512, 10], seed=0)
opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
loss = gn.SoftmaxCrossEntropy()
gn.fit(net, loss, opt, x, y, epochs=5, verbose=2)     # x: any 2-D real array-like; y: class labels
0..C-1 gn.predict(net, x_test)                              # labels (a regression network: its
outputs)
"""

from . import schedules
from .backend import (
    DeviceError,
    describe_device,
    get_array_module,
    gpu_available,
    gpu_unavailable_reason,
    resolve_device,
    set_default_device,
    to_device,
    to_numpy,
)
from .data.rows import Pixels, Rows
from .explain import explain_step
from .gradcheck import gradcheck, numerical_gradient
from .layers import (
    BatchNorm,
    Dropout,
    Layer,
    Linear,
    Parameter,
    ReLU,
    Sigmoid,
    Softmax,
    Standardize,
    Tanh,
    register_layer,
)
from .losses import MAELoss, MSELoss, SoftmaxCrossEntropy
from .network import ModelFileError, Sequential, load, mlp
from .optimizers import SGD, Adam, AdamW, Momentum, RMSprop
from .training import evaluate, fit, predict, predict_proba, train_step

__version__ = "0.1.0"

__all__ = [
    "DeviceError",
    "describe_device",
    "get_array_module",
    "gpu_available",
    "gpu_unavailable_reason",
    "resolve_device",
    "set_default_device",
    "to_device",
    "to_numpy",
    "explain_step",
    "gradcheck",
    "numerical_gradient",
    "Dropout",
    "Layer",
    "Linear",
    "Parameter",
    "ReLU",
    "Sigmoid",
    "Softmax",
    "Tanh",
    "MAELoss",
    "MSELoss",
    "SoftmaxCrossEntropy",
    "ModelFileError",
    "Sequential",
    "load",
    "mlp",
    "SGD",
    "Momentum",
    "Pixels",
    "Rows",
    "Adam",
    "AdamW",
    "RMSprop",
    "BatchNorm",
    "Standardize",
    "register_layer",
    "schedules",
    "fit",
    "evaluate",
    "predict",
    "predict_proba",
    "train_step",
]
