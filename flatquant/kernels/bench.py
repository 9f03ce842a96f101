"""Check and time the W4A4 kernels at a LLaMA layer's linear shapes, against fp16 in the same run.

Usage::

    python -m flatquant.kernels.bench --check --out results/bench          # check every kernel, then time
    python -m flatquant.kernels.bench --sweep --out $OUT                   # also time tile configs of each kernel
    python -m flatquant.kernels.bench --sweep --sweep-kernels kron --sweep-codes e4m3 --sweep-tokens 8192 --tokens 8192
    python -m flatquant.kernels.bench --only gemm --out $OUT               # GEMMs only: fp16, int8, fp8 (< 1 min)
    python -m flatquant.kernels.bench --only decode --out $OUT             # decode_attention vs fp16 SDPA
    python -m flatquant.kernels.bench --only decode-gemm --out $OUT        # decode GEMM per split of k vs fp16
    python -m flatquant.kernels.bench --only decode-gemm --tokens 16,64    # ... at other token counts
    python -m flatquant.kernels.bench --only decode-gemv --out $OUT        # CUDA-core GEMV vs the decode GEMM
    python -m flatquant.kernels.bench --only decode-tiles --out $OUT       # decode_attention per tile config
    python -m flatquant.kernels.bench --only decode-writes --out $OUT      # q/K/V kernels of a decode step
    python -m flatquant.kernels.bench --only decode-kq --out $OUT          # a decode linear: 1 launch vs 2 vs fp16

    from flatquant.kernels.bench import bench_shapes
    res = bench_shapes(4096, 14336, 32, 8, 128, out_dir="results/bench")

Our linear is timed on the int8 path (kron_quant + w4a4_gemm: ``w4a4_int8_ms``) and, from 16 tokens on a Hopper GPU,
on the fp8 path QuantLinear takes from FP8_MIN_TOKENS tokens (``w4a4_e4m3_ms``, with its parts: ``kron_quant_e4m3_ms``,
``e4m3_weight_ms``, ``scaled_mm_ms``); ``w4a4_ms`` and ``speedup`` are the path QuantLinear takes (``linear_path``).

``w4a4_e4m3_kept_ms`` / ``speedup_e4m3_kept``: the fp8 path with the weights' e4m3 bytes kept (QuantLinear.fp8_weights =
"keep"). o_proj's rows pass R=None, as the model runs its H ⊗ I (``IDENTITY_R``). down_proj's rows also time it with
SwiGLU's product in front, unfused and made by its transform kernel (``_glu_times``).

Timing: medians of the calls replayed from a CUDA graph (``do_bench_cudagraph``), for fp16 and ours alike, so that the
GPU's time is timed and not the host's (which exceeded it at ≤ 16 tokens and, for our several launches, at 2048).
Inputs and weights rotate over enough buffer sets to exceed 3× the L2 cache.
The GEMM is timed on both paths (``gemm_int8_ms``, ``gemm_fp8_ms`` where the GPU runs fp8; ``gemm_ms`` is the
default path's) with the ratios fp8_vs_int8 and fp8_vs_fp16 (fp16 F.linear time / ours).
Writes <out>/<gpu-name>.json and <gpu-name>.md (``--only gemm``: <gpu-name>_gemm.json and .md; ``--only decode``:
_decode_attention; ``--only decode-gemm``: _decode_gemm; ``--only decode-tiles``: _decode_attention_tiles;
``--only decode-writes``: _decode_writes; ``--only decode-kq``: _decode_kq; ``--only decode-gemv``: _decode_gemv).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from flatquant.packing import kron_dims, pack_int4_twos, unpack_int4_twos

from . import qlinear
from .e4m3 import E4M3_UNIT, e4m3_linear, e4m3_weight, scaled_mm_shapes_ok, scaled_mm_supported, scaled_mm_w4a4
from .kron_quant import HAS_TRITON, kron_quant, kron_quant_ref, padded_factors, rms_norm_ref, swiglu_ref
from .qlinear import QuantLinear
from .w4a4_gemm import default_path, fp8_supported, pick_config, w4a4_gemm, w4a4_gemm_ref, weight_sums

if HAS_TRITON:
    import triton
    import triton.testing

DECODE = (1, 4, 16)
PREFILL = (2048, 4096, 8192, 16384)
CHECK_FACTORS = ((64, 64), (64, 80), (64, 128), (86, 128), (108, 128), (112, 128), (128, 224), (24, 24), (32, 48),
                 (32, 128))


def _log(*a):
    print(*a, flush=True)


def layer_linears(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int) -> dict:
    """name → (in, out, (n1, n2)) for the four W4A4 linears of a LLaMA decoder layer. The o_proj
    transform acts on (heads, head_dim), as FlatQuant's heads×heads transform does."""
    return {
        "qkv": (hidden, (num_heads + 2 * num_kv_heads) * head_dim, kron_dims(hidden, allow_prime=True)),
        "o": (num_heads * head_dim, hidden, (num_heads, head_dim)),
        "up_gate": (hidden, 2 * intermediate, kron_dims(hidden, allow_prime=True)),
        "down": (intermediate, hidden, kron_dims(intermediate, allow_prime=True)),
    }


# Linears whose R the model runs as the identity (o_proj: FlatQuant's heads × heads transform H ⊗ I): their rows pass
# R=None, as QuantLinear does.
IDENTITY_R = ("o",)


def _time(fn, sets: list, graph: bool = True) -> float:
    """Median ms of one ``fn(*s)``, rotating over ``sets`` (a CUDA graph replays all sets in turn; graph=False: eager,
    which times the host's launches too)."""
    for s in sets:
        fn(*s)
    torch.cuda.synchronize()
    if graph:
        return triton.testing.do_bench_cudagraph(lambda: [fn(*s) for s in sets], rep=100,
                                                 return_mode="median") / len(sets)
    it = itertools.cycle(sets)
    return triton.testing.do_bench(lambda: fn(*next(it)), warmup=25, rep=200, return_mode="median")


