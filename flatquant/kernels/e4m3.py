"""W4A4 prefill on fp8 tensor cores: 4-bit codes as e4m3 bytes, cuBLAS's fp8 GEMM with per-token × per-channel scales.

Usage::

    from flatquant.kernels.e4m3 import e4m3_weight, scaled_mm_w4a4
    qa, sa, _ = kron_quant(x, L, R, clip, sym=True, codes="e4m3")  # (M, K) uint8, (M,) fp32
    y = scaled_mm_w4a4(qa, sa, e4m3_weight(qw), sw, bias, out_dtype=torch.float16)   # qw: (N, K/2) packed int4

Why: Hopper has no 4-bit tensor-core instruction, and its int8 MMA runs at only ≈ 1.3× fp16, where fp8 e4m3 runs at
≈ 1.9× (DESIGN.md). Every 4-bit code is exact in e4m3 (``flatquant.packing.pack_e4m3``: the byte of q is the e4m3fn
encoding of q·2^-9). Unpacking nibbles inside an fp8 GEMM's main loop costs as many instructions as its MMAs, and
in Triton 3.6 nothing overlaps the two (our Triton fp8 kernel, ``w4a4_gemm(path="fp8")``, ran at 0.75× our int8
one, kernels/NOTES.md). Here the GEMM reads bytes, not nibbles: ``kron_quant(codes="e4m3")`` writes the activation
codes one a byte, ``e4m3_weight`` expands the packed weights once per call at copy speed (N·K/2 bytes read,
N·K written), and ``torch._scaled_mm`` (cuBLAS, row-wise scales, ``use_fast_accum=False``) runs the product.

Exactness: each product of two codes is an integer number of 2^-18 and |Σ| ≤ 64·K, so fp32 holds every sum exactly
while the accumulation is fp32. Hopper's fp8 MMA accumulates with fewer bits; with fast accumulation off, cuBLAS
promotes partial sums to fp32 registers; on an H100 (torch 2.11, CUDA 13) every sum came out the exact integer at
K = 14336, extreme codes and a probe of the accumulator's low bits included (tests/test_e4m3.py::
test_scaled_mm_w4a4_exact_gpu, kernels/NOTES.md). That is why ``scaled_mm_supported`` names sm_90 alone.
Symmetric activations only: an asymmetric zero point would need a rank-one correction cuBLAS's epilogue lacks
(those keep the int8 path).
"""
from __future__ import annotations

import functools

import torch

from flatquant.packing import pack_e4m3, unpack_int4_twos

from .kron_quant import HAS_TRITON, cdiv, kron_quant, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

# The scale of one e4m3 code unit: the byte of q encodes q·2^-9 (packing.pack_e4m3).
E4M3_UNIT = 2.0 ** -9

if HAS_TRITON:

    @triton.jit
    def _e4m3_weight_kernel(p_ptr, o_ptr, n_bytes, BLOCK: tl.constexpr):
        """BLOCK packed bytes → BLOCK 16-bit words of two e4m3 bytes: nibble u (two's complement) → u for 0..7,
        0x80 | (16 − u) for 8..15 (−8..−1); the low nibble (the even column) in the low byte, which comes first in
        memory (little-endian), so the output is read as bytes in column order. Words, not interleaved bytes: the
        stores stay contiguous and wide."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_bytes
        p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32)
        lo = p & 15
        hi = p >> 4
        lo = tl.where(lo >= 8, 144 - lo, lo)
        hi = tl.where(hi >= 8, 144 - hi, hi)
        tl.store(o_ptr + offs, (lo | (hi << 8)).to(tl.uint16), mask=mask)


def e4m3_weight(qw: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed two's-complement weight codes → one e4m3fn byte a code.

    qw: (N, K/2) uint8 (low nibble = even column) → (N, K) torch.float8_e4m3fn, value q·2^-9.
    out: optional (N, K) uint8 or float8_e4m3fn buffer to write into. One Triton kernel on CUDA (or in the
    interpreter), PyTorch elsewhere.
    """
    if qw.dtype != torch.uint8 or qw.dim() != 2:
        raise ValueError(f"qw must be (N, K/2) uint8, got {tuple(qw.shape)} {qw.dtype}")
    N, KH = qw.shape
    if out is None:
        out = torch.empty(N, 2 * KH, dtype=torch.uint8, device=qw.device)
    elif out.shape != (N, 2 * KH) or out.dtype not in (torch.uint8, torch.float8_e4m3fn) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({N}, {2 * KH}) uint8 / float8_e4m3fn tensor")
    out8 = out.view(torch.uint8)
    if not use_triton(qw):
        out8.copy_(pack_e4m3(unpack_int4_twos(qw, signed=True)))
    elif qw.numel():
        qw = qw.contiguous()
        block = 4096
        _e4m3_weight_kernel[(cdiv(qw.numel(), block),)](qw, out8.view(torch.uint16), qw.numel(), BLOCK=block,
                                                        num_warps=4)
    return out8.view(torch.float8_e4m3fn)


