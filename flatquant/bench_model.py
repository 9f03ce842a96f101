"""Time a whole model generating: prefill latency and decode tokens/s with the KV cache, fp16 against W4A4KV4.

Usage (CUDA):
    from flatquant.bench_model import bench_model
    res = bench_model(dict(hidden=4096, intermediate=14336, num_heads=32, num_kv_heads=8, head_dim=128,
                           num_layers=32), out_dir="results/bench")          # results/bench/<gpu>_model.json, .md

Both models get the same random weights (transformers' LlamaForCausalLM in fp16). Ours is FlatQuant's: each decoder
layer a QuantLayer (Kronecker transforms at their untrained start, weights RTN 4-bit) on the kernels
(`use_kernels`), generating with flatquant.cache.QuantKVCache (4-bit codes; decode_attention over them); the fp16
model with transformers' DynamicCache. One layer is converted and copied to every position (random weights: the
timing does not depend on their values), so that building an 8B-shaped model takes seconds.

Decode is timed two ways. Eager (`decode_*`): as `model.generate` runs the models, every op launched from Python
(the host's launch time is part of it). CUDA graph (`graph_decode_*`): one greedy step captured and replayed
(flatquant.generate.GreedyDecoder), fp16 with transformers' StaticCache, ours with QuantKVCache(max_length=…), both
prefilled eagerly first; this is the GPU's time for a step, what a serving engine gets. While a graph is captured
transformers builds an attention mask for the fp16 model's one-token steps, and its SDPA path then copies K/V per
query head (repeat_kv), which eager decoding without a mask does not: at large batches fp16's graphed step is slower
than its eager one. `best_decode_speedup` compares each model at its faster way. Prefill runs eagerly.

For each batch: prefill = one forward over (batch, context) random tokens into an empty cache (only the last
position's logits), decode = `steps` one-token forwards after it; medians over `repeats` timed runs after one
warm-up. Reported per model: prefill ms, decode ms per step and tokens/s (batch / step time), KV cache bytes after
prefill and what the cache has allocated after the decode steps (kv_cache_held_bytes_after_decode), its weights'
bytes (weights_gib), and memory: peak_*_gib is torch.cuda.max_memory_allocated during the
phase, which counts everything resident — both models are, so it includes the other model's weights too —, and
work_*_gib the peak above what was allocated when the phase began (activations, the cache, logits); and the ratios
ours/fp16 (speedups: fp16 time / ours).
"""

from __future__ import annotations

import copy
import statistics

import torch

from flatquant.bench_layer import table_rows, write_results

BATCHES = (1, 8, 32, 64)


