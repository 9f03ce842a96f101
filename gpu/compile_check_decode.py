"""Compile decode_attention's split kernel for sm_90 without a GPU: registers, spills, tensor-core and barrier counts.

Usage::

    pip install --target /tmp/tri36 triton==3.6.0              # the device's Triton
    python gpu/compile_check_decode.py [--triton /tmp/tri36]    # one line per config; exit 1 if one spills

Each case is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` at LLaMA-3-8B's
head shape (G = 4 query heads per kv head, D = 128) with the wrapper's default tiles (``_decode_config``) unless the
case gives its own. A case passes when ptxas reports no spills (or its label says it spills) and the PTX multiplies
on tensor cores.
"""
from __future__ import annotations

import re
import sys

import sm90

# (label, q dtype, SPLIT, config overrides or "one warp": the tiles the wrapper picks for long decodes)
CASES = [
    ("fp16, split", "fp16", True, {}),
    ("fp16, one pass", "fp16", False, {}),
    ("bf16, split", "bf16", True, {}),
    ("fp32, split (tf32 x3)", "fp32", True, {}),
    ("fp16, 8 warps", "fp16", True, {"num_warps": 8}),
    ("fp16, 3 stages", "fp16", True, {"num_stages": 3}),
    ("fp16, 32 tokens a step", "fp16", True, {"block_n": 32}),
    ("fp16, 32 tokens a step, 2 warps", "fp16", True, {"block_n": 32, "num_warps": 2}),
    ("fp16, 32 tokens a step, 3 stages", "fp16", True, {"block_n": 32, "num_stages": 3}),
    ("fp16, 16 tokens a step (spills 4 bytes since v3; not a default)", "fp16", True, {"block_n": 16}),
    ("fp16, P·V in tf32", "fp16", True, {"pv": "tf32"}),
    ("fp16, 8 warps, 32 tokens a step", "fp16", True, {"num_warps": 8, "block_n": 32}),
    ("fp16, 1 warp, 32 tokens a step (4 bar.sync: no cross-warp row reductions)", "fp16", True,
     {"num_warps": 1, "block_n": 32}),
    ("fp16, long decodes' tiles (kv_cache._ONE_WARP)", "fp16", True, "one warp"),
    ("fp16, long decodes' tiles, one pass", "fp16", False, "one warp"),
    ("bf16, long decodes' tiles", "bf16", True, "one warp"),
    ("fp32 at long decodes' tiles spills 12 bytes (tf32 x3; so fp32 q keeps 4 warps)", "fp32", True, "one warp"),
]


def main(argv=None) -> int:
    triton = sm90.load(argv, __doc__.split("\n")[0])
    from flatquant.kernels import kv_cache as kv

    fn = kv._decode_split_kernel
    ok = True
    for label, qdt, split, over in CASES:
        cfg = kv._decode_config(4, 128, kv._ONE_WARP if over == "one warp" else over)
        sig = {"q_ptr": f"*{qdt}", "kc_ptr": "*u8", "ks_ptr": "*fp32", "kz_ptr": "*fp32", "vc_ptr": "*u8",
               "vs_ptr": "*fp32", "vz_ptr": "*fp32", "len_ptr": "*i32",
               "o_ptr": "*fp32" if split else f"*{qdt}", "m_ptr": "*fp32", "l_ptr": "*fp32",
               **{k: "i32" for k in ("Hkv", "G", "D", "Tmax", "chunk", "n_splits", "sqb", "sqh", "scb", "sch",
                                     "sct", "ssb", "ssh", "sst", "sob", "soh")}, "sm_scale": "fp32"}
        consts = dict(BLOCK_G=cfg["block_g"], BLOCK_N=cfg["block_n"], BLOCK_DH=cfg["block_dh"], SPLIT=split,
                      BF16_RNE=False, QKIND={"fp32": 0, "fp16": 1, "bf16": 2}[qdt],
                      PV_BF16=cfg["pv"] == "bf16", ASM=True)
        div16 = ("q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr", "o_ptr", "m_ptr", "l_ptr", "D",
                 "sqb", "sqh", "scb", "sch", "sct", "ssb", "ssh", "sob", "soh")
        got = sm90.attempt(label, lambda: sm90.compile(triton, fn, sig, consts, div16, {
            "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}))
        if got is None:
            ok = False
            continue
        compiled, st = got
        ptx = compiled.asm["ptx"]
        mma = sorted(set(re.findall(r"(?:wgmma\.mma_async|mma)\.sync\.aligned\.\S+", ptx)))
        good = bool(mma) and (st["spills"] in (None, ("0", "0")) or "spills" in label)
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} {label}: block_n {cfg['block_n']}, {cfg['num_warps']} warps, "
              f"{cfg['num_stages']} stages; registers {st['registers']}, spills {st['spills'] or '?'}, "
              f"shared {compiled.metadata.shared} B, bar.sync {ptx.count('bar.sync')}, shfl {ptx.count('shfl.sync')}"
              f"\n    mma: {', '.join(mma) or 'none'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
