"""The benchmarks (benchmarks/speed.py, memory.py, report.py) do what they claim: the floor runs
exactly an epoch's products, the timed epochs train the network, both sides do the same work, the
memory children see the data, and the report's ratios come from the raw seconds (round 1 left out).
Speed itself is never asserted: speed claims live in BENCHMARKS.md, measured against a peer in the
same run."""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, benchmarks_on_path, make_fake_mnist

import gpunet as gn
from gpunet.data import load_mnist
from gpunet.training import fit

benchmarks_on_path()
import memory  # noqa: E402
import report  # noqa: E402
import speed  # noqa: E402


def test_floor_runs_exactly_the_products_of_an_epoch():
    sizes, n, bs = (784, 512, 512, 10), 300, 128
    plan = speed.gemm_plan(sizes, n, bs)
    # 3 batches (128, 128, 44); per batch 3 forward, 3 weight-gradient and 2 input-gradient products
    assert len(plan) == 3 * 8
    rows = [128, 128, 44]
    expected = sum(
        2 * r * (784 * 512 + 512 * 512 + 512 * 10) * 2 + 2 * r * (512 * 10 + 512 * 512)
        for r in rows
    )
    assert speed.plan_flops(plan) == expected
    assert len(speed.gemm_plan(sizes, n, bs, train=False)) == 3 * 3
    floor = speed.Floor(list(sizes), n, bs, np)
    done = []

    # numpy's matmul, recording each product's shapes and checking that it wrote `out`
    class Recorder:
        @staticmethod
        def matmul(a, b, out):
            out[...] = np.nan
            np.matmul(a, b, out=out)
            np.testing.assert_allclose(
                out, a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4
            )  # float32 sums
            done.append((a.shape[0], a.shape[1], b.shape[1], out.shape))

    floor.xp, stamps = Recorder, []
    floor.run(lambda: None, stamps)
    assert done == [(m, k, c, (m, c)) for m, k, c, _ in plan]  # the plan's products, in its order
    assert len(stamps) == len(rows) + 1  # the clock before the first step and after each


def _raw_config(floor, gpunet, torch=None):
    rounds = [
        {"floor": f, "floor_step_median": f / 10, "gpunet": {"seconds": g, "step_median": g / 10}}
        for f, g in zip(floor, gpunet)
    ]
    for row, t in zip(rounds, torch or []):
        row["torch"] = {"seconds": t, "step_median": t / 20}
    return {
        "name": "784-512-512-10/b128",
        "kind": "train",
        "rounds": rounds,
        "gemm_flops_per_epoch": 4e9,
    }


def test_the_report_computes_ratios_from_raw_seconds_without_the_warm_up_round():
    # round 1 (warm-up) is slow on every side; rounds 2..4 by hand: floor 1 2 3, gpunet 2 6 4, torch
    # 4 8 2
    c = _raw_config([50, 1, 2, 3], [90, 2, 6, 4], [70, 4, 8, 2])
    q = report.ratios(c)
    assert (q["floor_s"], q["gpunet_s"], q["torch_s"]) == (2, 4, 4)  # medians of rounds 2..4
    assert q["gpunet/floor"] == 2.0 and q["gpunet/torch"] == 1.0 and q["torch/floor"] == 2.0
    assert q["gpunet/floor by round"] == [2.0, 3.0, 4 / 3] and q["gpunet/torch by round"] == [
        0.5,
        0.75,
        2.0,
    ]
    # per-step medians, round by round: gpunet/floor 2, 3, 4/3 again (both stamped /10); torch's
    # steps are its seconds / 20: torch/floor 2, 2, 1/3; gpunet/torch 1, 1.5, 4
    assert (
        q["step gpunet/floor"] == 2.0
        and q["step torch/floor"] == 2.0
        and q["step gpunet/torch"] == pytest.approx(1.5)
    )
    assert q["gpunet GFLOP/s"] == 1.0 and q["floor GFLOP/s"] == 2.0
    results = {
        "device": "cpu",
        "configs": [c],
        "sides": {
            "gpunet": {
                "peak_kib": 300 * 1024,
                "baseline_kib": 100 * 1024,
                "train_set_bytes": 60 * 2**20,
                "model_bytes": 40 * 2**20,
            }
        },
    }
    got = {t["target"]: (t["measured"], t["pass"]) for t in report.evaluate_targets(results)}
    assert got["CPU 784-512-512-10/b128: gpunet/torch <= 0.85"] == (1.0, False)
    assert got["CPU 784-512-512-10/b128: gpunet/floor <= 1.15"] == (2.0, False)
    assert got["CPU 784-100-10/b128: gpunet/torch <= 0.9"] == (None, None)  # not run: not measured
    assert got["CPU training peak memory growth / (float32 train set + model) <= 1.5"] == (
        2.0,
        False,
    )
    fast = _raw_config([50, 1, 1, 1], [90, 0.5, 0.5, 0.5], [70, 1, 1, 1])
    assert report.evaluate_targets({"device": "cpu", "configs": [fast]})[0] == {
        "target": "CPU 784-512-512-10/b128: gpunet/torch <= 0.85",
        "measured": 0.5,
        "pass": True,
    }


