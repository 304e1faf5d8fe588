"""One label check, ``gpunet.backend.check_labels``, exported by the data front door
(``gpunet.data.arrays``): the front door, the losses, the metrics and the data files call it, so
every path refuses the same labels with the same words, naming the argument, the expected and the
actual values. It lives in the backend because the core (losses) imports only the backend."""

import ast
from pathlib import Path

import numpy as np
import pytest

import gpunet as gn
from gpunet.data import DataError, arrays, datasets
from gpunet.metrics import confusion_matrix

GPUNET = Path(gn.__file__).parent
LOGITS = np.zeros((3, 3), np.float32)


def front_door(y):
    return arrays.labels(y, 3)


def loss(y):
    return gn.SoftmaxCrossEntropy()(LOGITS, y)


def metrics(y):
    return confusion_matrix(np.zeros(3, np.int64), y, 3)


PATHS = [(front_door, "y"), (loss, "target"), (metrics, "y_pred")]


@pytest.mark.parametrize("call, name", PATHS)
@pytest.mark.parametrize(
    "y, low, high", [(np.array([0, 1, 3]), 0, 3), (np.array([-1, 0, 2]), -1, 2)]
)
def test_labels_out_of_range_are_refused_alike_on_every_path(call, name, y, low, high):
    with pytest.raises(
        ValueError,
        match=rf"^{name}: expected labels in \[0, 2\] for 3 classes, got values "
        rf"from {low} to {high} \(",
    ):
        call(y)


@pytest.mark.parametrize("call, name", PATHS)
def test_labels_that_are_not_integers_are_refused_alike_on_every_path(call, name):
    with pytest.raises(
        TypeError,
        match=rf"^{name}: expected integer class labels 0..2, got float32 "
        rf"values \(0.0, 1.0\)",
    ):
        call(np.array([0.0, 1.0, 1.0], np.float32))


def test_booleans_are_classes_0_and_1_at_the_front_door_and_never_a_mask_in_the_loss():
    np.testing.assert_array_equal(front_door(np.array([True, False, True])), [1, 0, 1])
    with pytest.raises(
        TypeError, match="target: expected integer class labels 0..2, got bool values"
    ):
        loss(np.array([True, False, True]))


def test_a_data_files_labels_are_checked_by_the_same_function(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.ones((3, 2)), y_train=np.array([0, -2, 1]))
    with pytest.raises(
        DataError,
        match=r"d.npz: y_train: expected class labels 0..C-1 \(none negative\), "
        r"got values from -2 to 1 \(-2, 0, 1\); number the classes first",
    ):
        datasets.load_arrays(path)


def test_only_the_backend_writes_a_label_check_and_its_callers_import_it():
    """The messages come from one function: no other module of gpunet words them (a second
    validator would; encode_labels, which reads a CSV column as classes or targets, is not one), and
    each module that checks labels imports the one check."""
    words = ("expected labels in", "expected integer class labels", "expected class labels 0..")
    writers = set()
    for path in GPUNET.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if any(w in node.value for w in words):
                    writers.add(path.relative_to(GPUNET).as_posix())
    assert writers == {"backend.py"}
    for module in ("losses", "metrics", "data/arrays", "data/datasets"):
        tree = ast.parse((GPUNET / f"{module}.py").read_text())
        imported = {
            a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names
        }
        assert "check_labels" in imported, module
