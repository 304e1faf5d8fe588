"""A stand-in for CuPy on the CPU that counts device launches: gpunet's GPU code path, run without a
GPU.

``FakeCupy()`` is a module object to put in ``sys.modules["cupy"]``: its arrays are a NumPy subclass
whose type lives in a module named ``cupy`` (so gpunet's backend takes them for CuPy arrays and
picks the GPU branches), and every operation that would launch work on a GPU adds one to
``launches`` (with its name in ``log``): each ufunc call (elementwise operations, reductions such as
``sum``, ``matmul``), each array function that makes or writes data (``take``, ``empty`` is free, a
copying ``ascontiguousarray``), the data-moving array methods (``argmax``, ``copy``, ``astype``,
fancy indexing, writes through ``[]=``), and each ``ElementwiseKernel``/``RawKernel`` call. Kernels
run a NumPy mirror of their CUDA source, kept below beside each kernel's name, and (where g++ and
CuPy's headers are here) the CUDA source itself, compiled for the CPU by tests/support/cuda_cpu.py,
run in three orders of threads and held to the mirror; its result is what the arrays hold
afterwards. A new kernel needs only its mirror here (CONTRIBUTING.md says how it joins).
"""

from __future__ import annotations

import threading
import time
import types

import cuda_cpu
import numpy as np

from gpunet import layers

FREE_FUNCTIONS = {
    "empty",
    "empty_like",
    "reshape",
    "ravel",
    "shape",
    "ndim",
    "result_type",
    "may_share_memory",
    "shares_memory",
    "broadcast_to",
    "transpose",
    "iscomplexobj",
    "isscalar",
    "size",
    "array_equal",
    "can_cast",
    "dtype",
}


class Counter:
    """``launches`` and their names (``log``); ``downloads``: the shapes copied to the host;
    ``reads``: ``(what, shape, thread id)`` of every read that makes the host wait for the device on
    a GPU (``float()``, ``int()``, ``bool()``, ``.item()``, ``.tolist()``, a blocking ``.get()``,
    ``asnumpy``, a stream's or an event's ``synchronize``); ``async_reads``: the non-blocking
    ``.get(blocking=False)`` copies, which do not."""

    def __init__(self):
        self.launches, self.log, self.downloads, self.reads, self.async_reads = 0, [], [], [], []
        # stream capture (see _Stream): the launches being captured (None when not capturing), one
        # entry per finished capture (its stream and launch names), graph replays, host-to-device
        # copies (stream, bytes), synchronizations, and what a capture must not do (allocate, read
        # the host)
        self.capturing, self.capture_stream, self.captures, self.replays = None, None, [], 0
        self.copies, self.syncs, self.violations = [], 0, []

    def defer(self, what, run):
        """During a capture: record ``run`` (a launch's work) for the graph's replays instead of
        running it, and return True; else False (the caller runs it now)."""
        if self.capturing is None:
            return False
        if _STREAM["current"] is not self.capture_stream:
            self.violation(f"{what} launched on another stream than the capturing one")
        self.capturing.append((what, run))
        return True

    def violation(self, what):
        """Something a CUDA graph capture cannot hold, done while capturing: recorded and raised."""
        if self.capturing is not None:
            self.violations.append(what)
            raise CaptureError(f"during stream capture: {what}")

    def add(self, what):
        self.launches += 1
        self.log.append(what)

    def read(self, what, shape=()):
        self.reads.append((what, tuple(shape), threading.get_ident()))

    def main_thread_reads(self):
        """The reads made on the main thread (the training loop's, not a background writer's)."""
        main = threading.main_thread().ident
        return [(what, shape) for what, shape, thread in self.reads if thread == main]


def _base(a):
    return a.view(np.ndarray) if isinstance(a, np.ndarray) else a


def _bases(values):
    return tuple(_base(v) for v in values)


