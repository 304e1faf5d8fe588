"""Every CUDA kernel of gpunet, as CuPy would build it on a GPU, compiled with NVRTC on a machine
without one.

How CuPy builds a kernel (CuPy 13/14: cupy/_core/_kernel.pyx, cupy/_core/core.pyx,
cupy/cuda/compiler.py):

* ``ElementwiseKernel.__call__`` decides the type map from the arguments' dtypes
  (``_decide_params_type``, which raises "Type is mismatched" where a declared type does not fit an
  argument), broadcasts the arrays, merges contiguous dimensions (``_reduce_dims``), describes every
  argument (``_ArgInfo``: an array as ``CArray<type, ndim, c_contiguous, 32-bit index>``, a scalar
  as its C type, the loop as ``CIndexer``) and generates the source with
  ``_get_elementwise_kernel_code``; ``compile_with_cache`` puts CuPy's headers in front (``#include
<cupy/complex.cuh>``, ...).
* ``RawKernel`` compiles its source as it is.
* The options: ``assemble_cupy_compiler_options`` (CuPy's CCCL and include folders, ``--std=c++17``,
  the CUDA runtime headers it finds through CUDA_PATH or NVIDIA's wheels), then ``-ftz=true``,
  ``-arch=sm_XX`` (a cubin) and ``--device-as-default-execution-space``.

Here all of that is CuPy's own code, called without a device, except two steps that need one in CuPy
and are mirrored: the broadcast and dimension merge (for the 1-D and 2-D layouts gpunet launches;
anything else is refused) and the ``-arch`` option (CuPy reads the device's compute capability; here
each arch is named). On a GPU, tests/unit/test_cuda_compile.py compares these sources with the ones
CuPy compiled there. NVRTC comes from NVIDIA's wheel nvidia-cuda-nvrtc-cu12 and the headers from
nvidia-cuda-runtime-cu12.
"""

from __future__ import annotations

import re
import types
from pathlib import Path

import numpy as np

from gpunet import backend
from gpunet.fast import cuda, rules

ARCHS = ("80", "90", "120")  # Ampere, Hopper, Blackwell (consumer); 120 needs NVRTC >= 12.8
DTYPES = ("float32", "float64")
# cupy/_core/_kernel.pxd, enum _ArgKind (not exposed to Python); tests check the code they produce
ARG_NDARRAY, ARG_INDEXER, ARG_SCALAR = 1, 2, 3


class Unavailable(RuntimeError):
    """NVRTC or the CUDA runtime headers cannot be used here; the message says which and how to get
    them."""


class CompileError(RuntimeError):
    """NVRTC rejected a program; the message holds NVRTC's log."""


def toolchain() -> dict:
    """NVRTC's version, the CUDA header folder CuPy would use, and the archs to compile; raises
    Unavailable."""
    hint = (
        "pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 (NVIDIA's wheels; no GPU "
        "needed)"
    )
    try:
        from cupy._core import core
        from cupy.cuda import compiler, nvrtc
    except ImportError as exc:
        raise Unavailable(f"CuPy is not installed ({exc}); pip install 'gpunet[cuda12]'") from exc
    try:
        version = tuple(nvrtc.getVersion())
        options = core.assemble_cupy_compiler_options(())
    except Exception as exc:  # the NVRTC library or the headers are missing
        raise Unavailable(f"NVRTC is not usable ({type(exc).__name__}: {exc}); {hint}") from exc
    headers = [
        o[2:]
        for o in options
        if o.startswith("-I") and (Path(o[2:]) / "cuda_runtime_api.h").exists()
    ]
    if not headers:
        raise Unavailable(
            f"CuPy finds no CUDA runtime headers (cuda_runtime_api.h) in {options}; {hint}"
        )
    found = re.search(
        r"#define\s+CUDART_VERSION\s+(\d+)", (Path(headers[0]) / "cuda_runtime_api.h").read_text()
    )
    cudart = int(found.group(1)) if found else 0
    if cudart // 1000 != version[0]:
        raise Unavailable(
            f"the CUDA headers in {headers[0]} are CUDA {cudart // 1000}.{cudart % 1000 // 10} but "
            f"NVRTC is {version[0]}.{version[1]}: install the runtime-headers wheel of NVRTC's "
            f"major version; {hint}"
        )
    top = int(
        compiler._get_max_compute_capability()
    )  # CuPy's own table of what each NVRTC version knows
    return {
        "nvrtc": version,
        "headers": headers[0],
        "cudart": cudart,
        "archs": tuple(a for a in ARCHS if int(a) <= top),
    }


