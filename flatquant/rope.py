"""Rotary position embedding, shared by the layer's attention and the K-cache kernels' reference (a leaf: imports
torch)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x₁, x₂] → [−x₂, x₁] over the last axis (halves of head_dim)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x·cos + rotate_half(x)·sin, as transformers' LLaMA applies RoPE; cos/sin broadcast against x and are already
    in x's dtype, so each product and the sum round to it."""
    return x * cos + rotate_half(x) * sin
