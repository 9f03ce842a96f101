"""Quantization methods as small registered objects: which transforms a layer gets and whether they train.

Usage:
    method = get_method("flatquant", alpha=0.3)
    transforms = method.transforms(parts, stats, generator)    # slot → KronTransform | None
    if method.trainable: ...                                    # block-wise calibration

A new method is one class that subclasses Method, sets its four flags (trainable, quantizes, needs_stats,
learnable_clip) and carries @register("name"), plus one conf/method/<name>.yaml; the pipeline never branches
on method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from flatquant.adapters import SLOT_LINEARS, LayerParts
from flatquant.hadamard import has_hadamard, orthogonal_or_hadamard, random_hadamard
from flatquant.packing import kron_dims
from flatquant.transforms import KronTransform


class Method:
    """What every registered method declares; the flags are left unset here so that no subclass can forget one."""

    trainable: ClassVar[bool]  # block-wise calibration trains the layer's transforms (and clipping)
    quantizes: ClassVar[bool]  # weights and activations are quantized at all (False: the FP16 reference)
    needs_stats: ClassVar[bool]  # transforms() reads per-slot activation statistics of the calibration data
    learnable_clip: ClassVar[bool]  # the quantizers keep the config's learnable clipping (lwc/lac); False: both off

    def check_sizes(self, hidden: int, inter: int, head_dim: int) -> None:
        """Raise before any work when the transforms cannot handle these sizes; any size is fine by default."""

    def transforms(self, parts: LayerParts, stats: dict[str, torch.Tensor], generator) -> dict:
        """slot → KronTransform (a slot left out gets none) for one layer; stats: slot → (n,) max |x|."""
        raise NotImplementedError(f"{type(self).__name__} does not define transforms()")


FLAGS = tuple(Method.__annotations__)  # the four flags Method declares, which register checks

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: add a Method subclass that sets all four FLAGS to bools to METHODS under `name`."""

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"method {name!r}: {cls!r} does not subclass flatquant.methods.Method")
        for flag in FLAGS:
            value = getattr(cls, flag, None)  # Method leaves the flags unset: only cls or its other parents set them
            if not isinstance(value, bool):
                raise TypeError(f"method {name!r}: {cls.__name__} must set {flag} to True or False, got {value!r}")
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


def check_model(method: Method, config) -> None:
    """Fail before any work when the method cannot handle this architecture's sizes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    method.check_sizes(config.hidden_size, config.intermediate_size, head_dim)


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


@register("fp16")
@dataclass
class FP16(Method):
    """No quantization at all: the reference row of every table."""

    trainable = False
    quantizes = False
    needs_stats = False
    learnable_clip = False

    def transforms(self, parts, stats, generator):
        return {}


@register("rtn")
@dataclass
class RTN(Method):
    """Plain round-to-nearest on the untransformed model, no learnable clipping."""

    trainable = False
    quantizes = True
    needs_stats = False
    learnable_clip = False

    def transforms(self, parts, stats, generator):
        return {}


@register("flatquant")
@dataclass
class FlatQuant(Method):
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
    needs_stats = True
    learnable_clip = True

    def check_sizes(self, hidden: int, inter: int, head_dim: int) -> None:
        for n in (hidden, inter):
            kron_dims(n)

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


@register("smoothquant")
@dataclass
class SmoothQuant(Method):
    """Per-channel scales d = max|x|^α / max|w|^(1-α) folded into the norms (Xiao et al. 2023).

    As in the SmoothQuant LLaMA recipe, the q/k/v and up/gate inputs are smoothed; `down: true` also
    smooths down_proj's input through up_proj's rows.
    """

    alpha: float = 0.5
    down: bool = False
    trainable = False
    quantizes = True
    needs_stats = True
    learnable_clip = False

    def __post_init__(self):
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"method.alpha must be in [0, 1], got {self.alpha}")

    def transforms(self, parts: LayerParts, stats: dict[str, torch.Tensor], generator) -> dict:
        slots = ("qkv", "upgate", "down") if self.down else ("qkv", "upgate")
        return {s: KronTransform.diagonal(smooth_scale(stats[s], input_absmax(parts, SLOT_LINEARS[s]), self.alpha)) for s in slots}


def hadamard_factors(n: int) -> tuple[int, int]:
    """n = n1·n2 with a Hadamard matrix of both orders, n1 ≤ n2 as close to √n as possible."""
    pairs = [(a, n // a) for a in range(1, int(n**0.5) + 1) if n % a == 0 and has_hadamard(a) and has_hadamard(n // a)]
    if not pairs:
        raise ValueError(f"size {n} has no factorisation into two Hadamard orders: QuaRot cannot rotate it")
    return pairs[-1]


def rotation(n: int, seed: int, scale: torch.Tensor | None = None) -> KronTransform:
    """A randomised Hadamard rotation of size n as a Kronecker product of two random Hadamard factors."""
    n1, n2 = hadamard_factors(n)
    left = random_hadamard(n1, seed) if n1 > 1 else None
    return KronTransform.fixed(left, random_hadamard(n2, seed + 1), n, scale)


@register("quarot")
@dataclass
class QuaRot(Method):
    """Fixed randomised Hadamard rotations (Ashkboos et al. 2024), no training.

    RMSNorm's γ is fused into the following linears (the `scale` of the qkv and up/gate slots), so the
    quantized activations are rmsnorm(x)·H as in QuaRot's rotated residual stream; online Hadamards
    before down_proj and over the heads before o_proj; V rotated inside v_proj; Q and K rotated after
    RoPE for the K cache. A head count with no Hadamard matrix (9) gets a seeded random orthogonal one.
    """

    seed: int = 0
    trainable = False
    quantizes = True
    needs_stats = False
    learnable_clip = False

    def check_sizes(self, hidden: int, inter: int, head_dim: int) -> None:
        for n in (hidden, inter, head_dim):
            hadamard_factors(n)

    def transforms(self, parts: LayerParts, stats, generator) -> dict:
        hidden = parts.linears["q"].weight.shape[1]
        inter = parts.linears["down"].weight.shape[1]
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) + self.seed
        t = {"down": rotation(inter, seed + 2), "v": rotation(parts.head_dim, seed + 4), "k": rotation(parts.head_dim, seed + 6)}
        for slot, norm, s in (("qkv", parts.input_norm, seed), ("upgate", parts.post_norm, seed + 8)):
            t[slot] = rotation(hidden, s, norm.weight.detach().float())
        heads, _ = orthogonal_or_hadamard(parts.num_heads, seed + 10)
        t["heads"] = KronTransform.fixed(None, heads, parts.num_heads)
        return t
