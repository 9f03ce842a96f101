"""Stage bench: kernels at the model's real shapes against torch fp16 in the same run (needs a CUDA GPU).

`python run.py stage=bench model=llama3_8b` needs no checkpoint: the shapes come from conf/model/*.yaml
(model.shape), the weights are random. Writes results/bench/<gpu>.json and .md (flatquant.kernels.bench: each linear)
and, with bench.layer=true, results/bench/<gpu>_layer.json and .md (flatquant.kernels.bench_layer: a whole decoder layer).
"""

from __future__ import annotations

from pathlib import Path

import torch


def run(cfg: dict, ctx) -> dict[str, float]:
    if not torch.cuda.is_available():
        raise RuntimeError("stage=bench needs a CUDA GPU (the kernels are Triton GPU kernels)")
    from flatquant.kernels.bench import bench_shapes

    shape = cfg["model"]["shape"]
    res = bench_shapes(shape["hidden"], shape["intermediate"], shape["num_heads"], shape["num_kv_heads"],
                       shape["head_dim"], tuple(cfg["bench"]["token_counts"]), str(Path(cfg["results_dir"]) / "bench"))
    out = {"bench/copy/GBs": res["copy_GBs"]}
    for row in res["rows"]:
        if "speedup" in row:
            out[f"bench/{row['linear']}_{row['tokens']}/speedup"] = row["speedup"]
    if cfg["bench"].get("layer", True):
        from flatquant.kernels.bench_layer import bench_decoder_layer

        layer = bench_decoder_layer(shape["hidden"], shape["intermediate"], shape["num_heads"], shape["num_kv_heads"],
                                    shape["head_dim"], str(Path(cfg["results_dir"]) / "bench"))
        for row in layer["rows"]:
            if "speedup" in row:
                out[f"bench/layer_{row['phase']}_b{row['batch']}/speedup"] = row["speedup"]
    return out
