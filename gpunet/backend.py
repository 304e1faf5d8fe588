"""Device handling: NumPy on the CPU, CuPy on a CUDA GPU.

Device names are ``"cpu"``, ``"gpu"`` (``"cuda"`` is accepted too) and ``"auto"``. The default is
``"auto"`` unless the environment variable ``GPUNET_DEVICE`` says otherwise. Which array module
(``xp``) a computation uses is always read off its arrays (:func:`get_array_module`), so NumPy and
CuPy networks can live in one process; the default device only decides where *new* arrays are
created.

It also holds the one row-wise formula that layers, losses and training all need,
:func:`log_softmax` (and :func:`softmax` from it): the core may import nothing but this module, so
the rule lives here once. This module imports nothing else of gpunet.
"""

from __future__ import annotations

import contextlib
import functools
import os
import types
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar, Union, cast

import numpy as np
import numpy.typing as npt

# The types the public API is annotated with (checkers and editors read them; nothing checks
# them at run time). CuPy is imported for the checker only: the core needs NumPy alone at run time.
if TYPE_CHECKING:
    import cupy

    Array = Union[np.ndarray, cupy.ndarray]
    """An array of the array module a computation runs on: NumPy on the CPU, CuPy on a GPU."""
    ArrayLike = Union[npt.ArrayLike, cupy.ndarray]
    """What the functions turn into an array: NumPy or CuPy arrays, nested sequences, scalars."""
else:
    Array = np.ndarray  # at run time a NumPy name stands in (CuPy is not imported)
    ArrayLike = npt.ArrayLike
DTypeLike = npt.DTypeLike
"""A dtype or what NumPy turns into one (``np.float32``, ``"float64"``)."""
F = TypeVar("F", bound=Callable[..., Any])

ENV_VAR = "GPUNET_DEVICE"
_NAMES = {"cpu": "cpu", "numpy": "cpu", "gpu": "gpu", "cuda": "gpu", "cupy": "gpu", "auto": "auto"}


class DeviceError(RuntimeError):
    """A GPU was asked for explicitly but none is usable; the message names the cause."""


_probe_result: tuple | None = None  # (cupy module or None, reason or None, exception or None)
_default: str | None = None
_gpu_index: int | None = None  # the GPU chosen by "cuda:N" or an MPI rank; None: CuPy's current one


def _explain(exc: BaseException) -> str:
    """Turn whatever the CuPy probe raised into the cause a user can act on."""
    text = f"{type(exc).__name__}: {exc}".strip()
    low = text.lower()
    if isinstance(exc, ImportError) and getattr(exc, "name", None) == "cupy":
        return "CuPy is not installed (pip install 'gpunet[cuda12]' or 'gpunet[cuda13]')"
    if "libcuda" in low or "insufficientdriver" in low or "driver" in low:
        return f"no usable NVIDIA driver ({text})"
    if "nodevice" in low or "no cuda-capable device" in low or "devices unavailable" in low:
        return f"no CUDA device ({text})"
    if "failed to find cuda headers" in low or "vector_types.h" in low or "cuda_runtime" in low:
        # CuPy 14 says this when NVRTC loads but no CUDA runtime headers are found (CUDA_PATH,
        # NVIDIA's wheels)
        return (
            "broken CUDA toolkit: CuPy finds no CUDA runtime headers to compile kernels with; "
            "install "
            "them (apt package cuda-cudart-dev-12-X, or pip install nvidia-cuda-runtime-cu12 / "
            f"'cupy-cuda12x[ctk]'), or set CUDA_PATH to a toolkit that has include/ ({text})"
        )
    if "nvrtc" in low or "compile" in low or "cuda_fp16" in low or "include" in low:
        return f"broken CUDA toolkit: CuPy cannot compile kernels ({text})"
    return f"CuPy is installed but the GPU check failed ({text})"


# The probe's kernel (in_params, out_params, operation, name), compiled in CI like the fast path's
# kernels: a typo here would silently turn every GPU into "no GPU".
PROBE_KERNEL = ("float32 x", "float32 y", "y = 2.0f * x + 1.0f", "gpunet_probe")


