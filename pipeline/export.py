"""Stage export: write the quantized model as a checkpoint (packed 4-bit safetensors) when `export=true`."""

from __future__ import annotations

from flatquant.export import export


def run(cfg: dict, ctx) -> dict[str, float]:
    if not cfg.get("export") or not ctx.method.quantizes:
        return {}
    out = ctx.quantized_dir
    export(ctx.model, ctx.tokenizer, out, dict(cfg["method"]))
    print(f"quantized checkpoint: {out}")
    return {"export/bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}
