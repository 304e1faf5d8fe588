"""The fast path, beside the core: the one place that decides when a faster step replaces the
core's.

``select(net, loss, optimizer, y)`` returns a fused step (:class:`gpunet.fast.step.FusedStep`) for
the training runs it can speed up (``Linear [ReLU] [Dropout]`` chains, ``SoftmaxCrossEntropy`` on
integer labels, an optimizer of ``optimizers.OPTIMIZERS`` holding exactly the network's parameters;
on a GPU also ``Linear BatchNorm [ReLU] [Dropout]`` blocks), or None, and then the core's
``forward``/ ``backward``/``step`` run (``why_not`` says why: a BatchNorm layer on the CPU, an
optimizer of one's own, ...). ``GPUNET_FAST=0`` turns the fast path off everywhere;
``GPUNET_NUMBA=0`` only its compiled CPU kernels, ``GPUNET_CPU_BLAS=0`` only its BLAS CPU update,
``GPUNET_SKIP_ZEROS=0`` only the CPU's skipping of the input's zero columns
(:mod:`gpunet.fast.columns`).

The core (layers, losses, optimizers, network) imports nothing from here; this package imports the
core.
"""

from __future__ import annotations

import os

import numpy as np

from ..backend import get_array_module
from ..losses import SoftmaxCrossEntropy
from ..optimizers import OPTIMIZERS
from . import blas, columns, ops
from .ops import gather_scaled, resample
from .step import FusedForward, FusedStep, mean_softmax_xent, plan

ENV_VAR = "GPUNET_FAST"


def enabled() -> bool:
    return os.environ.get(ENV_VAR, "1") != "0"


def why_not(net, loss, optimizer, y) -> str | None:
    """None when the fused step applies to this run, else the reason, in words."""
    if not enabled():
        return f"{ENV_VAR}=0"
    if type(loss) is not SoftmaxCrossEntropy:
        return f"the loss is {type(loss).__name__}, not SoftmaxCrossEntropy"
    if getattr(y, "ndim", None) != 1 or y.dtype.kind not in "iu":
        return "the targets are not integer class labels"
    if type(optimizer) not in OPTIMIZERS.values():  # each has a rule its kernels are generated from
        return f"the optimizer is {type(optimizer).__name__}, not one of {', '.join(OPTIMIZERS)}"
    params = net.parameters()
    if len(params) != len(optimizer.params) or any(
        p is not q for p, q in zip(params, optimizer.params)
    ):
        return "the optimizer does not hold exactly the network's parameters, in order"
    blocks = plan(net, batch_norm=_on_gpu(net))
    return blocks if isinstance(blocks, str) else None


def _on_gpu(net) -> bool:
    """Whether ``net`` lives on a GPU (where the fused step takes BatchNorm in: its launches are the
    cost; on the CPU the core's BatchNorm step is as fast)."""
    params = net.parameters()
    return bool(params) and get_array_module(params[0].data) is not np


def select(net, loss, optimizer, y, distributed: bool = False):
    """A fused step for this training run, or None (then the core runs). ``distributed``: the
    gradients are written out and summed over the ranks (``step(x, y, reduce)``) before the
    update."""
    if why_not(net, loss, optimizer, y) is not None:
        return None
    return FusedStep(optimizer, plan(net, batch_norm=_on_gpu(net)), distributed)


def forward_for(net):
    """A fused eval-mode forward pass for ``net`` (see :class:`FusedForward`), or None (then the
    core's ``net.forward`` runs): the fast path must be on, the network a chain it knows, in eval
    mode."""
    if not enabled() or net.training:
        return None
    blocks = plan(net)
    return None if isinstance(blocks, str) else FusedForward(blocks)


def loss_for(loss, y):
    """``mean_loss(z, y)`` through the fused softmax cross-entropy for integer labels, or None (then
    the core loss runs)."""
    if (
        not enabled()
        or type(loss) is not SoftmaxCrossEntropy
        or y.ndim != 1
        or y.dtype.kind not in "iu"
    ):
        return None
    return mean_softmax_xent


def status() -> dict:
    """What the fast path runs on this machine, for ``gpunet info`` and metrics.json."""
    return {
        "enabled": enabled(),
        "cpu_kernels": ops.numba_status(),
        "cpu_blas_update": blas.status(),
        "cpu_zero_columns_skipped": columns.status(),
        "gpu_kernels": "CUDA kernels through CuPy (when the device is a GPU)",
    }


__all__ = [
    "select",
    "why_not",
    "forward_for",
    "loss_for",
    "status",
    "enabled",
    "gather_scaled",
    "resample",
    "FusedStep",
    "FusedForward",
    "plan",
]
