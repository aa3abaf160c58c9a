"""Install the project's dependencies, read from pyproject.toml, before the source is in the image.

The Dockerfile runs this with only pyproject.toml copied in, so the dependency layer is rebuilt
when pyproject.toml changes and never when only the source or the weights do.

The torch that the base image ships (pytorch/pytorch: a CUDA build) is pinned to itself in a
constraints file, so pip either keeps it or fails the build; it can never swap in another build
from PyPI. A base without torch gets one that satisfies pyproject.toml's range.

    python install_deps.py pyproject.toml --extras clip
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

# Binary packages built against the base image's CUDA: kept exactly as the base has them.
BASE_PINNED = ("torch", "torchvision", "torchaudio")
# "name[extra1,extra2] rest": how the project refers to its own extras (dev = "fashion-diffusion[clip,train]").
REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?(.*)$")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(pyproject: dict, extras: list[str]) -> list[str]:
    """The build backend, the runtime dependencies and those of ``extras`` (self-references expanded)."""
    project = pyproject["project"]
    own_name = canonical(project["name"])
    optional = project.get("optional-dependencies", {})
    reqs = list(pyproject.get("build-system", {}).get("requires", []))  # for `pip install --no-build-isolation .`
    reqs += project.get("dependencies", [])
    pending, seen = [e.strip() for e in extras if e.strip()], set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"install_deps: unknown extra {extra!r}; pyproject.toml defines {sorted(optional)}")
        seen.add(extra)
        for req in optional[extra]:
            match = REQUIREMENT.match(req)
            if match and canonical(match.group(1)) == own_name:
                pending += [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
            else:
                reqs.append(req)
    return reqs


def installed(names: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extras", default="", help="comma-separated extras of pyproject.toml to install too")
    args = parser.parse_args(argv)

    reqs = requirements(tomllib.loads(args.pyproject.read_text()), args.extras.split(","))
    base = installed(BASE_PINNED)
    if "torch" in base:
        print(f"install_deps: keeping the base image's {', '.join(f'{k}=={v}' for k, v in base.items())}")
    else:
        print("install_deps: the base image has no torch; pip installs one within pyproject.toml's range")

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as pins:
        pins.write("".join(f"{name}=={version}\n" for name, version in base.items()))
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "-c", pins.name, *reqs]
    print("install_deps:", " ".join(cmd), flush=True)
    try:
        subprocess.run(cmd, check=True)
    finally:
        Path(pins.name).unlink()

    after = installed(BASE_PINNED)
    changed = {k: (v, after.get(k)) for k, v in base.items() if after.get(k) != v}
    if changed:
        raise SystemExit(f"install_deps: pip changed the base image's packages: {changed}")
    print(f"install_deps: done; {', '.join(f'{k} {v}' for k, v in after.items())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
