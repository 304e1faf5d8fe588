"""The examples run and do what they say."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run(name, *args):
    # a script's own folder comes first on sys.path: point Python at this checkout's gpunet, not an
    # installed one
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_xor_online():
    out = run("xor_online.py")
    assert "predictions: [0, 1, 1, 0] expected: [0, 1, 1, 0]" in out
    assert "FAIL" not in out


def test_regression_mse():
    out = run("regression_mse.py")
    mse = float(out.split("final training MSE ")[1].split()[0])
    assert mse < 0.02


@pytest.mark.slow
def test_mnist_api(mnist_dir, tmp_path):
    out = run(
        "mnist_api.py",
        "--data-dir",
        str(mnist_dir),
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "m.npz"),
    )
    acc = float(out.split("accuracy: ")[1].split()[0])
    assert acc > 0.95 and (tmp_path / "m.npz").exists()


def test_explain_mnist(mnist_dir, tmp_path):
    out = run(
        "explain_mnist.py",
        "--data-dir",
        str(mnist_dir),
        "--steps",
        "100",
        "--markdown",
        str(tmp_path / "step.md"),
    )
    assert float(out.split("test accuracy before the explained step: ")[1].split()[0]) > 0.8
    for phrase in (
        "784-32-10 network",
        "delta^L = y^D - y^L",
        "W^1 (new) = W^1 + Delta W^1",
        "shape (784, 32)",
    ):
        assert phrase in out, phrase
    assert float(out.split("delta^L = y^D - y^L holds to ")[1].split()[0]) < 1e-5
    before, after = map(
        float, re.search(r"cost on this image: before (\S+), after the step (\S+)", out).groups()
    )
    assert (
        after < before
    )  # one step down the gradient lowers the cost on the instance it was taken on
    assert (tmp_path / "step.md").read_text().startswith("# One training step, explained")
