"""Compile a Triton kernel for sm_90 on a machine without a GPU (the gpu/compile_check_*.py scripts share this).

    triton = sm90.load(argv, description)           # --triton folder (pip install --target … triton==3.6.0)
    compiled, stats = sm90.compile(triton, fn, sig, consts, div16, options)
    got = sm90.attempt(label, lambda: ...)          # its value, or None after printing FAIL label: error
    sm90.global_widths(ptx, "st")                   # {"v4.b32": 2, "b32": 1, ...}: global stores (or "ld" loads)

``compile`` runs ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` with the divisibility-by-16
attributes the launcher gives the named arguments (flatquant/kernels/NOTES.md: without them shared-memory sizes
differ from the device's) and returns ptxas's register and spill counts with the compiled kernel.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(argv, description: str):
    """Parse --triton, put that Triton and the repository first on sys.path, import it compiled (not interpreted)
    with a fresh kernel cache (a cached kernel prints no ptxas log); returns the triton module."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--triton", default="/tmp/tri36", help="folder holding the pip-installed triton 3.6")
    a = p.parse_args(argv)
    sys.path.insert(0, a.triton)
    sys.path.insert(1, ROOT)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    import triton

    print(f"triton {triton.__version__} from {os.path.dirname(triton.__file__)}; target sm_90")
    return triton


def compile(triton, fn, sig: dict, consts: dict, div16, options: dict):
    """(compiled kernel, {"registers": str, "spills": (stores, loads) or None, "log": ptxas log})."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {**sig, **{k: "constexpr" for k in consts}}
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16}
    triton.knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn, sig, consts, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                                  options=options)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return compiled, {"registers": regs.group(1) if regs else "?", "spills": spill.groups() if spill else None,
                      "log": text}


def global_widths(ptx: str, op: str) -> dict[str, int]:
    """How many global accesses of each vector width and type the PTX has: op "ld" (loads) or "st" (stores) →
    {"v4.b32": n, "b32": m, ...}."""
    found = re.findall(op + r"\.global(?:\.\w+)*?\.(v\d\.)?(b8|b16|b32|b64|u8|u16|u32)", ptx)
    widths: dict[str, int] = {}
    for vec, width in found:
        widths[vec + width] = widths.get(vec + width, 0) + 1
    return widths


def attempt(label: str, build):
    """build()'s value, or None after printing "FAIL label: error" when it raises: in the compile-check scripts
    one case that does not compile must not hide the others."""
    try:
        return build()
    except Exception as e:
        print(f"FAIL {label}: {type(e).__name__}: {str(e)[-800:]}")
        return None
