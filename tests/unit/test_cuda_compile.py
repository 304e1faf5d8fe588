"""Every CUDA kernel of gpunet compiled with NVRTC for compute capabilities 8.0, 9.0 and 12.0, in
float32 and float64, on a machine without a GPU: the exact sources and options CuPy builds
(tests/support/cuda_compile.py says how). The negative cases prove the check can fail: a typo in a
kernel body, a declared type that does not fit the arguments, and a RawKernel parameter of another
type than its launch passes.

Skips when NVRTC or the CUDA runtime headers are missing (NVIDIA's wheels nvidia-cuda-nvrtc-cu12 and
nvidia-cuda-runtime-cu12); GPUNET_REQUIRE_NVRTC=1 (set by .ci/run) makes that a failure.
"""

import re
from pathlib import Path

import cuda_compile as cc
import cuda_support
import numpy as np
import pytest

from gpunet import backend
from gpunet.fast import cuda

PACKAGE = Path(__file__).resolve().parents[2] / "gpunet"


toolchain_or_skip = cuda_support.nvrtc_or_skip


@pytest.fixture(scope="module")
def nvrtc():
    return toolchain_or_skip()


def test_every_kernel_is_built_from_the_sources_checked_here():
    """The only kernel constructors in gpunet are the four below, so the lists compiled here are
    complete."""
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for line in path.read_text().splitlines():
            if re.search(
                r"\b(ElementwiseKernel|RawKernel|RawModule|ReductionKernel|fuse|rawkernel)\(", line
            ):
                found.add((str(path.relative_to(PACKAGE)), line.strip()))
    assert found == {
        ("backend.py", "twice = cupy.ElementwiseKernel(*PROBE_KERNEL)"),
        ("fast/cuda.py", "return cupy.ElementwiseKernel(*ELEMENTWISE[name])"),
        (
            "fast/cuda.py",
            "return cupy.RawKernel(softmax_xent_source(ctype, SOFTMAX_XENT), SOFTMAX_XENT_NAME)",
        ),
        (
            "fast/cuda.py",
            "return cupy.RawKernel(softmax_xent_source(ctype, SOFTMAX_XENT_SUMS), "
            "SOFTMAX_XENT_SUMS_NAME)",
        ),
        ("fast/cuda.py", "return cupy.RawKernel(raw_source(ctype, name), name)"),
        # the graph step's GEMMs: compiled in tests/unit/test_graph_kernels.py
        (
            "fast/graph_kernels.py",
            "return cupy.RawKernel(gemm_source(ctype_, variant), gemm_name(variant))",
        ),
        # the graph step's elementwise variants: compiled in tests/unit/test_graph_step.py
        ("fast/graph_kernels.py", "return cupy.ElementwiseKernel(*spec(name))"),
    }


@pytest.mark.parametrize("dtype", cc.DTYPES)
@pytest.mark.parametrize("arch", cc.ARCHS)
def test_every_kernel_compiles(nvrtc, arch, dtype):
    if arch not in nvrtc["archs"]:
        pytest.skip(f"NVRTC {nvrtc['nvrtc']} cannot build sm_{arch} (12.0 needs NVRTC >= 12.8)")
    programs = cc.programs(dtype)
    failures = []
    for name, source, options in programs:
        try:
            cubin = cc.compile_program(source, name, arch, options)
            assert cubin[:4] == b"\x7fELF", f"{name}: NVRTC returned no cubin"
        except cc.CompileError as exc:
            failures.append(str(exc))
    assert not failures, "\n\n".join(failures)
    names = {name for name, _, _ in programs}
    want = {spec[3] for spec in cuda.ELEMENTWISE.values()} | {
        name + suffix
        for name in (cuda.SOFTMAX_XENT_NAME, cuda.SOFTMAX_XENT_SUMS_NAME, *cuda.RAW)
        for suffix in ("", "_signature")
    }
    assert names == want | ({backend.PROBE_KERNEL[3]} if dtype == "float32" else set())


def test_the_generated_sources_describe_the_launches(nvrtc):
    """Spot checks of the mirrored layout: bias_relu's bias is a broadcast (non-contiguous) 2-D
    array beside a contiguous 2-D output; an online-learning row and the optimizer's arrays run as
    flat 1-D loops."""
    sources = {}
    for spec, args in cc.elementwise_launches("float32"):
        sources.setdefault(spec[3], []).append(cc.elementwise_program(spec, args)[1])
    assert (
        "const CArray<float, 2, 0, 1> _raw_b, CArray<float, 2, 1, 1> _raw_y, CIndexer<2, 1> _ind"
        in sources["gpunet_bias_relu"][0]
    )
    assert (
        "const CArray<float, 1, 1, 1> _raw_b, CArray<float, 1, 1, 1> _raw_y, CIndexer<1, 1> _ind"
        in sources["gpunet_bias_relu"][1]
    )
    assert (
        "const float eps, const float decay, CArray<float, 1, 1, 1> _raw_w, "
        "CArray<float, 1, 1, 1> _raw_m, CArray<float, 1, 1, 1> _raw_v"
    ) in sources["gpunet_adamw_wd"][0]
    assert all(s.startswith("#include <cupy/") for group in sources.values() for s in group)


