"""The fused training step as one CUDA graph: captured once per batch shape (the full batches and
the last partial one) on a non-blocking stream, then replayed each step with one host call.

What the graph holds, per step: the batch's gather from the epoch's permutation (inputs and labels),
each block's ``x @ W`` (:mod:`gpunet.fast.graph_kernels`' GEMM: CuPy's cuBLAS calls raise while a
stream captures), bias + ReLU, dropout, the softmax cross-entropy with the epoch's sums, and
backward with each layer's update, in the order and with the kernels of
:class:`gpunet.fast.step.FusedStep` (the same formulas; bit-identical where the kernels are the
same, the GEMMs to float tolerance).

What changes between steps is read by the kernels from the step's scalars, a small device buffer
(uint64 slots, read as float64 where they hold a float) filled by one asynchronous copy from pinned
memory before each replay: slot 0 the batch's offset into the permutation, then each active Dropout
layer's key, then the update's scalars (SGD: lr, wd; momentum: lr, gamma, wd; any other rule: the
numbers of its ``begin_step()``, Adam's t and bias corrections and a schedule's lr included; one set
for all layers, as the optimizer has one). The host computes them as the eager
step would (the same draws, in the same order), into row ``b`` of a pinned (steps, slots) array, so
that no row is rewritten while an earlier copy may still read it (the epoch ends with a
synchronization). The epoch's loss sum and right answers are the step's own device arrays, zeroed in
place at each epoch's start; nothing is allocated while a stream captures.

The capture runs in relaxed mode: the first launch of a kernel may load its module, which the global
mode would refuse; allocations are kept out by the code itself (the fake CuPy of the tests raises on
one). Before an epoch the device is synchronized (the legacy stream's work, a restored checkpoint or
weights put back by the divergence guard, is then visible to the graph's stream), and the graphs are
captured again if any array they hold was replaced.

Data-parallel runs: the graph holds this rank's forward and backward, its gradients this rank's
share of the global batch's mean (the eager distributed step's 1 / global rows); the all-reduce
(NCCL on the graph's stream, gpunet.parallel.GradientSum) and the update (the eager step's kernels)
run after each replay, outside the graph, on the same stream. A shard's place in the global batch
keys its capture (its dropout draws start there). Not in the graph (refused by :func:`why_not`):
BatchNorm, batch transforms (augment), and everything :func:`gpunet.fast.why_not` refuses.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..backend import get_array_module
from . import cuda, graph_kernels

UPDATE_SLOTS = {"sgd": 2, "momentum": 3}  # any other rule: as many as its constants


def available() -> str | None:
    """None when this process can capture CUDA graphs (a GPU and a CuPy with stream capture), else
    why not, in words (for ``gpunet info``)."""
    from .. import backend

    if not backend.gpu_available():
        return f"no usable GPU ({backend.gpu_unavailable_reason()})"
    import cupy

    if not hasattr(cupy.cuda.Stream, "begin_capture"):
        return f"CuPy {cupy.__version__} has no stream capture (CuPy >= 10 has it)"
    return None


def why_not(net, data_x, callbacks_transform: bool) -> str | None:
    """None when a run may take the graph step, else why not (see the module docstring)."""
    if any(type(layer).__name__ == "BatchNorm" for layer in net.layers):
        return (
            "BatchNorm is not in the graph step (its statistics kernels take no scalars buffer yet)"
        )
    if net.device == "cpu":
        return "the network is on the CPU (a CUDA graph needs a GPU)"
    if callbacks_transform:
        return "a batch transform (augment) changes each batch outside the step"
    if data_x is not None and not hasattr(data_x, "raw") and not hasattr(data_x, "data"):
        return f"the training inputs are {type(data_x).__name__}, not Pixels or Rows"
    return None


def _ptr(a) -> int:
    """Where a device array's data lives (CuPy's ``data.ptr``; the fake CuPy's NumPy address)."""
    data: Any = getattr(a, "data", None)
    return data.ptr if hasattr(data, "ptr") else a.__array_interface__["data"][0]


