"""What the CUDA tests share: their toolchains found or skipped (or failed, where CI requires them),
and the fake CuPy put in place with gpunet's kernel caches cleared around it.

* ``cxx_or_skip`` (tests/support/cuda_cpu.py's g++ and CuPy headers; GPUNET_REQUIRE_CXX=1 fails
  instead), ``nvrtc_or_skip`` (tests/support/cuda_compile.py's NVRTC and runtime headers;
GPUNET_REQUIRE_NVRTC=1);
* ``clear_kernel_caches``: every cached kernel constructor of gpunet.fast's loaded modules, so
  that a test's fake CuPy builds its own kernels and the next test's CuPy never sees them (found,
  not listed: a new cache needs no edit here);
* ``fake_cupy``: the counting stand-in installed as ``cupy`` for one test.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import pytest


def require(probe, unavailable: type, flag: str):
    """``probe()``'s result; where it raises ``unavailable``, skip with its message, or fail when
    the environment sets ``flag`` to 1 (CI: a missing toolchain must not pass as skipped)."""
    try:
        return probe()
    except unavailable as exc:
        if os.environ.get(flag) == "1":
            pytest.fail(f"{flag}=1 but {exc}")
        pytest.skip(str(exc))


def cxx_or_skip() -> dict:
    """g++ and CuPy's headers (cuda_cpu.toolchain), else skip, or fail under
    GPUNET_REQUIRE_CXX=1."""
    import cuda_cpu

    return require(cuda_cpu.toolchain, cuda_cpu.Unavailable, "GPUNET_REQUIRE_CXX")


def nvrtc_or_skip() -> dict:
    """NVRTC and the runtime headers (cuda_compile.toolchain), else skip, or fail under
    GPUNET_REQUIRE_NVRTC=1."""
    import cuda_compile

    return require(cuda_compile.toolchain, cuda_compile.Unavailable, "GPUNET_REQUIRE_NVRTC")


def kernel_caches() -> list:
    """The functools caches defined in gpunet.fast's loaded modules (the kernel constructors)."""
    found = []
    for name, module in list(sys.modules.items()):
        if not name.startswith("gpunet.fast") or module is None:
            continue
        for value in vars(module).values():
            if hasattr(value, "cache_clear") and getattr(value, "__module__", None) == name:
                found.append(value)
    return found


def clear_kernel_caches() -> None:
    for cache in kernel_caches():
        cache.cache_clear()


@contextmanager
def fake_cupy(monkeypatch, harness: bool = False):
    """The counting fake CuPy as ``cupy`` (tests/support/launch_counts.install: the backend's probe
    finds a "GPU"; the kernel caches cleared before and after). Every launch runs its CUDA source on
    the CPU where g++ is here (tests/support/cuda_cpu.py); ``harness`` requires it (skips or fails
    without) and undoes a GPUNET_CUDA_CPU=0."""
    import launch_counts

    if harness:
        cxx_or_skip()
        monkeypatch.delenv("GPUNET_CUDA_CPU", raising=False)
    try:
        yield launch_counts.install(monkeypatch)
    finally:
        clear_kernel_caches()
