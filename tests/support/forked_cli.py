"""Run ``gpunet`` command lines cheaply, each in a process of its own with its own measured peak
memory.

Started as a child process by a test (``python tests/support/forked_cli.py``), it imports the
command line once, then reads one JSON request per line from stdin, ``{"argv": [...], "cwd": ...,
"stdout": FILE, "stderr": FILE, "timeout": seconds}``, and forks a process per request that runs
``gpunet.cli.main(argv)`` (what ``python -m gpunet`` runs) with its output in the two files and ends
with main's exit status (1 and the traceback for an exception main let through; killed by SIGALRM
after ``timeout``). The fork is reaped with ``os.wait4``, and one JSON line answers: ``{"status":
exit status or -signal, "peak_kib": the fork's ru_maxrss, "parent_kib": this process's own peak}``.
A fork's ru_maxrss is its own (Linux starts its high-water mark at what it holds after the fork, and
a fork's rusage keeps no earlier peak).

A forked process starts with the parent's anonymous pages counted in its resident set, but not the
pages of mapped files (the interpreter's and NumPy's libraries) until it touches them, so its peak
can be lower than a fresh ``python -m gpunet``'s (33 MB against 50 MB for a refused model file,
measured here). The sum of the two peaks bounds a fresh process's from above, at a fraction of the
start-up cost (a fork takes milliseconds, an interpreter start with NumPy most of a second on CI's
two cores).
"""

import json
import os
import signal
import sys
import traceback

import gpunet.cli


def run_one(request: dict) -> None:
    """In the forked process: run the command line and end with its exit status."""
    code = 1
    try:
        os.chdir(request["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            target = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        signal.alarm(int(request.get("timeout", 60)))
        code = gpunet.cli.main(request["argv"])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # main let it through: the traceback a user would see
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_one(request)
        _, status, usage = os.wait4(pid, 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        print(
            json.dumps({"status": code, "peak_kib": usage.ru_maxrss, "parent_kib": own_peak()}),
            flush=True,
        )


def own_peak() -> int:
    """This process's peak resident set in KiB, its memory's own high-water mark (VmHWM): not
    getrusage's ru_maxrss, which keeps the peak of the process it was forked and exec'd from
    (pytest)."""
    with open("/proc/self/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))


if __name__ == "__main__":
    main()
