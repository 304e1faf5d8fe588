"""The graph step's GEMM RawKernels (gpunet/fast/graph_kernels.py): each variant's CUDA source run
on the CPU (tests/support/cuda_cpu.py: three orders of threads, guard bytes, held to NumPy's matmul
by the fake CuPy's mirror) and here against NumPy's matmul in float64 with a rigorous error bound,
at shapes that are not multiples of the 32x32 tile; and compiled with NVRTC like every other kernel.

Skips without g++ and CuPy's headers (GPUNET_REQUIRE_CXX=1 fails instead), and the NVRTC test
without NVRTC (GPUNET_REQUIRE_NVRTC=1 fails instead).
"""

import cuda_compile as cc
import cuda_cpu
import cuda_support
import numpy as np
import pytest
from cuda_support import nvrtc_or_skip

from gpunet.fast import cuda, graph_kernels as gk

ROWS = (1, 3, 127, 128, 129)
# (dtype, rows, inputs, outputs) of a layer: every awkward batch with the default network's widths
# 784, 512 and 10 as inner and outer dimensions, and the default network's first layer itself at
# batches 128 and 129 (with the CPU harness's stack pool each such product runs in about 1.5 s)
CASES = [
    (dtype, r, i, o)
    for dtype in ("float32", "float64")
    for r, i, o in [(r, 784, 10) for r in ROWS]
    + [(r, 10, 512) for r in ROWS]
    + [(129, 512, 10), (128, 784, 512), (129, 784, 512)]
]


@pytest.fixture
def fake(monkeypatch):
    with cuda_support.fake_cupy(monkeypatch, harness=True) as fake:
        yield fake


def operands(variant, rows, fan_in, fan_out, dtype, seed=0):
    """The step's operands of ``variant``: nn x (rows, in) @ W (in, out); nt dy (rows, out) @ W.T;
    tn x.T @ dy. Returns (a, b, trans_a, trans_b)."""
    rng = np.random.default_rng(seed)
    x, W = rng.normal(size=(rows, fan_in)), rng.normal(size=(fan_in, fan_out))
    dy = rng.normal(size=(rows, fan_out))
    a, b = {"nn": (x, W), "nt": (dy, W), "tn": (x, dy)}[variant]
    ta, tb = gk.VARIANTS[variant]
    return a.astype(dtype), b.astype(dtype), bool(ta), bool(tb)


def check_product(got, a, b, ta, tb):
    """got against float64 matmul within the bound of any summation order: |error| <= k * eps *
    (|op(a)| @ |op(b)|) (Higham, Accuracy and Stability, eq. 3.13: gamma_k, k eps to first order),
    doubled for the products' own rounding; exact zeros and signs are not asked of it."""
    A = a.astype(np.float64).T if ta else a.astype(np.float64)
    B = b.astype(np.float64).T if tb else b.astype(np.float64)
    k, eps = A.shape[1], np.finfo(a.dtype).eps
    bound = 2 * max(k, 1) * eps * (np.abs(A) @ np.abs(B)) + np.finfo(a.dtype).tiny
    np.testing.assert_array_less(np.abs(got.astype(np.float64) - A @ B), bound + 1e-300)


@pytest.mark.parametrize("variant", sorted(gk.VARIANTS))
@pytest.mark.parametrize("dtype,rows,fan_in,fan_out", CASES)
def test_gemm_runs_its_cuda_source_against_matmul(fake, dtype, variant, rows, fan_in, fan_out):
    a, b, ta, tb = operands(variant, rows, fan_in, fan_out, dtype)
    m = a.shape[1] if ta else a.shape[0]
    n = b.shape[0] if tb else b.shape[1]
    out = fake.full((m, n), np.nan, dtype)  # NaN where the kernel would leave an element unwritten
    before = cuda_cpu.stats["launches"]
    got = gk.gemm(fake.asarray(a), fake.asarray(b), out, ta, tb)
    assert got is out and cuda_cpu.stats["launches"] == before + 1  # the CUDA source ran
    assert fake.counter.log[-1] == gk.gemm_name(variant)
    check_product(np.asarray(out), a, b, ta, tb)


@pytest.mark.parametrize("variant", sorted(gk.VARIANTS))
def test_gemm_with_an_empty_inner_dimension_writes_zeros(fake, variant):
    """k = 0 (no inputs, or x.T @ dy of an empty batch): every element of out is a sum of
    nothing."""
    a_shape, b_shape = {"nn": ((3, 0), (0, 4)), "nt": ((3, 0), (4, 0)), "tn": ((0, 3), (0, 4))}[
        variant
    ]
    ta, tb = (bool(f) for f in gk.VARIANTS[variant])
    out = fake.full((3, 4), np.nan, np.float32)
    gk.gemm(fake.zeros(a_shape, np.float32), fake.zeros(b_shape, np.float32), out, ta, tb)
    assert np.all(np.asarray(out) == 0), variant


def test_gemm_refuses_mismatched_shapes_in_one_line(fake):
    a, b = fake.zeros((3, 5), np.float32), fake.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"gemm: expected .* got float32\(3, 5\), float32\(4, 6\)"):
        gk.gemm(a, b, fake.zeros((3, 6), np.float32))
    with pytest.raises(ValueError, match="nn, nt or tn"):
        gk.gemm(a, b, fake.zeros((3, 6), np.float32), True, True)
    with pytest.raises(ValueError, match="one dtype"):
        gk.gemm(a, fake.zeros((5, 6), np.float64), fake.zeros((3, 6), np.float32))


@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_gemm_kernels_compile_with_nvrtc(dtype):
    """Each variant with NVRTC for every arch NVRTC here knows, with the signature check against the
    arguments gemm_launch passes (a kernel taking int64 sizes, or float pointers in a float64 build,
    fails it)."""
    tools = nvrtc_or_skip()
    a, b = np.zeros((128, 784), dtype), np.zeros((784, 512), dtype)
    failures = []
    for variant in gk.VARIANTS:
        ta, tb = gk.VARIANTS[variant]
        x, y = (a.T.copy() if ta else a), (b.T.copy() if tb else b)
        _, _, _, args = gk.gemm_launch(x, y, np.zeros((128, 512), dtype), bool(ta), bool(tb))
        source = gk.gemm_source(cuda.CTYPES[dtype], variant)
        source += cc.signature_check(gk.gemm_name(variant), args)
        for arch in tools["archs"]:
            try:
                assert cc.compile_program(source, gk.gemm_name(variant), arch)[:4] == b"\x7fELF"
            except cc.CompileError as exc:
                failures.append(str(exc))
    assert not failures, "\n\n".join(failures)