def _probe():
    """Import CuPy and run a real elementwise kernel and a matmul; cached after the first call."""
    global _probe_result
    if _probe_result is None:
        try:
            import cupy

            if (
                _gpu_index is not None
            ):  # probe the GPU that will be used, and create no context on another
                cupy.cuda.Device(_gpu_index).use()
            a_host = np.arange(16, dtype=np.float32).reshape(4, 4)
            a = cupy.asarray(a_host)
            twice = cupy.ElementwiseKernel(*PROBE_KERNEL)
            got = cupy.asnumpy(twice(a) @ a)
            want = (2.0 * a_host + 1.0) @ a_host
            if not np.allclose(got, want, rtol=1e-3):
                raise RuntimeError("the GPU returned a wrong result for a 4x4 matmul")
            _probe_result = (cupy, None, None)
        except (
            Exception
        ) as exc:  # any failure (ImportError, CUDA runtime, NVRTC, ...) means: no GPU
            _probe_result = (None, _explain(exc), exc)
    return _probe_result


def gpu_available() -> bool:
    """True when CuPy imports and a kernel and a matmul ran on a CUDA device."""
    return _probe()[0] is not None


def gpu_unavailable_reason() -> str | None:
    """Why the GPU is not used (``None`` when it is usable)."""
    return _probe()[1]


def select_gpu(index: int | None = None, local_rank: int | None = None) -> None:
    """Choose the GPU this process uses before anything touches one: GPU ``index``, or with
    ``local_rank`` (an MPI rank's place on its node) GPU ``local_rank % count``. Every later upload
    (:func:`to_device`) and every :func:`device_scope` goes there, in any thread. Raises
    :class:`DeviceError` when the process sees no such GPU. Without a usable CuPy and with
    ``local_rank``, nothing is chosen (the CPU runs)."""
    global _gpu_index
    try:
        import cupy

        count = (
            cupy.cuda.runtime.getDeviceCount()
        )  # counts devices without creating a context on any
    except Exception as exc:
        if index is None:
            return
        raise DeviceError(
            f"device: 'cuda:{index}' was requested but no GPU is usable: {_explain(exc)}"
        ) from exc
    if index is None:
        if count == 0:
            return
        index = local_rank % count
    if not 0 <= index < count:
        raise DeviceError(
            f"device: expected a GPU index below {count} (the CUDA devices this process "
            f"sees), got 'cuda:{index}'"
        )
    _gpu_index = index
    cupy.cuda.Device(index).use()


def chosen_gpu() -> int | None:
    """The GPU :func:`select_gpu` chose (None: none was, CuPy's current one is used)."""
    return _gpu_index


def device_scope(a: Any) -> contextlib.AbstractContextManager:
    """A context manager making the GPU that holds ``a`` (a CuPy array) current in this thread, so
    that work and uploads inside it land on that GPU whatever thread runs them; a no-op for NumPy
    arrays."""
    if _is_cupy(a):
        return a.device
    return contextlib.nullcontext()


def on_device_of_net(fn: F) -> F:
    """Decorator for entry points ``fn(net, ...)``: run inside :func:`device_scope` of the network's
    first parameter (``cupy.cuda.Device.use()`` holds for one thread only: a server's request thread
    would otherwise upload to GPU 0 and multiply with weights on another)."""

    @functools.wraps(fn)
    def run(net: Any, *args: Any, **kwargs: Any) -> Any:
        params = net.parameters()
        with device_scope(params[0].data if params else None):
            return fn(net, *args, **kwargs)

    return cast(F, run)


def _split(name: str | None) -> tuple[str, int | None]:
    """``(device key, GPU index or None)`` of a user's device name; ``None`` means the default."""
    if name is None:
        name = _default or os.environ.get(ENV_VAR) or "auto"
    key, sep, index = str(name).strip().lower().partition(":")
    if key not in _NAMES or (sep and (_NAMES[key] != "gpu" or not index.isdigit())):
        raise ValueError(
            f"device: expected one of 'cpu', 'gpu', 'cuda', 'cuda:N' or 'auto', got {name!r}"
        )
    return _NAMES[key], int(index) if sep else None


def normalize_device(name: str | None) -> str:
    """Map a user's device name to ``"cpu"``, ``"gpu"`` or ``"auto"``; ``None`` means the default.
    ``"cuda:N"`` (or ``"gpu:N"``) is ``"gpu"``; :func:`resolve_device` selects GPU N."""
    return _split(name)[0]


