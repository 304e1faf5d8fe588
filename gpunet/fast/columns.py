"""The first layer's two products over the lit columns of its input only: the CPU's fast step skips
the features that are zero in every row of the batch.

A zero column j of x (N, F) adds nothing to ``x @ W`` (its terms are ``0 * W[j]``) and gives a zero
row of ``W.grad = x.T @ dy``. MNIST's digits leave about a third of the 784 pixels black in every
row of a 128-image batch (527 lit on average, 494-563 over an epoch), so the first layer's forward
and gradient products multiply only the lit columns (OpenBLAS sums in blocks of 384 terms, so their
time falls by about a fifth where the terms fall by a third; about 3% of an epoch after the gathers,
measured 2026-12-08)::

    cols = the columns of x with a nonzero in some row
    y = x[:, cols] @ W[cols]
    W.grad[cols] = x[:, cols].T @ dy;  the other rows of W.grad = 0

The sums are the dense products' terms without the zeros; BLAS groups them in other blocks, so the
bits can differ in the last place, as any other order of the same sum (the tests compare with the
core's step). Where the dense product is not just the lit terms, the result is the core's: a NaN or
infinite weight in a skipped row (``0 * inf`` is NaN) makes the step take the dense product, and a
column of dy holding a NaN or inf gives the skipped rows NaN there, as ``0 * inf`` does.

The product must be worth it: ``SKIP_AT_LEAST`` of the columns zero and ``MIN_WORK`` multiply-adds
in the layer's product, else the dense product runs (dense tables have nothing to skip, and a small
one's products cost less than the gathers). ``GPUNET_SKIP_ZEROS=0`` turns it off.
"""

from __future__ import annotations

import os

import numpy as np

from . import ops

SKIP_AT_LEAST = 1 / 8  # of the columns: fewer zero ones, and the gathers cost what they save
MIN_WORK = 1 << 20  # multiply-adds of x @ W: below it, the dense product beats the gathers


def enabled() -> bool:
    return os.environ.get("GPUNET_SKIP_ZEROS", "1") != "0"


def status() -> str:
    """In words, for ``gpunet info``."""
    return "on" if enabled() else "off (GPUNET_SKIP_ZEROS=0)"


def worth_it(rows: int, n_in: int, n_out: int) -> bool:
    """True where a layer of this size multiplies only lit columns (when enough are zero)."""
    return enabled() and rows * n_in * n_out >= MIN_WORK


def _lit(x, cols) -> int:
    """cols[:k] = x's columns with a nonzero (NaN counts) in some row, ascending; returns k."""
    if (compiled := ops.numba_kernels()) is not None:
        return compiled.lit_columns(x, cols)
    found = np.flatnonzero((x != 0).any(axis=0))
    cols[: found.size] = found
    return found.size


def _take(x, W, cols, xc, Wc) -> bool:
    """xc = x[:, cols], Wc = W[cols]; False (nothing gathered) where a skipped row of W is not
    finite."""
    if (compiled := ops.numba_kernels()) is not None:
        return compiled.take_lit(x, W, cols, xc, Wc)
    skipped = np.ones(W.shape[0], dtype=bool)
    skipped[cols] = False
    if not np.isfinite(W[skipped]).all():
        return False
    np.take(W, cols, axis=0, out=Wc)
    np.take(x, cols, axis=1, out=xc)
    return True


def _put(gc, cols, dy, g) -> None:
    """g[cols] = gc; g's other rows 0, or NaN in a column where dy holds a NaN or inf."""
    if (compiled := ops.numba_kernels()) is not None:
        compiled.put_lit(gc, cols, dy, g)
        return
    skipped = np.ones(g.shape[0], dtype=bool)
    skipped[cols] = False
    g[skipped] = 0
    bad = ~np.isfinite(dy).all(axis=0)
    if bad.any():
        g[np.ix_(skipped, bad)] = np.nan
    g[cols] = gc


class LitColumns:
    """One Linear layer's products over its input's lit columns, for C-contiguous NumPy x (N, in)
    and W (in, out) of one float dtype. ``forward(x, W, out)`` returns ``x @ W`` written into
    ``out`` (N, out), or None where the dense product must run (too few zero columns, a skipped
    weight not finite); after a forward that returned a product, ``gradient(dy, g)`` writes
    ``g = x.T @ dy`` (in, out) from the same columns. Its buffers are reused from step to step."""

    def __init__(self) -> None:
        self.lit: tuple | None = None  # (cols, x[:, cols]) of the last forward that skipped columns
        self._buffers: dict = {}

    def _buffer(self, name, size: int, dtype):
        """A flat buffer of ``size`` elements, reused while the shapes last: a batch's lit columns
        change, its largest count does not pass the layer's inputs."""
        buf = self._buffers.get(name)
        if buf is None or buf.size != size or buf.dtype != dtype:
            buf = self._buffers[name] = np.empty(size, dtype=dtype)
        return buf

    def forward(self, x, W, out):
        self.lit = None
        n, f = x.shape
        if not (
            worth_it(n, f, W.shape[1])
            and x.dtype == W.dtype
            and all(type(a) is np.ndarray and a.flags.c_contiguous for a in (x, W, out))
        ):
            return None
        cols = self._buffer("cols", f, np.int64)
        k = _lit(x, cols)
        if k > f * (1 - SKIP_AT_LEAST):
            return None
        cols = cols[:k]
        xc = self._buffer("xc", n * f, x.dtype)[: n * k].reshape(n, k)
        Wc = self._buffer("Wc", W.size, W.dtype)[: k * W.shape[1]].reshape(k, W.shape[1])
        if not _take(x, W, cols, xc, Wc):
            return None
        self.lit = (cols, xc)
        return np.matmul(xc, Wc, out=out)

    def gradient(self, dy, g):
        cols, xc = self.lit
        k, m = cols.shape[0], g.shape[1]
        gc = self._buffer("gc", g.size, g.dtype)[: k * m].reshape(k, m)
        np.matmul(xc.T, dy, out=gc)
        _put(gc, cols, dy, g)
        return g
