"""Imports flow one way (the brief): the backend imports nothing of gpunet; kernels only the backend and
the BLAS paths; layers, losses, optimizers and the data wrappers only those; the network only the layers;
training sits above them; the pictures (images) beside the data; the web server (serve) above training;
the command line on top, imported by nothing but ``python -m gpunet``."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpunet"
BASE = {"backend"}
KERNELS = BASE | {"blas", "cpu_kernels", "kernels"}
ALLOWED = {
    "backend": set(), "blas": set(), "cpu_kernels": set(), "data": set(), "plots": set(), "schedules": set(),
    "kernels": BASE | {"blas", "cpu_kernels"},
    "gradcheck": BASE, "metrics": BASE,
    "layers": KERNELS, "losses": KERNELS, "optimizers": KERNELS, "pixels": KERNELS,
    "network": KERNELS | {"layers"},
    "training": KERNELS | {"layers", "network", "losses", "optimizers", "data", "metrics", "pixels"},
    "images": BASE | {"data"},
    # the web server sits beside the command line (only cli imports it), above what it serves with
    "serve": KERNELS | {"layers", "network", "losses", "optimizers", "data", "metrics", "pixels", "training",
                        "images"},
}
TOP = {"cli", "__init__", "__main__"}


def gpunet_imports(path: Path) -> set:
    """The gpunet modules a file imports (relative imports, or absolute ``gpunet.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "gpunet":
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gpunet."))
    return found - {"__version__"}


MODULES = sorted(p.stem for p in PACKAGE.glob("*.py"))


def test_every_module_has_a_place():
    assert set(MODULES) == set(ALLOWED) | TOP


@pytest.mark.parametrize("module", [m for m in MODULES if m not in TOP])
def test_imports_flow_one_way(module):
    got = gpunet_imports(PACKAGE / f"{module}.py")
    assert got <= ALLOWED[module], f"gpunet/{module}.py imports {sorted(got - ALLOWED[module])}"


def test_nothing_imports_the_command_line():
    users = [m for m in MODULES if m != "__main__" and "cli" in gpunet_imports(PACKAGE / f"{m}.py")]
    assert users == []


def test_only_the_command_line_imports_the_server():
    users = [m for m in MODULES if m not in ("cli", "serve") and "serve" in gpunet_imports(PACKAGE / f"{m}.py")]
    assert users == []
