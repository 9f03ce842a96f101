"""Text generation from a (quantized) model through transformers' own loop and KV cache.

Usage:
    texts = generate(model, tokenizer, ["The capital of Germany is"], max_new_tokens=8)   # greedy

`model.generate` runs as for any transformers model, with a DynamicCache: each QuantLayer puts its
quantized K (after RoPE and its learned transform) and quantized V into the cache and attends to what the cache
holds, so a generated token is the one a full forward over the whole sequence would pick (tests/test_generate.py).
The cache keeps those values dequantized, in the model's dtype; a packed 4-bit cache is not built yet.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, device=None) -> list[str]:
    """Greedy continuations of `prompts` (the new text only), one prompt at a time so that no padding is needed."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = device or next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        if ids.numel() == 0:
            raise ValueError("an empty prompt has nothing to continue")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        seq = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=pad)
        out.append(tokenizer.decode(seq[0, ids.shape[1]:], skip_special_tokens=True))
    return out
