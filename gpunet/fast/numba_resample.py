"""The compiled CPU kernel of the augmentation's resampling (numba): :func:`gpunet.augment.bilinear`
at the points :func:`gpunet.augment.source_points` gives, in one pass per image instead of some
twenty NumPy passes over the batch (each a full read and write of B x H x W values; timings in
BENCHMARKS.md).

Optional like :mod:`gpunet.fast.numba_kernels` (loaded through
:func:`gpunet.fast.ops.numba_kernels`'s switches); the formula is the core's, and tests hold the
kernel to it.
"""

from __future__ import annotations

import numba
import numpy as np

# fastmath: LLVM may then vectorise the coordinates' loops; the rounding it allows stays within the
# tests' 1e-5 of the core's float32 result, and the coordinates are always finite.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=True)


@_jit
def _ink_box(image, h, w, ink_cols):
    """(first row, last row, first column, last column) of the (H*W,) image's nonzero pixels, (H,
    -1, W, -1) when there are none; ``ink_cols`` (W,) bool is scratch. No branch per pixel: digits'
    ink would mispredict it."""
    first_r, last_r = h, -1
    ink_cols[:] = False
    for i in range(h):
        ink = False
        for j in range(w):
            nonzero = image[i * w + j] != 0
            ink |= nonzero
            ink_cols[j] |= nonzero
        if ink:
            first_r, last_r = min(first_r, i), i
    first_c, last_c = w, -1
    for j in range(w):
        if ink_cols[j]:
            first_c, last_c = min(first_c, j), j
    return first_r, last_r, first_c, last_c


@_jit
def affine_elastic_bilinear(images, maps, fields, elastic, h, w, out):
    """out (B, H*W) = images (B, H*W) read at maps[b] @ (row - cr, col - cc, 1) + (cr, cc) (+
    fields[b, :, col, row] when ``elastic``), bilinear, zero outside; maps (B, 2, 3), fields (B, 2,
    W, H), one dtype.

    A point a pixel or more outside the box of the image's nonzero pixels reads zeros (or weighs its
    one nonzero neighbour by 0): its value is 0 without a read. That is three quarters of a
    distorted MNIST digit's pixels. The points left lie inside (-1, H) x (-1, W); when the box keeps
    off the image's edges their four reads are inside the image itself, else inside a zero-padded
    copy (one row and column before, two after, as :func:`gpunet.augment.bilinear` pads). One
    thread: numba's threads spreading the images over the cores fought OpenBLAS's spinning threads
    between the training's matrix products, and a batch took 8 ms instead of 2 on the two cores
    here."""
    t = images.dtype.type
    cr, cc = t((h - 1) / 2), t((w - 1) / 2)
    wp = w + 3
    padded = np.zeros(
        (h + 3) * wp, dtype=images.dtype
    )  # one buffer: each image rewrites its interior only
    ink_cols = np.zeros(w, np.bool_)
    rows, cols = np.empty(h, images.dtype), np.empty(h, images.dtype)  # one column's points
    offsets = np.arange(h).astype(images.dtype) - cr
    for b in range(images.shape[0]):
        image, dest = images[b], out[b]
        first_r, last_r, first_c, last_c = _ink_box(image, h, w, ink_cols)
        if first_r >= 1 and last_r <= h - 2 and first_c >= 1 and last_c <= w - 2:
            src, stride, base = image, w, 0
        else:
            for i in range(h):
                for j in range(w):
                    padded[(i + 1) * wp + j + 1] = image[i * w + j]
            src, stride, base = padded, wp, wp + 1
        r_lo, r_hi, c_lo, c_hi = t(first_r - 1), t(last_r + 1), t(first_c - 1), t(last_c + 1)
        ustride, one = np.uint64(stride), np.uint64(1)
        m00, m01, m02 = maps[b, 0, 0], maps[b, 0, 1], maps[b, 0, 2]
        m10, m11, m12 = maps[b, 1, 0], maps[b, 1, 1], maps[b, 1, 2]
        for j in range(w):
            # a column's points first, in loops without branches (the fields hold each column's
            # values together: no strided reads), then the box test and the reads
            dc = t(j) - cc
            row0, col0 = m01 * dc + m02 + cr, m11 * dc + m12 + cc
            for i in range(h):
                rows[i] = m00 * offsets[i] + row0
                cols[i] = m10 * offsets[i] + col0
            if elastic:
                along_rows, along_cols = fields[b, 0, j], fields[b, 1, j]
                for i in range(h):
                    rows[i] += along_rows[i]
                    cols[i] += along_cols[i]
            for i in range(h):
                r, c = rows[i], cols[i]
                if not (r > r_lo and r < r_hi and c > c_lo and c < c_hi):
                    dest[i * w + j] = 0
                    continue
                r0, c0 = np.floor(r), np.floor(c)
                fr, fc = r - r0, c - c0
                # unsigned, so that numba skips its test for negative indices: k >= 0, as r0 and c0
                # reach -1 only in the padded copy, whose base adds a row and a column
                k = np.uint64(int(r0) * stride + int(c0) + base)
                below = k + ustride
                v00, v01, v10, v11 = src[k], src[k + one], src[below], src[below + one]
                top = v00 + fc * (v01 - v00)
                bottom = v10 + fc * (v11 - v10)
                dest[i * w + j] = top + fr * (bottom - top)
