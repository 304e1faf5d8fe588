"""Metrics against scikit-learn as the oracle (a test-only dependency)."""

import numpy as np
import pytest
from conftest import optional

import gpunet as gn
from gpunet.metrics import accuracy, confusion_counts, confusion_matrix, format_report, report


def labels(seed, n=1000, classes=10):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, classes, size=n)
    # mostly right, sometimes wrong, and class 9 is never predicted (precision's zero division)
    y_pred = np.where(rng.random(n) < 0.7, y_true, rng.integers(0, classes, size=n))
    y_pred[y_pred == 9] = 8
    return y_true, y_pred


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_sklearn(device, seed):
    sk = optional("sklearn.metrics", "sklearn")  # the oracle
    y_true, y_pred = labels(seed)
    cm = confusion_matrix(
        gn.to_device(y_true, device), gn.to_device(y_pred, device), 10, batch_size=64
    )
    assert isinstance(cm, np.ndarray) and cm.dtype == np.int64
    np.testing.assert_array_equal(cm, sk.confusion_matrix(y_true, y_pred, labels=range(10)))
    rep = report(cm)
    p, r, f, s = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=range(10), zero_division=0
    )
    np.testing.assert_allclose(rep["precision"], p, rtol=1e-12)
    np.testing.assert_allclose(rep["recall"], r, rtol=1e-12)
    np.testing.assert_allclose(rep["f1"], f, rtol=1e-12)
    np.testing.assert_array_equal(rep["support"], s)
    assert rep["precision"][9] == 0.0
    for avg in ("precision", "recall", "f1"):
        want = getattr(sk, f"{avg}_score" if avg != "f1" else "f1_score")(
            y_true, y_pred, average="macro", labels=range(10), zero_division=0
        )
        assert rep[f"macro_{avg}"] == pytest.approx(want, rel=1e-12)
    assert rep["accuracy"] == pytest.approx(sk.accuracy_score(y_true, y_pred), rel=1e-12)
    assert accuracy(gn.to_device(y_true, device), gn.to_device(y_pred, device)) == pytest.approx(
        rep["accuracy"]
    )


def test_report_text_lists_every_class():
    y_true, y_pred = labels(2, n=200)
    text = format_report(report(confusion_matrix(y_true, y_pred, 10)))
    assert text.startswith("accuracy: ")
    assert (
        sum(line.strip().split(" ")[0].isdigit() for line in text.splitlines()) >= 20
    )  # 10 table + 10 matrix rows
    assert "macro" in text and "confusion matrix" in text


def test_mismatched_lengths_are_refused():
    with pytest.raises(ValueError, match="y_pred: expected 3 labels like y_true, got 4"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 2)
    with pytest.raises(ValueError, match="y_pred: expected shape"):
        confusion_counts(np.zeros(3, int), np.zeros(4, int), 2)


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(
        ValueError,
        match=r"y_pred: expected labels in \[0, 2\] for 3 classes, got "
        r"values from 0 to 3",
    ):
        confusion_matrix(np.array([0, 1, 2]), np.array([0, 3, 1]), 3)


def test_confusion_counts_match_bincount():
    rng = np.random.default_rng(5)
    y_true, y_pred = (
        rng.integers(0, 7, size=100_000),
        rng.integers(0, 7, size=100_000).astype(np.int32),
    )
    cm = confusion_counts(y_true, y_pred, 7)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, np.bincount(y_true * 7 + y_pred, minlength=49).reshape(7, 7))


@pytest.mark.gpu
def test_confusion_counts_never_wait_for_the_host():
    """evaluate sums these per batch: no device-to-host read may hide inside (bincount reads its
    max)."""
    sk = optional("sklearn.metrics", "sklearn")  # the oracle
    import warnings

    import cupy
    import cupyx

    y_true, y_pred = labels(3)
    yt, yp = cupy.asarray(y_true), cupy.asarray(y_pred)
    with warnings.catch_warnings():
        # allow_synchronize is deprecated but still works; CuPy says so with a plain UserWarning
        # (syncdetect.py)
        warnings.filterwarnings(
            "ignore", message="cupyx.allow_synchronize will be removed", category=UserWarning
        )
        with cupyx.allow_synchronize(False):
            counts = confusion_counts(yt, yp, 10)
            counts = counts + confusion_counts(yt, yp, 10)
    np.testing.assert_array_equal(
        counts.get(), 2 * sk.confusion_matrix(y_true, y_pred, labels=range(10))
    )
