"""Untrusted model files (issue 36): every crafted file of ``tests/support/crafted_files.py`` is
refused with one line naming the file and the field, in Python (one ``gpunet.ModelFileError``, a
ValueError) and on the command line (exit 2, one line, no traceback), within a measured memory
bound.

The bound: each command runs in a process of its own, whose own peak resident set is measured (KiB:
a fork's rusage from ``os.wait4``, a fresh interpreter's high-water mark VmHWM, see ``gpunet_peak``;
not RUSAGE_CHILDREN, which keeps the largest child's so far, and inherits pytest's); it must stay
under 200 MB for files whose valid model would be small. A fresh ``python -m gpunet`` that predicts
with a valid small model peaks near 65 MB here, so the bound leaves room for the import and the
record but not for a crafted layer's arrays: the zip bomb inflates to 251 MB, ``Linear(784,
3_000_000)`` asks for 9.4 GB.

The commands rotate over the cases: each case runs one of predict, evaluate, serve, explain and
export, forked from a process that imported gpunet once (``tests/support/forked_cli.py``: its peak
plus the fork's, an upper bound of a fresh process's); each command and the zip bomb also run as a
fresh ``python -m gpunet``; every case also runs through ``gpunet.load`` in this process. CI cost:
about 10 s in all (six interpreter starts, about 75 forks, the corpus made in milliseconds per
file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import SUPPORT
from crafted_files import (
    _write,
    checkpoint_cases,
    checkpoint_file,
    model_cases,
    model_file,
    read_checkpoint,
    resume_args,
    tiny_run,
    valid_model,
)
from fresh_python import run_code

import gpunet as gn

BOUND_KB = 200 * 1000  # 200 MB, in ru_maxrss's KiB (a little stricter than 200 MB)
CASES = model_cases()
BOMB = [c[0] for c in CASES].index("a zip bomb in a large file")
COMMANDS = [
    lambda m, d: ["predict", m, str(d / "digit.npy")],
    lambda m, d: ["evaluate", m, "--data-dir", str(d)],
    lambda m, d: ["serve", m, "--port", "0"],
    lambda m, d: ["explain", "--model", m],
    lambda m, d: ["export", m, str(d / "out.onnx")],
]


PEAK_LAUNCH = """
import atexit, runpy, sys
peak = sys.argv.pop(1)

def report():  # this process's own high-water mark: VmHWM, in KiB
    with open("/proc/self/status") as status, open(peak, "w") as f:
        f.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))

atexit.register(report)
runpy.run_module("gpunet", run_name="__main__", alter_sys=True)
"""


def gpunet_peak(args, cwd, timeout=120) -> tuple[int, str, str, int]:
    """``(exit status, stdout, stderr, peak RSS in KiB)`` of ``python -m gpunet args`` (the module
    run as ``-m`` runs it, by runpy) in a fresh interpreter, whose peak it reports itself at exit
    from its memory's high-water mark (VmHWM): getrusage's ru_maxrss of a child exec'd from pytest
    counts pytest's own peak (Linux keeps it across exec), which in a whole-suite run is past the
    bound by itself. A child still running after ``timeout`` seconds (a file that loads, under
    serve) is killed: no peak (-1)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    env.pop("GPUNET_DEBUG", None)
    out, err, peak = cwd / "stdout.txt", cwd / "stderr.txt", cwd / "peak.txt"
    with open(out, "wb") as o, open(err, "wb") as e:
        try:
            code = run_code(
                PEAK_LAUNCH,
                str(peak),
                *map(str, args),
                stdout=o,
                stderr=e,
                cwd=cwd,
                env=env,
                timeout=timeout,
            ).returncode
        except subprocess.TimeoutExpired:
            code = -9
    kib = int(peak.read_text()) if peak.exists() else -1
    return code, out.read_text(), err.read_text(), kib


@pytest.mark.parametrize("name, make, field", CASES, ids=[c[0] for c in CASES])
def test_gpunet_load_refuses_in_one_line(name, make, field, tmp_path):
    path = make(tmp_path)
    with pytest.raises(gn.ModelFileError) as info:
        gn.load(path, device="cpu")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert field in message, message


