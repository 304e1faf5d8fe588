"""Print the shell lines of README.md's Quick start block, which .ci/run executes as they stand.

The block is the first ```sh fence after the heading "## Quick start". Comment-only and blank lines are
dropped; everything else is printed verbatim, one command per line, so CI runs exactly what a new user
types (tests/repo/test_quickstart.py checks both sides).
"""
from __future__ import annotations

import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_lines(text: str) -> list[str]:
    """The command lines of the Quick start block in ``text`` (README.md's contents)."""
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == "## quick start")
        fence = next(i for i in range(start + 1, len(lines)) if lines[i].strip() in ("```sh", "```bash", "```shell"))
        end = next(i for i in range(fence + 1, len(lines)) if lines[i].strip() == "```")
    except StopIteration:
        raise SystemExit("README.md: no '## Quick start' heading followed by a ```sh block") from None
    return [line for line in lines[fence + 1:end] if line.strip() and not line.lstrip().startswith("#")]


if __name__ == "__main__":
    sys.stdout.write("".join(line + "\n" for line in quickstart_lines(README.read_text(encoding="utf-8"))))
