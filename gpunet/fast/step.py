"""One fused training step (forward, cost, backward, update) for the networks the fast path knows:
chains of ``Linear [ReLU] [Dropout]`` blocks ending in a Linear, with ``SoftmaxCrossEntropy`` on
integer labels, and ``SGD``, ``Momentum``, ``Adam`` or ``AdamW``.

Same formulas as the core, with the speed-ups: work buffers allocated once per batch shape, bias +
ReLU in one pass, the softmax cross-entropy forward and gradient in one pass, dx computed into a
buffer, each layer updated as soon as its delta is known (dx first, from the old W), and on the CPU
with NumPy's OpenBLAS the gradients' products and the SGD or momentum update in BLAS calls on the
arrays (:mod:`gpunet.fast.blas`), the update itself by the rule's generated kernel where numba is
installed. Every path writes ``param.grad`` (the gradient's product goes straight into it), so the
step leaves the state the core's step (:func:`gpunet.training.train_step`) would. Any other rule
(Adam, AdamW, RMSprop) is one kernel per parameter, generated from the optimizer's rule
(:func:`gpunet.fast.ops.update`).
Dropout masks are the Dropout layer's own
(its keys, in the same order; on the GPU one kernel draws, scales and applies each).
"""

from __future__ import annotations

import functools

from ..backend import get_array_module
from ..layers import BatchNorm, Dropout, Linear, ReLU
from ..optimizers import SGD, Momentum
from . import blas, columns, cuda, ops


def plan(net, batch_norm: bool = False):
    """``[(linear, relu, dropout, batch_norm), ...]`` for a chain the fast step knows (``Linear
    [BatchNorm] [ReLU] [Dropout]`` blocks, BatchNorm only when ``batch_norm``: the GPU fuses it, the
    CPU runs the core's), else a string saying why not."""
    blocks, layers, i = [], list(net.layers), 0
    while i < len(layers):
        if type(layers[i]) is not Linear:
            where = (
                " (fused on the GPU only: the CPU runs the core's step)"
                if type(layers[i]) is BatchNorm
                else ""
            )
            return f"layer {i} is {type(layers[i]).__name__}, where a Linear was expected{where}"
        linear, bn, relu, dropout = layers[i], None, False, None
        i += 1
        if batch_norm and i < len(layers) and type(layers[i]) is BatchNorm:
            bn, i = layers[i], i + 1
        if i < len(layers) and type(layers[i]) is ReLU:
            relu, i = True, i + 1
        if i < len(layers) and type(layers[i]) is Dropout:
            dropout, i = layers[i], i + 1
        blocks.append((linear, relu, dropout, bn))
    last = blocks[-1]
    if last[1] or last[2] is not None or last[3] is not None:
        return "the network does not end with a Linear (its logits)"
    return blocks


def _affine(x, linear, relu, out=None, y=None):
    """``x @ W + b``, then ReLU if ``relu``, with the bias and ReLU in one pass over the product
    (``y``: the product x @ W, where the caller made it)."""
    if y is None:
        y = get_array_module(x).matmul(x, linear.W.data, out=out)
    if relu:
        return ops.bias_relu(y, linear.b.data)
    y += linear.b.data
    return y


