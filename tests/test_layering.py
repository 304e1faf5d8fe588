"""Imports flow one way (the brief), and only the imports that exist and are intended are allowed.

backend, files and schedules import nothing of gpunet; the core (layers, losses, optimizers, network) only
the backend and each other as the notes stack them, and nothing of the fast path; the fast path may import
the core, never the reverse; data sits on the IDX format; training sits on the core, the fast path, the
batches and the metrics; the recipe on training; explain's record on the core alone and files' strict JSON
(the numbers it shows are the core's own, never a second implementation), its renderers on the record alone,
its inputs from plain lists on the network; the pictures (images) beside the data; the web server (serve) above training, imported only by the
command line; the command line on top, imported by nothing.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpunet"
CORE = {"layers", "losses", "optimizers", "network"}
ALLOWED = {
    "backend": set(), "files": set(), "schedules": set(), "plots": {"files"},
    "layers": {"backend"}, "losses": {"backend"}, "optimizers": {"backend"},
    "network": {"backend", "layers", "files", "onnx_export"},  # to_onnx, loaded when called
    "onnx_export": {"__init__", "backend", "layers", "files", "training"},
    "sklearn": {"backend", "callbacks", "layers", "losses", "network", "optimizers", "training"},
    "gradcheck": {"backend"}, "metrics": {"backend"},
    "idx": {"files"}, "data": {"idx"},
    "fast": {"backend", "layers", "losses", "optimizers"},
    "inputs": {"backend"},
    "batches": {"backend", "fast", "inputs"},
    "augment": {"backend", "fast"},
    "checkpoint": {"files"},
    "callbacks": {"backend", "checkpoint"},
    "training": {"backend", "fast", "batches", "callbacks", "inputs", "losses", "metrics", "checkpoint", "parallel"},
    "parallel": {"backend"},
    "explain": {"backend", "files", "inputs", "layers", "losses", "optimizers"},
    "explain_inputs": {"layers", "network"},
    "explain_render": {"explain"},
    "recipe": {"__init__", "augment", "backend", "checkpoint", "fast", "files", "parallel", "plots", "batches",
               "callbacks", "data", "layers", "losses", "network", "optimizers", "schedules", "training"},
    "images": {"data"},
    "predictions": set(),
    "serve": {"backend", "data", "images", "predictions", "training"},
}
TOP = {"cli", "__init__", "__main__"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem  # a subpackage counts as one module


def gpunet_imports(path: Path) -> set:
    """The top-level gpunet modules a file imports (relative or absolute), its own subpackage excepted."""
    here, found = module_name(path), set()
    inside = path.parent != PACKAGE
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            if node.level == 0:
                if parts[:1] == ["gpunet"]:
                    found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
            elif node.level - inside == 1:  # relative to the package (from a subpackage: "..")
                found.update([parts[0]] if parts else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gpunet."))
    return {"__init__" if name == "__version__" else name for name in found} - {here}


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = sorted({module_name(p) for p in FILES})


def test_every_module_has_a_place():
    assert set(MODULES) == set(ALLOWED) | TOP


@pytest.mark.parametrize("path", [p for p in FILES if module_name(p) not in TOP], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_one_way(path):
    module = module_name(path)
    got = gpunet_imports(path)
    assert got <= ALLOWED[module], f"gpunet/{path.relative_to(PACKAGE)} imports {sorted(got - ALLOWED[module])}"


def test_nothing_imports_the_command_line():
    users = [str(p) for p in FILES if module_name(p) != "__main__" and "cli" in gpunet_imports(p)]
    assert users == []


@pytest.mark.parametrize("module", sorted(CORE))
def test_the_core_tests_no_type_by_its_name_and_loads_no_fast_code(module):
    """The core's formulas do not branch on class names (``type(x).__name__ == ...``) nor reach for fast code
    (numba, ctypes/BLAS, CUDA kernels), directly or through an import."""
    text = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(text)
    names = [n for c in ast.walk(tree) if isinstance(c, ast.Compare) for n in ast.walk(c)
             if isinstance(n, ast.Attribute) and n.attr == "__name__" and isinstance(n.value, ast.Call)
             and getattr(n.value.func, "id", "") == "type"]
    assert not names, f"gpunet/{module}.py tests a type by its name"
    for word in ("numba", "ctypes", "ElementwiseKernel", "RawKernel", "cblas"):
        assert word not in text, f"gpunet/{module}.py mentions {word}: fast code belongs in gpunet/fast"


def test_only_the_command_line_imports_the_server():
    users = [str(p) for p in FILES if module_name(p) not in ("cli", "serve") and "serve" in gpunet_imports(p)]
    assert users == []
