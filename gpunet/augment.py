"""Random distortions of image batches, drawn afresh for every sample of every epoch (issue 25).

Two kinds, combined into one resampling per image:

- **affine**: rotation, isotropic scale, shear and translation about the image centre;
- **elastic** (Simard, Steinkraus and Platt, ICDAR 2003): a displacement field drawn uniformly in
  [-1, 1] per pixel and coordinate, smoothed by a Gaussian of standard deviation ``sigma`` and
scaled by ``alpha``.

An output pixel ``p`` (row, column) reads the input at ``A^-1 (p - c - t) + c + alpha *
G(field)(p)``, with ``A = rotation . shear . scale``, ``c`` the centre and ``t`` the shift, by
bilinear interpolation with zeros outside the image (scipy.ndimage's ``mode="grid-constant"``,
``order=1``: the tests' oracle).

Written once against ``xp``: the Gaussian smoothing is two matrix products for the whole batch (the
filter along columns and along rows, ``G_h F G_w^T``, with scipy's ``mode="reflect"`` folded into
``G``), the coordinates one matrix product per image batch, the resampling four gathers and their
bilinear weights. All random numbers are drawn on the host from the object's own seeded NumPy
generator and moved, so a CPU run and a GPU run distort alike; ``state_dict()`` carries the
generator for checkpoints.

This module imports the backend, and the fast path for its compiled CPU resampling
(:func:`gpunet.fast.resample`, held to :func:`bilinear` by the tests; ``GPUNET_FAST=0`` turns it
off).
"""

from __future__ import annotations

import inspect

import numpy as np

from . import fast as fast_path
from .backend import device_of, get_array_module, to_device


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """(n, n) float64 ``G`` with ``G @ f`` equal to ``scipy.ndimage.gaussian_filter1d(f, sigma,
    mode="reflect", truncate=truncate)`` for any (n,) ``f``: scipy's kernel (radius ``int(truncate *
    sigma + 0.5)``, normalised to sum 1), the reflected taps folded back onto the pixels they
    read."""
    radius = int(truncate * sigma + 0.5)
    taps = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (taps / sigma) ** 2)
    weights /= weights.sum()
    g = np.zeros((n, n))
    for i in range(n):
        j = np.mod(
            i + taps, 2 * n
        )  # reflect mode is periodic with period 2n: (d c b a | a b c d | d c b a)
        j = np.where(j >= n, 2 * n - 1 - j, j)
        np.add.at(g[i], j, weights)
    return g


def affine_inverse(rotation, scale, shear, shift) -> np.ndarray:
    """(B, 2, 3) float64 maps from an output pixel's offset from the centre, (row, col, 1), to the
    input point it reads, less the centre: ``A^-1 (p - c - t)``. ``rotation``, ``shear`` (B,)
    radians, ``scale`` (B,), ``shift`` (B, 2) pixels (row, col). Computed on the host: a handful of
    numbers per image."""
    cos, sin, tan = np.cos(rotation), np.sin(rotation), np.tan(shear)
    # A = R(rotation) @ [[1, 0], [tan(shear), 1]] @ (scale * I) = scale * [[cos - sin tan, -sin],
    # [sin + cos tan, cos]] in (row, col) coordinates; its determinant is scale^2, so A^-1 is the
    # adjugate over scale
    out = np.empty((len(scale), 2, 3))
    out[:, 0, 0], out[:, 0, 1] = cos, sin
    out[:, 1, 0], out[:, 1, 1] = -(sin + cos * tan), cos - sin * tan
    out[:, :, :2] /= np.asarray(scale)[:, None, None]
    out[:, :, 2] = -(out[:, :, 0] * shift[:, :1] + out[:, :, 1] * shift[:, 1:])
    return out


LEVEL = 1 / 128  # the spacing of the field's 256 levels: code c stands for (c + 0.5) * LEVEL


