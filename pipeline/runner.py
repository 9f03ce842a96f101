"""One tracked run: validate the config, seed, open the MLflow run, run the stages, print the summary.

Usage (what run.py does with the composed Hydra config):
    metrics = execute(OmegaConf.to_container(cfg, resolve=True))
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from flatquant.flat import flatten
from pipeline import bench, calibrate, eval_generate, eval_ppl, eval_qa, export, prepare_data
from pipeline.context import Context
from pipeline.interrupt import on_sigterm_raise, raise_if_terminated
from pipeline.tracking import Tracker

log = logging.getLogger(__name__)

STAGES = {
    "prepare_data": [prepare_data.run],
    "calibrate": [prepare_data.run, calibrate.run, export.run],
    "eval": [prepare_data.run, eval_ppl.baseline, eval_qa.baseline, calibrate.run, eval_ppl.run, eval_qa.run,
             eval_generate.run],
    "bench": [bench.run],
    "all": [prepare_data.run, eval_ppl.baseline, eval_qa.baseline, calibrate.run, export.run, eval_ppl.run, eval_qa.run,
            eval_generate.run],
}


def stage_name(stage) -> str:
    """eval_ppl.baseline → "eval_ppl_baseline", calibrate.run → "calibrate" (the key of its wall time)."""
    module = stage.__module__.rsplit(".", 1)[-1]
    return module if stage.__name__ == "run" else f"{module}_{stage.__name__}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def bits(cfg: dict) -> str:
    q = cfg["quant"]
    return f"w{q['w_bits']}a{q['a_bits']}kv{max(q['k_bits'], q['v_bits'])}"


def run_key(cfg: dict) -> str:
    """model/method/bits/wquant: what a result table row is (and a metrics file is named after)."""
    return f"{cfg['model']['name']}/{cfg['method']['name']}/{bits(cfg)}/{cfg['wquant']}"


def schedule(cfg: dict) -> str:
    """The calibration schedule in one word: samples x tokens x epochs, e.g. 128x2048x15ep."""
    c = cfg["calib"]
    return f"{c['nsamples']}x{c['seqlen']}x{c['epochs']}ep"


def run_name(cfg: dict) -> str:
    """The MLflow run name: model/method/bits/wquant/schedule/seed, so that runs that differ look different."""
    c = cfg["calib"]
    split = (f"/layers{c['layers']}" if c.get("layers") is not None else
             f"/worker{c.get('worker', 0)}of{c['workers']}" if c.get("workers", 1) > 1 else "")
    return f"{run_key(cfg)}/{schedule(cfg)}/seed{cfg['seed']}{split}"


def run_tags(cfg: dict) -> dict[str, str]:
    """Tags the MLflow runs table and search box filter on (e.g. `tags.method = 'flatquant'`)."""
    d = cfg["data"]
    return {"model": cfg["model"]["name"], "method": cfg["method"]["name"], "bits": bits(cfg), "wquant": cfg["wquant"],
            "schedule": schedule(cfg), "seed": str(cfg["seed"]), "stage": cfg["stage"], "device": device_name(cfg),
            "calib_data": f"{d['calib_dataset']}/{d['calib_split']}", "eval_data": ",".join(d["eval_datasets"])}


def summary_table(cfg: dict, metrics: dict) -> str:
    rows = ["| model | method | bits | weights | dataset | FP ppl | quantized ppl | wall time (s) |",
            "|---|---|---|---|---|---|---|---|"]
    name = run_key(cfg).split("/")
    for ds in cfg["data"]["eval_datasets"]:
        fp, q = metrics.get(f"eval_ppl/{ds}/ppl_fp"), metrics.get(f"eval_ppl/{ds}/ppl")
        fmt = lambda v: "—" if v is None else f"{v:.3f}"
        rows.append(f"| {name[0]} | {name[1]} | {name[2]} | {name[3]} | {ds} | {fmt(fp)} | {fmt(q)} | {metrics['run/wall_seconds']:.0f} |")
    return "\n".join(rows)


def device_name(cfg: dict) -> str:
    """What ran it, for table captions: the GPU's name, or the CPU's core count."""
    device = str(cfg.get("device", "cpu"))
    if device != "cpu" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device("cuda" if device == "auto" else device))
    return f"CPU ({os.cpu_count()} cores)"


def write_metrics_json(path: str | Path, cfg: dict, metrics: dict[str, float], run_id: str | None,
                       start_time_ms: int, layers: dict[str, list[float]] | None = None) -> Path:
    """The run as {"config", "metrics", "run_id", "start_time", "device", "layers"} JSON (what `dvc repro` and
    analysis.tables read); "layers" holds per-layer series such as {"final_mse": [...]} (NaN written as null).

    A path ending in "/" is a folder: the file is named after the run (model-method-bits-wquant.json). Written to
    a temporary name first and renamed, so a crash never leaves a half-written metrics file that DVC would record
    as the stage's output."""
    if str(path).endswith("/"):  # a folder: one file per run, named like the run (sweeps write here)
        path = Path(path) / (run_key(cfg).replace("/", "-") + ".json")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"config": {k: v for k, v in cfg.items() if k != "metrics_out"}, "metrics": metrics,
            "run_id": run_id, "start_time": start_time_ms, "device": device_name(cfg),
            "layers": {k: [v if math.isfinite(v) else None for v in vals] for k, vals in (layers or {}).items()}}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(blob, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)
    return path


