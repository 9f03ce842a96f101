"""Quantization methods as small registered objects: which transforms a layer gets and whether they train.

Usage:
    method = get_method("flatquant", alpha=0.3)
    transforms = method.transforms(parts, stats, generator)    # slot → KronTransform | None
    if method.trainable: ...                                    # block-wise calibration

A new method is one class with @register("name") and one conf/method/<name>.yaml; the pipeline never
branches on method names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flatquant.adapters import LayerParts
from flatquant.transforms import KronTransform

METHODS: dict[str, type] = {}


def register(name: str):
    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def get_method(name: str, **options):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name](**options)


def smooth_scale(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-channel scale d = max|x|^α / max|w|^(1-α) (x: (n,), w: (n,)), clamped > 0."""
    return (x_absmax.clamp(min=1e-5).pow(alpha) / w_absmax.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)


def input_absmax(parts: LayerParts, names: tuple[str, ...]) -> torch.Tensor:
    """Per-input-channel max |W| over the rows of the linears that share one input."""
    return torch.cat([parts.linears[n].weight.detach().float().abs() for n in names]).amax(dim=0)


SLOT_LINEARS = {"qkv": ("q", "k", "v"), "upgate": ("gate", "up"), "down": ("down",)}


@register("fp16")
@dataclass
class FP16:
    """No quantization at all: the reference row of every table."""

    trainable = False
    quantizes = False

    def transforms(self, parts, stats, generator):
        return {}


@register("rtn")
@dataclass
class RTN:
    """Plain round-to-nearest on the untransformed model, no learnable clipping."""

    trainable = False
    quantizes = True
    learnable_clip = False

    def transforms(self, parts, stats, generator):
        return {}


@register("flatquant")
@dataclass
class FlatQuant:
    """Learnable Kronecker affine transforms at every linear group + LWC/LAC (arXiv 2410.09426).

    add_diag starts each per-channel scale SmoothQuant-style from the layer's calibration statistics
    with exponent `alpha` (0.3 in the reference); factors of size 1 are left out.
    """

    alpha: float = 0.3
    add_diag: bool = True
    heads_transform: bool = True
    kv_transform: bool = True
    trainable = True
    quantizes = True
    learnable_clip = True

    def transforms(self, parts: LayerParts, stats: dict[str, torch.Tensor], generator) -> dict:
        hidden = parts.linears["q"].weight.shape[1]
        inter = parts.linears["down"].weight.shape[1]
        t = {
            "qkv": KronTransform.learnable(hidden, add_diag=self.add_diag, generator=generator),
            "upgate": KronTransform.learnable(hidden, add_diag=self.add_diag, generator=generator),
            "down": KronTransform.learnable(inter, add_diag=self.add_diag, generator=generator),
        }
        if self.heads_transform:
            t["heads"] = KronTransform.learnable(parts.num_heads, (1, parts.num_heads), generator=generator)
        if self.kv_transform:
            t["v"] = KronTransform.learnable(parts.head_dim, (1, parts.head_dim), generator=generator)
            t["k"] = KronTransform.learnable(parts.head_dim, (1, parts.head_dim), generator=generator)
        if self.add_diag:
            for slot, names in SLOT_LINEARS.items():
                if slot in stats:
                    d = smooth_scale(stats[slot], input_absmax(parts, names), self.alpha)
                    t[slot].diag.data.copy_(d)
        return t