def field_values(codes, dtype=np.float32):
    """The displacements that the int8 ``codes`` stand for: ``(code + 0.5) / 128``, the 256 levels
    of [-1, 1] spaced 1/128 apart, symmetric about 0 (variance 1/3, as the continuous uniform's, to
    1e-5)."""
    t = np.dtype(dtype).type
    out = codes.astype(dtype)
    out += t(0.5)  # both steps exact in any float type: multiples of 1/256 below 2
    out *= t(LEVEL)
    return out


def smooth_fields(field, g_rows, g_cols, out=None):
    """``g_rows @ f @ g_cols.T`` for every (H, W) field ``f = field[:, k, :]`` of ``field`` (H, K,
    W): the Gaussian filter along both axes, returned transposed, as (K, W, H) (``[k, j, i]`` is
    pixel (i, j)'s). Each axis is one matrix product over all the fields, with their long axis as
    the product's rows: along the columns, (H*K, W) @ (W, W); then along the rows, on that result
    read transposed in place, (K*W, H) @ (H, H). OpenBLAS runs that shape about 1.4x faster than (H,
    H) @ (H, K*W), the other way to reach the rows without a transposing pass. ``out``: two (H, K*W)
    arrays of the result's dtype to write the two products into, or None."""
    xp = get_array_module(field)
    h, k, w = field.shape
    down, smooth = (None, None) if out is None else out
    down = xp.matmul(
        field.reshape(h * k, w), g_cols.T, out=None if down is None else down.reshape(h * k, w)
    )
    smooth = xp.matmul(
        down.reshape(h, k * w).T, g_rows.T, out=None if smooth is None else smooth.reshape(k * w, h)
    )
    return smooth.reshape(k, w, h)


def source_points(maps, shape, fields=None):
    """(B, 2, H*W) input points (row, col) the output pixels read: ``maps`` (B, 2, 3) from
    :func:`affine_inverse` applied to every pixel's offset from the centre, plus the centre and the
    elastic ``fields`` (B, 2, W, H) displacements when given (``fields[b, :, j, i]`` is pixel (i,
    j)'s of image b: transposed, as :func:`smooth_fields` leaves them). Works in ``maps``' dtype."""
    xp = get_array_module(maps)
    h, w = shape
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    grid = np.stack(
        [rows.ravel() - (h - 1) / 2, cols.ravel() - (w - 1) / 2, np.ones(h * w)]
    )  # (3, H*W)
    grid = to_device(grid.astype(maps.dtype), device_of(maps))
    centre = xp.asarray(np.array([(h - 1) / 2, (w - 1) / 2], dtype=maps.dtype)[:, None])
    pts = xp.matmul(maps, grid)
    pts += centre
    if fields is not None:
        pts += fields.transpose(0, 1, 3, 2).reshape(len(maps), 2, h * w)
    return pts


def bilinear(images, points, shape):
    """``images`` (B, H*W) sampled at ``points`` (B, 2, H*W) (row, col) by bilinear interpolation,
    zero outside the image; returns (B, H*W) in the images' dtype. A point reads four pixels of the
    image padded by zeros (one row/column before, two after, so a clipped point's weightless
    neighbour exists)."""
    xp = get_array_module(images)
    b = len(images)
    h, w = shape
    hp, wp = h + 3, w + 3
    padded = xp.zeros((b, hp, wp), dtype=images.dtype)
    padded[:, 1 : h + 1, 1 : w + 1] = images.reshape(b, h, w)
    r = xp.clip(
        points[:, 0], -1, h
    )  # beyond one pixel outside, every neighbour is zero: clip there
    c = xp.clip(points[:, 1], -1, w)
    r0, c0 = xp.floor(r), xp.floor(c)
    fr, fc = r - r0, c - c0
    idx = (r0 * wp + c0).astype(np.int64)
    idx += xp.asarray((np.arange(b) * (hp * wp) + wp + 1)[:, None])
    flat = padded.reshape(-1)
    v00, v01 = xp.take(flat, idx), xp.take(flat[1:], idx)
    v10, v11 = xp.take(flat[wp:], idx), xp.take(flat[wp + 1 :], idx)
    top = v00 + fc * (v01 - v00)
    bottom = v10 + fc * (v11 - v10)
    return top + fr * (bottom - top)


