"""The IDX file format (the MNIST files'): read and write 1-4 dimensional arrays, raw or gzipped.

Images come out as float32 (N, rows*cols) in [0, 1] (or as the raw uint8 bytes, for
:class:`gpunet.data.rows.Pixels`), labels as int64 (N,). Problems raise :class:`DataError`, naming
the file.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .. import files
from . import DataError

# IDX type code -> on-disk dtype (IDX stores multi-byte values big-endian).
_IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_ROWS = 4096  # images decoded per step: a few MB of uint8 scratch, whatever the file size


def _read_header(stream, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated: too short for an IDX header ({len(head)} bytes)")
    if head[0] or head[1]:
        raise DataError(
            f"{path}: bad magic number 0x{head.hex()}: not an IDX file "
            f"(IDX starts with two zero bytes, a type code and a dimension count)"
        )
    code, ndim = head[2], head[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if not 1 <= ndim <= 4:
        raise DataError(
            f"{path}: bad IDX dimension count {ndim} in the magic number (1 to 4 allowed)"
        )
    raw = stream.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataError(f"{path}: truncated: header ends inside the {ndim} dimension sizes")
    dims = struct.unpack(f">{ndim}I", raw)
    if 0 in dims[1:]:  # zero items is a valid (empty) file; a zero-sized item is not
        raise DataError(f"{path}: bad IDX dimensions {dims}: sizes after the first must be > 0")
    return _IDX_TYPES[code], dims


def _check_size(path, expected: int, found: int) -> None:
    if found < expected:
        raise DataError(f"{path}: truncated: expected {expected} bytes of data, found {found}")
    if found > expected:
        raise DataError(f"{path} has {found - expected} unexpected trailing bytes after the data")


@contextlib.contextmanager
def open_idx(path: Path, header=True):
    """Yield (stream at the payload, on-disk dtype, dims, payload bytes), turning read errors into
    DataError; with ``header=False``, (stream at the start, None, None, None)."""
    is_gz = False
    try:
        with open(path, "rb") as raw:
            is_gz = raw.read(2) == GZIP_MAGIC  # the content decides, not the suffix
            raw.seek(0)
            with gzip.GzipFile(fileobj=raw, mode="rb") if is_gz else raw as stream:
                if not header:
                    yield stream, None, None, None
                    return
                item, dims = _read_header(stream, path)
                expected = math.prod(dims) * item.itemsize
                if not is_gz:  # a raw file's size is known: fail before allocating anything
                    _check_size(path, expected, os.fstat(raw.fileno()).st_size - 4 - 4 * len(dims))
                yield stream, item, dims, expected
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip stream ({exc})") from exc
    except OSError as exc:
        raise DataError(
            f"{path}: {'corrupt gzip stream' if is_gz else 'cannot read'} ({exc})"
        ) from exc


def _alloc(shape, dtype, path) -> np.ndarray:
    try:
        return np.empty(shape, dtype)
    except (ValueError, MemoryError) as exc:  # a corrupt header can claim absurd sizes
        raise DataError(
            f"{path}: IDX header claims shape {shape}, which cannot be allocated"
        ) from exc


def _fill(stream, buf: np.ndarray) -> int:
    """Read into the contiguous uint8 array `buf` until full or end of stream; return the bytes
    read."""
    # an ndarray is a buffer (NumPy's hints say so for Python 3.12 on only)
    view, got = memoryview(buf.reshape(-1)), 0  # type: ignore[arg-type]
    while got < len(view) and (n := stream.readinto(view[got:])):
        got += n
    return got


def _finish(stream, path, expected: int, got: int) -> None:
    """Check the payload size; reading to the end also makes gzip check its CRC."""
    while got >= expected and (block := stream.read(1 << 20)):
        got += len(block)
    _check_size(path, expected, got)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian array of the file's shape and
    dtype."""
    path = Path(path)
    with open_idx(path) as (stream, item, dims, expected):
        buf = _alloc(expected, np.uint8, path)
        _finish(stream, path, expected, _fill(stream, buf))
    arr = buf.view(item).reshape(dims)
    if not item.isnative:  # swap in place: no second copy of a big array
        arr = arr.byteswap(inplace=True).view(item.newbyteorder())
    return arr


