"""Small fused kernels for the rest of a W4A4 decoder layer (what is not a linear).

Usage::

    from flatquant.kernels.fused import group_fake_quant, rms_norm, silu_mul
    k = group_fake_quant(k, group=128, bits=4, sym=False, clip=1.0)   # K/V cache: per head, one pass
    m = silu_mul(gate_up)                                              # (M, 2I) → silu(gate) * up, (M, I)
    h = rms_norm(x, weight, eps)                                       # LlamaRMSNorm in one pass

``group_fake_quant`` is flatquant.quantizers.fake_quant for per-head (group) granularity — scale and zero from the
group's max/min times the clip, codes rounded half to even, dequantized, all in fp32 — in one read and one write
instead of about ten passes. The divisions are correctly rounded (div_rn on the GPU), so the values equal PyTorch's
CPU quantizer exactly; PyTorch's CUDA kernels divide by a scalar as a·(1/b), so against them a scale may differ
by an ulp and a value on a rounding boundary take the neighbouring code (tests/test_kernels.py). ``silu_mul`` reads the up/gate GEMM output once (gate = first half of each row). ``rms_norm`` is
transformers' LlamaRMSNorm (statistics in fp32, the normalised row rounded to x's dtype, then times the weight in
that dtype) in one kernel where PyTorch runs seven (cast, square, mean, add, rsqrt, multiply, cast) and a cast of
the weight: a 4-bit decode step of LLaMA-3-8B at batch 1 spent ≈ 0.6 of 5.2 ms of GPU time in those small
kernels (H200 profile, results/bench/NVIDIA_H200_model_llama3_8b.json). Its sum of squares runs in another order
than PyTorch's, so a value can differ from PyTorch's in its last bit. All fall back to PyTorch where Triton
cannot run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kron_quant import HAS_TRITON, cdiv, next_pow2, rms_norm_ref, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    # x + M − M rounds fp32 half to even; fp32 → bf16 by hand; SwiGLU's product as kron_quant(glu=True) makes it
    from .kron_quant import _ROUND_MAGIC, _rne_bf16, _swiglu

    @triton.jit
    def _div(a, b, EXACT: tl.constexpr):
        if EXACT:
            return tl.math.div_rn(a, b)
        return a / b  # the interpreter divides exactly already

    @triton.jit
    def _group_fake_quant_kernel(x_ptr, y_ptr, n_groups, groups_per_row, stride_xm, stride_ym, clip, qmax,
                                 G: tl.constexpr, BLOCK_G: tl.constexpr, ROWS: tl.constexpr, SYM: tl.constexpr,
                                 EXACT: tl.constexpr, BF16_RNE: tl.constexpr):
        gid = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_G)
        row, grp = gid // groups_per_row, gid % groups_per_row
        mask = (gid < n_groups)[:, None] & (cols < G)[None, :]
        offs = row.to(tl.int64)[:, None] * stride_xm + (grp * G)[:, None] + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if SYM:
            m = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1) * clip
            scale = tl.maximum(_div(m, qmax, EXACT), 1e-8)
            q = _div(x, scale[:, None], EXACT)
            q = (q + _ROUND_MAGIC) - _ROUND_MAGIC
            q = tl.minimum(tl.maximum(q, -qmax - 1.0), qmax)
            y = q * scale[:, None]
        else:
            hi = tl.maximum(tl.max(tl.where(mask, x, -float("inf")), axis=1), 0.0) * clip
            lo = tl.minimum(tl.min(tl.where(mask, x, float("inf")), axis=1), 0.0) * clip
            scale = tl.maximum(_div(hi - lo, qmax, EXACT), 1e-8)
            zero = (_div(-lo, scale, EXACT) + _ROUND_MAGIC) - _ROUND_MAGIC
            q = (_div(x, scale[:, None], EXACT) + _ROUND_MAGIC) - _ROUND_MAGIC + zero[:, None]
            q = tl.minimum(tl.maximum(q, 0.0), qmax)
            y = (q - zero[:, None]) * scale[:, None]
        out = row.to(tl.int64)[:, None] * stride_ym + (grp * G)[:, None] + cols[None, :]
        if BF16_RNE:
            y = _rne_bf16(y)  # the interpreter truncates fp32 → bf16
        tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(x_ptr, y_ptr, M, N, stride_xm, stride_ym, BLOCK: tl.constexpr, BF16_RNE: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < M * N
        row, col = offs // N, offs % N
        g = tl.load(x_ptr + row * stride_xm + col, mask=mask, other=0.0)
        u = tl.load(x_ptr + row * stride_xm + N + col, mask=mask, other=0.0)
        tl.store(y_ptr + row * stride_ym + col, _swiglu(g, u, BF16_RNE).to(y_ptr.dtype.element_ty), mask=mask)


    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, N, stride_x, stride_y, eps, BLOCK: tl.constexpr,
                         BF16_RNE: tl.constexpr):
        """Row program_id(0): y = w · (x·rsqrt(mean(x²) + eps)), w and the normalised row each rounded to x's dtype
        and their product rounded to it."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        h = x.to(tl.float32)
        h = h * tl.rsqrt(tl.sum(h * h, axis=0) / N + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # any float dtype, rounded to x's
        if BF16_RNE:  # the interpreter truncates fp32 → bf16
            y = _rne_bf16(_rne_bf16(w) * _rne_bf16(h))
        else:
            y = w.to(x.dtype).to(tl.float32) * h.to(x.dtype).to(tl.float32)
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., N) fp16/bf16/fp32, last dim contiguous; weight: (N,) of any float dtype, rounded to x's in the
    kernel (no cast kernel) → (..., N) in x's dtype, ``rms_norm_ref`` in one kernel (module docstring: the last bit
    may differ)."""
    N = x.shape[-1]
    if weight.shape != (N,):
        raise ValueError(f"weight must be ({N},), got {tuple(weight.shape)}")
    if not use_triton(x) or x.stride(-1) != 1 or x.numel() == 0:
        return rms_norm_ref(x, weight, eps)
    x2 = x.reshape(-1, N)
    w = weight.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    block = next_pow2(N)
    _rms_norm_kernel[(x2.shape[0],)](x2, w, y, N, x2.stride(0), y.stride(0), float(eps), BLOCK=block,
                                     BF16_RNE=not x.is_cuda and x.dtype == torch.bfloat16,
                                     num_warps=min(16, max(1, block // 512)))
    return y.view(x.shape)


def group_fake_quant_ref(x: torch.Tensor, group: int, bits: int, sym: bool, clip: float = 1.0) -> torch.Tensor:
    """PyTorch reference: flatquant's fake_quant with granularity "head"/"group" of size ``group``."""
    from flatquant.quantizers import QuantSpec, fake_quant

    return fake_quant(x, QuantSpec(bits, sym, "group", group, clip_ratio=clip))


