"""Stage bench: kernels at the model's real shapes against torch fp16 in the same run (needs a CUDA GPU).

`python run.py stage=bench model=llama3_8b` needs no checkpoint: the shapes come from conf/model/*.yaml
(model.shape), the weights are random. Writes results/bench/<gpu>.json and .md (flatquant.kernels.bench: each linear)
and, with bench.layer=true, results/bench/<gpu>_layer.json and .md (flatquant.bench_layer: a whole decoder layer);
with bench.calibration=true, results/bench/<gpu>_calibration.json (flatquant.bench_calib: ms per calibration step
of the run's method, FlatQuant unless it trains, seconds per layer projected onto bench.calibration_schedule, the
full-precision pass a split calibration repeats, and the wall time of calib.workers=1/2/4/8 over model.shape's
num_layers); bench.linears=false skips the per-linear kernels (results/bench/<gpu>.json);
with bench.profile=true, results/bench/<gpu>_profile.json (GPU time per kernel of the fp16 and W4A4 layers);
with bench.model=true, results/bench/<gpu>_model_<model>.json and .md (flatquant.bench_model: the whole model with
model.shape's num_layers, prefill latency and decode tokens/s with the KV cache at bench.model_batches ×
bench.model_context, fp16 against W4A4KV4 on the kernels with the 4-bit cache, peak memory of each).
"""

from __future__ import annotations

from pathlib import Path

import torch


def run(cfg: dict, ctx) -> dict[str, float]:
    if not torch.cuda.is_available():
        raise RuntimeError("stage=bench needs a CUDA GPU (the kernels are Triton GPU kernels)")
    from flatquant.kernels.bench import bench_shapes

    shape = cfg["model"]["shape"]
    dims = (shape["hidden"], shape["intermediate"], shape["num_heads"], shape["num_kv_heads"], shape["head_dim"])
    bench_dir = str(Path(cfg["results_dir"]) / "bench")
    out = {}
    if cfg["bench"].get("linears", True):
        res = bench_shapes(*dims, tuple(cfg["bench"]["token_counts"]), bench_dir)
        out["bench/copy/GBs"] = res["copy_GBs"]
        for row in res["rows"]:
            if "speedup" in row:
                out[f"bench/{row['linear']}_{row['tokens']}/speedup"] = row["speedup"]
    if cfg["bench"].get("layer", True):
        from flatquant.bench_layer import bench_decoder_layer

        layer = bench_decoder_layer(*dims, bench_dir)
        for row in layer["rows"]:
            if "speedup" in row:
                out[f"bench/layer_{row['phase']}_b{row['batch']}/speedup"] = row["speedup"]
    if cfg["bench"].get("calibration", True):
        out.update(_calibration(cfg["bench"], ctx, dims, bench_dir, shape.get("num_layers")))
    if cfg["bench"].get("model", False):
        from flatquant.bench_model import bench_model

        b = cfg["bench"]
        res = bench_model(shape, bench_dir, tuple(b.get("model_batches", (1, 8, 32, 64))),
                          b.get("model_context", 2048), b.get("model_steps", 16),
                          vocab=shape.get("vocab", 32000), name=cfg["model"]["name"],
                          max_tokens=b.get("model_max_tokens"), profile=b.get("model_profile", False))
        for row in res["rows"]:
            for key in ("prefill_speedup", "decode_speedup", "graph_decode_speedup", "best_decode_speedup",
                        "kv_bytes_ratio"):
                if key in row:
                    out[f"bench/model_c{row['context']}_b{row['batch']}/{key}"] = row[key]
        _model_plot(res, bench_dir)
    if cfg["bench"].get("profile", False):
        from flatquant.bench_layer import profile_decoder_layer

        prof = profile_decoder_layer(*dims, bench_dir)
        out.update({f"bench/profile_{name}/gpu_ms": r["gpu_ms_total"] for name, r in prof["runs"].items()})
    return out


def _calibration(bench: dict, ctx, dims: tuple, bench_dir: str, n_layers: int | None) -> dict[str, float]:
    from flatquant.bench_calib import bench_calibration
    from flatquant.methods import get_method

    method = ctx.method if ctx.method.trainable else get_method("flatquant")
    res = bench_calibration(*dims, bench_dir, **bench.get("calibration_schedule", {}),
                            steps=bench.get("calibration_steps", 8), method=method, qcfg=ctx.qcfg, n_layers=n_layers)
    out = {"bench/calibration/ms_per_step": res["ms_per_step"], "bench/calibration/s_per_layer": res["s_per_layer"],
           "bench/calibration/peak_gib": res["peak_gib"],
           "bench/calibration/fp_forward_s_per_layer": res["fp_forward_s_per_layer"]}
    for workers, proj in (res["split"] or {}).items():
        out[f"bench/calibration/split{workers}/wall_s"] = proj["wall_s"]
        out[f"bench/calibration/split{workers}/speedup"] = proj["speedup"]
    return out


def _model_plot(res: dict, bench_dir: str) -> Path | None:
    """<gpu>_model_<model>.png: prefill and decode speedup of each batch (bars; 1× dashed)."""
    from analysis.plots import save, speedup_figure

    names = {"prefill": "prefill", "decode": "decode (eager)", "graph_decode": "decode (CUDA graph)"}
    records = [{"label": f"{name} batch {r['batch']} (context {r['context']})", "ratio": r[f"{phase}_speedup"]}
               for r in res["rows"] for phase, name in names.items() if f"{phase}_speedup" in r]
    if not records:
        return None
    title = f"{res['model']}: W4A4KV4 (kernels, 4-bit KV cache) over fp16, {res['device']}"
    return save(speedup_figure(records, title), Path(bench_dir) / f"{res['device'].replace(' ', '_')}_model_{res['model']}.png")
