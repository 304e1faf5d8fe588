"""Pictures of a training run, with matplotlib (an optional extra: ``pip install 'gpunet[cli]'``).

Every function takes host data (lists, NumPy arrays) and writes one PNG; ``available()`` says
whether matplotlib can be imported, so callers can print a note instead.
"""

from __future__ import annotations

import io

import numpy as np

from .files import atomic_write


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except Exception:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works with no display
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> None:
    """The figure as a PNG at ``path``, written atomically (never half a picture), then closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def curves(history: list, path) -> None:
    """Loss and accuracy per epoch, training and validation, side by side."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in (
        (ax_loss, "loss", "loss (cross-entropy)"),
        (ax_acc, "accuracy", "accuracy"),
    ):
        ax.plot(epochs, [h[key] for h in history], marker="o", label="train")
        if any(h.get("val_" + key) is not None for h in history):
            ax.plot(epochs, [h.get("val_" + key) for h in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 2.5
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(plt, fig, path)


def confusion(cm, path, title: str = "confusion matrix (test set)") -> None:
    """Heat map of a (C, C) confusion matrix; rows are true classes, columns predictions."""
    plt = _pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    # log scale: the diagonal holds ~1000 per class, the errors a handful, and both should be
    # visible
    im = ax.imshow(np.log1p(cm), cmap="viridis")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="black" if np.log1p(cm[i, j]) > np.log1p(cm.max()) * 0.6 else "white",
            )
    ax.set_xticks(range(cm.shape[1]))
    ax.set_yticks(range(cm.shape[0]))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    _save(plt, fig, path)


def misclassified(images, true, pred, path, limit: int = 36, side: int = 28) -> int:
    """A grid of up to ``limit`` misclassified digits, each titled "true -> predicted"; returns the
    count shown."""
    plt = _pyplot()
    wrong = np.flatnonzero(np.asarray(true) != np.asarray(pred))[:limit]
    cols = 6
    rows = max(1, (len(wrong) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.6))
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, i in zip(np.atleast_1d(axes).ravel(), wrong):
        ax.imshow(np.asarray(images[i]).reshape(side, side), cmap="gray")
        ax.set_title(f"{true[i]} -> {pred[i]}", fontsize=9, color="crimson")
    fig.suptitle("misclassified test digits (true -> predicted)")
    fig.tight_layout()
    _save(plt, fig, path)
    return len(wrong)
