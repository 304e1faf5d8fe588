"""benchmarks/optim_speed.py, the Adam-vs-momentum-vs-PyTorch epoch timing: a run on tiny MNIST
files writes results whose ratios are those of its own medians, and its gpunet and torch Adam peers
start from the same weights and see the same batches (the figures themselves are never asserted:
they live in BENCHMARKS.md). A few seconds on two idle cores."""

import json

import numpy as np
from conftest import benchmarks_on_path, make_fake_mnist, optional

benchmarks_on_path()
import optim_speed  # noqa: E402


def test_a_run_writes_consistent_results(tmp_path):
    data = make_fake_mnist(tmp_path / "mnist", n_train=300, n_test=50)
    out = tmp_path / "r.json"
    assert (
        optim_speed.main(
            [
                "--data-dir",
                str(data),
                "--sizes",
                "784-32-10",
                "--rounds",
                "2",
                "--no-torch",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert set(res["seconds"]) == {"gpunet-momentum", "gpunet-adam", "gpunet-adam-core"}
    assert all(len(v) == 2 for v in res["seconds"].values())
    med = res["median_seconds"]
    assert med["gpunet-adam"] == res["seconds"]["gpunet-adam"][1]  # round 1 is the warm-up
    assert (
        res["ratios"]["gpunet-adam / gpunet-momentum"]
        == med["gpunet-adam"] / med["gpunet-momentum"]
    )
    cpu = res["median_cpu_seconds"]
    assert cpu["gpunet-adam"] == res["cpu_seconds"]["gpunet-adam"][1] > 0
    assert (
        res["cpu_ratios"]["gpunet-adam / gpunet-adam-core"]
        == cpu["gpunet-adam"] / cpu["gpunet-adam-core"]
    )


def test_torch_adam_peer_does_the_same_work_as_gpunets():
    """From the same weights on the same batch order, one epoch of torch.optim.Adam and of gpunet's
    fused Adam end within float32 rounding (Adam's steps are about lr = 1e-3 each; 1e-4 is a tenth
    of one)."""
    torch = optional("torch", "bench")
    rng = np.random.default_rng(0)
    x, y = rng.random((200, 784), dtype=np.float32), rng.integers(0, 10, size=200)
    ours = optim_speed.Gpunet([784, 16, 10], x, y, "adam", True)
    theirs = optim_speed.Torch(
        torch, [784, 16, 10], x, y, "adam", [w.copy() for w in ours.weights()]
    )
    for seed in (0, 1):
        ours.epoch(seed, 32)
        theirs.epoch(seed, 32)
    for a, b in zip(ours.weights(), theirs.weights()):
        np.testing.assert_allclose(a, b, atol=1e-4)
