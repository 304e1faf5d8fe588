"""What docker/test-image.sh needs to know about the image's inputs, in one place (standard library only):

    python3 docker/build_inputs.py requirements EXTRAS      the requirements the wheelhouse must hold, one a
                                                            line: gpunet's dependencies, the EXTRAS (comma-
                                                            separated) and its build system, from pyproject.toml
    python3 docker/build_inputs.py pip-target PY GLIBC ARCH  `pip download` options for a base image's Python
                                                            (e.g. 3.11), C library (2.36) and machine (x86_64)
    python3 docker/build_inputs.py digest                   a SHA-256 of the files the image is built from;
                                                            the build records it as the label
                                                            org.gpunet.source, and tests/system/test_docker.py checks
                                                            the image against the checkout with it
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What docker/Dockerfile copies: pyproject.toml, gpunet/ (less .dockerignore's caches) and the smoke script;
# the Dockerfile itself decides how they are put together.
INPUTS = ("pyproject.toml", "docker/Dockerfile", "docker/smoke.sh")
SKIPPED_PARTS = ("__pycache__",)
SKIPPED_SUFFIXES = (".pyc", ".pyo", ".pyd")
# manylinux's older names (PEP 600 gives the glibc version in the name from 2_17 on)
LEGACY_MANYLINUX = {(2, 5): "manylinux1", (2, 12): "manylinux2010", (2, 17): "manylinux2014"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def requirements(extras: str) -> list:
    """Requirement strings: dependencies, each named extra's (an unknown one is an error), build requires."""
    doc = _pyproject()
    known = doc["project"].get("optional-dependencies", {})
    out = list(doc["project"].get("dependencies", []))
    for extra in filter(None, (e.strip() for e in extras.split(","))):
        if extra not in known:
            raise SystemExit(f"build_inputs: extra {extra!r} is not in pyproject.toml (known: {sorted(known)})")
        out += known[extra]
    return out + list(doc.get("build-system", {}).get("requires", []))


def pip_target(python: str, glibc: str, arch: str) -> list:
    """Options making `pip download` choose binary wheels for another interpreter: manylinux tags up to the
    base's glibc (pip does not widen an explicit --platform itself), plus pure-Python wheels."""
    major, minor = (int(p) for p in glibc.split(".")[:2])
    if major != 2:
        raise SystemExit(f"build_inputs: glibc: expected 2.x, got {glibc!r}")
    platforms = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    platforms += [f"{name}_{arch}" for (_, m), name in sorted(LEGACY_MANYLINUX.items(), reverse=True) if m <= minor]
    options = ["--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for platform in platforms:
        options += ["--platform", platform]
    return options


def digest() -> str:
    """SHA-256 over the image's input files (relative path and bytes of each, in sorted order)."""
    files = [ROOT / name for name in INPUTS]
    files += [p for p in (ROOT / "gpunet").rglob("*") if p.is_file()
              and not any(part in SKIPPED_PARTS for part in p.parts) and p.suffix not in SKIPPED_SUFFIXES]
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def main(argv: list) -> int:
    if argv[:1] == ["requirements"] and len(argv) == 2:
        print("\n".join(requirements(argv[1])))
    elif argv[:1] == ["pip-target"] and len(argv) == 4:
        print(" ".join(pip_target(*argv[1:])))
    elif argv == ["digest"]:
        print(digest())
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
