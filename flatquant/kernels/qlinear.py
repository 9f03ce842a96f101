"""QuantLinear: a W4A4 linear layer with FlatQuant's online Kronecker transform.

Usage::

    from flatquant.kernels.qlinear import QuantLinear
    layer = QuantLinear.from_float(w_merged, L=L, R=R, act_clip=0.9, act_sym=True, bias=b)
    y = layer(x)                # x: (..., in) fp16 → (..., out) fp16
    y = layer(x, residual=h)    # h + x·Wᵀ, the sum rounded once (int8 paths: in the GEMM's epilogue)
    y = layer(h, norm=(g, eps)) # RMSNorm(h)·Wᵀ, the norm made by the transform kernel as it loads h

``weight`` is the weight the transformed activation meets, i.e. already merged with the inverse
transform (``merge_kron_into_weight``), so that x·(L⊗R)·Wᵀ equals the full-precision x·W_origᵀ.
On CUDA (or under TRITON_INTERPRET=1) forward runs two kernels: ``kron_quant`` then ``w4a4_gemm``, or for up to
``KQ_MAX_TOKENS`` tokens the two as one launch (``kq_gemm``), or from ``FP8_MIN_TOKENS`` tokens on a Hopper GPU
(symmetric activations) the fp8 path: ``kron_quant(codes="e4m3")``, ``e4m3_weight`` and cuBLAS's fp8 GEMM
(``flatquant.kernels.e4m3``).
Elsewhere, or without Triton, it runs the same math in PyTorch (fp32): the fake-quant computation
quantize-dequantize(x·(L⊗R)) · dequant(W)ᵀ.

A down_proj built with ``glu=True`` takes the up/gate linear's output, (..., 2·in) rows [gate | up], and transforms
SwiGLU's product silu(gate)·up as kron_quant reads it (``kron_quant(glu=True)``): the product is never written out.
A ``residual`` goes into the int8 GEMMs' epilogue (one rounding, no kernel of its own); the fp8 path adds it to
cuBLAS's rounded output (in place, a kernel of its own, two roundings). A ``norm`` (RMSNorm weight, eps) in front is
made by the transform kernel as it loads x (``kron_quant(norm=...)``), on every path.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from flatquant.packing import kron_dims, pack_int4_twos, unpack_int4_twos

from .e4m3 import e4m3_linear, e4m3_scale_b, e4m3_weight, scaled_mm_shapes_ok, scaled_mm_supported
from .fused import rms_norm
from .kron_quant import kron_quant, kron_transform_ref, quantize_per_token_ref, rms_norm_ref, swiglu_ref, use_triton
from .w4a4_gemm import kq_gemm, w4a4_gemm

# Up to this many tokens forward runs the transform, the quantizer and the GEMM as one launch (``kq_gemm``, where
# ``kq_fuses``); 0: never (kron_quant, then w4a4_gemm). FLATQUANT_KQ_MAX_TOKENS overrides it. H200, LLaMA-3-8B shapes
# (results/bench/NVIDIA_H200_decode_kq.md): at 1 token qkv 15.7 → 14.0 µs, o_proj 16.2 → 14.3, up/gate 29.8 → 25.6;
# at 4 tokens each program's serial transform made it slower (15.6 → 19.1 µs for qkv); the graphed batch-1 decode
# step of the whole model 3.85 → 3.66 ms (NVIDIA_H200_model_llama3_8b_qkv_write_kq.md).
KQ_MAX_TOKENS = int(os.environ.get("FLATQUANT_KQ_MAX_TOKENS", "1"))
# From this many tokens forward takes the fp8 path where it can (``fp8_path``); 0: never. FLATQUANT_FP8_MIN_TOKENS
# overrides it. H100, LLaMA-3-8B shapes (results/bench/NVIDIA_H100_80GB_HBM3_fp8_run1.md): at 512 tokens the two paths' kernels
# take about the same time (qkv: kron_quant + GEMM 0.077 ms on int8; kron_quant + cuBLAS fp8 0.073 ms, plus the
# weights' expansion); from 2048 the fp8 path is ahead (cuBLAS's fp8 GEMM 1.57–1.88× fp16, ours on int8 1.27–1.42×).
FP8_MIN_TOKENS = int(os.environ.get("FLATQUANT_FP8_MIN_TOKENS", "512"))
# What the fp8 path does with the weights' e4m3 bytes (N·K, twice the packed codes): "expand" makes them on each call
# (one pass over the weights, nothing kept); "keep" makes them once per layer and keeps them, so that the model holds
# 1.5 bytes a weight (the packed codes stay for decode) and a prefill skips the pass. FLATQUANT_FP8_WEIGHTS sets it
# for new layers; QuantLinear.fp8_weights for one.
FP8_WEIGHTS = os.environ.get("FLATQUANT_FP8_WEIGHTS", "expand")


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on device's current stream (no syncs, no new kept memory then)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _version(t: torch.Tensor) -> int | None:
    """t's version counter (bumped by in-place writes such as load_state_dict's copy); None for an inference tensor,
    which keeps none."""
    try:
        return t._version
    except RuntimeError:
        return None


def quantize_weight_rtn(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit, per output channel, symmetric.

    weight: (out, in) float → q: (out, in) int32 in [-8, 7], scale: (out,) fp32 = max|w| / 7 (1 for zero rows).
    """
    w = weight.float()
    scale = w.abs().amax(dim=1) / 7.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(w / scale[:, None]), -8, 7).to(torch.int32)
    return q, scale


