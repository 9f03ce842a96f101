"""Where a W4A4 decoder layer's time goes on the GPU: torch.profiler over CUDA-graph-free calls of the fp16 layer
and ours (kernels), grouped by kernel name, for one prefill and one decode shape.

    python scripts/gpu_profile_layer.py --out $OUT/profile.json
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from flatquant.kernels.bench_layer import build_layers


def top_kernels(fn, steps=20, k=14):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps / 1000.0, e.count // steps) for e in prof.key_averages()]
    rows = [r for r in rows if r[1] > 0]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"gpu_ms_total": total, "top": [{"kernel": n[:90], "ms": ms, "calls": c} for n, ms, c in rows[:k]]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096,14336,32,8,128")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    fp, real, fake, rot = build_layers(*[int(v) for v in a.shape.split(",")])
    out = {}
    for batch, seq in ((4, 2048), (16, 1)):
        x = torch.randn(batch, seq, fp.hidden_size if hasattr(fp, "hidden_size") else 4096, device="cuda", dtype=torch.float16)
        pe = tuple(t.half() for t in rot(x, torch.arange(seq, device="cuda").unsqueeze(0)))
        with torch.no_grad():
            for name, m in (("fp16", fp), ("w4a4", real)):
                out[f"{name}_b{batch}_s{seq}"] = r = top_kernels(lambda: m(x, position_embeddings=pe))
                print(name, batch, seq, round(r["gpu_ms_total"], 4), flush=True)
                for t in r["top"]:
                    print(f"   {t['ms']:.4f} ms x{t['calls']}  {t['kernel']}", flush=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
