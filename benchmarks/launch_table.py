"""BENCHMARKS.md's table of GPU launches a step and blocking reads an epoch, written from the counts
of tests/support/launch_counts.py (the source of the tests' budgets), so that it cannot drift.

    python benchmarks/launch_table.py [--check]

The counts come from running ``fit`` on the counting stand-in for CuPy (tests/support/fake_cupy.py;
no GPU, about a minute on a quiet machine). The table goes between the two marker lines of
BENCHMARKS.md (:data:`BEGIN`, :data:`END`); ``--check`` writes nothing and exits 1 when the file's
table is not what the code counts now (tests/unit/test_gpu_launches.py checks the same).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "BENCHMARKS.md"
BEGIN = ("<!-- launch table: written by benchmarks/launch_table.py from "
         "tests/support/launch_counts.py -->")
END = "<!-- end of the launch table -->"


def replace_table(text: str, table: str) -> str:
    """``text`` with what lies between the marker lines replaced by ``table``; a ValueError names a
    missing or misplaced marker."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"BENCHMARKS.md: expected one {BEGIN!r} line, then one {END!r} line")
    head, rest = text.split(BEGIN + "\n", 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + table + END + tail


def current_table(text: str) -> str:
    """The table now between the markers of ``text``."""
    return text.split(BEGIN + "\n", 1)[1].split(END, 1)[0]


def counted_table() -> str:
    """The table as the code counts it now (the fake CuPy put in place; its CUDA sources off)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "support")]
    os.environ["GPUNET_CUDA_CPU"] = "0"  # counts only: the CUDA sources run in the tests
    import launch_counts

    return launch_counts.table(launch_counts.install())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if BENCHMARKS.md's table is stale")
    args = parser.parse_args(argv)
    text = BENCHMARKS.read_text()
    table = counted_table()
    if args.check:
        stale = current_table(text) != table
        print("BENCHMARKS.md's launch table is " + ("stale: run benchmarks/launch_table.py" if stale
                                                     else "what the code counts"))
        return int(stale)
    BENCHMARKS.write_text(replace_table(text, table))
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
