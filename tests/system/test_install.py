"""The clean install: build an sdist and, from it, a wheel (`python -m build`), check both with
`twine check`, install the wheel into a fresh virtual environment outside the source tree, and use
it from there (`gpunet info`, `gpunet --version`, `python -m gpunet --help`, one epoch on MNIST,
`gpunet serve`'s page from the installed package, the unit tests that need no source tree); the
wheel holds every file of the package (modules, page.html, py.typed) and the licence.

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

ROOT = Path(__file__).resolve().parents[2]
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
        n
        for n in names
        if n in _ANY_LEVEL_JUNK or n.endswith(".egg-info") or (top and n in _TOP_LEVEL_JUNK)
    }


def _installed(dist: str) -> bool:
    """Whether the distribution ``dist`` is installed. Asked of the package metadata, not of
    sys.path, where the ``build/`` folder that ``pip install .`` leaves in the source tree looks
    like a package."""
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
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--retries",
            "1",
            "--timeout",
            "20",
            "--dest",
            workdir / "probe",
            "numpy",
        ],
        cwd=outside,
        env=env,
        timeout=300,
    )
    if probe.returncode != 0:
        _skip_or_fail(
            f"the package registry is unreachable (pip download numpy failed):\n{_show(probe)}"
        )

    # 2. Build the wheel from a copy of the source tree, so the build leaves nothing in the repo.
    src = workdir / "src"
    shutil.copytree(ROOT, src, ignore=_not_source)
    dist = workdir / "dist"
    if _installed(
        "build"
    ):  # the sdist, then the wheel built from it: an incomplete sdist fails here
        cmd = [sys.executable, "-m", "build", "--outdir", dist, src]
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


@pytest.fixture(scope="module")
def dists(installed, workdir):
    """The sdist and the wheel that ``installed`` built."""
    return sorted((workdir / "dist").glob("gpunet-*.tar.gz")), sorted(
        (workdir / "dist").glob("gpunet-*.whl")
    )


def _source_version() -> str:
    text = (ROOT / "gpunet" / "__init__.py").read_text(encoding="utf-8")
    (version,) = re.findall(r'^__version__ = "([^"]+)"$', text, re.M)
    return version


def test_one_version_everywhere(installed, dists):
    """gpunet/__init__.py's __version__ is the one source: the wheel's metadata, the installed
    package and `gpunet --version` say it; pyproject.toml takes it from there instead of writing a
    second one."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" not in project and "version" in project.get("dynamic", []), project.get(
        "version"
    )
    version = _source_version()
    venv, py, cwd, env = installed
    assert dists[1][0].name.startswith(f"gpunet-{version}-"), dists[1]
    proc = _run([venv / BIN / f"gpunet{EXE}", "--version"], cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == f"gpunet {version}", _show(proc)
    proc = _run(
        [py, "-c", "from importlib.metadata import version; print(version('gpunet'))"],
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert proc.stdout.strip() == version, _show(proc)


def test_the_wheel_holds_every_file_of_the_package_and_the_licence(dists):
    """Every file under gpunet/ that git would ship (modules, page.html, py.typed; no caches) is in
    the wheel, and the metadata a package index shows is there: summary, README as the long
    description, the SPDX licence with its file, classifiers."""
    import zipfile

    (wheel,) = dists[1]
    names = set(zipfile.ZipFile(wheel).namelist())
    package = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "gpunet").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so")
    }
    assert {"gpunet/page.html", "gpunet/py.typed"} <= package
    assert package - names == set(), (
        f"files of gpunet/ missing from the wheel: {sorted(package - names)}"
    )
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = zipfile.ZipFile(wheel).read(meta_name).decode()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
    assert "License-Expression: MIT" in meta and "Classifier: Typing :: Typed" in meta
    assert "Description-Content-Type: text/markdown" in meta and "# gpunet" in meta


