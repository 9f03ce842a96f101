"""Time a whole decoder layer in real W4A4 (QuantLayer on the kernels) against the fp16 layer, and
profile where its GPU time goes.

Usage::

    python -m flatquant.bench_layer --shape 4096,14336,32,8,128 --out results/bench
    python run.py stage=bench model=llama3_8b bench.profile=true       # both, through the pipeline

    from flatquant.bench_layer import bench_decoder_layer, profile_decoder_layer
    res = bench_decoder_layer(4096, 14336, 32, 8, 128)
    prof = profile_decoder_layer(4096, 14336, 32, 8, 128)   # results/bench/<gpu>_profile.json

Both layers get the same random weights (transformers' LlamaDecoderLayer, fp16). Ours is FlatQuant's:
Kronecker transforms at their untrained start, merged, weights RTN 4-bit, then `use_kernels()`, so
qkv / o / up+gate / down each run one fused transform+quantize kernel and one W4A4 GEMM (qkv's and up/gate's
transform kernels make the RMSNorms, down's SwiGLU's product, the residual adds ride in the int8 GEMMs); RoPE, the
K transform, K/V fake quantization and attention stay in PyTorch. `w4a4_unfused_ms`: the same layer with
`use_kernels(fuse=False)` (the norms, SwiGLU's product and the residual adds as kernels of their own), timed in the
same run. Prefill: seq 2048 at
batch 1, 4, 16. Decode: one token per sequence at batch 1, 16, 64 with no KV cache (both layers alike:
the attention over a cache is not part of this comparison). Every call is replayed from a CUDA graph
(`do_bench_cudagraph`, medians) over input sets rotated so that caches do not flatter. The profile runs the
same two layers eagerly (no CUDA graph) under torch.profiler and sums GPU time per kernel name: what bounds
the layer (NOTES.md, "A whole 8B-shaped layer").
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

PREFILL = ((1, 2048), (4, 2048), (16, 2048))
DECODE = ((1, 1), (16, 1), (64, 1))


def random_decoder_layer(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                         device="cuda"):
    """(LlamaConfig, float32 LlamaDecoderLayer, rotary module): weights N(0, 0.02), norm weights U(0.5, 1.5),
    seeded (torch.manual_seed(0)), so every benchmark of one shape sees the same layer. No checkpoint needed."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=num_heads,
                      num_key_value_heads=num_kv_heads, head_dim=head_dim, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(device, torch.float32)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return cfg, layer, LlamaRotaryEmbedding(cfg).to(device)


def build_layers(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int, device="cuda"):
    """(fp16 transformers layer, W4A4 QuantLayer on the kernels, its fake-quant twin, rotary module)."""
    import copy

    from flatquant.adapters import adapter_for
    from flatquant.convert import convert
    from flatquant.layer import CalibLayer
    from flatquant.methods import get_method
    from flatquant.spec import QuantConfig

    cfg, fp, rotary = random_decoder_layer(hidden, intermediate, num_heads, num_kv_heads, head_dim, device)
    parts = adapter_for(cfg).parts(fp, cfg)
    stats = {slot: torch.ones(lin.weight.shape[1], device=device) for slot, lin in parts.slot_inputs().items()}
    transforms = get_method("flatquant").transforms(parts, stats, torch.Generator().manual_seed(0))
    fake = convert(CalibLayer(parts, QuantConfig(), transforms).to(device), "rtn")
    real = copy.deepcopy(fake)
    real.use_kernels()
    return fp.half(), real, fake, rotary


def _out(y):
    return y[0] if isinstance(y, tuple) else y


def bench_decoder_layer(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                        out_dir: str | None = "results/bench", shapes=PREFILL + DECODE) -> dict:
    import copy

    import triton.testing

    fp, real, fake, rotary = build_layers(hidden, intermediate, num_heads, num_kv_heads, head_dim)
    unfused = copy.deepcopy(fake)
    unfused.use_kernels(fuse=False)  # norms, SwiGLU's product, residual adds as kernels of their own: what fusing gains
    rows = []
    for batch, seq in shapes:
        n_sets = 1 if batch * seq >= 8192 else 4
        xs = [torch.randn(batch, seq, hidden, device="cuda", dtype=torch.float16) for _ in range(n_sets)]
        pos = torch.arange(seq, device="cuda").unsqueeze(0)
        pe = tuple(t.half() for t in rotary(xs[0], pos))
        row = {"phase": "prefill" if seq > 1 else "decode", "batch": batch, "seq": seq}
        with torch.no_grad():
            y_fp, y_real, y_fake = (_out(m(xs[0], position_embeddings=pe)).float() for m in (fp, real, fake))
            row["rel_err_vs_fake_quant"] = float((y_real - y_fake).norm() / (y_fake - xs[0].float()).norm())
            row["rel_err_vs_fp16"] = float((y_real - y_fp).norm() / (y_fp - xs[0].float()).norm())
            # control: the fake-quant layer itself in fp16 vs in fp32. A random untrained 4-bit layer turns
            # fp16 rounding into code flips, so this is the scale the kernel-vs-fake difference is judged on.
            y32 = _out(fake(xs[0].float(), position_embeddings=tuple(t.float() for t in pe))).float()
            row["rel_err_fake_fp16_vs_fp32"] = float((y_fake - y32).norm() / (y32 - xs[0].float()).norm())
            for name, m in (("fp16_ms", fp), ("w4a4_ms", real), ("w4a4_unfused_ms", unfused)):
                try:
                    row[name] = triton.testing.do_bench_cudagraph(
                        lambda m=m: [m(x, position_embeddings=pe) for x in xs], rep=100, return_mode="median") / n_sets
                except Exception as e:  # a graph capture failure is reported, not fatal
                    row[name + "_error"] = f"{type(e).__name__}: {str(e)[-200:]}"
        if "fp16_ms" in row and "w4a4_ms" in row:
            row["speedup"] = row["fp16_ms"] / row["w4a4_ms"]
        if "w4a4_unfused_ms" in row and "w4a4_ms" in row:
            row["speedup_unfused"] = row["fp16_ms"] / row["w4a4_unfused_ms"]
            row["fused_vs_unfused"] = row["w4a4_unfused_ms"] / row["w4a4_ms"]
        rows.append(row)
        print(row, flush=True)
        del xs
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "shape": dict(hidden=hidden, intermediate=intermediate, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim), "rows": rows}
    if out_dir:
        write_results(res, out_dir, "_layer", markdown_table(res))
    return res


