"""W4A4 GEMM: packed 4-bit activations × packed 4-bit weights on int8 tensor cores, dequantized in the epilogue.

Usage::

    from flatquant.kernels.w4a4_gemm import w4a4_gemm
    y = w4a4_gemm(qa, sa, qw, sw, za=None, wsum=None, out_dtype=torch.float16)   # (tokens, out)

Hopper has no int4 tensor-core instruction (DESIGN.md, hardware facts), so the kernel loads 4-bit data
(half the bytes of int8, a quarter of fp16), splits each byte into its two nibbles in registers and feeds
both halves to int8 ``tl.dot`` (exact for values in [-8, 15]) with int32 accumulation. Because a dot
product does not care about the order of k, the even-k nibbles of A meet the even-k nibbles of W in one
product and the odd-k nibbles in another: no interleaving shuffle is needed.

Epilogue (fp32): y = s_a · s_w · (q_a·q_w − z_a · Σ_k q_w) (+ bias); the z_a term only for asymmetric
activations (q_a in [0, 15]); weights are symmetric (q_w in [-8, 7]). The int32 accumulator is exact and
|acc| < 2^24 for k ≤ 2^17, so the conversion to fp32 is exact too.

One kernel serves prefill (128×128 tiles, grouped order for L2 reuse) and decode (1–16 tokens: a 16-row
tile and narrow column blocks, a GEMV-like grid over output channels that streams the 4-bit weights).
"""
from __future__ import annotations

import torch

from flatquant.packing import unpack_int4_twos

