"""Classification metrics from a confusion matrix counted on the device.

``cm[i, j]`` counts examples of true class ``i`` predicted as class ``j`` (scikit-learn's convention).
For class k: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN); a ratio
with a zero denominator is reported as 0 (as scikit-learn does with ``zero_division=0``).
"""
from __future__ import annotations

import numpy as np

from .backend import check_labels, get_array_module, to_numpy


def confusion_counts(y_true, y_pred, num_classes: int):
    """Device array (C, C) int64 of counts for one batch; sum these over batches.

    y_true, y_pred (B,) integer labels in [0, C) on one device (labels outside are not counted: the
    callers check them). Counted as ``onehot(y_true).T @ onehot(y_pred)`` in float64, with no host
    synchronisation (``bincount`` reads its input's maximum back to the host); exact, since every count
    is a sum of ones far below 2**53.
    """
    xp = get_array_module(y_true, y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_pred: expected shape {tuple(y_true.shape)} like y_true, got {tuple(y_pred.shape)}")
    classes = xp.arange(num_classes)
    true_hot = (y_true[:, None] == classes).astype(xp.float64)
    pred_hot = (y_pred[:, None] == classes).astype(xp.float64)
    return (true_hot.T @ pred_hot).astype(xp.int64)


def confusion_matrix(y_true, y_pred, num_classes: int | None = None, batch_size: int = 65536) -> np.ndarray:
    """Host (C, C) int64 confusion matrix of label arrays on any device, counted in batches."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_pred: expected {len(y_true)} labels like y_true, got {len(y_pred)}")
    if num_classes is None:  # the labels' own classes: the largest label + 1
        num_classes = max(int(y_true.max()), int(y_pred.max())) + 1 if len(y_true) else 1
    check_labels(y_true, num_classes, "y_true")
    check_labels(y_pred, num_classes, "y_pred")
    total = None
    for start in range(0, len(y_true), batch_size):
        part = confusion_counts(y_true[start:start + batch_size], y_pred[start:start + batch_size], num_classes)
        total = part if total is None else total + part
    if total is None:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return to_numpy(total).astype(np.int64)


def _ratio(num, den):
    out = np.zeros_like(num, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def report(cm) -> dict:
    """Accuracy, per-class precision/recall/F1/support, and their macro averages, from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted)
    total = cm.sum()
    return {
        "accuracy": float(tp.sum() / total) if total else 0.0,
        "precision": precision.tolist(),
        "recall": recall.tolist(),
        "f1": f1.tolist(),
        "support": support.tolist(),
        "macro_precision": float(precision.mean()),
        "macro_recall": float(recall.mean()),
        "macro_f1": float(f1.mean()),
        "confusion_matrix": cm.tolist(),
    }


def accuracy(y_true, y_pred) -> float:
    """Fraction of equal labels (computed on the arrays' device)."""
    if len(y_true) == 0:
        return 0.0
    return float((y_true == y_pred).sum()) / len(y_true)


def format_report(rep: dict, digits: int = 4) -> str:
    """A per-class table and the confusion matrix, as plain text."""
    lines = [f"accuracy: {rep['accuracy']:.{digits}f}", "",
             f"{'class':>5} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8}"]
    for k, (p, r, f, s) in enumerate(zip(rep["precision"], rep["recall"], rep["f1"], rep["support"])):
        lines.append(f"{k:>5} {p:>10.{digits}f} {r:>10.{digits}f} {f:>10.{digits}f} {s:>8}")
    lines.append(f"{'macro':>5} {rep['macro_precision']:>10.{digits}f} {rep['macro_recall']:>10.{digits}f} "
                 f"{rep['macro_f1']:>10.{digits}f} {sum(rep['support']):>8}")
    cm = rep["confusion_matrix"]
    width = max(5, max(len(str(v)) for row in cm for v in row) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * 6 + "".join(f"{j:>{width}}" for j in range(len(cm)))]
    lines += [f"{i:>5} " + "".join(f"{v:>{width}}" for v in row) for i, row in enumerate(cm)]
    return "\n".join(lines)
