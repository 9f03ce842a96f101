"""Time block-wise calibration per layer on the GPU: the default model and LLaMA-shaped random layers.

    python scripts/time_calibration.py --gguf /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf --out $OUT/calib_timing.json

For each case: one epoch of the reference schedule (128 × 2048 tokens, batch 4 → 32 steps) after a warm-up,
timed with CUDA synchronisation; ms per step, projected seconds per layer (15 epochs), the loss before and
after, and peak GPU memory. LLaMA-shaped layers use random weights (no checkpoint needed) and random inputs.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from flatquant.adapters import adapter_for
from flatquant.calibrate import CalibConfig, _layer_io, layer_inputs, layer_mse, train_layer
from flatquant.layer import QuantDecoderLayer
from flatquant.methods import get_method, slot_inputs
from flatquant.spec import QuantConfig


def _case(layer, parts, inps, pe, ccfg: CalibConfig, steps_timed: int) -> dict:
    targets, stats = _layer_io(layer, inps, pe, ccfg.batch_size, slot_inputs(parts))
    q = QuantDecoderLayer(parts, QuantConfig(), get_method("flatquant").transforms(parts, stats, torch.Generator().manual_seed(0)))
    q = q.to(inps.device)
    init = layer_mse(q, inps, targets, pe, ccfg.batch_size)
    n = steps_timed * ccfg.batch_size
    warm = CalibConfig(**{**ccfg.__dict__, "epochs": 1})
    train_layer(q, inps[: 2 * ccfg.batch_size], targets[: 2 * ccfg.batch_size], pe, warm, ccfg.lr)  # compile / cache warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    train_layer(q, inps[:n], targets[:n], pe, warm, ccfg.lr)
    torch.cuda.synchronize()
    per_step = (time.time() - t0) / steps_timed
    steps_per_epoch = 128 // ccfg.batch_size
    return {"ms_per_step": 1000 * per_step, "projected_s_per_layer": per_step * steps_per_epoch * 15,
            "init_mse": init, "mse_after_1_epoch": layer_mse(q, inps, targets, pe, ccfg.batch_size),
            "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30}


def llama_shaped(hidden, inter, heads, kv_heads, nsamples, seqlen, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, rope_theta=500000.0)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(cfg, 0).to(device)
    inps = torch.randn(nsamples, seqlen, hidden, device=device)
    pe = LlamaRotaryEmbedding(cfg).to(device)(inps[:1], torch.arange(seqlen, device=device)[None])
    return layer, adapter_for(cfg).parts(layer, cfg), inps, pe


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=None, help="the default model's GGUF, for the smollm2 case")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--shapes", default="smollm2,llama3_8b")
    ap.add_argument("--amp-only", action="store_true")
    args = ap.parse_args()
    device, results = "cuda", {"gpu": torch.cuda.get_device_name()}
    for amp in ((True,) if args.amp_only else (False, True)):
        ccfg = CalibConfig(device=device, amp=amp)
        if "smollm2" in args.shapes.split(","):
            from flatquant.data import calib_samples, load_tokens
            from flatquant.model import load_model

            model, tok = load_model(args.gguf, device=device)
            samples = calib_samples(load_tokens(tok, "wikitext2", "valid"), 128, 2048, seed=0)
            inps, pe = layer_inputs(model, samples, device)
            layer = adapter_for(model).layers(model)[0]
            results[f"smollm2_layer0_amp{int(amp)}"] = _case(layer, adapter_for(model).parts(layer, model.config), inps, pe, ccfg, args.steps)
            del model, inps
        if "smollm2_shaped" in args.shapes:  # the default model's shapes with random weights: no GGUF needed
            layer, parts, inps, pe = llama_shaped(576, 1536, 9, 3, 128, 2048, device)
            results[f"smollm2_shaped_layer_amp{int(amp)}"] = _case(layer, parts, inps, pe, ccfg, args.steps)
            del layer, inps
        if "llama3_8b" in args.shapes:
            layer, parts, inps, pe = llama_shaped(4096, 14336, 32, 8, 128, 2048, device)
            results[f"llama3_8b_layer_amp{int(amp)}"] = _case(layer, parts, inps, pe, ccfg, args.steps)
            del layer, inps
        if "llama3_70b" in args.shapes:
            layer, parts, inps, pe = llama_shaped(8192, 28672, 64, 8, 128, 2048, device)
            results[f"llama3_70b_layer_amp{int(amp)}"] = _case(layer, parts, inps, pe, ccfg, args.steps)
            del layer, inps
        torch.cuda.empty_cache()
        print(json.dumps(results, indent=1), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
