"""Shared fixtures: the device list, the real MNIST folder, and helpers that compare on the host."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from gpunet import backend

ROOT = Path(__file__).resolve().parents[1]
# tests/unit, tests/system and tests/repo hold the tests; tests/support the helpers they import by
# their bare names (``import fake_cupy``, ``from cuda_cpu import ...``), found here; ``from conftest
# import ...`` finds this file, which pytest puts on sys.path (tests/ has no __init__.py: module
# names are the file names).
SUPPORT = Path(__file__).resolve().parent / "support"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))


def pytest_collectstart(collector):
    """tests/support first on sys.path as each test module is imported: a test that puts
    benchmarks/ in front (whose pictures.py is not ours) must not change what a later module's
    ``import pictures`` finds."""
    if isinstance(collector, pytest.Module) and sys.path[:1] != [str(SUPPORT)]:
        if str(SUPPORT) in sys.path:
            sys.path.remove(str(SUPPORT))
        sys.path.insert(0, str(SUPPORT))


BENCHMARKS = ROOT / "benchmarks"


def benchmarks_on_path():
    """Put benchmarks/ on sys.path, so that a test can import a benchmark script by its bare name
    (``import speed``), as tests/support's helpers are."""
    # appended, behind tests/support: benchmarks/ has a pictures.py of its own, and a test's
    # ``import pictures`` must still find ours
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))


MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def gpu_skip_reason():
    """None when a GPU is usable, else why not (shown in pytest's skip summary)."""
    if backend.gpu_available():
        return None
    return f"no usable GPU: {backend.gpu_unavailable_reason()}"


def pytest_collection_modifyitems(config, items):
    """GPU tests skip with the reason where no GPU is usable; with GPUNET_REQUIRE_GPU=1 (on a
    machine that must have one) they fail with it instead, so a broken GPU setup cannot pass as
    skipped."""
    reason = None
    require = os.environ.get("GPUNET_REQUIRE_GPU") == "1"
    for item in items:
        if "gpu" in item.keywords:
            if reason is None:
                reason = gpu_skip_reason() or ""
            if reason:
                if require:
                    item.add_marker(pytest.mark.usefixtures("_require_gpu"))
                else:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def _require_gpu():
    reason = gpu_skip_reason()
    if reason:
        pytest.fail(f"GPUNET_REQUIRE_GPU=1 but {reason}")


# One checker, two entry points: tests take `device` and run once per device.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def optional(module: str, extra: str):
    """Import ``module``, a part that is optional for users, or skip saying so and naming the extra
    that brings it (the test extra brings most such parts; PyTorch comes with the bench extra, and
    CI installs it)."""
    return pytest.importorskip(
        module,
        reason=f"{module} is optional for users (pip install 'gpunet[{extra}]') "
        f"and not installed here; pip install -e '.[test,{extra}]' brings it",
    )


def assert_allclose(actual, desired, rtol=1e-7, atol=0.0, err_msg=""):
    """np.testing.assert_allclose after bringing both sides to the host."""
    np.testing.assert_allclose(
        backend.to_numpy(actual), backend.to_numpy(desired), rtol=rtol, atol=atol, err_msg=err_msg
    )


def _find_mnist_dir():
    candidates = [os.environ.get("GPUNET_DATA"), str(ROOT.parent / "shared" / "data" / "mnist")]
    for c in candidates:
        if c and all(
            (Path(c) / f).exists() or (Path(c) / (f + ".gz")).exists() for f in MNIST_FILES
        ):
            return Path(c)
    return None


@pytest.fixture(scope="session")
def mnist_dir():
    """The real MNIST folder (GPUNET_DATA, else ../shared/data/mnist).

    Skips without it, unless GPUNET_REQUIRE_DATA=1 (set by .ci/run), where a missing folder fails.
    """
    found = _find_mnist_dir()
    if found is None:
        msg = "real MNIST files not found (set GPUNET_DATA to the folder holding them)"
        if os.environ.get("GPUNET_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


def make_fake_mnist(folder, n_train=600, n_test=200, seed=0, gz=True):
    """Tiny MNIST-compatible files: each class is a fixed random 28x28 pattern plus noise, so a
    small net can learn it in a few epochs. Returns the folder."""
    from gpunet.data import MNIST_FILES
    from gpunet.data.idx import write_idx

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, size=(10, 28, 28))
    suffix = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        noise = rng.integers(-60, 61, size=(n, 28, 28))
        images = np.clip(protos[labels] + noise, 0, 255).astype(np.uint8)
        write_idx(folder / (MNIST_FILES[f"{split}_images"] + suffix), images)
        write_idx(folder / (MNIST_FILES[f"{split}_labels"] + suffix), labels)
    return folder


@pytest.fixture
def fake_mnist(tmp_path):
    return make_fake_mnist(tmp_path / "fake-mnist")


@pytest.fixture(scope="session")
def mnist_model(mnist_dir, tmp_path_factory):
    """A small MLP (784-128-10, 3 epochs, a few seconds on 2 cores) trained on the real MNIST
    through the public API, for the picture, server and browser tests. A namespace: path (the saved
    .npz), net (on the CPU), accuracy (on the 10,000 test digits), x_test float32 (N, 784), y_test
    int64 (N,)."""
    import contextlib
    import types

    import gpunet as gn
    from gpunet.data import load_mnist
    from gpunet.training import fit, predict

    try:  # scikit-learn (the test extra) brings threadpoolctl
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = contextlib.nullcontext
    (x_train, y_train), (x_test, y_test) = load_mnist(mnist_dir, download=False)
    net = gn.mlp([784, 128, 10], seed=0, device="cpu")
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    # One BLAS thread: these small GEMMs took 2 s that way but 26 s with two threads on a busy
    # 2-core box
    with threadpool_limits(1):
        fit(net, gn.SoftmaxCrossEntropy(), opt, x_train, y_train, epochs=3, batch_size=128, seed=0)
    path = tmp_path_factory.mktemp("model") / "mnist-128.npz"
    net.save(path)
    accuracy = float((gn.to_numpy(predict(net, x_test)) == y_test).mean())
    return types.SimpleNamespace(
        path=path, net=net, accuracy=accuracy, x_test=x_test, y_test=y_test
    )
