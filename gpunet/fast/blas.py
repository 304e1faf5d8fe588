"""The CPU's parameter update with the gradient folded in, through the OpenBLAS inside NumPy's wheel
(called with ctypes).

For one Linear layer with input x (K, in) and output delta dy (K, out), the notes' rule
``v = gamma*v + lr*grad; w = w - v`` with ``grad = x.T @ dy`` (and ``dy.sum(0)`` for the bias) becomes::

    v_W = gamma * v_W + lr * x.T @ dy     one sgemm: dW is never written out
    v_b = gamma * v_b + lr * dy.sum(0)    one sgemv (dy.T @ ones): nor is db
    v  += lr * wd * w                     weight decay only: one axpy each
    w  -= v                               one axpy each

and plain gradient descent ``w = w - lr*grad`` is one sgemm straight into W. Same rule, fewer passes over
the weights than forming the gradients first; the result differs from the core's only by float rounding
(tests compare the two). ``routines(a)`` is None for another NumPy build (MKL, Accelerate), another dtype,
or ``GPUNET_CPU_BLAS=0``: then the fast path writes the gradients and the core optimizer steps.
"""
from __future__ import annotations

import functools
import os

import numpy as np

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS enums


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
        self.lib = lib


@functools.lru_cache(maxsize=None)
def _openblas(dtype_char: str):
    """The CBLAS routines of the OpenBLAS inside NumPy's wheel, or None (other builds: MKL, Accelerate)."""
    if os.environ.get("GPUNET_CPU_BLAS", "1") == "0":
        return None
    try:
        import ctypes
        import glob

        libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas64_*.so"))
        return _Blas(ctypes.CDLL(libs[0]), dtype_char) if libs else None
    except Exception:  # any surprise in a foreign library means: no BLAS path
        return None


def routines(dtype):
    """The BLAS routines for float32 or float64 arrays, or None."""
    char = {"f": "s", "d": "d"}.get(np.dtype(dtype).char)
    return _openblas(char) if char else None


def status() -> str:
    """In words, for ``gpunet info``."""
    if routines(np.float32) is not None:
        return "on (NumPy's OpenBLAS, called directly)"
    return "off (GPUNET_CPU_BLAS=0)" if os.environ.get("GPUNET_CPU_BLAS") == "0" else "off (NumPy ships no OpenBLAS)"


def _dense(a, dtype) -> bool:
    return type(a) is np.ndarray and a.flags.c_contiguous and a.dtype == dtype


class LinearUpdate:
    """One Linear layer's SGD (``vW``, ``vb`` None) or momentum step, gradients folded in.

    ``W`` (in, out), ``b`` (out,) and the velocities are the arrays themselves (updated in place); they
    must be C-contiguous NumPy arrays of one float dtype with BLAS routines (``routines``).
    """

    def __init__(self, W, b, vW=None, vb=None):
        self.blas = routines(W.dtype)
        arrays = [a for a in (W, b, vW, vb) if a is not None]
        if self.blas is None or not all(_dense(a, W.dtype) for a in arrays):
            raise ValueError(f"W, b: expected C-contiguous NumPy float arrays on NumPy's OpenBLAS, got {W.dtype}")
        self.W, self.b, self.vW, self.vb = W, b, vW, vb
        self.n_in, self.n_out = W.shape
        self._ones = np.ones(0, dtype=W.dtype)

    def __call__(self, x, dy, lr, gamma=0.0, wd=0.0):
        """x (K, in) and dy (K, out), C-contiguous in W's dtype."""
        k, n_in, n_out, blas = x.shape[0], self.n_in, self.n_out, self.blas
        if not (_dense(x, self.W.dtype) and _dense(dy, self.W.dtype)) or x.shape != (k, n_in) or dy.shape != (k, n_out):
            raise ValueError(f"x, dy: expected C-contiguous ({k}, {n_in}) and ({k}, {n_out}) {self.W.dtype} arrays, "
                             f"got {x.shape} {x.dtype} and {dy.shape} {dy.dtype}")
        if self._ones.shape[0] != k:
            self._ones = np.ones(k, dtype=self.W.dtype)
        lr, wd = float(lr), float(wd)
        pW, pb = self.W.ctypes.data, self.b.ctypes.data
        if self.vW is None:  # SGD: w = (1 - lr*wd) w - lr * grad, the gradient product straight into w
            beta = 1.0 - lr * wd
            cW, cb, alpha = pW, pb, -lr
        else:
            beta, cW, cb, alpha = float(gamma), self.vW.ctypes.data, self.vb.ctypes.data, lr
        blas.gemm(_ROW_MAJOR, _TRANS, _NO_TRANS, n_in, n_out, k, alpha, x.ctypes.data, n_in, dy.ctypes.data,
                  n_out, beta, cW, n_out)
        blas.gemv(_ROW_MAJOR, _TRANS, k, n_out, alpha, dy.ctypes.data, n_out, self._ones.ctypes.data, 1, beta, cb, 1)
        if self.vW is None:
            return
        if wd:
            blas.axpy(n_in * n_out, lr * wd, pW, 1, cW, 1)
            blas.axpy(n_out, lr * wd, pb, 1, cb, 1)
        blas.axpy(n_in * n_out, -1.0, cW, 1, pW, 1)
        blas.axpy(n_out, -1.0, cb, 1, pb, 1)


# --- threads by work ------------------------------------------------------------------------------------
# OpenBLAS splits every product over all its threads, however small; on a shared 2-core machine a small
# table's products (digits: 200 x 64 x 100) then wait on threads more than they compute (issue 35: digits
# 19 s against 1.5 s on one thread). Below SMALL_WORK multiply-adds in the largest product of a step, one
# thread; above it, OpenBLAS's own count. The figure is a first guess (about a millisecond of one core):
# benchmarks/blas_threads.py times digits, wine and MNIST both ways, to be run on a quiet machine.
SMALL_WORK = 1 << 22


def _thread_calls():
    """OpenBLAS's (get, set) thread-count functions, or None for another BLAS."""
    if os.environ.get("GPUNET_CPU_BLAS", "1") == "0":
        return None
    lib = getattr(_openblas("s"), "lib", None)
    if lib is None:
        return None
    try:
        get, put = lib.scipy_openblas_get_num_threads64_, lib.scipy_openblas_set_num_threads64_
    except AttributeError:
        return None
    import ctypes

    get.restype, get.argtypes, put.restype, put.argtypes = ctypes.c_int, [], None, [ctypes.c_int]
    return get, put


def threads() -> int | None:
    """OpenBLAS's thread count now (None for another BLAS)."""
    calls = _thread_calls()
    return None if calls is None else int(calls[0]())


class threads_for:
    """``with threads_for(work):`` one BLAS thread while the largest product of each call holds fewer
    than :data:`SMALL_WORK` multiply-adds (``work``), OpenBLAS's own count otherwise; restored after."""

    def __init__(self, work: int):
        self.work, self.saved = int(work), None

    def __enter__(self):
        calls = _thread_calls()
        if calls is not None and self.work < SMALL_WORK and os.environ.get("GPUNET_BLAS_THREADS") != "all":
            self.saved = int(calls[0]())
            calls[1](1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            _thread_calls()[1](self.saved)
