"""Fused elementwise steps: a CuPy kernel for the GPU and a plain ``xp`` twin for both devices.

Each public function works in place on its arrays and picks the CUDA kernel when the arrays are CuPy
arrays and fused kernels are enabled (``GPUNET_FUSED=0`` disables them), else the twin. The twins are
the reference: tests check that kernel and twin agree. Kernels are compiled once, on first use, and
cached (CuPy also caches the binaries on disk).

Why fuse: on a GPU each elementwise operation is a kernel launch that reads and writes the whole array;
for MNIST-sized layers the launches, not the arithmetic, dominate. On the CPU the twins use ``out=`` so
no temporaries are allocated, and the optimizers' parameter updates go through BLAS level-1 calls
(``scal``/``axpy``) on NumPy's own OpenBLAS when NumPy ships one (``GPUNET_CPU_BLAS=0`` disables that;
tests check it against the twin too).
"""
from __future__ import annotations

import functools
import os

import numpy as _np

from .backend import get_array_module

ENABLED = os.environ.get("GPUNET_FUSED", "1") != "0"


def _fused(a) -> bool:
    return ENABLED and get_array_module(a).__name__ == "cupy"


# --- bias + ReLU: y = max(y + b, 0) ---------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _bias_relu_kernel():
    import cupy

    return cupy.ElementwiseKernel("T b", "T y", "T t = y + b; y = t > (T)0 ? t : (T)0;", "gpunet_bias_relu")


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
    """Momentum step over flat buffers, in place: one launch on the GPU; on the CPU, BLAS level-1 calls
    on NumPy's own OpenBLAS threads where available, else the twin block by block."""
    if _fused(w):
        _momentum_kernel()(g, lr, gamma, wd, bool(nesterov), w, v)
    elif not _blas_momentum(w, g, v, lr, gamma, wd, nesterov):
        _blocked(lambda w_, g_, v_, t_: momentum_update_xp(w_, g_, v_, lr, gamma, wd, nesterov, t_), w, g, v, tmp)
    return w, v


def sgd_update(w, g, lr, wd, tmp):
    """``w -= lr * (g + wd * w)`` over flat buffers, in place."""
    blas = _cpu_blas(w)
    if blas is not None:
        scal, axpy, _ = blas
        n = w.shape[0]
        if wd:
            scal(n, 1.0 - float(lr) * float(wd), w.ctypes.data, 1)
        axpy(n, -float(lr), g.ctypes.data, 1, w.ctypes.data, 1)
        return w
    xp = get_array_module(w)
    if wd:
        xp.multiply(w, wd, out=tmp)
        tmp += g
        tmp *= lr
    else:
        xp.multiply(g, lr, out=tmp)
    w -= tmp
    return w


# --- CPU: BLAS level-1 fast path and cache blocking ----------------------------------------------------

_BLOCK = 1 << 16  # 64k floats: the four 256 KiB slices of one block stay in a core's L2 cache


def _blocked(fn, *arrays):
    """Apply ``fn`` block by block, so each array streams from memory once instead of once per pass."""
    n = arrays[0].shape[0]
    for start in range(0, n, _BLOCK):
        fn(*(a[start:start + _BLOCK] for a in arrays))


@functools.lru_cache(maxsize=None)
def _openblas(dtype_char: str):
    """(scal, axpy, gemm) from the OpenBLAS inside NumPy's wheel, or None (other builds: MKL, Accelerate).

    Why: after each matmul OpenBLAS keeps its worker threads spinning for a moment. Elementwise NumPy work
    then competes with them for the cores, while BLAS level-1 calls run on those same, already awake
    threads: the parameter update takes about half the time (see BENCHMARKS.md).
    """
    if os.environ.get("GPUNET_CPU_BLAS", "1") == "0":
        return None
    try:
        import ctypes
        import glob

        import numpy

        libs = glob.glob(os.path.join(os.path.dirname(numpy.__file__) + ".libs", "libscipy_openblas64_*.so"))
        if not libs:
            return None
        lib = ctypes.CDLL(libs[0])
        real = ctypes.c_float if dtype_char == "s" else ctypes.c_double
        scal = getattr(lib, f"scipy_cblas_{dtype_char}scal64_")
        axpy = getattr(lib, f"scipy_cblas_{dtype_char}axpy64_")
        gemm = getattr(lib, f"scipy_cblas_{dtype_char}gemm64_")
        scal.restype = axpy.restype = gemm.restype = None
        i64, ptr, enum = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        scal.argtypes = [i64, real, ptr, i64]
        axpy.argtypes = [i64, real, ptr, i64, ptr, i64]
        gemm.argtypes = [enum, enum, enum, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64]
        return scal, axpy, gemm
    except Exception:  # any surprise in a foreign library means: use the NumPy twin
        return None