def build_models(shape: dict, vocab: int = 32000, max_positions: int = 8192, device="cuda"):
    """(fp16 LlamaForCausalLM with random weights, its W4A4KV4 twin on the kernels)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from flatquant.adapters import adapter_for
    from flatquant.convert import convert
    from flatquant.layer import CalibLayer
    from flatquant.methods import get_method
    from flatquant.spec import QuantConfig

    cfg = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
                      head_dim=shape["head_dim"], num_hidden_layers=shape["num_layers"], vocab_size=vocab,
                      max_position_embeddings=max_positions)
    torch.manual_seed(0)
    with torch.device(device):
        fp = LlamaForCausalLM(cfg).half().eval().requires_grad_(False)
    adapter = adapter_for(fp)
    first = copy.deepcopy(adapter.layers(fp)[0]).float()
    parts = adapter.parts(first, cfg)
    stats = {slot: torch.ones(lin.weight.shape[1], device=device) for slot, lin in parts.slot_inputs().items()}
    qlayer = convert(CalibLayer(parts, QuantConfig(), get_method("flatquant").transforms(
        parts, stats, torch.Generator().manual_seed(0))).to(device), "rtn")
    qlayer.use_kernels()
    del first
    ours = copy.deepcopy(fp)
    layers = adapter.layers(ours)
    for i in range(len(layers)):
        layers[i] = copy.deepcopy(qlayer)
        layers[i].attn.layer_idx = i
    return fp, ours


def _cache_bytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _time_phase(model, make_cache, ids: torch.Tensor, steps: int, repeats: int) -> dict:
    """One warm-up and `repeats` timed runs of prefill + `steps` decode steps; medians."""
    from flatquant.generate import cache_kwarg

    key = cache_kwarg(model)
    prefill, decode, peak_prefill, peak_decode, kv, held = [], [], 0, 0, 0, 0
    work_prefill = work_decode = 0
    for r in range(repeats + 1):
        cache = make_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        with torch.no_grad():
            start.record()
            out = model(ids, **{key: cache}, use_cache=True, logits_to_keep=1)
            mid.record()
            torch.cuda.synchronize()
            peak_prefill = max(peak_prefill, torch.cuda.max_memory_allocated())
            work_prefill = max(work_prefill, torch.cuda.max_memory_allocated() - base)
            kv = _cache_bytes(cache)
            nxt = out.logits[:, -1:].argmax(-1)
            torch.cuda.reset_peak_memory_stats()
            base_decode = torch.cuda.memory_allocated()
            step0 = torch.cuda.Event(enable_timing=True)
            step0.record()
            for _ in range(steps):
                out = model(nxt, **{key: cache}, use_cache=True, logits_to_keep=1)
                nxt = out.logits[:, -1:].argmax(-1)
            end.record()
            torch.cuda.synchronize()
            held = cache.held_bytes() if hasattr(cache, "held_bytes") else _cache_bytes(cache)
            peak_decode = max(peak_decode, torch.cuda.max_memory_allocated())
            work_decode = max(work_decode, torch.cuda.max_memory_allocated() - base_decode + kv)
        if r:
            prefill.append(start.elapsed_time(mid))
            decode.append(step0.elapsed_time(end) / steps)
        del cache, out
    return {"prefill_ms": statistics.median(prefill), "decode_ms_per_step": statistics.median(decode),
            "peak_prefill_gib": peak_prefill / 2**30, "peak_decode_gib": peak_decode / 2**30, "kv_cache_bytes": kv,
            "kv_cache_held_bytes_after_decode": held, "work_prefill_gib": work_prefill / 2**30, "work_decode_gib": work_decode / 2**30,
            "weights_gib": sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**30}


def _time_graph_decode(model, make_cache, ids: torch.Tensor, steps: int, repeats: int) -> dict:
    """Prefill into a fixed-capacity cache, capture one greedy step, then `repeats` + 1 runs of `steps` replays (the
    first a warm-up); median ms per step."""
    from flatquant.generate import GreedyDecoder, prefill

    cache = make_cache()
    decoder = GreedyDecoder(model, cache, prefill(model, cache, ids), ids.shape[1])
    times = []
    for r in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        decoder(steps, sync=False)
        end.record()
        torch.cuda.synchronize()
        if r:
            times.append(start.elapsed_time(end) / steps)
    del decoder, cache
    return {"graph_decode_ms_per_step": statistics.median(times)}


def _profile_decode(model, make_cache, ids: torch.Tensor, steps: int, top: int = 24) -> dict:
    """Where a decode step's GPU time goes: flatquant.bench_layer.top_kernels over `steps` eager one-token steps
    into a fixed-capacity cache (the kernels the graphed step replays; the host's time is not in it)."""
    from flatquant.bench_layer import top_kernels
    from flatquant.generate import GreedyDecoder, prefill

    cache = make_cache()
    decoder = GreedyDecoder(model, cache, prefill(model, cache, ids), ids.shape[1], cuda_graph=False)
    return top_kernels(lambda: decoder(1), steps, top)


def bench_model(shape: dict, out_dir: str | None = "results/bench", batches=BATCHES, context: int | tuple = 2048,
                steps: int = 16, repeats: int = 2, vocab: int = 32000, name: str = "", max_tokens: int | None = None,
                profile: bool = False) -> dict:
    """One row per context × batch (context: one or several), skipping rows of more than max_tokens prompt tokens
    (batch × context) when it is given; JSON + markdown in out_dir (None: nothing written). profile: also
    `<fp16|w4a4>_profile` per row, the GPU time of a decode step by kernel (`_profile_decode`)."""
    contexts = (context,) if isinstance(context, int) else tuple(context)
    pairs = [(c, b) for c in contexts for b in batches if max_tokens is None or b * c <= max_tokens]
    if not pairs:
        raise ValueError(f"no batch × context of {batches} × {contexts} is within max_tokens={max_tokens}")
    from transformers import DynamicCache, StaticCache

    from flatquant.cache import QuantKVCache

    extra = (repeats + 1) * steps + 1 + 3  # the graphed runs keep appending to one prefilled cache (+ 3 warm-ups)
    fp, ours = build_models(shape, vocab, max(contexts) + extra + 8)
    eager = {"fp16": lambda: DynamicCache(config=fp.config), "w4a4": QuantKVCache}
    rows = []
    for context, batch in pairs:
        capacity = context + extra
        fixed = {"fp16": lambda: StaticCache(config=fp.config, max_cache_len=capacity),
                 "w4a4": lambda: QuantKVCache(max_length=capacity)}
        ids = torch.randint(0, vocab, (batch, context), device="cuda")
        row = {"batch": batch, "context": context, "steps": steps}
        for label, model in (("fp16", fp), ("w4a4", ours)):
            try:
                r = _time_phase(model, eager[label], ids, steps, repeats)
                torch.cuda.empty_cache()
                r.update(_time_graph_decode(model, fixed[label], ids, steps, repeats))
                if profile:
                    torch.cuda.empty_cache()
                    r["profile"] = _profile_decode(model, fixed[label], ids, steps)
            except torch.OutOfMemoryError as e:
                row[f"{label}_error"] = f"out of memory: {str(e)[:120]}"
                torch.cuda.empty_cache()
                continue
            row.update({f"{label}_{k}": v for k, v in r.items()})
            row[f"{label}_decode_tokens_per_s"] = 1e3 * batch / r["decode_ms_per_step"]
            row[f"{label}_graph_decode_tokens_per_s"] = 1e3 * batch / r["graph_decode_ms_per_step"]
            torch.cuda.empty_cache()
        if "fp16_prefill_ms" in row and "w4a4_prefill_ms" in row:
            row["prefill_speedup"] = row["fp16_prefill_ms"] / row["w4a4_prefill_ms"]
            row["decode_speedup"] = row["fp16_decode_ms_per_step"] / row["w4a4_decode_ms_per_step"]
            row["graph_decode_speedup"] = row["fp16_graph_decode_ms_per_step"] / row["w4a4_graph_decode_ms_per_step"]
            best = {m: min(row[f"{m}_decode_ms_per_step"], row[f"{m}_graph_decode_ms_per_step"])
                    for m in ("fp16", "w4a4")}
            row["best_decode_speedup"] = best["fp16"] / best["w4a4"]  # each model at its faster way
            row["kv_bytes_ratio"] = row["w4a4_kv_cache_bytes"] / row["fp16_kv_cache_bytes"]
            row["peak_decode_ratio"] = row["w4a4_peak_decode_gib"] / row["fp16_peak_decode_gib"]
        rows.append(row)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
        del ids
        torch.cuda.empty_cache()
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": name, "shape": shape,
           "vocab": vocab, "rows": rows}
    if out_dir:
        write_results(res, out_dir, f"_model{'_' + name if name else ''}", markdown_table(res))
    return res


def markdown_table(res: dict) -> str:
    cols = ("batch", "context", "fp16_prefill_ms", "w4a4_prefill_ms", "prefill_speedup", "fp16_decode_tokens_per_s",
            "w4a4_decode_tokens_per_s", "decode_speedup", "fp16_graph_decode_tokens_per_s",
            "w4a4_graph_decode_tokens_per_s", "graph_decode_speedup", "best_decode_speedup", "kv_bytes_ratio",
            "fp16_peak_decode_gib",
            "w4a4_peak_decode_gib")
    lines = [f"# Whole model {res['model']}, W4A4KV4 (kernels, 4-bit KV cache) vs fp16 on {res['device']}",
             f"shape {res['shape']}, vocab {res['vocab']}, random weights; prefill and decode_* eager, graph_decode_* "
             "one decode step replayed from a CUDA graph (fp16: StaticCache)", "", *table_rows(res["rows"], cols)]
    return "\n".join(lines) + "\n"
