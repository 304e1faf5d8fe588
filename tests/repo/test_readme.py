"""Every Python block of README.md and of the user guide (docs/*.md) runs, so neither can drift
from the code.

Each page's blocks run in order, in one namespace of that page's, all in one fresh interpreter and
one temporary folder, as a reader would paste them (tests/support/readme_blocks.py); the pages in
reading order (README, then mkdocs.yml's nav). ``/path/to/mnist`` becomes a folder holding the first
6,000 training and 1,000 test images of the real MNIST (so the API page's 20 epochs take seconds:
1,000 training images once its 5,000 are held out); the files the blocks name (photo.jpg,
digits.npy, model.npz, model.onnx) are made from those images and the saved model. A block that
needs an optional library not installed here skips, saying which; ``<!-- readme-test: skip WHY -->``
above a block skips it on purpose. Cost: one interpreter and a few small trainings, about 40 s on
two busy cores.
"""

import json
import os
import subprocess
import sys

import pytest
import readme_blocks  # noqa: E402  (tests/support/readme_blocks.py, on sys.path by conftest)
from conftest import ROOT

PAGES = readme_blocks.pages(ROOT)
BLOCKS = [
    dict(block, page=page)
    for page in PAGES
    for block in readme_blocks.blocks((ROOT / page).read_text(encoding="utf-8"))
]
IDS = [f"{b['page']}:{b['line']}" for b in BLOCKS]


def small_mnist(mnist_dir, folder, n_train=6000, n_test=1000):
    """The first rows of the real MNIST files, written in their format (outside the repository)."""
    import numpy as np

    from gpunet.data import MNIST_FILES, load_mnist
    from gpunet.data.idx import write_idx

    (x, y), (xt, yt) = load_mnist(mnist_dir, download=False, dtype=np.uint8)
    parts = {
        "train_images": x[:n_train],
        "train_labels": y[:n_train].astype(np.uint8),
        "test_images": xt[:n_test],
        "test_labels": yt[:n_test].astype(np.uint8),
    }
    folder.mkdir(parents=True)
    for key, array in parts.items():
        write_idx(
            folder / MNIST_FILES[key],
            array.reshape(len(array), 28, 28) if "images" in key else array,
        )
    return folder


@pytest.fixture(scope="module")
def report(mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    data = small_mnist(mnist_dir, root / "mnist")
    work = root / "reader"
    work.mkdir()
    out = root / "report.json"
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    command = [sys.executable, readme_blocks.__file__, str(out), str(data), str(ROOT), *PAGES]
    res = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


def test_readme_has_python_blocks():
    readme = [b for b in BLOCKS if b["page"] == "README.md"]
    assert len(readme) >= 2  # the training loop written out, and fit
    # and the guide's: the API, pixels, your own data and layer, callbacks, ...
    assert len(BLOCKS) >= 10


def test_every_guide_page_is_read():
    """Each docs/*.md page is in the nav that the block runner reads (so none of its blocks goes
    untested)."""
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk - set(PAGES) == set(), "pages missing from mkdocs.yml's nav"


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_readme_block_runs(report, block):
    results, stdout = report
    name = f"{block['page']}:{block['line']}"
    got = results.get(name)
    assert got is not None, f"{name} never ran (an earlier block ended the run?)\n{stdout[-2000:]}"
    if got["status"] == "skipped":
        pytest.skip(got["detail"])
    assert got["status"] == "ok", f"{name}:\n{got['detail']}"