def _n_sets(bytes_per_set: int, l2: int) -> int:
    return int(min(32, max(1, math.ceil(3 * l2 / bytes_per_set))))


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, GB/s counting bytes read plus bytes written."""
    a = torch.randn(2**28, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=25, rep=200, return_mode="median")
    return 2 * a.numel() * 4 / ms / 1e6


def kron_sweep_configs(n1: int, n2: int) -> list[dict]:
    """Launch settings of kron_quant to sweep for n1 × n2 factors: KRON_SWEEP for large ones; for those of at most
    64 × 128 padded values, tokens stacked a step (4 warps only, see KRON_SWEEP), programs an SM and stages."""
    b1, b2 = padded_factors(n1, n2)
    if b1 * b2 > 64 * 128:
        return KRON_SWEEP
    stacks = [t for t in (1, 2, 4) if t * b1 <= 128]
    return ([dict(num_warps=4, ctas_per_sm=c, tokens=t, num_stages=st) for t in stacks for c in (2, 4, 6)
             for st in (2, 3)] + [dict(num_warps=8, ctas_per_sm=c, tokens=1, num_stages=3) for c in (2, 4)])


def _rand_factor(n: int, device) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (q * (1 + 0.1 * torch.rand(n, dtype=torch.float64))).to(device=device, dtype=torch.float16)


def _linear_sets(M: int, K: int, N: int, n1: int, n2: int, l2: int, r_eye: bool = False) -> tuple[list, list]:
    """Rotating input/weight sets for our linear (x, L, R, qw, sw) and for fp16 (x, W); r_eye: R is None."""
    ours_bytes = M * K * 2 + N * K // 2 + M * N * 2
    fp16_bytes = M * K * 2 + N * K * 2 + M * N * 2
    ours, ref = [], []
    for _ in range(_n_sets(ours_bytes, l2)):
        x = torch.randn(M, K, device="cuda", dtype=torch.float16)
        qw = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
        ours.append((x, _rand_factor(n1, "cuda"), None if r_eye else _rand_factor(n2, "cuda"), qw,
                     torch.rand(N, device="cuda") * 1e-2 + 1e-3))
    for _ in range(_n_sets(fp16_bytes, l2)):
        ref.append((torch.randn(M, K, device="cuda", dtype=torch.float16),
                    torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02))
    return ours, ref


def _ours(x, L, R, qw, sw, clip=0.9, kcfg=None, gcfg=None, path="int8"):
    """Our linear with symmetric activations: "int8" kron_quant + w4a4_gemm; "e4m3" as QuantLinear's fp8 path
    (kron_quant's e4m3 codes, e4m3_weight, cuBLAS's fp8 GEMM)."""
    if path == "e4m3":
        return e4m3_linear(x, L, R, clip, qw, sw)
    q, s, _ = kron_quant(x, L, R, clip, True, config=kcfg)
    return w4a4_gemm(q, s, qw, sw, config=gcfg)


def _e4m3_times(r: dict, ours: list, copy_gbs: float) -> None:
    """Time the fp8 path and its three parts on ``ours`` and add them to row ``r`` (tokens, in, out, fp16_ms):
    the whole linear, kron_quant writing e4m3 codes, e4m3_weight, and cuBLAS's GEMM on already-expanded weights."""
    M, K, N = r["tokens"], r["in"], r["out"]
    r["w4a4_e4m3_ms"] = _time(lambda *a: _ours(*a, path="e4m3"), ours)
    r["speedup_e4m3"] = r["fp16_ms"] / r["w4a4_e4m3_ms"]
    r["kron_quant_e4m3_ms"] = _time(lambda x, L, R, *_: kron_quant(x, L, R, 0.9, True, codes="e4m3"), ours)
    r["kron_quant_e4m3_frac_copy"] = (M * K * 3 + M * 4) / r["kron_quant_e4m3_ms"] / 1e6 / copy_gbs
    r["e4m3_weight_ms"] = _time(lambda x, L, R, qw, sw: e4m3_weight(qw), ours)
    r["e4m3_weight_frac_copy"] = (N * K * 3 // 2) / r["e4m3_weight_ms"] / 1e6 / copy_gbs
    msets = [(*kron_quant(s[0], s[1], s[2], 0.9, True, codes="e4m3")[:2], e4m3_weight(s[3]), s[4]) for s in ours]
    r["scaled_mm_ms"] = _time(lambda q, s, w8, sw: scaled_mm_w4a4(q, s, w8, sw, None, torch.float16), msets)
    ksets = [(*s, m[2]) for s, m in zip(ours, msets)]  # QuantLinear.fp8_weights = "keep": no expansion per call
    r["w4a4_e4m3_kept_ms"] = _time(lambda x, L, R, qw, sw, w8: e4m3_linear(x, L, R, 0.9, qw, sw, w8=w8), ksets)
    r["speedup_e4m3_kept"] = r["fp16_ms"] / r["w4a4_e4m3_kept_ms"]
    r["scaled_mm_TOPs"] = 2 * M * N * K / r["scaled_mm_ms"] / 1e9
    r["scaled_mm_vs_fp16"] = r["fp16_ms"] / r["scaled_mm_ms"]


def _glu_times(r: dict, ours: list, ref: list) -> None:
    """down_proj with SwiGLU's product in front, added to row ``r``: fp16 as transformers runs it (F.silu, the
    product, F.linear: ``swiglu_down_fp16_ms``); ours unfused (``fused.silu_mul`` then the linear:
    ``swiglu_down_unfused_ms``) and fused (the linear's transform kernel makes the product from [gate | up],
    ``kron_quant(glu=True)``: ``swiglu_down_ms``), each on the path QuantLinear takes (``linear_path``; e4m3 with the
    weights kept), and kron_quant alone with glu (``kron_quant_glu_ms``). Ratios: ``speedup_swiglu_down`` (fp16 /
    fused) and ``glu_fused_vs_unfused``."""
    from .fused import silu_mul

    M, K = r["tokens"], r["in"]
    e4m3 = r["linear_path"] == "e4m3"
    gus = [torch.randn(M, 2 * K, device="cuda", dtype=torch.float16) for _ in ours]
    sets = [(gu, L, R, qw, sw, e4m3_weight(qw) if e4m3 else None) for gu, (_, L, R, qw, sw) in zip(gus, ours)]

    def linear(x, L, R, qw, sw, w8, glu):
        if e4m3:
            return e4m3_linear(x, L, R, 0.9, qw, sw, w8=w8, glu=glu)
        q, s_, _ = kron_quant(x, L, R, 0.9, True, glu=glu)
        return w4a4_gemm(q, s_, qw, sw)

    rsets = [(torch.randn(M, 2 * K, device="cuda", dtype=torch.float16), w) for _, w in ref]
    r["swiglu_down_fp16_ms"] = _time(lambda gu, w: F.linear(F.silu(gu[:, :K]) * gu[:, K:], w), rsets)
    r["swiglu_down_unfused_ms"] = _time(lambda gu, *a: linear(silu_mul(gu), *a, False), sets)
    r["swiglu_down_ms"] = _time(lambda *a: linear(*a, True), sets)
    r["kron_quant_glu_ms"] = _time(lambda gu, L, R, *_: kron_quant(gu, L, R, 0.9, True, codes="e4m3" if e4m3 else
                                                                   "int4", glu=True), sets)
    r["speedup_swiglu_down"] = r["swiglu_down_fp16_ms"] / r["swiglu_down_ms"]
    r["glu_fused_vs_unfused"] = r["swiglu_down_unfused_ms"] / r["swiglu_down_ms"]
    del gus, sets, rsets


def _gemm_times(r: dict, qsets: list) -> None:
    """Time w4a4_gemm on ``qsets`` on each path the GPU runs and add ms, TOP/s and the ratios to row ``r``
    (which holds tokens, in, out and fp16_ms)."""
    M, K, N = r["tokens"], r["in"], r["out"]
    dev = qsets[0][0].device
    for path in ("int8", "fp8") if fp8_supported(dev) else ("int8",):
        r[f"gemm_{path}_ms"] = _time(lambda q, s, qw, sw, path=path: w4a4_gemm(q, s, qw, sw, path=path), qsets)
        r[f"gemm_{path}_TOPs"] = 2 * M * N * K / r[f"gemm_{path}_ms"] / 1e9
    r["gemm_path"] = default_path(M, dev)
    r["gemm_ms"] = r[f"gemm_{r['gemm_path']}_ms"]
    r["gemm_TOPs"] = r[f"gemm_{r['gemm_path']}_TOPs"]
    r["gemm_weight_GBs"] = (N * K // 2) / r["gemm_ms"] / 1e6
    r["int8_vs_fp16"] = r["fp16_ms"] / r["gemm_int8_ms"]
    if "gemm_fp8_ms" in r:
        r["fp8_vs_int8"] = r["gemm_int8_ms"] / r["gemm_fp8_ms"]
        r["fp8_vs_fp16"] = r["fp16_ms"] / r["gemm_fp8_ms"]


def bench_one(name: str, M: int, K: int, N: int, n1: int, n2: int, l2: int, copy_gbs: float,
              only_gemm: bool = False) -> dict:
    """Times for one linear shape and token count; ms, GB/s and the fp16/ours ratio. only_gemm: the GEMMs
    alone (fp16 F.linear, ours on each path, cuBLAS int8/fp8) on random codes, no kron_quant."""
    ours, ref = _linear_sets(M, K, N, n1, n2, l2, name in IDENTITY_R)
    # every row from a CUDA graph (_time's default): eager, the 2048-token rows timed the host (kernels/NOTES.md)
    r = {"linear": name, "tokens": M, "in": K, "out": N, "kron": [n1, n2], "r_eye": name in IDENTITY_R,
         "timer": "cudagraph"}
    r["fp16_ms"] = _time(lambda x, w: F.linear(x, w), ref)
    r["fp16_TFLOPs"] = 2 * M * N * K / r["fp16_ms"] / 1e9
    if only_gemm:
        qsets = [(torch.randint(0, 256, (M, K // 2), device="cuda", dtype=torch.uint8),
                  torch.rand(M, device="cuda") + 0.1, s[3], s[4]) for s in ours]
    else:
        r["w4a4_int8_ms"] = _time(_ours, ours)
        r["speedup_int8"] = r["fp16_ms"] / r["w4a4_int8_ms"]
        r["linear_path"] = "int8"
        if M >= 16 and scaled_mm_supported(ours[0][0].device) and scaled_mm_shapes_ok(K, N):
            _e4m3_times(r, ours, copy_gbs)
            if 0 < qlinear.FP8_MIN_TOKENS <= M:
                r["linear_path"] = "e4m3"
        r["w4a4_ms"] = r[f"w4a4_{r['linear_path']}_ms"]
        r["speedup"] = r["fp16_ms"] / r["w4a4_ms"]
        r["kron_quant_ms"] = _time(lambda x, L, R, *_: kron_quant(x, L, R, 0.9, True), ours)
        kbytes = M * K * 2 + M * K // 2 + M * 4
        r["kron_quant_GBs"] = kbytes / r["kron_quant_ms"] / 1e6
        r["kron_quant_frac_copy"] = r["kron_quant_GBs"] / copy_gbs
        if name == "down":
            try:
                _glu_times(r, ours, ref)
            except Exception as e:  # new timings must not lose the row's others
                r["glu_error"] = f"{type(e).__name__}: {str(e)[-300:]}"
        qsets = [(*kron_quant(s[0], s[1], s[2], 0.9, True)[:2], s[3], s[4]) for s in ours]
    _gemm_times(r, qsets)
    if M > 16:
        a8 = torch.randint(-8, 8, (M, K), device="cuda", dtype=torch.int8)
        b8 = torch.randint(-8, 8, (N, K), device="cuda", dtype=torch.int8)
        r["int8_cublas_ms"] = _time(lambda a, b: torch._int_mm(a, b.t()), [(a8, b8)], False)
        if fp8_supported(a8.device):
            one = torch.ones((), device="cuda")
            f8 = [(a8.to(torch.float16).to(torch.float8_e4m3fn), b8.to(torch.float16).to(torch.float8_e4m3fn))]
            r["fp8_cublas_ms"] = _time(lambda a, b: torch._scaled_mm(a, b.t(), one, one, out_dtype=torch.bfloat16),
                                       f8, False)
    del ours, ref
    torch.cuda.empty_cache()
    return r


def bench_shapes(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 token_counts=DECODE + PREFILL, out_dir: str = "results/bench", only_gemm: bool = False) -> dict:
    """Time our W4A4 linear (kron_quant + w4a4_gemm) against torch fp16 for each linear of a layer
    (only_gemm: the GEMMs alone, see ``bench_one``).

    Returns {"device", "copy_GBs", "rows": [...]} and writes <out_dir>/<gpu-name>.json and .md
    (<gpu-name>_gemm.json and .md with only_gemm).
    """
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    copy_gbs = copy_bandwidth()
    _log(f"device {props.name}; copy {copy_gbs:.0f} GB/s; L2 {l2 / 2**20:.0f} MiB")
    rows = []
    for name, (K, N, (n1, n2)) in layer_linears(hidden, intermediate, num_heads, num_kv_heads, head_dim).items():
        for M in token_counts:
            try:
                r = bench_one(name, M, K, N, n1, n2, l2, copy_gbs, only_gemm)
            except Exception as e:  # one failing shape must not lose the others
                r = {"linear": name, "tokens": M, "in": K, "out": N, "error": f"{type(e).__name__}: {str(e)[-300:]}"}
            rows.append(r)
            _log(_fmt_row(r))
    res = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
           "copy_GBs": copy_gbs, "shapes": dict(hidden=hidden, intermediate=intermediate, num_heads=num_heads,
                                                num_kv_heads=num_kv_heads, head_dim=head_dim), "rows": rows}
    _write(out_dir, "_gemm" if only_gemm else "", res, markdown_table(res))
    return res


def _write(out_dir: str, suffix: str, res: dict, markdown: str) -> None:
    """<out_dir>/<gpu-name><suffix>.json (res) and .md (markdown)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, torch.cuda.get_device_properties(0).name.replace(" ", "_") + suffix)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)


_COLS = ("linear", "tokens", "in", "out", "fp16_ms", "linear_path", "w4a4_ms", "speedup", "speedup_int8",
         "speedup_e4m3", "speedup_e4m3_kept", "kron_quant_ms", "kron_quant_GBs", "kron_quant_frac_copy", "kron_quant_e4m3_ms",
         "kron_quant_e4m3_frac_copy", "e4m3_weight_ms", "e4m3_weight_frac_copy", "scaled_mm_ms", "scaled_mm_TOPs",
         "scaled_mm_vs_fp16", "gemm_path", "gemm_ms", "gemm_TOPs", "gemm_weight_GBs", "gemm_int8_ms", "gemm_fp8_ms",
         "fp8_vs_int8", "fp8_vs_fp16", "int8_vs_fp16", "int8_cublas_ms", "fp8_cublas_ms", "swiglu_down_fp16_ms",
         "swiglu_down_unfused_ms", "swiglu_down_ms", "kron_quant_glu_ms", "speedup_swiglu_down", "glu_fused_vs_unfused")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v < 10 else f"{v:.0f}"
    return str(v)


def _fmt_row(r: dict) -> str:
    if "error" in r:
        return f"| {r['linear']} | {r['tokens']} | ERROR {r['error']} |"
    return "| " + " | ".join(_fmt(r.get(c, "")) for c in _COLS) + " |"


def markdown_table(res: dict) -> str:
    head = f"# W4A4 linear vs fp16 on {res['device']} (torch {res['torch']}, triton {res['triton']})\n\n"
    head += f"Device-to-device copy: {res['copy_GBs']:.0f} GB/s (read + write). Times are medians in ms.\n\n"
    head += "| " + " | ".join(_COLS) + " |\n|" + "---|" * len(_COLS) + "\n"
    return head + "\n".join(_fmt_row(r) for r in res["rows"]) + "\n"


def _compare_packed(q: torch.Tensor, qr: torch.Tensor, v: torch.Tensor, signed: bool) -> dict:
    """Mismatches between packed outputs; 'unexplained' ones are not within 1e-3 of a rounding boundary."""
    a, b = unpack_int4_twos(q.cpu(), signed), unpack_int4_twos(qr.cpu(), signed)
    mism = a != b
    near = ((v - v.floor()) - 0.5).abs() < 1e-3
    return dict(n=a.numel(), mismatch=int(mism.sum()), unexplained=int((mism & ~near).sum()),
                max_level_diff=int((a - b).abs().max()))


def packed_ok(c: dict) -> bool:
    """Integer outputs agree up to rare 1-level flips, nearly all at rounding boundaries."""
    return c["max_level_diff"] <= 1 and c["mismatch"] <= 1e-3 * c["n"] and c["unexplained"] <= 1e-5 * c["n"]


def check_kron_quant(M: int, n1: int, n2: int, dtype: torch.dtype, sym: bool, device: str = "cuda",
                     config: dict | None = None, codes: str = "int4", r_eye: bool = False) -> dict:
    """Run kron_quant on fresh random data (outlier channels included) against kron_quant_ref.
    Outputs are poisoned (q with 0x00, then 0xFF; scales with NaN): equal runs prove every byte was written.
    codes="e4m3": the one-byte codes, compared as the integers they encode. r_eye: the kernel gets R=None
    (identity, o_proj's head transform) and the reference an explicit identity R."""
    x = torch.randn(M, n1 * n2) * (1 + 20 * (torch.rand(n1 * n2) > 0.99))
    x = x.to(device=device, dtype=dtype)
    L = _rand_factor(n1, device).to(dtype)
    R = torch.eye(n2, device=device, dtype=dtype) if r_eye else _rand_factor(n2, device).to(dtype)
    outs = []
    for poison in (0, 255):
        q = torch.full((M, n1 * n2 // (1 if codes == "e4m3" else 2)), poison, dtype=torch.uint8, device=device)
        s = torch.full((M,), float("nan"), device=device)
        z = None if sym else torch.full((M,), float("nan"), device=device)
        outs.append(kron_quant(x, L, None if r_eye else R, 0.9, sym, out=(q, s, z), config=config, codes=codes))
    (q, s, z), (q2, _, _) = outs
    qr, sr, zr, v = kron_quant_ref(x.cpu(), L.cpu(), R.cpu(), 0.9, sym, return_float=True)
    written = bool(torch.equal(q, q2))
    if codes == "e4m3":  # the integers the bytes encode, packed as the int4 reference is
        q = pack_int4_twos((q.view(torch.float8_e4m3fn).float() / E4M3_UNIT).nan_to_num(99.0).to(torch.int32))
    c = _compare_packed(q, qr, v, sym)
    c["all_written"] = written and not bool(s.isnan().any()) and (z is None or not z.isnan().any())
    c["scale_rel"] = float(((s.cpu() - sr).abs() / sr).max())
    c["zero_diff"] = 0.0 if sym else float((z.cpu() - zr).abs().max())
    # On the GPU the fp32 sums of X_t·R run in another order than on the CPU, so ~1 element per token can
    # round to the neighbouring fp16 value: max|y|, hence the scale, moves by up to ~1e-4 relative.
    c["ok"] = packed_ok(c) and c["all_written"] and c["scale_rel"] < 1e-3 and c["zero_diff"] <= 1
    return c


def check_gemm(M: int, N: int, K: int, asym: bool, bias: bool, device: str = "cuda",
               out_dtype=torch.float16, config: dict | None = None, path: str | None = None) -> dict:
    """w4a4_gemm (``path``: "int8", "fp8" or the default) on fresh random packed data against the float64
    reference; output poisoned with NaN."""
    lo, hi = (0, 16) if asym else (-8, 8)
    qa = pack_int4_twos(torch.randint(lo, hi, (M, K))).to(device)
    qw = pack_int4_twos(torch.randint(-8, 8, (N, K))).to(device)
    sa = (torch.rand(M) + 0.1).to(device)
    sw = (torch.rand(N) * 1e-2 + 1e-3).to(device)
    za = torch.randint(0, 16, (M,)).float().to(device) if asym else None
    b = torch.randn(N).to(device) if bias else None
    out = torch.full((M, N), float("nan"), dtype=out_dtype, device=device)
    y = w4a4_gemm(qa, sa, qw, sw, za, weight_sums(qw) if asym else None, b, out_dtype, out=out, config=config,
                  path=path)
    ref = w4a4_gemm_ref(qa.cpu(), sa.cpu(), qw.cpu(), sw.cpu(), None if za is None else za.cpu(),
                        None if b is None else b.cpu(), torch.float64)
    rel = float((y.cpu().double() - ref).norm() / ref.norm())
    tol = 1e-3 if out_dtype == torch.float16 else 8e-3  # output rounding: 2^-11 (fp16), 2^-8 (bf16)
    return dict(rel=rel, all_written=not bool(y.isnan().any()), ok=rel < tol and not bool(y.isnan().any()))


def check_kron_quant_fused(M: int, n1: int, n2: int, dtype: torch.dtype, sym: bool, device: str = "cuda",
                           codes: str = "int4", config: dict | None = None, fused: str = "glu") -> dict:
    """kron_quant with what it fuses in front against the kernel that ran before it, then kron_quant, on fresh data.
    fused="glu": [gate | up] rows against ``fused.silu_mul``; the same kernel code makes SwiGLU's product in both
    (``_swiglu``), so the outputs must be equal bit for bit. fused="norm": a residual stream against
    ``fused.rms_norm``; the sums of squares run in another order, so a normalised value may differ in its last bit
    and a code on a rounding boundary take its neighbour: at most 1e-3 of the codes, one level apart, scales within
    1e-3. Outputs poisoned as in ``check_kron_quant``: both runs equal proves every byte was written."""
    from .fused import rms_norm, silu_mul

    if fused not in ("glu", "norm"):
        raise ValueError(f"fused must be 'glu' or 'norm', got {fused!r}")
    glu = fused == "glu"
    K = n1 * n2
    x = (torch.randn(M, 2 * K if glu else K) * 2).to(device=device, dtype=dtype)
    w = (torch.rand(K) + 0.5).to(device)
    L, R = _rand_factor(n1, device).to(dtype), _rand_factor(n2, device).to(dtype)
    kw = {"glu": True} if glu else {"norm": (w, 1e-5)}
    want = kron_quant(silu_mul(x) if glu else rms_norm(x, w, 1e-5), L, R, 0.9, sym, config=config, codes=codes)
    outs = []
    for poison in (0, 255):
        q = torch.full_like(want[0], poison)
        s = torch.full((M,), float("nan"), device=device)
        z = None if sym else torch.full((M,), float("nan"), device=device)
        outs.append(kron_quant(x, L, R, 0.9, sym, out=(q, s, z), config=config, codes=codes, **kw))
    (q, s, z), (q2, _, _) = outs
    written = bool(torch.equal(q, q2)) and not bool(s.isnan().any())
    if codes == "e4m3":  # the integers the bytes encode
        ints = [(t.view(torch.float8_e4m3fn).float() / E4M3_UNIT).to(torch.int32) for t in (q, want[0])]
    else:
        ints = [unpack_int4_twos(t.cpu(), sym).to(torch.int32) for t in (q, want[0])]
    diff = (ints[0].cpu() - ints[1].cpu()).abs()
    c = dict(equal=all(torch.equal(a, b) for a, b in zip((q, s), want[:2])) and (sym or torch.equal(z, want[2])),
             all_written=written, code_flips=float((diff > 0).float().mean()), max_level_diff=int(diff.max()),
             scale_rel=float(((s - want[1]).abs() / want[1]).max()))
    if glu:
        c["ok"] = c["equal"] and written
    else:
        c["ok"] = written and c["code_flips"] <= 1e-3 and c["max_level_diff"] <= 1 and c["scale_rel"] < 1e-3
    return c


def check_qlinear(M: int, K: int, N: int, sym: bool, device: str = "cuda", glu: bool = False,
                  residual: bool = False, norm: bool = False) -> dict:
    """QuantLinear's kernel path against its own fp32 torch path on the same module; glu: its input is [gate | up]
    (``QuantLinear.glu``); residual: forward adds a random (M, N) fp16 residual; norm: forward RMSNorms x first."""
    n1, n2 = kron_dims(K, allow_prime=True)
    w = torch.randn(N, K) * 0.02
    layer = QuantLinear.from_float(w, L=_rand_factor(n1, "cpu").float(), R=_rand_factor(n2, "cpu").float(),
                                   act_clip=0.95, act_sym=sym, bias=torch.randn(N) * 0.1, glu=glu).to(device)
    x = torch.randn(M, 2 * K if glu else K, device=device, dtype=torch.float16)
    res = torch.randn(M, N, device=device, dtype=torch.float16) if residual else None
    nrm = ((torch.rand(K, device=device) + 0.5), 1e-5) if norm else None
    y, yt = layer(x, residual=res, norm=nrm).double(), layer.forward_torch(x, res, nrm).double()
    if res is not None:  # compared without it (it would flatter the ratios)
        y, yt = y - res.double(), yt - res.double()
    xin = swiglu_ref(x) if glu else x
    xin = rms_norm_ref(xin, *nrm) if norm else xin
    full = (xin.double() @ torch.kron(layer.L, layer.R).double() @ w.to(device).double().T + layer.bias.double())
    rel = float((y - yt).norm() / yt.norm())
    # The kernel rounds X_t·R to fp16, which flips ~0.1% of activation levels by one: small next to the
    # quantization error itself, which is what this ratio compares against.
    noise = float((y - yt).norm() / (yt - full).norm())
    return dict(rel=rel, vs_quant_noise=noise, ok=noise < 0.1 and not bool(y.isnan().any()))


def run_checks(device: str = "cuda") -> bool:
    """Every kernel on fresh random data; prints one line per case; True if all pass."""
    cases = []
    for (n1, n2) in CHECK_FACTORS:
        for sym in (True, False):
            cases.append((f"kron_quant {n1}x{n2} fp16 sym={sym}", check_kron_quant, (1003, n1, n2, torch.float16, sym)))
    for (n1, n2) in ((64, 64), (112, 128), (24, 24)):
        cases.append((f"kron_quant {n1}x{n2} bf16 sym=True", check_kron_quant, (517, n1, n2, torch.bfloat16, True)))
    for cfg in KRON_SWEEP[1:]:
        cases.append((f"kron_quant 112x128 asym {cfg}", check_kron_quant,
                      (1001, 112, 128, torch.float16, False, device, cfg)))
    for (n1, n2) in ((64, 64), (32, 128), (112, 128), (24, 24)):
        cases.append((f"kron_quant {n1}x{n2} fp16 e4m3 codes", check_kron_quant,
                      (1003, n1, n2, torch.float16, True, device, None, "e4m3")))
    for path in ("int8", "fp8") if fp8_supported(torch.device(device)) else ("int8",):
        for M in (1, 7, 16, 300, 2048):
            for (N, K) in ((4096, 4096), (1000, 1600), (512, 14336)):
                for asym in (False, True):
                    cases.append((f"w4a4_gemm {path} M={M} N={N} K={K} asym={asym}", check_gemm,
                                  (M, N, K, asym, asym, device, torch.float16, None, path)))
    cases.append(("w4a4_gemm bf16 out M=333 N=640 K=4096", check_gemm, (333, 640, 4096, False, True, device,
                                                                        torch.bfloat16)))
    for M, sym in ((5, True), (257, True), (257, False)):
        cases.append((f"QuantLinear M={M} K=4096 N=1024 sym={sym}", check_qlinear, (M, 4096, 1024, sym)))
    for (n1, n2), codes in itertools.product(((112, 128), (64, 64)), ("int4", "e4m3")):
        for M in (1, 1003):
            cases.append((f"kron_quant {n1}x{n2} glu {codes} M={M}", check_kron_quant_fused,
                          (M, n1, n2, torch.float16, True, device, codes)))
    for codes, M in itertools.product(("int4", "e4m3"), (1, 1003)):
        cases.append((f"kron_quant 64x64 RMSNorm {codes} M={M}", check_kron_quant_fused,
                      (M, 64, 64, torch.float16, True, device, codes, None, "norm")))
    for M in (1, 16, 600):  # one launch (kq_gemm), kron_quant + int8 GEMM, the fp8 path (from FP8_MIN_TOKENS)
        cases.append((f"QuantLinear down glu+residual M={M} K=14336 N=4096", check_qlinear,
                      (M, 14336, 4096, True, device, True, True)))
        cases.append((f"QuantLinear qkv RMSNorm M={M} K=4096 N=6144", check_qlinear,
                      (M, 4096, 6144, True, device, False, False, True)))
    ok = True
    for name, fn, args in cases:
        torch.manual_seed(hash(name) % 2**31)
        try:
            r = fn(*args)
        except Exception as e:
            r = dict(ok=False, error=f"{type(e).__name__}: {str(e)[-600:]}")
        ok &= r["ok"]
        _log(f"{'PASS' if r['ok'] else 'FAIL'} {name} {r}")
    return ok


def _g(bm, bn, bk, w, st, gm=8, **kw):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_KH=bk, GROUP_M=gm, num_warps=w, num_stages=st, **kw)


GEMM_SWEEP = {
    "prefill": [_g(128, 128, 64, 4, 4), _g(128, 128, 64, 4, 5), _g(128, 128, 64, 4, 3), _g(256, 128, 64, 8, 4),
                _g(128, 128, 128, 4, 3), _g(128, 128, 64, 4, 4, gm=16), _g(256, 128, 64, 8, 3)],
    "prefill_fp8": [_g(128, 128, 128, 8, 3), _g(128, 128, 128, 8, 4), _g(128, 128, 64, 8, 3), _g(128, 64, 128, 4, 3),
                    _g(64, 128, 128, 4, 4)],
    "decode": [_g(16, 64, 128, 4, 4, gm=1), _g(16, 64, 256, 4, 4, gm=1), _g(16, 128, 128, 4, 4, gm=1),
               _g(16, 64, 128, 4, 6, gm=1), _g(16, 32, 256, 4, 4, gm=1), _g(16, 64, 128, 8, 4, gm=1),
               _g(16, 32, 128, 4, 6, gm=1)],
}
# tokens > 1 only with 4 warps: 32x128 with tokens=2 and 8 warps gave wrong output on the H100 (NOTES.md).
KRON_SWEEP = [dict(num_warps=w, ctas_per_sm=c, tokens=t, num_stages=s)
              for (w, c, t, s) in ((8, 2, 1, 3), (8, 2, 1, 1), (8, 4, 1, 1), (4, 2, 1, 1), (4, 4, 1, 1))]
# 112 × 128 at 8 warps takes 140 registers a thread (sm_90, Triton 3.6): one program an SM, whose serial chain nothing
# overlaps. Capped at 128 (no spills at one stage, 96 KB of shared memory) two fit an SM.
KRON_SWEEP += [dict(num_warps=8, ctas_per_sm=2, tokens=1, num_stages=1, maxnreg=128),
               dict(num_warps=8, ctas_per_sm=4, tokens=1, num_stages=1, maxnreg=128)]


def _sweep_one(kind: str, name: str, M: int, cfg: dict, fn, sets, flops_or_bytes: float) -> dict:
    try:
        ms = _time(fn, sets, True)
    except Exception as e:  # a config that does not fit (shared memory) must not stop the sweep
        ms = float("nan")
        _log(f"sweep {kind} {name} M={M} {cfg} failed: {type(e).__name__}: {str(e)[-200:]}")
    unit = "TOP/s" if kind == "gemm" else "GB/s"
    scale = 1e9 if kind == "gemm" else 1e6
    _log(f"sweep {kind} {name} M={M} {cfg} {ms:.4f} ms {flops_or_bytes / ms / scale:.0f} {unit}")
    return dict(kernel=kind, linear=name, tokens=M, cfg=cfg, ms=ms)


def sweep(linears: dict, l2: int, tokens=(1, 8192), budget_s: float = 200.0, kernels=("gemm", "kron"),
          codes=("int4",)) -> list:
    """Time each tile config of w4a4_gemm, and launch settings of kron_quant (``kron_sweep_configs``, for each of
    ``codes``; each config first checked against the reference: row key ``ok``), per shape, until ``budget_s`` has
    passed. Returns rows."""
    rows, t0 = [], time.time()
    for name, (K, N, (n1, n2)) in linears.items():
        for M in tokens:
            if time.time() - t0 > budget_s:
                _log(f"sweep: budget spent, skipping {name} M={M}")
                continue
            r_eye = name in IDENTITY_R
            ours, _ = _linear_sets(M, K, N, n1, n2, l2, r_eye)
            if "gemm" in kernels:
                qsets = [(*kron_quant(s[0], s[1], s[2], 0.9, True)[:2], s[3], s[4]) for s in ours]
                lists = [("int8", "decode" if M <= 16 else "prefill")]
                if M > 16 and fp8_supported(qsets[0][0].device):
                    lists.append(("fp8", "prefill_fp8"))
                for path, key in lists:
                    for cfg in GEMM_SWEEP[key]:
                        fn = lambda q, s, qw, sw, cfg=cfg, path=path: w4a4_gemm(q, s, qw, sw, config=cfg, path=path)
                        rows.append(_sweep_one("gemm", f"{name} {path}", M, cfg, fn, qsets, 2 * M * N * K))
                del qsets
            if "kron" in kernels and M > 16:
                for code in codes:
                    for cfg in kron_sweep_configs(n1, n2):
                        try:
                            ok = check_kron_quant(1003, n1, n2, torch.float16, True, "cuda", cfg, code, r_eye)["ok"]
                        except Exception as e:  # a config that does not fit must not stop the sweep
                            ok = f"{type(e).__name__}: {str(e)[-200:]}"
                        fn = lambda x, L, R, *_, cfg=cfg, code=code: kron_quant(x, L, R, 0.9, True, config=cfg,
                                                                                codes=code)
                        row = _sweep_one("kron", f"{name} {n1}x{n2} {code}{' R=I' if r_eye else ''}", M, cfg, fn,
                                         ours, M * K * (3.0 if code == "e4m3" else 2.5))
                        row["ok"] = ok
                        _log(f"  checked: {ok}")
                        rows.append(row)
            del ours
            torch.cuda.empty_cache()
    return rows


DECODE_ROWS = ((1, 2100), (8, 2100), (32, 2100), (64, 2100), (1, 8244), (8, 8244), (32, 8244))  # (batch, tokens)


def bench_decode(shape, rows=DECODE_ROWS) -> list[dict]:
    """decode_attention over a packed cache of every sequence at the given length, against fp16 SDPA."""
    from .kv_cache import bench_decode_attention

    _, _, heads, kv_heads, head_dim = shape
    out = []
    for B, T in rows:
        out += bench_decode_attention(B, heads, kv_heads, T, head_dim)
        _log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out[-1].items()}))
    return out


DECODE_TILES = ((64, 4, 2), (64, 4, 3), (64, 4, 1), (32, 4, 2), (32, 2, 2), (64, 2, 2), (32, 1, 1), (32, 1, 2),
                (32, 1, 3), (16, 1, 2), (16, 1, 3))  # (block_n, num_warps, num_stages)


def bench_decode_tiles(shape, rows=DECODE_ROWS, tiles=DECODE_TILES) -> list[dict]:
    """decode_attention (fp16 q, every sequence full) on each (block_n, num_warps, num_stages) of ``tiles``, all over
    one cache per row, each checked against the float64 reference with the tests' tolerance (``err_over_tol`` ≤ 1
    passes); ``default`` marks the tiles the wrapper picks for that shape (``kv_cache._decode_config``)."""
    from .kv_cache import _decode_config, bench_decode_attention

    _, _, heads, kv_heads, head_dim = shape
    out = []
    for B, T in rows:
        picked = _decode_config(heads // kv_heads, head_dim, None, B, kv_heads, T, torch.device("cuda"),
                                torch.float16)
        configs = [{"block_n": bn, "num_warps": w, "num_stages": st} for bn, w, st in tiles]
        for r in bench_decode_attention(B, heads, kv_heads, T, head_dim, configs=configs, check=True):
            out.append({**r, "default": all(picked[k] == r[k] for k in configs[0])})
            _log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out[-1].items()}))
        torch.cuda.empty_cache()
    return out


