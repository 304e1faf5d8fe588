"""Two source trees of gpunet, old and new, timed by ``ab_epoch.py`` in alternating processes (old,
new, old, new, ...), each process a warm-up epoch and then ``--rounds`` rounds of (the epoch's
products alone, one gpunet epoch). Each process's figure is the median of its rounds' epoch / floor;
each pair's, its new process's over its old one's (next to each other in time, so the machine's drift
mostly cancels). Prints each tree's median figure and the median pair ratio new / old with a 95%
bootstrap interval over the pairs: processes, not rounds, are resampled, because a process's arrays
land in memory once (their alignment, its page placement) and its rounds share that. Computed from
the raw seconds, which ``--json`` keeps.

    python benchmarks/ab_trees.py /tmp/old /work/main --data-dir DIR --pairs 10 --rounds 3

Run it on a quiet machine: the processes run one at a time, but anything else running widens the
spread of both trees alike."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def one_process(tree: Path, data_dir: str, rounds: int) -> dict:
    """``ab_epoch.py`` (this tree's copy) run with ``tree`` first on the import path."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    res = subprocess.run(
        [sys.executable, str(HERE / "ab_epoch.py"), data_dir, str(rounds)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def figures(runs: list) -> np.ndarray:
    """Each process's median epoch / floor over its rounds."""
    return np.array([np.median(np.divide(r["epoch"], r["floor"])) for r in runs])


def interval(pairs: np.ndarray, draws: int = 10_000, seed: int = 0) -> tuple:
    """95% bootstrap interval of the median of the pair ratios."""
    rng = np.random.default_rng(seed)
    lo, hi = np.percentile(np.median(rng.choice(pairs, (draws, pairs.size)), axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--data-dir", default=os.environ.get("GPUNET_DATA"))
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    runs: dict = {"old": [], "new": []}
    start = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    for pair in range(args.pairs):
        for side in ("old", "new"):
            runs[side].append(one_process(getattr(args, side), args.data_dir, args.rounds))
        print(f"pair {pair + 1}/{args.pairs} done", file=sys.stderr)
    old, new = figures(runs["old"]), figures(runs["new"])
    pairs = new / old
    lo, hi = interval(pairs)
    summary = {
        "old": str(args.old),
        "new": str(args.new),
        "started": start,
        "old_median": float(np.median(old)),
        "new_median": float(np.median(new)),
        "new_over_old_paired": float(np.median(pairs)),
        "interval_95": [lo, hi],
        "pairs": int(pairs.size),
        "rounds_a_process": args.rounds,
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({**summary, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
