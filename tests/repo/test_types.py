"""Types: mypy checks gpunet/ with pyproject.toml's [tool.mypy] settings and finds no error, and the
package carries the py.typed marker that tells checkers and editors to read its hints (the wheel
ships it: tests/system/test_install.py). mypy is in the test extra; without it this skips, unless
GPUNET_REQUIRE_TOOLS=1."""

import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fresh_python import run_code

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_finds_no_error_in_the_package():
    try:
        import mypy  # noqa: F401
    except ImportError:
        if os.environ.get("GPUNET_REQUIRE_TOOLS") == "1":
            pytest.fail("mypy is not installed (GPUNET_REQUIRE_TOOLS=1; the test extra brings it)")
        pytest.skip("mypy is not installed (pip install -e '.[test]' brings it)")
    env = {k: v for k, v in os.environ.items() if k != "MYPYPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("Success: no issues found"), (
        f"mypy (settings: pyproject.toml [tool.mypy]) found errors; fix them, or annotate where it "
        f"cannot "
        f"infer:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    )


def test_the_package_has_the_py_typed_marker():
    import tomllib

    assert (ROOT / "gpunet" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["gpunet"]
    assert config["tool"]["mypy"]["files"] == ["gpunet"]


# --- every public function and method carries its hints ------------------------------------------
DUNDERS = {"__init__", "__call__", "__getitem__", "__len__", "__iter__"}  # public ones we define


def _functions_of(owner):
    """``{qualified name: function}`` of a public function, or a class's public methods (inherited
    ones included, properties' getters too) that gpunet defines, not object's or scikit-learn's."""
    if not inspect.isclass(owner):
        return {owner.__qualname__: owner}
    found = {}
    for klass in owner.__mro__:
        if not klass.__module__.startswith("gpunet"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") and name not in DUNDERS:
                continue
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            fn = fn.fget if isinstance(fn, property) else fn
            if inspect.isfunction(fn):
                found.setdefault(f"{owner.__name__}.{name}", fn)
    return found


def _defined_in(module) -> list:
    """The public classes and functions that ``module`` defines (not those it imports)."""
    return [
        v
        for k, v in vars(module).items()
        if not k.startswith("_")
        and (inspect.isclass(v) or inspect.isfunction(v))
        and v.__module__ == module.__name__
    ]


def _public_api():
    """The functions and classes that users call: ``gpunet.__all__`` (a module there: its public
    classes and functions), gpunet.sklearn's estimators, every class and function of callbacks."""
    import gpunet
    from gpunet import callbacks

    owners = []
    for name in gpunet.__all__:
        value = getattr(gpunet, name)
        if inspect.ismodule(value):
            owners += _defined_in(value)
        else:
            owners.append(value)
    owners += _defined_in(callbacks)
    if importlib.util.find_spec("sklearn") is not None:  # optional (the test extra brings it)
        from gpunet.sklearn import MLPClassifier, MLPRegressor

        owners += [MLPClassifier, MLPRegressor]
    functions = {}
    for owner in owners:
        functions.update(_functions_of(owner))
    return functions


def missing_hints(fn) -> list:
    """The parameters of ``fn`` without an annotation (self and cls excepted; ``*args`` and
    ``**kwargs`` too, which may stay bare), and ``"return"`` when the return is not annotated."""
    sig = inspect.signature(fn)
    missing = [
        name
        for i, (name, p) in enumerate(sig.parameters.items())
        if p.annotation is inspect.Parameter.empty
        and not (i == 0 and name in ("self", "cls"))
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    return missing + (["return"] if sig.return_annotation is inspect.Signature.empty else [])


def test_every_public_function_and_method_is_annotated():
    functions = _public_api()
    assert len(functions) > 150, sorted(functions)  # the walk reaches the API (not a vacuous pass)
    must = [
        "fit",
        "Sequential.forward",
        "Checkpoint.on_epoch_end",
        "Callback.state_dict",
        "TensorBoard.load_state_dict",
        "Cosine.__call__",
    ]
    if importlib.util.find_spec("sklearn") is not None:
        must += ["MLPClassifier.fit", "MLPClassifier.__init__", "MLPRegressor.predict"]
    assert not [m for m in must if m not in functions], sorted(functions)
    bare = {name: missing for name, fn in functions.items() if (missing := missing_hints(fn))}
    assert not bare, f"public functions without annotations (parameter names, 'return'): {bare}"


def test_missing_hints_sees_a_bare_parameter_and_return():
    def typed(self, x: int, *args, **kwargs) -> int:
        return x

    def bare(self, x, y: int = 0):
        return x

    assert missing_hints(typed) == []
    assert missing_hints(bare) == ["x", "return"]


def test_the_array_aliases_need_no_cupy_at_run_time():
    """backend's Array, ArrayLike and DTypeLike exist at run time (users may annotate with them),
    and importing gpunet imports no CuPy (the core needs NumPy alone)."""
    code = (
        "import sys, gpunet, gpunet.backend as b; "
        "assert b.Array and b.ArrayLike and b.DTypeLike; "
        "assert 'cupy' not in sys.modules, 'cupy imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GPUNET_DEVICE": "cpu"}
    proc = run_code(code, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