def decode_tiles_table(rows: list[dict]) -> str:
    lines = ["| batch | tokens | block_n / warps / stages | ours µs | cache GB/s | fp16 SDPA µs | ours vs SDPA | "
             "error / tolerance |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['B']} | {r['T']} | {r['block_n']}/{r['num_warps']}/{r['num_stages']}"
              f"{' (default)' if r['default'] else ''} | {r['us']:.1f} | {r['cache_GBps']:.0f} | "
              f"{r['fp16_sdpa_us']:.1f} | {r['vs_fp16_sdpa']:.2f}× | {r['err_over_tol']:.2f} |" for r in rows]
    return "\n".join(lines)


# rope_qkv_write launch settings timed besides the default (_pack_config) by --only decode-writes: rows, K chunk,
# warps (sm_90 compiles of each, Triton 3.6, D = 128: 170–255 registers, no spills)
WRITE_CONFIGS = ({"rows": 16, "block_k": 32, "num_warps": 8}, {"rows": 16, "block_k": 64, "num_warps": 8},
                 {"rows": 8, "block_k": 16, "num_warps": 4}, {"rows": 16, "block_k": 32, "num_warps": 4})


def bench_decode_writes(shape, batches=(1, 8, 32, 64), capacity=2064, configs=WRITE_CONFIGS) -> list[dict]:
    """A decode step's attention inputs at the cache, fp16, CUDA-graph replay: ours — ``rope_qkv_write``, one launch
    (what the layer runs), and the three launches it replaces: ``rope_transform`` of q (RoPE, ·Tk⁻ᵀ),
    ``rope_k_quant_pack`` of K and ``kv_quant_pack`` of V at a device position — against what the layer ran before
    those: RoPE of q and K as PyTorch's ops, both transforms as fp16 products, then the two ``kv_quant_pack`` writes. Each row also reports ours against the references: q's largest error relative to the
    float32 value (q_max_rel_err, |y| clamped at 1e-2) and the share of K code bytes that differ from the
    reference's (k_code_bytes_differing; boundary cases of the fp32 sum order)."""
    from flatquant.rope import apply_rope

    from .kv_cache import (kv_quant_pack, rope_k_quant_pack, rope_k_quant_pack_ref, rope_k_transform_ref,
                           rope_qkv_write, rope_transform)

    _, _, heads, kv_heads, D = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    tk = torch.linalg.qr(torch.randn(D, D, device="cuda", dtype=torch.float64, generator=g))[0].float()
    tk_inv = torch.linalg.inv(tk).T.contiguous()
    out = []
    for B in batches:
        qkv = torch.randn(B, 1, heads + 2 * kv_heads, D, device="cuda", dtype=torch.float16, generator=g)
        q, k, v = (t.transpose(1, 2) for t in qkv.split((heads, kv_heads, kv_heads), dim=2))
        ang = torch.rand(B, 1, D // 2, device="cuda", generator=g) * 100
        cos, sin = (torch.cat([f(ang)] * 2, dim=-1).half() for f in (torch.cos, torch.sin))
        cache = [(torch.zeros(B, kv_heads, capacity, D // 2, dtype=torch.uint8, device="cuda"),
                  torch.zeros(B, kv_heads, capacity, device="cuda"), torch.zeros(B, kv_heads, capacity, device="cuda"))
                 for _ in range(2)]
        pos = torch.full((1,), capacity // 2, dtype=torch.int32, device="cuda")

        def one(config=None):
            rope_qkv_write(q, k, v, cos, sin, tk_inv, tk, 0.95, 0.95, cache[0], cache[1], pos, config=config)

        def three():
            rope_transform(q, cos, sin, tk_inv)
            rope_k_quant_pack(k, cos, sin, tk, 0.95, out=cache[0], at=pos)
            kv_quant_pack(v, 0.95, out=cache[1], at=pos)

        c4, s4 = cos.unsqueeze(1), sin.unsqueeze(1)
        tk16, tk_inv16 = tk.half(), tk_inv.half()

        def before():
            apply_rope(q, c4, s4) @ tk_inv16
            kv_quant_pack(apply_rope(k, c4, s4) @ tk16, 0.95, out=cache[0], at=pos)
            kv_quant_pack(v, 0.95, out=cache[1], at=pos)

        y = rope_k_transform_ref(q, cos, sin, tk_inv)
        q_err = float(((rope_transform(q, cos, sin, tk_inv).float() - y).abs() / y.abs().clamp_min(1e-2)).max())
        rope_k_quant_pack(k, cos, sin, tk, 0.95, out=cache[0], at=pos)
        ref = rope_k_quant_pack_ref(k, cos, sin, tk, 0.95)[0]
        k_flips = float((cache[0][0][:, :, capacity // 2: capacity // 2 + 1] != ref).float().mean())
        ms = _time(one, [()], True)
        others = {"/".join(str(c[k]) for k in ("rows", "block_k", "num_warps")): 1e3 * _time(one, [(c,)], True)
                  for c in configs}
        three_ms = _time(three, [()], True)
        before_ms = _time(before, [()], True)
        out.append({"B": B, "heads": heads, "kv_heads": kv_heads, "D": D, "us": 1e3 * ms, "three_us": 1e3 * three_ms,
                    "before_us": 1e3 * before_ms, "speedup": before_ms / ms, "q_max_rel_err": q_err,
                    "k_code_bytes_differing": k_flips, "configs_us": others})
        _log(json.dumps({kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in out[-1].items()}))
    return out


def decode_writes_table(rows: list[dict]) -> str:
    lines = ["| batch | ours µs (1 launch) | 3 launches µs | before µs (PyTorch RoPE + fp16 products + 2 writes) | "
             "speedup | other rows/block_k/warps µs |", "|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['B']} | {r['us']:.1f} | {r['three_us']:.1f} | {r['before_us']:.1f} | {r['speedup']:.2f}× | "
              + ", ".join(f"{k} {v:.1f}" for k, v in r.get("configs_us", {}).items()) + " |" for r in rows]
    return "\n".join(lines)


def _decode_sets(M: int, K: int, N: int, l2: int) -> tuple[float, list]:
    """fp16 F.linear's time (ms) at M tokens of K → N over weights rotating past 3× the L2 cache, and as many
    rotating sets of random packed codes (qa, sa, qw, sw) for the decode GEMMs."""
    ref_sets = [(torch.randn(M, K, device="cuda", dtype=torch.float16),
                 torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02) for _ in range(_n_sets(N * K * 2, l2))]
    fp16_ms = _time(lambda x, w: F.linear(x, w), ref_sets)
    del ref_sets
    qsets = [(torch.randint(0, 256, (M, K // 2), device="cuda", dtype=torch.uint8),
              torch.rand(M, device="cuda") + 0.5,
              torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8),
              torch.rand(N, device="cuda") * 1e-2 + 1e-3) for _ in range(_n_sets(N * K // 2, l2))]
    return fp16_ms, qsets


def bench_decode_gemm(shape, tokens=DECODE, splits=(1, 2, 4, 8)) -> list[dict]:
    """w4a4_gemm at decode sizes on every split of k in ``splits`` and pick_config's default, against fp16
    F.linear, both replayed from CUDA graphs over rotating weights (3× L2, so the weights come from HBM); weight
    GB/s is the packed weight's bytes over the time. Each config's output is checked against w4a4_gemm_ref
    (the splits are exact integer sums: equal to SPLIT_K=1 bit for bit)."""
    from .kron_quant import _sm_count

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    sms = _sm_count(torch.device("cuda"))
    out = []
    for name, (K, N, _) in layer_linears(*shape).items():
        for M in tokens:
            fp16_ms, qsets = _decode_sets(M, K, N, l2)
            ref = w4a4_gemm_ref(*(t.cpu() for t in qsets[0]), out_dtype=torch.float32)
            default = pick_config(M, N, K // 2, True, False, sms)
            default_split = default.get("SPLIT_K", 1)
            for split in sorted(set(splits) | {default_split}):
                cfg = dict(default, SPLIT_K=split)
                ms = _time(lambda qa, sa, qw, sw, cfg=cfg: w4a4_gemm(qa, sa, qw, sw, config=cfg), qsets, True)
                y = w4a4_gemm(*qsets[0], config=cfg, out_dtype=torch.float32).cpu()
                out.append({"linear": name, "tokens": M, "in": K, "out": N, "split_k": split,
                            "default": split == default_split, "us": 1e3 * ms, "fp16_us": 1e3 * fp16_ms,
                            "vs_fp16": fp16_ms / ms, "weight_GBps": N * K / 2 / ms / 1e6,
                            "max_rel_err": float(((y - ref).abs() / ref.abs().clamp_min(1e-6)).max())})
                _log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out[-1].items()}))
            del qsets
    return out


GEMV_SWEEP = [dict(BLOCK_N=bn, BLOCK_KW=kw) for bn in (8, 16, 32) for kw in (64, 128, 256)]


def bench_decode_gemv(shape, tokens=(1, 4, 8), configs=GEMV_SWEEP) -> list[dict]:
    """The CUDA-core decode GEMV (``gemv.w4a4_gemv``) on each launch setting of ``configs`` (``default``: the
    wrapper's own, ``gemv_config``) against the tensor-core decode GEMM as QuantLinear runs it (``w4a4_gemm``,
    pick_config's split) and fp16 F.linear, all replayed from CUDA graphs over rotating weights (3× L2). ``equal``:
    the GEMV's output is ``w4a4_gemm``'s bit for bit (both are exact integer sums through one epilogue)."""
    from .gemv import gemv_config, w4a4_gemv

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    out = []
    for name, (K, N, _) in layer_linears(*shape).items():
        for M in tokens:
            fp16_ms, qsets = _decode_sets(M, K, N, l2)
            mma_ms = _time(lambda qa, sa, qw, sw: w4a4_gemm(qa, sa, qw, sw), qsets)
            want = w4a4_gemm(*qsets[0])
            default = {k: v for k, v in gemv_config(M, N, K // 2).items() if k in ("BLOCK_N", "BLOCK_KW")}
            for cfg in [c for c in configs if c != default] + [default]:
                row = {"linear": name, "tokens": M, "in": K, "out": N, "cfg": cfg, "default": cfg == default,
                       "mma_us": 1e3 * mma_ms, "fp16_us": 1e3 * fp16_ms}
                try:
                    ms = _time(lambda qa, sa, qw, sw, cfg=cfg: w4a4_gemv(qa, sa, qw, sw, config=cfg), qsets)
                    row.update(us=1e3 * ms, weight_GBps=N * K / 2 / ms / 1e6, vs_mma=mma_ms / ms, vs_fp16=fp16_ms / ms,
                               equal=bool(torch.equal(w4a4_gemv(*qsets[0], config=cfg), want)))
                except Exception as e:  # a setting that fails must not stop the others
                    row["error"] = f"{type(e).__name__}: {str(e)[-200:]}"
                out.append(row)
                _log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
            del qsets
    return out


def decode_gemv_table(rows: list[dict]) -> str:
    lines = ["| linear | tokens | BLOCK_N × BLOCK_KW | GEMV µs | weight GB/s | tensor-core GEMM µs | fp16 µs | "
             "vs GEMM | vs fp16 | equal |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        cfg = f"{r['cfg']['BLOCK_N']} × {r['cfg']['BLOCK_KW']}{' (default)' if r['default'] else ''}"
        if "error" in r:
            lines.append(f"| {r['linear']} | {r['tokens']} | {cfg} | ERROR {r['error']} |")
            continue
        lines.append(f"| {r['linear']} | {r['tokens']} | {cfg} | {r['us']:.1f} | {r['weight_GBps']:.0f} | "
                     f"{r['mma_us']:.1f} | {r['fp16_us']:.1f} | {r['vs_mma']:.2f}× | {r['vs_fp16']:.2f}× | "
                     f"{r['equal']} |")
    return "\n".join(lines)


def bench_decode_kq(shape, tokens=DECODE) -> list[dict]:
    """A whole W4A4 linear at decode sizes, as QuantLinear runs it: kron_quant then w4a4_gemm (two launches) against
    ``kq_gemm`` (one launch where ``kq_fuses``) and fp16 F.linear, all replayed from CUDA graphs over rotating
    weights (3× L2). ``equal``: kq_gemm's output equals the two launches' bit for bit."""
    from .w4a4_gemm import kq_fuses, kq_gemm, weight_sums

    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    out = []
    for name, (K, N, (n1, n2)) in layer_linears(*shape).items():
        L, R = (_rand_factor(n, "cuda").half() for n in (n1, n2))
        for M in tokens:
            x = torch.randn(M, K, device="cuda", dtype=torch.float16)
            ref_sets = [(torch.randn(N, K, device="cuda", dtype=torch.float16) * 0.02,)
                        for _ in range(_n_sets(N * K * 2, l2))]
            fp16_ms = _time(lambda w: F.linear(x, w), ref_sets, True)
            del ref_sets
            sets = []
            for _ in range(_n_sets(N * K // 2, l2)):
                qw = torch.randint(0, 256, (N, K // 2), device="cuda", dtype=torch.uint8)
                sets.append((qw, torch.rand(N, device="cuda") * 1e-2 + 1e-3, weight_sums(qw)))

            def two(qw, sw, wsum):
                q, sa, za = kron_quant(x, L, R, 0.9, False)
                return w4a4_gemm(q, sa, qw, sw, za, wsum, out_dtype=torch.float16)

            def one(qw, sw, wsum):
                return kq_gemm(x, L, R, 0.9, False, qw, sw, wsum)

            two_ms, one_ms = _time(two, sets, True), _time(one, sets, True)
            out.append({"linear": name, "tokens": M, "in": K, "out": N, "fused": kq_fuses(M, n1, n2, x.dtype, x.device),
                        "two_us": 1e3 * two_ms, "one_us": 1e3 * one_ms, "fp16_us": 1e3 * fp16_ms,
                        "two_vs_fp16": fp16_ms / two_ms, "one_vs_fp16": fp16_ms / one_ms,
                        "equal": bool(torch.equal(one(*sets[0]), two(*sets[0])))})
            _log(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out[-1].items()}))
            del sets
    return out


def decode_kq_table(rows: list[dict]) -> str:
    lines = ["| linear | tokens | one launch | kron_quant + GEMM µs | kq_gemm µs | fp16 µs | two vs fp16 | one vs fp16 | "
             "equal |", "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['linear']} | {r['tokens']} | {'yes' if r['fused'] else 'no (kq_fuses)'} | {r['two_us']:.1f} | "
              f"{r['one_us']:.1f} | {r['fp16_us']:.1f} | {r['two_vs_fp16']:.2f}× | {r['one_vs_fp16']:.2f}× | "
              f"{r['equal']} |" for r in rows]
    return "\n".join(lines)


def decode_gemm_table(rows: list[dict]) -> str:
    lines = ["| linear | tokens | split_k | ours µs | weight GB/s | fp16 µs | vs fp16 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['linear']} | {r['tokens']} | {r['split_k']}{' (default)' if r['default'] else ''} | "
              f"{r['us']:.1f} | {r['weight_GBps']:.0f} | {r['fp16_us']:.1f} | {r['vs_fp16']:.2f}× |" for r in rows]
    return "\n".join(lines)


def decode_table(rows: list[dict]) -> str:
    lines = ["| batch | tokens | ours µs | cache GB/s | fp16 SDPA µs | ours vs SDPA |",
             "|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['B']} | {r['T']} | {r['us']:.1f} | {r['cache_GBps']:.0f} | {r['fp16_sdpa_us']:.1f} | "
              f"{r['vs_fp16_sdpa']:.2f}× |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="check every kernel against its reference first")
    p.add_argument("--sweep", action="store_true", help="time tile configs before the main table")
    p.add_argument("--sweep-linears", default="", help="comma-separated linears to sweep (default all)")
    p.add_argument("--sweep-kernels", default="gemm,kron")
    p.add_argument("--sweep-codes", default="int4", help="kron_quant code forms to sweep: int4, e4m3 or both")
    p.add_argument("--sweep-tokens", default="1,8192")
    p.add_argument("--only", choices=("all", "gemm", "decode", "decode-gemm", "decode-gemv", "decode-tiles",
                                      "decode-writes", "decode-kq"),
                   default="all",
                   help="gemm: time only the GEMMs (fp16 F.linear, ours int8 and fp8, cuBLAS), prefill tokens by "
                        "default; decode: only decode_attention against fp16 SDPA (<gpu>_decode_attention.json); "
                        "decode-gemm: the decode GEMM on each split of k against fp16 (<gpu>_decode_gemm.json); "
                        "decode-gemv: the CUDA-core decode GEMV per launch setting against the decode GEMM and fp16 "
                        "(<gpu>_decode_gemv.json); "
                        "decode-tiles: decode_attention per tile config, checked (<gpu>_decode_attention_tiles.json); "
                        "decode-writes: a decode step's q/K/V kernels at the cache (<gpu>_decode_writes.json); "
                        "decode-kq: a decode linear in one launch against two and fp16 (<gpu>_decode_kq.json)")
    p.add_argument("--out", default="results/bench")
    p.add_argument("--tokens", default=None, help=f"comma-separated (default {','.join(map(str, DECODE + PREFILL))}; "
                   f"{','.join(map(str, PREFILL))} with --only gemm; {','.join(map(str, DECODE))} with --only "
                   "decode-gemm or decode-kq, 1,4,8 with decode-gemv, which take it too)")
    p.add_argument("--shape", default="4096,14336,32,8,128", help="hidden,intermediate,heads,kv_heads,head_dim")
    a = p.parse_args(argv)
    if not (HAS_TRITON and torch.cuda.is_available()):
        _log("needs CUDA and triton")
        return 2
    ok = True
    if a.check:
        t = time.time()
        ok = run_checks()
        _log(f"checks {'PASSED' if ok else 'FAILED'} in {time.time() - t:.0f} s")
    shape = [int(v) for v in a.shape.split(",")]
    if a.sweep:
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
        lin = layer_linears(*shape)
        keep = [n for n in a.sweep_linears.split(",") if n] or list(lin)
        rows = sweep({n: lin[n] for n in keep}, l2, tuple(int(v) for v in a.sweep_tokens.split(",")),
                     kernels=tuple(a.sweep_kernels.split(",")), codes=tuple(a.sweep_codes.split(",")))
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "sweep.json"), "w") as f:
            json.dump(rows, f, indent=1)
    decode_only = {"decode": (bench_decode, "_decode_attention", decode_table),
                   "decode-gemm": (bench_decode_gemm, "_decode_gemm", decode_gemm_table),
                   "decode-gemv": (bench_decode_gemv, "_decode_gemv", decode_gemv_table),
                   "decode-tiles": (bench_decode_tiles, "_decode_attention_tiles", decode_tiles_table),
                   "decode-writes": (bench_decode_writes, "_decode_writes", decode_writes_table),
                   "decode-kq": (bench_decode_kq, "_decode_kq", decode_kq_table)}
    if a.only in decode_only:
        bench, suffix, table = decode_only[a.only]
        kw = {"tokens": tuple(int(v) for v in a.tokens.split(","))} if a.tokens and a.only in (
            "decode-gemm", "decode-gemv", "decode-kq") else {}
        rows = bench(shape, **kw)
        res = {"device": torch.cuda.get_device_properties(0).name, "torch": torch.__version__,
               "triton": triton.__version__, "rows": rows}
        _write(a.out, suffix, res, table(rows) + "\n")
        _log(table(rows))
        return 0 if ok else 1
    only_gemm = a.only == "gemm"
    tokens = a.tokens or ",".join(map(str, PREFILL if only_gemm else DECODE + PREFILL))
    res = bench_shapes(*shape, token_counts=tuple(int(v) for v in tokens.split(",")), out_dir=a.out,
                       only_gemm=only_gemm)
    _log(markdown_table(res))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