def group_fake_quant(x: torch.Tensor, group: int, bits: int, sym: bool, clip: float = 1.0) -> torch.Tensor:
    """x: (..., n) fp16/bf16/fp32 with n a multiple of ``group``, last dim contiguous (rows may be strided) →
    quantize-dequantize per run of ``group`` values, same shape and dtype (contiguous)."""
    if x.shape[-1] % group:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of group {group}")
    if not use_triton(x) or x.stride(-1) != 1 or x.dim() < 2:
        return group_fake_quant_ref(x, group, bits, sym, clip)
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    per_row = x2.shape[1] // group
    n_groups = x2.shape[0] * per_row
    rows = 16
    qmax = float(2 ** (bits - 1) - 1 if sym else 2**bits - 1)
    grid = (cdiv(n_groups, rows),)
    _group_fake_quant_kernel[grid](x2, y, n_groups, per_row, x2.stride(0), y.stride(0), float(clip), qmax,
                                   G=group, BLOCK_G=next_pow2(group), ROWS=rows, SYM=sym,
                                   EXACT=x.is_cuda, BF16_RNE=not x.is_cuda and x.dtype == torch.bfloat16, num_warps=4)
    return y.view(x.shape)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (M, 2N), rows [gate | up] → silu(gate) * up, (M, N) in x's dtype."""
    n = x.shape[-1] // 2
    if not use_triton(x) or x.dim() != 2 or x.stride(-1) != 1:
        return F.silu(x[..., :n]) * x[..., n:]
    y = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(cdiv(x.shape[0] * n, block),)](x, y, x.shape[0], n, x.stride(0), y.stride(0), BLOCK=block,
                                                          BF16_RNE=not x.is_cuda, num_warps=4)
    return y


class GroupFakeQuant(torch.nn.Module):
    """The kernel twin of a per-head (group) flatquant Quantizer without a learnable clip: the same values in one
    pass (``group_fake_quant``). ``from_quantizer`` returns the quantizer itself where it has no twin."""

    def __init__(self, spec):
        super().__init__()
        self.spec = spec  # a flatquant QuantSpec of "group" / "head" granularity (a K/V cache reads it too)

    @classmethod
    def from_quantizer(cls, quantizer: torch.nn.Module) -> torch.nn.Module:
        spec = quantizer.spec
        if not spec.enabled or spec.granularity not in ("group", "head") or quantizer.clip_logit is not None:
            return quantizer
        return cls(spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        return group_fake_quant(x, s.group_size, s.bits, s.sym, s.clip_ratio)

    def extra_repr(self) -> str:
        return str(self.spec)


class FusedSiluMul(torch.nn.Module):
    """The kernel twin of SwiGLU's product: y (..., 2I) = [gate | up] → silu(gate)·up (..., I), one pass."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return silu_mul(y.reshape(-1, y.shape[-1])).view(*y.shape[:-1], -1)
