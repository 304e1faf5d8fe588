"""Imports flow one way (the brief), and only the imports that exist and are intended are allowed.

backend, files and schedules import nothing of gpunet; the core (layers, losses, optimizers,
network) only the backend and each other as the notes stack them, and nothing of the fast path; the
fast path may import the core, never the reverse; the data's files sit on the IDX format; training
sits on the core, the fast path, the data's arrays and rows and the metrics; the train command on
training; explain's record on the core alone and files' strict JSON (the numbers it shows are the
core's own, never a second implementation), its renderers on the record alone, its builder from
plain lists on the network; the pictures beside the data; the web server (serve) above training,
imported only by the command line; the command line on top, imported by nothing.

The packages in ``SPLIT`` (data, explain, commands) are checked module by module (``data.rows``);
any other subpackage (fast) counts as one module.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "gpunet"
CORE = {"layers", "losses", "optimizers", "network"}
ALLOWED = {
    "backend": set(),
    "files": set(),
    "schedules": set(),
    "plots": {"files"},
    "layers": {"backend"},
    "losses": {"backend"},
    "optimizers": {"backend"},
    "network": {
        "backend",
        "layers",
        "files",
        "records",
        "onnx_export",
    },  # to_onnx, loaded when called
    "committee": {"backend", "layers", "network"},  # members joined into one network
    "records": {"layers"},  # the model's and the checkpoint's record schema: the layers' fields
    "onnx_export": {"__init__", "backend", "layers", "files", "training"},
    "sklearn": {"backend", "callbacks", "layers", "losses", "network", "optimizers", "training"},
    "gradcheck": {"backend"},
    "metrics": {"backend"},
    "data": {"data.datasets"},
    "data.idx": {"data", "files"},
    "data.datasets": {"data", "data.arrays", "data.idx"},
    "fast": {"backend", "layers", "losses", "optimizers"},
    "data.arrays": {"backend"},
    "data.rows": {"backend", "fast", "data.arrays"},
    "augment": {"backend", "fast"},
    "checkpoint": {"files", "layers", "records"},
    "callbacks": {"backend", "checkpoint"},
    "training": {
        "backend",
        "fast",
        "data.rows",
        "callbacks",
        "data.arrays",
        "losses",
        "metrics",
        "checkpoint",
        "parallel",
    },
    "parallel": {"backend"},
    "explain": {"explain.record", "explain.render"},
    "explain.record": {"backend", "files", "data.arrays", "layers", "losses", "optimizers"},
    "explain.build": {"layers", "network"},
    "explain.render": {"explain.record"},
    "commands": set(),
    "commands.flags": set(),
    "commands.train": {
        "commands.flags",
        "__init__",
        "augment",
        "backend",
        "checkpoint",
        "fast",
        "files",
        "parallel",
        "plots",
        "callbacks",
        "data",
        "data.rows",
        "data.datasets",
        "layers",
        "losses",
        "network",
        "optimizers",
        "schedules",
        "training",
    },
    "data.pictures": {"data"},
    "predictions": set(),
    "connections": set(),
    "serve": {"backend", "connections", "data", "data.pictures", "predictions", "training"},
}
TOP = {"cli", "__init__", "__main__"}


SPLIT = {"data", "explain", "commands"}  # packages whose modules are checked one by one


def module_name(path: Path) -> str:
    """``data.rows`` for gpunet/data/rows.py, ``data`` for its __init__; ``fast`` for all of
    gpunet/fast."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if len(parts) > 1 and parts[0] in SPLIT:
        return parts[0] if parts[1] == "__init__" else f"{parts[0]}.{parts[1]}"
    return parts[0]


def _key(dotted: list) -> str:
    """The checked module that the dotted name under gpunet (``["data", "rows", "Pixels"]``) lives
    in."""
    if (
        len(dotted) > 1
        and dotted[0] in SPLIT
        and (PACKAGE / dotted[0] / f"{dotted[1]}.py").exists()
    ):
        return f"{dotted[0]}.{dotted[1]}"
    return "__init__" if dotted[0] == "__version__" else dotted[0]


def gpunet_imports(path: Path) -> set:
    """The gpunet modules a file imports (relative or absolute), as ``module_name`` names them,
    itself excepted (so a subpackage counted as one module may import its own parts)."""
    here = module_name(path)
    package = list(
        path.relative_to(PACKAGE).parent.parts
    )  # [] for gpunet/x.py, ["data"] for gpunet/data/x.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level == 0:
                if parts[:1] != ["gpunet"]:
                    continue
                base = parts[1:]
            else:
                base = package[: len(package) - (node.level - 1)] + parts
            found.update(_key(base + [a.name]) if base else _key([a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(
                _key(a.name.split(".")[1:]) for a in node.names if a.name.startswith("gpunet.")
            )
    return found - {here}


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = sorted({module_name(p) for p in FILES})


def test_every_module_has_a_place():
    assert set(MODULES) == set(ALLOWED) | TOP


def test_the_checker_reads_package_relative_imports():
    """The names a moved module's imports resolve to: a sibling (``.arrays``), the package's own
    ``__init__`` (``from . import DataError``), the package above (``..backend``), an absolute
    one."""
    assert gpunet_imports(PACKAGE / "data" / "rows.py") >= {"backend", "fast", "data.arrays"}
    assert gpunet_imports(PACKAGE / "data" / "pictures.py") == {"data"}
    assert gpunet_imports(PACKAGE / "explain" / "render.py") == {"explain.record"}
    assert gpunet_imports(PACKAGE / "fast" / "step.py") == {"backend", "layers", "optimizers"}


@pytest.mark.parametrize(
    "path",
    [p for p in FILES if module_name(p) not in TOP],
    ids=lambda p: str(p.relative_to(PACKAGE)),
)
def test_imports_flow_one_way(path):
    module = module_name(path)
    got = gpunet_imports(path)
    assert got <= ALLOWED[module], (
        f"gpunet/{path.relative_to(PACKAGE)} imports {sorted(got - ALLOWED[module])}"
    )


def test_nothing_imports_the_command_line():
    users = [str(p) for p in FILES if module_name(p) != "__main__" and "cli" in gpunet_imports(p)]
    assert users == []


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_tests_no_type_by_its_name_and_loads_no_fast_code(module):
    """The core's formulas do not branch on class names (``type(x).__name__ == ...``) nor reach for
    fast code (numba, ctypes/BLAS, CUDA kernels), directly or through an import."""
    text = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(text)
    names = [
        n
        for c in ast.walk(tree)
        if isinstance(c, ast.Compare)
        for n in ast.walk(c)
        if isinstance(n, ast.Attribute)
        and n.attr == "__name__"
        and isinstance(n.value, ast.Call)
        and getattr(n.value.func, "id", "") == "type"
    ]
    assert not names, f"gpunet/{module}.py tests a type by its name"
    for word in ("numba", "ctypes", "ElementwiseKernel", "RawKernel", "cblas"):
        assert word not in text, (
            f"gpunet/{module}.py mentions {word}: fast code belongs in gpunet/fast"
        )


def test_only_the_command_line_imports_the_server():
    users = [
        str(p)
        for p in FILES
        if module_name(p) not in ("cli", "serve") and "serve" in gpunet_imports(p)
    ]
    assert users == []
