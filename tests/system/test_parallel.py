"""Data-parallel training under `mpiexec -n 2` (mpi4py and the mpich wheel, the `mpi` extra; CI
installs them): K=2 at global batch B against K=1 at batch B, both ranks' weights, resume, a dying
rank, a rank's error, settings that differ between ranks.

Tolerance for K=2 against K=1: each rank's gradient is the mean over its half of the batch, weighted
by its share and summed by the all-reduce; the same sum in another order differs by float32 rounding
(a few ulps per step), which the steps carry on. Measured: at most 1.2e-7 on weights of order 1
after 75 steps; the test allows rtol 1e-4, atol 1e-5 over 3 epochs. Within one K, runs are
bit-identical.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import SUPPORT, make_fake_mnist
from random_runs import RANDOM_FLAGS

MPIEXEC = Path(sys.executable).with_name("mpiexec")
FLAGS = [
    "--hidden",
    "32",
    "16",
    "--epochs",
    "3",
    "--batch-size",
    "20",
    "--val-size",
    "100",
    "--no-plots",
    "--device",
    "cpu",
    "--dropout",
    "0",
    "--schedule",
    "constant",
]


@pytest.fixture(scope="module", autouse=True)
def _needs_mpi():
    missing = []
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing.append("mpi4py")
    if not MPIEXEC.exists() and not shutil.which("mpiexec"):
        missing.append("mpiexec")
    if missing:
        msg = (
            f"{' and '.join(missing)} not installed: MPI is optional for users (pip install "
            f"'gpunet[mpi]'); "
            f"CI installs it"
        )
        if os.environ.get("GPUNET_REQUIRE_MPI") == "1":
            pytest.fail(f"GPUNET_REQUIRE_MPI=1 but {msg}")
        pytest.skip(msg)


class TwoSameRanks:
    """A stand-in for parallel.Comm whose all-reduce sums two ranks holding the same values."""

    def allreduce(self, buf):
        assert buf.dtype == np.float64  # one float64 buffer: integers below 2**53 stay exact
        buf *= 2


def test_sum_over_ranks_gives_each_value_back_in_its_own_kind():
    from gpunet.parallel import sum_over_ranks

    counts = np.arange(9, dtype=np.int64).reshape(3, 3)
    loss, correct, cm, nothing = sum_over_ranks(TwoSameRanks(), 1.25, 2**40 + 1, counts, None)
    assert (type(loss), loss) == (float, 2.5) and (type(correct), correct) == (int, 2**41 + 2)
    assert cm.dtype == np.int64 and cm.shape == (3, 3) and np.array_equal(cm, 2 * counts)
    assert nothing is None


def mpiexec():
    return str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")


def env():
    return {k: v for k, v in os.environ.items() if k not in ("GPUNET_DEBUG", "GPUNET_DEVICE")}


def train(*args, n=2, timeout=120):
    cmd = [sys.executable, "-m", "gpunet", "train", *map(str, args)]
    if n > 1:
        cmd = [mpiexec(), "-n", str(n), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("par") / "mnist", n_train=600, n_test=100)


def weights(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if not k.startswith("__")}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for k in (1, 2):
        res = train("--data-dir", data, "--out", base / f"k{k}", *FLAGS, n=k)
        assert res.returncode == 0, res.stderr
        out[k] = base / f"k{k}"
    return out


def test_two_processes_train_the_model_of_one(runs):
    one, two = weights(runs[1] / "model.npz"), weights(runs[2] / "model.npz")
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    m1, m2 = (json.loads((runs[k] / "metrics.json").read_text()) for k in (1, 2))
    assert m2["processes"] == 2 and "processes" not in m1
    assert m1["test_accuracy"] == m2["test_accuracy"]
    assert m1["confusion_matrix"] == m2["confusion_matrix"]
    for a, b in zip(m1["history"], m2["history"]):
        assert a["accuracy"] == b["accuracy"] and a["val_accuracy"] == b["val_accuracy"]
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)


# Dropout and augmentation on (RANDOM_FLAGS, tests/support/random_runs.py): a shard's mask then
# starts inside a 64-bit word of the draw, and rank 0 of 3 gets no rows in the last batch.


@pytest.fixture(scope="module")
def random_runs(data, tmp_path_factory):
    base = tmp_path_factory.mktemp("random")
    for k in (1, 2, 3):
        res = train("--data-dir", data, "--out", base / f"k{k}", *RANDOM_FLAGS, n=k)
        assert res.returncode == 0, res.stderr
    return base


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_draw_the_masks_and_distortions_of_one_process(random_runs, ranks):
    """K ranks at global batch B train what one process trains at B with --dropout and --augment:
    every mask unit and every distortion is keyed by its row's place in the global batch, not in the
    shard. Tolerance as above (the gradient sum's float32 rounding in another order); keyed by the
    shard's own rows instead (the old code), the weights end about 0.1 apart."""
    one, many = (
        weights(random_runs / "k1" / "model.npz"),
        weights(random_runs / f"k{ranks}" / "model.npz"),
    )
    for k in one:
        np.testing.assert_allclose(many[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    m1, mk = (json.loads((random_runs / f"k{k}" / "metrics.json").read_text()) for k in (1, ranks))
    for a, b in zip(m1["history"], mk["history"]):
        np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-4)


RANK_WEIGHTS = r"""
import sys, numpy as np, gpunet as gn
from gpunet import parallel
from gpunet.training import fit
comm = parallel.world()
rng = np.random.default_rng(0)
x = rng.random((203, 12), dtype=np.float32); y = rng.integers(0, 3, size=203)
net = gn.mlp([12, 9, 3], dropout=0.3, seed=1, device="cpu")
opt = gn.Momentum(net.parameters(), lr=0.1, momentum=0.9)
fit(net, gn.SoftmaxCrossEntropy(), opt, x, y, epochs=3, batch_size=3, validation=(x[:50], y[:50]),
    comm=comm)
np.savez(f"{sys.argv[1]}/rank{comm.rank}.npz", **net.state_dict())
"""


def test_every_rank_holds_the_same_weights(tmp_path):
    """Even with dropout (each rank draws its rows of the global batch's masks) and batches of 3
    rows over 2 ranks (a last batch of 2 rows), the summed gradient and the update are the same on
    every rank: bit for bit."""
    script = tmp_path / "ranks.py"
    script.write_text(RANK_WEIGHTS)
    res = subprocess.run(
        [mpiexec(), "-n", "2", sys.executable, str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    r0, r1 = weights(tmp_path / "rank0.npz"), weights(tmp_path / "rank1.npz")
    for k in r0:
        assert np.array_equal(r0[k], r1[k]), k


def test_resume_with_two_processes(data, runs, tmp_path):
    out = tmp_path / "run"
    res = train("--data-dir", data, "--out", out, *[a if a != "3" else "2" for a in FLAGS])
    assert res.returncode == 0, res.stderr
    res = train("--data-dir", data, "--out", out, *FLAGS, "--resume")
    assert res.returncode == 0, res.stderr
    # it did resume (a fresh 3-epoch run would end with the same bits): it trained epoch 3 alone
    assert "resuming after epoch 2, step 0; 2 processes" in res.stdout, res.stdout
    assert [l.split("/")[0] for l in res.stdout.splitlines() if l.startswith("epoch ")] == [
        "epoch   3"
    ], res.stdout
    full, resumed = weights(runs[2] / "model.npz"), weights(out / "model.npz")
    for k in full:
        assert np.array_equal(full[k], resumed[k]), k
    # a checkpoint of two processes is not resumed by one
    res = train("--data-dir", data, "--out", out, *FLAGS, "--resume", "--epochs", "4", n=1)
    assert res.returncode == 2 and "written by 2 processes, this run has 1" in res.stderr, (
        res.stderr
    )


def test_sigterm_to_mpiexec_stops_every_rank_with_a_checkpoint(data, runs, tmp_path):
    out = tmp_path / "run"
    flags = [a if a != "3" else "300" for a in FLAGS]
    proc = subprocess.Popen(
        [
            mpiexec(),
            "-n",
            "2",
            sys.executable,
            "-m",
            "gpunet",
            "train",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            *flags,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env(),
    )
    assert "training" in proc.stdout.readline()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "SIGTERM: stopped after" in err, err
    meta = json.loads(np.load(out / "checkpoint.npz")["__checkpoint__"].tobytes())
    assert meta["ranks"] == 2 and not meta["finished"]


DYING = r"""
import os, signal, sys
import gpunet.training as training
from gpunet import cli, parallel
real, count = training.fit, [0]
def fit(*a, on_batch=None, **k):
    def hook(*b):
        count[0] += 1
        if count[0] == 7 and parallel.world().rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(*a, on_batch=hook, **k)
cli.train.__globals__["fit"] = fit
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_dying_rank_ends_the_job_within_seconds(data, tmp_path):
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    start = time.monotonic()
    res = subprocess.run(
        [
            mpiexec(),
            "-n",
            "2",
            sys.executable,
            str(script),
            "train",
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "run"),
            *FLAGS,
        ],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert res.returncode != 0 and time.monotonic() - start < 30
    assert "Killed" in res.stdout + res.stderr


def test_an_error_on_one_rank_ends_every_rank_with_one_line(data, tmp_path):
    """Rank 1 is given a data folder that does not exist: it says so and the job ends (no hang)."""
    start = time.monotonic()
    good = [
        sys.executable,
        "-m",
        "gpunet",
        "train",
        "--out",
        str(tmp_path / "run"),
        *FLAGS,
        "--data-dir",
    ]
    res = subprocess.run(
        [mpiexec(), "-n", "1", *good, str(data), ":", "-n", "1", *good, str(tmp_path / "nothere")],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert res.returncode != 0 and time.monotonic() - start < 30
    lines = [l for l in res.stderr.splitlines() if l.startswith("gpunet train")]
    assert lines and all("error:" in l for l in lines), res.stderr
    assert any("training settings differs between rank" in l or "nothere" in l for l in lines), (
        lines
    )


def test_settings_that_differ_between_ranks_are_refused(data, tmp_path):
    base = [
        sys.executable,
        "-m",
        "gpunet",
        "train",
        "--data-dir",
        str(data),
        "--out",
        str(tmp_path / "r"),
        *FLAGS,
    ]
    res = subprocess.run(
        [mpiexec(), "-n", "1", *base, "--lr", "0.05", ":", "-n", "1", *base, "--lr", "0.1"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=60,
    )
    assert res.returncode != 0
    assert (
        "the training settings differs between rank" in res.stderr
        and "lr: 0.05 here, 0.1 there" in res.stderr
        or "lr: 0.1 here, 0.05 there" in res.stderr
    ), res.stderr
    assert "Traceback" not in res.stderr
    # Every rank finds the difference and says so: none is killed by another's MPI_Abort before its
    # line reaches mpiexec (that once ended a run with status 2 and an empty stderr).
    for rank in (0, 1):
        assert f"gpunet train (rank {rank}): error:" in res.stderr, res.stderr


FAKE_GPU_RANKS = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
gpus, fake_ranks = int(os.environ["FAKE_GPUS"]), os.environ["FAKE_RANKS"].split(",")
# this rank sees CuPy with `gpus` GPUs (the counting stand-in)
if os.environ.get("PMI_RANK") in fake_ranks:
    from fake_cupy import FakeCupy
    fake = FakeCupy()
    fake.cuda.runtime.getDeviceCount = lambda: gpus
    fake.cuda.runtime.getDeviceProperties = lambda i: {"name": b"fake", "totalGlobalMem": 1}
    fake.cuda.runtime.runtimeGetVersion = lambda: 12000
    sys.modules["cupy"] = fake
from gpunet import cli
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    "gpus, fake_ranks, device, said",
    [
        (1, "0,1", "gpu", "ranks 0 and 1 both use GPU 0 of"),  # more ranks than GPUs on the node
        (1, "1", "auto", "the device differs between rank"),  # rank 0 sees no GPU, rank 1 one
        (2, "0,1", "gpu", "CuPy's NCCL binding is not available"),
    ],
)  # two GPUs, no NCCL
def test_ranks_that_cannot_sum_together_are_refused_in_one_line(
    data, tmp_path, gpus, fake_ranks, device, said
):
    """Before the first collective every rank gathers every rank's host, GPU, device, dtype and
    NCCL, and each refuses the same way: one line on every rank, status 2, no traceback and no hang.
    Mutation: without Comm.agree in the Trainer the first case dies with NCCL's traceback (here: the
    fake's missing NCCL), the second waits forever (MPI all-reduce against NCCL), caught by the
    timeout."""
    script = tmp_path / "fake_gpus.py"
    script.write_text(FAKE_GPU_RANKS)
    flags = [a if a != "cpu" else device for a in FLAGS]
    res = subprocess.run(
        [
            mpiexec(),
            "-n",
            "2",
            sys.executable,
            str(script),
            str(SUPPORT),
            "train",
            "--data-dir",
            str(data),
            "--out",
            str(tmp_path / "run"),
            *flags,
        ],
        capture_output=True,
        text=True,
        env={**env(), "FAKE_GPUS": str(gpus), "FAKE_RANKS": fake_ranks},
        timeout=60,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    for rank in (
        0,
        1,
    ):  # the ranks' lines may meet mid-line in the shared stderr: cut at the next one
        lines = re.findall(
            rf"gpunet train \(rank {rank}\): error: (.*?)(?=gpunet train \(rank|\n|$)", res.stderr
        )
        assert len(lines) == 1 and said in lines[0], res.stderr


def test_check_agreement_names_the_dtype_that_differs():
    from gpunet.parallel import ParallelError, check_agreement

    rank = {"host": "a", "device": "cpu", "dtype": "float32", "gpu": None, "nccl": None}
    check_agreement([rank, {**rank, "host": "b"}], 0)
    with pytest.raises(
        ParallelError, match=r"the dtype differs between rank 1 and rank 0 \('float64' here"
    ):
        check_agreement([rank, {**rank, "dtype": "float64"}], 1)
    gpu = {**rank, "device": "gpu", "gpu": 0, "nccl": True}
    check_agreement([gpu, {**gpu, "host": "b"}], 1)  # GPU 0 of two hosts: no duplicate


@pytest.mark.gpu
def test_two_gpus_train_the_model_of_one(data, tmp_path):
    """The GPU twin: one GPU per rank, the gradient sum through NCCL (NCCL refuses two ranks on one
    GPU, so this needs two). Same tolerance as on the CPU: the sum in another order, float32
    rounding."""
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs (NCCL runs one rank per GPU)")
    flags = [a if a != "cpu" else "gpu" for a in FLAGS]
    for k in (1, 2):
        res = train("--data-dir", data, "--out", tmp_path / f"k{k}", *flags, n=k)
        assert res.returncode == 0, res.stderr
    one, two = weights(tmp_path / "k1" / "model.npz"), weights(tmp_path / "k2" / "model.npz")
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
