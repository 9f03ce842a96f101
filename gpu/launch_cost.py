"""Host cost of one call of each kernel wrapper at decode size, against one PyTorch op and a bare Triton kernel.

Usage (on a GPU machine)::

    python gpu/launch_cost.py [--out results/bench]    # → <gpu>_launch_cost.json, one line per call

Each entry point is called N times back to back at batch 1 of LLaMA-3-8B's shapes (a decode step's size, where the
GPU work per call is a few µs) and timed on the host, the GPU synchronised once at the end: µs per call is then the
larger of the host's cost of issuing it and the GPU's time, and ``host_us`` (the same loop, timing only the calls)
says which. Eager decode issues 13 of our calls a layer (4 kron_quant, 4 GEMMs, 2 cache writes, decode split +
merge, SwiGLU) against fp16's ~40 PyTorch kernels; this says what each costs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time(fn, n: int = 2000) -> dict:
    import torch

    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {"us": 1e6 * total / n, "host_us": 1e6 * host / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="results/bench")
    a = p.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch
    import triton
    import triton.language as tl

    from flatquant.kernels.fused import silu_mul
    from flatquant.kernels.kron_quant import kron_quant
    from flatquant.kernels.kv_cache import decode_attention, kv_quant_pack
    from flatquant.kernels.w4a4_gemm import w4a4_gemm

    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2

    @triton.jit
    def _nop(x_ptr):
        tl.store(x_ptr, 1.0)

    dev, h = "cuda", torch.float16
    x = torch.randn(1, 4096, device=dev, dtype=h)
    L, R = torch.randn(64, 64, device=dev), torch.randn(64, 64, device=dev)
    qa, sa, _ = kron_quant(x, L, R)
    qw = torch.randint(0, 256, (6144, 2048), dtype=torch.uint8, device=dev)
    sw = torch.rand(6144, device=dev)
    gu = torch.randn(1, 2 * 14336, device=dev, dtype=h)
    kv = torch.randn(1, 8, 1, 128, device=dev, dtype=h)
    cache = tuple(t.contiguous() for t in kv_quant_pack(torch.randn(1, 8, 2048, 128, device=dev, dtype=h)))
    pos = torch.tensor([1000], dtype=torch.int32, device=dev)
    q = torch.randn(1, 32, 128, device=dev, dtype=h)
    lengths = torch.full((1,), 1000, dtype=torch.int32, device=dev)
    o = torch.empty_like(q)
    one = torch.empty(1, device=dev)
    calls = {
        "torch.add (one PyTorch kernel)": lambda: torch.add(x, x),
        "bare triton kernel (one pointer)": lambda: _nop[(1,)](one),
        "kron_quant 4096 (64x64)": lambda: kron_quant(x, L, R),
        "w4a4_gemm 1 x 4096 -> 6144": lambda: w4a4_gemm(qa, sa, qw, sw),
        "silu_mul 1 x 14336": lambda: silu_mul(gu),
        "kv_quant_pack 1 token at pos": lambda: kv_quant_pack(kv, out=cache, at=pos),
        "decode_attention 1 x 1000 (split + merge)": lambda: decode_attention(q, *cache, *cache, lengths, out=o),
    }
    rows = []
    for name, fn in calls.items():
        r = {"call": name, **_time(fn)}
        rows.append(r)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    gpu = torch.cuda.get_device_properties(0).name.replace(" ", "_")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{gpu}_launch_cost.json"), "w") as f:
        json.dump({"device": gpu, "torch": torch.__version__, "triton": triton.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
