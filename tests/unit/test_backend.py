"""Device selection: names, the GPUNET_DEVICE override, the CuPy probe and its fallback reasons."""

import importlib.util
import os
import sys
import threading
import types

import numpy as np
import pytest
from conftest import assert_allclose
from fresh_python import run_code

import gpunet as gn
from gpunet import backend
from gpunet.backend import DeviceError


def test_device_names_and_env_override(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)
    assert backend.normalize_device(None) == "auto"
    assert backend.normalize_device("CUDA") == "gpu"
    assert backend.normalize_device("cuda:0") == "gpu"
    assert backend.normalize_device("cpu") == "cpu"
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    assert backend.normalize_device(None) == "cpu"
    assert backend.resolve_device(None) == "cpu"
    with pytest.raises(ValueError, match="device: expected one of .* got 'tpu'"):
        backend.normalize_device("tpu")
    for bad in ("cpu:0", "cuda:x", "cuda:-1", "auto:1"):
        with pytest.raises(ValueError, match=f"expected one of .*'cuda:N'.* got '{bad}'"):
            backend.normalize_device(bad)


class FakeCupy(types.ModuleType):
    """Just enough of CuPy for the probe and the uploads, on NumPy, recording on which device (the
    thread's current one, as CUDA keeps it) each call ran: a fake multi-GPU machine with ``count``
    devices."""

    def __init__(self, count):
        super().__init__("cupy")
        events, current = [], threading.local()
        self.events = events

        class Device:
            def __init__(self, i=None):
                self.id = getattr(current, "id", 0) if i is None else i

            def use(self):
                current.id = self.id
                events.append(("use", self.id))

            def __enter__(self):
                self.prev, current.id = getattr(current, "id", 0), self.id

            def __exit__(self, *exc):
                current.id = self.prev

        def record(what):
            events.append((what, getattr(current, "id", 0)))

        def kernel(*source):
            return lambda x: (record("kernel"), 2 * x + 1)[1]

        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: count), Device=Device
        )
        self.asarray = lambda a: (record("asarray"), np.asarray(a))[1]
        self.asnumpy, self.ElementwiseKernel = np.asarray, kernel


@pytest.fixture
def fake_gpus(monkeypatch):
    """A fake CuPy seeing two GPUs, with the backend's probe and GPU choice reset around the
    test."""
    fake = FakeCupy(2)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setattr(backend, "_probe_result", None)
    monkeypatch.setattr(backend, "_gpu_index", None)
    return fake


def test_a_gpu_index_is_chosen_before_anything_touches_a_gpu(fake_gpus):
    """``cuda:N`` selects GPU N before the probe runs its upload, kernel and matmul, so no context
    is made on GPU 0; later uploads from another thread (a server's request thread) land on GPU N
    too."""
    assert backend.resolve_device("cuda:1") == "gpu"
    touched = [dev for what, dev in fake_gpus.events if what != "use"]
    assert fake_gpus.events[0] == ("use", 1) and touched and set(touched) == {1}, fake_gpus.events
    done = []
    thread = threading.Thread(target=lambda: done.append(backend.to_device(np.ones(3), "gpu")))
    thread.start()
    thread.join()
    assert done and fake_gpus.events[-1] == ("asarray", 1), fake_gpus.events
    assert (
        backend.resolve_device("gpu") == "gpu"
    )  # plain "gpu" afterwards: the chosen GPU, no new choice
    assert {dev for what, dev in fake_gpus.events} == {1}, fake_gpus.events  # GPU 0 never touched
    with pytest.raises(DeviceError, match=r"expected a GPU index below 2 .* got 'cuda:2'"):
        backend.resolve_device("cuda:2")


def test_an_mpi_rank_takes_its_local_gpu_before_the_probe(fake_gpus):
    """Rank 3 on a node with two GPUs takes GPU 1 (3 % 2), before anything runs on GPU 0."""
    backend.select_gpu(local_rank=3)
    assert backend.resolve_device("auto") == "gpu"
    assert fake_gpus.events[0] == ("use", 1)
    assert {dev for what, dev in fake_gpus.events} == {1}, fake_gpus.events