def execute(cfg: dict) -> dict[str, float]:
    if cfg["stage"] not in STAGES:
        raise ValueError(f"stage={cfg['stage']!r} is not one of {sorted(STAGES)}")
    t0 = time.time()
    ctx = Context(cfg)  # validates every group before anything is opened or loaded
    seed_everything(cfg["seed"])
    t = cfg["tracking"]
    local = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    tracker = Tracker(t["uri"] or local, t["experiment"], run_name(cfg), flatten(cfg), t["enabled"], fallback_uri=local,
                      tags=run_tags(cfg))
    try:
        with on_sigterm_raise(), tracker:
            try:
                return _stages(cfg, ctx, tracker, t0)
            except KeyboardInterrupt as e:  # SIGINT, or SIGTERM (timeout, kill, SLURM preemption) via on_sigterm_raise
                saved = f" (finished layers are saved in {ctx.calib_dir})" if ctx.method.quantizes else ""
                log.error("interrupted by %s%s: the MLflow run ends KILLED; run the same command again to resume",
                          e.args[0] if e.args else "SIGINT", saved)
                raise
    finally:
        if tracker.run_id:
            print(f"MLflow run {tracker.run_id} ({run_name(cfg)}) in {tracker.uri}: open it with "
                  f"`mlflow ui --backend-store-uri {tracker.uri}`, then {tracker.run_url()}")


def _stages(cfg: dict, ctx: Context, tracker, t0: float) -> dict[str, float]:
    """Run the stages of cfg["stage"] in order, logging each one's metrics and wall time; print the summary."""
    ctx.tracker = tracker
    metrics: dict[str, float] = {}
    if cfg["stage"] in ("calibrate", "eval", "all") and ctx.method.quantizes and ctx.layer_range is not None:
        t_stage = time.time()  # one share of a calibration split over processes: that first, then the rest or stop
        out, goes_on = calibrate.run_range(cfg, ctx)
        out["time/calibrate_range_seconds"] = time.time() - t_stage
        tracker.metrics(out)
        metrics.update(out)
        if not goes_on:
            metrics["run/wall_seconds"] = time.time() - t0
            tracker.metrics({"run/wall_seconds": metrics["run/wall_seconds"]})
            return metrics  # no summary and no metrics file: the process that evaluates writes them
    for stage in STAGES[cfg["stage"]]:
        raise_if_terminated()
        t_stage = time.time()
        out = stage(cfg, ctx)
        out[f"time/{stage_name(stage)}_seconds"] = time.time() - t_stage
        tracker.metrics(out)
        metrics.update(out)
    raise_if_terminated()
    metrics["run/wall_seconds"] = time.time() - t0
    tracker.metrics({"run/wall_seconds": metrics["run/wall_seconds"]})
    if cfg["stage"] in ("eval", "all"):
        table = summary_table(cfg, metrics)
        print(table)
        tracker.text(table, "summary.md")
        tracker.describe(table)
    if cfg.get("metrics_out"):
        write_metrics_json(cfg["metrics_out"], cfg, metrics, tracker.run_id, int(t0 * 1000), ctx.layer_series)
    return metrics
