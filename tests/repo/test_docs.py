"""The docs hold to the code: README's formula table points at code that exists (every
`gpunet/x.py`: `Name.attr` it names is found), every link resolves, the site's reference names real
modules and CI builds the site strictly."""

import importlib
import importlib.util
import os
import re
from pathlib import Path

from conftest import ROOT


def table_rows():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("## The formulas and where they live")
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    return [line for line in section.splitlines() if line.startswith("| ") and "gpunet/" in line]


def places(row):
    """``[(module, [names...]), ...]`` from the last cell: each `gpunet/x.py` and the names after
    it."""
    cell = row.rstrip(" |").rsplit("|", 1)[1]
    return [
        (m.group(1), re.findall(r"`([A-Za-z][\w.]*)`", m.group(2)))
        for m in re.finditer(r"`gpunet/(\w+)\.py`:?(.*?)(?=`gpunet/|$)", cell)
    ]


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
                    assert hasattr(obj, part), (
                        f"README names {name} in gpunet/{path}.py, which has no {part}"
                    )
                    obj = getattr(obj, part)
                checked += 1
    assert checked >= 20


def test_formula_table_points_only_at_the_core():
    for row in table_rows():
        place = row.rstrip(" |").rsplit("|", 1)[1]
        for path in re.findall(r"gpunet/([\w/]+)\.py", place):
            assert path in {
                "layers",
                "losses",
                "optimizers",
                "network",
                "training",
                "callbacks",
                "metrics",
            }, row


# --- Links: every relative link of README, the guide and the other top-level pages resolves

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
TOP_PAGES = (
    "README.md",
    "CHANGELOG.md",
    "BENCHMARKS.md",
    "CONTRIBUTING.md",
    "docker/README.md",
    "benchmarks/README.md",
)


def prose(text):
    """``text`` without its fenced blocks and code spans (a link shown as code is no link)."""
    return CODE_SPAN.sub("", FENCED.sub("", text))


def slug(heading):
    """The anchor GitHub and MkDocs give a heading: lower case, punctuation dropped, spaces as
    hyphens."""
    words = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return re.sub(r"[ -]+", "-", words).strip("-")


def anchors(path):
    headings = [
        l.lstrip("#").strip()
        for l in prose(path.read_text(encoding="utf-8")).splitlines()
        if re.match(r"#{1,6} ", l)
    ]
    return {slug(h) for h in headings}


def links(path):
    return [m.group(1) for m in LINK.finditer(prose(path.read_text(encoding="utf-8")))]


def broken_links(path):
    """``path``'s relative links whose file, or whose heading after ``#``, does not exist."""
    bad = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto: and the like: not checked offline
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def test_links_resolve():
    pages = [ROOT / p for p in TOP_PAGES] + sorted((ROOT / "docs").rglob("*.md"))
    bad = {p.relative_to(ROOT).as_posix(): broken_links(p) for p in pages}
    assert not {p: b for p, b in bad.items() if b}
    assert sum(len(links(p)) for p in pages) >= 30  # the check saw the links


def test_guide_links_stay_in_the_guide():
    """A page of the site links only to pages and files of the site (docs/): a link to
    ../BENCHMARKS.md would be a dead link on the web, so the guide names such files as code."""
    docs = (ROOT / "docs").absolute()
    for page in sorted(docs.rglob("*.md")):
        for target in links(page):
            if not re.match(r"[a-z]+:", target) and target.partition("#")[0]:
                # normpath, not resolve: docs/course.ipynb is the site's page even though it is a
                # link to examples/
                dest = Path(os.path.normpath(page.parent / target.partition("#")[0]))
                assert dest.is_relative_to(docs), f"{page.name} links outside docs/: {target}"


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text(
        "# Top\n\n## Some heading\n\n[ok](#some-heading) [x](b.md) [y](#none) `[code](c.md)`\n",
        encoding="utf-8",
    )
    expected = ["b.md: no such file", "#none: no heading #none in a.md"]
    assert broken_links(tmp_path / "a.md") == expected


# --- The site: the reference's modules exist, CI builds it strictly, README stays short


def test_reference_pages_name_modules_that_exist():
    """Each ``::: gpunet.x`` of the API reference names a module that exists (a renamed module
    breaks this fast test, not only CI's site build). Found, not imported: gpunet.sklearn and
    gpunet.onnx_export need their extras to import, and this test runs with NumPy and pytest only
    too."""
    names = [
        m.group(1)
        for page in (ROOT / "docs").rglob("*.md")
        for m in re.finditer(r"^::: ([\w.]+)", page.read_text(encoding="utf-8"), re.M)
    ]
    assert len(names) >= 8
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    assert not missing, f"docs name modules that do not exist: {missing}"


def test_ci_builds_the_site_with_warnings_as_errors():
    import tomllib

    run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    code = [line.split("#")[0] for line in run.splitlines()]
    assert any("mkdocs build --strict" in line for line in code), ".ci/run: no strict site build"
    assert '["docs"]' in run and "$docs_extra" in run, ".ci/run does not install the docs extra"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    docs = " ".join(extras["optional-dependencies"]["docs"])
    assert "mkdocs" in docs and "mkdocstrings" in docs
    assert re.search(r"^strict: true$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines: move details to their docs/ page"


def test_the_site_shows_the_course_notebook():
    """The notebook README links is a page of the site too (mkdocs-jupyter renders it; the docs page
    is a link to examples/, so the two cannot drift)."""
    page = ROOT / "docs" / "course.ipynb"
    assert page.resolve() == (ROOT / "examples" / "backprop_course.ipynb").resolve()
    site = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s+- .*: course\.ipynb$", site, re.M), (
        "the notebook is not in the site's nav"
    )
    assert re.search(r"^  - mkdocs-jupyter:$", site, re.M), "no plugin renders the notebook"
