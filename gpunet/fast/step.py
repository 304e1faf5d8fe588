"""One fused training step (forward, cost, backward, update) for the networks the fast path knows:
chains of ``Linear [ReLU] [Dropout]`` blocks ending in a Linear, with ``SoftmaxCrossEntropy`` on integer
labels, and ``SGD``, ``Momentum``, ``Adam`` or ``AdamW``.

Same formulas as the core, with the speed-ups: work buffers allocated once per batch shape, bias + ReLU
in one pass, the softmax cross-entropy forward and gradient in one pass, dx computed into a buffer, each
layer updated as soon as its delta is known (dx first, from the old W), and on the CPU with NumPy's
OpenBLAS the SGD or momentum update in BLAS calls on the arrays (:mod:`gpunet.fast.blas`). Every
path writes ``param.grad`` (the gradient's product goes straight into it), so the step leaves the
state the core's step (:func:`gpunet.training.train_step`) would. Adam's and AdamW's update is one
kernel per parameter on either device (CUDA, numba or in-place NumPy: :func:`gpunet.fast.ops.adam`).
Dropout masks are the Dropout layer's own
(its keys, in the same order; on the GPU one kernel draws, scales and applies each).
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..layers import Dropout, Linear, ReLU
from ..optimizers import Adam, Momentum
from . import blas, cuda, ops


def plan(net):
    """``[(linear, relu, dropout), ...]`` for a chain the fast step knows, else a string saying why not."""
    blocks, layers, i = [], list(net.layers), 0
    while i < len(layers):
        if type(layers[i]) is not Linear:
            return f"layer {i} is {type(layers[i]).__name__}, where a Linear was expected"
        linear, relu, dropout = layers[i], False, None
        i += 1
        if i < len(layers) and type(layers[i]) is ReLU:
            relu, i = True, i + 1
        if i < len(layers) and type(layers[i]) is Dropout:
            dropout, i = layers[i], i + 1
        blocks.append((linear, relu, dropout))
    last = blocks[-1]
    if last[1] or last[2] is not None:
        return "the network does not end with a Linear (its logits)"
    return blocks


def adam_scalars(opt, dtype) -> tuple:
    """The scalars of Adam's kernel for the optimizer's current step count ``opt.t``, in ``dtype``:
    (b1, b2, 1 - b1, 1 - b2, lr / (1 - b1^t), sqrt(1 - b2^t), eps, L2 weight decay, AdamW's decay
    factor), the bias corrections from the core's own float64 computation, each cast once."""
    t, (b1, b2) = np.dtype(dtype).type, opt.betas
    step, root_c2 = opt.corrections()
    wd, decay = (0.0, 1.0 - opt.lr * opt.weight_decay) if opt.decoupled else (opt.weight_decay, 1.0)
    return tuple(t(a) for a in (b1, b2, 1.0 - b1, 1.0 - b2, step, root_c2, opt.eps, wd, decay))


def _affine(x, linear, relu, out=None):
    """``x @ W + b``, then ReLU if ``relu``, with the bias and ReLU in one pass over the product."""
    y = get_array_module(x).matmul(x, linear.W.data, out=out)
    if relu:
        return ops.bias_relu(y, linear.b.data)
    y += linear.b.data
    return y


