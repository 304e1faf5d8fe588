"""Types: mypy checks gpunet/ with pyproject.toml's [tool.mypy] settings and finds no error, and the
package carries the py.typed marker that tells checkers and editors to read its hints (the wheel ships it:
tests/system/test_install.py). mypy is in the test extra; without it this skips, unless GPUNET_REQUIRE_TOOLS=1."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_finds_no_error_in_the_package():
    try:
        import mypy  # noqa: F401
    except ImportError:
        if os.environ.get("GPUNET_REQUIRE_TOOLS") == "1":
            pytest.fail("mypy is not installed (GPUNET_REQUIRE_TOOLS=1; the test extra brings it)")
        pytest.skip("mypy is not installed (pip install -e '.[test]' brings it)")
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-incremental"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.startswith("Success: no issues found"), (
        f"mypy (settings: pyproject.toml [tool.mypy]) found errors; fix them, or annotate where it cannot "
        f"infer:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}")


def test_the_package_has_the_py_typed_marker():
    import tomllib
    assert (ROOT / "gpunet" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["gpunet"]
    assert config["tool"]["mypy"]["files"] == ["gpunet"]
