"""gpunet.plots: the training curves' epoch axis."""

import pytest
from conftest import optional

from gpunet import plots


@pytest.mark.parametrize("epochs", [2, 3, 10])
def test_the_curves_tick_whole_epochs_only(tmp_path, monkeypatch, epochs):
    """Epochs are whole numbers, but matplotlib's default locator ticks halves and quarters on 2 or
    3 epochs (the issue saw 2.5 and 7.5); every visible tick of both panels must be an integer.
    Mutation: dropping the MaxNLocator(integer=True) line in plots.curves fails the 2- and 3-epoch
    cases (ticks at 1.25, 1.5, ... appear)."""
    optional("matplotlib", "cli")
    kept = []
    real_save = plots._save
    monkeypatch.setattr(
        plots,
        "_save",
        lambda plt, fig, path: (kept.append(fig), fig.canvas.draw(), real_save(plt, fig, path)),
    )
    history = [
        {
            "epoch": e,
            "loss": 1.0 / e,
            "accuracy": 1 - 0.5 / e,
            "val_loss": 1.2 / e,
            "val_accuracy": 1 - 0.6 / e,
        }
        for e in range(1, epochs + 1)
    ]
    plots.curves(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    (fig,) = kept
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