def test_the_report_resolves_a_known_slowdown_with_its_interval():
    """--handicap's side: its ratio to gpunet round by round, median and 95% interval from the raw
    seconds; an interval brackets the median and shrinks to a point for identical rounds."""
    c = _raw_config([50, 1, 2, 3, 2], [90, 2, 4, 6, 4], [70, 4, 8, 2, 2])
    for r, h in zip(c["rounds"], [99, 2.1, 4.2, 6.3, 4.2]):  # 5% on every timed round
        r["handicapped"] = {"seconds": h}
    q = report.ratios(c)
    assert q["handicapped/gpunet by round"] == pytest.approx([1.05] * 4)
    assert q["handicapped/gpunet"] == pytest.approx(1.05)
    assert q["handicapped/gpunet 95% interval"] == pytest.approx((1.05, 1.05))
    low, high = q["gpunet/floor 95% interval"]  # by round 2, 2, 2, 2: a point again
    assert low == high == 2.0
    spread = report.interval([1.0, 1.1, 0.9, 1.3, 1.05, 0.95, 1.2])
    assert spread[0] <= statistics.median([1.0, 1.1, 0.9, 1.3, 1.05, 0.95, 1.2]) <= spread[1]
    assert spread[0] < spread[1] and report.interval([1.0, 2.0]) is None


def test_the_report_reads_older_files_as_their_own_script_did():
    """bench_mlp.py (the script before speed.py) stored its ratios beside the raw rounds: the
    report, from the raw rounds alone, finds the very ratios that script computed (an independent
    oracle)."""
    old = json.loads((ROOT / "benchmarks" / "results" / "cpu-2026-11-23-1430.json").read_text())
    for c in old["configs"]:
        q = report.ratios(c)
        assert q["gpunet/torch"] == pytest.approx(c["ratio_gpunet_torch"], rel=1e-12), c["name"]
        assert q["gpunet/floor"] == pytest.approx(c["gpunet_over_floor"], rel=1e-12), c["name"]
        if "step_median_over_floor" in c:
            assert q["step gpunet/floor"] == pytest.approx(
                c["step_median_over_floor"]["gpunet"], rel=1e-12
            )
    memory_target = next(t for t in report.evaluate_targets(old) if "memory" in t["target"])
    assert memory_target["measured"] == pytest.approx(
        old["memory"]["gpunet"]["ratio_growth_over_reference"]
    )


