"""Round-to-nearest quantizers: pure tensor functions plus the small modules that hold clip state.

Usage:
    spec = QuantSpec(bits=4, sym=False, granularity="token")
    xq = fake_quant(x, spec)                    # quantize-dequantize, straight-through gradient
    q, scale, zero = quantize(x, spec)          # integer codes and their parameters

Granularity decides which elements share one scale: "token" and "channel" both mean one scale per row
of the last axis (a token's features, or a weight's output row), "group" one per `group_size` run of
the last axis, "head" one per `group_size` (= head_dim) run, and "tensor" one for everything.
Learnable clipping (LWC for weights, LAC for activations, FlatQuant §3.3) multiplies the row max/min by
sigmoid(θ) before the scale is taken, so the clip ratio stays in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flatquant.packing import pack_int4_offset, unpack_int4_offset

GRANULARITIES = ("token", "channel", "group", "head", "tensor")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized. bits >= 16 means "leave in floating point"."""

    bits: int = 16
    sym: bool = True
    granularity: str = "token"
    group_size: int = 0
    clip_ratio: float = 1.0

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in 2..16, got {self.bits!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity in ("group", "head") and self.group_size <= 0:
            raise ValueError(f"granularity {self.granularity!r} needs group_size > 0, got {self.group_size}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio}")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.sym else 2**self.bits - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.sym else 0


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator). Without autograd it is plain
    round(), the same values ((r − x) + x is exact in float32) in one pass instead of three."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return x.round()
    return (x.round() - x).detach() + x


def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View x so that the last axis holds exactly the elements that share one scale."""
    if spec.granularity == "tensor":
        return x.reshape(1, -1)
    if spec.granularity in ("group", "head"):
        if x.shape[-1] % spec.group_size:
            raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group_size {spec.group_size}")
        return x.reshape(*x.shape[:-1], -1, spec.group_size)
    return x


def quant_params(
    x: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the grouped view of x.

    x: (..., n) float, already grouped by `_grouped`; clip: broadcastable to (..., 1), in (0, 1].
    Returns scale, zero of shape (..., 1); zero is 0 for symmetric specs. Differentiable in x and clip.
    """
    ratio = spec.clip_ratio if clip is None else clip * spec.clip_ratio
    if spec.sym:
        xmax = x.abs().amax(dim=-1, keepdim=True) * ratio
        scale = (xmax / spec.qmax).clamp(min=1e-8)
        return scale, torch.zeros_like(scale)
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * ratio
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * ratio
    scale = ((xmax - xmin) / spec.qmax).clamp(min=1e-8)
    zero = round_ste(-xmin / scale)
    return scale, zero


def quantize(
    x: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer codes of x and their parameters.

    Returns q (grouped shape, integer-valued float), scale and zero (grouped shape with last dim 1);
    dequantize with `(q - zero) * scale` and reshape to x.shape.
    """
    g = _grouped(x, spec)
    scale, zero = quant_params(g, spec, clip)
    q = torch.clamp(torch.round(g / scale) + zero, spec.qmin, spec.qmax)
    return q, scale, zero


def fake_quant(x: torch.Tensor, spec: QuantSpec, clip: torch.Tensor | float | None = None) -> torch.Tensor:
    """Quantize-dequantize x (same shape and dtype); gradients pass straight through rounding.

    Computed in float32 so that fp16/bf16 inputs get the same codes as the packed kernels.
    """
    if not spec.enabled:
        return x
    g = _grouped(x.float(), spec)
    scale, zero = quant_params(g, spec, clip)
    q = torch.clamp(round_ste(g / scale) + zero, spec.qmin, spec.qmax)
    return ((q - zero) * scale).reshape(x.shape).to(x.dtype)


class Quantizer(nn.Module):
    """Fake-quantizer holding an optional learnable clip θ (clip = sigmoid(θ)).

    rows=1 gives one clip for the whole tensor (LAC for activations); rows=out_features gives one clip
    per weight row (LWC). θ starts at `clip_init` (4.0 → sigmoid ≈ 0.982, as in the reference).
    """

    def __init__(self, spec: QuantSpec, learnable_clip: bool = False, rows: int = 1, clip_init: float = 4.0):
        super().__init__()
        self.spec = spec
        if learnable_clip and spec.enabled:
            self.clip_logit = nn.Parameter(torch.full((rows, 1), float(clip_init)))
        else:
            self.register_parameter("clip_logit", None)

    def clip(self) -> torch.Tensor | None:
        return None if self.clip_logit is None else torch.sigmoid(self.clip_logit)

    def grouped_clip(self) -> torch.Tensor | None:
        """The clip shaped for the grouped view that `quantize` takes scales over."""
        clip = self.clip()
        if clip is not None and self.spec.granularity in ("group", "head"):
            clip = clip.unsqueeze(-1)
        return clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.spec, self.grouped_clip())

    def extra_repr(self) -> str:
        return f"{self.spec}, learnable_clip={self.clip_logit is not None}"


def code_dtype(spec: QuantSpec) -> torch.dtype:
    """The narrowest signed integer dtype that holds every code in [qmin, qmax]: int8 up to 8-bit symmetric or
    7-bit asymmetric, int16 up to 16 / 15 bits, else int32. Signed, so that uint8 always means
    pack_int4_offset."""
    for dtype in (torch.int8, torch.int16):
        info = torch.iinfo(dtype)
        if info.min <= spec.qmin and spec.qmax <= info.max:
            return dtype
    return torch.int32


def pack_codes(codes: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """How integer codes (rows, cols) in [qmin, qmax] are stored: two per byte (pack_int4_offset, uint8) when
    4-bit with even cols, else unpacked in `code_dtype(spec)`. Codes outside the spec's range raise instead of
    wrapping."""
    lo, hi = (int(v) for v in torch.aminmax(codes)) if codes.numel() else (spec.qmin, spec.qmin)
    if lo < spec.qmin or hi > spec.qmax:
        raise ValueError(f"codes span [{lo}, {hi}], outside [{spec.qmin}, {spec.qmax}] of {spec.bits}-bit sym={spec.sym}")
    if spec.bits == 4 and codes.shape[1] % 2 == 0:
        return pack_int4_offset(codes, spec.qmin)
    return codes.to(code_dtype(spec)).contiguous()


def unpack_codes(stored: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of pack_codes: (rows, cols) int32 codes."""
    if stored.dtype == torch.uint8:
        if spec.bits != 4:
            raise ValueError(f"uint8 codes are two 4-bit codes per byte, but the spec is {spec.bits}-bit")
        return unpack_int4_offset(stored, spec.qmin).to(torch.int32)
    return stored.to(torch.int32)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q − zero)·scale in float32 for codes (rows, cols) with scale/zero (rows,) or (rows, groups): the operations
    `quantize`'s callers use to dequantize, so the values are identical."""
    rows = codes.shape[0]
    g = codes.view(rows, scale.shape[1] if scale.dim() == 2 else 1, -1).float()
    return ((g - zero.view(rows, -1, 1)) * scale.view(rows, -1, 1)).reshape(codes.shape)
