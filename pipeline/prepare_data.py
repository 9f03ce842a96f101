"""Stage prepare_data: tokenize the calibration and evaluation text once (cached by content hash)."""

from __future__ import annotations


def run(cfg: dict, ctx) -> dict[str, float]:
    d = cfg["data"]
    out = {f"prepare_data/{d['calib_dataset']}/{d['calib_split']}_tokens": ctx.tokens(d["calib_dataset"], d["calib_split"]).numel()}
    for name in d["eval_datasets"]:
        out[f"prepare_data/{name}/test_tokens"] = ctx.tokens(name, "test").numel()
    return out
