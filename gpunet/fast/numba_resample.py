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
    :func:`gpunet.augment.bilinear` pads), so that the four reads of a point need no bounds test: a point is
    clipped to [-1, H] x [-1, W], where every neighbour exists. One thread: numba's threads spreading the
    images over the cores fought OpenBLAS's spinning threads between the training's matrix products, and a
    batch took 8 ms instead of 2 on the two cores here."""
    t = images.dtype.type
    cr, cc = t((h - 1) / 2), t((w - 1) / 2)
    lo, hi_r, hi_c = t(-1), t(h), t(w)
    hp, wp = h + 3, w + 3
    padded = np.zeros(hp * wp, dtype=images.dtype)  # one buffer: each image rewrites its interior only
    for b in range(images.shape[0]):
        for i in range(h):
            for j in range(w):
                padded[(i + 1) * wp + j + 1] = images[b, i * w + j]
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
                r = min(max(r, lo), hi_r)
                c = min(max(c, lo), hi_c)
                r0, c0 = np.floor(r), np.floor(c)
                fr, fc = r - r0, c - c0
                k = (int(r0) + 1) * wp + int(c0) + 1
                v00, v01, v10, v11 = padded[k], padded[k + 1], padded[k + wp], padded[k + wp + 1]
                top = v00 + fc * (v01 - v00)
                bottom = v10 + fc * (v11 - v10)
                out[b, i * w + j] = top + fr * (bottom - top)