@functools.lru_cache(maxsize=None)
def scaled_mm_supported(device: torch.device) -> bool:
    """Whether ``scaled_mm_w4a4`` runs cuBLAS's fp8 GEMM on ``device``: Hopper (sm_90), the one target on which
    its exactness on 4-bit codes is measured (tests/test_e4m3.py::test_scaled_mm_w4a4_exact_gpu)."""
    if device.type != "cuda" or not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def scaled_mm_shapes_ok(K: int, N: int) -> bool:
    """cuBLAS's fp8 GEMM needs the reduction and output widths to be multiples of 16."""
    return K % 16 == 0 and N % 16 == 0


def e4m3_scale_b(sw: torch.Tensor) -> torch.Tensor:
    """cuBLAS's per-column scale for ``scaled_mm_w4a4``: s_w · 2^18, (1, N) fp32. Both operands' codes carry 2^-9
    (``E4M3_UNIT``); the power of two is exact and rides on the weights' side, so the activations' scales go in as
    they are (a view, no launch). QuantLinear keeps it per layer."""
    return (sw.float() * (1.0 / E4M3_UNIT) ** 2).reshape(1, -1)


def scaled_mm_w4a4(qa: torch.Tensor, sa: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
                   scale_b: torch.Tensor | None = None) -> torch.Tensor:
    """y = (s_a · s_w) ⊙ (q_a · q_wᵀ) (+ bias): symmetric 4-bit activations × weights, both as e4m3 bytes.

    qa: (M, K) uint8 / float8_e4m3fn (``kron_quant(codes="e4m3")``); sa: (M,) fp32; w8: (N, K) float8_e4m3fn
    (``e4m3_weight``); sw: (N,) fp32; bias: (N,) or None; out_dtype fp16/bf16 (fp32 too, for tests);
    scale_b: ``e4m3_scale_b(sw)`` if already made. Returns (M, N) out_dtype. cuBLAS on Hopper
    (``scaled_mm_supported``); elsewhere the same function in float64.
    """
    M, K = qa.shape
    N = w8.shape[0]
    if w8.shape != (N, K) or sa.shape != (M,) or sw.shape != (N,):
        raise ValueError(f"shapes: qa {tuple(qa.shape)}, sa {tuple(sa.shape)}, w8 {tuple(w8.shape)}, "
                         f"sw {tuple(sw.shape)}; need (M, K), (M,), (N, K), (N,)")
    a8 = qa.view(torch.float8_e4m3fn)
    w8 = w8.view(torch.float8_e4m3fn)
    if not (qa.is_cuda and scaled_mm_supported(qa.device) and scaled_mm_shapes_ok(K, N)):
        # the column scale the GPU would use, when given (so that the CPU path exercises a caller's cached one)
        sw_used = sw if scale_b is None else scale_b.reshape(N).double() * E4M3_UNIT ** 2
        return scaled_mm_w4a4_ref(a8, sa, w8, sw_used, bias, out_dtype)
    scale_a = sa.float().contiguous().reshape(M, 1)
    scale_b = e4m3_scale_b(sw) if scale_b is None else scale_b
    return torch._scaled_mm(a8.contiguous(), w8.contiguous().t(), scale_a, scale_b,
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                            use_fast_accum=False)


def e4m3_linear(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor | None, clip: float, qw: torch.Tensor,
                sw: torch.Tensor, bias: torch.Tensor | None = None, scale_b: torch.Tensor | None = None,
                w8: torch.Tensor | None = None, glu: bool = False,
                norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """The W4A4 linear on the fp8 path: ``kron_quant(codes="e4m3")``, ``e4m3_weight``, ``scaled_mm_w4a4``.

    x: (M, n1·n2) fp16/bf16; L, R, clip as ``kron_quant`` (symmetric activations); qw: (N, K/2) packed int4;
    sw: (N,) fp32; bias: (N,) or None; scale_b: ``e4m3_scale_b(sw)`` if kept; w8: ``e4m3_weight(qw)`` if kept
    (then the call skips the expansion); glu, norm: ``kron_quant``'s (x's rows are [gate | up]; x is RMSNorm'd
    first). Returns (M, N) in x's dtype."""
    q, s, _ = kron_quant(x, L, R, clip, True, codes="e4m3", glu=glu, norm=norm)
    return scaled_mm_w4a4(q, s, e4m3_weight(qw) if w8 is None else w8, sw, bias, x.dtype, scale_b)


def scaled_mm_w4a4_ref(qa: torch.Tensor, sa: torch.Tensor, w8: torch.Tensor, sw: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """``scaled_mm_w4a4`` in float64 (the exact integer product, then the scales): e4m3 bytes read as q·2^-9."""
    a = qa.view(torch.float8_e4m3fn).double() / E4M3_UNIT
    w = w8.view(torch.float8_e4m3fn).double() / E4M3_UNIT
    y = (a @ w.T) * sa.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(out_dtype)
