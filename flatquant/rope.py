"""Rotary position embedding's half rotation, shared by the layer and the K-cache kernels (a leaf: imports torch)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x₁, x₂] → [−x₂, x₁] over the last axis (halves of head_dim), as transformers' LLaMA applies RoPE:
    x·cos + rotate_half(x)·sin."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
