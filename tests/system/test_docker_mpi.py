"""Data-parallel training across two machines, as far as MPI can tell: two containers of the image
docker/test-image.sh built from this checkout (gpunet:local: CI's image step), on a podman network
of their own (docker/two_hosts.py). Two host names, two network addresses, no shared memory and no
shared files: the ranks meet through MPICH's TCP transport only. mpiexec runs in the first with
Hydra's manual launcher, and each proxy is started in its container with `podman exec` (no sshd).

The result is the one process's: 2 ranks (one a host) at global batch B against 1 process at B, with
dropout and --augment on, to the tolerance of tests/system/test_parallel.py (rtol 1e-4, atol 1e-5:
the gradient sum's float32 rounding in another order; measured here 4.5e-7 after 52 steps).

Skips without an engine, or without a gpunet:local built from this checkout's files;
GPUNET_REQUIRE_CONTAINER=1 (CI) makes both a failure. Cost: 32-49 s on the shared 2-core machine
(two containers, two MPI probes, numba's first compile in each, three short trainings on a fake
MNIST of 600 digits); the image is CI's image step's, not rebuilt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_fake_mnist
from random_runs import RANDOM_FLAGS

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docker"))
import build_inputs  # noqa: E402  (docker/build_inputs.py)
import two_hosts  # noqa: E402  (docker/two_hosts.py)

IMAGE = "gpunet:local"
REQUIRE_CONTAINER = os.environ.get("GPUNET_REQUIRE_CONTAINER") == "1"
FLAGS = ["--data-dir", "/data", *RANDOM_FLAGS]  # tests/support/random_runs.py
# Each rank writes into its own host's folder: its rank, every rank's host name, its place on its
# host, a sum over the ranks, and the TCP ports listening in its container once the ranks are
# connected (mpiexec's control port in host a's, the ranks' own in both).
PROBE = """
import json, os, socket
from mpi4py import MPI
c = MPI.COMM_WORLD
names, total = c.allgather(socket.gethostname()), c.allreduce(c.rank + 1)
listening = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for row in open(table).readlines()[1:]:
        local, state = row.split()[1], row.split()[3]
        if state == "0A":
            listening.add(int(local.rsplit(":", 1)[1], 16))
c.Barrier()
json.dump([c.rank, names, os.environ.get("MPI_LOCALRANKID"), total, sorted(listening)],
          open(f"/runs/probe-{os.environ['NETMOD']}.json", "w"))
