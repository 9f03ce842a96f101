"""GPU checks of the real 4-bit path and of layer offloading; results as JSON (core calls only: the GPU machine
has torch + transformers + triton but not Hydra or MLflow).

    python scripts/gpu_real4bit.py --part offload70b --out $OUT/offload70b.json      # random 70B-shaped model
    python scripts/gpu_real4bit.py --part layer --out $OUT/layer.json                # decoder-layer benchmark
    python scripts/gpu_real4bit.py --part smollm2 --gguf /root/stage/x.gguf --out $OUT/real4bit.json

smollm2: FP16 perplexity on the whole WikiText-2 test set; then per method the quantized model's perplexity
three ways — fake quantization on the GPU, the same with the layers streamed from CPU memory (offload),
and on the W4A4 kernels (use_kernels) — and the kernel/fake ratio (the target: within 0.5%).
offload70b: a LLaMA-3-70B-shaped model with a few random layers kept in CPU memory: forward with the layers
streamed, calibration one layer at a time, forward of the quantized model; peak GPU memory of each.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30


def _reset() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _timed_ppl(model, windows, batch_size=1):
    from flatquant.evaluate import perplexity

    _reset()
    t0 = time.time()
    ppl = perplexity(model, windows, "cuda", batch_size)
    torch.cuda.synchronize()
    return {"ppl": ppl, "seconds": time.time() - t0, "peak_gib": _peak_gib()}


def part_smollm2(args, out: dict) -> None:
    from flatquant.adapters import adapter_for
    from flatquant.calibrate import CalibConfig, quantize_model
    from flatquant.data import calib_samples, eval_windows, load_tokens
    from flatquant.methods import get_method
    from flatquant.model import load_model
    from flatquant.offload import LayerOffload
    from flatquant.spec import QuantConfig

    model, tok = load_model(args.gguf, dtype=torch.float16, device="cuda")
    windows = eval_windows(load_tokens(tok, "wikitext2", "test"), 2048)
    samples = calib_samples(load_tokens(tok, "wikitext2", "valid"), args.nsamples, 2048, seed=0)
    out["windows"] = len(windows)
    out["fp16"] = _timed_ppl(model, windows)
    print("fp16", out["fp16"], flush=True)
    for name in args.methods.split(","):
        method = get_method(name)
        qcfg = QuantConfig() if method.learnable_clip else QuantConfig(lwc=False, lac=False)
        quant = copy.deepcopy(model)
        t0 = time.time()
        quantize_model(quant, samples, method, qcfg, CalibConfig(epochs=args.epochs, device="cuda", amp=args.amp))
        r = {"calib_seconds": time.time() - t0, "epochs": args.epochs, "nsamples": args.nsamples}
        r["fake"] = _timed_ppl(quant, windows)
        print(name, "fake", r["fake"], flush=True)
        quant.to("cpu")
        off = LayerOffload(quant, "cuda")
        r["fake_offload"] = _timed_ppl(quant, windows, batch_size=8)
        r["offload_layer_copies"] = off.copies
        off.remove()
        quant.to("cuda")
        print(name, "offload", r["fake_offload"], flush=True)
        for layer in adapter_for(quant).layers(quant):
            layer.use_kernels()
        r["kernels"] = _timed_ppl(quant, windows)
        r["kernel_over_fake"] = r["kernels"]["ppl"] / r["fake"]["ppl"]
        print(name, "kernels", r["kernels"], r["kernel_over_fake"], flush=True)
        out[name] = r
        del quant
        torch.cuda.empty_cache()
        _dump(args, out)


def part_offload70b(args, out: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from flatquant.calibrate import CalibConfig, quantize_model
    from flatquant.methods import get_method
    from flatquant.offload import LayerOffload, model_bytes
    from flatquant.spec import QuantConfig

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                      num_hidden_layers=args.layers, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)  # initialised on the GPU (fast), then kept in CPU memory
    torch.set_default_dtype(torch.float32)
    model.to("cpu").eval().requires_grad_(False)
    model.config.use_cache = False
    layer_bytes = model_bytes(model.model.layers[0])
    out.update(layers=args.layers, model_gib=model_bytes(model) / 2**30, layer_gib=layer_bytes / 2**30,
               projected_80_layer_model_gib=(model_bytes(model) + (80 - args.layers) * layer_bytes) / 2**30)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (4, 2048), generator=gen)

    off = LayerOffload(model, "cuda")
    _reset()
    t0 = time.time()
    with torch.no_grad():
        ref = model(ids.cuda()).logits[:, -8:].float().cpu()
    torch.cuda.synchronize()
    out["fp_forward"] = {"seconds": time.time() - t0, "peak_gib": _peak_gib(), "tokens": ids.numel()}
    print("fp forward", out["fp_forward"], flush=True)
    off.remove()

    samples = torch.randint(0, cfg.vocab_size, (args.nsamples, 2048), generator=gen)
    _reset()
    t0 = time.time()
    reports = quantize_model(model, samples, get_method("flatquant"), QuantConfig(),
                             CalibConfig(epochs=args.epochs, batch_size=4, device="cuda", amp=True))
    torch.cuda.synchronize()
    out["calibrate"] = {"seconds": time.time() - t0, "peak_gib": _peak_gib(), "nsamples": args.nsamples,
                        "epochs": args.epochs, "layer_seconds": [r.seconds for r in reports],
                        "init_mse": [r.init_loss for r in reports], "final_mse": [r.final_loss for r in reports],
                        "layers_on_cpu": all(next(layer.buffers()).device.type == "cpu" for layer in model.model.layers),
                        "quantized_layer_gib": model_bytes(model.model.layers[0]) / 2**30}
    print("calibrate", out["calibrate"], flush=True)

    LayerOffload(model, "cuda")
    _reset()
    t0 = time.time()
    with torch.no_grad():
        q = model(ids.cuda()).logits[:, -8:].float().cpu()
    torch.cuda.synchronize()
    out["quantized_forward"] = {"seconds": time.time() - t0, "peak_gib": _peak_gib(),
                                "rel_logit_diff_vs_fp": float((q - ref).norm() / ref.norm()), "finite": bool(torch.isfinite(q).all())}
    print("quantized forward", out["quantized_forward"], flush=True)


def part_layer(args, out: dict) -> None:
    from flatquant.kernels.bench_layer import bench_decoder_layer

    out.update(bench_decoder_layer(*[int(v) for v in args.shape.split(",")], out_dir=args.bench_dir))


def _dump(args, out: dict) -> None:
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("smollm2", "offload70b", "layer"), required=True)
    ap.add_argument("--gguf")
    ap.add_argument("--methods", default="flatquant,quarot")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--shape", default="4096,14336,32,8,128")
    ap.add_argument("--bench-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "part": args.part}
    try:
        {"smollm2": part_smollm2, "offload70b": part_offload70b, "layer": part_layer}[args.part](args, out)
    finally:
        _dump(args, out)


if __name__ == "__main__":
    main()