# ------------------------------------------------------------------------------ the check can fail
def _launch(name, dtype="float32"):
    """The first recorded launch of elementwise kernel ``name``: (spec, args)."""
    return next((s, a) for s, a in cc.elementwise_launches(dtype) if s[3] == name)


def _misspell(spec):
    """The spec with the first use of its last output parameter in the operation misspelled."""
    out = spec[1].split(",")[-1].split()[-1]
    return spec[:2] + (re.sub(rf"\b{out}\b", out + "_typo", spec[2], count=1),) + spec[3:]


@pytest.mark.parametrize("key", sorted(cuda.ELEMENTWISE))
def test_a_typo_in_an_elementwise_kernel_fails(nvrtc, key):
    spec, args = _launch(cuda.ELEMENTWISE[key][3])
    name, source, options = cc.elementwise_program(_misspell(spec), args)
    with pytest.raises(cc.CompileError, match="_typo.* is undefined"):
        cc.compile_program(source, name, "90", options)


def test_a_typo_in_the_raw_kernel_fails(nvrtc):
    typo = cuda.softmax_xent_source("float").replace("gi[j] = e;", "gi[j] = ee;")
    with pytest.raises(cc.CompileError, match='identifier "ee" is undefined'):
        cc.compile_program(typo, "typo", "90")


def test_a_declared_type_that_does_not_fit_the_arguments_fails(nvrtc):
    """The pixels' gather declaring its images float64 while gpunet passes uint8: CuPy's own type
    decision refuses it (on a GPU this is the error the first training step would raise)."""
    spec, args = _launch("gpunet_gather_scaled")
    wrong = (spec[0].replace("raw uint8 src", "raw float64 src"),) + spec[1:]
    with pytest.raises(TypeError, match="Type is mismatched"):
        cc.elementwise_program(wrong, args)


def test_a_raw_kernel_parameter_of_another_type_than_its_launch_fails(nvrtc):
    """Labels declared int while the launch passes int64 compile on their own (CuPy's RawKernel
    checks no types, and the kernel would read garbage); the signature check catches it."""
    wrong = cuda.softmax_xent_source("float").replace("const long long* y", "const int* y")
    (name, exact), (_, checked) = cc.raw_programs("float32", source=wrong)[:2]
    cc.compile_program(exact, name, "90")
    with pytest.raises(
        cc.CompileError, match="its parameters are not of the types its launch passes"
    ):
        cc.compile_program(checked, name, "90")


def test_a_launch_passing_another_type_than_the_kernel_declares_fails(nvrtc, monkeypatch):
    real = cuda.softmax_xent_launch

    def int64_rows(*arrays):  # n passed as int64: 8 bytes where the kernel reads an int
        grid, block, args = real(*arrays)
        return grid, block, args[:4] + (np.int64(args[4]),) + args[5:]

    monkeypatch.setattr(cuda, "softmax_xent_launch", int64_rows)
    name, checked = cc.raw_programs("float32")[1]
    with pytest.raises(
        cc.CompileError,
        match=r"launch passes: \(float\*, long long\*, float\*, float\*, long long, int",
    ):
        cc.compile_program(checked, name, "90")


def test_missing_nvrtc_skips_or_fails_as_configured(monkeypatch):
    """Without NVRTC the compile tests skip, naming the wheels; under GPUNET_REQUIRE_NVRTC=1 they
    fail."""

    def unavailable():
        raise cc.Unavailable("NVRTC is not usable (test); pip install nvidia-cuda-nvrtc-cu12")

    monkeypatch.setattr(cc, "toolchain", unavailable)
    for require, outcome in (("0", pytest.skip.Exception), ("1", pytest.fail.Exception)):
        monkeypatch.setenv("GPUNET_REQUIRE_NVRTC", require)
        with pytest.raises(outcome, match="nvidia-cuda-nvrtc-cu12"):
            toolchain_or_skip()


# ------------------------------------------------------------------------------------- on a GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", cc.DTYPES)
def test_cupy_compiles_on_the_gpu_the_sources_checked_here(dtype, monkeypatch):
    """On a GPU, the code CuPy generated for each launch is one of the sources compiled above (fresh
    kernel objects: CuPy keeps one code per dtype, the first layout it met)."""
    import cupy

    made = {}
    monkeypatch.setattr(
        cuda,
        "_elementwise",
        lambda name: made.setdefault(name, cupy.ElementwiseKernel(*cuda.ELEMENTWISE[name])),
    )
    cc.launch_all(dtype, cupy)
    checked = {source for name, source, _ in cc.programs(dtype)}
    for name, kernel in made.items():
        codes = list(kernel.cached_codes.values())
        assert codes and all(any(s.endswith(code) for s in checked) for code in codes), name
