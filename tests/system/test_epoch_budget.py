"""benchmarks/epoch_budget.py sees every piece of the fused step: each kind of product as often as
an epoch has it, the dropout draws and the batch gathers, and pieces that add up to no more than
the epoch (what is left is "the rest"). Its seconds are never asserted."""

import json
import subprocess
import sys

from conftest import ROOT, make_fake_mnist


def test_the_budget_counts_every_piece_of_an_epoch(tmp_path):
    data = make_fake_mnist(tmp_path / "mnist", n_train=600, n_test=50)
    out = tmp_path / "budget.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "epoch_budget.py"), "--data-dir", str(data),
         "--epochs", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    steps = 5  # 600 rows in batches of 128
    for r in json.loads(out.read_text())["rounds"]:
        calls, pieces = r["calls"], r["pieces"]
        assert calls["product: forward x @ W"] == 3 * steps
        assert calls["product: dW = x.T @ dy (sgemm)"] == 3 * steps
        assert calls["product: dx = dy @ W.T"] == 2 * steps
        assert calls["elementwise: dropout"] == 2 * steps
        assert calls["gather: images (uint8 to float32)"] == steps
        assert calls["zero columns: which are lit"] == steps  # the first layer's, every batch
        assert sum(pieces.values()) <= r["epoch"]
    assert "| **epoch** (fit's clock) |" in proc.stdout and "products / epoch" in proc.stdout
