"""Features read batch by batch, through one interface: ``Rows`` for a float array, ``Pixels`` for
images kept as bytes. Both give ``len()``, ``shape``, ``dtype``, ``to(device)``, ``x[lo:hi]`` (a new
float array) and ``take(idx, out)`` (rows ``idx`` written into a reused buffer); ``as_rows(x)``
wraps an array.

Pixels: a uint8 array read as floats in [0, 1].

MNIST's 60,000 training images take 188 MB as float32 and 47 MB as uint8. ``Pixels`` keeps the bytes
and converts only the rows a batch needs, ``float32(pixel) / float32(255)``: bit for bit the values
``load_mnist`` returns as float32, so training on ``Pixels`` gives the same weights as training on
the float32 set. Why: a quarter of the memory (training MNIST grows the process by 0.36 instead of
1.23 times the float32 set plus the model). On the CPU the gather and the scaling are one compiled
pass; its speed is that of a float32 gather (it pays memory latency per row, not bytes:
BENCHMARKS.md).

    (x, y), (x_test, y_test) = load_mnist(dtype=np.uint8)
    fit(net, loss, opt, Pixels(x), y, validation=(Pixels(x_test), y_test))

``fit``, ``evaluate``, ``predict`` and ``predict_proba`` accept a ``Pixels`` wherever they accept
features; any other features reach them through ``as_rows``, the front door
(:mod:`gpunet.data.arrays`).
"""

from __future__ import annotations

import numpy as np

from ..backend import Array, DTypeLike, device_of, get_array_module, to_device
from ..fast import gather_scaled
from .arrays import features


class Pixels:
    """A (N, features) uint8 array ``raw`` that reads as ``raw / 255`` in ``dtype`` (float32 by
    default).

    ``shape``, ``ndim``, ``dtype`` and ``len()`` describe the float array it stands for;
    ``x[lo:hi]`` is that array's rows as a new float array; ``take(idx, out)`` writes rows ``idx``
    into ``out``.
    """

    divisor = 255

    def __init__(self, raw: Array, dtype: DTypeLike = np.float32) -> None:
        if not hasattr(raw, "dtype") or not hasattr(raw, "shape"):
            raise TypeError(f"raw: expected a NumPy or CuPy uint8 array, got {type(raw).__name__}")
        if raw.dtype != np.uint8 or raw.ndim != 2:
            raise TypeError(
                f"raw: expected a 2-D uint8 array (N, features) of 0..255 pixels, "
                f"got {raw.ndim}-D {raw.dtype}"
            )
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"dtype: expected a floating type, got {dtype}")
        xp = get_array_module(raw)
        self.raw = xp.ascontiguousarray(raw)
        self.dtype = dtype

    @property
    def shape(self) -> tuple:
        return tuple(self.raw.shape)

    @property
    def ndim(self) -> int:
        return 2

    def __len__(self) -> int:
        return self.raw.shape[0]

    @property
    def device(self) -> str:
        return device_of(self.raw)

    def to(self, device: str | None) -> Pixels:
        """The same pixels on ``device`` (no copy when they are already there)."""
        raw = to_device(self.raw, device)
        return self if raw is self.raw else Pixels(raw, self.dtype)

    def _scaled(self, rows: Array, out: Array | None = None) -> Array:
        """``rows / 255`` computed in ``dtype`` (no float64 step), into ``out`` or a new array."""
        return get_array_module(rows).divide(
            rows, self.dtype.type(self.divisor), out=out, dtype=self.dtype
        )

    def __getitem__(self, key: slice) -> Array:
        if not isinstance(key, slice):
            raise TypeError(
                f"key: expected a slice of rows, got {type(key).__name__}; use take() for indices"
            )
        return self._scaled(self.raw[key])

    def take(self, idx: Array | slice, out: Array) -> Array:
        """Rows ``idx`` ((K,) integers, or a slice of K rows) as floats, written into ``out[:K]``
        ((>= K, features), ``dtype``); returns ``out[:K]``."""
        k = len(range(*idx.indices(len(self)))) if isinstance(idx, slice) else len(idx)
        if out.dtype != self.dtype or tuple(out.shape[1:]) != self.shape[1:] or out.shape[0] < k:
            raise ValueError(
                f"out: expected a ({k}+, {self.shape[1]}) {self.dtype} array, "
                f"got {tuple(out.shape)} {out.dtype}"
            )
        if isinstance(idx, slice):
            return self._scaled(self.raw[idx], out[:k])
        return gather_scaled(self.raw, idx, out, self.divisor)

    def numpy(self) -> np.ndarray:
        """The whole float array on the host (N, features): what ``load_mnist`` returns as
        float32."""
        return self._scaled(to_device(self.raw, "cpu"))

    def __repr__(self) -> str:
        return f"Pixels(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class Rows:
    """A float array ``data`` (N, features) behind the same interface as :class:`Pixels`."""

    def __init__(self, data: Array) -> None:
        if not hasattr(data, "shape") or not hasattr(data, "dtype") or data.ndim != 2:
            got = getattr(data, "shape", type(data).__name__)
            raise ValueError(f"x: expected a 2-D array of features (N, features), got {got}")
        if data.dtype.kind != "f":
            raise TypeError(
                f"x: expected floating-point features, got {data.dtype}; wrap uint8 images in "
                f"gpunet.Pixels(x), or scale them with x.astype(np.float32) / 255"
            )
        self.data = data

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return 2

    @property
    def device(self) -> str:
        return device_of(self.data)

    def __len__(self) -> int:
        return self.data.shape[0]

    def to(self, device: str | None) -> Rows:
        data = to_device(self.data, device)
        return self if data is self.data else Rows(data)

    def __getitem__(self, key: slice) -> Array:
        if not isinstance(key, slice):
            raise TypeError(
                f"key: expected a slice of rows, got {type(key).__name__}; use take() for indices"
            )
        return self.data[key]

    def take(self, idx: Array, out: Array) -> Array:
        """Rows ``idx`` ((K,) integers) written into ``out[:K]``; returns ``out[:K]``."""
        xp = get_array_module(self.data)
        # NumPy's default mode="raise" copies through a new temporary; the indices are a
        # permutation, always in range (CuPy's take has no mode argument)
        extra = {"mode": "clip"} if xp is np else {}
        return xp.take(self.data, idx, axis=0, out=out[: len(idx)], **extra)

    def numpy(self) -> np.ndarray:
        return to_device(self.data, "cpu")


def as_rows(x, dtype=None, device: str | None = None, name: str = "x"):
    """``x`` as ``Rows`` or ``Pixels`` of ``dtype`` on ``device`` (``None``: as they are; for other
    data, the features' own floating dtype, else float32). ``Rows`` and ``Pixels`` already so are
    returned themselves; anything else goes through the front door,
    :func:`gpunet.data.arrays.features`."""
    if isinstance(x, Pixels):
        x = x if dtype is None or x.dtype == np.dtype(dtype) else Pixels(x.raw, dtype)
        return x if device is None else x.to(device)
    if isinstance(x, Rows):
        if (dtype is None or x.dtype == np.dtype(dtype)) and (device is None or x.device == device):
            return x
        x = x.data
    kind = getattr(getattr(x, "dtype", None), "kind", None)
    dtype = dtype if dtype is not None else (x.dtype if kind == "f" else np.float32)
    device = device if device is not None else device_of(x)
    return Rows(features(x, dtype, device, name))