def options(arch: str, kernel_options: tuple = ()) -> tuple:
    """CuPy's NVRTC options for a kernel built for compute capability ``arch`` (e.g. "90")."""
    from cupy._core import core

    return core.assemble_cupy_compiler_options(tuple(kernel_options)) + (
        "-ftz=true",
        f"-arch=sm_{arch}",
        "--device-as-default-execution-space",
    )


def compile_program(source: str, name: str, arch: str, kernel_options: tuple = ()) -> bytes:
    """Compile ``source`` with NVRTC through CuPy's own program wrapper; the cubin, or
    CompileError."""
    from cupy.cuda import compiler

    try:
        cubin, _ = compiler._NVRTCProgram(source, f"{name}.cu", method="cubin").compile(
            options(arch, kernel_options)
        )
    except compiler.CompileException as exc:
        raise CompileError(f"{name} (sm_{arch}): {exc}") from exc
    return cubin


# ------------------------------------------------------------------------------ elementwise kernels
def launch_all(dtype: str, xp=np) -> None:
    """Call each of gpunet.fast.cuda's elementwise wrappers as gpunet.fast.step does, on MNIST-sized
    arrays of ``xp`` in ``dtype``: activations (128, 512) and (1, 512) (online learning: another
    layout), W (784, 512) and b (512,), a layer's update with momentum (with and without Nesterov)
    and SGD, every optimizer rule's generated kernel (gpunet.fast.rules; scalars from the
    optimizer's begin_step, as the fused
    step passes them), dropout, the gather."""
    t = np.dtype(dtype).type
    y, b, W = xp.zeros((128, 512), dtype), xp.zeros(512, dtype), xp.zeros((784, 512), dtype)
    cuda.bias_relu(y, b)
    cuda.bias_relu(xp.zeros((1, 512), dtype), b)
    cuda.relu_backward(y.copy(), y)
    cuda.relu_mask_backward(y.copy(), y, y.copy())
    params = [types.SimpleNamespace(data=a, grad=a.copy()) for a in (W, b)]
    for nesterov in (False, True):  # momentum, then SGD (no velocities)
        cuda.layer_update(*params, W.copy(), b.copy(), y, t(0.05), t(0.9), t(1e-4), nesterov)
    cuda.layer_update(*params, None, None, y, t(0.05), t(0.0), t(1e-4), False)
    for nesterov in (
        False,
        True,
    ):  # the updates after a distributed step's all-reduce (or a BatchNorm's)
        cuda.layer_update_given(*params, W.copy(), b.copy(), t(0.05), t(0.9), t(1e-4), nesterov)
    cuda.layer_update_given(*params, None, None, t(0.05), t(0.0), t(1e-4), False)
    cuda.batch_norm_apply(y, y.copy(), b, b.copy(), b.copy(), b.copy(), b.copy(), True)
    for opt in rules.examples().values():  # every optimizer rule's kernel, each of its variants
        k = [t(c) for c in opt.begin_step().values()]
        for p in (W, b):
            cuda.rule(opt)(p, p.copy(), *[p.copy() for _ in opt.slots], *k)
    cuda.dropout(y, y.copy(), 2**63 - 1, 52429, 1 / 0.8)
    cuda.gather_scaled(
        xp.zeros((1000, 784), np.uint8), xp.zeros(128, np.int64), xp.zeros((128, 784), dtype), 255
    )


def elementwise_launches(dtype: str) -> list:
    """``(spec, args)`` of each ElementwiseKernel launch gpunet makes, with NumPy arrays standing in
    for CuPy's; ``spec`` is (in_params, out_params, operation, name). Recorded from
    :func:`launch_all` with the kernel factory of gpunet.fast.cuda swapped for a recorder; the
    backend's probe kernel (float32 only, on a (4, 4) array) comes first."""
    calls = []
    if dtype == "float32":
        calls.append((backend.PROBE_KERNEL, (np.zeros((4, 4), np.float32),)))
    real, raw = cuda._elementwise, cuda._raw
    cuda._elementwise = lambda name: lambda *args: calls.append((cuda.ELEMENTWISE[name], args))
    cuda._raw = lambda ctype, name: lambda grid, block, args: None  # RawKernels: raw_programs
    try:
        launch_all(dtype)
    finally:
        cuda._elementwise, cuda._raw = real, raw
    return calls


