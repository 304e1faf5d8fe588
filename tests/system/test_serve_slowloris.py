"""gpunet serve under a slowloris attack and a load at the same time, as a process of its own (its
thread count is read from /proc): 3,000 connections each trickle one header byte a second (opened
again as soon as the server cuts one off) while 64 clients post 20 pictures each. Before the
connection loop of gpunet/connections.py, the 3,000 held 3,003 server threads and never timed out
(the 30 s were per read). About 20 s on 2 cores."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import optional

Image = optional("PIL.Image", "cli")
resource = pytest.importorskip("resource")

import serve_load  # noqa: E402  (tests/support/serve_load.py)

import gpunet as gn  # noqa: E402
from gpunet.data.pictures import mnist_style  # noqa: E402
from gpunet.training import predict_proba  # noqa: E402

TRICKLING = 3000
DEADLINE = 2.0  # seconds: short, so that the test sees many 408s in a few seconds (default 30)


def file_limit_for(count: int) -> None:
    """Raise this process's soft limit of open files to `count`, or skip saying why it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= count:
        return
    if hard != resource.RLIM_INFINITY and hard < count:
        pytest.skip(f"needs {count} open files, and the hard limit (ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, hard))


def threads_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE).group(1))


def pictures(net) -> tuple:
    """Five strokes as PNG bodies, and the digit the net reads in each."""
    strokes = [
        [
            [0 if (6 <= r < 22 and abs(c - 14 - k * (r - 14) // 4) < 2) else 255 for c in range(28)]
            for r in range(28)
        ]
        for k in range(-2, 3)
    ]
    bodies = [serve_load.png(rows) for rows in strokes]
    digits = {}
    for i, body in enumerate(bodies):
        pixels, _ = mnist_style(Image.open(io.BytesIO(body)))
        digits[i] = int(gn.to_numpy(predict_proba(net, pixels.reshape(1, -1))).argmax())
    return bodies, digits


def attack(pid: int, port: int, bodies: list) -> tuple:
    """The 3,000 tricklers (a process of their own, so that they read their answers while the load
    runs here) and the 64 x 20 load at once; (load, trickled, most threads seen)."""
    stop, most = threading.Event(), [threads_of(pid)]

    def sample():
        while not stop.wait(0.05):
            most[0] = max(most[0], threads_of(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    script = Path(serve_load.__file__)
    tricklers = subprocess.Popen(
        [
            sys.executable,
            script,
            "--url",
            f"http://127.0.0.1:{port}",
            "--slowloris",
            str(TRICKLING),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(2)  # the 3,000 are open and trickling before the load starts
        started = time.perf_counter()
        load = serve_load.hammer("127.0.0.1", port, bodies, clients=64, per_client=20, timeout=60)
        time.sleep(max(0.0, 2 * DEADLINE + 1 - (time.perf_counter() - started)))  # 2 deadlines
    finally:
        out, _ = tricklers.communicate("stop\n", timeout=60)
        stop.set()
        sampler.join(timeout=60)
    return load, json.loads(out), most[0]


def test_3000_trickling_connections_and_the_load_at_once(tmp_path):
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the server's thread count from /proc (Linux)")
    file_limit_for(TRICKLING + 64 + 400)  # the server raises its own (serve.raise_file_limit)
    net = gn.mlp([784, 16, 10], seed=0, device="cpu")
    net.save(tmp_path / "m.npz")
    bodies, digits = pictures(net)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("GPUNET_DEBUG", None)
    command = [
        sys.executable,
        "-m",
        "gpunet",
        "serve",
        tmp_path / "m.npz",
        "--port",
        "0",
        "--deadline",
        str(DEADLINE),
    ]
    with open(tmp_path / "serve.log", "w") as log:  # a line per request and per 408: no pipe
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        try:
            port = int(re.search(r"http://127\.0\.0\.1:(\d+)/", proc.stdout.readline()).group(1))
            warm = serve_load.hammer("127.0.0.1", port, bodies, clients=4, per_client=2)
            assert warm["failed"] == 0, warm["failures"]
            ready = threads_of(proc.pid)  # every thread the server will have runs by now
            load, trickled, most = attack(proc.pid, port, bodies)
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
    assert load["failed"] == 0 and load["ok"] == 1280, load["failures"]
    assert {i: doc["digit"] for i, doc in load["answers"].items()} == digits
    assert trickled["opened"] >= TRICKLING and not trickled["errors"], trickled
    # every trickler is cut off by the deadline with a 408, and nothing else (no 503, no reset)
    assert set(trickled["statuses"]) == {"408"}, trickled  # (JSON keys: strings)
    assert trickled["statuses"]["408"] >= TRICKLING, trickled
    # no thread per connection: the count stays what it was before the 3,064 connections came
    assert most <= ready <= 16, (ready, most)
    errors = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in errors and "error with" not in errors, errors[-2000:]
