"""Fused elementwise steps: a CuPy kernel for the GPU, a compiled CPU kernel, and a plain ``xp`` twin.

Each public function works in place on its arrays. It picks the CUDA kernel for CuPy arrays, the numba
kernel of :mod:`gpunet.cpu_kernels` for contiguous NumPy arrays when numba is installed, else the twin.
``GPUNET_FUSED=0`` turns both kinds of kernel off (``GPUNET_NUMBA=0`` only the CPU ones). The twins are
the reference: tests check that each kernel and its twin agree. Kernels are compiled once, on first use,
and cached on disk (by CuPy and by numba).

Why fuse: on a GPU each elementwise operation is a kernel launch that reads and writes the whole array;
for MNIST-sized layers the launches, not the arithmetic, dominate. On the CPU each NumPy call costs a few
microseconds and a pass over the array; the twins at least use ``out=`` so no temporaries are allocated.
The optimizers' parameter updates go through BLAS calls on NumPy's own OpenBLAS when NumPy ships one
(:mod:`gpunet.blas`; ``GPUNET_CPU_BLAS=0`` disables that; tests check it against the twin too).
"""
from __future__ import annotations

import functools
import os

import numpy as _np

from . import blas
from .backend import get_array_module

ENABLED = os.environ.get("GPUNET_FUSED", "1") != "0"


def _fused(a) -> bool:
    return ENABLED and get_array_module(a).__name__ == "cupy"


_numba_why = []  # why the compiled CPU kernels are off, once known


@functools.lru_cache(maxsize=None)
def _numba_kernels():
    """The module of compiled CPU kernels (:mod:`gpunet.cpu_kernels`), or None without numba."""
    if os.environ.get("GPUNET_NUMBA", "1") == "0":
        _numba_why.append("GPUNET_NUMBA=0")
        return None
    try:
        from . import cpu_kernels
    except ImportError as exc:  # numba missing: the NumPy twins serve
        _numba_why.append(f"{type(exc).__name__}: {exc}; pip install 'gpunet[numba]' for compiled ones")
        return None
    except Exception as exc:  # numba unusable here, e.g. no writable folder for its on-disk cache
        hint = "; set NUMBA_CACHE_DIR to a writable folder" if "cannot cache" in str(exc) else ""
        _numba_why.append(f"{type(exc).__name__}: {exc}{hint}")
        return None
    return cpu_kernels


def cpu_kernels_status() -> str:
    """Which elementwise kernels the CPU runs, in words (``gpunet info`` prints it)."""
    if not ENABLED:
        return "NumPy twins (GPUNET_FUSED=0)"
    if _numba_kernels() is None:
        return f"NumPy twins ({_numba_why[-1]})"
    import numba

    return f"compiled with numba {numba.__version__}"


def _compiled(*arrays):
    """The compiled CPU kernels, if they apply: NumPy arrays, C-contiguous, one float dtype."""
    if not ENABLED:
        return None
    dtype = arrays[0].dtype
    for a in arrays:
        if type(a) is not _np.ndarray or not a.flags.c_contiguous or a.dtype != dtype:
            return None
    return _numba_kernels() if dtype.char in "fd" else None


# --- bias + ReLU: y = max(y + b, 0) ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bias_relu_kernel():
    import cupy

    return cupy.ElementwiseKernel("T b", "T y", "T t = y + b; y = t > (T)0 ? t : (T)0;", "gpunet_bias_relu")


def relu_xp(y):
    """``y = max(y, 0)`` in place, any shape; returns y."""
    xp = get_array_module(y)
    # against a zero row, not the scalar 0: NumPy's loop for a scalar operand of ``maximum`` is not
    # vectorised and measured 3-4x slower here (55 us vs 19 us for 128 x 512 float32 on NumPy 2.4)
    return xp.maximum(y, xp.zeros(y.shape[-1:], dtype=y.dtype), out=y)


def bias_relu_xp(y, b):
    """Twin: ``y = max(y + b, 0)`` in place; y (N, C), b (C,)."""
    y += b
    return relu_xp(y)


def bias_relu(y, b):
    """``y = max(y + b, 0)`` in place (one launch on the GPU, one compiled pass on the CPU); returns y."""
    if _fused(y):
        return _bias_relu_kernel()(b, y)
    compiled = _compiled(y, b) if y.ndim == 2 else None
    if compiled is not None:
        compiled.bias_relu(y, b)
        return y
    return bias_relu_xp(y, b)


# --- ReLU backward: dy = dy * (y > 0) ----------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _relu_backward_kernel():
    import cupy

    return cupy.ElementwiseKernel("T y", "T dy", "dy = y > (T)0 ? dy : (T)0;", "gpunet_relu_backward")


def relu_backward_xp(dy, y):
    """Twin: ``dy *= (y > 0)`` in place. ``y`` is the ReLU output: y > 0 exactly where x > 0."""
    xp = get_array_module(dy)
    xp.multiply(dy, y > 0, out=dy)
    return dy


