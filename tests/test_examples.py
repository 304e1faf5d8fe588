"""The examples run and do what they say."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run(name, *args):
    res = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=600)
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
    out = run("mnist_api.py", "--data-dir", str(mnist_dir), "--epochs", "1", "--device", "cpu",
              "--out", str(tmp_path / "m.npz"))
    acc = float(out.split("accuracy: ")[1].split()[0])
    assert acc > 0.95 and (tmp_path / "m.npz").exists()
