"""The Python blocks of README.md and of the user guide (docs/*.md), found and run as a reader
would run them (used by tests/repo/test_readme.py).

``blocks(text)`` lists one page's blocks; ``pages(root)`` the pages in reading order (README, then
the guide in mkdocs.yml's nav). Run as a script (``python readme_blocks.py REPORT.json MNIST ROOT
PAGE...``, the pages as paths from ROOT), it runs each page's blocks in order in one namespace of
their own (a reader pastes one page at a time), all in the current folder, and writes after each
block a report ``{"PAGE:line": {"status": "ok" | "skipped" | "failed", "detail": ...}}``. The
substitution, the one liberty taken with the text: ``/path/to/mnist`` becomes the folder MNIST. The
files a block names and a reader would have are made beside it first (see ``FILES``). A block that
needs an optional library which is not installed is skipped, saying so;
``<!-- readme-test: skip WHY -->`` on the line above a block skips it.
"""

from __future__ import annotations

import json
import re
import sys
import traceback
from pathlib import Path

FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!-- readme-test: skip (.+?) -->\s*$")
DATA = "/path/to/mnist"
CORE_MODULES = {"gpunet", "numpy"}  # never optional: a block that cannot import them fails


def blocks(text: str) -> list[dict]:
    """Every ```python block: its first line's number (1-based, the fence's), its code, and a skip
    reason from a marker on the line above (or None)."""
    found = []
    for m in FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        above = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(above)
        found.append({"line": line, "code": m.group(1), "skip": skip.group(1) if skip else None})
    return found


# a nav entry of mkdocs.yml: "- Title: page.md" or "- page.md"
NAV_PAGE = re.compile(r"^\s*- .*?([\w./-]+\.md)\s*$")


def pages(root: Path) -> list[str]:
    """README.md, then every page of the guide in the order of mkdocs.yml's nav, as paths from
    ``root``."""
    nav = [
        m.group(1)
        for line in (root / "mkdocs.yml").read_text(encoding="utf-8").splitlines()
        if (m := NAV_PAGE.match(line))
    ]
    return ["README.md"] + [f"docs/{page}" for page in nav]


def _digits(mnist):
    import numpy as np

    from gpunet.data import load_mnist

    _, (x, _) = load_mnist(mnist, download=False, dtype=np.uint8)
    return x[:16].reshape(-1, 28, 28)


def _photo(mnist, path):
    from PIL import Image

    digit = 255 - _digits(mnist)[0]  # dark ink on white paper, as photographed
    Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC).convert("RGB").save(
        path, quality=90
    )


def _model(mnist, path):
    """A small trained MNIST model, as a reader who ran `gpunet train` has one."""
    import gpunet as gn
    from gpunet.data import load_mnist

    (x, y), _ = load_mnist(mnist, download=False)
    net = gn.mlp([784, 32, 10], seed=0)
    gn.fit(net, gn.SoftmaxCrossEntropy(), gn.Momentum(net.parameters(), lr=0.05), x, y, epochs=1)
    net.save(path)


def _onnx(mnist, path):
    import gpunet as gn

    if not Path("model.npz").exists():
        _model(mnist, "model.npz")
    # the model the API page saved, or a trained one
    gn.load("model.npz", device="cpu").to_onnx(path)


# the files the blocks name that a reader would have: made (if absent) before the first block
# naming them
FILES = {
    "model.npz": _model,
    "photo.jpg": _photo,
    "digits.npy": lambda mnist, path: __import__("numpy").save(path, _digits(mnist)),
    "model.onnx": _onnx,
}


def _optional(exc: BaseException) -> str | None:
    """The name of an optional module whose absence ``exc`` reports, else None."""
    if (
        isinstance(exc, ModuleNotFoundError)
        and exc.name
        and exc.name.split(".")[0] not in CORE_MODULES
    ):
        return exc.name
    return None


def run_block(block: dict, mnist: str, namespace: dict, page: str = "README.md") -> dict:
    if block["skip"]:
        return {"status": "skipped", "detail": f"marked in {page}: {block['skip']}"}
    try:
        for name, make in FILES.items():
            if name in block["code"] and not Path(name).exists():
                make(mnist, name)
        code = compile(block["code"].replace(DATA, mnist), f"{page}:{block['line']}", "exec")
        exec(code, namespace)
    except Exception as exc:  # the report says what failed; the test shows it
        missing = _optional(exc)
        if missing:
            return {
                "status": "skipped",
                "detail": f"needs {missing}, an optional library not installed here",
            }
        return {"status": "failed", "detail": traceback.format_exc(limit=-8)}
    return {"status": "ok", "detail": ""}


def main(report_path: str, mnist: str, root: str, *pages: str) -> int:
    """Run the blocks of ``pages`` (paths from the repository folder ``root``), page after page."""
    report = {}
    for page in pages:
        namespace = {"__name__": "__readme__"}  # one page, one reader's session
        for block in blocks((Path(root) / page).read_text(encoding="utf-8")):
            print(f"--- {page}:{block['line']}", flush=True)
            report[f"{page}:{block['line']}"] = run_block(block, mnist, namespace, page)
            # after each block: a crash keeps what ran
            Path(report_path).write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
