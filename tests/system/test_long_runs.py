"""Long runs as a user lives them, through the real `gpunet train` process: SIGTERM and SIGINT at a
step, then --resume, must end with the bits of an uninterrupted run; a SIGKILL inside a checkpoint
write leaves the previous checkpoint readable; divergence exits 3 with strict JSON; files follow the
umask; refusals are one line. Tiny IDX files (conftest.make_fake_mnist) keep each run to about a
second.

To stop at a chosen step deterministically, `kill_at.py` (written below) runs the real command with
one change: the process sends itself the signal after global step K, through the real handlers.
"""

import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_fake_mnist

FLAGS = [
    "--hidden",
    "32",
    "16",
    "--epochs",
    "4",
    "--batch-size",
    "20",
    "--val-size",
    "100",
    "--no-plots",
    "--device",
    "cpu",
    "--lr",
    "0.05",
]
STEPS_PER_EPOCH = 25  # 500 training rows / 20

KILL_AT = r"""
import os, signal, sys
import gpunet.training as training
from gpunet import cli, files

when, signame, times = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
real_fit, count = training.fit, [0]

def fit(*args, on_batch=None, **kwargs):
    def hook(*a):
        count[0] += 1
        if on_batch is not None:
            on_batch(*a)
        if count[0] == when:
            for _ in range(times):
                os.kill(os.getpid(), getattr(signal, signame))
    return real_fit(*args, on_batch=hook, **kwargs)

cli.train.__globals__["fit"] = fit  # the recipe's own reference to fit
# die inside the when-th checkpoint write, half of the file written
if signame == "SIGKILL_IN_WRITE":
    real_fsync, writes = os.fsync, [0]
    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if ".checkpoint.npz." in name:
            writes[0] += 1
            if writes[0] == when:
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
                os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)
    files.os.fsync = fsync
    cli.train.__globals__["fit"] = real_fit
sys.exit(cli.main(sys.argv[4:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fake_mnist(tmp_path_factory.mktemp("long") / "mnist", n_train=600, n_test=100)


@pytest.fixture(scope="module")
def kill_at(tmp_path_factory):
    path = tmp_path_factory.mktemp("script") / "kill_at.py"
    path.write_text(KILL_AT)
    return path


def gpunet(*args, umask=None, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "GPUNET_DEBUG"}
    return subprocess.run(
        [sys.executable, "-m", "gpunet", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def stopped(kill_at, when, signame, data, out, *extra, times=1):
    return subprocess.run(
        [
            sys.executable,
            str(kill_at),
            str(when),
            signame,
            str(times),
            "train",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            *FLAGS,
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def arrays(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def history(out):
    metrics = json.loads((out / "metrics.json").read_text())
    return [{k: v for k, v in e.items() if k != "seconds"} for e in metrics["history"]], metrics


def same_files(a, b):
    for name in ("model.npz", "checkpoint.npz"):
        x, y = arrays(a / name), arrays(b / name)
        assert x.keys() == y.keys()
        for k in x:
            if k == "__checkpoint__":
                mx, my = json.loads(x[k].tobytes()), json.loads(y[k].tobytes())
                for m in (mx, my):
                    m["history"] = [
                        {k2: v for k2, v in e.items() if k2 != "seconds"} for e in m["history"]
                    ]
                assert mx == my
            else:
                assert np.array_equal(x[k], y[k]), f"{name}: {k} differs"
    assert history(a)[0] == history(b)[0]


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    res = gpunet("train", "--data-dir", data, "--out", out, *FLAGS)
    assert res.returncode == 0, res.stderr
    return out


@pytest.mark.parametrize(
    "signame, code, when",
    [
        ("SIGTERM", 143, None),
        ("SIGINT", 130, None),
        (
            "SIGTERM",
            143,
            2 * STEPS_PER_EPOCH,
        ),  # the last step of an epoch: stop before its validation pass
    ],
)
def test_signal_at_a_random_step_then_resume_is_bit_exact(
    data, kill_at, reference, tmp_path, signame, code, when
):
    when = when or int(np.random.default_rng().integers(1, 4 * STEPS_PER_EPOCH))
    out = tmp_path / "run"
    res = stopped(kill_at, when, signame, data, out)
    assert res.returncode == code, (when, res.stderr)
    last = res.stderr.strip().splitlines()[-1]
    epochs, steps = (when - 1) // STEPS_PER_EPOCH, (when - 1) % STEPS_PER_EPOCH + 1
    assert f"gpunet train: {signame}: stopped after {epochs} epochs and {steps} steps;" in last, (
        when,
        last,
    )
    assert last.endswith("--resume") and "continue with: gpunet train" in last
    assert not (out / "metrics.json").exists() and (out / "checkpoint.npz").exists()
    res = gpunet("train", "--data-dir", data, "--out", out, *FLAGS, "--resume")
    assert res.returncode == 0, (when, res.stderr)
    same_files(reference, out)


def test_external_sigterm_while_training_then_resume(data, reference, tmp_path):
    """A real outside signal, as `docker stop` sends it, at whatever step training has reached."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpunet",
            "train",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            *FLAGS,
            "--epochs",
            "400",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()  # the start line: data loaded, training begins
    assert "training" in line, line
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: stopped after" in err and err.strip().endswith("--resume")
    meta = json.loads(arrays(out / "checkpoint.npz")["__checkpoint__"].tobytes())
    assert meta["epoch"] < 400 and not meta["finished"]


