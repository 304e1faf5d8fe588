"""README's Quick start is what CI runs: two commands (install and train; install the test extra and
run the tests), read out of README.md by .ci/quickstart.py and executed by .ci/run, and the test
extra holds every third-party module the tests import."""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
import sys

import pytest
import tomllib
from conftest import ROOT

# Imported by some tests, yet not in the test extra on purpose: CuPy (a GPU extra; cupyx ships
# inside its wheel) and mpi4py (the mpi extra) are installed by CI as CI-only steps; tomli is the
# fallback for Python < 3.11; packaging has a fallback beside its import; torch (the bench extra,
# PyTorch's CPU build is hundreds of MB) is an oracle whose tests skip with the reason without it.
NOT_IN_TEST_EXTRA = {"cupy", "cupyx", "tomli", "packaging", "mpi4py", "torch"}
MODULE_TO_DIST = {"PIL": "pillow", "sklearn": "scikit-learn"}


def _load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / ".ci" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


quickstart = _load_quickstart()


def readme_lines():
    return quickstart.quickstart_lines((ROOT / "README.md").read_text(encoding="utf-8"))


def commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line joined by ``&&``, as word lists (comments dropped)."""
    return [shlex.split(part, comments=True) for part in line.split("&&")]


def test_readme_opens_with_the_quick_start():
    headings = [
        l
        for l in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
        if l.startswith("## ")
    ]
    assert headings[0].lower() == "## quick start", f"README's first section is {headings[0]!r}"


def test_quick_start_is_two_commands_install_and_train_then_test_extra_and_pytest():
    lines = readme_lines()
    assert len(lines) == 2, f"expected two lines in the Quick start block, got {lines}"
    train, test = (commands(line) for line in lines)
    assert train[0][:2] == ["pip", "install"] and train[-1][:2] == ["gpunet", "train"], train
    assert "--data-dir" not in train[-1], (
        "the Quick start must show the default data setting (download or GPUNET_DATA)"
    )
    extras = [w[2:-1].split(",") for w in test[0] if w.startswith(".[") and w.endswith("]")]
    assert test[0][:2] == ["pip", "install"] and any("test" in e for e in extras), test
    assert test[-1] == ["python", "-m", "pytest"], test


def test_ci_runs_the_readme_lines_and_nothing_else_as_set_up():
    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    code = [l.split("#")[0].strip() for l in run.splitlines()]
    code = [l for l in code if l]
    assert any(".ci/quickstart.py" in l for l in code), ".ci/run does not read README's Quick start"
    assert any(re.match(r"bash\b.*\"\$script\"", l) for l in code), (
        ".ci/run does not execute the Quick start lines"
    )
    # the project itself is installed and its suite run only by the README's lines; after them, a
    # CI-only rerun of named test files under other conditions (the kernels under ASan/UBSan) may
    # follow
    quickstart_at = next(i for i, l in enumerate(code) if re.match(r"bash\b.*\"\$script\"", l))
    for i, line in enumerate(code):
        if "pytest" in line:
            assert i > quickstart_at and re.search(r"pytest\s+tests/\S+\.py", line), (
                f".ci/run runs pytest itself, not after the Quick start on named files: {line!r}"
            )
        assert not re.search(r"pip install[^\n]*\s(-e\s+)?['\"]?\.(\[|\s|$|['\"])", line), (
            f".ci/run installs the project itself: {line!r}"
        )
    for flag in (
        "GPUNET_REQUIRE_DATA",
        "GPUNET_REQUIRE_CUPY",
        "GPUNET_REQUIRE_NUMBA",
        "GPUNET_REQUIRE_TOOLS",
        "GPUNET_REQUIRE_NVRTC",
        "GPUNET_REQUIRE_CONTAINER",
    ):
        assert f"export {flag}=1" in run, f".ci/run no longer sets {flag}=1"
    assert re.search(r"export GPUNET_DATA=.*shared/data/mnist", run), (
        ".ci/run does not point GPUNET_DATA at ../shared"
    )
    # one more CI-only run, after the Quick start: the fast tests with only NumPy and pytest
    # installed
    numpy_only = (ROOT / ".ci" / "numpy-only").read_text(encoding="utf-8")
    assert any(l == ".ci/numpy-only" for l in code[quickstart_at + 1 :]), (
        ".ci/run no longer runs .ci/numpy-only"
    )
    assert re.search(r"pip install --quiet -e \. pytest$", numpy_only, re.M), (
        "numpy-only installs more"
    )
    assert re.search(r'pytest -q -m "not slow"', numpy_only), (
        "numpy-only does not run the fast tests"
    )


def test_the_extractor_refuses_a_readme_without_the_block():
    with pytest.raises(SystemExit, match="Quick start"):
        quickstart.quickstart_lines("# gpunet\n\n## Install\n\n```sh\npip install .\n```\n")
    text = (
        "## Quick start\n\nsome words\n\n```sh\n# a comment\npip install .\n\ngpunet train\n```\n\n"
        "```sh\nnot this\n```\n"
    )
    assert quickstart.quickstart_lines(text) == ["pip install .", "gpunet train"]


def _third_party_test_imports() -> set[str]:
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", ""))
                in ("importorskip", "optional")
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(node.args[0].value.split(".")[0])
    local = {
        p.stem
        for folder in ("tests", "benchmarks", "docker")
        for p in (ROOT / folder).rglob("*.py")
    }
    return {
        m for m in found if m not in sys.stdlib_module_names and m not in local and m != "gpunet"
    }


def test_the_test_extra_holds_what_the_tests_import():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {
        re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower()
        for r in project["optional-dependencies"]["test"] + project["dependencies"]
    }
    missing = {
        m
        for m in _third_party_test_imports() - NOT_IN_TEST_EXTRA
        if MODULE_TO_DIST.get(m, m).lower() not in declared
    }
    assert not missing, f"tests import {sorted(missing)}, which the test extra does not install"