def merge_kron_into_weight(weight: torch.Tensor, L: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """W' with x·(L⊗R)·W'ᵀ = x·Wᵀ, computed in float64: W'_t = L⁻¹·W_t·R⁻ᵀ per output row.

    weight: (out, n1*n2); L: (n1, n1); R: (n2, n2) → (out, n1*n2) in weight's dtype.
    """
    n1, n2 = L.shape[0], R.shape[0]
    w = weight.double().reshape(-1, n1, n2)
    merged = torch.linalg.inv(L.double()) @ w @ torch.linalg.inv(R.double()).T
    return merged.reshape(weight.shape).to(weight.dtype)


class QuantLinear(nn.Module):
    """W4A4 linear. Buffers: qweight (out, in/2) uint8, wscale (out,) fp32, wsum (out,) int32,
    L (n1, n1) / R (n2, n2) fp32 (identity when the layer has no transform), bias (out,) or None.
    glu: the input is (..., 2·in), rows [gate | up], and the layer computes silu(gate)·up · Wᵀ (module docstring).
    fused: forward's norm and residual go into the kernels (True) or run as kernels of their own (False:
    fused.rms_norm before, an add after; the unfused layout, kept for comparison)."""

    def __init__(self, in_features: int, out_features: int, act_clip: float = 1.0, act_sym: bool = True,
                 n1: int | None = None, has_kron: bool = False, has_bias: bool = False, glu: bool = False):
        super().__init__()
        if in_features % 2:
            raise ValueError("in_features must be even to pack two 4-bit values per byte")
        self.in_features, self.out_features = in_features, out_features
        self.act_clip, self.act_sym, self.has_kron, self.glu = float(act_clip), bool(act_sym), has_kron, bool(glu)
        self.fused = True
        n1, n2 = (n1, in_features // n1) if n1 else kron_dims(in_features, allow_prime=True)
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("wscale", torch.ones(out_features))
        self.register_buffer("wsum", torch.zeros(out_features, dtype=torch.int32))
        self.register_buffer("L", torch.eye(n1))
        self.register_buffer("R", torch.eye(n2))
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)
        self._cast_cache: dict = {}
        self._scale_cache: dict = {}
        self._w8_cache: dict = {}
        if FP8_WEIGHTS not in ("expand", "keep"):
            raise ValueError(f"FLATQUANT_FP8_WEIGHTS must be 'expand' or 'keep', got {FP8_WEIGHTS!r}")
        self.fp8_weights = FP8_WEIGHTS
        self.splits = [out_features]  # the outputs side by side (from_group: one per linear of the group)

    @classmethod
    def from_float(cls, weight: torch.Tensor, w_bits: int = 4, L: torch.Tensor | None = None,
                   R: torch.Tensor | None = None, act_clip: float = 1.0, act_sym: bool = True,
                   bias: torch.Tensor | None = None, glu: bool = False) -> QuantLinear:
        """Quantize ``weight`` (out, in) RTN per channel and pack it. L (n1, n1), R (n2, n2) with
        n1·n2 = in, both or neither; act_clip: LAC factor in (0, 1]; act_sym: symmetric activations; glu: the layer
        takes [gate | up] (class docstring)."""
        if w_bits != 4:
            raise NotImplementedError("only 4-bit weights are packed by these kernels")
        if (L is None) != (R is None):
            raise ValueError("give both Kronecker factors or neither")
        out_features, in_features = weight.shape
        n1 = L.shape[0] if L is not None else None
        layer = cls(in_features, out_features, act_clip, act_sym, n1, L is not None, bias is not None, glu)
        q, scale = quantize_weight_rtn(weight)
        layer.qweight.copy_(pack_int4_twos(q))
        layer.wscale.copy_(scale)
        layer.wsum.copy_(q.sum(dim=1, dtype=torch.int32))
        if L is not None:
            layer.L.copy_(L.float())
            layer.R.copy_(R.float())
        if bias is not None:
            layer.bias.copy_(bias.float())
        return layer.to(weight.device)

    @classmethod
    @torch.no_grad()
    def from_group(cls, group, glu: bool = False) -> QuantLinear:
        """The kernel twin of a linear group (flatquant.quant_layer.LinearGroup): its linears as one GEMM over their
        concatenated 4-bit symmetric codes, its online transform and activation quantizer fused before it. The
        group's offset-binary codes are re-packed into two's-complement nibbles. Outputs side by side, as the
        group's (``splits``). glu: the twin also makes the group's input, SwiGLU's product, from [gate | up]."""
        codes, scale, bias = group.kernel_codes()
        factors = group.kron_factors(codes.shape[1])
        L, R = factors if factors is not None else (torch.eye(k) for k in kron_dims(codes.shape[1], allow_prime=True))
        layer = cls(codes.shape[1], codes.shape[0], group.act_clip(), group.aq.spec.sym, L.shape[0], True,
                    bias is not None, glu)
        layer.qweight.copy_(pack_int4_twos(codes))
        layer.wscale.copy_(scale)
        layer.wsum.copy_(codes.sum(dim=1, dtype=torch.int32))
        layer.L.copy_(L.float())
        layer.R.copy_(R.float())
        if bias is not None:
            layer.bias.copy_(bias)
        layer.splits = list(group.splits)
        return layer.to(codes.device)

    def _factors(self, dtype: torch.dtype, device: torch.device):
        """(L, R) in the activations' dtype on their device, made once per state of the buffers; R is None where it is
        the identity (o_proj's head transform H ⊗ I, layers without a transform), which the kernels then skip."""
        key = (dtype, device, self.L.data_ptr(), self.R.data_ptr(), _version(self.L), _version(self.R))
        if key not in self._cast_cache:
            # (a comparison syncs, which a CUDA graph's capture forbids: there R stays explicit, the same result)
            eye = not _capturing(self.R.device) and torch.equal(
                self.R, torch.eye(self.R.shape[0], dtype=self.R.dtype, device=self.R.device))
            self._cast_cache = {key: (self.L.to(device, dtype).contiguous(),
                                      None if eye else self.R.to(device, dtype).contiguous())}
        return self._cast_cache[key]

    def _e4m3_scale(self, device: torch.device) -> torch.Tensor:
        """``e4m3_scale_b`` of this layer's weight scales, made once per device and per state of wscale."""
        key = (device, self.wscale.data_ptr(), _version(self.wscale))
        if key not in self._scale_cache:
            self._scale_cache = {key: e4m3_scale_b(self.wscale.to(device))}
        return self._scale_cache[key]

    def _e4m3_weight(self, device: torch.device) -> torch.Tensor | None:
        """The weights' e4m3 bytes, kept per state of qweight when ``fp8_weights`` is "keep"; None (made on each
        call) for "expand". While a CUDA graph is being captured the bytes an eager call kept are used, and none are
        made (memory of the graph's pool is not kept): warm up eagerly before capturing, as torch.cuda.graphs asks,
        and the graph skips the expansion. A graph reads the bytes of the weights it was captured with."""
        if self.fp8_weights != "keep":
            return None
        key = (device, self.qweight.data_ptr(), _version(self.qweight))
        if _capturing(device):
            return self._w8_cache.get(key)
        if key not in self._w8_cache:
            self._w8_cache = {}  # the old bytes go before the new ones are made
            self._w8_cache[key] = e4m3_weight(self.qweight.to(device))
        return self._w8_cache[key]

    def fp8_path(self, x: torch.Tensor) -> bool:
        """Whether forward runs x (tokens, in or 2·in with glu) on fp8 tensor cores: FP8_MIN_TOKENS tokens or more,
        symmetric activations, 16-bit inputs, widths cuBLAS takes, a GPU ``scaled_mm_supported`` names."""
        return (0 < FP8_MIN_TOKENS <= x.shape[0] and self.act_sym and x.dtype in (torch.float16, torch.bfloat16)
                and scaled_mm_shapes_ok(self.in_features, self.out_features) and scaled_mm_supported(x.device))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """x: (..., in) fp16/bf16 — (..., 2·in) with glu — → (..., out) same dtype; residual: optional (..., out),
        added; norm: optional (weight (in,), eps), x's RMSNorm is what the layer reads (both as ``fused`` says)."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features * (2 if self.glu else 1))
        res = None if residual is None else residual.reshape(-1, self.out_features)
        if use_triton(x2):
            if norm is not None and not self.fused:
                x2, norm = rms_norm(x2, *norm), None
            L, R = self._factors(x.dtype, x.device)
            into = res if self.fused else None  # the int8 GEMMs add it in their epilogue
            if self.fp8_path(x2):
                y = e4m3_linear(x2, L, R, self.act_clip, self.qweight, self.wscale, self.bias,
                                self._e4m3_scale(x.device), self._e4m3_weight(x.device), glu=self.glu, norm=norm)
                into = None
            elif x2.shape[0] <= KQ_MAX_TOKENS:
                y = kq_gemm(x2, L, R, self.act_clip, self.act_sym, self.qweight, self.wscale, self.wsum, self.bias,
                            x.dtype, glu=self.glu, residual=into, norm=norm)
            else:
                q, s, z = kron_quant(x2, L, R, self.act_clip, self.act_sym, glu=self.glu, norm=norm)
                y = w4a4_gemm(q, s, self.qweight, self.wscale, z, self.wsum, self.bias, out_dtype=x.dtype,
                              residual=into)
            if res is not None and into is None:
                y = y.add_(res)  # in place on the fresh output
        else:
            y = self.forward_torch(x2, res, norm)
        return y.reshape(*shape[:-1], self.out_features)

    def forward_torch(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                      norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
        """The fake-quant computation in fp32. x: (tokens, in) — (tokens, 2·in) with glu — → (tokens, out) in x's
        dtype, plus residual (tokens, out) before the rounding; norm: x's RMSNorm (``rms_norm_ref``) first."""
        if self.glu:
            x = swiglu_ref(x)
        if norm is not None:
            x = rms_norm_ref(x, *norm)
        y = kron_transform_ref(x, self.L, self.R) if self.has_kron else x.float()
        q, s, z = quantize_per_token_ref(y, self.act_clip, self.act_sym)
        a = (q.float() - (0.0 if z is None else z[:, None])) * s[:, None]
        w = unpack_int4_twos(self.qweight, signed=True).float() * self.wscale[:, None]
        out = a @ w.T
        if self.bias is not None:
            out = out + self.bias.float()
        if residual is not None:
            out = out + residual.float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, kron={tuple(self.L.shape)}x{tuple(self.R.shape)}"
                f" ({'learned' if self.has_kron else 'none'}), act_clip={self.act_clip}, act_sym={self.act_sym}"
                + (", glu" if self.glu else ""))
