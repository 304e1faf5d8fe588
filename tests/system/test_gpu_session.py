"""The rehearsed GPU session (benchmarks/gpu_session.sh): its dry run on the CPU, on tiny MNIST
files, runs every step and leaves the result files a lent GPU machine would send back, each holding
what its step measured; a failing step is counted in the exit status and the others still run; and a
session's budget cuts the steps' limits and skips what it no longer covers."""

import json
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
from conftest import ROOT, benchmarks_on_path, make_fake_mnist

benchmarks_on_path()
import report  # noqa: E402

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


def session(tmp_path, data, *flags, **env_extra):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is not installed here")
    out = tmp_path / "out"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("GPUNET_DEVICE", "GPUNET_REQUIRE_GPU", "OUT")
    }
    env.update(
        TMPDIR=str(tmp_path), PYTHON=sys.executable, **env_extra
    )  # this interpreter, with the test extra
    proc = subprocess.run(
        ["bash", str(SCRIPT), *flags, str(data), str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    return proc, out


def junit(path):
    """(tests, skipped, failed or errored) of a pytest JUnit report."""
    suite = ET.parse(path).getroot()
    suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
    cases = suite.findall("testcase")
    bad = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    return len(cases), sum(c.find("skipped") is not None for c in cases), len(bad)


@pytest.mark.slow
def test_dry_run_runs_every_step_and_leaves_its_results(tmp_path):
    data = make_fake_mnist(tmp_path / "mnist", n_train=600, n_test=200)
    proc, out = session(tmp_path, data, "--dry-run")
    assert proc.returncode == 0, proc.stdout[-3000:] + (out / "session.log").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "best-metrics.json",
        "graph-cpu.json",
        "latest-cpu.json",
        "latest-cpu.md",
        "pytest-gpu.xml",
        "recipe-metrics.json",
        "session.log",
        "smoke-metrics.json",
        "step-cpu.json",
    ]
    step = json.loads(
        (out / "step-cpu.json").read_text()
    )  # each launch-budget path's step, fake CuPy
    assert step["dry_run"] and list(step["steps"]) == [
        "dropout=0.0",
        "dropout=0.2",
        "data-parallel rank (2), dropout=0.2",
        "augment, dropout=0.2",
        "batch-norm, dropout=0.2",
    ]
    assert all(
        e["gpunet"]["ms_per_step"] > 0 and e["gpunet"]["repeat"] == 3
        for e in step["steps"].values()
    )
    kernels = {
        name: set(e["kernels"]) for name, e in step["steps"].items()
    }  # each path ran its own step
    assert "gpunet_layer_momentum_given" in kernels["data-parallel rank (2), dropout=0.2"]
    assert "gpunet_resample" in kernels["augment, dropout=0.2"]
    assert "gpunet_batch_norm_backward" in kernels["batch-norm, dropout=0.2"]
    # the GPU tests were collected, and on the CPU every one of them skipped (none ran, none failed)
    tests, skipped, bad = junit(out / "pytest-gpu.xml")
    assert tests >= 10 and skipped == tests and bad == 0, (tests, skipped, bad)
    bench = json.loads((out / "latest-cpu.json").read_text())  # the speed benchmark's raw rounds
    (config,) = bench["configs"]
    assert (
        bench["device"] == "cpu"
        and config["name"] == "784-100-10/b128"
        and len(config["rounds"]) == 1
    )
    assert (
        config["steps_per_epoch"] == 5
        and "gpunet" in config["rounds"][0]
        and "torch" not in config["rounds"][0]
    )
    assert (out / "latest-cpu.md").read_text() == report.render_markdown(
        bench
    )  # the report of that file
    assert json.loads((out / "best-metrics.json").read_text())["config"]["preset"] == "best"
    graph = json.loads((out / "graph-cpu.json").read_text())  # eager vs graph vs PyTorch, dry run
    assert graph["dry_run"]
    assert list(graph["rows"]) == ["gpunet eager", "gpunet graph", "pytorch eager"]
    assert all(r is None or r["steps"] == 2 and r["device_ms"] > 0 for r in graph["rows"].values())
    assert "DRY RUN on the CPU" in (out / "session.log").read_text()
    for name in (
        "recipe-metrics.json",
        "best-metrics.json",
        "smoke-metrics.json",
    ):  # one epoch each, tested
        metrics = json.loads((out / name).read_text())
        assert metrics["device"] == "cpu" and len(metrics["history"]) == 1, name
        assert 0.0 <= metrics["test_accuracy"] <= 1.0, name


def test_a_failing_step_is_counted_and_the_rest_still_run(tmp_path):
    """Without the data folder the four data steps (bench, recipe, best, smoke) fail: the exit
    status is 4, and the steps that need no data still ran and left their results."""
    proc, out = session(tmp_path, tmp_path / "no-such-mnist", GPUNET_DRY_RUN="1")
    assert proc.returncode == 4, proc.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "graph-cpu.json",
        "pytest-gpu.xml",
        "session.log",
        "step-cpu.json",
    ]
    tests, skipped, bad = junit(out / "pytest-gpu.xml")
    assert tests == skipped > 0 and bad == 0


def test_the_sessions_budget_cuts_limits_and_skips_what_it_cannot_cover(tmp_path):
    """A device command runs 600 s at most, and the steps' own limits add up to more:
    GPU_SESSION_BUDGET cuts each step's limit to what is left and skips the steps after it is spent,
    saying so, in the exit status too. A budget of 6 s: `info` gets at most 6 s, and whatever starts
    with under 5 s left is skipped."""
    proc, out = session(
        tmp_path, tmp_path / "no-such-mnist", GPUNET_DRY_RUN="1", GPU_SESSION_BUDGET="6"
    )
    log = (out / "session.log").read_text()
    # bash's SECONDS counts whole seconds from the shell's start, so it may have ticked once before
    # the first step even on a quick start: info gets 6 s or 5 s, never its own (larger) limit
    limit = re.search(r"=== info \(at most (\d+) s\):", log)
    assert limit and int(limit.group(1)) in (5, 6), log[-3000:]
    skips = [line for line in log.splitlines() if line.endswith("of the session's 6 s are spent")]
    names = [line.split(":")[0].removeprefix("=== ") for line in skips]
    # the last steps are always past the budget; info and warm together take at least a second here
    assert names[-3:] == ["recipe", "best", "smoke"] and "info" not in names, log[-3000:]
    failed = int(log.split("failed steps: ")[1].split(";")[0])
    assert f"skipped steps: {len(skips)} (budget 6 s" in log and proc.returncode == failed + len(
        skips
    )
