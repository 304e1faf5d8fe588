"""examples/backprop_course.ipynb: kept without outputs in the repository, and executed top to
bottom by a real Jupyter kernel (nbclient, 60 s a cell) on 3,000 MNIST training images: every cell
runs (its own asserts hold the hand-worked formulas to gn.explain_step's numbers), and the pictures
come out inline."""

import os
from pathlib import Path

import pytest
from conftest import optional

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "backprop_course.ipynb"


def test_the_notebook_is_kept_without_outputs():
    nbformat = optional("nbformat", "test")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code), (
        "strip the outputs before committing (nbstripout, or Jupyter's Clear All Outputs)"
    )


def test_readme_links_the_notebook():
    assert "examples/backprop_course.ipynb" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_with_its_pictures(mnist_dir, tmp_path, monkeypatch):
    nbformat, nbclient = optional("nbformat", "test"), optional("nbclient", "test")
    optional("ipykernel", "test")
    optional("matplotlib", "cli")
    monkeypatch.setenv("GPUNET_DATA", str(mnist_dir))
    monkeypatch.setenv("GPUNET_NOTEBOOK_ROWS", "3000")
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.delenv(
        "MPLBACKEND", raising=False
    )  # the kernel's own inline backend draws into the cells
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=60, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()  # raises on any error
    pictures = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if "image/png" in o.get("data", {})
    ]
    # the validation curve, MNIST's curves, the confusion matrix, the misclassified digits, the
    # weights
    assert len(pictures) == 5, [c.source[:40] for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "by hand: C = " in text and "test accuracy: " in text