class Forked:
    """The command line run by ``tests/support/forked_cli.py``: one forked process per command, its
    peak measured the same way (os.wait4), a few milliseconds each instead of an interpreter's
    start."""

    def __init__(self):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        env.pop("GPUNET_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, str(SUPPORT / "forked_cli.py")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def __call__(self, args, cwd, timeout=60) -> tuple[int, str, str, int]:
        out, err = cwd / "stdout.txt", cwd / "stderr.txt"
        request = {
            "argv": [str(a) for a in args],
            "cwd": str(cwd),
            "stdout": str(out),
            "stderr": str(err),
            "timeout": timeout,
        }
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        # the fork's peak plus the runner's own: an upper bound of a fresh process's (see
        # forked_cli.py)
        return (
            answer["status"],
            out.read_text(),
            err.read_text(),
            answer["peak_kib"] + answer["parent_kib"],
        )

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def forked():
    runner = Forked()
    yield runner
    runner.close()


def check_refused(run, case, tmp_path):
    """Case ``case`` under the command COMMANDS picks for it: exit 2, one line naming the file and
    the field, nothing on stdout, no traceback, the peak under the bound."""
    _name, make, field = CASES[case]
    path = make(tmp_path)
    args = COMMANDS[case % len(COMMANDS)](str(path), tmp_path)
    code, out, err, peak = run(args, tmp_path)
    assert code == 2, (args, code, err)
    assert err.count("\n") == 1 and "Traceback" not in err and out == "", err
    assert f"{path}: " in err and field in err, err
    assert 0 < peak < BOUND_KB, f"{args[0]}: peak RSS {peak} KiB"


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_the_command_line_refuses_in_one_line_within_the_bound(case, tmp_path, forked):
    check_refused(forked, case, tmp_path)


@pytest.mark.parametrize(
    "case", [0, 1, 2, 3, 4, BOMB], ids=[CASES[c][0] for c in (0, 1, 2, 3, 4, BOMB)]
)
def test_python_m_gpunet_refuses_in_one_line_within_the_bound(case, tmp_path):
    """The real entry point, a fresh interpreter per command: each of the five commands once, and
    the zip bomb (the case of the largest arrays)."""
    check_refused(gpunet_peak, case, tmp_path)


def test_the_valid_model_loads_and_is_within_the_bound(tmp_path):
    """The corpus' starting point is valid: loaded by gpunet.load, evaluated by the command line
    (its peak measured the same way: the bound is not met by refusing everything)."""
    record, arrays = valid_model(tmp_path)
    path = model_file(
        tmp_path / "rewritten.npz", record, arrays
    )  # through the corpus' own zip writer
    net = gn.load(path, device="cpu")
    for key, value in arrays.items():
        np.testing.assert_array_equal(gn.to_numpy(net.state_dict()[key]), value)
    np.save(tmp_path / "digit.npy", np.zeros((28, 28), np.float32))
    code, out, err, peak = gpunet_peak(["predict", path, tmp_path / "digit.npy"], tmp_path)
    assert code == 0 and "digit.npy" in out, err
    assert 0 < peak < BOUND_KB, peak


# --- checkpoints: gpunet train --resume -----------------------------------------------------------
CHECKPOINT_CASES = checkpoint_cases()


@pytest.fixture(scope="module")
def valid_checkpoint(tmp_path_factory):
    """``(folder, record, arrays)``: one epoch of a tiny run, its data in ``folder/tiny.npz``."""
    folder = tmp_path_factory.mktemp("tiny_run")
    return (folder, *read_checkpoint(tiny_run(folder)))


def resume_refused(forked, folder, tmp_path, make) -> tuple[str, str]:
    """``gpunet train --resume`` on the checkpoint ``make(path)`` writes: exit 2, one line naming
    the checkpoint, nothing else printed, no traceback, the peak under the bound; returns the
    line."""
    shutil.copy(folder / "tiny.npz", tmp_path / "tiny.npz")
    path = make(tmp_path / "run" / "checkpoint.npz")
    code, out, err, peak = forked(resume_args(tmp_path / "run"), tmp_path)
    assert code == 2, (code, out, err)
    assert err.count("\n") == 1 and "Traceback" not in err and "epoch   2/2" not in out, (out, err)
    assert f"{path}: " in err, err
    assert 0 < peak < BOUND_KB, f"peak RSS {peak} KiB"
    return err, str(path)


@pytest.mark.parametrize(
    "name, edit, field", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES]
)
def test_train_resume_refuses_a_crafted_checkpoint_in_one_line(
    name, edit, field, valid_checkpoint, tmp_path, forked
):
    folder, record, arrays = valid_checkpoint
    err, _ = resume_refused(
        forked, folder, tmp_path, lambda p: checkpoint_file(p, *edit(record, arrays))
    )
    assert field in err, err


def test_train_resume_refuses_a_text_file_and_a_model_file(valid_checkpoint, tmp_path, forked):
    folder = valid_checkpoint[0]
    (tmp_path / "run").mkdir()
    err, _ = resume_refused(
        forked, folder, tmp_path, lambda p: _write(p.parent, p.name, b"epoch,loss\n")
    )
    assert "not a readable gpunet checkpoint (a checkpoint is a .npz archive" in err, err
    (tmp_path / "run" / "checkpoint.npz").unlink()
    model = lambda p: gn.mlp([8, 4, 3], seed=0, device="cpu").save(p) or p  # noqa: E731
    err, _ = resume_refused(forked, folder, tmp_path, model)
    assert (
        "not a gpunet checkpoint (it holds 0.W, 0.b, 2.W, 2.b, ...; a model file, perhaps)" in err
    ), err


def test_the_valid_checkpoint_resumes(valid_checkpoint, tmp_path, forked):
    """The corpus' starting point, rewritten by its own zip writer, resumes: the refusals are the
    edits'. (Its peak is not bounded here: a run that trains imports matplotlib and more.)"""
    folder, record, arrays = valid_checkpoint
    shutil.copy(folder / "tiny.npz", tmp_path / "tiny.npz")
    checkpoint_file(tmp_path / "run" / "checkpoint.npz", record, arrays)
    code, out, err, peak = forked(resume_args(tmp_path / "run"), tmp_path)
    assert code == 0 and "epoch   2/2" in out, (out, err)
