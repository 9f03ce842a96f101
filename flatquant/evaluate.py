"""Perplexity on non-overlapping windows, as the GPTQ / QuaRot / FlatQuant papers report it.

Usage:
    ppl = perplexity(model, eval_windows(ids, 2048), device="cuda")
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device="cpu", batch_size: int = 1, desc: str = "ppl") -> float:
    """exp(mean next-token NLL) over every window (n, seqlen); the first token of each window is context only."""
    nll, count = 0.0, 0
    bar = tqdm(total=len(windows), desc=desc, unit="window")
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
        bar.update(len(batch))
        bar.set_postfix(ppl=f"{math.exp(nll / count):.4g}")
    bar.close()
    return math.exp(nll / count)