class GraphStep:
    """``step(b) -> (mean loss as a 0-d array, logits)`` for step ``b`` of the epoch begun by
    :meth:`begin_epoch`; the rows are ``perm[b * batch_size : (b + 1) * batch_size]`` of ``data``.

    ``fused`` is the eager :class:`gpunet.fast.step.FusedStep` of the run (its blocks and optimizer,
    distributed where ``gradient_sum`` is given: :class:`gpunet.parallel.GradientSum`); ``x`` Pixels
    or Rows on the GPU, ``y`` (N,) integer labels there.
    """

    def __init__(self, fused, x, y, batch_size: int, gradient_sum=None):
        import cupy

        self.cupy, self.fused, self.blocks, self.optimizer = (
            cupy,
            fused,
            fused.blocks,
            fused.optimizer,
        )
        self.rule = "rule" if fused.per_parameter else "momentum" if fused.momentum else "sgd"
        self.x, self.y, self.batch_size, self.n = x, y, batch_size, len(x)
        self.steps = -(-self.n // batch_size)
        self.dtype = np.dtype(self.blocks[0][0].W.data.dtype)
        self.xp = get_array_module(self.blocks[0][0].W.data)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.dropouts = [block[2] for block in self.blocks if block[2] is not None]
        self.update_at = 1 + len(self.dropouts)
        self.slots = self.update_at + UPDATE_SLOTS.get(
            self.rule, len(self.optimizer.constants())
        )  # one optimizer: the same scalars for every layer
        self.device_u = self.xp.zeros(self.slots, np.uint64)
        self.device_f = self.device_u.view(np.float64)
        memory = cupy.cuda.alloc_pinned_memory(self.steps * self.slots * 8)
        self.host_u = np.frombuffer(memory, np.uint64, self.steps * self.slots).reshape(
            self.steps, self.slots
        )
        self.host_f = self.host_u.view(np.float64)
        self.perm = self.xp.arange(self.n, dtype=np.int64)
        self.loss_sum = self.xp.zeros((), np.float64)
        self.correct = self.xp.zeros((), np.int64)
        self.graphs: dict[Any, Any] = {}  # batch shape -> the captured graph
        self.buffers: dict[Any, Any] = {}
        self.captures: list[Any] = []
        self._held: tuple | None = None
        # data parallel: the graph writes this rank's share of the gradients (``fused.prescaled``);
        # the all-reduce (gradient_sum) and the update run after each replay, on the graph's stream
        self.gradient_sum, self.distributed = gradient_sum, gradient_sum is not None
        if self.distributed != bool(getattr(fused, "prescaled", False)):
            raise ValueError("gradient_sum: expected one exactly with a distributed fused step")

    # ---------------------------------------------------------- per epoch
    def held(self) -> tuple:
        """The addresses of every array a graph reads or writes that the run could replace."""
        arrays = [self.x.raw if hasattr(self.x, "raw") else self.x.data, self.y]
        for i, p in enumerate(self.optimizer.params):
            arrays += [p.data, p.grad, *self.optimizer.buffers(i)]
        return tuple(_ptr(a) for a in arrays)

    def begin_epoch(self, order, loss_sum=0.0, correct=0) -> tuple:
        """Ready the graph for an epoch: wait for the device, put the epoch's permutation ``order``
        (N,) int64 on the device (None: rows in order), set the sums to ``loss_sum``/``correct`` (a
        resumed epoch's) in place; returns the sums (0-d float64, 0-d int64 on the device)."""
        self.cupy.cuda.Device().synchronize()
        if self._held != self.held():  # weights, moments or data replaced: capture again
            self.graphs, self._held = {}, self.held()
        with self.stream:
            if order is None:
                self.perm[...] = self.xp.arange(self.n, dtype=np.int64)
            else:
                self.perm[...] = order
            self.loss_sum.fill(loss_sum)
            self.correct.fill(correct)
        return self.loss_sum, self.correct

    def finish(self) -> None:
        """Wait for the replays queued so far (at an epoch's end, or before a checkpoint
        mid-epoch)."""
        self.stream.synchronize()

    # ---------------------------------------------------------- per step
    def scalars(self, b: int, lo: int | None = None) -> np.ndarray:
        """Step ``b``'s scalars, written into row b of the pinned array as the eager step would
        compute them (the dropout keys drawn, Adam's t advanced); returns that row (uint64
        slots)."""
        u, f, t = self.host_u[b], self.host_f[b], self.dtype.type
        u[0] = b * self.batch_size if lo is None else lo
        for j, layer in enumerate(self.dropouts):
            u[1 + j] = layer.next_key() if layer.active() else 0
        opt, at = self.optimizer, self.update_at
        if self.rule == "rule":  # the optimizer's own bookkeeping (Adam's t), as the eager step's
            self.constants = opt.begin_step()  # also the eager update's after an all-reduce
            f[at:] = [t(c) for c in self.constants.values()]  # T values, exact as float64
        elif self.rule == "momentum":
            f[at:] = (t(opt.lr), t(opt.momentum), t(opt.weight_decay))
        else:
            f[at:] = (t(opt.lr), t(opt.weight_decay))
        return u

    def __call__(self, b: int, lo=None, hi=None, batch_rows=None, stop=False):
        """Step ``b`` on rows [lo, hi) of the permutation (default: the whole batch b) of a global
        batch of ``batch_rows``; ``(mean, logits, stop)``, stop True where any rank asked to."""
        lo = b * self.batch_size if lo is None else lo
        hi = min(self.n, (b + 1) * self.batch_size) if hi is None else hi
        rows, batch_rows = hi - lo, hi - lo if batch_rows is None else batch_rows
        if rows == 0:  # a rank without rows in a last batch smaller than the ranks
            return None, None, self._empty(batch_rows, stop)
        row = self.scalars(b, lo)
        key = (rows, batch_rows, lo - b * self.batch_size)  # a shard's place keys its dropout draws
        graph = self.graphs.get(key) or self._capture(key)
        self.device_u.set(row, stream=self.stream)  # one asynchronous copy from pinned memory
        graph.launch(self.stream)
        if self.distributed:
            stop = self._reduce(rows, batch_rows, stop)
        bufs = self.buffers[rows]
        return bufs["mean"], bufs["y"][-1], stop

    def _reduce(self, rows: int, batch_rows: int, stop: bool) -> bool:
        """The all-reduce of the gradients, outside the graph but on its stream (NCCL takes the
        current one), then the fused step's own update kernels, as the eager distributed step."""
        fused = self.fused
        with self.stream:
            stop = self.gradient_sum(rows, batch_rows, stop, scaled=True)
            if fused.per_parameter:  # this step's numbers, as scalars() had them of the optimizer
                fused._constants = self.constants
            for i in range(len(self.blocks) - 1, -1, -1):
                fused._apply(fused.pairs[i], fused.index[i][:2])
        return stop

    def _empty(self, batch_rows: int, stop: bool) -> bool:
        """No rows here: the keys the other ranks draw, a zero gradient into the sum, the core
        rule."""
        for layer in self.dropouts:
            if layer.active():
                layer.next_key()
        with self.stream:
            stop = self.gradient_sum(0, batch_rows, stop)
            self.optimizer.step()
        return stop

    # ---------------------------------------------------------- capture
    def _allocate(self, rows: int) -> dict:
        if rows in self.buffers:
            return self.buffers[rows]
        xp, dt, widths = self.xp, self.dtype, [block[0].W.data.shape for block in self.blocks]
        bufs = {
            "x": xp.empty((rows, widths[0][0]), dt),
            "labels": xp.empty(rows, np.int64),
            "y": [xp.empty((rows, w[1]), dt) for w in widths],
            "mask": [
                xp.empty((rows, w[1]), dt) if d is not None else None
                for w, (_, _, d, _) in zip(widths, self.blocks)
            ],
            "dx": [xp.empty((rows, w[0]), dt) for w in widths],
            "grad": xp.empty((rows, widths[-1][1]), dt),
            "mean": xp.empty((), dt),
        }
        self.buffers[rows] = bufs
        return bufs

    def _capture(self, key: tuple):
        rows, batch_rows, _ = key
        bufs = self._allocate(rows)
        mode = getattr(self.cupy.cuda.runtime, "streamCaptureModeRelaxed", None)
        with self.stream:
            self.stream.begin_capture(mode=mode)
            try:
                self._record(batch_rows, bufs)
            finally:
                graph = self.stream.end_capture()
        self.graphs[key] = graph
        self.captures.append(key)
        return graph

    def _gather(self, bufs) -> None:
        x, at_u = self.x, self.device_u
        cols = np.int32(bufs["x"].shape[1])
        if hasattr(x, "raw"):  # Pixels: uint8 rows scaled as gather_scaled does
            graph_kernels.launch(
                "gather_scaled", x.raw, self.perm, at_u, cols, self.dtype.type(x.divisor), bufs["x"]
            )
        else:
            graph_kernels.launch("gather", x.data, self.perm, at_u, cols, bufs["x"])
        graph_kernels.launch("gather_labels", self.y, self.perm, at_u, bufs["labels"])

    def _record(self, batch_rows: int, bufs) -> None:
        """The step's launches, in FusedStep's order, on buffers allocated beforehand."""
        self._gather(bufs)
        x, key = bufs["x"], 1
        for i, (linear, relu, dropout, _) in enumerate(self.blocks):
            y = graph_kernels.gemm(x, linear.W.data, bufs["y"][i])
            if relu:
                cuda.bias_relu(y, linear.b.data)
            else:
                y += linear.b.data
            if dropout is not None:
                if dropout.active():
                    graph_kernels.launch(
                        "dropout",
                        np.uint64(dropout.mask_start(y)),
                        np.uint32(dropout.threshold),
                        y.dtype.type(dropout.scale),
                        self.device_u,
                        np.int32(key),
                        y,
                        bufs["mask"][i],
                    )
                else:
                    bufs["mask"][i] = None
                key += 1
            x = y
        shard = batch_rows if self.distributed else None  # a rank's share: 1 / the global rows
        cuda.softmax_xent_sums(
            x, bufs["labels"], bufs["grad"], bufs["mean"], self.loss_sum, self.correct, rows=shard
        )
        self._backward(bufs)

    def _backward(self, bufs) -> None:
        dy, inputs = bufs["grad"], [bufs["x"]] + bufs["y"][:-1]
        for i in range(len(self.blocks) - 1, -1, -1):
            linear = self.blocks[i][0]
            if i > 0:  # the delta of the layer below, from the weights before this step's update
                dx = graph_kernels.gemm(dy, linear.W.data, bufs["dx"][i], trans_b=True)
            self._update(i, inputs[i], dy)
            if i > 0:
                relu, mask = self.blocks[i - 1][1], bufs["mask"][i - 1]
                if relu and mask is not None:
                    cuda.relu_mask_backward(dx, inputs[i], mask)
                elif mask is not None:
                    dx *= mask
                elif relu:
                    cuda.relu_backward(dx, inputs[i])
                dy = dx

    def _update(self, i, x, dy) -> None:
        (W, vW), (b, vb) = self.fused.pairs[i]
        graph_kernels.gemm(x, dy, W.grad, trans_a=True)
        rows, cols = np.int32(dy.shape[0]), np.int32(dy.shape[1])
        flat, opt, f = dy.reshape(-1), self.optimizer, self.device_f
        if self.distributed:  # the gradients only: summed over the ranks before the update
            graph_kernels.launch("bias_grad", flat, rows, cols, b.grad)
            return
        if self.rule == "rule":
            graph_kernels.launch("bias_grad", flat, rows, cols, b.grad)
            name, at = graph_kernels.rule(opt), np.int32(self.update_at)
            for k in self.fused.index[i][:2]:  # the optimizer hands its arrays to the kernel
                opt.update(k, {}, lambda w, g, *s: graph_kernels.launch(name, g, f, at, w, *s))
        elif self.rule == "momentum":
            graph_kernels.launch(
                "layer_momentum",
                flat,
                rows,
                cols,
                bool(opt.nesterov),
                f,
                np.int32(self.update_at),
                W.data,
                W.grad,
                vW,
                b.data,
                vb,
                b.grad,
            )
        else:
            graph_kernels.launch(
                "layer_sgd",
                flat,
                rows,
                cols,
                f,
                np.int32(self.update_at),
                W.data,
                W.grad,
                b.data,
                b.grad,
            )
