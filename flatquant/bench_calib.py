"""Time block-wise calibration of one decoder layer at a model's shape on the GPU (random weights and inputs).

Usage::

    python run.py stage=bench model=llama3_8b                     # bench.calibration=true: this, through the pipeline

    from flatquant.bench_calib import bench_calibration
    res = bench_calibration(4096, 14336, 32, 8, 128)              # LLaMA-3-8B shape, reference schedule
    res["ms_per_step"], res["s_per_layer"]                        # results/bench/<gpu>_calibration.json

A step is one step of flatquant.calibrate.train_layer: forward of the CalibLayer on `batch_size` ×
`seqlen` tokens, MSE to the full-precision layer's outputs, backward, AdamW. `steps` of them are timed with CUDA
synchronisation after a warm-up of WARMUP_STEPS (autotuning, allocator); s_per_layer projects the time per step
onto the schedule, ceil(nsamples / batch_size) steps per epoch × epochs (the reference schedule, 128 × 2048 tokens
at batch 4 for 15 epochs: 480 steps). Only the samples that are stepped on are made, so an 8B layer needs no
8 GiB of inputs and targets; they live on the GPU (calib.storage=device), where pinned-CPU or disk storage would
add one host-to-device copy per step. schedule_buffers_gib says what the full schedule's inputs and targets take
(flatquant.placement decides where they go). results/gpu/calib_timing*.json hold H100 numbers measured this way
(with all 128 samples made): 47 ms per step at SmolLM2's shape, 305 ms at 8B's (97 ms with amp), 268 ms at 70B's
with amp.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch

from flatquant.adapters import adapter_for
from flatquant.calibrate import CalibConfig, _layer_io, layer_mse, split_layers, train_layer
from flatquant.layer import CalibLayer
from flatquant.methods import get_method
from flatquant.spec import QuantConfig

WARMUP_STEPS = 2


def bench_calibration(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int, head_dim: int,
                      out_dir: str | None = "results/bench", nsamples: int = 128, seqlen: int = 2048,
                      batch_size: int = 4, epochs: int = 15, amp: bool = False, steps: int = 8, method=None,
                      qcfg: QuantConfig | None = None, device="cuda", n_layers: int | None = None,
                      workers: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Time calibration steps of one random layer of this shape (method: a trainable flatquant.methods method,
    FlatQuant by default; qcfg: its quantizers, W4A4KV4 by default). Returns {"device", "torch", "method",
    "shape", "schedule", "steps_timed", "ms_per_step", "s_per_layer", "mse_before", "mse_after", "peak_gib",
    "schedule_buffers_gib", "fp_forward_s_per_layer", "split"} (mse_*: layer MSE on the timed samples before and
    after the timed steps; peak_gib: peak GPU memory allocated while they ran, None on the CPU, where only the tests
    run it; fp_forward_s_per_layer: one full-precision pass of the layer over the schedule's nsamples, what a worker
    of a split calibration spends per layer before its range; split: with n_layers, split_projection for each
    number of workers); writes <out_dir>/<device name>_calibration.json."""
    method = method or get_method("flatquant")
    if not method.trainable:
        raise ValueError(f"method {method.name} does not train: there is no calibration step to time")
    if min(nsamples, seqlen, batch_size, epochs, steps) < 1:
        raise ValueError(f"calibration timing needs nsamples, seqlen, batch_size, epochs and steps >= 1, got "
                         f"{dict(nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, epochs=epochs, steps=steps)}")
    from flatquant.bench_layer import random_decoder_layer

    device = torch.device(device)
    cuda = device.type == "cuda"
    cfg, layer, rotary = random_decoder_layer(hidden, intermediate, num_heads, num_kv_heads, head_dim, device)
    parts = adapter_for(cfg).parts(layer, cfg)
    ccfg = CalibConfig(epochs=1, batch_size=batch_size, device=str(device), amp=amp)  # one pass over what it is given
    gen = torch.Generator(device).manual_seed(0)
    inps = torch.randn((WARMUP_STEPS + steps) * batch_size, seqlen, hidden, device=device, generator=gen)
    pe = tuple(t.float() for t in rotary(inps[:1], torch.arange(seqlen, device=device).unsqueeze(0)))
    targets, stats = _layer_io(layer, inps, pe, batch_size, parts.slot_inputs())
    qlayer = CalibLayer(parts, qcfg or QuantConfig(), method.transforms(parts, stats, torch.Generator().manual_seed(0)))
    qlayer = qlayer.to(device)
    warm, timed = slice(0, WARMUP_STEPS * batch_size), slice(WARMUP_STEPS * batch_size, None)
    before = layer_mse(qlayer, inps[timed], targets[timed], pe, batch_size)
    train_layer(qlayer, inps[warm], targets[warm], pe, ccfg, ccfg.lr)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    train_layer(qlayer, inps[timed], targets[timed], pe, ccfg, ccfg.lr)
    if cuda:
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t0) / steps
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None  # of the timed steps alone
    fp_pass = _time_fp_forward(layer, inps, pe, batch_size, cuda) * nsamples / len(inps)
    res = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
           "method": method.name,
           "shape": dict(hidden=hidden, intermediate=intermediate, num_heads=num_heads, num_kv_heads=num_kv_heads,
                         head_dim=head_dim),
           "schedule": dict(nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, epochs=epochs, amp=amp),
           "steps_timed": steps, "ms_per_step": 1000 * per_step,
           "s_per_layer": per_step * math.ceil(nsamples / batch_size) * epochs,
           "mse_before": before, "mse_after": layer_mse(qlayer, inps[timed], targets[timed], pe, batch_size),
           "peak_gib": peak_gib,
           "schedule_buffers_gib": 2 * 4 * nsamples * seqlen * hidden / 2**30,
           "fp_forward_s_per_layer": fp_pass}
    s_layer = res["s_per_layer"]
    res["split"] = {w: split_projection(n_layers, w, s_layer, fp_pass) for w in workers} if n_layers else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, res["device"].replace(" ", "_") + "_calibration.json"), "w") as f:
            json.dump(res, f, indent=1)
    return res


def _time_fp_forward(layer, inps, pe, batch_size: int, cuda: bool) -> float:
    """Seconds of one full-precision pass of `layer` over `inps`, as calibrate_layers carries the activations
    through the layers before a worker's range (the pass that made the targets, on the same layer and inputs, was
    its warm-up)."""
    out = torch.empty_like(inps)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _layer_io(layer, inps, pe, batch_size, {}, out=out)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def split_projection(n_layers: int, workers: int, s_per_layer: float, fp_s_per_layer: float) -> dict:
    """Wall time of calibrating n_layers split over `workers` processes (one GPU each, calib.workers=N): worker k
    carries the FP activations through the `start` layers before its range (flatquant.calibrate.split_layers), then
    trains its own; the slowest worker bounds the run. One process trains all n_layers. Returns {"wall_s",
    "one_process_s", "speedup", "fp_share" (of the slowest worker's time), "slowest_worker"}. The FP forward that
    makes each trained layer's targets, the data loading and the final merge are the same in both and left out."""
    times = []
    for k in range(workers):
        start, end = split_layers(n_layers, workers, k)
        times.append((start * fp_s_per_layer + (end - start) * s_per_layer, start * fp_s_per_layer))
    slowest = max(range(workers), key=lambda k: times[k][0])
    wall, fp = times[slowest]
    one = n_layers * s_per_layer
    return {"wall_s": wall, "one_process_s": one, "speedup": one / wall, "fp_share": fp / wall,
            "slowest_worker": slowest}