def _kernel_layout(arrays: list, raw: list) -> tuple[list, int]:
    """CuPy's ``_broadcast`` and ``_reduce_dims`` for these arrays (None for a scalar): the (ndim,
    c_contiguous) each array is described with, and the loop's ndim. ``raw`` parameters take no part
    in either: they are described as they are."""
    loop = [a for a, r in zip(arrays, raw) if a is not None and not r]
    shape = np.broadcast_shapes(*[a.shape for a in loop])
    views = [
        None if a is None else a if r else np.broadcast_to(a, shape) for a, r in zip(arrays, raw)
    ]
    as_is = [None if v is None else (v.ndim, bool(v.flags.c_contiguous)) for v in views]
    contiguous = all(v.flags.c_contiguous for v, r in zip(views, raw) if v is not None and not r)
    if len(shape) > 1 and contiguous:  # every looped array C-contiguous: one flat loop
        return [lay if r or lay is None else (1, True) for lay, r in zip(as_is, raw)], 1
    if len(shape) > 2:
        raise NotImplementedError(
            f"layout {shape} with a broadcast or strided array: not mirrored here "
            "(gpunet launches only 1-D and 2-D ones)"
        )
    return as_is, len(shape)


def elementwise_program(spec: tuple, args: tuple) -> tuple[str, str, tuple]:
    """``(name, source, kernel options)`` that CuPy compiles when ``ElementwiseKernel(*spec)`` is
    called with ``args`` (NumPy arrays stand for CuPy arrays; Python and NumPy scalars for scalars).
    A declared type that does not fit the arguments raises CuPy's TypeError ("Type is
    mismatched")."""
    from cupy._core import (  # not `import cupy`: the fake may stand there
        _carray,
        _kernel,
        _scalar,
        core,
    )

    kernel = _kernel.ElementwiseKernel(*spec[:4], **(spec[4] if len(spec) > 4 else {}))
    ins, outs = list(args[: kernel.nin]), list(args[kernel.nin :])
    in_dtypes = tuple(a.dtype if isinstance(a, np.ndarray) else None for a in ins)
    in_types, out_types, type_map = kernel._decide_params_type(
        in_dtypes, tuple(a.dtype for a in outs)
    )
    arrays = [a if isinstance(a, np.ndarray) else None for a in ins]
    raw = [p.raw for p in kernel.params]
    if not outs:  # CuPy allocates the outputs, C-contiguous in the broadcast shape
        shape = np.broadcast_shapes(
            *[a.shape for a, r in zip(arrays, raw) if a is not None and not r]
        )
        outs = [np.empty(shape, t) for t in out_types]
    layout, loop_ndim = _kernel_layout(arrays + outs, raw)
    infos = []
    for i, (a, lay) in enumerate(zip(arrays + outs, layout)):
        if lay is None:  # a scalar takes its parameter's type (CScalar.apply_dtype)
            infos.append(
                _kernel._ArgInfo(ARG_SCALAR, _scalar.CScalar, np.dtype(in_types[i]), 0, True, True)
            )
        else:  # 32-bit indexing: every array here is far below 2**31 elements, as gpunet's are
            infos.append(_kernel._ArgInfo(ARG_NDARRAY, core.ndarray, a.dtype, lay[0], lay[1], True))
    infos.append(_kernel._ArgInfo(ARG_INDEXER, _carray.Indexer, None, loop_ndim, True, True))
    code = _kernel._get_elementwise_kernel_code(
        tuple(infos),
        type_map,
        kernel.params,
        kernel.operation,
        kernel.name,
        kernel.preamble,
        **kernel.kwargs,
    )
    header = "".join(f"#include <{h}>\n" for h in core._cupy_header_list)
    return kernel.name, header + code, tuple(kernel.kwargs.get("options", ()))


# -------------------------------------------------------------------------------------- raw kernels
def _ctype(dtype) -> str:
    from cupy._core._scalar import get_typename

    return get_typename(np.dtype(dtype))


def signature_check(kernel_name: str, args: tuple) -> str:
    """C++ appended to a RawKernel's source: a static_assert that the kernel's parameters have the C
    types of the arguments its launch passes (pointers to the arrays' dtypes, the scalars' own
    types; const on the pointee is the kernel's business). RawKernel passes raw bytes, so CuPy
    itself checks none of this."""
    expected = ", ".join(
        f"{_ctype(a.dtype)}*" if isinstance(a, np.ndarray) else _ctype(a.dtype) for a in args
    )
    return f"""
template <class T> struct gpunet_bare {{ typedef T type; }};
template <class T> struct gpunet_bare<const T*> {{ typedef T* type; }};
template <class A, class B> struct gpunet_same {{ enum {{ value = 0 }}; }};
template <class A> struct gpunet_same<A, A> {{ enum {{ value = 1 }}; }};
template <class F> struct gpunet_params;
template <class... A> struct gpunet_params<void(A...)> {{
    typedef void type(typename gpunet_bare<A>::type...);
}};
static_assert(gpunet_same<gpunet_params<decltype({kernel_name})>::type, void({expected})>::value,
              "{kernel_name}: its parameters are not of the types its launch passes: ({expected})");
"""


