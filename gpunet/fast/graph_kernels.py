"""The CUDA graph step's own GEMMs: tiled SGEMM/DGEMM RawKernels for the three products of a
training step (``x @ W``, ``dy @ W.T``, ``x.T @ dy``), all row-major (C-contiguous) arrays.

Why our own kernels: CuPy's cuBLAS calls raise NotImplementedError while a stream is capturing
(``cupy_backends/cuda/libs/cublas.pyx``, ``setStream``), so a captured step cannot call ``matmul``.
The two ways out, and why this one:

* **RawKernels (chosen).** They capture like every other kernel, need nothing beyond what CuPy
  already compiles, and, above all, run on the CPU in tests/support/cuda_cpu.py against NumPy's
  matmul, so that a machine without a GPU proves them (this session had none).
* cuBLASLt through its C API (``cublasLtMatmul`` with the stream and a preallocated workspace set
  before capture): cuBLAS's own speed, but a ctypes binding that nothing here can run or test, and
  one more library to find at run time.

The trade-off in numbers. **All of these are estimates from public figures, not measurements; no GPU
was used.** The default step (784-512-512-10, batch 128) does 411 MFLOP of GEMMs. Siboehm's worked
series (https://siboehm.com/articles/22/CUDA-MMM, A6000, 4096^2 SGEMM) puts a shared-memory kernel
with 2-D register blocking, as here, at 68.7% of cuBLAS, the plain shared-memory tile at 12.8%; at
our small shapes (128x784x512: 64 blocks of 32x32 for 132 SMs on an H100) the fill is worse, so we
expect 30-60% of cuBLAS at 128x784x512 and 128x512x512, and 40-70% at 784x128x512 (x.T @ dy, 200
blocks). Issue 37 estimates the step's device time at 70-90 us with cuBLAS, 411 MFLOP at some 15-20
TFLOP/s of FP32 (cuBLAS without TF32, CuPy's default, far from the 67 TFLOP/s peak at these sizes)
is 20-27 us of it; at 30-60% of that speed the GEMMs take 35-90 us instead, so the step's device
time grows by about 15-65 us. Against that, the host time saved: the eager step's six GEMMs through
CuPy cost about 15-25 us of host each and its 10-15 other launches 8-15 us each (issue 37's
profile): about 0.25-0.4 ms a step, replaced by one graph launch of about 10-15 us. The eager step
is host-bound at 0.25-0.4 ms; the graph step would be device-bound at roughly 0.09-0.16 ms: an
expected 2-3x per step, to be measured by benchmarks/gpu_session.sh before the default changes.

Tiles: a block of 16x16 threads computes a 32x32 tile of C, each thread a 2x2 micro-tile strided by
16 (so that neighbouring threads read neighbouring shared-memory words), over K in steps of 16
staged in shared memory; each element's K sum runs in ascending order in one thread, so the result
is the same bits on every run (no split-K, no atomics).
"""

from __future__ import annotations

import functools

import numpy as np

from .cuda import CTYPES, ctype

TILE, STEP, THREADS_SIDE = 32, 16, 16  # C tile (TILE x TILE), K step, threads per side of a block
VARIANTS = {"nn": (0, 0), "nt": (0, 1), "tn": (1, 0)}  # x @ W, dy @ W.T, x.T @ dy

# C (m, n) = op(A) (m, k) @ op(B) (k, n), row-major; op(A) = A.T where TRANS_A (A stored (k, m)),
# op(B) = B.T where TRANS_B (B stored (n, k)). Loads are laid out so that consecutive threads read
# consecutive addresses of the stored matrix (coalesced) for every variant.
GEMM = r"""
#define RM (TILE / SIDE)
#define A_AT(r, c) (TRANS_A ? a[(long long)(c) * m + (r)] : a[(long long)(r) * k + (c)])
#define B_AT(r, c) (TRANS_B ? b[(long long)(c) * k + (r)] : b[(long long)(r) * n + (c)])
extern "C" __global__ void NAME(const T* a, const T* b, T* c, const int m, const int n,
                                const int k) {
    __shared__ T as[STEP][TILE + 1];
    __shared__ T bs[STEP][TILE + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, tid = ty * SIDE + tx;
    const int row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    T acc[RM][RM];
    for (int i = 0; i < RM; ++i)
        for (int j = 0; j < RM; ++j) acc[i][j] = (T)0;
    for (int k0 = 0; k0 < k; k0 += STEP) {
        for (int e = tid; e < STEP * TILE; e += SIDE * SIDE) {
            const int kk = TRANS_A ? e / TILE : e % STEP, mm = TRANS_A ? e % TILE : e / STEP;
            const int gm = row0 + mm, gk = k0 + kk;
            as[kk][mm] = (gm < m && gk < k) ? A_AT(gm, gk) : (T)0;
            const int kb = TRANS_B ? e % STEP : e / TILE, nb = TRANS_B ? e / STEP : e % TILE;
            const int gn = col0 + nb, gkb = k0 + kb;
            bs[kb][nb] = (gn < n && gkb < k) ? B_AT(gkb, gn) : (T)0;
        }
        __syncthreads();
        for (int kk = 0; kk < STEP; ++kk) {
            T ra[RM], rb[RM];
            for (int i = 0; i < RM; ++i) ra[i] = as[kk][ty + i * SIDE];
            for (int j = 0; j < RM; ++j) rb[j] = bs[kk][tx + j * SIDE];
            for (int i = 0; i < RM; ++i)
                for (int j = 0; j < RM; ++j) acc[i][j] += ra[i] * rb[j];
        }
        __syncthreads();
    }
    for (int i = 0; i < RM; ++i) {
        const int r = row0 + ty + i * SIDE;
        for (int j = 0; j < RM; ++j) {
            const int col = col0 + tx + j * SIDE;
            if (r < m && col < n) c[(long long)r * n + col] = acc[i][j];
        }
    }
}
"""