def resolve_device(name: str | None = None) -> str:
    """Resolve a device name to ``"cpu"`` or ``"gpu"``.

    ``"auto"`` falls back to the CPU when no GPU is usable; ``"gpu"`` raises :class:`DeviceError`
    naming the cause. ``"gpu"`` means the GPU chosen by :func:`select_gpu` (CuPy's current one, 0,
    when none was chosen); ``"cuda:N"`` chooses GPU N first (before the probe touches any GPU), so
    that arrays created for ``"gpu"`` from then on live there, or raises :class:`DeviceError` when
    there is no GPU N.
    """
    dev, index = _split(name)
    if index is not None:
        select_gpu(index)  # before the probe, which would otherwise create a context on GPU 0
    if dev == "auto":
        return "gpu" if gpu_available() else "cpu"
    if dev == "gpu" and not gpu_available():
        _, reason, exc = _probe()
        shown = "gpu" if name is None else str(name)
        raise DeviceError(f"device {shown!r} was requested but no GPU is usable: {reason}") from exc
    return dev


def set_default_device(name: str | None) -> None:
    """Set the device where new arrays are created (``None`` restores ``GPUNET_DEVICE``/auto)."""
    global _default
    if name is not None:
        normalize_device(name)  # raises on a bad name now rather than at first use
    _default = name


def describe_device(name: str | None = None) -> dict:
    """What ``name`` resolves to and why: a dict for ``gpunet info`` and ``metrics.json``."""
    info: dict[str, Any] = {
        "requested": normalize_device(name),
        "device": resolve_device(name),
        "reason": gpu_unavailable_reason(),
    }
    info["backend"] = "cupy" if info["device"] == "gpu" else "numpy"
    if info["device"] == "gpu":
        cupy = _probe()[0]
        dev = cupy.cuda.Device(_gpu_index)  # the chosen GPU (None: the current one)
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name_ = props["name"]
        info["gpu_name"] = name_.decode() if isinstance(name_, bytes) else str(name_)
        info["gpu_memory_bytes"] = int(props["totalGlobalMem"])
        info["cuda_runtime"] = int(cupy.cuda.runtime.runtimeGetVersion())
        info["cupy_version"] = cupy.__version__
    return info


def _is_cupy(a: object) -> bool:
    t = type(a)
    if (
        t is np.ndarray
    ):  # the common case, answered without string work (called several times a step)
        return False
    return t.__module__.partition(".")[0] == "cupy"


def get_array_module(*arrays: object) -> types.ModuleType:
    """The array module (``numpy`` or ``cupy``) that owns ``arrays``; NumPy for plain Python
    values."""
    for a in arrays:
        if _is_cupy(a):
            import cupy

            return cupy
    return np


def device_of(a: object) -> str:
    """``"gpu"`` for a CuPy array, ``"cpu"`` otherwise."""
    return "gpu" if _is_cupy(a) else "cpu"


def to_device(a: ArrayLike, device: str | None = None) -> Array:
    """Move (or keep) an array on ``device``; no copy when it is already there."""
    if resolve_device(device) == "gpu":
        cupy = _probe()[0]
        if _gpu_index is None:
            return cupy.asarray(a)
        with cupy.cuda.Device(
            _gpu_index
        ):  # this thread's current device may be another (Device.use is per thread)
            return cupy.asarray(a)
    return to_numpy(a)


def to_numpy(a: ArrayLike) -> np.ndarray:
    """Bring any array (NumPy, CuPy, list, scalar) back to the host as a NumPy array."""
    if _is_cupy(a):
        return a.get()  # type: ignore[union-attr]  # a CuPy array (the checker cannot narrow to it)
    return np.asarray(a)


class HostCopy:
    """Host copies of several arrays, started now and collected by :meth:`wait` (a list of NumPy
    arrays, in order). NumPy arrays are kept as given (pass copies). CuPy arrays of each dtype are
    packed on the device into one flat buffer (one launch, a snapshot: later steps may change the
    arrays) and copied to pinned host memory without blocking, behind the work already queued, with
    an event after it: the host does not wait here, and :meth:`wait` (e.g. a checkpoint writer's
    thread) waits for that event only, not for later work."""

    def __init__(self, arrays: Iterable[Array]) -> None:
        arrays = list(arrays)
        self._host: list = [None if _is_cupy(a) else np.asarray(a) for a in arrays]
        self._shapes = [a.shape for a in arrays]
        # (event, pinned flat buffer, indices of its arrays, the device one)
        self._pending: list = []
        groups: dict = {}
        for i, a in enumerate(arrays):
            if self._host[i] is None and a.size:
                groups.setdefault(a.dtype.str, []).append(i)
            elif self._host[i] is None:
                self._host[i] = np.zeros(a.shape, a.dtype)
        for indices in groups.values():
            import cupy

            flat = cupy.concatenate([arrays[i].ravel() for i in indices])
            memory = cupy.cuda.alloc_pinned_memory(flat.nbytes)
            pinned = np.frombuffer(memory, flat.dtype, flat.size)
            flat.get(out=pinned, blocking=False)
            event = cupy.cuda.Event()
            event.record()
            self._pending.append((event, pinned, indices, flat))  # flat kept until the copy is done

    def wait(self) -> list:
        """The host copies (NumPy arrays of the given shapes and dtypes), once the copies are
        done."""
        for event, pinned, indices, _ in self._pending:
            event.synchronize()
            at = 0
            for i in indices:
                size = int(np.prod(self._shapes[i], dtype=np.int64))
                self._host[i] = pinned[at : at + size].reshape(self._shapes[i]).copy()
                at += size
        self._pending = []
        return self._host