def raw_programs(dtype: str, source: str | None = None) -> list:
    """``(name, source)`` of gpunet's RawKernels for ``dtype``: the exact source CuPy compiles, then
    the same with :func:`signature_check` against the arguments its ``*_launch`` function passes.
    ``source`` replaces the plain softmax kernel's (for the negative tests)."""
    ctype = cuda.CTYPES[dtype]
    z, labels = np.zeros((128, 10), dtype), np.zeros(128, np.int64)
    out = []
    for name, kernel, (_, _, args) in (
        (
            cuda.SOFTMAX_XENT_NAME,
            cuda.SOFTMAX_XENT,
            cuda.softmax_xent_launch(z, labels, np.zeros_like(z), np.zeros(128, dtype)),
        ),
        (
            cuda.SOFTMAX_XENT_SUMS_NAME,
            cuda.SOFTMAX_XENT_SUMS,
            cuda.softmax_xent_sums_launch(
                z,
                labels,
                np.zeros_like(z),
                np.zeros((), dtype),
                np.zeros((), np.float64),
                np.zeros((), np.int64),
            ),
        ),
    ):
        text = cuda.softmax_xent_source(ctype, kernel)
        if source is not None and name == cuda.SOFTMAX_XENT_NAME:
            text = source
        out += [(name, text), (f"{name}_signature", text + signature_check(name, args))]
    images, maps, col = (
        np.zeros((128, 784), dtype),
        np.zeros((128, 2, 3), dtype),
        np.zeros(512, dtype),
    )
    y = np.zeros((128, 512), dtype)
    W = types.SimpleNamespace(data=np.zeros((784, 512), dtype), grad=np.zeros((784, 512), dtype))
    b = types.SimpleNamespace(data=col.copy(), grad=col.copy())
    t = np.dtype(dtype).type
    layer = (
        cuda.layer_update_launch(W, b, v, vb, y, t(0.05), t(0.9), t(0), False)
        for v, vb in ((np.zeros_like(W.data), col.copy()), (None, None))
    )
    for name, (_, _, args) in (
        (cuda.LAYER_MOMENTUM_NAME, next(layer)),
        (cuda.LAYER_SGD_NAME, next(layer)),
        (cuda.RESAMPLE_NAME, cuda.resample_launch(images, maps, None, (28, 28), images.copy())),
        (
            cuda.BATCH_NORM_STATS_NAME,
            cuda.batch_norm_stats_launch(y, *[col.copy() for _ in range(5)], 0.1, 1e-5),
        ),
        (
            cuda.BATCH_NORM_BACKWARD_NAME,
            cuda.batch_norm_backward_launch(
                y, y.copy(), y.copy(), y.copy(), col, col.copy(), col.copy(), col.copy(), True
            ),
        ),
    ):
        text = cuda.raw_source(ctype, name)
        out += [(name, text), (f"{name}_signature", text + signature_check(name, args))]
    return out


def programs(dtype: str) -> list:
    """Every distinct ``(name, source, kernel options)`` gpunet has CuPy compile in ``dtype``, the
    RawKernel's signature check included."""
    seen, out = set(), []
    for spec, args in elementwise_launches(dtype):
        program = elementwise_program(spec, args)
        if program[:2] not in seen:
            seen.add(program[:2])
            out.append(program)
    return out + [(name, source, ()) for name, source in raw_programs(dtype)]


def main() -> int:
    """Compile every program for every arch and dtype, as tests/unit/test_cuda_compile.py does;
    docker/test-image.sh runs this inside the image (`python /tests/support/cuda_compile.py`) to
    hold the image's own NVRTC and headers to it. Prints one line per arch and dtype; exit status 1
    on the first missing piece or failed program."""
    try:
        tools = toolchain()
    except Unavailable as exc:
        print(f"cuda_compile: {exc}")
        return 1
    print(
        f"cuda_compile: NVRTC {'.'.join(map(str, tools['nvrtc']))}, CUDA headers "
        f"{tools['headers']} "
        f"(CUDART_VERSION {tools['cudart']})"
    )
    failures = 0
    for arch in tools["archs"]:
        for dtype in DTYPES:
            done = []
            for name, source, kernel_options in programs(dtype):
                try:
                    if compile_program(source, name, arch, kernel_options)[:4] != b"\x7fELF":
                        raise CompileError(f"{name} (sm_{arch}): NVRTC returned no cubin")
                    done.append(name)
                except CompileError as exc:
                    failures += 1
                    print(f"cuda_compile: FAILED: {exc}")
            print(
                f"cuda_compile: sm_{arch} {dtype}: {len(done)} programs compiled "
                f"({', '.join(done)})"
            )
    return 1 if failures else 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