def _span(name, value, low=0, high=None):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not (value >= low and (high is None or value < high))
    ):
        bound = f"in [{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name}: expected a number {bound}, got {value!r}")
    return float(value)


class Augment:
    """Random affine and elastic distortions of (B, H*W) image batches, fresh for every call.

    ``rotation`` and ``shear`` in degrees (uniform in [-r, r]), ``scale`` a fraction (uniform factor
    in [1 - s, 1 + s]), ``shift`` in pixels (uniform in [-s, s] per axis), ``sigma``/``alpha`` the
    elastic field's smoothing and strength (``alpha=0``: no elastic part). ``shape`` is the image's
    (H, W). ``seed`` seeds the generator every draw comes from. As a ``fit`` callback,
    ``transform_batch(run, xb)`` distorts each training batch;
    ``state_dict()``/``load_state_dict()`` carry the generator.
    """

    def __init__(
        self,
        rotation=8.0,
        scale=0.08,
        shear=0.0,
        shift=2.0,
        sigma=4.0,
        alpha=25.0,
        shape=(28, 28),
        seed=0,
    ):
        self.rotation, self.shear = (
            _span("rotation", rotation, 0, 180),
            _span("shear", shear, 0, 90),
        )
        self.scale, self.shift = _span("scale", scale, 0, 1), _span("shift", shift)
        self.sigma, self.alpha = _span("sigma", sigma, 1e-3), _span("alpha", alpha)
        if len(shape) != 2 or any(not isinstance(s, (int, np.integer)) or s < 1 for s in shape):
            raise ValueError(f"shape: expected (height, width) positive integers, got {shape!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.rng = np.random.default_rng(seed)
        # (dtype, device, n) -> the smoothing's matrices and buffers: see _workspace
        self._work = {}

    def config(self) -> dict:
        return {
            "rotation": self.rotation,
            "scale": self.scale,
            "shear": self.shear,
            "shift": self.shift,
            "sigma": self.sigma,
            "alpha": self.alpha,
            "shape": list(self.shape),
        }

    def draw(self, n: int) -> dict:
        """The host draws for ``n`` images: ``rotation``, ``shear`` (n,) radians, ``scale`` (n,),
        ``shift`` (n, 2) pixels, and ``field`` (n, 2, H, W) int8 codes (a view of memory laid out
        (H, n, 2, W)) of displacements uniform in [-1, 1] (see :func:`field_values`; absent when
        ``alpha`` is 0). Bytes, not floats: a quarter of the random bits and of the bytes moved to a
        GPU, and 256 levels are far finer than what the smoothing keeps."""
        rng = self.rng
        deg = np.pi / 180
        params = {
            "rotation": rng.uniform(-self.rotation, self.rotation, n) * deg,
            "scale": rng.uniform(1 - self.scale, 1 + self.scale, n),
            "shear": rng.uniform(-self.shear, self.shear, n) * deg,
            "shift": rng.uniform(-self.shift, self.shift, (n, 2)),
        }
        if (
            self.alpha > 0
        ):  # the generator's raw 64-bit words cut into bytes: 6x faster than rng.bytes
            h, w = self.shape
            size = n * 2 * h * w
            codes = rng.bit_generator.random_raw(-(-size // 8)).view(np.int8)[:size]
            params["field"] = codes.reshape(h, n, 2, w).transpose(
                1, 2, 0, 3
            )  # laid out rows first: see apply
        return params

    def apply(self, images, params):
        """``images`` (B, H*W) distorted by the drawn ``params`` (see :meth:`draw`); same dtype,
        device. Not for two threads at once: the smoothing writes into buffers the object keeps."""
        if images.ndim != 2 or images.shape[1] != self.shape[0] * self.shape[1]:
            raise ValueError(
                f"images: expected (B, {self.shape[0] * self.shape[1]}) for {self.shape} images, "
                f"got {tuple(images.shape)}"
            )
        device = device_of(images)
        maps = affine_inverse(params["rotation"], params["scale"], params["shear"], params["shift"])
        fields = None
        if (
            "field" in params
        ):  # (n, 2, H, W) codes, as (H, n, 2, W) in memory (no copy for draw's own)
            (h, w), n = self.shape, len(images)
            codes = to_device(
                np.ascontiguousarray(np.asarray(params["field"]).transpose(2, 0, 1, 3)), device
            )
            # field_values(c) = c LEVEL + LEVEL/2 and each row of G sums to 1, so G field_values(c)
            # G^T = G c G^T LEVEL + LEVEL/2: the codes go into the products as they are (LEVEL is in
            # g_rows) and the constant joins the maps' shift. One pass over the fields fewer; and
            # the buffers are kept, because fresh arrays of this size cost more in page faults than
            # the products.
            g_rows, g_cols, cast, down, smooth = self._workspace(images)
            cast[...] = codes.reshape(h, n * 2 * w)
            fields = smooth_fields(
                cast.reshape(h, n * 2, w), g_rows, g_cols, (down, smooth)
            ).reshape(n, 2, w, h)
            maps[:, :, 2] += self.alpha * LEVEL / 2
        maps = to_device(maps.astype(images.dtype), device)
        out = fast_path.resample(images, maps, fields, self.shape) if fast_path.enabled() else None
        return (
            out
            if out is not None
            else bilinear(images, source_points(maps, self.shape, fields), self.shape)
        )

    def _workspace(self, images):
        """The smoothing's two matrices (``alpha * LEVEL`` folded into the rows') and its three (H,
        n*2*W) buffers, for ``images``' n, dtype and device; kept for the next batch of the same
        size."""
        xp, device, dtype, n = (
            get_array_module(images),
            device_of(images),
            images.dtype,
            len(images),
        )
        key = (dtype.str, device, n)
        if key not in self._work:
            if len(self._work) >= 4:  # batch sizes come and go (an epoch's last batch): keep a few
                self._work.clear()
            h, w = self.shape
            self._work[key] = (
                to_device(
                    (self.alpha * LEVEL * gaussian_matrix(h, self.sigma)).astype(dtype), device
                ),
                to_device(gaussian_matrix(w, self.sigma).astype(dtype), device),
                *(xp.empty((h, n * 2 * w), dtype=dtype) for _ in range(3)),
            )
        return self._work[key]

    def __call__(self, images):
        """A fresh distortion of every image in ``images`` (B, H*W)."""
        return self.apply(images, self.draw(len(images)))

    def transform_batch(self, run, xb):
        """``xb`` distorted; in a data-parallel run (``run.batch_rows`` rows in the global batch,
        this rank's from ``run.row_start`` on) each image takes the draw of its row in the global
        batch, so that K ranks distort as one process does."""
        rows, start = getattr(run, "batch_rows", 0), getattr(run, "row_start", 0)
        if not rows or rows == len(xb):
            return self(xb)
        params = self.draw(rows)
        return self.apply(xb, {k: v[start : start + len(xb)] for k, v in params.items()})

    def state_dict(self) -> dict:
        return {"config": self.config(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") != self.config():
            raise ValueError(
                f"state: expected an augmentation with {self.config()}, got {state.get('config')}"
            )
        self.rng.bit_generator.state = state["rng"]


# Augment's default settings by name (rotation, scale, shear, shift, sigma, alpha): the one place
# the command line's --aug-* flags and the training recipe's config take theirs from.
DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(Augment).parameters.items()
    if name not in ("shape", "seed")
}
