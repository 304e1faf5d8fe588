"""The compiled CPU kernel of the augmentation's resampling (numba): :func:`gpunet.augment.bilinear` at the
points :func:`gpunet.augment.source_points` gives, in one pass per image instead of some twenty NumPy passes
over the batch (each a full read and write of B x H x W values; timings in BENCHMARKS.md).

Optional like :mod:`gpunet.fast.numba_kernels` (loaded through :func:`gpunet.fast.ops.numba_kernels`'s
switches); the formula is the core's, and tests hold the kernel to it.
"""
from __future__ import annotations

import numba
import numpy as np

# fastmath: LLVM may then vectorise the clip, floor and blend (30% faster here); the rounding it allows
# stays within the tests' 1e-5 of the core's float32 result, and the coordinates are always finite.
_jit = numba.njit(cache=True, nogil=True, error_model="numpy", fastmath=True)


@_jit
def affine_elastic_bilinear(images, maps, fields, elastic, h, w, out):
    """out (B, H*W) = images (B, H*W) read at maps[b] @ (row - cr, col - cc, 1) + (cr, cc) (+ fields[row, b,
    :, col] when ``elastic``), bilinear, zero outside; maps (B, 2, 3), fields (H, B, 2, W), one dtype.

    Each image is first copied into a zero-padded buffer (one row and column before, two after, as
    :func:`gpunet.augment.bilinear` pads), so that the four reads of a point need no bounds test (see the box
    below; the core clips instead, to the same values). One thread: numba's threads spreading the
    images over the cores fought OpenBLAS's spinning threads between the training's matrix products, and a
    batch took 8 ms instead of 2 on the two cores here."""
    t = images.dtype.type
    cr, cc = t((h - 1) / 2), t((w - 1) / 2)
    hp, wp = h + 3, w + 3
    padded = np.zeros(hp * wp, dtype=images.dtype)  # one buffer: each image rewrites its interior only
    for b in range(images.shape[0]):
        first_r, last_r, first_c, last_c = h, -1, w, -1  # the box of the image's nonzero pixels
        for i in range(h):
            for j in range(w):
                v = images[b, i * w + j]
                padded[(i + 1) * wp + j + 1] = v
                if v != 0:
                    first_r, last_r = min(first_r, i), max(last_r, i)
                    first_c, last_c = min(first_c, j), max(last_c, j)
        # a point a pixel or more outside that box reads zeros (or weighs its one nonzero neighbour by 0): its
        # value is 0 without a read. Three quarters of a distorted MNIST digit's pixels: a fifth of the time.
        # The points left lie inside (-1, H) x (-1, W), where the padded image has every neighbour.
        r_lo, r_hi, c_lo, c_hi = t(first_r - 1), t(last_r + 1), t(first_c - 1), t(last_c + 1)
        m00, m01, m02 = maps[b, 0, 0], maps[b, 0, 1], maps[b, 0, 2]
        m10, m11, m12 = maps[b, 1, 0], maps[b, 1, 1], maps[b, 1, 2]
        for i in range(h):
            dr = t(i) - cr
            for j in range(w):
                dc = t(j) - cc
                r = m00 * dr + m01 * dc + m02 + cr
                c = m10 * dr + m11 * dc + m12 + cc
                if elastic:
                    r += fields[i, b, 0, j]
                    c += fields[i, b, 1, j]
                if not (r > r_lo and r < r_hi and c > c_lo and c < c_hi):
                    out[b, i * w + j] = 0
                    continue
                r0, c0 = np.floor(r), np.floor(c)
                fr, fc = r - r0, c - c0
                k = (int(r0) + 1) * wp + int(c0) + 1
                v00, v01, v10, v11 = padded[k], padded[k + 1], padded[k + wp], padded[k + wp + 1]
                top = v00 + fc * (v01 - v00)
                bottom = v10 + fc * (v11 - v10)
                out[b, i * w + j] = top + fr * (bottom - top)
