"""Stage export: write the quantized model as a checkpoint (packed 4-bit safetensors) when `export=true`."""

from __future__ import annotations

import logging

from flatquant.export import export

log = logging.getLogger(__name__)


def run(cfg: dict, ctx) -> dict[str, float]:
    if not cfg.get("export"):
        return {}
    if not ctx.method.quantizes:
        log.warning("export=true: method %s quantizes nothing, so no checkpoint is written (the model at "
                    "model.path is already its full-precision checkpoint)", ctx.method.name)
        return {}
    out = ctx.quantized_dir
    export(ctx.model, ctx.tokenizer, out, dict(cfg["method"]))
    print(f"quantized checkpoint: {out}")
    return {"export/bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}