def gemm_name(variant: str) -> str:
    """The kernel name of ``variant`` ("nn", "nt" or "tn"), e.g. ``gpunet_gemm_nt``."""
    return f"gpunet_gemm_{variant}"


def gemm_source(ctype_: str, variant: str) -> str:
    """The complete CUDA source of the GEMM ``variant`` for ``ctype_`` ("float" or "double")."""
    if ctype_ not in CTYPES.values() or variant not in VARIANTS:
        raise ValueError(
            f"gemm_source: expected a ctype of {sorted(CTYPES.values())} and a variant of "
            f"{sorted(VARIANTS)}, got {ctype_!r}, {variant!r}"
        )
    ta, tb = VARIANTS[variant]
    return (
        f"typedef {ctype_} T;\n#define NAME {gemm_name(variant)}\n#define TRANS_A {ta}\n"
        f"#define TRANS_B {tb}\n#define TILE {TILE}\n#define STEP {STEP}\n"
        f"#define SIDE {THREADS_SIDE}\n" + GEMM
    )


@functools.cache
def _gemm(ctype_: str, variant: str):
    import cupy

    return cupy.RawKernel(gemm_source(ctype_, variant), gemm_name(variant))


def _variant(trans_a: bool, trans_b: bool) -> str:
    for name, flags in VARIANTS.items():
        if flags == (int(trans_a), int(trans_b)):
            return name
    raise ValueError(
        "gemm: trans_a and trans_b both set is not a product of the step (expected nn, nt or tn)"
    )


def gemm_launch(a, b, out, trans_a: bool = False, trans_b: bool = False):
    """``(variant, grid, block, args)`` of ``out = op(a) @ op(b)``: a, b, out C-contiguous of one
    float dtype, op(a) (m, k), op(b) (k, n), out (m, n); one block of 16x16 threads per 32x32 tile
    of out; m, n, k as int32 (CI checks the kernel's signature against these). ValueError names a
    mismatch."""
    variant = _variant(trans_a, trans_b)
    m, k = a.shape[::-1] if trans_a else a.shape
    kb, n = b.shape[::-1] if trans_b else b.shape
    if not (
        a.ndim == b.ndim == out.ndim == 2
        and a.dtype == b.dtype == out.dtype
        and all(v.flags.c_contiguous for v in (a, b, out))
        and kb == k
        and out.shape == (m, n)
    ):
        raise ValueError(
            f"gemm: expected C-contiguous 2-D a, b, out of one dtype with op(a) (m, k), op(b) "
            f"(k, n), out (m, n); got {a.dtype}{a.shape}, {b.dtype}{b.shape}, "
            f"{out.dtype}{out.shape} ({variant})"
        )
    if max(m, n, k) >= 2**31:
        raise ValueError(f"gemm: dimensions must be below 2**31, got m={m}, n={n}, k={k}")
    grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
    return (
        variant,
        grid,
        (THREADS_SIDE, THREADS_SIDE),
        (a, b, out, np.int32(m), np.int32(n), np.int32(k)),
    )


def gemm(a, b, out, trans_a: bool = False, trans_b: bool = False):
    """``out = op(a) @ op(b)`` in one launch on the current stream, op the transpose where asked
    (see :func:`gemm_launch`); allocates nothing, so it may run while a stream captures. Returns
    ``out``."""
    variant, grid, block, args = gemm_launch(a, b, out, trans_a, trans_b)
    if grid[0] and grid[1]:
        _gemm(ctype(out.dtype), variant)(grid, block, args)
    return out