class FusedStep:
    """``step(x, y, reduce=None) -> (mean loss as a 0-d array, logits)`` for x (N, in) float, y (N,)
    integer labels; ``reduce()``, if given, runs between the gradients and the update (``distributed``).

    The optimizer must hold exactly the network's parameters, in order (``select`` checks it), so its
    velocities (or Adam's moments) line up with the blocks: W then b of each Linear.
    """

    def __init__(self, optimizer, blocks, distributed: bool = False):
        self.blocks, self.optimizer = blocks, optimizer
        self.momentum = isinstance(optimizer, Momentum)
        self.adam = isinstance(optimizer, Adam)  # AdamW too
        W0 = blocks[0][0].W.data
        self.xp = get_array_module(W0)
        self.on_cpu = self.xp.__name__ == "numpy"
        params = optimizer.params
        velocities = optimizer.velocities if self.momentum else [None] * len(params)
        # on the CPU with OpenBLAS (and not Nesterov) the SGD/momentum gradient folds into the update; Adam
        # has a kernel on both devices; else the CPU runs the core rule once the walk is over
        # distributed: the gradients must exist, to be summed over the ranks before the update
        self.deferred = (self.on_cpu and not self.adam) or distributed
        self.fold = (self.on_cpu and not distributed and not self.adam and blas.routines(W0.dtype) is not None
                     and not (self.momentum and optimizer.nesterov)
                     and all(p.data.flags.c_contiguous and p.grad.flags.c_contiguous
                             for p in params))
        self.pairs = [((params[2 * i], velocities[2 * i]), (params[2 * i + 1], velocities[2 * i + 1]))
                      for i in range(len(blocks))]
        self.folded = ([blas.LinearUpdate(W.data, b.data, W.grad, b.grad, vW, vb)
                        for (W, vW), (b, vb) in self.pairs] if self.fold else None)
        self._buffers = {}
        self.sums = None

    @property
    def sums_in_kernel(self) -> bool:
        """True where the step itself adds each batch's loss and right answers to the epoch's sums (the
        GPU: in the softmax kernel, saving the training loop's six launches a step); see :meth:`use_sums`."""
        return not self.on_cpu

    def use_sums(self, loss_sum, correct) -> None:
        """From now on add each batch's loss sum to ``loss_sum`` (0-d float64) and its right answers to
        ``correct`` (0-d int64), on the device (only where :attr:`sums_in_kernel`)."""
        self.sums = (loss_sum, correct) if self.sums_in_kernel else None

    def _buffer(self, key, shape, dtype):
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = self.xp.empty(shape, dtype=dtype)
        return buf

    def _update(self, i, x, dy):
        """Block i's W and b, whose gradients x.T @ dy and dy.sum(0) go into ``grad``: the update
        in BLAS calls on the CPU with OpenBLAS; else on the GPU, applied by one kernel each (on the
        CPU the core optimizer steps once the walk is over)."""
        opt = self.optimizer
        if self.fold:
            self.folded[i](x, dy, opt.lr, opt.momentum if self.momentum else 0.0, opt.weight_decay)
            return
        (W, vW), (b, vb) = self.pairs[i]
        self.xp.matmul(x.T, dy, out=W.grad)
        if self.deferred or self.adam:
            dy.sum(axis=0, out=b.grad)
        if self.deferred:
            return
        if self.adam:
            for k in (2 * i, 2 * i + 1):
                p = opt.params[k]
                scratch = None
                if self.on_cpu:  # in-place NumPy's two work arrays, made once (CUDA and numba need none)
                    scratch = [self._buffer(("adam", j, k), p.data.shape, p.data.dtype) for j in (0, 1)]
                ops.adam(p.data, p.grad, opt.m[k], opt.v[k], self._adam_scalars, scratch)
            return
        t = W.data.dtype.type  # the GPU: b.grad and both updates in one launch
        cuda.layer_update(W, b, vW, vb, dy, t(opt.lr), t(opt.momentum if self.momentum else 0.0),
                          t(opt.weight_decay), self.momentum and opt.nesterov)

    def __call__(self, x, y, reduce=None):
        xp, n = self.xp, x.shape[0]
        x = xp.ascontiguousarray(x)
        inputs, masks = [], []
        for i, (linear, relu, dropout) in enumerate(self.blocks):
            inputs.append(x)
            W = linear.W.data
            y_ = _affine(x, linear, relu, out=self._buffer(("y", i), (n, W.shape[1]), W.dtype))
            mask = None
            if dropout is not None and dropout.active():
                buf = None if self.on_cpu else self._buffer(("mask", i), y_.shape, y_.dtype)
                mask = ops.dropout(dropout, y_, buf)
            masks.append(mask)
            x = y_
        logits = x
        grad = self._buffer("grad", logits.shape, logits.dtype)
        if self.sums is not None:  # the GPU: the epoch's sums in the softmax kernel's launch
            value = self._buffer("mean", (), logits.dtype)
            cuda.softmax_xent_sums(logits, y, grad, value, *self.sums)
        else:
            rows = self._buffer("rows", (n,), logits.dtype)
            ops.softmax_xent(logits, y, grad, rows)
            value = rows.sum() * logits.dtype.type(1.0 / n)
        if self.adam and not self.deferred:  # this step's count and bias corrections, as the core's step
            self.optimizer.t += 1
            self._adam_scalars = adam_scalars(self.optimizer, logits.dtype)

        dy = grad
        for i in range(len(self.blocks) - 1, -1, -1):
            linear = self.blocks[i][0]
            if i > 0:  # the delta of the layer below, from the weights before this step's update
                dx = xp.matmul(dy, linear.W.data.T, out=self._buffer(("dx", i), inputs[i].shape, dy.dtype))
            self._update(i, inputs[i], dy)
            if i > 0:
                _, relu, _ = self.blocks[i - 1]
                mask = masks[i - 1]
                if relu and mask is not None:
                    ops.relu_mask_backward(dx, inputs[i], mask)
                elif mask is not None:
                    dx *= mask
                elif relu:
                    ops.relu_backward(dx, inputs[i])
                dy = dx
        if reduce is not None:
            reduce()  # e.g. the sum over the ranks of a distributed run
        if self.deferred and not self.fold:
            self.optimizer.step()  # the core rule, on the gradients written above
        return value, logits


class FusedForward:
    """``forward(x) -> logits`` in eval mode for a chain ``plan`` knows: one matmul per layer, bias + ReLU
    in one pass on its output (dropout is the identity in eval mode). For predict and evaluate."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __call__(self, x):
        self.blocks[0][0].check_input(x)  # the core's own checks, once: the widths match after it
        for linear, relu, _ in self.blocks:
            x = _affine(x, linear, relu)
        return x


def mean_softmax_xent(z, labels):
    """The mean softmax cross-entropy of logits z (N, C) and integer labels (N,), as a 0-d array."""
    xp = get_array_module(z)
    z = xp.ascontiguousarray(z)
    _, rows = ops.softmax_xent(z, labels, xp.empty_like(z), xp.empty(z.shape[0], dtype=z.dtype))
    return rows.sum() * z.dtype.type(1.0 / max(z.shape[0], 1))