class FusedStep:
    """``step(x, y, reduce=None, batch_rows=None) -> (mean loss as a 0-d array, logits)`` for x (N,
    in) float, y (N,) integer labels; ``reduce()``, if given, runs between the gradients and the
    update (``distributed``).

    The optimizer must hold exactly the network's parameters, in order (``select`` checks it), so
    its velocities (or Adam's moments) line up with the blocks: W then b of each Linear (then gamma
    and beta of its BatchNorm). On the GPU a distributed step (:attr:`prescaled`) takes the global
    batch's rows ``batch_rows``: its gradients are this rank's share of the global mean (1 /
    batch_rows in the softmax kernel, so no pass weighs them before the all-reduce), its ``mean`` is
    its rows' loss sum over ``batch_rows``, and after ``reduce()`` each layer is updated by one
    kernel.
    """

    def __init__(self, optimizer, blocks, distributed: bool = False):
        self.blocks, self.optimizer = blocks, optimizer
        self.momentum = isinstance(optimizer, Momentum)
        layered = type(optimizer) in (SGD, Momentum)  # W and b in one kernel, or BLAS calls
        W0 = blocks[0][0].W.data
        self.xp = get_array_module(W0)
        self.on_cpu = self.xp.__name__ == "numpy"
        params = optimizer.params
        velocities = [
            optimizer.buffers(i)[0] if self.momentum else None for i in range(len(params))
        ]
        # SGD and momentum: on the GPU one kernel a layer (cuda.LAYER_*), on the CPU with OpenBLAS
        # (not Nesterov) BLAS calls (blas.LinearUpdate); any other case: the kernel generated from
        # the optimizer's rule, one a parameter (ops.update: CUDA, numba, or the core's rule itself)
        # distributed: the gradients must exist, to be summed over the ranks before the update (on
        # the GPU the fused update runs after the sum; on the CPU the core's step)
        self.deferred = distributed and self.on_cpu
        self.prescaled = distributed and not self.on_cpu
        self.fold = (
            self.on_cpu
            and not distributed
            and layered
            and blas.routines(W0.dtype) is not None
            and not (self.momentum and optimizer.nesterov)
            and all(p.data.flags.c_contiguous and p.grad.flags.c_contiguous for p in params)
        )
        self.per_parameter = not self.fold and not (layered and not self.on_cpu)
        # (W, vW), (b, vb) of each block, then (gamma, vgamma), (beta, vbeta) of a BatchNorm's:
        # their indices
        self.index, k = [], 0
        for block in blocks:
            self.index.append((k, k + 1, (k + 2, k + 3) if block[3] is not None else None))
            k += 4 if block[3] is not None else 2
        self.pairs = [
            ((params[i], velocities[i]), (params[j], velocities[j])) for i, j, _ in self.index
        ]
        self.bn_pairs = [
            None
            if bn is None
            else ((params[bn[0]], velocities[bn[0]]), (params[bn[1]], velocities[bn[1]]))
            for _, _, bn in self.index
        ]
        self.folded = (
            [
                blas.LinearUpdate(W.data, b.data, W.grad, b.grad, vW, vb)
                for (W, vW), (b, vb) in self.pairs
            ]
            if self.fold
            else None
        )
        self._buffers = {}
        self.sums = None
        # the CPU: the first layer multiplies only its input's lit columns (gpunet.fast.columns)
        self.columns = columns.LitColumns() if self.on_cpu else None

    @property
    def sums_in_kernel(self) -> bool:
        """True where the step itself adds each batch's loss and right answers to the epoch's sums
        (the GPU: in the softmax kernel, saving the training loop's six launches a step); see
        :meth:`use_sums`."""
        return not self.on_cpu

    def use_sums(self, loss_sum, correct) -> None:
        """From now on add each batch's loss sum to ``loss_sum`` (0-d float64) and its right answers
        to ``correct`` (0-d int64), on the device (only where :attr:`sums_in_kernel`)."""
        self.sums = (loss_sum, correct) if self.sums_in_kernel else None

    @functools.cached_property
    def fold_rule(self) -> bool:
        """The fold with numba: W and b stepped by the rule's generated kernel, one pass each (BLAS
        makes three for W). Asked at the first step, not when the step is built, so that a run
        refused before it (a crafted checkpoint) never loads numba and LLVM (about 60 MB)."""
        return self.fold and ops.numba_kernels() is not None

    @functools.cached_property
    def _rule_steps(self) -> list:
        """Each block's ``rule`` for its LinearUpdate: W and b by the rule's kernel, or None (BLAS
        calls); made once, not a closure per layer per step."""
        if not self.fold_rule:
            return [None] * len(self.blocks)
        return [functools.partial(self._rule, (w, b)) for w, b, _ in self.index]

    def _buffer(self, key, shape, dtype):
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape:
            buf = self._buffers[key] = self.xp.empty(shape, dtype=dtype)
        return buf

    def _update(self, i, x, dy):
        """Block i's W and b, whose gradients x.T @ dy and dy.sum(0) go into ``grad``, then the
        rule: in BLAS calls (the CPU with OpenBLAS), one kernel for both (SGD and momentum on the
        GPU), or one generated kernel each (:meth:`_rule`); a distributed step's waits for the sum
        over the
        ranks (the core's step on the CPU, :meth:`_apply` on the GPU)."""
        opt = self.optimizer
        (W, vW), (b, vb) = self.pairs[i]
        lit = i == 0 and self.columns is not None and self.columns.lit is not None
        if lit:  # W.grad over the columns the forward multiplied
            self.columns.gradient(dy, W.grad)
        if self.fold:
            gamma = opt.momentum if self.momentum else 0.0
            args = (dy, opt.lr, gamma, opt.weight_decay, self._rule_steps[i])
            if lit:
                self.folded[i].update(*args)
            else:
                self.folded[i](x, *args)
            return
        if not lit:
            self.xp.matmul(x.T, dy, out=W.grad)
        if self.deferred or self.per_parameter or self.prescaled:
            dy.sum(axis=0, out=b.grad)
        if self.deferred or self.prescaled:
            return
        if self.per_parameter:
            self._rule(self.index[i][:2])
            return
        t = W.data.dtype.type  # the GPU: b.grad and both updates in one launch
        cuda.layer_update(
            W,
            b,
            vW,
            vb,
            dy,
            t(opt.lr),
            t(opt.momentum if self.momentum else 0.0),
            t(opt.weight_decay),
            self.momentum and opt.nesterov,
        )

    def _rule(self, indices):
        """The parameters ``indices`` stepped by the optimizer's rule (its generated kernel)."""
        for k in indices:
            ops.update(self.optimizer, k, self._constants)

    def _apply(self, pairs, indices):
        """The GPU's update of two parameters whose gradients are written (W, b or gamma, beta)."""
        if self.per_parameter:
            self._rule(indices)
            return
        opt = self.optimizer
        (W, vW), (b, vb) = pairs
        t = W.data.dtype.type
        cuda.layer_update_given(
            W,
            b,
            vW,
            vb,
            t(opt.lr),
            t(opt.momentum if self.momentum else 0.0),
            t(opt.weight_decay),
            self.momentum and opt.nesterov,
        )

    def _forward(self, x, n):
        """Every block's input and dropout mask, and the logits."""
        inputs, masks = [], []
        if self.columns is not None:
            self.columns.lit = None  # set again by block 0's forward where it skips columns
        for i, (linear, relu, dropout, bn) in enumerate(self.blocks):
            inputs.append(x)
            W = linear.W.data
            out = self._buffer(("y", i), (n, W.shape[1]), W.dtype)
            if bn is not None:
                y_ = self._batch_norm(i, x, linear, bn, relu, out)
            else:
                lit = (
                    self.columns.forward(x, W, out) if i == 0 and self.columns is not None else None
                )
                y_ = _affine(x, linear, relu, out, lit)
            mask = None
            if dropout is not None and dropout.active():
                buf = self._buffer(("mask", i), y_.shape, y_.dtype)
                mask = ops.dropout(dropout, y_, buf)
            masks.append(mask)
            x = y_
        return inputs, masks, x

    def _batch_norm(self, i, x, linear, bn, relu, out):
        """x @ W + b through BatchNorm (training mode) and the ReLU, in three launches (the GPU
        only)."""
        if x.shape[0] < 2:  # the core's refusal, in its words
            return bn.forward(x @ linear.W.data)
        y = self.xp.matmul(x, linear.W.data, out=out)
        f = y.shape[1]
        mu, inv_sigma = (self._buffer((name, i), (f,), y.dtype) for name in ("mu", "inv_sigma"))
        cuda.batch_norm_stats(
            y, linear.b.data, mu, inv_sigma, bn.running_mean, bn.running_var, bn.momentum, bn.eps
        )
        xhat = self._buffer(("xhat", i), y.shape, y.dtype)
        cuda.batch_norm_apply(
            y, xhat, linear.b.data, mu, inv_sigma, bn.gamma.data, bn.beta.data, relu
        )
        return y

    def _backward_tail(self, i, dx, inputs, masks, after):
        """dx (the gradient at block i's output) through its Dropout, ReLU and BatchNorm, in
        place."""
        _, relu, _, bn = self.blocks[i]
        mask = masks[i]
        if bn is not None:
            (gamma, _), (beta, _) = self.bn_pairs[i]
            cuda.batch_norm_backward(
                dx,
                inputs[i + 1],
                mask,
                self._buffers[("xhat", i)],
                gamma.data,
                self._buffers[("inv_sigma", i)],
                gamma.grad,
                beta.grad,
                relu,
            )
            after.append((self.bn_pairs[i], self.index[i][2]))
        elif relu and mask is not None:
            ops.relu_mask_backward(dx, inputs[i + 1], mask)
        elif mask is not None:
            dx *= mask
        elif relu:
            ops.relu_backward(dx, inputs[i + 1])

    def __call__(self, x, y, reduce=None, batch_rows=None):
        xp, n = self.xp, x.shape[0]
        x = xp.ascontiguousarray(x)
        inputs, masks, logits = self._forward(x, n)
        grad = self._buffer("grad", logits.shape, logits.dtype)
        if self.sums is not None:  # the GPU: the epoch's sums in the softmax kernel's launch
            value = self._buffer("mean", (), logits.dtype)
            cuda.softmax_xent_sums(
                logits, y, grad, value, *self.sums, rows=batch_rows if self.prescaled else None
            )
        else:
            rows = self._buffer("rows", (n,), logits.dtype)
            ops.softmax_xent(logits, y, grad, rows)
            value = rows.sum() * logits.dtype.type(1.0 / n)
        # the optimizer's bookkeeping (Adam's t), once a step
        if (self.per_parameter or self.fold_rule) and not self.deferred:
            self._constants = self.optimizer.begin_step()

        dy, after = (
            grad,
            [],
        )  # after: the updates that wait (a BatchNorm's; all of a distributed step's)
        for i in range(len(self.blocks) - 1, -1, -1):
            linear = self.blocks[i][0]
            if i > 0:  # the delta of the layer below, from the weights before this step's update
                dx = xp.matmul(
                    dy, linear.W.data.T, out=self._buffer(("dx", i), inputs[i].shape, dy.dtype)
                )
            self._update(i, inputs[i], dy)
            if self.prescaled:
                after.append((self.pairs[i], self.index[i][:2]))
            if i > 0:
                self._backward_tail(i - 1, dx, inputs, masks, after)
                if (
                    not self.prescaled
                ):  # a BatchNorm's gamma and beta: their gradients are known now
                    for pairs, indices in after:
                        self._apply(pairs, indices)
                    after = []
                dy = dx
        if reduce is not None:
            reduce()  # e.g. the sum over the ranks of a distributed run
        for pairs, indices in after:
            self._apply(pairs, indices)
        if self.deferred:
            self.optimizer.step()  # the core rule, on the gradients summed above
        return value, logits


class FusedForward:
    """``forward(x) -> logits`` in eval mode for a chain ``plan`` knows: one matmul per layer, bias
    + ReLU in one pass on its output (dropout is the identity in eval mode). For predict and
      evaluate."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __call__(self, x):
        self.blocks[0][0].check_input(x)  # the core's own checks, once: the widths match after it
        for linear, relu, _, _ in self.blocks:
            x = _affine(x, linear, relu)
        return x


def mean_softmax_xent(z, labels):
    """The mean softmax cross-entropy of logits z (N, C) and integer labels (N,), as a 0-d array."""
    xp = get_array_module(z)
    z = xp.ascontiguousarray(z)
    _, rows = ops.softmax_xent(z, labels, xp.empty_like(z), xp.empty(z.shape[0], dtype=z.dtype))
    return rows.sum() * z.dtype.type(1.0 / max(z.shape[0], 1))
