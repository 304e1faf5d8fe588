"""CPU fast paths through the OpenBLAS inside NumPy's wheel, called with ctypes.

``routines(a)`` finds the CBLAS routines (scal, axpy, gemv, gemm) for an array like ``a``, or None: another
NumPy build (MKL, Accelerate), another dtype, or ``GPUNET_CPU_BLAS=0``. Every caller keeps a NumPy twin for
that case, and tests check each path against its twin.

- ``sgd_update``, ``momentum_update``: the optimizers' rules over the flat buffer as scal/axpy calls.
- ``LinearMomentum``: fit's fused update, the weight and bias gradients folded into the velocities.
- ``blocked``: a small helper for the twins.
"""
from __future__ import annotations

import functools
import os

import numpy as _np

# --- cache blocking and the BLAS routines ---------------------------------------------------------------

BLOCK = 1 << 16  # 64k floats: the four 256 KiB slices of one block stay in a core's L2 cache


def blocked(fn, *arrays):
    """Apply ``fn`` block by block, so each array streams from memory once instead of once per pass."""
    n = arrays[0].shape[0]
    for start in range(0, n, BLOCK):
        fn(*(a[start:start + BLOCK] for a in arrays))


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


def routines(a, min_size=4096):
    """The BLAS routines for a contiguous 1-D NumPy float32/float64 array large enough to gain from them."""
    if not isinstance(a, _np.ndarray) or a.ndim != 1 or a.shape[0] < min_size or not a.flags.c_contiguous:
        return None
    char = {"f": "s", "d": "d"}.get(a.dtype.char)  # dtype.char, not dtype.name: a per-step hot path
    return _openblas(char) if char else None


def sgd_update(w, g, lr, wd) -> bool:
    """The rule ``w -= lr * (g + wd * w)`` as scal/axpy calls; False when no BLAS path applies."""
    blas = routines(w)
    if blas is None:
        return False
    n, pw, lr = w.shape[0], w.ctypes.data, float(lr)
    if wd:
        blas.scal(n, 1.0 - lr * float(wd), pw, 1)  # w = (1 - lr * wd) * w
    blas.axpy(n, -lr, g.ctypes.data, 1, pw, 1)      #   - lr * g
    return True


def momentum_update(w, g, v, lr, gamma, wd, nesterov) -> bool:
    """The momentum rule as scal/axpy calls; False when no BLAS path applies."""
    blas = routines(w)
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
        self.blas = routines(wb, min_size=1)  # even a small layer: one BLAS call beats several NumPy calls
        if (self.blas is None or routines(v_wb, min_size=1) is not self.blas
                or wb.shape != (n_in * n_out + n_out,)):
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


def gemm_available(a) -> bool:
    """True when :class:`LinearMomentum` runs on BLAS for flat buffers like ``a``."""
    return isinstance(a, _np.ndarray) and routines(a.reshape(-1)) is not None
