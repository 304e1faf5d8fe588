"""Data: IDX files (the MNIST format), the MNIST loader and downloader, validation splits.

Images come out as float32 (N, rows*cols) in [0, 1] (or as the raw uint8 bytes, for
:class:`gpunet.pixels.Pixels`), labels as int64 (N,). Any folder holding the four
MNIST file names (raw or .gz) loads the same way, so Fashion-MNIST and the like work unchanged. Imports
only NumPy and the standard library, no other gpunet module. Data problems raise DataError.
Pictures for prediction (image files) are in :mod:`gpunet.images`.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names the file and the problem."""


# IDX type code -> on-disk dtype (IDX stores multi-byte values big-endian).
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK_ROWS = 4096  # images decoded per step: a few MB of uint8 scratch, whatever the file size

MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
               "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
# MD5 of the decompressed files: they identify MNIST however the files were compressed.
MNIST_MD5 = {"train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
             "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
             "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
             "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637"}
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/",
                 "http://yann.lecun.com/exdb/mnist/")


# ---------------------------------------------------------------------------------------------- IDX
def _read_header(stream, path: Path) -> tuple[np.dtype, tuple[int, ...]]:
    head = stream.read(4)
    if len(head) < 4:
        raise DataError(f"{path}: truncated: too short for an IDX header ({len(head)} bytes)")
    if head[0] or head[1]:
        raise DataError(f"{path}: bad magic number 0x{head.hex()}: not an IDX file "
                        f"(IDX starts with two zero bytes, a type code and a dimension count)")
    code, ndim = head[2], head[3]
    if code not in _IDX_TYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_TYPES)
        raise DataError(f"{path}: unknown IDX type code 0x{code:02X} (known: {known})")
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: bad IDX dimension count {ndim} in the magic number (1 to 4 allowed)")
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
def _open_idx(path: Path, header=True):
    """Yield (stream at the payload, on-disk dtype, dims, payload bytes), turning read errors into
    DataError; with ``header=False``, (stream at the start, None, None, None)."""
    is_gz = False
    try:
        with open(path, "rb") as raw:
            is_gz = raw.read(2) == _GZIP_MAGIC  # the content decides, not the suffix
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
        raise DataError(f"{path}: {'corrupt gzip stream' if is_gz else 'cannot read'} ({exc})") from exc


def _alloc(shape, dtype, path) -> np.ndarray:
    try:
        return np.empty(shape, dtype)
    except (ValueError, MemoryError) as exc:  # a corrupt header can claim absurd sizes
        raise DataError(f"{path}: IDX header claims shape {shape}, which cannot be allocated") from exc


def _fill(stream, buf: np.ndarray) -> int:
    """Read into the contiguous uint8 array `buf` until full or end of stream; return the bytes read."""
    view, got = memoryview(buf.reshape(-1)), 0
    while got < len(view) and (n := stream.readinto(view[got:])):
        got += n
    return got


def _finish(stream, path, expected: int, got: int) -> None:
    """Check the payload size; reading to the end also makes gzip check its CRC."""
    while got >= expected and (block := stream.read(1 << 20)):
        got += len(block)
    _check_size(path, expected, got)


def read_idx(path) -> np.ndarray:
    """Read an IDX file (raw or gzipped) into a native-endian array of the file's shape and dtype."""
    path = Path(path)
    with _open_idx(path) as (stream, item, dims, expected):
        buf = _alloc(expected, np.uint8, path)
        _finish(stream, path, expected, _fill(stream, buf))
    arr = buf.view(item).reshape(dims)
    if not item.isnative:  # swap in place: no second copy of a big array
        arr = arr.byteswap(inplace=True).view(item.newbyteorder())
    return arr


