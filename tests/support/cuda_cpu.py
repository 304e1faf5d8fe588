"""gpunet's CUDA sources executed on the CPU: every kernel the fake CuPy
(tests/support/fake_cupy.py) launches also runs its real CUDA source, compiled with g++, and is held
to the NumPy mirror beside it.

How a launch runs here, as on a GPU through CuPy (13/14):

* the source: for an ElementwiseKernel the code CuPy itself generates for these arguments
  (tests/support/cuda_compile.py ``elementwise_program``: CArray types, the index loop, the
  broadcast and merged dimensions), for a RawKernel the source as written; compiled with g++ against
  CuPy's own headers (carray.cuh, complex.cuh, atomics.cuh from the installed package) and
  tests/support/cuda_cpu_device.h (CUDA's device-side names: threadIdx, blockIdx, __syncthreads,
  atomics, the float overloads of the math functions), with tests/support/cuda_cpu_launch.h appended
(the launcher);
* the arguments: CuPy's layout, packed here byte for byte (an ElementwiseKernel's array as a CArray:
  data pointer, size, shape, strides, a broadcast dimension with stride 0; its loop as a CIndexer;
  scalars in their parameter's type; a RawKernel's arrays as pointers and scalars as their own
  bytes), each size held to the kernel's own parameter;
* the launch sizes: CuPy's (an ElementwiseKernel: blocks of min(128, n) threads, ceil(n / 128)
  blocks, no launch for n = 0; a RawKernel: the grid and block its caller passes);
* the threads: all of them one after another on one CPU thread, in up to three orders (forward,
  reversed, shuffled; blocks and threads alike): each order on fresh copies of the arguments, and
  any bit of difference between orders is a race. How many (``orders_for``): three for a kernel
  with shared memory, barriers or atomics (a barrier's phases interleave threads otherwise in each
  order); two (forward, reversed: every pair of threads runs in both of its orders, so any race
  between two threads through global memory shows) for other RawKernels and ElementwiseKernels
  with a raw parameter that is written or aliases an output; one for the rest (an
  ElementwiseKernel's thread i reads and writes only element i of its other parameters: no order
  can change what it computes). In a kernel whose source names ``__syncthreads`` each thread
  of a block is a fiber, resumed barrier by barrier; a barrier that not every thread reaches, or
  threads at different barriers, fail the launch;
* float32 kernels run with the CPU's flush-to-zero and denormals-are-zero on (CuPy compiles
  -ftz=true);
* every array gets guard bytes on both sides, checked after each order: a write outside an argument
  fails the launch (under AddressSanitizer, GPUNET_CXX_SANITIZE=1, the guards are left off so that
  ASan names the out-of-bounds access and its line).

The result is then compared with the mirror's (NaN where NaN, infinities and the sign of zeros
exactly, finite values within 32 float eps of the array's scale: the sums run in another order than
NumPy's pairwise ones), and the CUDA result is what the fake CuPy's arrays hold afterwards, so the
tests that compare the GPU path with the core compare the CUDA sources with it.

Compiled objects are cached by the hash of everything that goes into them (source, headers, flags,
compiler), in GPUNET_CXX_CACHE or ~/.cache/gpunet/cuda-cpu. Needs g++ and CuPy (for its headers and
its code generator, no GPU); without them the fake CuPy runs the mirrors alone, and
tests/unit/test_cuda_cpu.py skips, or fails under GPUNET_REQUIRE_CXX=1. GPUNET_CUDA_CPU=0 turns the
harness off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
HEADERS = (HERE / "cuda_cpu_device.h", HERE / "cuda_cpu_launch.h")
ORDERS = ("forward", "reversed", "shuffled")
SEED = 20261207  # the shuffled order's draws: the same permutation on every run
GUARD = 4096  # bytes before and after every array
GUARD_BYTE = 0xA5
BLOCK = 128  # CuPy's ElementwiseKernel block size
CXXFLAGS = (
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-shared",
    "-fvisibility=hidden",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-w",
)
SANITIZE = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
)

# the real CuPy's code generator, imported before any test puts the fake in sys.modules["cupy"]
try:
    import cupy as _cupy
    from cupy._core import _carray, _kernel, _scalar, core  # noqa: F401
except ImportError:
    _cupy = None


class Unavailable(RuntimeError):
    """g++ or CuPy (its headers and code generator) is missing; the message says which."""


class KernelFault(AssertionError):
    """A kernel failed on the CPU: it did not compile, a barrier went wrong, or it wrote out of
    bounds."""


class Mismatch(AssertionError):
    """A kernel's result changed with the order of its threads (a race), or differs from its
    mirror."""


def sanitizing() -> bool:
    return os.environ.get("GPUNET_CXX_SANITIZE") == "1"


def toolchain() -> dict:
    """The compiler, its version and CuPy's include folder; raises Unavailable."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise Unavailable(
            f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH; apt-get install g++"
        )
    if _cupy is None or not hasattr(_cupy, "ElementwiseKernel"):
        raise Unavailable(
            "CuPy is not installed (its headers and code generator are needed, no GPU); "
            "pip install 'gpunet[cuda12]'"
        )
    include = Path(_cupy.__file__).parent / "_core" / "include"
    if not (include / "cupy" / "carray.cuh").exists():
        raise Unavailable(f"CuPy's headers are not in {include}")
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    return {"cxx": cxx, "version": version, "include": include}


