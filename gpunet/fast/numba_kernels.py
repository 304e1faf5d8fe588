"""Compiled CPU kernels of the fast path (numba): the elementwise work of one step in one pass.

Optional: imported only when numba is installed (``pip install gpunet[numba]``) and the fast path is
on. Why: one NumPy call costs a few microseconds however small its array, and each elementwise step
of a layer is two or three such calls, each a full pass over the array; a compiled loop does it in
one pass and one call (timings in BENCHMARKS.md).

Each kernel works in place on C-contiguous arrays of one float dtype (float32 or float64); the
formulas are the core's, and tests check each kernel against them. Compiled on first use per dtype,
cached on disk.
"""

from __future__ import annotations

import numba
import numpy as np

from ..layers import GOLDEN, MIX1, MIX2

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


@_jit
def _splitmix_words(out, first, key):
    """out[j] = SplitMix64's word ``first + j + 1`` for ``key`` (uint64, wrapping)."""
    for j in range(out.shape[0]):
        x = (first + np.uint64(j + 1)) * np.uint64(GOLDEN) + key
        x ^= x >> np.uint64(30)
        x *= np.uint64(MIX1)
        x ^= x >> np.uint64(27)
        x *= np.uint64(MIX2)
        out[j] = x ^ (x >> np.uint64(31))