def test_a_quick_run_trains_and_stores_raw_seconds_only(tmp_path):
    data = make_fake_mnist(tmp_path / "mnist", n_train=600, n_test=200)
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "speed.py"),
            "--quick",
            "--no-torch",
            "--pause",
            "0",
            "--configs",
            "784-100-10/b128,inference",
            "--epochs",
            "3",
            "--data-dir",
            str(data),
            "--handicap",
            "0.05",
            "--json",
            str(out),
            "--markdown",
            str(tmp_path / "r.md"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    train, infer = res["configs"]
    assert (
        train["steps_per_epoch"] == 5 and len(train["rounds"]) == 3
    )  # 600 images, batch 128, --epochs 3
    assert len(infer["rounds"]) == 4  # --quick: 3 timed inference runs after a warm-up run
    # --handicap: the same training again each round, its steps made 5% longer
    assert all(r["handicapped"]["train_loss"] == r["gpunet"]["train_loss"] for r in train["rounds"])
    # each timed epoch trains the same network on, as three epochs of fit with seeds 0, 1, 2 do
    net = gn.mlp([784, 100, 10], activation="relu", seed=0, device="cpu")
    opt, loss = gn.Momentum(net.parameters(), lr=0.01, momentum=0.9), gn.SoftmaxCrossEntropy()
    (x, y), (xt, yt) = load_mnist(data, download=False, dtype=np.uint8)
    want = [
        fit(net, loss, opt, gn.Pixels(x), y, epochs=1, batch_size=128, seed=r).epochs[0]["loss"]
        for r in range(3)
    ]
    # the same float32 operations in another process: equal up to BLAS threading's summation order
    assert [r["gpunet"]["train_loss"] for r in train["rounds"]] == pytest.approx(want, rel=1e-5)
    assert want[2] < want[1] < want[0]  # and it learns (the fake classes are learnable)
    assert not [
        k for c in res["configs"] for k in c if "over" in k or "ratio" in k
    ]  # ratios: report.py's
    assert (tmp_path / "r.md").read_text() == report.render_markdown(
        res
    )  # the report of these raw files


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_both_sides_do_the_same_work(tmp_path, optimizer):
    """torch's side, from gpunet's initial weights on gpunet's batch order, ends its epoch with
    gpunet's weights: float32 products in another order differ by ~1e-7 per step; a different rule
    (another learning rate, momentum or order) by orders of magnitude more. --optimizer adam: both
    sides Adam."""
    if speed.torch is None:  # the benchmark's own import of torch, which is not in the test extra
        pytest.skip(
            "torch is not installed here: pip install -e '.[bench]' brings it (the speed "
            "benchmark's peer)"
        )
    data = speed.load_data(
        str(make_fake_mnist(tmp_path / "mnist", n_train=600, n_test=200)), "uint8", "cpu"
    )
    args = type(
        "Args",
        (),
        dict(
            seed=0, lr=0.01, momentum=0.9, epochs=1, pause=0.0, no_torch=False, optimizer=optimizer
        ),
    )
    res = speed.run_train_config("784-100-10/b128", (784, 100, 10), 128, data, "cpu", args, np)
    assert res["max_abs_weight_diff_epoch1"] < 1e-5
    assert res["gpunet_test_acc_epoch1"] == res["torch_test_acc_epoch1"]
    first = res["rounds"][0]
    assert first["gpunet"]["train_loss"] == pytest.approx(first["torch"]["train_loss"], rel=1e-5)


def test_the_memory_children_see_the_data(tmp_path):
    """Training on float32 images holds 3 bytes per pixel more than on uint8 ones (gpunet.Pixels):
    the children's growth must show at least half of that difference (14 MB here; RSS noise is ~1
    MB)."""
    data = make_fake_mnist(tmp_path / "mnist", n_train=6000, n_test=100)
    got = {
        pixels: memory.measure(data, pixels, ("gpunet",))["gpunet"]
        for pixels in ("uint8", "float32")
    }
    for m in got.values():
        assert "error" not in m, m
        assert m["train_set_bytes"] == 6000 * 784 * 4 and m["model_bytes"] == 4 * (
            784 * 512 + 512 * 512 + 5130 + 1024
        )
        assert (
            m["peak_kib"]
            >= m["after_load_kib"]
            > m["baseline_kib"]
            >= m["baseline_before_jit_kib"]
            > 0
        )
    growth = {p: (m["peak_kib"] - m["baseline_kib"]) * 1024 for p, m in got.items()}
    assert growth["float32"] - growth["uint8"] >= 0.5 * 6000 * 784 * 3, growth


def test_the_augmentation_benchmark_keeps_raw_seconds_and_each_rounds_own_ratios(tmp_path):
    """benchmarks/bench_augment.py on small fake files: the preset's settings, every timing kept
    raw, and the per-round ratios (what BENCHMARKS.md quotes) computed from the same round's
    seconds."""
    import statistics

    from gpunet.augment import DEFAULTS

    data = make_fake_mnist(
        tmp_path / "mnist", n_train=5400, n_test=10
    )  # 400 left after 5,000 validation
    out = tmp_path / "aug.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_augment.py"),
            "--data-dir",
            str(data),
            "--rounds",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["settings"] == DEFAULTS
    sec = res["seconds"]
    assert all(
        len(sec[k]) == 2
        for k in (
            "default_epoch",
            "default_epoch_augmented",
            "augment_in_fit",
            "augment_fast",
            "augment_core",
        )
    )
    # the distortion's own seconds inside the augmented epoch: some, and less than all of it
    assert all(0 < t < a for t, a in zip(sec["augment_in_fit"], sec["default_epoch_augmented"]))
    shares = [f / d for f, d in zip(sec["augment_fast"], sec["default_epoch"])]
    added = [a / d - 1 for a, d in zip(sec["default_epoch_augmented"], sec["default_epoch"])]
    in_fit = [t / (a - t) for t, a in zip(sec["augment_in_fit"], sec["default_epoch_augmented"])]
    assert res["per_round"] == {
        "fast_share": pytest.approx(shares),
        "added": pytest.approx(added),
        "in_fit_share": pytest.approx(in_fit),
    }
    assert res["median_of_round_fast_shares"] == pytest.approx(statistics.median(shares))
    assert res["median_of_round_added"] == pytest.approx(statistics.median(added))
    assert res["median_of_round_in_fit_shares"] == pytest.approx(statistics.median(in_fit))
    assert res["fast_share_of_default_epoch"] == pytest.approx(
        statistics.median(sec["augment_fast"]) / statistics.median(sec["default_epoch"])
    )