def test_second_ctrl_c_aborts_at_once(data, kill_at, tmp_path):
    out = tmp_path / "run"
    res = stopped(kill_at, 5, "SIGINT", data, out, times=2)
    assert res.returncode == 130, res.stderr
    assert "aborted at once" in res.stderr.strip().splitlines()[-1]
    assert not (out / "checkpoint.npz").exists()  # nothing was written for the aborted epoch


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(
    data, kill_at, reference, tmp_path
):
    out = tmp_path / "run"
    res = stopped(kill_at, 3, "SIGKILL_IN_WRITE", data, out)
    assert res.returncode == -signal.SIGKILL, res.stderr
    meta = json.loads(arrays(out / "checkpoint.npz")["__checkpoint__"].tobytes())
    assert meta["epoch"] == 2, "the checkpoint must be the one written before the killed write"
    res = gpunet("train", "--data-dir", data, "--out", out, *FLAGS, "--resume")
    assert res.returncode == 0, res.stderr
    same_files(reference, out)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")], (
        "stale half files were left behind"
    )


def strict_json(text):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_divergence_stops_exits_3_and_writes_strict_json(data, tmp_path):
    out = tmp_path / "run"
    res = gpunet(
        "train", "--data-dir", data, "--out", out, *FLAGS, "--lr", "1e30", "--momentum", "0.99"
    )
    assert res.returncode == 3, res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("gpunet train: diverged:") and "--lr" in last and "--weight-decay" in last
    )
    metrics = strict_json((out / "metrics.json").read_text())
    assert metrics["stop_reason"] == "diverged" and metrics["diverged_epoch"] == 1
    assert metrics["history"][-1]["loss"] is None  # NaN became null
    weights = arrays(out / "model.npz")
    assert all(np.isfinite(v).all() for k, v in weights.items() if k != "__gpunet__")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_follow_the_umask(data, tmp_path, umask, mode):
    out = tmp_path / "run"
    flags = [f for f in FLAGS if f != "--no-plots"]
    res = gpunet("train", "--data-dir", data, "--out", out, *flags, "--epochs", "1", umask=umask)
    assert res.returncode == 0, res.stderr
    names = ["model.npz", "metrics.json", "checkpoint.npz"]
    if importlib.util.find_spec("matplotlib") is not None:  # the pictures need the cli extra
        names += ["curves.png", "confusion.png", "misclassified.png"]
    for name in names:
        assert stat.S_IMODE((out / name).stat().st_mode) == mode, name