def make_array_type(counter):
    class ndarray(np.ndarray):
        def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
            counter.add(f"{ufunc.__name__}.{method}" if method != "__call__" else ufunc.__name__)
            if out is None:
                counter.violation(f"allocation: {ufunc.__name__} without out=")
            if out is not None:
                kwargs["out"] = _bases(out)
                if counter.defer(
                    ufunc.__name__, lambda: getattr(ufunc, method)(*_bases(inputs), **kwargs)
                ):
                    return out[0] if len(out) == 1 else out
            result = getattr(ufunc, method)(*_bases(inputs), **kwargs)
            if out is not None:
                return out[0] if len(out) == 1 else out
            return _wrap(result)

        def __array_function__(self, func, types_, args, kwargs):
            name = func.__name__
            if name not in FREE_FUNCTIONS or name in ALLOCATING:
                counter.violation(f"{name} (allocates or launches outside the graph's kernels)")
            if name not in FREE_FUNCTIONS:
                counter.add(name)
            args = tuple(_bases(a) if isinstance(a, (list, tuple)) else _base(a) for a in args)
            kwargs = {k: _base(v) for k, v in kwargs.items()}
            return _wrap(func(*args, **kwargs))

        def _count(self, name, *args, **kwargs):
            counter.add(name)
            return _wrap(getattr(np.ndarray, name)(self.view(np.ndarray), *_bases(args), **kwargs))

        def argmax(self, *a, **k):
            return self._count("argmax", *a, **k)

        def copy(self, *a, **k):
            return self._count("copy", *a, **k)

        def astype(self, dtype, copy=True, **k):
            if not copy and np.dtype(dtype) == self.dtype:
                return self
            return self._count("astype", dtype, **k)

        def fill(self, value):
            counter.add("fill")
            if not counter.defer("fill", lambda: self.view(np.ndarray).fill(value)):
                self.view(np.ndarray).fill(value)

        def set(self, arr, stream=None):  # CuPy's copy from the host (asynchronous on a stream)
            counter.violation("a host-to-device copy")
            counter.copies.append((stream, np.array(arr)))  # what was copied, for tests
            self.view(np.ndarray)[...] = np.asarray(arr).reshape(self.shape)

        def get(self, stream=None, order="C", out=None, blocking=True):  # CuPy's copy to the host
            counter.violation("a host read (get)")
            counter.downloads.append(self.shape)  # the shapes copied, for tests
            if blocking:
                counter.read("get", self.shape)
            else:
                counter.async_reads.append(self.shape)
            if out is not None:
                out[...] = self.view(np.ndarray)
                return out
            return np.array(self.view(np.ndarray))

        def __getitem__(self, key):
            if isinstance(key, np.ndarray) or (
                isinstance(key, tuple) and any(isinstance(k, np.ndarray) for k in key)
            ):
                counter.add("gather")
            result = self.view(np.ndarray)[_base(key) if isinstance(key, np.ndarray) else key]
            return _wrap(result)

        def __setitem__(self, key, value):
            counter.add("setitem")
            if not counter.defer(
                "setitem", lambda: self.view(np.ndarray).__setitem__(key, _base(value))
            ):
                self.view(np.ndarray)[key] = _base(value)

        def _read(self, what, convert):  # a read the host waits for (and a capture cannot hold)
            counter.violation(f"a host read ({what})")
            counter.read(what, self.shape)
            return convert(self.view(np.ndarray))

        def __float__(self):
            return self._read("float", float)

        def __int__(self):
            return self._read("int", int)

        def __bool__(self):
            return self._read("bool", bool)

        def __index__(self):
            return self._read("index", lambda a: a.__index__())

        def item(self, *args):
            return self._read("item", lambda a: a.item(*args))

        def tolist(self):
            return self._read("tolist", lambda a: a.tolist())

        @property
        def device(self):
            return _Device()

    ndarray.__module__ = "cupy._core.core"
    return ndarray


_ARRAY_TYPE = {}


def _wrap(result):
    cls = _ARRAY_TYPE.get("cls")
    if isinstance(
        result, np.generic
    ):  # CuPy's reductions and elementwise results stay 0-d device arrays
        return np.asarray(result).view(cls)
    if isinstance(result, np.ndarray) and not isinstance(result, cls):
        return result.view(cls)
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    return result


