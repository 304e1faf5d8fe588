"""Every Python block of README.md runs, so README cannot drift from the code.

The blocks run in order, in one namespace and one fresh interpreter, in a temporary folder, as a reader
would paste them (tests/readme_blocks.py). ``/path/to/mnist`` becomes a folder holding the first 6,000
training and 1,000 test images of the real MNIST (so the API block's 20 epochs take seconds: 1,000
training images once its 5,000 are held out); the files the blocks name (photo.jpg, digits.npy,
model.onnx) are made from those images and the saved model. A block that needs an optional library not
installed here skips, saying which; ``<!-- readme-test: skip WHY -->`` above a block skips it on purpose.
Cost: one interpreter and a few small trainings, about 30 s on two busy cores.
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.dirname(__file__))
import readme_blocks  # noqa: E402  (beside this file)

BLOCKS = readme_blocks.blocks((ROOT / "README.md").read_text(encoding="utf-8"))


def small_mnist(mnist_dir, folder, n_train=6000, n_test=1000):
    """The first rows of the real MNIST files, written in their format (outside the repository)."""
    import numpy as np

    from gpunet.data import MNIST_FILES, load_mnist
    from gpunet.data.idx import write_idx

    (x, y), (xt, yt) = load_mnist(mnist_dir, download=False, dtype=np.uint8)
    parts = {"train_images": x[:n_train], "train_labels": y[:n_train].astype(np.uint8),
             "test_images": xt[:n_test], "test_labels": yt[:n_test].astype(np.uint8)}
    folder.mkdir(parents=True)
    for key, array in parts.items():
        write_idx(folder / MNIST_FILES[key], array.reshape(len(array), 28, 28) if "images" in key else array)
    return folder


@pytest.fixture(scope="module")
def report(mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    data = small_mnist(mnist_dir, root / "mnist")
    work = root / "reader"
    work.mkdir()
    out = root / "report.json"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    res = subprocess.run([sys.executable, str(ROOT / "tests" / "readme_blocks.py"), str(ROOT / "README.md"),
                          str(out), str(data)], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4  # the API, the pixels, your own data, your own layer: at least these


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[f"README.md:{b['line']}" for b in BLOCKS])
def test_readme_block_runs(report, block):
    results, stdout = report
    got = results.get(str(block["line"]))
    assert got is not None, f"README.md:{block['line']} never ran (an earlier block ended the run?)\n{stdout[-2000:]}"
    if got["status"] == "skipped":
        pytest.skip(got["detail"])
    assert got["status"] == "ok", f"README.md:{block['line']}:\n{got['detail']}"
