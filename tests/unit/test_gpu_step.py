"""benchmarks/gpu_step.py's dry run takes the GPU run's code path (the fused step on the fake CuPy,
timed by events around N steps and one synchronization, as PyTorch eager is) for every path with a
launch budget, each launching its own kernels. The script it replaced handed a FusedStep instance to
cupyx.profiler.benchmark, which reads ``func.__name__``: AttributeError on the first GPU."""

import cuda_support
import launch_counts
import pytest
from conftest import benchmarks_on_path, optional

benchmarks_on_path()
import gpu_step  # noqa: E402

# the kernels that tell each path's step from the plain one
OWN = {
    "data-parallel rank (2), dropout=0.2": {"gpunet_layer_momentum_given", "gpunet_dropout"},
    "augment, dropout=0.2": {"gpunet_resample"},
    "batch-norm, dropout=0.2": {
        "gpunet_batch_norm_stats",
        "gpunet_batch_norm_apply",
        "gpunet_batch_norm_backward",
    },
}


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setenv(
        "GPUNET_CUDA_CPU", "0"
    )  # timing's path only: the kernels' CUDA runs elsewhere
    yield launch_counts.install(monkeypatch)
    cuda_support.clear_kernel_caches()


def test_the_dry_run_times_every_path_through_the_fused_step(fake_gpu):
    """Mutations: timing through cupyx.profiler.benchmark again (no cupyx on the fake: ImportError,
    and on a GPU the AttributeError), or the data-parallel path built without distributed=True (it
    launches gpunet_layer_momentum, not the update after the all-reduce), fail it."""
    optional("torch", "bench")
    report = gpu_step.run(dry_run=True, repeat=2, warmup=1)
    assert report["dry_run"] and "nothing here is a GPU measurement" in report["title"]
    assert list(report["steps"]) == list(gpu_step.PATHS)
    for name, entry in report["steps"].items():
        assert entry["gpunet"]["repeat"] == 2 and entry["gpunet"]["ms_per_step"] > 0, name
        assert OWN.get(name, set()) <= set(entry["kernels"]), (name, entry["kernels"])
        assert ("torch_eager" in entry) == gpu_step.PATHS[name][4], name
    assert (
        "gpunet_layer_momentum"
        not in report["steps"]["data-parallel rank (2), dropout=0.2"]["kernels"]
    )
    assert "gpunet_resample" not in report["steps"]["dropout=0.2"]["kernels"]
    lines = gpu_step.table(report).splitlines()
    assert lines[0] == report["title"] and len(lines) == 4 + len(gpu_step.PATHS)


def test_timing_takes_any_callable_and_syncs_once(fake_gpu):
    """A callable object without ``__name__`` (as a FusedStep) is timed: N calls between two events,
    and the host waits for the device only around them (the warm-up's end and the last event)."""

    class Step:
        calls = 0

        def __call__(self):
            Step.calls += 1

    mine, _ = gpu_step.clocks(dry_run=True)
    fake_gpu.counter.reads.clear()
    result = gpu_step.timed(Step(), 7, mine, warmup=2)
    assert Step.calls == 9 and result["repeat"] == 7 and result["ms_per_step"] >= 0
    assert [what for what, _, _ in fake_gpu.counter.reads] == ["event.synchronize"] * 2