# ----------------------------------------------------------- NumPy mirrors of gpunet's CUDA kernels
def _decayed(g, wd, w):
    """The update kernels' gradient: the L2 term only where weight decay is on (as the core's)."""
    return g + wd * w if wd != 0 else g


def _rows_sum(dy, rows, cols):
    """The column sums of dy in the order of a serial loop over the rows (axis-0 sums add the rows
    one after another), as the graph step's elementwise bias sums run."""
    return dy.reshape(rows, cols).sum(axis=0, dtype=dy.dtype)


def _block_sum(dy, rows, cols):
    """The column sums of dy in the order of the layer-update RawKernel's block-wide reduction
    (gpunet/fast/cuda.py LAYER_UPDATE, groups = LAYER_THREADS / LAYER_COLUMNS): row group k adds
    rows k, k + groups, ... one after another, then the groups' sums are added as a tree (k += k +
    groups / 2, ..., k += k + 1), so that the mirror has the kernel's bits, cancellation
    included."""
    from gpunet.fast import cuda

    groups = cuda.LAYER_THREADS // cuda.LAYER_COLUMNS
    flat, part = dy.reshape(rows, cols), np.zeros((groups, cols), dy.dtype)
    for r in range(0, rows, groups):
        chunk = flat[r : r + groups]
        part[: len(chunk)] += chunk
    k = groups // 2
    while k:
        part[:k] += part[k : 2 * k]
        k //= 2
    return part[0]


def _layer_update(
    dy, rows, cols, lr, gamma, wd, nesterov, w, g, v, b, vb, gb, column_sum=_rows_sum
):
    d = _decayed(g, wd, w)
    v[...] = gamma * v + lr * d
    w -= gamma * v + lr * d if nesterov else v
    gb[...] = column_sum(dy, rows, cols)
    db = _decayed(gb, wd, b)
    vb[...] = gamma * vb + lr * db
    b -= gamma * vb + lr * db if nesterov else vb


def _layer_sgd(dy, rows, cols, lr, wd, w, g, b, gb, column_sum=_rows_sum):
    w -= lr * _decayed(g, wd, w)
    gb[...] = column_sum(dy, rows, cols)
    b -= lr * _decayed(gb, wd, b)


def _dropout(key, start, threshold, scale, y, mask):
    kept = layers.dropout_bits(np, int(key), y.size, int(start)).reshape(y.shape) < threshold
    mask[...] = kept * scale
    y *= mask


def _layer_given(lr, gamma, wd, nesterov, *triples):
    for w, g, v in triples:
        d = _decayed(g, wd, w)
        v[...] = gamma * v + lr * d
        w -= gamma * v + lr * d if nesterov else v


def _layer_sgd_given(cols, lr, wd, w, g, b, gb):
    w -= lr * _decayed(g, wd, w)
    b -= lr * _decayed(gb, wd, b)


def _batch_norm_apply(b, mu, inv_sigma, gamma, beta, cols, relu, y, xhat):
    xhat[...] = ((y + b) - mu) * inv_sigma
    o = gamma * xhat + beta
    y[...] = np.where(o < 0, o.dtype.type(0), o) if relu else o


def _relu_where(y, t):
    return np.where(y > 0, t, t * y.dtype.type(0))


MIRRORS = {
    "gpunet_probe": lambda x: 2 * x + 1,  # its output is allocated by the kernel: returned
    "gpunet_bias_relu": lambda b, y: y.__setitem__(
        ..., np.where(y + b < 0, y.dtype.type(0), y + b)
    ),
    "gpunet_relu_backward": lambda y, dy: dy.__setitem__(..., _relu_where(y, dy)),
    "gpunet_relu_mask_backward": lambda y, mask, dy: dy.__setitem__(..., _relu_where(y, dy * mask)),
    "gpunet_dropout": _dropout,
    "gpunet_layer_momentum_given": lambda cols, lr, gamma, wd, nesterov, w, g, v, b, vb, gb: (
        _layer_given(lr, gamma, wd, nesterov, (w, g, v), (b, gb, vb))
    ),
    "gpunet_layer_sgd_given": _layer_sgd_given,
    "gpunet_batch_norm_apply": _batch_norm_apply,
    "gpunet_gather_scaled": lambda src, idx, cols, divisor, out: out.__setitem__(
        ..., np.divide(src[idx], divisor, dtype=out.dtype)
    ),
}


