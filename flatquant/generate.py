"""Text generation from a (quantized) model through transformers' own loop and KV cache.

Usage:
    texts = generate(model, tokenizer, ["The capital of Germany is"], max_new_tokens=8)   # greedy

`model.generate` runs as for any transformers model. A model of QuantLayers with 4-bit asymmetric per-head K/V
quantizers (the default quant) gets flatquant.cache.QuantKVCache, which keeps only the 4-bit codes; any other
model transformers' DynamicCache, to which each QuantLayer hands its quantized K (after RoPE and its learned
transform) and V. Either way a generated token is the one a full forward over the whole sequence would pick
(tests/test_generate.py).
"""

from __future__ import annotations

import torch


def cache_kwarg(model) -> str:
    """The keyword that hands a model (and its generate) a Cache: `cache` where its forward takes it (transformers
    5.24 here, which deprecates the other), else `past_key_values` (older versions)."""
    import inspect

    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def packed_cache_for(model):
    """A QuantKVCache when every decoder layer is a QuantLayer whose K/V quantizers it can hold, else None."""
    from flatquant.adapters import adapter_for
    from flatquant.cache import QuantKVCache, check_spec
    from flatquant.quant_layer import QuantLayer

    try:
        layers = adapter_for(model).layers(model)
        for layer in layers:
            if not isinstance(layer, QuantLayer):
                return None
            check_spec(layer.attn.kq.spec, layer.attn.head_dim, "keys")
            check_spec(layer.attn.vq.spec, layer.attn.head_dim, "values")
    except ValueError:
        return None
    return QuantKVCache()


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, device=None, packed_cache: bool = True
             ) -> list[str]:
    """Greedy continuations of `prompts` (the new text only), one prompt at a time so that no padding is needed.
    packed_cache=False generates with transformers' DynamicCache even where a QuantKVCache could hold the K/V."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = device or next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        if ids.numel() == 0:
            raise ValueError("an empty prompt has nothing to continue")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        cache = packed_cache_for(model) if packed_cache else None
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad, **({cache_kwarg(model): cache} if cache is not None else {}))
        out.append(tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    return out
