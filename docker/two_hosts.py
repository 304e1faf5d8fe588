"""Two containers of one image on one podman (or docker) network: two hosts as far as MPI knows, and
`mpiexec` across them with no ssh (MPICH's Hydra, `-launcher manual`). Standard library only.

    python3 docker/two_hosts.py --data DIR --out DIR [--image gpunet:local] -- COMMAND [ARG...]

runs `mpiexec -launcher manual -hosts A:1,B:1 -n 2 COMMAND...` in container A: Hydra prints one
`HYDRA_LAUNCH: .../hydra_pmi_proxy ... --proxy-id I` line a host, and each goes to its container
with `podman exec`. OUT/a and OUT/b are the two hosts' own /runs (nothing is shared between them but
the network); DATA is mounted read-only on /data in both. tests/system/test_docker_mpi.py trains across
the two with it and compares with one process; docker/README.md ("Several machines") says how the
same works on real hosts. Exit status: mpiexec's; 77 when no container engine works here.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

LIMITS = ["--ulimit", "nofile=1024:4096", "--ulimit", "nproc=4096:4096"]  # as docker/test-image.sh
LAUNCH = re.compile(r"HYDRA_LAUNCH: (\S+ .*--proxy-id (\d+).*?)\s*$")


def _works(cmd: list) -> bool:
    proc = subprocess.run(cmd + ["info"], check=False, capture_output=True, timeout=120)
    return proc.returncode == 0


def engine() -> list | None:
    """podman (with runc where installed: crun refuses hybrid cgroups), else docker; None if none
    works. The same choice as docker/test-image.sh's."""
    if shutil.which("podman"):
        runc = shutil.which("runc")
        cmd = ["podman"] + (["--runtime", runc] if runc else [])
        if _works(cmd):
            return cmd
    if shutil.which("docker") and _works(["docker"]):
        return ["docker"]
    return None


class TwoHosts:
    """Containers ``{tag}-a`` and ``{tag}-b`` (their host names too) of ``image`` on the network
    ``tag``; ``mounts[i]``: host i's `-v` arguments. A context manager: the containers and the
    network are removed on exit, whatever happened."""

    def __init__(self, engine: list, image: str, tag: str, mounts: list):
        self.engine, self.image, self.network = engine, image, tag
        self.hosts = [f"{tag}-a", f"{tag}-b"]
        self.mounts = mounts

    def _must(self, *args) -> None:
        proc = subprocess.run(self.engine + list(args), check=False, capture_output=True, text=True,
                              timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} exited {proc.returncode}: "
                               f"{proc.stderr.strip()}")

    def __enter__(self):
        self._must("network", "create", self.network)
        try:
            for host, mounts in zip(self.hosts, self.mounts):
                self._must("run", "-d", "--rm", *LIMITS, "--network", self.network, "--name", host,
                           "--hostname", host, *mounts, "--entrypoint", "sleep", self.image,
                           "infinity")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for host in self.hosts:  # one at a time: a missing one makes the engine skip the others
            subprocess.run(self.engine + ["rm", "-f", "-t", "0", host], check=False,
                           capture_output=True, timeout=120)
        subprocess.run(self.engine + ["network", "rm", "-f", self.network], check=False,
                       capture_output=True, timeout=120)

    def exec(self, host: int, *cmd, env=(), timeout=300) -> subprocess.CompletedProcess:
        """``cmd`` in host ``host`` (0 or 1), as the image's user; ``env``: ``NAME=value``."""
        args = self.engine + ["exec", *(f"--env={e}" for e in env), self.hosts[host], *cmd]
        return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout)

    def mpiexec(self, *cmd, env=(), timeout=300) -> tuple:
        """``mpiexec -launcher manual -hosts A:1,B:1 -n 2 cmd...`` in host 0, each proxy started in
        its host: ``(status, mpiexec's output, the proxies' output)``. mpiexec passes its
        environment (``env``: ``NAME=value`` strings) on to every rank, as between real hosts."""
        hosts = ",".join(f"{h}:1" for h in self.hosts)
        args = self.engine + ["exec", *(f"--env={e}" for e in env), self.hosts[0], "mpiexec",
                              "-launcher", "manual", "-hosts", hosts, "-n", "2", *cmd]
        mpi = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        proxies, head = [], []
        try:
            for line in mpi.stdout:
                head.append(line)
                if line.startswith("HYDRA_LAUNCH_END"):
                    break
                found = LAUNCH.match(line)
                if found:  # Hydra's own command line, run as it stands in the host it is for
                    host = self.hosts[int(found.group(2))]
                    proxy = self.engine + ["exec", host, *found.group(1).split()]
                    proxies.append(subprocess.Popen(proxy, stdout=subprocess.PIPE,
                                                    stderr=subprocess.STDOUT, text=True))
            rest, _ = mpi.communicate(timeout=timeout)
            said = [p.communicate(timeout=60)[0] for p in proxies]
        finally:
            for p in (mpi, *proxies):
                if p.poll() is None:
                    p.kill()  # the engine's client; what runs in the containers goes with them
        return mpi.returncode, "".join(head) + rest, "".join(said)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="on /data in both, read-only")
    parser.add_argument("--out", required=True, type=Path, help="OUT/a, OUT/b: each host's /runs")
    parser.add_argument("--image", default="gpunet:local")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no COMMAND after --")
    found = engine()
    if found is None:
        print("two_hosts: no container engine works here (podman or docker)", file=sys.stderr)
        return 77
    mounts = []
    for name in ("a", "b"):
        runs = (args.out / name).resolve()
        runs.mkdir(parents=True, exist_ok=True)
        runs.chmod(0o777)  # the image's user (uid 1000) writes there
        mounts.append(["-v", f"{args.data.resolve()}:/data:ro", "-v", f"{runs}:/runs"])
    with TwoHosts(found, args.image, f"gpunet-mpi-{os.getpid()}", mounts) as two:
        status, output, proxies = two.mpiexec(*command)
    sys.stdout.write(output + proxies)
    return status


if __name__ == "__main__":
    sys.exit(main())