def _rows_at(perm, u, n):
    """The graph step's batch: n entries of the permutation from the offset in scalar slot 0."""
    return perm[int(u[0]) : int(u[0]) + n]


def _read(f, at, count, like):
    """Slots at..at+count-1 of the graph step's float64 scalars, cast to ``like``'s dtype."""
    return [like.dtype.type(f[int(at) + k]) for k in range(count)]


MIRRORS.update(
    {  # the graph step's variants (gpunet/fast/graph_kernels.py): the eager mirrors, reading
        # their per-step scalars from the device buffer
        "gpunet_graph_gather_scaled": lambda src, perm, u, cols, divisor, out: out.__setitem__(
            ..., np.divide(src[_rows_at(perm, u, out.shape[0])], divisor, dtype=out.dtype)
        ),
        "gpunet_graph_gather": lambda src, perm, u, cols, out: out.__setitem__(
            ..., src[_rows_at(perm, u, out.shape[0])]
        ),
        "gpunet_graph_gather_labels": lambda y, perm, u, out: out.__setitem__(
            ..., y[_rows_at(perm, u, out.size)]
        ),
        "gpunet_graph_bias_grad": lambda dy, rows, cols, gb: gb.__setitem__(
            ..., dy.reshape(rows, cols).sum(axis=0, dtype=gb.dtype)
        ),
        "gpunet_graph_layer_sgd": lambda dy, rows, cols, f, at, w, g, b, gb: _layer_sgd(
            dy, rows, cols, *_read(f, at, 2, w), w, g, b, gb
        ),
        "gpunet_graph_layer_momentum": lambda dy, rows, cols, nesterov, f, at, w, g, v, b, vb, gb: (
            _layer_update(dy, rows, cols, *_read(f, at, 3, w), nesterov, w, g, v, b, vb, gb)
        ),
        "gpunet_graph_dropout": lambda start, threshold, scale, u, at, y, mask: _dropout(
            u[int(at)], start, threshold, scale, y, mask
        ),
    }
)


def _rule_mirrors():
    """The mirror of each optimizer rule's kernel (gpunet.fast.rules), eager and graph (its scalars
    read from the step's buffer): the core's rule itself, on NumPy arrays."""
    from gpunet.fast import rules

    for name, opt in rules.examples().items():
        run, count = rules.mirror(opt), len(opt.constants())
        MIRRORS[name] = run
        MIRRORS["gpunet_graph_" + name[len("gpunet_") :]] = (
            lambda g, f, at, w, *s, run=run, count=count: run(g, *_read(f, at, count, w), w, *s)
        )


def _softmax_rows(z, labels, grad, inv_n):
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(z))
    grad[...] = e / s
    grad[rows, labels] -= 1
    grad *= inv_n
    return (np.log(s[:, 0]) + m[:, 0] - z[rows, labels]).astype(z.dtype)


def _softmax_xent(z, labels, grad, loss, n, c, inv_n):
    loss[...] = _softmax_rows(z, labels, grad, inv_n)


def _softmax_xent_sums(z, labels, grad, mean, loss_sum, correct, n, c, inv_n):
    rows = _softmax_rows(z, labels, grad, inv_n)
    mean[...] = rows.astype(np.float64).sum() * float(inv_n)
    loss_sum += rows.astype(np.float64).sum()
    correct += (z.argmax(axis=1) == labels).sum()


