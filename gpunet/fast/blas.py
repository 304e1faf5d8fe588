"""The CPU's SGD and momentum update of one Linear layer in BLAS calls on the arrays themselves,
through the OpenBLAS inside NumPy's wheel (called with ctypes): no temporaries, and the gradients
written where the core writes them (``param.grad``), so the step leaves the state the core's would.

For one Linear layer with input x (K, in) and output delta dy (K, out), the notes' rule
``v = gamma*v + lr*grad; w = w - v`` with ``grad = x.T @ dy`` (and ``dy.sum(0)`` for the bias) is::

    W.grad = x.T @ dy                       one sgemm, straight into W.grad
    v_W = gamma * v_W;  v_W += lr * W.grad  one scal, one axpy
    b.grad = dy.T @ ones                    one sgemv, straight into b.grad
    v_b = gamma * v_b + lr * dy.T @ ones    one sgemv (K * out multiply-adds: the product folded in)
    v  += lr * wd * w                       weight decay only: one axpy each
    w  -= v                                 one axpy each

and plain gradient descent ``w = (1 - lr*wd) w - lr*grad`` is a scal (weight decay only) and an axpy
after the gradient's product (the bias's product again folded into its update). With numba, the
fused step passes ``rule``: after the gradients' products, W and b are stepped by the optimizer's
own rule (its generated kernel, the core's operations, one pass over W, v and W.grad where scal and
two axpy make three; for b one call where two BLAS calls make two). In BLAS calls the rule's
``v + lr*grad`` is one fused multiply-add (axpy), where the core rounds ``lr*grad`` first, so those
weights can differ from the core's in the last bits (tests compare the two); the rule's kernel gives
the core's bits. ``routines(a)`` is None for another NumPy build (MKL, Accelerate), another dtype,
or ``GPUNET_CPU_BLAS=0``: then the fast path writes the gradients with NumPy and the core optimizer
steps.
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
    """The CBLAS routines of the OpenBLAS inside NumPy's wheel, or None (other builds: MKL,
    Accelerate)."""
    if os.environ.get("GPUNET_CPU_BLAS", "1") == "0":
        return None
    try:
        import ctypes
        import glob

        libs = glob.glob(
            os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas64_*.so")
        )
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
    return (
        "off (GPUNET_CPU_BLAS=0)"
        if os.environ.get("GPUNET_CPU_BLAS") == "0"
        else "off (NumPy ships no OpenBLAS)"
    )


def _dense(a, dtype) -> bool:
    return type(a) is np.ndarray and a.flags.c_contiguous and a.dtype == dtype


class LinearUpdate:
    """One Linear layer's SGD (``vW``, ``vb`` None) or momentum step; writes the gradients too.

    ``W`` (in, out), ``b`` (out,), their gradients ``gW``, ``gb`` (the parameters' ``grad``) and the
    velocities are the arrays themselves (written in place): C-contiguous NumPy arrays of one float
    dtype with BLAS routines (``routines``).
    """

    def __init__(self, W, b, gW, gb, vW=None, vb=None):
        self.blas = routines(W.dtype)
        arrays = [a for a in (W, b, gW, gb, vW, vb) if a is not None]
        if self.blas is None or not all(_dense(a, W.dtype) for a in arrays):
            raise ValueError(
                "W, b, gW, gb: expected C-contiguous NumPy float arrays of one dtype "
                f"on NumPy's OpenBLAS, got {[a.dtype.name for a in arrays]}"
            )
        if gW.shape != W.shape or gb.shape != b.shape:
            raise ValueError(
                f"gW, gb: expected shapes {W.shape} and {b.shape}, got {gW.shape} and {gb.shape}"
            )
        self.W, self.b, self.gW, self.gb, self.vW, self.vb = W, b, gW, gb, vW, vb
        # their addresses, once: they are held here, so they stay put (``.ctypes`` costs about a
        # microsecond a look, eight looks a layer a step)
        named = zip(("W", "b", "gW", "gb", "vW", "vb"), (W, b, gW, gb, vW, vb))
        self._at = {n: a.ctypes.data for n, a in named if a is not None}
        self.n_in, self.n_out = W.shape
        self._ones = np.ones(0, dtype=W.dtype)
        self._at["ones"] = self._ones.ctypes.data

    def __call__(self, x, dy, lr, gamma=0.0, wd=0.0, rule=None):
        """x (K, in) and dy (K, out), C-contiguous in W's dtype. ``rule``: a callable that steps W
        and b from ``W.grad`` and ``b.grad`` by the optimizer's generated rule kernel (one pass over
        each parameter, its velocity and its gradient); None: the update in BLAS calls."""
        k, n_in, n_out, blas, dt = x.shape[0], self.n_in, self.n_out, self.blas, self.W.dtype
        if not (_dense(x, dt) and _dense(dy, dt)) or x.shape != (k, n_in) or dy.shape != (k, n_out):
            raise ValueError(
                f"x, dy: expected C-contiguous ({k}, {n_in}) and ({k}, {n_out}) {dt} "
                f"arrays, got {x.shape} {x.dtype} and {dy.shape} {dy.dtype}"
            )
        blas.gemm(
            _ROW_MAJOR,
            _TRANS,
            _NO_TRANS,
            n_in,
            n_out,
            k,
            1.0,
            x.ctypes.data,
            n_in,
            dy.ctypes.data,
            n_out,
            0.0,
            self._at["gW"],
            n_out,
        )
        self.update(dy, lr, gamma, wd, rule)

    def update(self, dy, lr, gamma=0.0, wd=0.0, rule=None):
        """What follows ``W.grad``'s product (written by :meth:`__call__`, or by the caller, e.g.
        over the lit columns, :mod:`gpunet.fast.columns`): ``b.grad = dy.sum(0)`` and the step of W
        and b. dy (K, out) C-contiguous in W's dtype."""
        k, n_out, dt, at = dy.shape[0], self.n_out, self.W.dtype, self._at
        if not _dense(dy, dt) or dy.shape[1:] != (n_out,):
            raise ValueError(
                f"dy: expected C-contiguous (K, {n_out}) {dt}, got {dy.shape} {dy.dtype}"
            )
        if self._ones.shape[0] != k:
            self._ones = np.ones(k, dtype=dt)
            at["ones"] = self._ones.ctypes.data
        lr, gamma, wd, dyp = float(lr), float(gamma), float(wd), dy.ctypes.data
        self.blas.gemv(
            _ROW_MAJOR, _TRANS, k, n_out, 1.0, dyp, n_out, at["ones"], 1, 0.0, at["gb"], 1
        )
        if rule is not None:
            rule()
            return
        self._step_b(dyp, k, lr, gamma, wd)
        self._step_w(lr, gamma, wd)

    def _step_w(self, lr: float, gamma: float, wd: float) -> None:
        """W from W.grad in BLAS calls: SGD ``w = (1 - lr*wd) w - lr*grad`` (scal, axpy), momentum
        ``v = gamma*v + lr*grad (+ lr*wd*w); w -= v`` (scal, axpy, axpy)."""
        blas, size = self.blas, self.n_in * self.n_out
        pW, gW = self._at["W"], self._at["gW"]
        if self.vW is None:
            if wd:
                blas.scal(size, 1.0 - lr * wd, pW, 1)
            blas.axpy(size, -lr, gW, 1, pW, 1)
            return
        vW = self._at["vW"]
        blas.scal(size, gamma, vW, 1)
        blas.axpy(size, lr, gW, 1, vW, 1)
        if wd:
            blas.axpy(size, lr * wd, pW, 1, vW, 1)
        blas.axpy(size, -1.0, vW, 1, pW, 1)

    def _step_b(self, dyp: int, k: int, lr: float, gamma: float, wd: float) -> None:
        """b with the gradient's product ``dy.T @ ones`` folded into one sgemv (``dyp``: dy's
        address, k its rows), then the weight decay and ``b -= v`` for momentum."""
        blas, n_out, pb, ones = self.blas, self.n_out, self._at["b"], self._at["ones"]
        if self.vb is None:  # SGD: b = (1 - lr*wd) b - lr * dy.T @ ones
            blas.gemv(_ROW_MAJOR, _TRANS, k, n_out, -lr, dyp, n_out, ones, 1, 1.0 - lr * wd, pb, 1)
            return
        vb = self._at["vb"]
        blas.gemv(_ROW_MAJOR, _TRANS, k, n_out, lr, dyp, n_out, ones, 1, gamma, vb, 1)
        if wd:
            blas.axpy(n_out, lr * wd, pb, 1, vb, 1)
        blas.axpy(n_out, -1.0, vb, 1, pb, 1)