def write_results(res: dict, out_dir: str, suffix: str, markdown: str) -> str:
    """<out_dir>/<gpu><suffix>.json (res) and .md (markdown); returns the path without extension."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, res["device"].replace(" ", "_") + suffix)
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown)
    return stem


def table_rows(rows: list[dict], cols: tuple[str, ...]) -> list[str]:
    """A markdown header and one line per row: floats to 4 significant digits, missing values as —."""
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in cols)
                    + " |" for r in rows]


def markdown_table(res: dict) -> str:
    cols = ("phase", "batch", "seq", "fp16_ms", "w4a4_ms", "speedup", "w4a4_unfused_ms", "speedup_unfused",
            "fused_vs_unfused", "rel_err_vs_fake_quant", "rel_err_fake_fp16_vs_fp32", "rel_err_vs_fp16")
    lines = [f"# Decoder layer, W4A4 kernels vs fp16 on {res['device']} (shape {res['shape']})", "",
             *table_rows(res["rows"], cols)]
    lines += ["", "rel_err_*: norm of the difference over the norm of the fp layer's update (y − x), on the first input set."]
    return "\n".join(lines) + "\n"


PROFILE_SHAPES = ((4, 2048), (16, 1))


def top_kernels(fn, steps: int = 20, top: int = 14) -> dict:
    """GPU time of `fn()` per kernel name under torch.profiler: {"gpu_ms_total", "launches", "top": [{kernel, ms,
    calls}]}, ms and calls per call of `fn` (launches: every kernel's), over `steps` calls after 3 warm-up calls; the
    `top` largest, largest first."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total / steps / 1000.0, e.count // steps) for e in prof.key_averages()]
    rows = sorted((r for r in rows if r[1] > 0), key=lambda r: -r[1])
    return {"gpu_ms_total": sum(r[1] for r in rows), "launches": sum(r[2] for r in rows),
            "top": [{"kernel": name[:90], "ms": ms, "calls": calls} for name, ms, calls in rows[:top]]}


def profile_decoder_layer(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                          out_dir: str | None = "results/bench", shapes=PROFILE_SHAPES, steps: int = 20,
                          top: int = 14) -> dict:
    """Where the fp16 layer's and ours (W4A4 kernels, fused and ``use_kernels(fuse=False)``) GPU time goes, per
    (batch, seq) of `shapes`: top_kernels of eager calls (x: (batch, seq, hidden) fp16), with the kernel launches a
    call (``launches``). Returns {"device", "torch", "shape", "steps", "runs"}, runs keyed
    "<fp16|w4a4|w4a4_unfused>_b<batch>_s<seq>"; writes <out_dir>/<gpu>_profile.json."""
    import copy

    fp, real, fake, rotary = build_layers(hidden, intermediate, num_heads, num_kv_heads, head_dim)
    unfused = copy.deepcopy(fake)
    unfused.use_kernels(fuse=False)
    del fake
    runs = {}
    for batch, seq in shapes:
        x = torch.randn(batch, seq, hidden, device="cuda", dtype=torch.float16)
        pe = tuple(t.half() for t in rotary(x, torch.arange(seq, device="cuda").unsqueeze(0)))
        with torch.no_grad():
            for name, m in (("fp16", fp), ("w4a4", real), ("w4a4_unfused", unfused)):
                runs[f"{name}_b{batch}_s{seq}"] = r = top_kernels(lambda m=m: m(x, position_embeddings=pe), steps, top)
                print(name, batch, seq, f"{r['gpu_ms_total']:.4f} ms, {r['launches']} launches", flush=True)
        del x
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
           "shape": dict(hidden=hidden, intermediate=intermediate, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim), "steps": steps, "runs": runs}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, res["device"].replace(" ", "_") + "_profile.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="4096,14336,32,8,128", help="hidden,intermediate,heads,kv_heads,head_dim")
    p.add_argument("--out", default="results/bench")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", flush=True)
        return 2
    res = bench_decoder_layer(*[int(v) for v in a.shape.split(",")], out_dir=a.out)
    print(markdown_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
