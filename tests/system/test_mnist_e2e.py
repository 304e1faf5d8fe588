"""End to end on the real MNIST files (GPUNET_DATA, set by .ci/run): a small net, a short time, the
CPU."""

import json
import subprocess
import sys

import numpy as np
import pytest

import gpunet as gn
from gpunet.data import load_mnist
from gpunet.training import evaluate, fit

pytestmark = pytest.mark.slow


def test_python_api_reaches_95_percent(mnist_dir):
    (x_train, y_train), (x_test, y_test) = load_mnist(mnist_dir, download=False)
    assert x_train.dtype == np.float32 and x_train.shape == (60000, 784)
    net = gn.mlp([784, 128, 10], seed=0, device="cpu")
    opt = gn.Momentum(net.parameters(), lr=0.05, momentum=0.9)
    loss = gn.SoftmaxCrossEntropy()
    hist = fit(net, loss, opt, x_train, y_train, epochs=2, batch_size=64, seed=0)
    result = evaluate(net, loss, x_test, y_test, metrics=True)
    assert result["accuracy"] >= 0.95, result["accuracy"]
    assert hist["loss"][1] < hist["loss"][0]
    assert min(result["recall"]) > 0.85  # no digit is left behind


def test_command_line_on_real_mnist(mnist_dir, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpunet",
            "train",
            "--data-dir",
            str(mnist_dir),
            "--hidden",
            "128",
            "--epochs",
            "2",
            "--out",
            str(out),
            "--device",
            "cpu",
            "--no-plots",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.95
    assert metrics["history"][-1]["val_accuracy"] >= 0.95
    ev = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpunet",
            "evaluate",
            str(out / "model.npz"),
            "--data-dir",
            str(mnist_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_default_recipe_reaches_98_3_percent(mnist_dir, tmp_path):
    """`gpunet train` with no flags but the data folder (and an output folder) is a good MNIST
    recipe."""
    out = tmp_path / "default"
    res = subprocess.run(
        [sys.executable, "-m", "gpunet", "train", "--data-dir", str(mnist_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["epochs"] == 20 and metrics["config"]["hidden"] == [512, 512]
    assert metrics["test_accuracy"] >= 0.983, metrics["test_accuracy"]
