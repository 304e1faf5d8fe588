"""Python code run in a fresh interpreter (this one's, ``sys.executable``): for the tests that need
a process of their own, with nothing imported yet, its own environment or its own failure."""

from __future__ import annotations

import subprocess
import sys


def run_code(
    code: str,
    *args: str,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd=None,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
) -> subprocess.CompletedProcess:
    """``python -c code *args``: the finished process, its output captured as text (or written to
    the files ``stdout`` and ``stderr`` name). ``env`` None is this process's environment; a run
    past ``timeout`` seconds is killed and raises subprocess.TimeoutExpired; a failing exit status
    raises nothing (the tests assert on it)."""
    # no default timeout: each test says how long its child may take
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        stdout=stdout,
        stderr=stderr,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
