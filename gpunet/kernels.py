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
(``GPUNET_CPU_BLAS=0`` disables that; tests check it against the twin too).
"""
from __future__ import annotations

import functools
import os

import numpy as _np

from .backend import get_array_module

ENABLED = os.environ.get("GPUNET_FUSED", "1") != "0"


def _fused(a) -> bool:
    return ENABLED and get_array_module(a).__name__ == "cupy"


@functools.lru_cache(maxsize=None)
def _numba_kernels():
    """The module of compiled CPU kernels (:mod:`gpunet.cpu_kernels`), or None without numba."""
    if os.environ.get("GPUNET_NUMBA", "1") == "0":
        return None
    try:
        from . import cpu_kernels
    except Exception:  # numba missing or unusable here: the NumPy twins serve
        return None
    return cpu_kernels


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
    compiled = _compiled(z, grad) if z.ndim == 2 and z.shape == grad.shape else None
    if (compiled is not None and _compiled(loss_rows) is compiled and loss_rows.dtype == z.dtype
            and type(labels) is _np.ndarray and labels.dtype.kind in "iu" and labels.flags.c_contiguous):
        compiled.softmax_xent(z, labels, grad, loss_rows, z.dtype.type(1.0 / z.shape[0]))
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
        if wd:
            blas.scal(w.shape[0], 1.0 - float(lr) * float(wd), w.ctypes.data, 1)
        axpy(-float(lr), g, w)
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


class _Blas:
    """The CBLAS routines gpunet calls, typed for ctypes (``s`` or ``d`` precision)."""

    def __init__(self, lib, char: str):
        import ctypes

        real = ctypes.c_float if char == "s" else ctypes.c_double
        i64, ptr, enum = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        signatures = {
            "scal": [i64, real, ptr, i64],
            "axpy": [i64, real, ptr, i64, ptr, i64],
            "gemv": [enum, enum, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64],
            "gemm": [enum, enum, enum, i64, i64, i64, real, ptr, i64, ptr, i64, real, ptr, i64],
        }
        for name, argtypes in signatures.items():
            fn = getattr(lib, f"scipy_cblas_{char}{name}64_")
            fn.restype, fn.argtypes = None, argtypes
            setattr(self, name, fn)


@functools.lru_cache(maxsize=None)
def _openblas(dtype_char: str):
    """The CBLAS routines of the OpenBLAS inside NumPy's wheel, or None (other builds: MKL, Accelerate).

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
        return _Blas(ctypes.CDLL(libs[0]), dtype_char) if libs else None
    except Exception:  # any surprise in a foreign library means: use the NumPy twin
        return None


def _cpu_blas(a, min_size=4096):
    """The BLAS routines for a contiguous 1-D NumPy float32/float64 array large enough to gain from them."""
    if not isinstance(a, _np.ndarray) or a.ndim != 1 or a.shape[0] < min_size or not a.flags.c_contiguous:
        return None
    char = {"f": "s", "d": "d"}.get(a.dtype.char)  # dtype.char, not dtype.name: a per-step hot path
    return _openblas(char) if char else None


def _blas_momentum(w, g, v, lr, gamma, wd, nesterov) -> bool:
    """The momentum rule as scal/axpy calls; False when no BLAS path applies."""
    blas = _cpu_blas(w)
    if blas is None:
        return False
    scal, axpy_ = blas.scal, blas.axpy
    n, pw, pg, pv = w.shape[0], w.ctypes.data, g.ctypes.data, v.ctypes.data
    lr, gamma, wd = float(lr), float(gamma), float(wd)
    scal(n, gamma, pv, 1)                 # v = gamma * v
    axpy_(n, lr, pg, 1, pv, 1)            #   + lr * g
    if wd:
        axpy_(n, lr * wd, pw, 1, pv, 1)   #   + lr * wd * w
    if not nesterov:
        axpy_(n, -1.0, pv, 1, pw, 1)      # w = w - v
        return True
    if wd:
        scal(n, 1.0 - lr * wd, pw, 1)     # w = w - lr * wd * w
    axpy_(n, -gamma, pv, 1, pw, 1)        #   - gamma * v
    axpy_(n, -lr, pg, 1, pw, 1)           #   - lr * g
    return True


# --- CPU: the gradients folded into the momentum update ------------------------------------------------

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums


def gemm_update_xp(c, a, b, alpha, beta):
    """Twin: ``c = beta * c + alpha * a.T @ b``; a (K, M), b (K, N), c (M, N)."""
    c *= beta
    c += alpha * (a.T @ b)
    return c


def colsum_update_xp(c, a, alpha, beta):
    """Twin: ``c = beta * c + alpha * a.sum(axis=0)``; a (K, N), c (N,)."""
    c *= beta
    c += alpha * a.sum(axis=0)
    return c