from .kron_quant import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    # Four bytes per 32-bit register: nibbles → int8 lanes, sign-extended by OR-ing 0xF0 into lanes whose
    # bit 3 is set ((u & 0x08) * 30 = 0xF0 stays inside its byte, so lanes never carry into each other).
    _SEXT = "and.b32 t, u, 0x08080808; mul.lo.u32 t, t, 30; or.b32 $0, u, t;"
    _ASM_LO_S = tl.constexpr("{ .reg .b32 u, t; and.b32 u, $1, 0x0F0F0F0F; " + _SEXT + " }")
    _ASM_HI_S = tl.constexpr("{ .reg .b32 u, t; shr.b32 u, $1, 4; and.b32 u, u, 0x0F0F0F0F; " + _SEXT + " }")
    _ASM_LO_U = tl.constexpr("and.b32 $0, $1, 0x0F0F0F0F;")
    _ASM_HI_U = tl.constexpr("{ .reg .b32 u; shr.b32 u, $1, 4; and.b32 $0, u, 0x0F0F0F0F; }")

    @triton.jit
    def _unpack(p, SIGNED: tl.constexpr, ASM: tl.constexpr):
        """uint8 tile → (even-k nibbles, odd-k nibbles) as int8, sign-extended when SIGNED.
        ASM: 32-bit PTX on four bytes at once (GPU); else per-element ops (also run by the interpreter)."""
        if ASM:
            if SIGNED:
                lo = tl.inline_asm_elementwise(_ASM_LO_S, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
                hi = tl.inline_asm_elementwise(_ASM_HI_S, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
            else:
                lo = tl.inline_asm_elementwise(_ASM_LO_U, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
                hi = tl.inline_asm_elementwise(_ASM_HI_U, "=r,r", [p], dtype=tl.int8, is_pure=True, pack=4)
        elif SIGNED:
            s = p.to(tl.int8, bitcast=True)
            lo = (s << 4) >> 4
            hi = s >> 4
        else:
            lo = (p & 15).to(tl.int8)
            hi = (p >> 4).to(tl.int8)
        return lo, hi

    @triton.jit
    def _w4a4_gemm_kernel(
        a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, wsum_ptr, bias_ptr, c_ptr,
        M, N, KH,
        stride_am, stride_wn, stride_cm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_M: tl.constexpr,
        ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, UNPACK_ASM: tl.constexpr,
    ):
        """C[m, n] = epilogue(Σ_k A[m, k]·W[n, k]); KH = k/2 bytes per row of A and W."""
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_pid_n
        first_m = (pid // group) * GROUP_M
        size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M  # rows past the end re-read valid rows; the store is masked
        rn = offs_n % N
        rk = tl.arange(0, BLOCK_KH)
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
        w_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for kb in range(tl.cdiv(KH, BLOCK_KH)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                kmask = rk < KH - kb * BLOCK_KH
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
                w = tl.load(w_ptrs, mask=kmask[:, None], other=0)
            a_lo, a_hi = _unpack(a, not ASYM, UNPACK_ASM)
            w_lo, w_hi = _unpack(w, True, UNPACK_ASM)
            acc = tl.dot(a_lo, w_lo, acc, out_dtype=tl.int32)
            acc = tl.dot(a_hi, w_hi, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_KH
            w_ptrs += BLOCK_KH
        sa = tl.load(sa_ptr + rm)
        sw = tl.load(sw_ptr + rn)
        accf = acc.to(tl.float32)
        if ASYM:
            za = tl.load(za_ptr + rm)
            ws = tl.load(wsum_ptr + rn).to(tl.float32)
            accf = accf - za[:, None] * ws[None, :]
        c = accf * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            c = c + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def pick_config(M: int, N: int, KH: int, cuda: bool = True) -> dict:
    """Tile sizes by problem shape, from the sweeps on an H100 (flatquant/kernels/NOTES.md). Decode (M ≤ 16): a 16-row
    tile and 64-column blocks (128 for wide layers), so N/BLOCK_N programs each stream a slab of 4-bit
    weights; prefill: 128×128 int8 tiles, 4 warps (one warpgroup), 4 stages."""
    if not cuda:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_KH=32, GROUP_M=4, num_warps=4, num_stages=1)
    if M <= 16:
        if N >= 16384:
            return dict(BLOCK_M=16, BLOCK_N=128, BLOCK_KH=128, GROUP_M=1, num_warps=4, num_stages=4)
        return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_KH=256, GROUP_M=1, num_warps=4, num_stages=4)
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_KH=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_KH=64, GROUP_M=8, num_warps=4, num_stages=4)


def weight_sums(qw: torch.Tensor) -> torch.Tensor:
    """Σ_k q_w per output channel. qw: (out, k/2) uint8 packed signed → (out,) int32."""
    return unpack_int4_twos(qw, signed=True).sum(dim=1, dtype=torch.int32)


def w4a4_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
              za: torch.Tensor | None = None, wsum: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
              out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """Quantized linear product.

    qa: (tokens, k/2) uint8 packed activations, signed nibbles, or unsigned when ``za`` is given;
    sa: (tokens,) fp32 per-token scales; za: (tokens,) fp32 zero points (asymmetric) or None;
    qw: (out, k/2) uint8 packed signed weights; sw: (out,) fp32 per-channel scales;
    wsum: (out,) int32 Σ_k q_w (computed if None and za is given); bias: (out,) or None;
    out: optional preallocated (tokens, out) output; config: tile sizes (``pick_config`` if None).
    Returns (tokens, out) in ``out_dtype`` (fp16/bf16).
    """
    if qa.dtype != torch.uint8 or qw.dtype != torch.uint8:
        raise TypeError(f"packed inputs must be uint8, got {qa.dtype}, {qw.dtype}")
    if qa.dim() != 2 or qw.dim() != 2 or qa.shape[1] != qw.shape[1]:
        raise ValueError(f"shape mismatch: qa {tuple(qa.shape)}, qw {tuple(qw.shape)}")
    M, KH = qa.shape
    N = qw.shape[0]
    if sa.shape != (M,) or sw.shape != (N,) or (za is not None and za.shape != (M,)):
        raise ValueError("scales must be (tokens,) and (out,)")
    if za is not None and wsum is None:
        wsum = weight_sums(qw)
    if not use_triton(qa):
        return w4a4_gemm_ref(qa, sa, qw, sw, za, bias, out_dtype)
    qa, qw = qa.contiguous(), qw.contiguous()
    sa, sw = sa.float().contiguous(), sw.float().contiguous()
    c = torch.empty(M, N, dtype=out_dtype, device=qa.device) if out is None else out
    if M == 0:
        return c
    cfg = {"UNPACK_ASM": qa.is_cuda, **(config or pick_config(M, N, KH, qa.is_cuda))}
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)
    _w4a4_gemm_kernel[grid](
        qa, qw, sa, sa if za is None else za.float().contiguous(), sw,
        sw if wsum is None else wsum.contiguous(), sw if bias is None else bias.contiguous(), c,
        M, N, KH,
        qa.stride(0), qw.stride(0), c.stride(0),
        ASYM=za is not None, HAS_BIAS=bias is not None, EVEN_K=KH % cfg["BLOCK_KH"] == 0,
        **cfg,
    )
    return c


def w4a4_gemm_ref(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  za: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Plain-PyTorch reference: unpack, exact integer product in float64, dequantize, cast.

    Same arguments as ``w4a4_gemm``; returns (tokens, out) ``out_dtype``.
    """
    a = unpack_int4_twos(qa, signed=za is None).double()
    w = unpack_int4_twos(qw, signed=True).double()
    if za is not None:
        a = a - za.double()[:, None]
    y = (a @ w.T) * sa.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        y = y + bias.double()[None, :]
    return y.to(out_dtype)
