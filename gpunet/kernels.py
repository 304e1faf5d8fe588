"""Fused elementwise steps: a CuPy kernel for the GPU and a plain ``xp`` twin for both devices.

Each public function works in place on its arrays and picks the CUDA kernel when the arrays are CuPy
arrays and fused kernels are enabled (``GPUNET_FUSED=0`` disables them), else the twin. The twins are
the reference: tests check that kernel and twin agree. Kernels are compiled once, on first use, and
cached (CuPy also caches the binaries on disk).

Why fuse: on a GPU each elementwise operation is a kernel launch that reads and writes the whole array;
for MNIST-sized layers the launches, not the arithmetic, dominate. On the CPU the twins use ``out=`` so
no temporaries are allocated.
"""
from __future__ import annotations

import functools
import os

from .backend import get_array_module

ENABLED = os.environ.get("GPUNET_FUSED", "1") != "0"


def _fused(a) -> bool:
    return ENABLED and get_array_module(a).__name__ == "cupy"


# --- bias + ReLU: y = max(y + b, 0) ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bias_relu_kernel():
    import cupy

    return cupy.ElementwiseKernel("T b", "T y", "y = max(y + b, (T)0)", "gpunet_bias_relu")


def bias_relu_xp(y, b):
    """Twin: ``y = max(y + b, 0)`` in place; y (N, C), b (C,)."""
    xp = get_array_module(y)
    y += b
    xp.maximum(y, 0, out=y)
    return y


def bias_relu(y, b):
    """``y = max(y + b, 0)`` in place (one launch on the GPU); returns y."""
    if _fused(y):
        return _bias_relu_kernel()(b, y)
    return bias_relu_xp(y, b)


# --- ReLU backward: dy = dy * (y > 0) ----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _relu_backward_kernel():
    import cupy

    return cupy.ElementwiseKernel("T y", "T dy", "dy = y > (T)0 ? dy : (T)0", "gpunet_relu_backward")


def relu_backward_xp(dy, y):
    """Twin: ``dy *= (y > 0)`` in place. ``y`` is the ReLU output: y > 0 exactly where x > 0."""
    xp = get_array_module(dy)
    xp.multiply(dy, y > 0, out=dy)
    return dy


def relu_backward(dy, y):
    """``dy *= (y > 0)`` in place; returns dy."""
    if _fused(dy):
        return _relu_backward_kernel()(y, dy)
    return relu_backward_xp(dy, y)


# --- softmax cross-entropy, forward and gradient in one pass -----------------------------------------

_XENT_SRC = r"""
extern "C" __global__ void gpunet_softmax_xent(const T* z, const long long* y, T* grad, T* loss,
                                                 const int n, const int c, const T inv_n) {
    // One thread per row: MNIST has 10 classes, so a row fits in registers and caches.
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const T* zi = z + (long long)i * c;
    T* gi = grad + (long long)i * c;
    T m = zi[0];
    for (int j = 1; j < c; ++j) m = zi[j] > m ? zi[j] : m;
    T s = 0;
    for (int j = 0; j < c; ++j) { T e = exp(zi[j] - m); gi[j] = e; s += e; }
    const long long t = y[i];
    const T inv_s = (T)1 / s;
    for (int j = 0; j < c; ++j) gi[j] = (gi[j] * inv_s - (j == t ? (T)1 : (T)0)) * inv_n;
    loss[i] = log(s) + m - zi[t];
}
"""


@functools.lru_cache(maxsize=None)
def _xent_kernel(ctype: str):
    import cupy

    return cupy.RawKernel(f"typedef {ctype} T;\n" + _XENT_SRC, "gpunet_softmax_xent")


def softmax_xent_xp(z, labels, grad, loss_rows):
    """Twin: per-row loss ``logsumexp(z) - z[label]`` and ``grad = (softmax(z) - onehot) / N``.

    z (N, C) float; labels (N,) int64; grad (N, C) and loss_rows (N,) are written.
    """
    xp = get_array_module(z)
    n = z.shape[0]
    rows = xp.arange(n)
    m = z.max(axis=1, keepdims=True)
    xp.subtract(z, m, out=grad)
    xp.exp(grad, out=grad)
    s = grad.sum(axis=1, keepdims=True)
    # loss = log(sum exp(z - m)) + m - z[label]: stable log-sum-exp, never exp of a large number
    xp.log(s[:, 0], out=loss_rows)
    loss_rows += m[:, 0]
    loss_rows -= z[rows, labels]
    grad /= s
    grad[rows, labels] -= 1
    grad *= grad.dtype.type(1.0 / n)
    return grad, loss_rows