# ---------------------------------------------------------- kernels that read the step's scalars
# The graph replays the same launches every step, so what changes between steps (the batch's offset
# into the epoch's permutation, Adam's bias corrections, a schedule's lr, the dropout keys) cannot
# be a kernel argument: it is read from the step's scalars, one uint64 buffer ``scalars_u`` on the
# device (its float64 view ``scalars_f``), refilled by one asynchronous copy before each replay.
# Each variant below is the eager kernel of gpunet.fast.cuda with some of its scalar parameters read
# from that buffer at slot ``at`` onwards, cast to the parameter's type (a value stored as
# float64(T(x)) casts back to T(x) exactly), so that the eager kernel's body, and its rounding, is
# reused as it is.
C_NAMES = {
    "T": "T",
    "uint64": "unsigned long long",
    "uint32": "unsigned int",
    "int32": "int",
    "float64": "double",
}
GATHER_ROWS_SCALED = (
    "raw uint8 src, raw int64 perm, raw uint64 scalars_u, int32 cols, T divisor",
    "T out",
    "out = (T)src[perm[scalars_u[0] + i / cols] * cols + i % cols] / divisor;",
    "gpunet_graph_gather_scaled",
)
GATHER_ROWS = (
    "raw T src, raw int64 perm, raw uint64 scalars_u, int32 cols",
    "T out",
    "out = src[perm[scalars_u[0] + i / cols] * cols + i % cols];",
    "gpunet_graph_gather",
)
GATHER_LABELS = (
    "raw L y, raw int64 perm, raw uint64 scalars_u",
    "int64 out",
    "out = (long long)y[perm[scalars_u[0] + i]];",
    "gpunet_graph_gather_labels",
)
# b.grad = dy.sum(0) for Adam's bias (the eager step's CuPy reduction may take CUB's path, which
# allocates its work space: not allowed in a capture); rows summed in the order the layer kernels
# use
BIAS_GRAD = (
    "raw T dy, int32 rows, int32 cols",
    "T gb",
    "T s = 0; for (int r = 0; r < rows; ++r) s += dy[r * cols + i]; gb = s;",
    "gpunet_graph_bias_grad",
)


def reading(spec: tuple, names: tuple, buffer: str, name: str) -> tuple:
    """``spec`` (an ElementwiseKernel's in_params, out_params, operation, name) with its scalar
    parameters ``names`` read from ``buffer`` ("scalars_f": float64, "scalars_u": uint64) at ``at``,
    ``at + 1``, ... instead (the names are not ``s``/``u``: the layer kernels' bodies use ``s``)."""
    params = [p.strip() for p in spec[0].split(",")]
    kept, reads = [], []
    for p in params:
        *_, kind, pname = p.split()
        if pname in names and not p.startswith("raw "):
            reads.append((names.index(pname), kind, pname))
        else:
            kept.append(p)
    if len(reads) != len(names):
        raise ValueError(f"reading: {spec[3]} has no scalar parameters {names} (it has {params})")
    buf = f"raw {'float64' if buffer == 'scalars_f' else 'uint64'} {buffer}"
    head = " ".join(
        f"const {C_NAMES[k]} {n} = ({C_NAMES[k]}){buffer}[at + {j}];" for j, k, n in sorted(reads)
    )
    return (", ".join(kept + [buf, "int32 at"]), spec[1], head + " " + spec[2], name)


@functools.cache
def variants() -> dict:
    """The graph step's ElementwiseKernel specs by name: the gathers, the bias gradient, and the
    eager update and dropout kernels reading their per-step scalars (see :func:`reading`)."""
    from . import cuda

    eager = cuda.ELEMENTWISE
    return {
        "gather_scaled": GATHER_ROWS_SCALED,
        "gather": GATHER_ROWS,
        "gather_labels": GATHER_LABELS,
        "bias_grad": BIAS_GRAD,
        "layer_sgd": reading(cuda.LAYER_SGD, ("lr", "wd"), "scalars_f", "gpunet_graph_layer_sgd"),
        "layer_momentum": reading(
            cuda.LAYER_MOMENTUM,
            ("lr", "gamma", "wd"),
            "scalars_f",
            "gpunet_graph_layer_momentum",
        ),
        "dropout": reading(eager["dropout"], ("key",), "scalars_u", "gpunet_graph_dropout"),
    }


_RULES: dict = {}  # the graph variants of the optimizers' rule kernels, by name, made on first use


def rule(opt) -> str:
    """The name of the graph variant of ``opt``'s rule kernel (gpunet.fast.rules: its scalars read
    from the step's buffer, in the order of ``opt.constants()``), made on first use."""
    from . import rules

    name = rules.variant(opt)[len("gpunet_") :]
    if name not in _RULES:
        _RULES[name] = reading(
            rules.kernel_spec(opt), tuple(opt.constants()), "scalars_f", "gpunet_graph_" + name
        )
    return name


def spec(name: str) -> tuple:
    """The ElementwiseKernel spec of graph variant ``name``: of :func:`variants`, or a rule's."""
    return _RULES[name] if name in _RULES else variants()[name]


@functools.cache
def _elementwise(name: str):
    import cupy

    return cupy.ElementwiseKernel(*spec(name))


def launch(name: str, *args):
    """Launch the graph variant ``name`` (see :func:`variants`) with ``args`` in its parameter
    order."""
    return _elementwise(name)(*args)