def _cpu_blas(a):
    """(scal, axpy, gemm) for a contiguous 1-D NumPy float32/float64 array large enough to gain from it."""
    if not isinstance(a, _np.ndarray) or a.ndim != 1 or a.shape[0] < 4096 or not a.flags.c_contiguous:
        return None
    char = {"f": "s", "d": "d"}.get(a.dtype.char)  # dtype.char, not dtype.name: a per-step hot path
    return _openblas(char) if char else None


def _blas_momentum(w, g, v, lr, gamma, wd, nesterov) -> bool:
    """The momentum rule as scal/axpy calls; False when no BLAS path applies."""
    blas = _cpu_blas(w)
    if blas is None:
        return False
    scal, axpy, _ = blas
    n, pw, pg, pv = w.shape[0], w.ctypes.data, g.ctypes.data, v.ctypes.data
    lr, gamma, wd = float(lr), float(gamma), float(wd)
    scal(n, gamma, pv, 1)                # v = gamma * v
    axpy(n, lr, pg, 1, pv, 1)            #   + lr * g
    if wd:
        axpy(n, lr * wd, pw, 1, pv, 1)   #   + lr * wd * w
    if not nesterov:
        axpy(n, -1.0, pv, 1, pw, 1)      # w = w - v
        return True
    if wd:
        scal(n, 1.0 - lr * wd, pw, 1)    # w = w - lr * wd * w
    axpy(n, -gamma, pv, 1, pw, 1)        #   - gamma * v
    axpy(n, -lr, pg, 1, pw, 1)           #   - lr * g
    return True


# --- CPU: the weight gradient folded into the momentum update ------------------------------------------

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums


def gemm_update_xp(c, a, b, alpha, beta):
    """Twin: ``c = beta * c + alpha * a.T @ b``; a (K, M), b (K, N), c (M, N)."""
    c *= beta
    c += alpha * (a.T @ b)
    return c


def gemm_update(c, a, b, alpha, beta):
    """``c = beta * c + alpha * a.T @ b`` in place: one BLAS sgemm where NumPy ships OpenBLAS, else the twin.

    With c a velocity, a a layer's input and b its output delta, this is the notes' momentum rule
    ``v = gamma * v + lr * dW`` with ``dW = x.T @ dy`` never written out: two passes over the weights
    fewer than computing dW and then updating.
    """
    blas = _cpu_blas(c.reshape(-1)) if c.flags.c_contiguous else None
    if blas is None or not (a.flags.c_contiguous and b.flags.c_contiguous and a.dtype == b.dtype == c.dtype):
        return gemm_update_xp(c, a, b, alpha, beta)
    k, m = a.shape
    n = b.shape[1]
    blas[2](_ROW_MAJOR, _TRANS, _NO_TRANS, m, n, k, float(alpha), a.ctypes.data, m, b.ctypes.data, n,
            float(beta), c.ctypes.data, n)
    return c


def axpy(alpha, x, y):
    """``y += alpha * x`` in place over same-shaped contiguous arrays (BLAS where available)."""
    fx, fy = x.reshape(-1), y.reshape(-1)
    blas = _cpu_blas(fy) if x.flags.c_contiguous and y.flags.c_contiguous and x.dtype == y.dtype else None
    if blas is None:
        y += y.dtype.type(alpha) * x
        return y
    blas[1](fy.shape[0], float(alpha), fx.ctypes.data, 1, fy.ctypes.data, 1)
    return y


def cpu_gemm_available(a) -> bool:
    """True when :func:`gemm_update` runs as one BLAS call for arrays like ``a``."""
    return _cpu_blas(a.reshape(-1)) is not None if get_array_module(a) is _np else False