def test_a_gpu_index_without_a_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(backend, "_gpu_index", None)
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(
        DeviceError, match="'cuda:1' was requested but no GPU is usable: CuPy is not installed"
    ):
        backend.resolve_device("cuda:1")
    backend.select_gpu(local_rank=0)  # an MPI rank without CuPy: nothing chosen, the CPU runs
    assert backend._gpu_index is None


def test_set_default_device(monkeypatch):
    monkeypatch.setenv(backend.ENV_VAR, "auto")
    backend.set_default_device("cpu")
    try:
        assert backend.normalize_device(None) == "cpu"
    finally:
        backend.set_default_device(None)
    assert backend.normalize_device(None) == "auto"


def test_array_helpers_on_cpu():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert backend.get_array_module(a) is np
    assert backend.get_array_module(1.0, [1, 2]) is np
    assert backend.device_of(a) == "cpu"
    assert backend.to_device(a, "cpu") is a  # no copy when already there
    assert isinstance(backend.to_numpy([1, 2]), np.ndarray)


def test_softmax_is_written_once_and_is_stable(device):
    """backend.log_softmax / softmax, the one softmax of layers, losses and predict_proba, against
    another formula for two classes, ``log p0 = -log1p(exp(z1 - z0))`` in float64: logits near 0 and
    the same shifted by 1000 (exp(1000) overflows any float: only the shift inside keeps them
    finite); dtype and device kept. rtol 1e-6 (a few float32 ulps) and atol 1e-7: ``log(sum)`` of a
    sum near 1 keeps float32's absolute error there (6e-8), which dominates a log-probability as
    small as -6e-6."""
    z = np.array(
        [[0.0, np.log(3.0)], [1000.0, 1000.0 + np.log(3.0)], [-5.0, 7.0]], dtype=np.float32
    )
    d = z[:, 1].astype(np.float64) - z[:, 0]
    want_log = np.stack([-np.log1p(np.exp(d)), -np.log1p(np.exp(-d))], axis=1)
    zd = backend.to_device(z, device)
    for fn, want in ((backend.log_softmax, want_log), (backend.softmax, np.exp(want_log))):
        got = fn(zd)
        assert got.dtype == np.float32 and backend.device_of(got) == device
        assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert_allclose(backend.softmax(zd)[0], [0.25, 0.75], rtol=1e-6)  # by hand: e^0 : e^ln3 = 1 : 3
    p = backend.to_numpy(
        backend.softmax(
            backend.to_device(np.random.default_rng(0).normal(size=(5, 7)) * 50, device)
        )
    )
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)  # float64 rows: one up to rounding
    assert np.isfinite(p).all()


@pytest.mark.gpu
def test_array_helpers_on_gpu():
    import cupy

    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    g = backend.to_device(a, "gpu")
    assert backend.get_array_module(g) is cupy and backend.device_of(g) == "gpu"
    back = backend.to_numpy(g)
    assert isinstance(back, np.ndarray) and np.array_equal(back, a)
    info = backend.describe_device("gpu")
    assert info["backend"] == "cupy" and info["gpu_memory_bytes"] > 0


def _fake_probe(monkeypatch, module):
    """Run the probe against a stand-in for ``cupy`` (None blocks the import)."""
    monkeypatch.setattr(backend, "_probe_result", None)
    monkeypatch.setitem(sys.modules, "cupy", module)


def test_probe_without_cupy(monkeypatch):
    _fake_probe(monkeypatch, None)
    assert backend.resolve_device("auto") == "cpu"
    assert "CuPy is not installed" in backend.gpu_unavailable_reason()
    with pytest.raises(DeviceError, match="no GPU is usable: CuPy is not installed") as err:
        backend.resolve_device("gpu")
    assert isinstance(err.value.__cause__, ImportError)


