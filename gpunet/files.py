"""Files that appear whole or not at all: every file gpunet writes (model, checkpoint, metrics, pictures);
and the one ``.npz`` layout (arrays plus a JSON record) that model files and checkpoints share.

``atomic_write(path, data)`` writes to a temporary file in the same folder, flushes it to disk (fsync),
gives it the permissions the user's umask allows (``mkstemp`` would leave 0600), and renames it over
``path``. A crash, or SIGKILL, at any moment leaves either the old file or the new one, never half of one.

``strict(obj)`` is the one JSON rule: every file and every ``--json`` output gpunet writes is strict JSON,
where a NaN or an infinity is ``null`` (JSON has no such numbers). This module imports nothing of gpunet.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import tempfile

import numpy as np


def strict(obj):
    """``obj`` as plain JSON values: every NaN or infinite float becomes None, NumPy arrays nested lists
    (``tolist`` keeps each value exactly: a float32 reads back as the same float32) and NumPy scalars
    Python ones; dicts, lists and tuples are walked, anything else is left as it is."""
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
    """The process's umask, read without changing it where Linux allows (threads may be writing too)."""
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


def read_npz(path, key: str) -> tuple[dict | None, dict]:
    """``(record, arrays)`` from a file of :func:`write_npz` (record None when ``key`` is absent); NumPy's,
    zip's and JSON's errors pass through for the caller to name."""
    with np.load(path, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    raw = arrays.pop(key, None)
    return (None if raw is None else json.loads(raw.tobytes().decode())), arrays