def softmax_xent(z, labels, grad, loss_rows):
    """Fused softmax cross-entropy (see :func:`softmax_xent_xp`); one launch on the GPU."""
    if _fused(z) and z.dtype.kind == "f" and z.flags.c_contiguous:
        import cupy

        ctype = {"float32": "float", "float64": "double"}[z.dtype.name]
        n, c = z.shape
        threads = 128
        blocks = (n + threads - 1) // threads
        _xent_kernel(ctype)(
            (blocks,), (threads,),
            (z, labels.astype(cupy.int64, copy=False), grad, loss_rows,
             cupy.int32(n), cupy.int32(c), z.dtype.type(1.0 / n)),
        )
        return grad, loss_rows
    return softmax_xent_xp(z, labels, grad, loss_rows)


# --- momentum update of every parameter at once, over one flat buffer --------------------------------

@functools.lru_cache(maxsize=None)
def _momentum_kernel():
    import cupy

    return cupy.ElementwiseKernel(
        "T g, T lr, T gamma, T wd, bool nesterov",
        "T w, T v",
        """
        T d = g + wd * w;
        v = gamma * v + lr * d;
        w -= nesterov ? gamma * v + lr * d : v;
        """,
        "gpunet_momentum",
    )


def momentum_update_xp(w, g, v, lr, gamma, wd, nesterov, tmp):
    """Twin of the notes' rule ``v = gamma*v + lr*(g + wd*w); w -= v`` (Nesterov: ``w -= gamma*v + lr*d``).

    All arrays share shape and dtype; ``tmp`` is scratch space of the same shape. Scalars must already
    have the arrays' dtype so that nothing is promoted.
    """
    xp = get_array_module(w)
    if wd:
        xp.multiply(w, wd, out=tmp)
        tmp += g
        tmp *= lr                  # tmp = lr * d
    else:
        xp.multiply(g, lr, out=tmp)
    v *= gamma
    v += tmp
    if nesterov:                   # w -= gamma*v + lr*d, without a temporary
        w -= tmp
        xp.multiply(v, gamma, out=tmp)
        w -= tmp
    else:
        w -= v
    return w, v


def momentum_update(w, g, v, lr, gamma, wd, nesterov, tmp):
    """Momentum step over flat buffers, in place; one launch on the GPU, all cores on the CPU."""
    if _fused(w):
        _momentum_kernel()(g, lr, gamma, wd, bool(nesterov), w, v)
        return w, v
    split(lambda w_, g_, v_, t_: momentum_update_xp(w_, g_, v_, lr, gamma, wd, nesterov, t_), w, g, v, tmp)
    return w, v


# --- CPU: one elementwise twin over flat buffers, split across cores ----------------------------------

_CPU_THREADS = max(1, min(4, int(os.environ.get("GPUNET_CPU_THREADS", os.cpu_count() or 1))))
_MIN_CHUNK = 1 << 17  # below ~128k elements a thread hand-off costs more than it saves
_pool = None


def split(fn, *arrays):
    """Run ``fn(*chunks)`` on equal slices of the 1-D ``arrays`` across CPU threads.

    NumPy ufuncs release the GIL, so the slices run in parallel; elementwise work over a whole parameter
    buffer (about 0.7M floats for 784-512-512-10) is then bounded by memory bandwidth, not by one core.
    """
    global _pool
    n = arrays[0].shape[0]
    parts = min(_CPU_THREADS, n // _MIN_CHUNK)
    if parts < 2 or get_array_module(arrays[0]).__name__ != "numpy":
        return fn(*arrays)
    if _pool is None:
        from concurrent.futures import ThreadPoolExecutor

        _pool = ThreadPoolExecutor(max_workers=parts - 1, thread_name_prefix="gpunet-cpu")
    bounds = [n * i // parts for i in range(parts + 1)]
    chunks = [tuple(a[bounds[i]:bounds[i + 1]] for a in arrays) for i in range(parts)]
    futures = [_pool.submit(fn, *c) for c in chunks[1:]]
    fn(*chunks[0])
    for f in futures:
        f.result()
