"""House rules beside tests/repo/test_style.py's function length, checked with no tool but Python:

* no line of gpunet/ or tests/ is longer than 100 characters (ruff's E501 says the same in CI, but
  ruff forgives a long URL or pragma; this counts every character). The files pyproject.toml's ruff
  section still lets have long lines (``E501`` in ``[tool.ruff.lint.per-file-ignores]``) are the one
  list of exemptions, which may only shrink: a listed file with no long line fails too;
* a test imports a library that is optional for users (anything but the standard library, NumPy,
  pytest, gpunet and the repository's own modules) only once it is known to be there: after
  ``conftest.optional("lib", extra)`` (which skips naming the extra), inside a ``try`` that handles
  its ``ImportError`` (a fallback, or a ``GPUNET_REQUIRE_*`` failure), or CuPy inside a test marked
  ``gpu`` (which the conftest skips without a GPU). A plain ``pytest.importorskip`` of such a
  library is refused too: ``optional`` names the extra that brings it. The helpers of
  tests/support/ and tests/conftest.py are the places that may import them otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
LINE_LIMIT = 100
CORE = {"numpy", "pytest", "gpunet", "conftest", "__future__"}
GPU_ONLY = {"cupy", "cupyx"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def not_yet_reflowed(root=ROOT) -> set[str]:
    """Paths (under root) that pyproject.toml's ruff section still exempts from E501."""
    ruff = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["ruff"]
    table = ruff.get("lint", {}).get("per-file-ignores", {})
    return {path for path, codes in table.items() if "E501" in codes and "*" not in path}


def long_lines(root=ROOT, folders=("gpunet", "tests"), limit=LINE_LIMIT) -> dict[str, list[int]]:
    """``{path under root: [line numbers]}`` of the .py files' lines longer than ``limit``."""
    found = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            lines = path.read_text(encoding="utf-8").splitlines()
            numbers = [i for i, line in enumerate(lines, 1) if len(line) > limit]
            if numbers:
                found[path.relative_to(root).as_posix()] = numbers
    return found


def test_no_line_is_longer_than_100():
    exempt = not_yet_reflowed()
    found = {p: n for p, n in long_lines().items() if p not in exempt}
    assert not found, f"lines over {LINE_LIMIT} characters (path: line numbers): " + "; ".join(
        f"{p}: {', '.join(map(str, n[:10]))}" for p, n in sorted(found.items())
    )


def test_the_long_line_exemptions_are_still_needed():
    stale = sorted(not_yet_reflowed() - set(long_lines()))
    assert not stale, f"no long line left: take these off pyproject.toml's E501 ignores: {stale}"


def test_the_line_check_finds_a_long_line(tmp_path):
    """The checker can fail: a 101-character line is found, a 100-character one is not."""
    (tmp_path / "gpunet").mkdir()
    (tmp_path / "gpunet" / "m.py").write_text("x = 1\n" + "#" * 100 + "\n" + "y" * 101 + "\n")
    assert long_lines(tmp_path, ("gpunet",)) == {"gpunet/m.py": [3]}


def _local_modules(root=ROOT) -> set[str]:
    return {
        p.stem
        for folder in ("tests", "benchmarks", "docker")
        for p in (root / folder).rglob("*.py")
    }


def _is_optional(module: str, local: set[str]) -> bool:
    top = module.split(".")[0]
    return top not in sys.stdlib_module_names and top not in CORE and top not in local


def _guard_module(node):
    """The library an ``optional("lib", ...)`` call makes sure of, or None."""
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "id", getattr(node.func, "attr", None)) == "optional"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value.split(".")[0]
    return None


def _handles_import_error(node: ast.Try) -> bool:
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if handler.type is None or any(getattr(k, "id", None) in IMPORT_ERRORS for k in kinds):
            return True
    return False


def _marked_gpu(node) -> bool:
    return any("gpu" in ast.unparse(d) for d in getattr(node, "decorator_list", []))


def _imports(node):
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [node.module]
    return []


