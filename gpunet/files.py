"""Files that appear whole or not at all: every file gpunet writes (model, checkpoint, metrics,
pictures); and the one ``.npz`` layout (arrays plus a JSON record) that model files and checkpoints
share.

``atomic_write(path, data)`` writes to a temporary file in the same folder, flushes it to disk
(fsync), gives it the permissions the user's umask allows (``mkstemp`` would leave 0600), and
renames it over ``path``. A crash, or SIGKILL, at any moment leaves either the old file or the new
one, never half of one.

``strict(obj)`` is the one JSON rule: every file and every ``--json`` output gpunet writes is strict
JSON, where a NaN or an infinity is ``null`` (JSON has no such numbers). This module imports nothing
of gpunet.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import struct
import tempfile
import zipfile

import numpy as np


def strict(obj):
    """``obj`` as plain JSON values: every NaN or infinite float becomes None, NumPy arrays nested
    lists (``tolist`` keeps each value exactly: a float32 reads back as the same float32) and NumPy
    scalars Python ones; dicts, lists and tuples are walked, anything else is left as it is."""
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (threads may be writing
    too)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write(path, data) -> None:
    """Write ``data`` (bytes, or a callable that writes to a binary file) to ``path`` atomically."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_npz(path, arrays: dict, key: str, record: dict) -> None:
    """One ``.npz`` of NumPy ``arrays`` plus a JSON ``record`` stored as the bytes of array ``key``,
    written atomically (model files and checkpoints are both made so)."""
    payload = dict(arrays)
    payload[key] = np.frombuffer(json.dumps(record).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **payload)
    atomic_write(path, buf.getvalue())


class FileFormatError(ValueError):
    """A model file or checkpoint that gpunet refuses; the one line names the file and the field (or
    array) that is wrong. Subclassed by the model's and the checkpoint's own error types."""


MAX_RECORD = 16 * 2**20  # bytes of a file's JSON record: a Standardize layer of 10^6 features fits
MAX_ENTRIES = (
    100_000  # arrays in one .npz; each costs the zip reader a few hundred bytes before any check
)
INFLATE_RATIO, INFLATE_SLACK = (
    32,
    16 * 2**20,
)  # a compressed entry may grow 32-fold, plus 16 MiB in all
ARRAY_DTYPES = ("<f2", "<f4", "<f8")  # what weights, optimizer and callback arrays are stored as


