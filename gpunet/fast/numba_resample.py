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
def _source(image, padded, box, h, w):
    """``(pixels, row stride, index of pixel (0, 0))`` to read the (H*W,) ``image`` from: itself
    when its ink ``box`` keeps a pixel off every edge (then every read lies inside it), else
    ``padded`` ((H+3)*(W+3), the image's dtype), into whose interior it is copied: one zero row and
    column before, two after, as :func:`gpunet.augment.bilinear` pads."""
    first_r, last_r, first_c, last_c = box
    if first_r >= 1 and last_r <= h - 2 and first_c >= 1 and last_c <= w - 2:
        return image, w, 0
    wp = w + 3
    for i in range(h):
        for j in range(w):
            padded[(i + 1) * wp + j + 1] = image[i * w + j]
    return padded, wp, wp + 1


@_jit
def _column_points(m, dc, cr, cc, offsets, rows, cols):
    """rows, cols (H,) = where column ``dc`` (its offset from the centre column ``cc``) reads:
    ``m`` (2, 3) @ (offsets[i], dc, 1) + (cr, cc), for the rows' offsets (H,) from the centre row
    ``cr``; one dtype. A loop without branches per coordinate, so that LLVM may vectorise it."""
    m00, m01, m02 = m[0, 0], m[0, 1], m[0, 2]
    m10, m11, m12 = m[1, 0], m[1, 1], m[1, 2]
    row0, col0 = m01 * dc + m02 + cr, m11 * dc + m12 + cc
    for i in range(offsets.shape[0]):
        rows[i] = m00 * offsets[i] + row0
        cols[i] = m10 * offsets[i] + col0


@_jit
def _add_field(rows, cols, along_rows, along_cols):
    """rows, cols (H,) += one column's elastic displacements along_rows, along_cols (H,)."""
    for i in range(rows.shape[0]):
        rows[i] += along_rows[i]
        cols[i] += along_cols[i]


@_jit
def _read_column(src, stride, base, bounds, rows, cols, dest, j, w):
    """dest[i * w + j] = src read bilinearly at (rows[i], cols[i]) (H,), for the rows i of column
    ``j`` of the (H*W,) output; 0 without a read where the point lies a pixel or more outside the
    ink's box, ``bounds`` = (first row - 1, last row + 1, first column - 1, last column + 1) in
    the points' dtype. ``src``, ``stride`` and ``base`` as :func:`_source` gives them."""
    r_lo, r_hi, c_lo, c_hi = bounds
    ustride, one = np.uint64(stride), np.uint64(1)
    for i in range(rows.shape[0]):
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


@_jit
def affine_elastic_bilinear(images, maps, fields, elastic, h, w, out):
    """out (B, H*W) = images (B, H*W) read at maps[b] @ (row - cr, col - cc, 1) + (cr, cc) (+
    fields[b, :, col, row] when ``elastic``), bilinear, zero outside; maps (B, 2, 3), fields (B, 2,
    W, H) (any array when not ``elastic``: it is not read), one dtype.

    A point a pixel or more outside the box of the image's nonzero pixels reads zeros (or weighs its
    one nonzero neighbour by 0): its value is 0 without a read. That is three quarters of a
    distorted MNIST digit's pixels. The points left lie inside (-1, H) x (-1, W); when the box keeps
    off the image's edges their four reads are inside the image itself, else inside a zero-padded
    copy (:func:`_source`). One thread: numba's threads spreading the images over the cores fought
    OpenBLAS's spinning threads between the training's matrix products, and a batch took 8 ms
    instead of 2 on the two cores here."""
    t = images.dtype.type
    cr, cc = t((h - 1) / 2), t((w - 1) / 2)
    # scratch made once per call: each image rewrites the padded copy's interior only
    padded = np.zeros((h + 3) * (w + 3), dtype=images.dtype)
    ink_cols = np.zeros(w, np.bool_)
    rows, cols = np.empty(h, images.dtype), np.empty(h, images.dtype)  # one column's points
    offsets = np.arange(h).astype(images.dtype) - cr
    for b in range(images.shape[0]):
        box = _ink_box(images[b], h, w, ink_cols)
        src, stride, base = _source(images[b], padded, box, h, w)
        first_r, last_r, first_c, last_c = box
        bounds = (t(first_r - 1), t(last_r + 1), t(first_c - 1), t(last_c + 1))
        for j in range(w):
            # a column's points first, in loops without branches (the fields hold each column's
            # values together: no strided reads), then the box test and the reads
            _column_points(maps[b], t(j) - cc, cr, cc, offsets, rows, cols)
            if elastic:
                _add_field(rows, cols, fields[b, 0, j], fields[b, 1, j])
            _read_column(src, stride, base, bounds, rows, cols, out[b], j, w)
