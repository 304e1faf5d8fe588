"""The rehearsed GPU session (benchmarks/gpu_session.sh): its dry run on the CPU, on tiny MNIST files, runs
every step and writes the log and result files a lent GPU machine would send back."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_fake_mnist

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
STEPS = ("info", "warm", "pytest-gpu", "bench", "gpu-step", "recipe", "smoke")


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_results(tmp_path):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is not installed here")
    data = make_fake_mnist(tmp_path / "mnist", n_train=600, n_test=200)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("GPUNET_DEVICE", "GPUNET_REQUIRE_GPU", "OUT")}
    env["TMPDIR"], env["PYTHON"] = str(tmp_path), sys.executable  # this test's Python, whatever PATH says
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(data), str(out)], capture_output=True, text=True,
                          env=env, timeout=600, cwd=tmp_path)
    log = (out / "session.log").read_text()
    assert proc.returncode == 0, proc.stdout[-3000:] + log[-3000:]
    # at most 8 files come back from a lent machine; the session writes six
    assert sorted(p.name for p in out.iterdir()) == ["latest-cpu.json", "latest-cpu.md", "recipe-metrics.json",
                                                     "session.log", "smoke-metrics.json", "step-cpu.json"]
    step = json.loads((out / "step-cpu.json").read_text())
    assert step["device"]["device"] == "cpu" and sorted(step["steps"]) == ["dropout=0.0", "dropout=0.2"]
    assert all(e["gpunet"]["host_ms"] > 0 and e["gpunet"]["repeat"] == 3 for e in step["steps"].values())
    assert "device cpu (dry run on the CPU)" in log
    for name in STEPS:
        assert f"=== {name}: exit 0 after" in log, name
    assert "failed steps: 0" in log
    assert "--no-memory" in log and "[peak memory" not in log  # no CPU memory children on a GPU machine
    tests = log.split("=== pytest-gpu:")[1]  # its command and output: collected, and all skip on the CPU
    assert " skipped" in tests and " passed" not in tests and " error" not in tests
    bench = json.loads((out / "latest-cpu.json").read_text())
    assert bench["device"] == "cpu" and [c["name"] for c in bench["configs"]] == ["784-100-10/b128"]
    for name in ("recipe-metrics.json", "smoke-metrics.json"):
        metrics = json.loads((out / name).read_text())
        assert metrics["device"] == "cpu" and len(metrics["history"]) == 1, name


def test_a_failing_step_is_counted_and_the_rest_still_run(tmp_path):
    """A missing data folder fails the data steps; the exit status counts them and the log names each."""
    if shutil.which("timeout") is None:
        pytest.skip("coreutils' timeout is not installed here")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("GPUNET_DEVICE", "GPUNET_REQUIRE_GPU", "OUT")}
    env.update(TMPDIR=str(tmp_path), GPUNET_DRY_RUN="1")
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "no-such-mnist"), str(out)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    log = (out / "session.log").read_text()
    assert "=== info: exit 0 after" in log
    for name in ("bench", "recipe", "smoke"):
        assert f"=== {name}: exit 0 after" not in log and f"=== {name}: exit" in log, name
    assert proc.returncode == int(log.rsplit("failed steps: ", 1)[1].split()[0]) >= 3