def unguarded_imports(source: str, local: set[str]) -> list[tuple[int, str]]:
    """``[(line, module)]``: imports of optional libraries that nothing before them made sure of."""
    tree = ast.parse(source)
    module_gpu = "pytestmark" in source and "mark.gpu" in source
    # A library once made sure of (optional() or a handled try) may be imported in any function of
    # the file (the fixture that checked it runs first); at module level, only after the check.
    file_guards, module_guards = set(), {}
    for node in ast.walk(tree):
        if _guard_module(node):
            file_guards.add(_guard_module(node))
        if isinstance(node, ast.Try) and _handles_import_error(node):
            for inner in node.body:
                for sub in ast.walk(inner):
                    file_guards |= {m.split(".")[0] for m in _imports(sub)}
    for node in tree.body:
        for sub in ast.walk(node):
            if _guard_module(sub):
                module_guards.setdefault(_guard_module(sub), node.lineno)
    found = [
        (node.lineno, node.args[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", None) == "importorskip"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and _is_optional(str(node.args[0].value), local)
    ]

    def check(node, in_function, gpu):
        for module in _imports(node):
            top = module.split(".")[0]
            if not _is_optional(module, local) or (top in GPU_ONLY and (gpu or module_gpu)):
                continue
            if (
                top in file_guards
                if in_function
                else module_guards.get(top, node.lineno) < node.lineno
            ):
                continue
            found.append((node.lineno, module))

    def visit(nodes, in_function, gpu, in_try):
        for node in nodes:
            gpu_here = gpu or _marked_gpu(node)
            if not in_try:
                check(node, in_function, gpu_here)
            if isinstance(node, ast.Try) and _handles_import_error(node):
                visit(node.body, in_function, gpu_here, True)
                visit(
                    [*node.handlers, *node.orelse, *node.finalbody], in_function, gpu_here, in_try
                )
                continue
            is_function = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(ast.iter_child_nodes(node), in_function or is_function, gpu_here, in_try)

    visit(tree.body, False, False, False)
    return sorted(found)


def _test_files(root=ROOT):
    tests = root / "tests"
    return [
        p
        for p in sorted(tests.rglob("*.py"))
        if "support" not in p.relative_to(tests).parts and p.name != "conftest.py"
    ]


def test_tests_import_optional_libraries_only_through_optional():
    local = _local_modules()
    found = {
        p.relative_to(ROOT).as_posix(): unguarded_imports(p.read_text(encoding="utf-8"), local)
        for p in _test_files()
    }
    found = {p: hits for p, hits in found.items() if hits}
    assert not found, (
        "import these through conftest.optional(module, extra) first (path: line "
        "module): " + "; ".join(f"{p}: {hits}" for p, hits in sorted(found.items()))
    )


def test_the_import_check_finds_an_unguarded_import():
    """The checker can fail: a bare import of scikit-learn or Pillow, at the top or in a test,
    before optional() or with pytest.importorskip, is found; the guarded forms are not."""
    bare = "import numpy as np\nimport sklearn\n\n\ndef test_x():\n    from PIL import Image\n"
    assert unguarded_imports(bare, set()) == [(2, "sklearn"), (6, "PIL")]
    early = "import sklearn.metrics\nfrom conftest import optional\nsk = optional('sklearn', 'x')\n"
    assert unguarded_imports(early, set()) == [(1, "sklearn.metrics")]
    skip = "import pytest\nImage = pytest.importorskip('PIL.Image')\nfrom PIL import ImageDraw\n"
    assert unguarded_imports(skip, set()) == [(2, "PIL.Image"), (3, "PIL")]
    cupy = "def test_y():\n    import cupy\n"
    assert unguarded_imports(cupy, set()) == [(2, "cupy")]
    guarded = (
        "from conftest import optional\nsk = optional('sklearn', 'x')\nfrom sklearn import svm\n"
        "try:\n    import mypy\nexcept ImportError:\n    mypy = None\n\n\n"
        "def test_z():\n    from PIL import Image\n    import mypy.api\n"
        "Image = optional('PIL.Image', 'cli')\n\n\n"
        "@pytest.mark.gpu\ndef test_gpu():\n    import cupy\n"
    )
    assert unguarded_imports(guarded, set()) == []
    assert unguarded_imports("import fake_cupy\nimport json\n", {"fake_cupy"}) == []
