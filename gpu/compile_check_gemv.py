"""Compile the decode GEMV (flatquant/kernels/gemv.py) for sm_90 without a GPU: registers, spills, dp4a count and the
width of the weight loads, at LLaMA-3-8B's decode shapes.

Usage::

    pip install --target /tmp/tri36 triton==3.6.0            # the device's Triton
    python gpu/compile_check_gemv.py [--triton /tmp/tri36]    # one line per case; exit 1 if one fails

A case fails when it does not compile, spills, has no dp4a, or loads the weights narrower than 16 bytes a thread
(ld.global.v4.b32): the kernel's point is to stream them.
"""
from __future__ import annotations

import importlib
import sys

import sm90

# (label, tokens, N, K, asymmetric activations, residual, config overrides)
CASES = [
    ("qkv 1 token", 1, 6144, 4096, False, False, {}),
    ("qkv 1 token, asym", 1, 6144, 4096, True, False, {}),
    ("o_proj 1 token, residual", 1, 4096, 4096, False, True, {}),
    ("up/gate 1 token", 1, 28672, 4096, False, False, {}),
    ("down 1 token, residual", 1, 4096, 14336, False, True, {}),
    ("qkv 4 tokens", 4, 6144, 4096, False, False, {}),
    ("qkv 8 tokens", 8, 6144, 4096, False, False, {}),
    ("qkv 1 token, 128 words a step", 1, 6144, 4096, False, False, {"BLOCK_KW": 128}),
    ("qkv 1 token, 32 channels", 1, 6144, 4096, False, False, {"BLOCK_N": 32}),
]


def main(argv=None) -> int:
    triton = sm90.load(argv, __doc__.split("\n")[0])
    mod = importlib.import_module("flatquant.kernels.gemv")
    ok = True
    for label, M, N, K, asym, res, over in CASES:
        cfg = {**mod.gemv_config(M, N, K // 2, 132), **over}
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        sig = {"a_ptr": "*i32", "w_ptr": "*i32", "sa_ptr": "*fp32", "za_ptr": "*fp32", "sw_ptr": "*fp32",
               "wsum_ptr": "*i32", "bias_ptr": "*fp32", "c_ptr": "*fp16", "M": "i32", "N": "i32", "KW": "i32",
               "stride_am": "i32", "stride_wn": "i32", "stride_cm": "i32"}
        if res:
            sig.update(res_ptr="*fp16", stride_rm="i32")
        KW = K // 8
        consts = dict(cfg, ASYM=asym, HAS_BIAS=False, EVEN_K=KW % cfg["BLOCK_KW"] == 0, ASM=True, HAS_RES=res)
        div16 = [k for k in sig if k.endswith("_ptr")] + ["N", "KW", "stride_am", "stride_wn", "stride_cm"]
        div16 += ["stride_rm"] if res else []
        got = sm90.attempt(label, lambda: sm90.compile(triton, mod._w4a4_gemv_kernel, sig, consts, div16, opts))
        if got is None:
            ok = False
            continue
        compiled, st = got
        ptx = compiled.asm["ptx"]
        loads = sm90.global_widths(ptx, "ld")
        dp4a = ptx.count("dp4a")
        wide = any(k.startswith("v4.") for k in loads)
        good = st["spills"] in (None, ("0", "0")) and dp4a > 0 and wide
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {label}: {consts} {opts}\n"
              f"    shared {compiled.metadata.shared / 1024:.1f} KB, registers {st['registers']}, spills "
              f"{st['spills'] or '?'}, dp4a {dp4a}, bar.sync {ptx.count('bar.sync')}\n"
              f"    global loads (vector, width): {loads}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