def _resample(images, maps, fields, out, b, h, w, elastic):
    """gpunet_resample pixel by pixel, as its source reads (not through gpunet.augment's core)."""
    t = images.dtype.type
    i, j = np.divmod(np.arange(h * w), w)
    cr, cc = t(0.5) * t(h - 1), t(0.5) * t(w - 1)
    dr, dc = i.astype(images.dtype) - cr, j.astype(images.dtype) - cc
    m = maps.reshape(b, 6)
    r = m[:, 0:1] * dr + m[:, 1:2] * dc + m[:, 2:3] + cr
    c = m[:, 3:4] * dr + m[:, 4:5] * dc + m[:, 5:6] + cc
    if elastic:
        f = fields.reshape(b, 2, w * h)
        r += f[:, 0, j * h + i]
        c += f[:, 1, j * h + i]
    r, c = np.clip(r, t(-1), t(h)), np.clip(c, t(-1), t(w))
    r0, c0 = np.floor(r), np.floor(c)
    fr, fc = r - r0, c - c0
    ri, ci = r0.astype(np.int64), c0.astype(np.int64)
    flat = images.reshape(b, h * w)

    def pixel(rr, cc_):
        inside = (rr >= 0) & (rr < h) & (cc_ >= 0) & (cc_ < w)
        return np.where(
            inside, np.take_along_axis(flat, np.where(inside, rr * w + cc_, 0), 1), t(0)
        )

    v00, v01, v10, v11 = pixel(ri, ci), pixel(ri, ci + 1), pixel(ri + 1, ci), pixel(ri + 1, ci + 1)
    top = v00 + fc * (v01 - v00)
    bottom = v10 + fc * (v11 - v10)
    out[...] = (top + fr * (bottom - top)).reshape(out.shape)


def _batch_norm_stats(
    z, b, mu, inv_sigma, running_mean, running_var, n, f, momentum, keep, unbiased, eps
):
    y = z + b
    mean = y.sum(axis=0) / y.dtype.type(n)
    var = ((y - mean) ** 2).sum(axis=0) / y.dtype.type(n)
    running_mean[...] = running_mean * keep + momentum * mean
    running_var[...] = running_var * keep + unbiased * var
    mu[...] = mean
    inv_sigma[...] = y.dtype.type(1) / np.sqrt(var + eps)


def _batch_norm_backward(dy, y, mask, xhat, gamma, inv_sigma, dgamma, dbeta, n, f, has_mask, relu):
    d = dy * mask if has_mask else dy.copy()
    if relu:
        d = _relu_where(y, d)
    dbeta[...] = d.sum(axis=0)
    dgamma[...] = (d * xhat).sum(axis=0)
    t = dy.dtype.type
    dy[...] = (gamma * inv_sigma * (t(1) / t(n))) * (t(n) * d - dbeta - xhat * dgamma)


def _gemm(trans_a, trans_b):
    """The graph step's GEMM (gpunet/fast/graph_kernels.py): c = op(a) @ op(b), accumulated in the
    arrays' dtype as the kernel does."""

    def mirror(a, b, c, m, n, k):
        a2 = a.reshape((k, m) if trans_a else (m, k))
        b2 = b.reshape((n, k) if trans_b else (k, n))
        left, right = a2.T if trans_a else a2, b2.T if trans_b else b2
        with np.errstate(all="ignore"):
            out = np.matmul(left, right)
            if not np.isfinite(out).all():  # overflow, inf or NaN: which of inf and NaN comes out
                # depends on the order of the sum: the kernel's, k ascending in one accumulator
                out = np.zeros_like(out)
                for j in range(left.shape[1]):
                    out += left[:, j : j + 1] * right[j : j + 1, :]
        c[...] = out.reshape(c.shape)

    return mirror


def _layer_momentum(w, g, v, b, vb, gb, dy, rows, cols, size, lr, gamma, wd, nesterov):
    """gpunet_layer_momentum's mirror, in the RawKernel's parameter order."""
    return _layer_update(
        dy, rows, cols, lr, gamma, wd, bool(nesterov), w, g, v, b, vb, gb, _block_sum
    )


RAW_MIRRORS = {
    "gpunet_softmax_xent": _softmax_xent,
    "gpunet_softmax_xent_sums": _softmax_xent_sums,
    "gpunet_resample": _resample,
    "gpunet_batch_norm_stats": _batch_norm_stats,
    "gpunet_batch_norm_backward": _batch_norm_backward,
    "gpunet_gemm_nn": _gemm(False, False),
    "gpunet_gemm_nt": _gemm(False, True),
    "gpunet_gemm_tn": _gemm(True, False),
    # the layer-update RawKernels' parameter order (gpunet/fast/cuda.py LAYER_UPDATE)
    "gpunet_layer_momentum": _layer_momentum,
    "gpunet_layer_sgd": lambda w, g, b, gb, dy, rows, cols, size, lr, wd: _layer_sgd(
        dy, rows, cols, lr, wd, w, g, b, gb, _block_sum
    ),
}


