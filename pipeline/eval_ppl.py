"""Stage eval_ppl: perplexity of the (quantized) model on each evaluation set; `baseline` does the FP model.

The full-precision numbers are cached under .cache/baseline by (model, data, eval settings), so a sweep
over methods evaluates the FP model once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flatquant.data import EVAL_WINDOW_CAP, eval_windows
from flatquant.evaluate import perplexity


def _ppl(cfg: dict, ctx, name: str, desc: str, model) -> float:
    e = cfg["eval"]
    cap = min(filter(None, (e["max_windows"], EVAL_WINDOW_CAP.get(name))), default=None)
    windows = eval_windows(ctx.tokens(name, "test"), e["seqlen"], cap)
    return perplexity(model, windows, ctx.device, e["batch_size"], desc=f"{desc} {name}")


def run(cfg: dict, ctx) -> dict[str, float]:
    return {f"eval_ppl/{n}/ppl": _ppl(cfg, ctx, n, "ppl", ctx.eval_model()) for n in cfg["data"]["eval_datasets"]}


def baseline(cfg: dict, ctx) -> dict[str, float]:
    if not cfg["eval"]["baseline"]:
        return {}
    cache = Path(".cache/baseline") / f"{cfg['model']['name']}_{ctx.key('model', 'data', 'eval')}_{ctx.device}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    out = {f"eval_ppl/{n}/ppl_fp": _ppl(cfg, ctx, n, "ppl fp", ctx.model) for n in cfg["data"]["eval_datasets"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # renamed into place: a parallel job never reads half
    tmp.write_text(json.dumps(out))
    tmp.replace(cache)
    return out
