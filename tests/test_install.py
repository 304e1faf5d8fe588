"""The clean install: build a wheel, install it into a fresh virtual environment outside the source
tree, and use it from there (`gpunet info`, `python -m gpunet --help`, one epoch on MNIST).

Only the core package is installed (numpy is its one dependency), without the `[cli]` extra: that is
what `pip install gpunet` on a laptop gives, and the command line must work with it (train prints a
note and skips the pictures). It also keeps the test fast (no matplotlib download).

Needs the package registry (numpy, and setuptools for the isolated build; pip's cache is used).
Without a registry, or without a working `venv`, it skips, unless GPUNET_REQUIRE_TOOLS=1 (CI),
where it fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
REQUIRE_TOOLS = os.environ.get("GPUNET_REQUIRE_TOOLS") == "1"
BIN = "Scripts" if os.name == "nt" else "bin"
EXE = ".exe" if os.name == "nt" else ""


def _skip_or_fail(msg: str):
    if REQUIRE_TOOLS:
        pytest.fail(f"{msg} (GPUNET_REQUIRE_TOOLS=1)")
    pytest.skip(msg)


def _run(cmd, *, cwd, env, timeout) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _show(proc: subprocess.CompletedProcess) -> str:
    return (
        f"$ {' '.join(map(str, proc.args))}\n(exit {proc.returncode})\n"
        f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    )


def _clean_env(venv: Path | None = None) -> dict:
    """The environment without anything that could make Python find the source tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "GPUNET_DEVICE"))}
    env.pop("VIRTUAL_ENV", None)
    env.pop("__PYVENV_LAUNCHER__", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["MPLBACKEND"] = "Agg"
    if venv is not None:
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = str(venv / BIN) + os.pathsep + env.get("PATH", "")
    return env


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


_TOP_LEVEL_JUNK = {".git", "venv", ".venv", "env", "runs", "build", "dist", "shared", "data"}
_ANY_LEVEL_JUNK = {"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache"}


def _not_source(folder: str, names: list[str]) -> set[str]:
    """copytree's ignore: virtual environments, build output, runs and caches are not the source."""
    top = Path(folder).resolve() == ROOT
    return {
        n for n in names
        if n in _ANY_LEVEL_JUNK or n.endswith(".egg-info") or (top and n in _TOP_LEVEL_JUNK)
    }


def _installed(dist: str) -> bool:
    """Whether the distribution ``dist`` is installed. Asked of the package metadata, not of sys.path,
    where the ``build/`` folder that ``pip install .`` leaves in the source tree looks like a package."""
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder that is surely outside the source tree."""
    base = tmp_path_factory.mktemp("clean-install")
    if _inside(base, ROOT):  # e.g. --basetemp inside the repository
        holder = tempfile.TemporaryDirectory(prefix="gpunet-clean-install-")
        yield Path(holder.name)
        holder.cleanup()
    else:
        yield base


@pytest.fixture(scope="module")
def installed(workdir):
    """gpunet installed from a freshly built wheel into a new venv.

    Returns (venv folder, its python, a cwd outside the repository, the environment to run with).
    """
    env = _clean_env()
    outside = workdir / "cwd"
    outside.mkdir()

    # 1. Is the package registry reachable (through pip's own configuration and cache)?
    probe = _run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--retries", "1", "--timeout", "20",
         "--dest", workdir / "probe", "numpy"],
        cwd=outside, env=env, timeout=300,
    )
    if probe.returncode != 0:
        _skip_or_fail(f"the package registry is unreachable (pip download numpy failed):\n{_show(probe)}")

    # 2. Build the wheel from a copy of the source tree, so the build leaves nothing in the repo.
    src = workdir / "src"
    shutil.copytree(ROOT, src, ignore=_not_source)
    dist = workdir / "dist"
    if _installed("build"):
        cmd = [sys.executable, "-m", "build", "--wheel", "--outdir", dist, src]
    else:  # no `build` package: pip builds the wheel (also in an isolated environment)
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", dist, src]
    built = _run(cmd, cwd=outside, env=env, timeout=600)
    assert built.returncode == 0, f"building the wheel failed:\n{_show(built)}"
    wheels = sorted(dist.glob("gpunet-*.whl"))
    assert len(wheels) == 1, f"expected one gpunet wheel in {dist}, found {wheels}\n{_show(built)}"

    # 3. A fresh virtual environment outside the source tree.
    venv = workdir / "venv"
    made = _run([sys.executable, "-m", "venv", venv], cwd=outside, env=env, timeout=300)
    if made.returncode != 0:
        _skip_or_fail(f"cannot create a virtual environment (python -m venv):\n{_show(made)}")
    py = venv / BIN / f"python{EXE}"
    assert py.exists(), f"no interpreter in the new venv: {py}"

    # 4. pip install the wheel (numpy comes from the registry or pip's cache).
    venv_env = _clean_env(venv)
    inst = _run([py, "-m", "pip", "install", wheels[0]], cwd=outside, env=venv_env, timeout=600)
    assert inst.returncode == 0, f"pip install of the wheel failed:\n{_show(inst)}"
    return venv, py, outside, venv_env


def test_import_resolves_inside_the_venv(installed):
    venv, py, cwd, env = installed
    proc = _run([py, "-c", "import gpunet; print(gpunet.__file__); print(gpunet.__version__)"],
                cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, _show(proc)
    where = Path(proc.stdout.splitlines()[0].strip())
    assert _inside(where, venv), f"gpunet was imported from {where}, not from the venv {venv}"
    assert not _inside(where, ROOT), f"gpunet was imported from the source tree: {where}"


def test_gpunet_info(installed):
    venv, _, cwd, env = installed
    exe = venv / BIN / f"gpunet{EXE}"
    assert exe.exists(), f"the wheel installed no `gpunet` command into {venv / BIN}"
    proc = _run([exe, "info"], cwd=cwd, env=env, timeout=300)
    assert proc.returncode == 0, _show(proc)
    # No CuPy in this venv: the `auto` device must be the CPU, and say so.
    assert re.search(r"device\W+cpu", proc.stdout, re.I), f"`gpunet info` names no CPU device\n{_show(proc)}"


def test_python_m_gpunet_help(installed):
    _, py, cwd, env = installed
    proc = _run([py, "-m", "gpunet", "--help"], cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, _show(proc)
    assert "train" in proc.stdout, f"`python -m gpunet --help` does not mention train\n{_show(proc)}"


def test_one_epoch_of_training_from_the_installed_package(installed, mnist_dir, workdir):
    venv, _, cwd, env = installed
    out = workdir / "run"
    proc = _run(
        [venv / BIN / f"gpunet{EXE}", "train", "--data-dir", mnist_dir, "--epochs", "1",
         "--out", out, "--device", "cpu"],
        cwd=cwd, env=env, timeout=600,
    )
    assert proc.returncode == 0, _show(proc)
    metrics_path = out / "metrics.json"
    assert metrics_path.is_file(), f"no {metrics_path}\n{_show(proc)}"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    acc = metrics.get("test_accuracy")
    assert isinstance(acc, (int, float)) and 0.90 <= acc <= 1.0, (
        f"test_accuracy after one epoch: {acc!r} (want >= 0.90)\n{_show(proc)}"
    )
