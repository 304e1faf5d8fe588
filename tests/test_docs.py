"""README's formula table points at code that exists: every `gpunet/x.py`: `Name.attr` it names is found."""
import importlib
import re

from conftest import ROOT


def table_rows():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## The formulas and where they live"):text.index("## Architecture")]
    return [line for line in section.splitlines() if line.startswith("| ") and "gpunet/" in line]


def places(row):
    """``[(module, [names...]), ...]`` from the last cell: each `gpunet/x.py` and the names after it."""
    cell = row.rstrip(" |").rsplit("|", 1)[1]
    return [(m.group(1), re.findall(r"`([A-Za-z][\w.]*)`", m.group(2)))
            for m in re.finditer(r"`gpunet/(\w+)\.py`:?(.*?)(?=`gpunet/|$)", cell)]


def test_formula_table_names_real_core_code():
    rows = table_rows()
    assert len(rows) >= 10
    checked = 0
    for row in rows:
        for path, names in places(row):
            module = importlib.import_module(f"gpunet.{path}")
            for name in names:
                obj = module
                for part in name.split("."):
                    assert hasattr(obj, part), f"README names {name} in gpunet/{path}.py, which has no {part}"
                    obj = getattr(obj, part)
                checked += 1
    assert checked >= 20


def test_formula_table_points_only_at_the_core():
    for row in table_rows():
        place = row.rstrip(" |").rsplit("|", 1)[1]
        for path in re.findall(r"gpunet/([\w/]+)\.py", place):
            assert path in {"layers", "losses", "optimizers", "network", "training", "callbacks", "metrics"}, row