def test_refusals_are_one_line(data, reference, tmp_path):
    def one_line(res, *words):
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
        for w in words:
            assert w in lines[0], lines[0]

    fresh = tmp_path / "fresh"
    one_line(
        gpunet("train", "--data-dir", data, "--out", fresh, *FLAGS, "--resume"),
        "--resume: no checkpoint",
    )
    # a folder holding a finished run is not mixed with a new one
    one_line(
        gpunet("train", "--data-dir", data, "--out", reference, *FLAGS),
        "already holds a run",
        "--overwrite",
    )
    one_line(
        gpunet("train", "--data-dir", data, "--out", reference, *FLAGS, "--resume"),
        "complete",
        "--epochs",
    )
    changed = [a if a != "16" else "17" for a in FLAGS]
    one_line(
        gpunet(
            "train", "--data-dir", data, "--out", reference, *changed, "--resume", "--epochs", "5"
        ),
        "--hidden:",
        "[32, 16]",
        "[32, 17]",
    )
    one_line(
        gpunet(
            "train",
            "--data-dir",
            data,
            "--out",
            reference,
            *FLAGS,
            "--resume",
            "--epochs",
            "5",
            "--seed",
            "9",
        ),
        "--seed:",
        "0",
        "9",
    )
    other = make_fake_mnist(tmp_path / "other", n_train=600, n_test=100, seed=5)
    one_line(
        gpunet(
            "train", "--data-dir", other, "--out", reference, *FLAGS, "--resume", "--epochs", "5"
        ),
        "other data",
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.npz").write_bytes(b"PK\x03\x04 half a zip file")
    one_line(
        gpunet("train", "--data-dir", data, "--out", broken, *FLAGS, "--resume"),
        "not a readable gpunet checkpoint",
    )


def test_more_epochs_on_resume_and_overwrite(data, reference, tmp_path):
    out = tmp_path / "run"
    assert gpunet("train", "--data-dir", data, "--out", out, *FLAGS).returncode == 0
    res = gpunet("train", "--data-dir", data, "--out", out, *FLAGS, "--resume", "--epochs", "6")
    assert res.returncode == 0, res.stderr
    hist, metrics = history(out)
    assert [e["epoch"] for e in hist] == [1, 2, 3, 4, 5, 6] and hist[:4] == history(reference)[0][
        :4
    ]
    res = gpunet("train", "--data-dir", data, "--out", out, *FLAGS, "--overwrite")
    assert res.returncode == 0, res.stderr
    same_files(reference, out)


def test_out_of_memory_is_one_line_and_keeps_the_checkpoint(data, tmp_path, monkeypatch, capsys):
    from gpunet import cli
    from gpunet.fast import step

    out = tmp_path / "run"
    real, calls = step.FusedStep.__call__, [0]

    def failing(self, x, y):
        calls[0] += 1
        if calls[0] == STEPS_PER_EPOCH + 3:  # inside epoch 2, after epoch 1's checkpoint
            raise MemoryError(
                "Unable to allocate 3.00 GiB for an array with shape (20, 40000000) and data type "
                "float32"
            )
        return real(self, x, y)

    monkeypatch.setattr(step.FusedStep, "__call__", failing)
    monkeypatch.delenv("GPUNET_DEBUG", raising=False)
    rc = cli.main(["train", "--data-dir", str(data), "--out", str(out), *FLAGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert (
        "out of memory with --batch-size 20" in err[0]
        and "3.00 GiB" in err[0]
        and "smaller --batch-size" in err[0]
    )
    assert "last checkpoint is kept" in err[0]
    meta = json.loads(arrays(out / "checkpoint.npz")["__checkpoint__"].tobytes())
    assert meta["epoch"] == 1

    class OutOfMemoryError(Exception):  # what CuPy raises, by name
        pass

    calls[0] = 0
    monkeypatch.setattr(
        step.FusedStep,
        "__call__",
        lambda self, x, y: (_ for _ in ()).throw(
            OutOfMemoryError(
                "Out of memory allocating 1,073,741,824 bytes (allocated so far: 2,048 bytes)."
            )
        ),
    )
    rc = cli.main(["train", "--data-dir", str(data), "--out", str(out), *FLAGS, "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "1,073,741,824 bytes" in err[-1] and "--batch-size 20" in err[-1]


def test_sigterm_to_pid_1_as_docker_stop_sends_it(data, tmp_path):
    """In a container gpunet is PID 1 (the image's ENTRYPOINT), and the kernel delivers no signal to
    PID 1 that it has no handler for. Here gpunet runs as PID 1 of a new PID namespace (unshare, as
    root) and gets SIGTERM from outside it, as from `docker stop`: it must stop with a checkpoint,
    not ignore it."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        pytest.skip("needs root and util-linux's unshare to make a PID namespace")
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            unshare,
            "--pid",
            "--fork",
            "--mount-proc",
            sys.executable,
            "-m",
            "gpunet",
            "train",
            "--data-dir",
            str(data),
            "--out",
            str(out),
            *FLAGS,
            "--epochs",
            "400",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if "training" not in line:
        proc.kill()
        pytest.skip(f"unshare cannot make a PID namespace here: {proc.stderr.read()[-300:]}")
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children
    time.sleep(0.5)
    os.kill(int(children[0]), signal.SIGTERM)  # gpunet, PID 1 inside its namespace
    _, err = proc.communicate(timeout=120)
    assert "SIGTERM: stopped after" in err and err.strip().endswith("--resume"), err
    meta = json.loads(arrays(out / "checkpoint.npz")["__checkpoint__"].tobytes())
    assert not meta["finished"]
