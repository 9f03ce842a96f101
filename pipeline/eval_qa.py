"""Stage eval_qa: zero-shot QA with the real lm-eval harness on the in-process (quantized) model.

Metric keys are eval_qa/<task>/acc (lm-eval's acc_norm where the task defines it, else acc) and
eval_qa/average/acc; data come from local folders (data.root), never from a hub.
"""

from __future__ import annotations

from flatquant.qa import evaluate_qa


def _scores(cfg: dict, ctx, suffix: str, model) -> dict[str, float]:
    e = cfg["eval"]
    tasks = list(e.get("qa_tasks") or [])
    if not tasks:
        return {}
    # the model is already placed (on the device, or streamed layer by layer): lm-eval follows its embeddings
    scores = evaluate_qa(model, ctx.tokenizer, tasks, cfg["data"].get("root"), e.get("qa_limit"),
                         e.get("qa_batch_size", 8), None, e["seqlen"])
    return {f"eval_qa/{task}/acc{suffix}": v for task, v in scores.items()}


def run(cfg: dict, ctx) -> dict[str, float]:
    return _scores(cfg, ctx, "", ctx.eval_model())


def baseline(cfg: dict, ctx) -> dict[str, float]:
    return _scores(cfg, ctx, "_fp", ctx.model) if cfg["eval"].get("qa_baseline", False) else {}
