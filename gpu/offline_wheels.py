"""Wheels for a GPU machine without network access: what run.py, lm-eval QA and MLflow tracking need there, beside
the CUDA torch/transformers/triton it already has.

    python gpu/offline_wheels.py wheels/ --have their_pip_freeze.txt     # here, where pip reaches PyPI
    pip install --no-index --no-deps --target /tmp/site wheels/*.whl     # there; then PYTHONPATH=/tmp/site

The list is the closure of this environment's installed requirements of TOP, minus the packages named in --have
(one name per line, `pip freeze` output works), each at the version installed here, for CPython 3.12 manylinux
x86_64 (--python-version to change). Packages published only as source are built here with `pip wheel`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata

from packaging.requirements import Requirement

TOP = ["hydra-core", "omegaconf", "gguf", "hydra-joblib-launcher", "lm-eval", "datasets", "evaluate", "mlflow-skinny",
       "sqlalchemy", "alembic", "cryptography"]
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux1_x86_64"]


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(top: list[str], have: set[str], python: str) -> dict[str, str]:
    """{name: version installed here} for top and everything they require, except what `have` names."""
    env = {"python_version": python, "python_full_version": python + ".0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
           "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
    wanted = {norm(t) for t in top}
    seen, out, stack = set(), {}, list(wanted)
    while stack:
        name = stack.pop()
        if name in seen or (name in have and name not in wanted):
            continue
        seen.add(name)
        dist = metadata.distribution(name)  # raises PackageNotFoundError: install it here first
        out[name] = dist.version
        for r in dist.requires or []:
            req = Requirement(r)
            if not req.marker or req.marker.evaluate(env):
                stack.append(norm(req.name))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--have", help="file naming the packages the GPU machine already has")
    ap.add_argument("--python-version", default="3.12")
    args = ap.parse_args()
    have = set()
    if args.have:
        have = {norm(re.split(r"[=<>~ @]", line.strip())[0]) for line in open(args.have) if line.strip()}
    pins = closure(TOP, have, args.python_version)
    plat = [f"--platform={p}" for p in PLATFORMS]
    built = []
    for name, version in sorted(pins.items()):
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              f"--python-version={args.python_version}", "--implementation=cp", *plat,
                              "-d", args.out, f"{name}=={version}"], capture_output=True, text=True)
        if got.returncode != 0:  # published as source only: build a wheel here
            subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", args.out,
                            f"{name}=={version}"], check=True)
            built.append(name)
    print(f"{len(pins)} packages into {args.out} ({', '.join(built) or 'none'} built from source)")


if __name__ == "__main__":
    main()