_TOOLS: dict = {}


def enabled() -> bool:
    """Whether the fake CuPy runs the CUDA sources (a toolchain is here and GPUNET_CUDA_CPU is not
    0)."""
    if os.environ.get("GPUNET_CUDA_CPU") == "0":
        return False
    if "tools" not in _TOOLS:
        try:
            _TOOLS["tools"] = toolchain()
        except Unavailable as exc:
            _TOOLS["tools"] = exc
    return not isinstance(_TOOLS["tools"], Unavailable)


def cache_dir() -> Path:
    path = Path(
        os.environ.get("GPUNET_CXX_CACHE") or Path.home() / ".cache" / "gpunet" / "cuda-cpu"
    )
    path.mkdir(parents=True, exist_ok=True)
    return path


_LOADED: dict = {}
# for tests and the CI line
stats = {"compiled": 0, "cached": 0, "launches": 0, "orders": 0, "names": set()}


def include_flags(include: Path) -> list:
    """CuPy's include folders as it passes them to NVRTC (its own, and the CCCL's thrust and
    libcudacxx that complex.cuh reaches), then this folder's headers."""
    cccl = include / "cupy" / "_cccl"
    return [
        f"-I{include}",
        f"-I{cccl / 'thrust'}",
        f"-I{cccl / 'libcudacxx'}",
        f"-I{cccl / 'cub'}",
        f"-I{HERE}",
    ]


def translation_unit(name: str, source: str) -> str:
    return (
        f'#include "{HEADERS[0].name}"\n#line 1 "{name}.cu"\n{source}\n'
        f'#define GPUNET_KERNEL {name}\n#include "{HEADERS[1].name}"\n'
    )


