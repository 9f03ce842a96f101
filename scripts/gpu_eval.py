"""Quantize and evaluate the default model on a GPU machine that has torch + transformers but not the pipeline's
tracking stack (no Hydra / MLflow there): the same core calls run.py makes, results as JSON.

    python scripts/gpu_eval.py --gguf /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf --methods rtn,quarot,flatquant \
        --epochs 15 --nsamples 128 --ckpt /root/ckpt --out $OUT/gpu_eval.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from flatquant.calibrate import CalibConfig, quantize_model
from flatquant.data import calib_samples, eval_windows, load_tokens
from flatquant.evaluate import perplexity
from flatquant.methods import get_method
from flatquant.model import load_model
from flatquant.spec import QuantConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--methods", default="rtn,quarot,flatquant")
    ap.add_argument("--wquant", default="rtn")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model, tok = load_model(args.gguf, dtype=torch.float16, device="cuda")
    windows = eval_windows(load_tokens(tok, "wikitext2", "test"), 2048)
    samples = calib_samples(load_tokens(tok, "wikitext2", "valid"), args.nsamples, 2048, seed=0)
    results = {"gpu": torch.cuda.get_device_name(), "windows": len(windows), "fp16_ppl": perplexity(model, windows, "cuda")}
    print(results, flush=True)
    for name in args.methods.split(","):
        for wquant in args.wquant.split(","):
            method = get_method(name)
            qcfg = QuantConfig() if method.learnable_clip else QuantConfig(lwc=False, lac=False)
            ccfg = CalibConfig(epochs=args.epochs, device="cuda", amp=args.amp, wquant=wquant)
            quant = copy.deepcopy(model)
            t0 = time.time()
            ckpt = f"{args.ckpt}/{name}_{wquant}" if args.ckpt else None
            reports = quantize_model(quant, samples, method, qcfg, ccfg, ckpt)
            seconds = time.time() - t0
            results[f"{name}_{wquant}"] = {"ppl": perplexity(quant, windows, "cuda"), "calib_seconds": seconds,
                                           "s_per_layer": seconds / len(reports),
                                           "mean_final_mse": sum(r.final_loss for r in reports) / len(reports)}
            print(name, wquant, results[f"{name}_{wquant}"], flush=True)
            del quant
            torch.cuda.empty_cache()
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