@_jit
def dropout(y, mask, key, start, threshold, scale):
    """``mask = (bits < threshold) * scale; y *= mask`` over y, mask (N, C), with the bits of
    :func:`gpunet.layers.dropout_bits` (key, start, threshold uint64): unit u's are the 16 bits
    ``u % 4`` (little-endian lanes) of word ``u // 4 + 1``. The words first, then the mask: two
    simple loops run several times faster than one that mixes 64-bit words and float lanes."""
    flat_y, flat_m = y.reshape(-1), mask.reshape(-1)
    n, lane = flat_y.shape[0], int(start & np.uint64(3))
    words = np.empty((lane + n + 3) // 4, dtype=np.uint64)
    _splitmix_words(words, start >> np.uint64(2), key)
    bits = words.view(np.uint16)[lane : lane + n]
    zero = mask.dtype.type(0)
    for k in range(n):
        m = scale if bits[k] < threshold else zero
        flat_m[k] = m
        flat_y[k] = flat_y[k] * m


@_jit
def relu_mask_backward(dy, y, mask):
    """dy (N, C) = (dy * mask) * (y > 0), y the ReLU's output after the dropout."""
    zero = dy.dtype.type(0)
    for i in range(dy.shape[0]):
        for j in range(dy.shape[1]):
            t = dy[i, j] * mask[i, j]
            dy[i, j] = t if y[i, j] > zero else t * zero


@_jit
def bias_relu(y, b):
    """y (N, C) = max(y + b, 0); b (C,). NaN stays NaN, as with the core's maximum."""
    zero = y.dtype.type(0)
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            t = y[i, j] + b[j]
            y[i, j] = zero if t < zero else t


@_jit
def relu_backward(dy, y):
    """dy (N, C) = dy * (y > 0), with y the ReLU output (a NaN or inf in dy stays NaN where y <= 0,
    as in the core's product)."""
    zero = dy.dtype.type(0)
    for i in range(dy.shape[0]):
        for j in range(dy.shape[1]):
            dy[i, j] = dy[i, j] if y[i, j] > zero else dy[i, j] * zero


@_jit
def softmax_xent(z, labels, grad, loss_rows, inv_n):
    """Per row i: loss_rows[i] = logsumexp(z[i]) - z[i, labels[i]]; grad[i] = (softmax(z[i]) -
    onehot) * inv_n."""
    for i in range(z.shape[0]):
        m = z[i, 0]
        for j in range(1, z.shape[1]):
            m = max(m, z[i, j])
        s = z.dtype.type(0)
        for j in range(z.shape[1]):
            e = np.exp(z[i, j] - m)  # <= 1: the stable log-sum-exp, never exp of a large number
            grad[i, j] = e
            s += e
        scale = inv_n / s
        for j in range(z.shape[1]):
            grad[i, j] *= scale
        t = labels[i]
        if t < 0 or t >= z.shape[1]:  # no bounds checks in compiled code: never write outside grad
            raise IndexError("softmax_xent: a label lies outside [0, classes)")
        grad[i, t] -= inv_n
        loss_rows[i] = np.log(s) + m - z[i, t]


def rule(source: str):
    """The optimizer rule's CPU kernel, compiled from its generated text (:func:`gpunet.fast.rules.
    numba_source`: a loop over flat arrays, the core's operations in its order). Compiled once per
    process and dtype, on first use (generated text has no file for numba's on-disk cache)."""
    space = {"sqrt": np.sqrt}
    exec(compile(source, "<gpunet rule kernel>", "exec"), space)  # text made by gpunet.fast.rules
    return numba.njit(nogil=True, error_model="numpy")(space["kernel"])


@_jit
def gather_scaled(src, idx, out, divisor):
    """out[k] = src[idx[k]] / divisor for k < len(idx); src (N, F) integers (uint8 pixels), out
    (>=K, F) float."""
    n = src.shape[0]
    for k in range(idx.shape[0]):
        row = idx[k]
        if row < 0 or row >= n:  # no bounds checks in compiled code: never read outside src
            raise IndexError("gather_scaled: an index lies outside [0, rows)")
        for j in range(src.shape[1]):
            out[k, j] = out.dtype.type(src[row, j]) / divisor


@_jit
def lit_columns(x, cols):
    """cols[:k] = the columns of x (N, F) with a nonzero (or NaN) in some row, ascending; returns
    k. cols (F,) int64."""
    f = x.shape[1]
    lit = np.zeros(f, dtype=np.uint8)
    zero = x.dtype.type(0)
    for i in range(x.shape[0]):
        for j in range(f):
            lit[j] |= x[i, j] != zero  # no branch: the loop vectorises
    k = 0
    for j in range(f):
        if lit[j]:
            cols[k] = j
            k += 1
    return k


@_jit
def take_lit(x, W, cols, xc, Wc):
    """xc (N, k) = x[:, cols], Wc (k, M) = W[cols] for k = len(cols); returns False, gathering
    nothing, where a row of W outside cols is not finite (the dense product's 0 * inf is NaN)."""
    f, m, k = W.shape[0], W.shape[1], cols.shape[0]
    zero = W.dtype.type(0)
    probe = np.zeros(m, dtype=W.dtype)  # w * 0 is 0 for a finite w, else NaN: one add a weight
    r = 0
    for j in range(f):
        if r < k and cols[r] == j:
            for c in range(m):
                Wc[r, c] = W[j, c]
            r += 1
        else:
            for c in range(m):
                probe[c] += W[j, c] * zero
    for c in range(m):
        if probe[c] != zero:
            return False
    for i in range(x.shape[0]):
        for r in range(k):
            xc[i, r] = x[i, cols[r]]
    return True


@_jit
def put_lit(gc, cols, dy, g):
    """g (F, M): rows cols = gc (k, M), the others what x.T @ dy gives for a zero column of x: 0,
    or NaN in a column of dy (N, M) with a NaN or inf."""
    m = g.shape[1]
    zero = g.dtype.type(0)
    fill = np.zeros(m, dtype=g.dtype)  # 0 * dy summed: 0, or NaN where dy is not finite
    for i in range(dy.shape[0]):
        for c in range(m):
            fill[c] += dy[i, c] * zero
    r, k = 0, cols.shape[0]
    for j in range(g.shape[0]):
        if r < k and cols[r] == j:
            for c in range(m):
                g[j, c] = gc[r, c]
            r += 1
        else:
            for c in range(m):
                g[j, c] = fill[c]