def atomic_write(path: Path, write) -> None:
    """``files.atomic_write`` with an OSError turned into a DataError naming the file."""
    try:
        files.atomic_write(path, write)
    except OSError as exc:
        raise DataError(f"cannot write {path} ({exc})") from exc


def write_idx(path, array) -> None:
    """Write `array` (1 to 4 dims of uint8, int8, int16, int32, float32 or float64) as IDX, gzipped
    if `path` ends with ``.gz``: the inverse of :func:`read_idx`. The file appears atomically."""
    path, array = Path(path), np.asarray(array)
    codes = {(d.kind, d.itemsize): c for c, d in _IDX_TYPES.items()}
    code = codes.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or not 1 <= array.ndim <= 4:
        raise DataError(
            f"{path}: IDX stores 1 to 4 dimensions of uint8, int8, int16, int32, float32 or "
            f"float64, not {array.dtype} of shape {array.shape}"
        )
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    payload = np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).reshape(-1).view(np.uint8)

    def write(f):
        # mtime=0: the same array always gives the same bytes
        gz = path.name.endswith(".gz")
        with (
            gzip.GzipFile("", "wb", fileobj=f, mtime=0) if gz else contextlib.nullcontext(f) as out
        ):
            out.write(header)
            out.write(payload)

    atomic_write(path, write)


def load_idx_images(path, dtype=np.float32) -> np.ndarray:
    """Read a 3-D uint8 IDX file (N, rows, cols) as an array (N, rows*cols) of `dtype` in [0, 1], or
    of the raw 0..255 bytes for ``dtype=np.uint8`` (wrap those in :class:`gpunet.data.rows.Pixels`
    to train).

    The output is allocated once and filled chunk by chunk while the file streams in, so the peak
    memory is the output plus a few MB (never a float64 copy nor the whole uint8 payload).
    """
    path, dtype = Path(path), np.dtype(dtype)
    if dtype.kind != "f" and dtype != np.uint8:
        raise ValueError(f"dtype: expected a floating type or uint8 (raw pixels), got {dtype}")
    with open_idx(path) as (stream, item, dims, expected):
        if len(dims) != 3 or item != np.uint8:
            raise DataError(
                f"{path}: expected 3-D uint8 images (N, rows, cols), "
                f"got {len(dims)}-D {item.name} data of shape {dims}"
            )
        n, pixels = dims[0], dims[1] * dims[2]
        out = _alloc((n, pixels), dtype, path)
        # raw bytes stream straight into the output; floats go through a small uint8 chunk
        chunk = None if dtype == np.uint8 else np.empty((min(n, _CHUNK_ROWS), pixels), np.uint8)
        for start in range(0, n, _CHUNK_ROWS):
            rows = min(_CHUNK_ROWS, n - start)
            dest = out[start : start + rows] if chunk is None else chunk[:rows]
            if (got := _fill(stream, dest)) < rows * pixels:
                _check_size(path, expected, start * pixels + got)
            if (
                chunk is not None
            ):  # dtype= pins the arithmetic to the output type: no float64 temporaries
                np.divide(dest, 255, out=out[start : start + rows], dtype=dtype)
        _finish(stream, path, expected, expected)
    return out


def load_idx_labels(path) -> np.ndarray:
    """Read a 1-D integer IDX labels file (uint8 in MNIST) as an int64 array of shape (N,)."""
    raw = read_idx(path := Path(path))
    if raw.ndim != 1 or raw.dtype.kind not in "ui":
        raise DataError(
            f"{path}: expected 1-D integer labels, got {raw.dtype} of shape {raw.shape}"
        )
    if raw.size and raw.min() < 0:
        raise DataError(f"{path}: labels must be non-negative, found {raw.min()}")
    return raw.astype(np.int64)
