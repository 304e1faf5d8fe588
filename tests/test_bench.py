"""The benchmark harness: its floor counts the right products, and a quick run on tiny MNIST files writes
results whose ratios are consistent with its own timings (the figures themselves are never asserted: speed
claims live in BENCHMARKS.md, not in unit tests)."""
import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, make_fake_mnist, optional

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_mlp  # noqa: E402
import bench_report  # noqa: E402


def test_floor_plan_counts_every_product_of_an_epoch():
    sizes, n, bs = (784, 512, 512, 10), 300, 128
    plan = bench_mlp.gemm_plan(sizes, n, bs)
    # 3 batches (128, 128, 44); per batch 3 forward, 3 weight-gradient and 2 input-gradient products
    assert len(plan) == 3 * 8
    rows = [128, 128, 44]
    expected = sum(2 * r * (784 * 512 + 512 * 512 + 512 * 10) * 2 + 2 * r * (512 * 10 + 512 * 512) for r in rows)
    assert bench_mlp.plan_flops(plan) == expected
    assert len(bench_mlp.gemm_plan(sizes, n, bs, train=False)) == 3 * 3
    floor = bench_mlp.Floor(list(sizes), n, bs, np)
    assert len(floor.calls) == len(plan) and floor.run(lambda: None) > 0


def test_quick_run_writes_consistent_results(tmp_path):
    data = make_fake_mnist(tmp_path / "mnist", n_train=600, n_test=200)
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_mlp.py"), "--quick", "--no-torch", "--no-memory",
         "--data-dir", str(data), "--json", str(out), "--markdown", str(tmp_path / "r.md")],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    train = [c for c in res["configs"] if c["kind"] == "train"]
    assert {c["name"] for c in train} == {"784-512-512-10/b128", "784-100-10/b128"}
    for c in train:
        rounds = c["rounds"]
        assert len(rounds) == 2 and c["steps_per_epoch"] == 5  # 600 images, batch 128
        assert c["gpunet_over_floor"] == pytest.approx(c["gpunet_s"] / c["floor_s"])
        assert c["gpunet_over_floor_by_round"] == pytest.approx([rounds[1]["gpunet"]["seconds"] / rounds[1]["floor"]])
        assert 0.0 <= c["gpunet_test_acc"] <= 1.0
        # per-step medians: 5 steps give 4 intervals per side, and the ratio is that of round 2
        assert c["step_median_over_floor"]["gpunet"] == pytest.approx(
            rounds[1]["gpunet"]["step_median"] / rounds[1]["floor_step_median"])
        assert 0 < rounds[1]["floor_step_median"] < rounds[1]["floor"]
    assert res["settings"]["pixels"] == "uint8" and res["machine"]["cpu_kernels"]
    floor_target = next(t for t in bench_report.evaluate_targets(res) if "b128: gpunet / floor" in t["target"])
    b128 = next(c for c in train if c["name"] == "784-512-512-10/b128")
    assert floor_target["measured"] == b128["gpunet_over_floor"]
    assert floor_target["pass"] == (b128["gpunet_over_floor"] <= 1.15)
    assert "gpunet/floor by round" in (tmp_path / "r.md").read_text()
    assert "median step time" in (tmp_path / "r.md").read_text()


@pytest.mark.parametrize("pixels", ["uint8", "float32"])
def test_memory_child_measures_against_the_float32_train_set(tmp_path, pixels):
    data = make_fake_mnist(tmp_path / "mnist", n_train=300, n_test=50)
    m = bench_mlp.memory_child("gpunet", str(data), pixels)
    sizes = bench_mlp.MEMORY_SIZES
    model = 4 * sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    assert m["pixels"] == pixels and m["train_set_bytes"] == 300 * 784 * 4 and m["model_bytes"] == model
    assert m["reference_bytes"] == 300 * 784 * 4 + model
    assert m["peak_kib"] >= m["baseline_kib"] > 0
    assert m["ratio_growth_over_reference"] == pytest.approx(m["growth_kib"] * 1024 / m["reference_bytes"])


def test_ablation_compiles_fits_own_work(tmp_path):
    """benchmarks/ablate_step.py times a compiled copy of fit's CPU step; it must do fit's very work (the
    script compares the weights after one epoch from the same start and stops if they differ)."""
    optional("numba", "numba")
    data = make_fake_mnist(tmp_path / "mnist", n_train=600, n_test=200)  # last batch of 88 rows
    out = tmp_path / "ablate.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "ablate_step.py"), "--data-dir", str(data), "--sizes",
         "784-32-16-10", "--rounds", "1", "--pause", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["same_work_max_weight_diff"] < 1e-4
    assert set(res["median_over_floor"]) == {"fit", "gemm", "+gather", "+elem", "full"}
    assert len(res["rounds"]) == 2 and all(v > 0 for row in res["rounds"] for v in row.values())
