"""Stage eval_generate: greedy continuations of eval.prompts by the evaluated (quantized) model.

    python run.py eval.prompts='["The capital of Germany is"]' eval.max_new_tokens=8

Each continuation is printed, logged to the MLflow run as generations.json ({prompt: text}) and written beside the
metrics JSON when +metrics_out names a file (<name>.generations.json). A model of QuantLayers generates with the
4-bit QuantKVCache (flatquant/generate.py), so this is also what the packed cache makes of the prompts. Off by
default (eval.prompts: []). They decode from a CUDA graph (eval.cuda_graph, default true:
flatquant.generate.fixed_cache_greedy, the same greedy text without the host's per-layer launches; on an H200 it
gave the eager loop's texts for the default model in fake quantization and on the kernels); eval.cuda_graph=false
runs model.generate.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from flatquant.generate import generate

log = logging.getLogger(__name__)


def run(cfg: dict, ctx) -> dict[str, float]:
    e = cfg["eval"]
    prompts = list(e.get("prompts") or [])
    if not prompts:
        return {}
    model = ctx.eval_model()
    t0 = time.time()
    texts = generate(model, ctx.tokenizer, prompts, e.get("max_new_tokens", 16), ctx.device,
                     cuda_graph=bool(e.get("cuda_graph", True)))
    seconds = time.time() - t0
    pairs = dict(zip(prompts, texts))
    for prompt, text in pairs.items():
        log.info("%r → %r", prompt, text)
        print(f"{prompt!r} → {text!r}")
    blob = json.dumps(pairs, indent=1, ensure_ascii=False)
    if ctx.tracker is not None:
        ctx.tracker.text(blob, "generations.json")
    out = cfg.get("metrics_out")
    if out and not str(out).endswith("/"):
        Path(out).with_suffix(".generations.json").write_text(blob + "\n")
    return {"eval_generate/seconds": seconds}