def _keep(ran, outputs):
    """The CUDA source's results (tests/support/cuda_cpu.py) written into the launch's arrays (the
    mirror's output included), so that what follows, and the tests' comparisons with the core, see
    what the CUDA code computed."""
    for got, array in zip(ran, outputs):
        if got is not None and isinstance(array, np.ndarray) and array.flags.writeable:
            array[...] = got


class FakeCupy(types.ModuleType):
    """The stand-in module (see the module docstring); ``counter.launches`` counts."""

    def __init__(self):
        super().__init__("cupy")
        self.counter = counter = Counter()
        self.ndarray = cls = make_array_type(counter)
        _ARRAY_TYPE["cls"] = cls
        self.__version__ = "fake"
        _STREAM["counter"] = counter
        _STREAM["current"] = _STREAM["null"] = _Stream(null=True)
        self.cuda = types.SimpleNamespace(
            Device=lambda i=None: _Device(),
            get_current_stream=lambda: _STREAM["current"],
            Event=_Event,
            runtime=types.SimpleNamespace(
                getDeviceCount=lambda: 1,
                streamCaptureModeGlobal=0,
                streamCaptureModeThreadLocal=1,
                streamCaptureModeRelaxed=2,
            ),
            alloc_pinned_memory=lambda size: bytearray(size),
            Stream=_Stream,
            get_elapsed_time=lambda start, end: (end.at - start.at) * 1e3,
        )

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value

        def call(*args, **kwargs):
            if name not in FREE_FUNCTIONS or name in ALLOCATING:
                self.counter.violation(
                    f"cupy.{name} (allocates or launches outside the graph's kernels)"
                )
            if name not in FREE_FUNCTIONS:
                self.counter.add(name)
            return _wrap(
                value(*(_base(a) for a in args), **{k: _base(v) for k, v in kwargs.items()})
            )

        return call

    def asarray(self, a, dtype=None):
        if isinstance(a, self.ndarray) and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        self.counter.violation("an upload (asarray)")
        self.counter.add("upload")
        return np.array(_base(a), dtype=dtype).view(self.ndarray)

    def ascontiguousarray(self, a, dtype=None):
        if (
            isinstance(a, self.ndarray)
            and a.flags.c_contiguous
            and (dtype is None or np.dtype(dtype) == a.dtype)
        ):
            return a
        self.counter.violation("a copy (ascontiguousarray)")
        self.counter.add("ascontiguousarray")
        return np.ascontiguousarray(_base(a), dtype=dtype).view(self.ndarray)

    def asnumpy(self, a):
        self.counter.violation("a host read (asnumpy)")
        if isinstance(a, self.ndarray):
            self.counter.downloads.append(a.shape)
            self.counter.read("asnumpy", a.shape)
        return np.array(_base(a))

    def ElementwiseKernel(self, in_params, out_params, operation, name, **kwargs):
        if name not in MIRRORS:  # an optimizer's rule kernel: its mirror is the core's rule itself
            _rule_mirrors()
        spec, mirror = (in_params, out_params, operation, name), MIRRORS[name]
        counter = self.counter

        def launch(*args):
            counter.add(name)
            if counter.capturing is not None and len(args) == len(spec[0].split(",")):
                counter.violation(f"allocation: {name} without its outputs")
            if counter.defer(name, lambda: run(*args)):
                return args[-1]
            return run(*args)

        def run(*args):
            args = [_base(a) for a in args]
            ran = (
                cuda_cpu.elementwise(spec + ((kwargs,) if kwargs else ()), args)
                if cuda_cpu.enabled()
                else None
            )
            made = mirror(*args)
            if ran is not None:
                outputs = args + ([] if made is None else [made])
                names = [p.strip().split()[-1] for p in (in_params + "," + out_params).split(",")]
                cuda_cpu.compare(name, names, ran, outputs)
                _keep(ran, outputs)
            return _wrap(args[-1]) if made is None else _wrap(made)

        return launch

    def RawKernel(self, source, name, **kwargs):
        mirror, counter = RAW_MIRRORS[name], self.counter

        def launch(grid, block, args):
            counter.add(name)
            if not counter.defer(name, lambda: run(grid, block, args)):
                run(grid, block, args)

        def run(grid, block, args):
            args = [_base(a) for a in args]
            ran = (
                cuda_cpu.raw_kernel(source, name, grid, block, args) if cuda_cpu.enabled() else None
            )
            mirror(*args)
            if ran is not None:
                cuda_cpu.compare(name, [str(k) for k in range(len(args))], ran, args)
                _keep(ran, args)

        return launch