def _zip_entries(path) -> int:
    """The entry count the zip's end record declares, read before ``zipfile`` lists every entry
    (which takes memory per entry); -1 when there is no end record (``zipfile`` then says what is
    wrong)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 65557))  # the end record (22 bytes) and a comment of at most 65535
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return -1
        count = struct.unpack("<H", tail[at + 10 : at + 12])[0]
        locator = tail[at - 20 : at] if at >= 20 else b""
        if (
            count == 0xFFFF and locator[:4] == b"PK\x06\x07"
        ):  # zip64: the count is in another record
            f.seek(struct.unpack("<Q", locator[8:16])[0])
            record = f.read(56)
            if len(record) == 56 and record[:4] == b"PK\x06\x06":
                count = struct.unpack("<Q", record[32:40])[0]
    return count


class NpzReader:
    """An ``.npz`` read without trusting it: its JSON record first (bounded), then each array's
    ``.npy`` header (shape and dtype) against the zip entry's uncompressed size, and an array's
    bytes only when the caller asks for it after checking that header. Every refusal is a
    :class:`FileFormatError` (``error`` gives the class, ``what`` the kind of file a damaged zip is
    said not to be) naming ``path`` and the entry. Use as a context manager."""

    def __init__(
        self,
        path,
        error=FileFormatError,
        what: str = "readable .npz file",
        hint: str = "",
        constants: bool = False,
    ):
        self.path, self.error, self.constants = (
            os.fspath(path),
            error,
            constants,
        )  # constants: NaN in JSON
        with open(self.path, "rb") as f:
            if (
                f.read(4) != b"PK\x03\x04"
            ):  # a text file, a CSV, a pickle: zip's own reason would mislead
                raise error(f"{self.path}: not a {what}{f' ({hint})' if hint else ''}")
        try:
            count = _zip_entries(self.path)
            if count > MAX_ENTRIES:
                raise error(
                    f"{self.path}: holds {count} arrays, more than any gpunet file ({MAX_ENTRIES})"
                )
            self.zip = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile, ValueError, struct.error, EOFError) as exc:
            if isinstance(exc, error):
                raise
            raise error(f"{self.path}: not a {what} ({type(exc).__name__}: {exc})") from None
        self.infos = {
            i.filename[:-4]: i for i in self.zip.infolist() if i.filename.endswith(".npy")
        }
        self._headers: dict[str, tuple] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.zip.close()

    def names(self) -> list:
        """The arrays' names (entry names without ``.npy``), in the zip's order."""
        return list(self.infos)

    def record(self, key: str):
        """The JSON record stored as the uint8 array ``key`` (None when absent); at most MAX_RECORD
        bytes."""
        if key not in self.infos:
            return None
        shape, dtype = self.header(key)
        if dtype != "|u1" or len(shape) != 1 or shape[0] > MAX_RECORD:
            raise self.error(
                f"{self.path}: {key}: expected the JSON record as at most {MAX_RECORD} bytes "
                f"(uint8), got an array of shape {shape} and dtype {dtype}"
            )
        raw = self.array(key).tobytes()
        try:
            return json.loads(raw.decode(), parse_constant=None if self.constants else _no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise self.error(
                f"{self.path}: {key}: not a JSON record ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]})"
            ) from None

    def header(self, name: str) -> tuple:
        """``(shape, dtype string)`` of array ``name`` from its ``.npy`` header, checked against the
        zip entry's uncompressed size and against inflating more than INFLATE_RATIO-fold."""
        if name in self._headers:
            return self._headers[name]
        info = self.infos[name]
        where = f"{self.path}: array {name!r}"
        try:
            with self.zip.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _fortran, dtype = read(f, max_header_size=10000)
                offset = f.tell()
        except (
            Exception
        ) as exc:  # NumPy's header parser raises ValueError, SyntaxError, ... on crafted bytes
            raise self.error(
                f"{where}: not a .npy array ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]})"
            ) from None
        if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
            raise self.error(f"{where}: expected plain numbers, got dtype {dtype}")
        size = offset + math.prod(shape) * dtype.itemsize
        if size != info.file_size:
            raise self.error(
                f"{where}: its header declares shape {shape} of {dtype} ({size} bytes), the zip "
                f"entry holds {info.file_size} bytes"
            )
        self._headers[name] = (tuple(shape), dtype.str)
        return self._headers[name]

    def most_bytes(self) -> int:
        """The most bytes of arrays this file may hold: what its size inflates to by the bound of
        :meth:`check_inflation`; a record declaring more is refused before any header is read."""
        return INFLATE_SLACK + INFLATE_RATIO * os.path.getsize(self.path)

    def check_inflation(self, names) -> None:
        """Refuse when the arrays ``names`` would inflate to more than INFLATE_SLACK + INFLATE_RATIO
        times their compressed size (a zip bomb), before any of them is read."""
        infos = [self.infos[n] for n in names]
        full, packed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
        if packed > os.path.getsize(self.path):
            raise self.error(
                f"{self.path}: its zip directory declares {packed} bytes of arrays, the file "
                f"has {os.path.getsize(self.path)} (a damaged or crafted file)"
            )
        if full > INFLATE_SLACK + INFLATE_RATIO * packed:
            raise self.error(
                f"{self.path}: its arrays inflate from {packed} to {full} bytes, more than "
                f"{INFLATE_RATIO}-fold (a zip bomb); gpunet writes them uncompressed"
            )

    def array(self, name: str) -> np.ndarray:
        """The array ``name`` (its header is checked first); never unpickles."""
        self.header(name)
        try:
            with self.zip.open(self.infos[name]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except Exception as exc:  # a damaged entry: zlib, CRC or short-read errors
            raise self.error(
                f"{self.path}: array {name!r}: unreadable ({type(exc).__name__}: "
                f"{' '.join(str(exc).split())[:200]})"
            ) from None

    def arrays(self, wanted: dict, skip=(), finite: bool = True) -> dict:
        """The arrays ``wanted`` names (name -> ``(shapes, dtypes)``: the shapes and dtype strings
        each may have, None for any), read one by one after every header, the set of names and the
        inflation are checked; each must hold finite numbers unless ``finite`` is False (a
        checkpoint taken mid-way through a diverging epoch holds its NaN weights beside the
        divergence guard's fallback). Arrays outside ``wanted`` and ``skip`` are refused unread."""
        held = [n for n in self.names() if n not in skip]
        missing = [n for n in wanted if n not in self.infos]
        if missing:
            raise self.error(
                f"{self.path}: array {missing[0]!r}: missing (the record's layers need it)"
            )
        extra = [n for n in held if n not in wanted]
        if extra:
            raise self.error(
                f"{self.path}: array {extra[0]!r}: not one the record names (expected only "
                f"{_listed(wanted)})"
            )
        for name, (shapes, dtypes) in wanted.items():
            shape, dtype = self.header(name)
            if shapes is not None and shape not in shapes:
                raise self.error(
                    f"{self.path}: array {name!r}: expected shape {_listed(shapes, ' or ')} (from "
                    f"the record), got {shape}"
                )
            if dtypes is not None and dtype not in dtypes:
                raise self.error(
                    f"{self.path}: array {name!r}: expected dtype "
                    f"{_listed(dtypes, ' or ', dtypes=True)}, got "
                    f"{np.dtype(dtype)}"
                )
        self.check_inflation(list(wanted))
        out = {}
        for name in wanted:
            out[name] = a = self.array(name)
            bad = a.size - int(np.isfinite(a).sum()) if finite else 0
            if bad:
                raise self.error(
                    f"{self.path}: array {name!r}: {bad} of {a.size} values are NaN or infinite "
                    f"(a damaged file: gpunet never saves such weights)"
                )
        return out


def _listed(items, sep=", ", most=6, dtypes=False) -> str:
    items = [str(np.dtype(i)) if dtypes else str(i) for i in items]
    return sep.join(items[:most]) + (f"{sep}... ({len(items)} in all)" if len(items) > most else "")


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def read_npz(path, key: str, error=FileFormatError) -> tuple[dict | None, dict]:
    """``(record, arrays)`` from a file of :func:`write_npz`, every array read (record None when
    ``key`` is absent); for files gpunet wrote itself. Untrusted files go through
    :class:`NpzReader`."""
    with NpzReader(path, error) as f:
        record = f.record(key)
        names = [n for n in f.names() if n != key]
        f.check_inflation(names)
        return record, {n: f.array(n) for n in names}