def log_softmax(z: Array) -> Array:
    """Row-wise ``log(softmax(z))`` of a (N, C) float array, stable: ``s - log(sum(exp(s)))`` with
    ``s = z - max(z)`` (exp of at most 0 never overflows); same dtype and device as ``z``."""
    xp = get_array_module(z)
    shifted = _shifted(z)
    return shifted - xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))


def softmax(z: Array) -> Array:
    """Row-wise ``exp(z_j) / sum_k exp(z_k)`` of a (N, C) float array, with the same shift (one exp
    per entry, not the two of ``exp(log_softmax(z))``: predict_proba's hot path)."""
    e = get_array_module(z).exp(_shifted(z))
    e /= e.sum(axis=1, keepdims=True)
    return e


def _shifted(z: Array) -> Array:
    """``z - max(z)`` row by row: exp of it is at most 1, never an overflow."""
    return z - z.max(axis=1, keepdims=True)


def synchronize(a: Any = None) -> None:
    """Wait for queued GPU work (for timing); a no-op on the CPU."""
    if a is None or _is_cupy(a):
        probe = _probe_result
        if probe is not None and probe[0] is not None:
            probe[0].cuda.get_current_stream().synchronize()


def set_tf32(enabled: bool) -> None:
    """Opt in (or out) of TF32 tensor-core float32 matmuls on the GPU.

    TF32 keeps 10 mantissa bits instead of 23: several times the matmul rate on Ampere and Hopper,
    at about 1e-3 relative error. Off by default; the CPU/GPU agreement tests assume it is off.
    """
    cupy = _probe()[0]
    if cupy is None:
        raise DeviceError(f"set_tf32 needs a usable GPU: {gpu_unavailable_reason()}")
    from cupy._core import _routines_linalg as linalg  # where CuPy keeps the float32 compute type

    mode = linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT
    linalg.set_compute_type(np.dtype(np.float32), mode)


def check_labels(
    y: Array, classes: int | None = None, name: str = "y", context: str = "", hint: str = ""
) -> None:
    """The one check of class labels, on any device: ``y`` (N,) integers in [0, classes)
    (``classes`` None: >= 0, the class count not known yet). A TypeError (not integers) or
    ValueError (out of range, the first distinct values followed by ``context``) names ``name``, the
    expected and the actual values, and ends with ``hint``. The data front door
    (``gpunet.data.arrays.labels``), the losses, the metrics and the data files all call it; it
    lives here because the core (losses) imports only the backend."""
    span = f" 0..{classes - 1}" if classes is not None else " 0..C-1"
    tail = f"; {hint}" if hint else ""
    if y.dtype.kind not in "iu":  # booleans index as masks: the front door makes them 0 and 1 first
        what = "strings" if y.dtype.kind in "USO" else f"{y.dtype} values"
        raise TypeError(
            f"{name}: expected integer class labels{span}, got {what} ({_distinct(y)}){tail}"
        )
    if len(y):
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or (classes is not None and hi >= classes):
            expected = (
                f"labels in [0, {classes - 1}] for {classes} classes"
                if classes is not None
                else "class labels 0..C-1 (none negative)"
            )
            raise ValueError(
                f"{name}: expected {expected}, got values from {lo} to {hi} "
                f"({_distinct(y)}{context}){tail}"
            )


def _distinct(y: Array) -> str:
    """The first five distinct values of ``y``, for an error message."""
    values = np.unique(to_numpy(y).ravel())
    shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in values[:5])
    return shown + (", ..." if len(values) > 5 else "")
