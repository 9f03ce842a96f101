"""Per linear group of a W4A4 decoder layer on the GPU: kernel output vs fake quantization, both against the
float64 fake-quant reference from the same input, for fp16 and fp32 inputs (and the kernels' code mismatches).

    python scripts/gpu_group_check.py --shape 4096,14336,32,8,128 --out $OUT/groups.json
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from flatquant.layer import GROUPS
from flatquant.kernels.bench_layer import build_layers
from flatquant.kernels.kron_quant import kron_quant, kron_quant_ref, unpack_int4


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096,14336,32,8,128")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    shape = [int(v) for v in a.shape.split(",")]
    fp, real, fake, rot = build_layers(*shape)
    rows = []
    torch.manual_seed(0)
    w = fake.weights()
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        for slot in GROUPS:
            ql = real.kernels[slot]
            x = torch.randn(a.tokens, ql.in_features, device="cuda").to(dt)
            with torch.no_grad():
                k = ql(x)
                xq = fake.aq[slot](fake._online(slot, x))
                f = torch.cat([F.linear(xq, w[m].to(dt)) for m in GROUPS[slot]], -1)
                xq64 = fake.aq[slot](fake._online(slot, x.double()))
                f64 = torch.cat([F.linear(xq64, w[m].double()) for m in GROUPS[slot]], -1)
                L, R = ql._factors(dt, x.device)
                q, s, z = kron_quant(x, L, R, ql.act_clip, ql.act_sym)
                qr, sr, zr = kron_quant_ref(x, L, R, ql.act_clip, ql.act_sym)
                codes_differ = float((unpack_int4(q, True) != unpack_int4(qr, True)).float().mean())
            row = {"dtype": str(dt), "slot": slot, "L": tuple(L.shape), "R": tuple(R.shape),
                   "kernel_vs_fake": rel(k, f), "kernel_vs_f64": rel(k, f64), "fake_vs_f64": rel(f, f64),
                   "act_code_mismatch_frac": codes_differ, "scale_rel": rel(s, sr), "finite": bool(torch.isfinite(k).all())}
            print(row, flush=True)
            rows.append(row)
    with open(a.out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