# --- threads by work ------------------------------------------------------------------------------
# OpenBLAS splits every product over all its threads, however small; on a shared 2-core machine a
# small table's products (digits: 200 x 64 x 100) then wait on threads more than they compute (issue
# 35: digits 19 s against 1.5 s on one thread). Below SMALL_WORK multiply-adds in the largest
# product of a step, one thread; above it, OpenBLAS's own count. Measured on a quiet 2-core machine
# (benchmarks/blas_threads.py --sweep, BENCHMARKS.md 2026-12-07): two threads win from 2**20 on, by
# 6-18% up to 2**22 and 28-60% above it; on a busy machine one thread wins by far more, so the
# threshold leans to one thread in between.
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
    """``with threads_for(work):`` one BLAS thread while the largest product of each call holds
    fewer than :data:`SMALL_WORK` multiply-adds (``work``), OpenBLAS's own count otherwise; restored
    after."""

    def __init__(self, work: int):
        self.work, self.saved = int(work), None

    def __enter__(self):
        calls = _thread_calls()
        if (
            calls is not None
            and self.work < SMALL_WORK
            and os.environ.get("GPUNET_BLAS_THREADS") != "all"
        ):
            self.saved = int(calls[0]())
            calls[1](1)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            _thread_calls()[1](self.saved)