def test_twine_check_passes_on_the_sdist_and_the_wheel(dists, workdir):
    if not _installed("twine"):
        _skip_or_fail("twine is not installed (the test extra brings it)")
    sdists, wheels = dists
    assert len(sdists) == 1 and len(wheels) == 1, (sdists, wheels)
    proc = _run(
        [sys.executable, "-m", "twine", "check", "--strict", *sdists, *wheels],
        cwd=workdir,
        env=_clean_env(),
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.count("PASSED") == 2, _show(proc)


def test_serve_gives_the_page_from_the_installed_package(installed, workdir):
    """`gpunet serve` from the venv answers GET / with page.html, read from the installed wheel (the
    bytes of the source tree's page)."""
    import http.client

    venv, py, cwd, env = installed
    model = workdir / "serve-model.npz"
    made = _run(
        [py, "-c", f"import gpunet as gn; gn.mlp([784, 8, 10], seed=0).save({str(model)!r})"],
        cwd=cwd,
        env=env,
        timeout=120,
    )
    assert made.returncode == 0, _show(made)
    proc = subprocess.Popen(
        [str(venv / BIN / f"gpunet{EXE}"), "serve", str(model), "--port", "0"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        port = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert port, line + (proc.stderr.read() if proc.poll() is not None else "")
        conn = http.client.HTTPConnection("127.0.0.1", int(port.group(1)), timeout=30)
        conn.request("GET", "/")
        page = conn.getresponse().read()
        conn.close()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert page == (ROOT / "gpunet" / "page.html").read_bytes()


# unit tests that need gpunet and NumPy only (their optional oracles skip), copied out of the source
# tree into one folder, with the support module they import (test_network: a fresh interpreter)
OUTSIDE_TESTS = (
    "conftest.py",
    "support/fresh_python.py",
    "unit/test_layers.py",
    "unit/test_gradients.py",
    "unit/test_network.py",
    "unit/test_callbacks.py",
)


def test_the_unit_tests_pass_against_the_installed_package(installed, workdir):
    venv, py, cwd, env = installed
    inst = _run([py, "-m", "pip", "install", "pytest"], cwd=cwd, env=env, timeout=600)
    if inst.returncode != 0:
        _skip_or_fail(f"cannot install pytest into the venv:\n{_show(inst)}")
    tests = workdir / "tests-outside"
    tests.mkdir()
    for name in OUTSIDE_TESTS:
        shutil.copy(ROOT / "tests" / name, tests / Path(name).name)
    proc = _run(
        [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu and not slow", tests],
        cwd=tests,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, _show(proc)
    where = _run(
        [py, "-c", "import gpunet; print(gpunet.__file__)"], cwd=tests, env=env, timeout=120
    )
    assert _inside(Path(where.stdout.strip()), venv), _show(where)
    assert re.search(r"\d+ passed", proc.stdout), _show(proc)


def test_import_resolves_inside_the_venv(installed):
    venv, py, cwd, env = installed
    proc = _run(
        [py, "-c", "import gpunet; print(gpunet.__file__); print(gpunet.__version__)"],
        cwd=cwd,
        env=env,
        timeout=120,
    )
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
    assert re.search(r"device\W+cpu", proc.stdout, re.I), (
        f"`gpunet info` names no CPU device\n{_show(proc)}"
    )


def test_python_m_gpunet_help(installed):
    _, py, cwd, env = installed
    proc = _run([py, "-m", "gpunet", "--help"], cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, _show(proc)
    assert "train" in proc.stdout, (
        f"`python -m gpunet --help` does not mention train\n{_show(proc)}"
    )


def test_one_epoch_of_training_from_the_installed_package(installed, mnist_dir, workdir):
    venv, _, cwd, env = installed
    out = workdir / "run"
    proc = _run(
        [
            venv / BIN / f"gpunet{EXE}",
            "train",
            "--data-dir",
            mnist_dir,
            "--epochs",
            "1",
            "--out",
            out,
            "--device",
            "cpu",
        ],
        cwd=cwd,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, _show(proc)
    metrics_path = out / "metrics.json"
    assert metrics_path.is_file(), f"no {metrics_path}\n{_show(proc)}"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    acc = metrics.get("test_accuracy")
    assert isinstance(acc, (int, float)) and 0.90 <= acc <= 1.0, (
        f"test_accuracy after one epoch: {acc!r} (want >= 0.90)\n{_show(proc)}"
    )