def build(name: str, source: str) -> ctypes.CDLL:
    """The kernel ``name`` of ``source`` compiled for the CPU (cached by hash), loaded; KernelFault
    if g++ rejects it."""
    if not isinstance(_TOOLS.get("tools"), dict):
        _TOOLS["tools"] = toolchain()
    tools = _TOOLS["tools"]
    flags = CXXFLAGS + (SANITIZE if sanitizing() else ())
    unit = translation_unit(name, source)
    digest = hashlib.sha256(
        "\0".join(
            [
                unit,
                *flags,
                tools["version"],
                str(tools["include"]),
                *(h.read_text() for h in HEADERS),
            ]
        ).encode()
    ).hexdigest()[:24]
    if digest in _LOADED:
        return _LOADED[digest]
    target = cache_dir() / f"{name}-{digest}.so"
    if target.exists():
        stats["cached"] += 1
    else:
        with tempfile.TemporaryDirectory() as tmp:
            cpp, out = Path(tmp) / f"{name}.cpp", Path(tmp) / f"{name}.so"
            cpp.write_text(unit)
            done = subprocess.run(
                [tools["cxx"], *flags, *include_flags(tools["include"]), str(cpp), "-o", str(out)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise KernelFault(f"{name}: g++ rejected the CUDA source:\n{done.stderr[-4000:]}")
            os.replace(out, target)  # atomic: a concurrent run sees the whole object or none
        stats["compiled"] += 1
    lib = ctypes.CDLL(str(target))
    lib.gpunet_cpu_params.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
    lib.gpunet_cpu_stack_pool.restype = ctypes.c_void_p
    lib.gpunet_cpu_stack_pool.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
    lib.gpunet_cpu_run.restype = ctypes.c_char_p
    lib.gpunet_cpu_run.argtypes = [
        ctypes.POINTER(ctypes.c_void_p),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.POINTER(ctypes.c_uint),
        ctypes.c_int,
        ctypes.c_ulonglong,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_ulonglong),
    ]
    _LOADED[digest] = lib
    return lib


def stack_pool(name: str, source: str) -> tuple:
    """(address, threads) of the fibers' stack pool of kernel ``name`` as loaded in this process."""
    threads = ctypes.c_size_t(0)
    address = build(name, source).gpunet_cpu_stack_pool(ctypes.byref(threads))
    return address, threads.value


def param_sizes(lib) -> list:
    sizes = (ctypes.c_size_t * 256)()
    return list(sizes[: lib.gpunet_cpu_params(sizes)])


# ----------------------------------------------------------------------- device buffers with guards
class Buffers:
    """Copies of a launch's arrays, each inside guard bytes (none under ASan): ``pointer(k)`` is
    where array k's data starts, ``array(k)`` a view of it, ``check`` raises KernelFault on a
    touched guard. Arguments that are one array (same data, shape, strides) share one copy, as on
    the device."""

    def __init__(self, arrays: list, names: list):
        self.names, self.guard, self.copies, self.index = (
            names,
            0 if sanitizing() else GUARD,
            [],
            [],
        )
        seen = {}
        for a in arrays:
            if a is None:
                self.index.append(None)
                continue
            key = (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)
            if key not in seen:
                raw = np.empty(a.nbytes + 2 * self.guard, np.uint8)
                raw[: self.guard] = raw[self.guard + a.nbytes :] = GUARD_BYTE
                view = raw[self.guard : self.guard + a.nbytes].view(a.dtype).reshape(a.shape)
                view[...] = a
                seen[key] = len(self.copies)
                self.copies.append((raw, view))
            self.index.append(seen[key])

    def array(self, k):
        return self.copies[self.index[k]][1]

    def pointer(self, k):
        return self.array(k).ctypes.data

    def check(self, kernel: str, order: str):
        if not self.guard:
            return
        for k, at in enumerate(self.index):
            if at is None:
                continue
            raw, view = self.copies[at]
            for side, part in (
                ("before", raw[: self.guard]),
                ("after", raw[self.guard + view.nbytes :]),
            ):
                touched = np.flatnonzero(part != GUARD_BYTE)
                if touched.size:
                    where = (touched[-1] - self.guard) if side == "before" else touched[0]
                    raise KernelFault(
                        f"{kernel} ({order} order): wrote outside argument {self.names[k]} "
                        f"(shape {view.shape}), {where} bytes {side} its {view.nbytes}-byte data"
                    )


def carray_bytes(pointer: int, shape: tuple, strides: tuple) -> bytes:
    """CuPy's CArray<T, ndim, ...> as the kernel receives it: data pointer, size, shape[ndim],
    strides[ndim]."""
    return np.array([pointer, int(np.prod(shape)), *shape, *strides], np.int64).tobytes()


def indexer_bytes(shape: tuple) -> bytes:
    """CuPy's CIndexer<ndim>: size, shape[ndim], index[ndim] (the index is the kernel's own)."""
    return np.array([int(np.prod(shape)), *shape, *([0] * len(shape))], np.int64).tobytes()


def scalar_bytes(value, dtype=None) -> bytes:
    """A scalar as CuPy passes it: in its parameter's type (ElementwiseKernel), else its own type, a
    Python int as int64, a float as float64, a bool as bool (RawKernel)."""
    if dtype is None:
        dtype = (
            value.dtype
            if isinstance(value, np.generic)
            else np.bool_
            if isinstance(value, bool)
            else np.int64
            if isinstance(value, int)
            else np.float64
        )
    return np.array(value, dtype).tobytes()


# ---------------------------------------------------------------------------------------- launches
# words of shared state in a kernel's own code (not the headers CuPy's generated code includes)
SHARED_STATE = re.compile(r"__syncthreads|__shared__|\batomic[A-Z][A-Za-z]*\s*\(")


def orders_for(source: str, raw_writes: bool) -> tuple:
    """The orders a kernel runs in (the module's docstring says why): all three where its source
    names shared memory, a barrier or an atomic, forward and reversed where threads may reach each
    other's elements through global memory (``raw_writes``), else forward alone."""
    code = "\n".join(line for line in source.split("\n") if not line.lstrip().startswith("#"))
    if SHARED_STATE.search(code):
        return ORDERS
    return ORDERS[:2] if raw_writes else ORDERS[:1]


def _run_orders(
    name: str,
    source: str,
    grid: tuple,
    block: tuple,
    arrays: list,
    names: list,
    pack,
    flush: bool,
    orders: tuple = ORDERS,
) -> Buffers:
    """Run the kernel in each of ``orders`` on fresh copies of ``arrays`` (None for a scalar);
    ``pack(buffers)`` gives each parameter's bytes. Returns the forward order's buffers; raises
    KernelFault or Mismatch."""
    lib = build(name, source)
    sizes, fibers = param_sizes(lib), int("__syncthreads" in source)
    grid3, block3 = ((ctypes.c_uint * 3)(*(tuple(d) + (1, 1))[:3]) for d in (grid, block))
    runs = []
    stats["orders"] += len(orders)
    for order in orders:
        how = ORDERS.index(order)
        buffers = Buffers(arrays, names)
        packed = pack(buffers)
        if [len(p) for p in packed] != sizes:
            raise KernelFault(
                f"{name}: the launch packs parameters of {[len(p) for p in packed]} bytes, "
                f"the kernel declares {sizes}"
            )
        storage = [ctypes.create_string_buffer(p, len(p)) for p in packed]
        pointers = (ctypes.c_void_p * max(1, len(storage)))(*[ctypes.addressof(s) for s in storage])
        passed = ctypes.c_ulonglong(0)
        error = lib.gpunet_cpu_run(
            pointers, grid3, block3, how, SEED, fibers, int(flush), ctypes.byref(passed)
        )
        if error:
            raise KernelFault(
                f"{name} ({order} order, grid {tuple(grid)}, block {tuple(block)}): "
                f"{error.decode()}"
            )
        buffers.check(name, order)
        runs.append(buffers)
    stats["launches"] += 1
    stats["names"].add(name)
    for k, a in enumerate(arrays):
        if a is None:
            continue
        first = runs[0].array(k)
        for order, other in zip(orders[1:], runs[1:]):
            if first.tobytes() != other.array(k).tobytes():
                differ = np.flatnonzero((_bytes(first) != _bytes(other.array(k))).any(axis=1))
                at = np.unravel_index(differ[0], first.shape) if first.ndim else ()
                raise Mismatch(
                    f"{name}: a race: argument {names[k]} differs between the forward and the "
                    f"{order} order of threads (first at {at}: {first[at]!r} against "
                    f"{other.array(k)[at]!r})"
                )
    return runs[0]


def _bytes(a: np.ndarray) -> np.ndarray:
    """Each element's bytes as one row (a bit difference in any of them differs)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).reshape(a.size, a.itemsize)


def _flushes(arrays) -> bool:
    return any(a is not None and a.dtype in (np.float32, np.float16) for a in arrays)


def elementwise(spec: tuple, args: list) -> list:
    """Run ``cupy.ElementwiseKernel(*spec)(*args)`` from its CUDA source (``spec``: in_params,
    out_params, operation, name and optionally a dict of the constructor's keywords) (NumPy arrays
    for CuPy's, scalars as given); returns the arrays afterwards, one per argument (None for a
    scalar), outputs the kernel allocates appended."""
    import cuda_compile

    kernel = _kernel.ElementwiseKernel(*spec[:4], **(spec[4] if len(spec) > 4 else {}))
    args = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a for a in args]
    ins, outs = args[: kernel.nin], args[kernel.nin :]
    in_types, out_types, _ = kernel._decide_params_type(
        tuple(a.dtype if isinstance(a, np.ndarray) else None for a in ins),
        tuple(a.dtype for a in outs),
    )
    raw = [p.raw for p in kernel.params]
    arrays = [a if isinstance(a, np.ndarray) else None for a in ins]
    if not outs:  # CuPy allocates the outputs, C-contiguous in the broadcast shape
        shape = np.broadcast_shapes(
            *[a.shape for a, r in zip(arrays, raw) if a is not None and not r]
        )
        outs = [np.zeros(shape, t) for t in out_types]
    arrays += outs
    shape = np.broadcast_shapes(*[a.shape for a, r in zip(arrays, raw) if a is not None and not r])
    name, source, _ = cuda_compile.elementwise_program(spec, tuple(ins) + tuple(outs))
    _, loop_ndim = cuda_compile._kernel_layout(arrays, raw)
    loop = (int(np.prod(shape)),) if loop_ndim == 1 and len(shape) > 1 else shape
    size = int(np.prod(loop))
    if size == 0:  # CuPy launches nothing
        return arrays

    def pack(buffers):
        packed = []
        for k, (a, r) in enumerate(zip(arrays, raw)):
            if a is None:
                packed.append(scalar_bytes(ins[k], in_types[k]))
            elif r:
                packed.append(carray_bytes(buffers.pointer(k), a.shape, a.strides))
            elif loop is not shape:
                packed.append(carray_bytes(buffers.pointer(k), loop, (a.itemsize,)))
            else:
                packed.append(
                    carray_bytes(buffers.pointer(k), shape, np.broadcast_to(a, shape).strides)
                )
        return packed + [indexer_bytes(loop)]

    names = [p.name for p in kernel.params]
    done = _run_orders(
        name,
        source,
        ((size + BLOCK - 1) // BLOCK,),
        (min(BLOCK, size),),
        arrays,
        names,
        pack,
        _flushes(arrays),
        orders_for(source, _raw_writes(arrays, raw, kernel.nin)),
    )
    return [None if a is None else done.array(k) for k, a in enumerate(arrays)]


def _raw_writes(arrays: list, raw: list, nin: int) -> bool:
    """Whether an ElementwiseKernel's thread may reach another thread's element: a raw output,
    or a raw input sharing memory with an output."""
    outs = [a for a in arrays[nin:] if a is not None]
    return any(
        r and a is not None and (k >= nin or any(np.may_share_memory(a, o) for o in outs))
        for k, (a, r) in enumerate(zip(arrays, raw))
    )


def raw_kernel(source: str, name: str, grid: tuple, block: tuple, args: tuple) -> list:
    """Run ``cupy.RawKernel(source, name)(grid, block, args)`` from its source; the arrays
    afterwards, one per argument (None for a scalar)."""
    arrays = [
        np.ascontiguousarray(a)
        if isinstance(a, np.ndarray) and a.ndim
        else np.array(a)
        if isinstance(a, np.ndarray)
        else None
        for a in args
    ]

    def pack(buffers):
        return [
            np.array([buffers.pointer(k)], np.int64).tobytes()
            if a is not None
            else scalar_bytes(args[k])
            for k, a in enumerate(arrays)
        ]

    names = [
        f"{k} ({a.dtype}{list(a.shape)})" if a is not None else str(k) for k, a in enumerate(arrays)
    ]
    done = _run_orders(
        name,
        source,
        tuple(grid),
        tuple(block),
        arrays,
        names,
        pack,
        _flushes(arrays),
        orders_for(source, True),
    )
    return [None if a is None else done.array(k) for k, a in enumerate(arrays)]


# ------------------------------------------------------------------------------- against the mirror
ULPS = 32  # finite values within 32 eps of the array's scale: sums in another order than NumPy's,
# and expf/logf rounded otherwise than NumPy's exp and log (both within a few ulp)


def compare(kernel: str, names: list, ran: list, mirrored: list) -> None:
    """The CUDA result against the mirror's, argument by argument; Mismatch names the first
    difference. Tolerances are in eps of the launch's least precise float array (a float64 sum of
    float32 rows carries their float32 rounding: expf/logf here, NumPy's own exp and log in the
    mirror)."""
    floats = [
        np.asarray(w).dtype for w in mirrored if isinstance(w, np.ndarray) and w.dtype.kind == "f"
    ]
    eps = max((np.finfo(d).eps for d in floats), default=0.0)
    for name, got, want in zip(names, ran, mirrored):
        if got is None or want is None:
            continue
        want = np.asarray(want)
        if got.shape != want.shape:
            raise Mismatch(
                f"{kernel}: argument {name} has shape {got.shape} from CUDA, {want.shape} from "
                "the mirror"
            )
        if got.dtype == want.dtype and got.tobytes() == want.tobytes():
            continue  # the same bits (most launches): nothing to weigh
        if want.dtype.kind != "f":
            bad = got != want
        else:
            finite = np.isfinite(want)
            scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
            tiny = np.finfo(want.dtype).tiny
            with np.errstate(invalid="ignore", over="ignore"):
                close = (
                    np.abs(got.astype(np.float64) - want)
                    <= ULPS * eps * (np.abs(want) + scale) + 4 * tiny
                )
                bad = np.where(
                    finite,
                    ~close | (np.isfinite(got) != finite),
                    ~((np.isnan(got) & np.isnan(want)) | (got == want)),
                )
                bad |= (got == 0) & (want == 0) & (np.signbit(got) != np.signbit(want))
        if np.any(bad):
            at = np.unravel_index(np.flatnonzero(bad)[0], want.shape) if want.ndim else ()
            raise Mismatch(
                f"{kernel}: argument {name} differs from the mirror at {at}: CUDA {got[at]!r}, "
                f"mirror {want[at]!r} ({int(np.sum(bad))} of {want.size} elements)"
            )