"""
# docker/README.md's port table: the ranges that, set on mpiexec's environment, hold every listener
CONTROL, RANKS = range(50000, 50011), range(50100, 50111)
NETMODS = {
    "ucx": ["UCX_TCP_PORT_RANGE=50100-50110"],  # the mpich wheel's default netmod
    "ofi": [
        "MPIR_CVAR_CH4_NETMOD=ofi",
        "FI_PROVIDER=tcp",
        "FI_TCP_PORT_LOW_RANGE=50100",
        "FI_TCP_PORT_HIGH_RANGE=50110",
    ],
}
ADDRESS = "import socket; h = socket.gethostname(); print(h, socket.gethostbyname(h))"


def _no_image(msg: str):
    if REQUIRE_CONTAINER:
        pytest.fail(f"{msg} (GPUNET_REQUIRE_CONTAINER=1)")
    pytest.skip(msg)


def _image_source(engine: list) -> str | None:
    """IMAGE's label org.gpunet.source (docker/build_inputs.py's digest); None without IMAGE."""
    found = subprocess.run(
        engine
        + ["image", "inspect", "--format", '{{index .Config.Labels "org.gpunet.source"}}', IMAGE],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return found.stdout.strip() if found.returncode == 0 else None


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """The two hosts: the data (a fake MNIST) read-only on /data in both, each its own /runs."""
    engine = two_hosts.engine()
    if engine is None:
        _no_image("no container engine works here (podman or docker)")
    built_from, here = _image_source(engine), build_inputs.digest()
    if built_from is None:
        _no_image(f"no image {IMAGE}: run docker/test-image.sh first")
    if built_from != here:
        _no_image(
            f"{IMAGE} was built from other files (source {built_from}) than this checkout's "
            f"({here}): run docker/test-image.sh"
        )
    base = tmp_path_factory.mktemp("two-hosts")
    data = make_fake_mnist(base / "data", n_train=600, n_test=100)
    runs = [base / "a", base / "b"]
    for folder in (data, *runs):
        folder.mkdir(exist_ok=True)
        folder.chmod(0o777)  # the image's user (uid 1000) reads the data and writes its runs
    mounts = [["-v", f"{data}:/data:ro", "-v", f"{folder}:/runs"] for folder in runs]
    with two_hosts.TwoHosts(engine, IMAGE, f"gpunet-mpi-{os.getpid()}", mounts) as two:
        two.runs = runs
        yield two


def weights(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files if not k.startswith("__")}


@pytest.mark.parametrize("netmod", sorted(NETMODS))
def test_the_ranks_are_on_two_hosts_that_meet_over_the_network(hosts, netmod):
    """Through UCX and through libfabric's TCP: with docker/README.md's port variables set, every
    socket the job listens on (mpiexec's, the ranks') is in its range: what a firewall needs."""
    env = [f"NETMOD={netmod}", "MPIEXEC_PORT_RANGE=50000:50010", *NETMODS[netmod]]
    status, out, proxies = hosts.mpiexec("python", "-c", PROBE, env=env, timeout=120)
    assert status == 0, out + proxies
    said = [json.loads((folder / f"probe-{netmod}.json").read_text()) for folder in hosts.runs]
    # rank 0 on host a, rank 1 on host b, each alone on its host (local rank 0: GPU 0 of its own
    # host), and an all-gather and an all-reduce across them
    assert [s[:4] for s in said] == [[0, hosts.hosts, "0", 3], [1, hosts.hosts, "0", 3]], said
    (_, _, _, _, ports_a), (_, _, _, _, ports_b) = said
    assert any(p in CONTROL for p in ports_a) and any(p in RANKS for p in ports_a), ports_a
    assert ports_b and all(p in RANKS for p in ports_b), ports_b
    assert all(p in CONTROL or p in RANKS for p in ports_a), ports_a
    names = [hosts.exec(i, "python", "-c", ADDRESS).stdout.split() for i in (0, 1)]
    assert names[0][0] != names[1][0] and names[0][1] != names[1][1], names  # names, addresses


@pytest.fixture(scope="module")
def trained(hosts):
    """One process on each host (the reference; numba compiles its kernels in both), 2 ranks."""
    train = ["gpunet", "train", *FLAGS, "--out"]
    single = [
        subprocess.Popen(
            hosts.engine + ["exec", host, *train, "/runs/one"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for host in hosts.hosts
    ]
    for proc in single:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out
    status, out, proxies = hosts.mpiexec(*train, "/runs/two", timeout=300)
    assert status == 0, out + proxies
    return hosts.runs


def test_two_hosts_train_the_model_of_one_process(trained):
    a, b = trained
    one, two = weights(a / "one" / "model.npz"), weights(a / "two" / "model.npz")
    assert sorted(one) == sorted(two) and one
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    m1, m2 = (json.loads((a / run / "metrics.json").read_text()) for run in ("one", "two"))
    assert m2["processes"] == 2 and "processes" not in m1
    assert len(m1["history"]) == len(m2["history"]) == 2
    for h1, h2 in zip(m1["history"], m2["history"]):
        np.testing.assert_allclose(h2["loss"], h1["loss"], rtol=1e-4)
    # rank 0 wrote on its own host only: the other host's folder holds no model (no shared files)
    assert not (b / "two" / "model.npz").exists()
    # the reference is the same on either host (same image, seeded draws): bit for bit
    other = weights(b / "one" / "model.npz")
    assert all(other[k].tobytes() == one[k].tobytes() for k in one)
