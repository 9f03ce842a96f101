"""Compile kron_quant for sm_90 without a GPU: registers, spills, shared memory, tensor-core products and the width
of the global stores, per factor shape and code form.

Usage::

    pip install --target /tmp/tri36 triton==3.6.0          # the device's Triton
    python gpu/compile_check_kron.py [--triton /tmp/tri36]  # one line per case; exit 1 if one does not compile

The launch settings are ``kron_quant``'s defaults for the shape (``tokens`` overrides the stacking). A case fails
when it does not compile, spills, asks for more than 227 KB of shared memory, or has no tensor-core product (wgmma;
mma.sync where a product has fewer than 64 rows, as o_proj's unstacked one with R = I). Last, kq_gemm's one-launch
decode linear for o_proj, with R explicit and R = I, and with the residual in its epilogue (as a decoder layer runs
it); for SmolLM2's down_proj, whose [gate | up] input it makes SwiGLU's product of; and for qkv and up/gate with
the RMSNorm in front made by the transform.
"""
from __future__ import annotations

import importlib
import re
import sys
from collections import Counter

import sm90

SMEM_MAX = 227 * 1024

# (label, n1, n2, e4m3 codes, R is the identity, tokens stacked a step or None for the default, [gate | up] input,
#  RMSNorm in front)
CASES = [
    ("qkv/up_gate 64x64 int4", 64, 64, False, False, None, False, False),
    ("qkv/up_gate 64x64 e4m3", 64, 64, True, False, None, False, False),
    ("qkv/up_gate 64x64 int4, RMSNorm fused", 64, 64, False, False, None, False, True),
    ("qkv/up_gate 64x64 e4m3, RMSNorm fused", 64, 64, True, False, None, False, True),
    ("o_proj 32x128 e4m3, R explicit", 32, 128, True, False, None, False, False),
    ("o_proj 32x128 e4m3, R = I", 32, 128, True, True, None, False, False),
    ("o_proj 32x128 int4, R = I", 32, 128, False, True, None, False, False),
    ("SmolLM2 o_proj 9x64 e4m3, R = I", 9, 64, True, True, None, False, False),
    ("SmolLM2 qkv 24x24 e4m3, RMSNorm fused", 24, 24, True, False, None, False, True),
    ("down 112x128 e4m3", 112, 128, True, False, None, False, False),
    ("down 112x128 e4m3, SwiGLU fused (glu)", 112, 128, True, False, None, True, False),
    ("down 112x128 int4, SwiGLU fused (glu)", 112, 128, False, False, None, True, False),
]


