"""Compile the W4A4 GEMM's fp8 path for sm_90 without a GPU: PTX evidence (fp8 wgmma), shared memory, registers.

Usage::

    pip install --target /tmp/tri36 triton==3.6.0          # the device's Triton
    python gpu/compile_check_fp8.py [--triton /tmp/tri36]   # one line per config; exit 1 if a check fails

Each config is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and the
divisibility-by-16 attributes the launcher gives sizes and strides (flatquant/kernels/NOTES.md: without them
shared-memory sizes differ from the device's). A config passes when its PTX has e4m3 × e4m3 wgmma (fp8
path) and it asks for at most 227 KB of shared memory.
"""
from __future__ import annotations

import importlib
import re
import sys

import sm90

SMEM_MAX = 227 * 1024

# (label, tokens, N, asym, bias, config or None for pick_config, fp8); K = 4096 (KH = 2048 bytes)
CASES = [
    ("fp8 prefill, signed", 8192, 6144, False, False, None, True),
    ("fp8 prefill, asymmetric + bias", 8192, 6144, True, True, None, True),
    ("fp8 M <= 64 (decode when forced)", 16, 6144, False, False, None, True),
    ("fp8 M <= 64, N >= 16384", 16, 28672, True, False, None, True),
    ("fp8 128x128 KH64 at 4 warps (spills)", 8192, 6144, False, False,
     dict(BLOCK_M=128, BLOCK_N=128, BLOCK_KH=64, GROUP_M=8, num_warps=4, num_stages=4), True),
    ("int8 prefill (for comparison)", 8192, 6144, False, False, None, False),
    ("int8 decode, split-K 4", 1, 4096, True, False,
     dict(BLOCK_M=16, BLOCK_N=64, BLOCK_KH=256, GROUP_M=1, num_warps=4, num_stages=4, SPLIT_K=4), False),
]


def compile_case(mod, triton, tokens, N, asym, bias, config, fp8, KH=2048):
    """Compile one config; returns (compiled, cfg, sm90.compile's stats)."""
    cfg = dict(config or mod.pick_config(tokens, N, KH, True, fp8, 132))
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    split = cfg.setdefault("SPLIT_K", 1)
    sig = {"a_ptr": "*u8", "w_ptr": "*u8", "sa_ptr": "*fp32", "za_ptr": "*fp32", "sw_ptr": "*fp32",
           "wsum_ptr": "*i32" if asym else "*fp32", "bias_ptr": "*fp16" if bias else "*fp32", "c_ptr": "*fp16",
           "ws_ptr": "*i32" if split > 1 else "*fp32", "cnt_ptr": "*i32" if split > 1 else "*fp32",
           "M": "i32", "N": "i32", "KH": "i32", "kb_per_split": "i32", "stride_am": "i32", "stride_wn": "i32",
           "stride_cm": "i32"}
    consts = dict(cfg, ASYM=asym, HAS_BIAS=bias, EVEN_K=KH % cfg["BLOCK_KH"] == 0, UNPACK_ASM=True, FP8=fp8)
    div16 = ("a_ptr", "w_ptr", "sa_ptr", "za_ptr", "sw_ptr", "wsum_ptr", "bias_ptr", "c_ptr", "ws_ptr", "cnt_ptr",
             "N", "KH", "stride_am",
             "stride_wn", "stride_cm")
    compiled, stats = sm90.compile(triton, mod._w4a4_gemm_kernel, sig, consts, div16, opts)
    return compiled, dict(cfg, **opts), stats


def main(argv=None) -> int:
    triton = sm90.load(argv, __doc__.split("\n")[0])
    mod = importlib.import_module("flatquant.kernels.w4a4_gemm")  # the package binds the name to the function
    ok = True
    for label, tokens, N, asym, bias, config, fp8 in CASES:
        got = sm90.attempt(label, lambda: compile_case(mod, triton, tokens, N, asym, bias, config, fp8))
        if got is None:
            ok = False
            continue
        compiled, cfg, st = got
        ptx = compiled.asm["ptx"]
        wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.\S+", ptx)))
        e4m3 = [w for w in wgmma if ".e4m3.e4m3" in w]
        warn = [ln.strip() for ln in st["log"].splitlines() if "warning" in ln.lower() or "serialized" in ln.lower()]
        shared = compiled.metadata.shared
        mma = sorted(set(re.findall(r"mma\.sync\.aligned\.\S+\.s8\S*", ptx)))  # 16-row decode tiles: no wgmma
        good = shared <= SMEM_MAX and (bool(e4m3) if fp8 else bool(wgmma) or (cfg["BLOCK_M"] < 64 and bool(mma)))
        if cfg["SPLIT_K"] > 1:  # the split's partial sums, counter and reset are atomics
            good &= "atom.global.acq_rel" in ptx or "atom.acq_rel.gpu" in ptx or "atom.global.gpu.acq_rel" in ptx
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {label}: {cfg}\n"
              f"    shared {shared} B ({shared / 1024:.1f} KB), registers {st['registers']}, "
              f"spills {st['spills'] or '?'}, fp32 adds {ptx.count('add.f32') + ptx.count('add.rn.f32')}\n"
              f"    wgmma: {', '.join(wgmma) or 'none'}" + (f"; mma.sync: {', '.join(mma)}" if mma else "")
              + "".join(f"\n    ptxas: {w}" for w in warn))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