@pytest.mark.parametrize(
    "message, cause",
    [
        (
            "CUDA driver version is insufficient for CUDA runtime version "
            "(cudaErrorInsufficientDriver)",
            "NVIDIA driver",
        ),
        ("cudaErrorNoDevice: no CUDA-capable device is detected", "no CUDA device"),
        (
            'NVRTC_ERROR_COMPILATION: catastrophic error: cannot open source file "cuda_fp16.h"',
            "broken CUDA toolkit",
        ),
        # CuPy 14, NVRTC found but no runtime headers: the fix is named
        (
            "Failed to find CUDA headers. Please install the CUDA Toolkit or set CUDA_PATH",
            "broken CUDA toolkit: .*no CUDA runtime "
            "headers.*cuda-cudart-dev.*nvidia-cuda-runtime-cu12",
        ),
    ],
)
def test_probe_names_the_cause(monkeypatch, message, cause):
    fake = types.ModuleType("cupy")

    def fail(*args, **kwargs):
        raise RuntimeError(message)

    fake.asarray = fail
    _fake_probe(monkeypatch, fake)
    assert backend.resolve_device("auto") == "cpu"
    with pytest.raises(DeviceError, match=cause):
        backend.resolve_device("gpu")


def test_probe_rejects_wrong_matmul(monkeypatch):
    """A GPU that computes garbage is not chosen."""
    fake = types.ModuleType("cupy")
    fake.asarray = lambda a: np.asarray(a)
    fake.asnumpy = lambda a: np.asarray(a) * 0
    fake.ElementwiseKernel = lambda *a, **k: lambda x: 2 * x + 1
    _fake_probe(monkeypatch, fake)
    assert backend.resolve_device("auto") == "cpu"
    assert "wrong result" in backend.gpu_unavailable_reason()


def test_real_cupy_falls_back_on_a_machine_without_gpu():
    """With a real CuPy wheel installed but no usable GPU, auto falls back and gpu raises.

    .ci/run installs CuPy on the GPU-less CI machine and sets GPUNET_REQUIRE_CUPY=1, so there this
    test cannot skip. It runs in a fresh interpreter so no earlier probe result is reused.
    """
    if importlib.util.find_spec("cupy") is None:
        if os.environ.get("GPUNET_REQUIRE_CUPY") == "1":
            pytest.fail("GPUNET_REQUIRE_CUPY=1 but CuPy is not installed")
        pytest.skip("CuPy is not installed here")
    code = (
        "import gpunet.backend as b\n"
        "if b.gpu_available(): print('GPU'); raise SystemExit(0)\n"
        "assert b.resolve_device('auto') == 'cpu'\n"
        "print('REASON', b.gpu_unavailable_reason())\n"
        "try:\n"
        "    b.resolve_device('gpu')\n"
        "except b.DeviceError as e:\n"
        "    assert e.__cause__ is not None\n"
        "    print('ERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GPUNET_DEVICE"}
    out = run_code(code, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    if out.stdout.startswith("GPU"):
        pytest.skip("a GPU is usable here: the fallback path cannot be shown")
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["REASON"] and "not installed" not in lines["REASON"], lines
    assert "no GPU is usable" in lines["ERROR"] and lines["REASON"] in lines["ERROR"]


@pytest.mark.gpu
def test_tf32_is_opt_in():
    """Off by default: a float32 matmul matches float64 to float32 accuracy; on: only to ~1e-3."""
    import cupy

    rng = np.random.default_rng(0)
    a, b = rng.random((512, 512)), rng.random((512, 512))
    exact = a @ b
    ga, gb = cupy.asarray(a, np.float32), cupy.asarray(b, np.float32)
    assert_allclose(ga @ gb, exact, rtol=1e-5)
    gn.backend.set_tf32(True)
    try:
        err = float(np.abs(gn.to_numpy(ga @ gb) - exact).max() / np.abs(exact).max())
    finally:
        gn.backend.set_tf32(False)
    assert_allclose(ga @ gb, exact, rtol=1e-5)
    assert err < 1e-2  # TF32 still close; on GPUs without tensor cores it is simply exact


def test_tf32_without_gpu_names_the_cause():
    if gn.gpu_available():
        pytest.skip("a GPU is usable here")
    with pytest.raises(gn.DeviceError, match="set_tf32 needs a usable GPU"):
        gn.backend.set_tf32(True)