def relu_backward(dy, y):
    """``dy *= (y > 0)`` in place; returns dy."""
    if _fused(dy):
        return _relu_backward_kernel()(y, dy)
    compiled = _compiled(dy, y) if dy.ndim == 2 and dy.shape == y.shape else None
    if compiled is not None:
        compiled.relu_backward(dy, y)
        return dy
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
    for (int j = 0; j < c; ++j) { T e = EXP(zi[j] - m); gi[j] = e; s += e; }
    const long long t = y[i];
    const T inv_s = (T)1 / s;
    for (int j = 0; j < c; ++j) gi[j] = (gi[j] * inv_s - (j == t ? (T)1 : (T)0)) * inv_n;
    loss[i] = LOG(s) + m - zi[t];
}
"""


@functools.lru_cache(maxsize=None)
def _xent_kernel(ctype: str):
    import cupy

    # expf/logf for float, exp/log for double: no reliance on C++ overloads under NVRTC
    fn = {"float": ("expf", "logf"), "double": ("exp", "log")}[ctype]
    head = f"typedef {ctype} T;\n#define EXP {fn[0]}\n#define LOG {fn[1]}\n"
    return cupy.RawKernel(head + _XENT_SRC, "gpunet_softmax_xent")


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
    inv_n = grad.dtype.type(1.0 / n)
    s = xp.reciprocal(s, out=s)
    s *= inv_n
    grad *= s                      # softmax / N in one pass
    grad[rows, labels] -= inv_n    # minus onehot / N
    return grad, loss_rows


def softmax_xent(z, labels, grad, loss_rows):
    """Fused softmax cross-entropy (see :func:`softmax_xent_xp`): one launch on the GPU, one compiled
    pass on the CPU."""
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
    compiled = _compiled(z, grad, loss_rows) if z.ndim == 2 and z.shape == grad.shape else None
    if (compiled is not None
            and type(labels) is _np.ndarray and labels.dtype.kind in "iu" and labels.flags.c_contiguous):
        compiled.softmax_xent(z, labels, grad, loss_rows, z.dtype.type(1.0 / z.shape[0]))
        return grad, loss_rows
    return softmax_xent_xp(z, labels, grad, loss_rows)


# --- gather rows of integer pixels and scale them: out = src[idx] / divisor --------------------------

def gather_scaled_xp(src, idx, out, divisor):
    """Twin: ``out[:len(idx)] = src[idx] / divisor``; src (N, F) uint8, idx (K,) int, out (>=K, F) float.

    The division happens in ``out``'s dtype (float32(pixel) / float32(255)), so the result is bit for bit
    what :func:`gpunet.data.load_idx_images` stores for the same pixel.
    """
    xp = get_array_module(src)
    dst = out[:idx.shape[0]]
    xp.divide(xp.take(src, idx, axis=0), out.dtype.type(divisor), out=dst, dtype=out.dtype)
    return dst


def gather_scaled(src, idx, out, divisor):
    """Rows ``idx`` of the integer array ``src``, divided by ``divisor``, into the first rows of ``out``
    (one compiled pass on the CPU, else the twin); returns them."""
    if (ENABLED and type(src) is _np.ndarray and type(idx) is _np.ndarray and type(out) is _np.ndarray
            and src.ndim == 2 and out.ndim == 2 and src.dtype == _np.uint8 and out.dtype.char in "fd"
            and idx.dtype.kind in "iu" and src.flags.c_contiguous and out.flags.c_contiguous
            and idx.shape[0] <= out.shape[0] and out.shape[1] == src.shape[1]):
        compiled = _numba_kernels()
        if compiled is not None:
            compiled.gather_scaled(src, idx, out, out.dtype.type(divisor))
            return out[:idx.shape[0]]
    return gather_scaled_xp(src, idx, out, divisor)


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


def _scaled_direction(w, g, lr, wd, tmp):
    """``tmp = lr * (g + wd * w)`` in place, without temporaries; returns tmp."""
    xp = get_array_module(w)
    if wd:
        xp.multiply(w, wd, out=tmp)
        tmp += g
        tmp *= lr
    else:
        xp.multiply(g, lr, out=tmp)
    return tmp


def momentum_update_xp(w, g, v, lr, gamma, wd, nesterov, tmp):
    """Twin of the notes' rule ``v = gamma*v + lr*(g + wd*w); w -= v`` (Nesterov: ``w -= gamma*v + lr*d``).

    All arrays share shape and dtype; ``tmp`` is scratch space of the same shape. Scalars must already
    have the arrays' dtype so that nothing is promoted.
    """
    xp = get_array_module(w)
    _scaled_direction(w, g, lr, wd, tmp)   # tmp = lr * d
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
    """Momentum step over flat buffers, in place: one launch on the GPU; on the CPU, BLAS level-1 calls
    on NumPy's own OpenBLAS threads where available, else the twin block by block."""
    if _fused(w):
        _momentum_kernel()(g, lr, gamma, wd, bool(nesterov), w, v)
    elif not blas.momentum_update(w, g, v, lr, gamma, wd, nesterov):
        blas.blocked(lambda w_, g_, v_, t_: momentum_update_xp(w_, g_, v_, lr, gamma, wd, nesterov, t_), w, g, v, tmp)
    return w, v


def sgd_update(w, g, lr, wd, tmp):
    """``w -= lr * (g + wd * w)`` over flat buffers, in place: BLAS level-1 calls on the CPU where
    available, else the twin."""
    if not blas.sgd_update(w, g, lr, wd):
        w -= _scaled_direction(w, g, lr, wd, tmp)
    return w