def _atomic_write(path: Path, write) -> None:
    """Call write(binary_file) on a temp file beside `path`, then rename: never a half file at `path`."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise DataError(f"cannot write {path} ({exc})") from exc
        raise


def write_idx(path, array) -> None:
    """Write `array` (1 to 4 dims of uint8, int8, int16, int32, float32 or float64) as IDX, gzipped if
    `path` ends with ``.gz``: the inverse of :func:`read_idx`. The file appears atomically."""
    path, array = Path(path), np.asarray(array)
    codes = {(d.kind, d.itemsize): c for c, d in _IDX_TYPES.items()}
    code = codes.get((array.dtype.kind, array.dtype.itemsize))
    if code is None or not 1 <= array.ndim <= 4:
        raise DataError(f"{path}: IDX stores 1 to 4 dimensions of uint8, int8, int16, int32, float32 or "
                        f"float64, not {array.dtype} of shape {array.shape}")
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, code, array.ndim, *array.shape)
    payload = np.ascontiguousarray(array, dtype=_IDX_TYPES[code]).reshape(-1).view(np.uint8)

    def write(f):
        # mtime=0: the same array always gives the same bytes
        gz = path.name.endswith(".gz")
        with gzip.GzipFile("", "wb", fileobj=f, mtime=0) if gz else contextlib.nullcontext(f) as out:
            out.write(header)
            out.write(payload)

    _atomic_write(path, write)


def load_idx_images(path, dtype=np.float32) -> np.ndarray:
    """Read a 3-D uint8 IDX file (N, rows, cols) as an array (N, rows*cols) of `dtype` in [0, 1], or of
    the raw 0..255 bytes for ``dtype=np.uint8`` (wrap those in :class:`gpunet.pixels.Pixels` to train).

    The output is allocated once and filled chunk by chunk while the file streams in, so the peak memory
    is the output plus a few MB (never a float64 copy nor the whole uint8 payload).
    """
    path, dtype = Path(path), np.dtype(dtype)
    if dtype.kind != "f" and dtype != np.uint8:
        raise ValueError(f"dtype: expected a floating type or uint8 (raw pixels), got {dtype}")
    with _open_idx(path) as (stream, item, dims, expected):
        if len(dims) != 3 or item != np.uint8:
            raise DataError(f"{path}: expected 3-D uint8 images (N, rows, cols), "
                            f"got {len(dims)}-D {item.name} data of shape {dims}")
        n, pixels = dims[0], dims[1] * dims[2]
        out = _alloc((n, pixels), dtype, path)
        # raw bytes stream straight into the output; floats go through a small uint8 chunk
        chunk = None if dtype == np.uint8 else np.empty((min(n, _CHUNK_ROWS), pixels), np.uint8)
        for start in range(0, n, _CHUNK_ROWS):
            rows = min(_CHUNK_ROWS, n - start)
            dest = out[start:start + rows] if chunk is None else chunk[:rows]
            if (got := _fill(stream, dest)) < rows * pixels:
                _check_size(path, expected, start * pixels + got)
            if chunk is not None:  # dtype= pins the arithmetic to the output type: no float64 temporaries
                np.divide(dest, 255, out=out[start:start + rows], dtype=dtype)
        _finish(stream, path, expected, expected)
    return out


def load_idx_labels(path) -> np.ndarray:
    """Read a 1-D integer IDX labels file (uint8 in MNIST) as an int64 array of shape (N,)."""
    raw = read_idx(path := Path(path))
    if raw.ndim != 1 or raw.dtype.kind not in "ui":
        raise DataError(f"{path}: expected 1-D integer labels, got {raw.dtype} of shape {raw.shape}")
    if raw.size and raw.min() < 0:
        raise DataError(f"{path}: labels must be non-negative, found {raw.min()}")
    return raw.astype(np.int64)


# -------------------------------------------------------------------------------------------- MNIST
def default_data_dir() -> Path:
    """``$GPUNET_DATA`` if set, else ``$XDG_CACHE_HOME/gpunet/mnist`` (or ``~/.cache/gpunet/mnist``)."""
    if os.environ.get("GPUNET_DATA"):
        return Path(os.environ["GPUNET_DATA"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "gpunet" / "mnist"


def resolve_data_dir(data_dir=None) -> Path:
    """The folder to use: `data_dir` if given, else :func:`default_data_dir`."""
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _missing(folder: Path) -> list[str]:
    return [n for n in MNIST_FILES.values() if not any((folder / f).is_file() for f in (n, f"{n}.gz"))]


def _where_to_put(folder: Path) -> str:
    return (f"Put the four files ({', '.join(MNIST_FILES.values())}; raw or .gz) in {folder} by hand, "
            f"or select the folder holding them with GPUNET_DATA or --data-dir.")


def find_mnist_files(folder) -> dict[str, Path]:
    """Map each key of MNIST_FILES to NAME or NAME.gz in `folder` (the raw file wins if both exist)."""
    if missing := _missing(folder := Path(folder)):
        raise DataError(f"MNIST files missing in {folder}: {', '.join(missing)} (each as NAME or NAME.gz)")
    return {k: folder / n if (folder / n).is_file() else folder / f"{n}.gz" for k, n in MNIST_FILES.items()}


def _md5_of(path: Path) -> str:
    digest = hashlib.md5()
    with _open_idx(path, header=False) as (stream, _, _, _):
        while block := stream.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def load_mnist(data_dir=None, *, download=True, verify=False, dtype=np.float32):
    """Load MNIST, or any dataset stored under its file names, from :func:`resolve_data_dir`.

    Returns ``((x_train, y_train), (x_test, y_test))``: x of `dtype` (N, rows*cols) in [0, 1] (or the raw
    0..255 bytes for ``dtype=np.uint8``, to wrap in :class:`gpunet.pixels.Pixels`), y int64 (N,). Missing
    files are downloaded if `download`; `verify` checks the files against MNIST_MD5.
    """
    folder = resolve_data_dir(data_dir)
    if (missing := _missing(folder)) and not download:
        raise DataError(f"MNIST files missing in {folder}: {', '.join(missing)}. {_where_to_put(folder)}")
    if missing:
        download_mnist(folder)
    files = find_mnist_files(folder)
    for path in files.values() if verify else ():
        want = MNIST_MD5[path.name.removesuffix(".gz")]
        if (got := _md5_of(path)) != want:
            raise DataError(f"{path}: MD5 of the decompressed data is {got}, expected {want} "
                            f"(not the original MNIST file; load other datasets without verify)")
    result = []
    for split in ("train", "test"):
        x_path, y_path = files[f"{split}_images"], files[f"{split}_labels"]
        x, y = load_idx_images(x_path, dtype), load_idx_labels(y_path)
        if len(x) != len(y):
            raise DataError(f"{x_path} holds {len(x)} images but {y_path} holds {len(y)} labels")
        result.append((x, y))
    return tuple(result)


def download_mnist(data_dir=None, *, mirrors=MNIST_MIRRORS, timeout=30.0, md5=MNIST_MD5) -> Path:
    """Download the missing MNIST files into the folder (created if needed); return the folder.

    Each file is tried on each mirror in turn (URL = mirror + NAME + ".gz"); the MD5 of its decompressed
    payload must match ``md5[NAME]`` or the next mirror is tried. Files land as NAME.gz, atomically.
    """
    folder = resolve_data_dir(data_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data folder {folder} ({exc}). {_where_to_put(folder)}") from exc
    for name in _missing(folder):
        errors = []
        for mirror in mirrors:
            url = f"{mirror}{name}.gz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    blob = response.read()
                payload = gzip.decompress(blob) if blob[:2] == _GZIP_MAGIC else blob
                got, want = hashlib.md5(payload).hexdigest(), (md5 or {}).get(name)
                if want and got != want:
                    raise ValueError(f"MD5 mismatch: got {got}, expected {want}")
            except (OSError, EOFError, ValueError, zlib.error, http.client.HTTPException) as exc:
                errors.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            target = folder / (f"{name}.gz" if blob[:2] == _GZIP_MAGIC else name)
            _atomic_write(target, lambda f: f.write(blob))
            break
        else:
            tried = "".join(f"\n  {e}" for e in errors) or " (no mirrors given)"
            raise DataError(f"download of {name} failed from every mirror:{tried}\n{_where_to_put(folder)}")
    return folder


# ------------------------------------------------------------------------------------------- splits
def split_validation(x, y, val_size, *, seed=None):
    """Hold out `val_size` rows (an int count, or a float fraction in [0, 1)) as a validation set.

    Returns ``((x_train, y_train), (x_val, y_val))``. With ``seed=None`` the last rows are held out as
    views (no copy); with a seed, a random subset from ``np.random.default_rng(seed)`` (copies, in order).
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} rows but y has {len(y)}")
    if isinstance(val_size, (int, np.integer)) and not isinstance(val_size, bool) and 0 <= val_size < n:
        n_val = int(val_size)
    elif isinstance(val_size, (float, np.floating)) and 0.0 <= val_size < 1.0:
        n_val = min(int(round(val_size * n)), max(n - 1, 0))  # keep at least one training row
    else:
        raise ValueError(f"val_size must be an int count in [0, {n}) or a float fraction in [0, 1), "
                         f"got {val_size!r}")
    if seed is None:
        return (x[:n - n_val], y[:n - n_val]), (x[n - n_val:], y[n - n_val:])
    order = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (x[train_idx], y[train_idx]), (x[val_idx], y[val_idx])