def launch(mod, n1: int, n2: int, r_eye: bool, tokens):
    """kron_quant's default settings for n1 × n2 (``default_config``): block sizes, stacking, warps, stages."""
    b1, b2 = mod.padded_factors(n1, n2)
    cfg = mod.default_config(b1, b2, r_eye)
    t = cfg["tokens"] if tokens is None else tokens
    return (dict(BLOCK_N1=b1, BLOCK_N2=b2, BLOCK_J=cfg["block_j"], TOKENS=t),
            dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def compile_kq(triton, r_eye: bool, residual: bool = False, n1: int = 32, n2: int = 128, N: int = 4096,
               glu: bool = False, norm: bool = False):
    """kq_gemm's one-launch decode linear (1 token) at pick_config's tiles: o_proj's 32 × 128 factors, N = 4096 by
    default; residual: the epilogue adds one; glu: the input is [gate | up]; norm: x is RMSNorm'd first."""
    mod = importlib.import_module("flatquant.kernels.w4a4_gemm")
    b1, b2 = importlib.import_module("flatquant.kernels.kron_quant").padded_factors(n1, n2)
    cfg = dict(mod.pick_config(1, N, n1 * n2 // 2, True, False, 132))
    opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
    sig = {"a_ptr": "*u8", "w_ptr": "*u8", "sa_ptr": "*fp32", "za_ptr": "*fp32", "sw_ptr": "*fp32",
           "wsum_ptr": "*fp32", "bias_ptr": "*fp32", "c_ptr": "*fp16", "ws_ptr": "*fp32", "cnt_ptr": "*fp32",
           "M": "i32", "N": "i32", "KH": "i32", "kb_per_split": "i32", "stride_am": "i32", "stride_wn": "i32",
           "stride_cm": "i32", "x_ptr": "*fp16", "l_ptr": "*fp16", "r_ptr": "*fp16", "N1": "i32", "N2": "i32",
           "clip": "fp32", "stride_xm": "i32"}
    if residual:
        sig.update(res_ptr="*fp16", stride_rm="i32")
    if norm:
        sig.update(nw_ptr="*fp32", norm_eps="fp32")
    consts = dict(cfg, ASYM=False, HAS_BIAS=False, EVEN_K=(n1 * n2 // 2) % cfg["BLOCK_KH"] == 0, UNPACK_ASM=True,
                  FP8=False, KQ=True, KQ_N1=b1, KQ_N2=b2, KQ_J=b2, KQ_F32=False, KQ_R_EYE=r_eye, KQ_GLU=glu,
                  HAS_RES=residual, KQ_NORM=norm)
    consts.setdefault("SPLIT_K", 1)
    div16 = [k for k in sig if k.endswith("_ptr")] + ["N", "KH", "stride_am", "stride_wn", "stride_cm", "stride_xm"]
    div16 += [k for k, v in (("N1", n1), ("N2", n2)) if v % 16 == 0] + (["stride_rm"] if residual else [])
    return sm90.compile(triton, mod._w4a4_gemm_kernel, sig, consts, div16, opts)


def main(argv=None) -> int:
    triton = sm90.load(argv, __doc__.split("\n")[0])
    mod = importlib.import_module("flatquant.kernels.kron_quant")
    sig = {"x_ptr": "*fp16", "l_ptr": "*fp16", "r_ptr": "*fp16", "q_ptr": "*u8", "scale_ptr": "*fp32",
           "zero_ptr": "*fp32", "M": "i32", "N1": "i32", "N2": "i32", "clip": "fp32", "stride_xm": "i32",
           "stride_qm": "i32"}
    ok = True
    for label, n1, n2, e4m3, r_eye, tokens, glu, norm in CASES:
        consts, opts = launch(mod, n1, n2, r_eye, tokens)
        consts.update(SYM=True, DOT_F32=False, E4M3=e4m3, R_EYE=r_eye, GLU=glu, NORM=norm)
        case_sig = dict(sig, nw_ptr="*fp32", norm_eps="fp32") if norm else sig
        div16 = ["x_ptr", "l_ptr", "r_ptr", "q_ptr", "scale_ptr", "zero_ptr", "stride_xm", "stride_qm"]
        div16 += [k for k, v in (("N1", n1), ("N2", n2)) if v % 16 == 0]
        div16 += ["nw_ptr"] if norm else []
        got = sm90.attempt(label, lambda: sm90.compile(triton, mod._kron_quant_kernel, case_sig, consts, div16, opts))
        if got is None:
            ok = False
            continue
        compiled, st = got
        ptx = compiled.asm["ptx"]
        wgmma = Counter(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
        # tensor cores either way: wgmma needs 64 rows, so an unstacked narrow L (R = I) takes mma.sync
        mma = Counter(re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))
        shared = compiled.metadata.shared
        good = shared <= SMEM_MAX and bool(wgmma or mma) and st["spills"] in (None, ("0", "0"))
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {label}: {consts} {opts}\n"
              f"    shared {shared / 1024:.1f} KB, registers {st['registers']}, spills {st['spills'] or '?'}, "
              f"wgmma {dict(wgmma)}, mma.sync {dict(mma)}, bar.sync {ptx.count('bar.sync')}\n"
              f"    global stores (vector, width): {sm90.global_widths(ptx, 'st')}")
    kq_cases = [(f"kq_gemm o_proj 1 token, R {'= I' if r_eye else 'explicit'}{', residual' if res else ''}",
                 dict(r_eye=r_eye, residual=res)) for r_eye, res in ((False, False), (True, False), (True, True))]
    kq_cases.append(("kq_gemm SmolLM2 down 1 token (1536 = 32x48), glu + residual",
                     dict(r_eye=False, residual=True, n1=32, n2=48, N=576, glu=True)))
    for label, N in (("qkv", 6144), ("up/gate", 28672)):
        kq_cases.append((f"kq_gemm {label} 1 token (64x64), RMSNorm fused", dict(r_eye=False, n1=64, n2=64, N=N,
                                                                                 norm=True)))
    kq_cases.append(("kq_gemm SmolLM2 qkv 1 token (24x24), RMSNorm fused", dict(r_eye=False, n1=24, n2=24, N=960,
                                                                              norm=True)))
    for label, kw in kq_cases:
        got = sm90.attempt(label, lambda: compile_kq(triton, **kw))
        if got is None:
            ok = False
            continue
        compiled, st = got
        good = st["spills"] in (None, ("0", "0"))
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {label}: shared {compiled.metadata.shared / 1024:.1f} KB, "
              f"registers {st['registers']}, spills {st['spills'] or '?'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
