"""Stage calibrate: block-wise calibration of every decoder layer, resumable per layer.

Each finished layer is saved under artifacts/calib/<model>_<method>_<bits>_<config hash>/, so running the
same configuration again (after a crash, or from the eval stage) continues where it stopped.
"""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import torch

from flatquant.adapters import adapter_for
from flatquant.lazy import materialize
from pipeline import figures
from pipeline.interrupt import raise_if_terminated

from flatquant.calibrate import calibrate_layers, quantize_model

log = logging.getLogger(__name__)


def run_range(cfg: dict, ctx) -> tuple[dict[str, float], bool]:
    """This process's share of a calibration split over processes (ctx.layer_range), into the shared store, the
    model left unchanged. Returns its metrics and whether this process goes on to the full run (merge, export,
    evaluation): the one that saved the store's last missing layer, or worker 0 when all were there already."""
    start, end = ctx.layer_range
    n = ctx.model.config.num_hidden_layers
    samples = ctx.calib_samples() if ctx.ccfg.needs_data(ctx.method) else torch.zeros(0, 0, dtype=torch.long)
    if ctx.offload is not None:
        ctx.offload.remove()
    try:
        got = calibrate_layers(ctx.model, samples, ctx.method, ctx.qcfg, ctx.ccfg, ctx.calib_dir, start, end)
    finally:
        ctx.restream()
    complete = got.stored >= n
    goes_on = complete and (got.saved > 0 or cfg["calib"].get("worker", 0) == 0)
    out = {"calibrate/range_start": start, "calibrate/range_end": end, "calibrate/range_trained_layers": got.saved,
           "calibrate/range_seconds": sum(r.seconds for r in got.reports), "calibrate/stored_layers": got.stored,
           "calibrate/range_fp_forward_seconds": got.fp_seconds}
    if not goes_on:
        why = (f"{n - got.stored} of {n} layers are still missing: the process that saves the last one merges and "
               f"evaluates (or run the same command without calib.layers/calib.workers, or with stage=eval, later)"
               if not complete else "all layers are stored; another process (the one that saved the last) evaluates")
        log.info("calibrated layers %d:%d of %d into %s (%d trained here); %s", start, end, n, ctx.calib_dir, got.saved, why)
        print(f"layers {start}:{end} of {n} calibrated into {ctx.calib_dir}; {why}")
    return out, goes_on


def run(cfg: dict, ctx) -> dict[str, float]:
    if not ctx.method.quantizes:
        return {}
    samples = ctx.calib_samples() if ctx.ccfg.needs_data(ctx.method) else torch.zeros(0, 0, dtype=torch.long)

    def on_layer(report, state):
        raise_if_terminated()  # the layer is saved: a SIGTERM whose first raise was lost stops the run here
        if ctx.tracker is None:
            return
        by_layer = {"init_mse": report.init_loss, "final_mse": report.final_loss, "seconds": report.seconds}
        finite = {f"calibrate/by_layer/{k}": v for k, v in by_layer.items() if math.isfinite(v)}  # step = layer
        ctx.tracker.metrics(finite, step=report.index)

    adapter = adapter_for(ctx.model)
    fp_layer0 = materialize(copy.deepcopy(adapter.layers(ctx.model)[0])).float() if samples.numel() else None
    if ctx.offload is not None:
        ctx.offload.remove()  # calibration moves one layer at a time itself; the quantized layers come back to the CPU
    try:
        reports = quantize_model(ctx.model, samples, ctx.method, ctx.qcfg, ctx.ccfg, ctx.calib_dir, on_layer)
    except torch.OutOfMemoryError as e:
        c = cfg["calib"]
        raise RuntimeError(
            f"GPU out of memory while calibrating {cfg['model']['name']}: keep the layer inputs and targets off the "
            f"GPU (calib.storage=cpu, or disk; now {c.get('storage', 'auto')}), calibrate on fewer samples "
            f"(calib.nsamples, now {c['nsamples']}) or stream the model's layers from CPU memory (offload=true, now "
            f"{cfg.get('offload', 'auto')}); finished layers are saved: the same command resumes at the next one"
        ) from e
    plots = Path(cfg["artifacts_dir"]) / "plots" / ctx.calib_dir.name  # a run's own outputs stay out of results/
    paths = figures.calibration_figures(reports, plots)
    if fp_layer0 is not None:
        with torch.no_grad():
            x = adapter.embed(ctx.model)(samples[:1].to(ctx.device)).float()[0]
        qlayer0 = adapter.layers(ctx.model)[0]
        home = next(qlayer0.buffers()).device
        paths.append(figures.flatness_figure(fp_layer0.to(ctx.device), qlayer0.to(ctx.device), ctx.model.config, x, plots,
                                              ctx.method.name))
        qlayer0.to(home)
    ctx.restream()
    if ctx.tracker is not None:
        ctx.tracker.artifact(ctx.calib_dir, "calibration")
        for path in paths:
            ctx.tracker.artifact(path, "plots")
    ctx.layer_series = {"init_mse": [r.init_loss for r in reports], "final_mse": [r.final_loss for r in reports],
                        "seconds": [r.seconds for r in reports]}
    out = {"calibrate/seconds": sum(r.seconds for r in reports), "calibrate/resumed_layers": sum(r.resumed for r in reports),
           "calibrate/fallback_layers": sum(bool(r.fallback) for r in reports)}
    finals = [r.final_loss for r in reports if math.isfinite(r.final_loss)]
    if finals:
        out["calibrate/mean_final_mse"] = sum(finals) / len(finals)
        out["calibrate/max_final_mse"] = max(finals)
    return out