class LinearMomentum:
    """One Linear layer's momentum step with its gradients folded in, on NumPy's OpenBLAS.

    Prepared once per training run (pointers, sizes), then called once per step with the layer's input
    ``x`` (K, in) and output delta ``dy`` (K, out)::

        v_W = gamma * v_W + lr * x.T @ dy     one sgemm: dW is never written out
        v_b = gamma * v_b + lr * dy.sum(0)    one sgemv (dy.T @ ones): nor is db
        v  += lr * wd * w                     weight decay only: one axpy
        w  -= v                               one axpy over W and b together

    ``wb`` and ``v_wb`` are 1-D contiguous slices of the optimizer's flat buffers holding W (in, out)
    row-major and then b (out,); this is the notes' rule ``v = gamma*v + lr*grad; w = w - v``, two
    passes over the weights fewer than forming the gradients first. Inputs that are not contiguous NumPy
    arrays of the buffers' dtype take the twin (``gemm_update_xp``, ``colsum_update_xp``).
    """

    def __init__(self, wb, v_wb, n_in: int, n_out: int):
        self.blas = _cpu_blas(wb, min_size=1)  # even a small layer: one BLAS call beats several NumPy calls
        if self.blas is None or _cpu_blas(v_wb, min_size=1) is not self.blas or wb.shape != (n_in * n_out + n_out,):
            raise ValueError(f"wb: expected contiguous 1-D float buffers of {n_in * n_out + n_out} elements "
                             f"on NumPy's OpenBLAS, got shape {wb.shape}, dtype {wb.dtype}")
        self.wb, self.v_wb, self.n_in, self.n_out = wb, v_wb, n_in, n_out
        self.ptr_w, self.ptr_v = wb.ctypes.data, v_wb.ctypes.data
        self.ptr_vb = self.ptr_v + n_in * n_out * wb.itemsize
        self._ones = _np.ones(0, dtype=wb.dtype)

    def __call__(self, x, dy, lr, gamma, wd=0.0):
        k, n_in, n_out = x.shape[0], self.n_in, self.n_out
        if not (type(x) is _np.ndarray and type(dy) is _np.ndarray and x.flags.c_contiguous
                and dy.flags.c_contiguous and x.dtype == dy.dtype == self.wb.dtype):
            return self._twin(x, dy, lr, gamma, wd)
        if x.shape != (k, n_in) or dy.shape != (k, n_out):
            raise ValueError(f"x, dy: expected shapes ({k}, {n_in}) and ({k}, {n_out}), got {x.shape} and {dy.shape}")
        if self._ones.shape[0] != k:
            self._ones = _np.ones(k, dtype=self.wb.dtype)
        blas, lr, gamma = self.blas, float(lr), float(gamma)
        blas.gemm(_ROW_MAJOR, _TRANS, _NO_TRANS, n_in, n_out, k, lr, x.ctypes.data, n_in, dy.ctypes.data, n_out,
                  gamma, self.ptr_v, n_out)
        blas.gemv(_ROW_MAJOR, _TRANS, k, n_out, lr, dy.ctypes.data, n_out, self._ones.ctypes.data, 1,
                  gamma, self.ptr_vb, 1)
        n = self.wb.shape[0]
        if wd:
            blas.axpy(n, lr * float(wd), self.ptr_w, 1, self.ptr_v, 1)
        blas.axpy(n, -1.0, self.ptr_v, 1, self.ptr_w, 1)

    def _twin(self, x, dy, lr, gamma, wd):
        split = self.n_in * self.n_out
        v_w = self.v_wb[:split].reshape(self.n_in, self.n_out)
        t = self.wb.dtype.type
        gemm_update_xp(v_w, x, dy, t(lr), t(gamma))
        colsum_update_xp(self.v_wb[split:], dy, t(lr), t(gamma))
        if wd:
            self.v_wb += t(lr) * t(wd) * self.wb
        self.wb -= self.v_wb


def axpy(alpha, x, y):
    """``y += alpha * x`` in place over same-shaped contiguous arrays (BLAS where available)."""
    fx, fy = x.reshape(-1), y.reshape(-1)
    blas = _cpu_blas(fy) if x.flags.c_contiguous and y.flags.c_contiguous and x.dtype == y.dtype else None
    if blas is None:
        y += y.dtype.type(alpha) * x
        return y
    blas.axpy(fy.shape[0], float(alpha), fx.ctypes.data, 1, fy.ctypes.data, 1)
    return y


def cpu_gemm_available(a) -> bool:
    """True when :class:`LinearMomentum` runs on BLAS for flat buffers like ``a``."""
    return _cpu_blas(a.reshape(-1)) is not None if get_array_module(a) is _np else False