class _Device:
    """Device 0, the only one; ``entered`` counts the ``with`` blocks made current on it."""

    id, entered = 0, []

    def use(self):
        pass

    def synchronize(self):
        _STREAM["counter"].violation("a device synchronization")
        _STREAM["counter"].syncs += 1

    def __enter__(self):
        _Device.entered.append(threading.get_ident())
        return self

    def __exit__(self, *exc):
        return False


class _Event:
    """CuPy's Event; ``record`` notes the host's clock (the fake runs every launch at once), which
    ``get_elapsed_time`` reports in ms, as CuPy's does the device's; ``synchronize`` makes the host
    wait for the work before it (a read, counted)."""

    at = None

    def record(self, stream=None):
        self.at = time.perf_counter()

    def synchronize(self):
        _STREAM["counter"].read("event.synchronize")


# -------------------------------------------------------------------------- streams and CUDA graphs
ALLOCATING = {"empty", "empty_like"}  # free of launches, but an allocation: not inside a capture
_STREAM = {}  # the counter, the null (legacy default) stream and the current one


class CaptureError(RuntimeError):
    """A capture did what a CUDA graph cannot hold (allocate, read the host, copy, synchronize)."""


class _Stream:
    """CuPy's Stream: ``with stream:`` makes it current; ``begin_capture``/``end_capture`` record
    the launches made on it meanwhile (not run) into a :class:`_Graph`. As CuPy, the null stream
    refuses to capture; every capture is kept in ``counter.captures`` as (stream, mode, launch
    names)."""

    def __init__(self, null=False, non_blocking=False, ptr=None):
        self.null, self.non_blocking, self.ptr, self._outer = (
            null,
            non_blocking,
            0 if null else id(self),
            [],
        )
        self.mode = None

    def __enter__(self):
        self._outer.append(_STREAM["current"])
        _STREAM["current"] = self
        return self

    def __exit__(self, *exc):
        _STREAM["current"] = self._outer.pop()
        return False

    def use(self):
        _STREAM["current"] = self
        return self

    def synchronize(self):
        counter = _STREAM["counter"]
        counter.violation("a stream synchronization")
        counter.syncs += 1
        counter.read("stream.synchronize")

    def is_capturing(self):
        return _STREAM["counter"].capture_stream is self

    def begin_capture(self, mode=None):
        counter = _STREAM["counter"]
        if self.null:
            raise RuntimeError(
                "cudaErrorStreamCaptureUnsupported: the legacy default stream cannot capture"
            )
        if counter.capturing is not None:
            raise RuntimeError("a capture is already running")
        counter.capturing, counter.capture_stream, self.mode = [], self, mode

    def end_capture(self):
        counter = _STREAM["counter"]
        if counter.capture_stream is not self:
            raise RuntimeError("end_capture on a stream that is not capturing")
        work, counter.capturing, counter.capture_stream = counter.capturing, None, None
        counter.captures.append((self, self.mode, [name for name, _ in work]))
        return _Graph(work)


class _Graph:
    """A captured graph: ``launch(stream)`` runs its recorded work in order, one host call (counted
    as one launch named ``graph``, and in ``counter.replays``)."""

    def __init__(self, work):
        self.work = work

    def launch(self, stream=None):
        counter = _STREAM["counter"]
        counter.violation("a graph launch")
        counter.add("graph")
        counter.replays += 1
        for _, run in self.work:
            run()
