"""W4A4 GEMV for decode (1–8 tokens): the packed 4-bit weights streamed once, the products on CUDA cores (dp4a).

Usage::

    from flatquant.kernels.gemv import w4a4_gemv
    y = w4a4_gemv(qa, sa, qw, sw, za=None, wsum=None, bias=None, out_dtype=torch.float16)   # (tokens, out)

Not on QuantLinear's path yet: ``python -m flatquant.kernels.bench --only decode-gemv`` times it against the
tensor-core decode GEMM (``w4a4_gemm``'s 16-row tiles) and fp16, and that measurement decides (kernels/NOTES.md).

Why: at 1–16 tokens ``w4a4_gemm`` runs 16-row int8 MMA tiles of which one row is real; its programs stage the weights
through shared memory, unpack them into the MMA's layout and pay about 6 µs a launch on top of the bytes (H200,
results/bench/NVIDIA_H200_decode_gemm.md: qkv 9.8 µs for 12.6 MB, o_proj 9.1 µs for 8.4 MB). Here each thread loads
32-bit words of packed weights straight into registers (16 bytes a load), splits each word into its even-k and odd-k
nibbles as sign-extended int8 lanes (the 32-bit PTX of ``w4a4_gemm._unpack``) and multiplies them with the
activations' lanes by ``dp4a`` (four int8 products and their sum, one instruction): two dp4a per eight weights and
token, no tensor core, no shared memory. The sums are exact integers and the epilogue is ``w4a4_gemm``'s, so the
output equals ``w4a4_gemm``'s bit for bit.

Layout: qa (tokens, k/2) and qw (out, k/2) uint8 as in ``w4a4_gemm`` (low nibble = even k), read as int32 words of
eight codes (k/2 a multiple of 4, rows 4-byte aligned). A program takes BLOCK_N output channels and every token,
walks k in BLOCK_KW words and keeps a (tokens, BLOCK_N, BLOCK_KW) int32 accumulator that it sums over k at the end.
"""
from __future__ import annotations

import torch

from .kron_quant import HAS_TRITON, _sm_count, cdiv, next_pow2, use_triton
from .w4a4_gemm import _check_residual, _residual_args, w4a4_gemm_ref, weight_sums

# The most tokens a call takes: the accumulator grows with them (BLOCK_M × BLOCK_N × BLOCK_KW int32 a program).
GEMV_MAX_TOKENS = 8

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .w4a4_gemm import _ASM_HI_S, _ASM_HI_U, _ASM_LO_S, _ASM_LO_U, _asm_nibbles, _epilogue

    @triton.jit
    def _dp4a(w, a, acc, UNSIGNED_A: tl.constexpr):
        """acc + Σ of the four int8 lane products of words w (signed) and a (signed, or unsigned)."""
        if UNSIGNED_A:
            return tl.inline_asm_elementwise("dp4a.s32.u32 $0, $1, $2, $3;", "=r,r,r,r", [w, a, acc],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [w, a, acc],
                                         dtype=tl.int32, is_pure=True, pack=1)

    @triton.jit
    def _dot_words(w, a, acc, ASYM: tl.constexpr, ASM: tl.constexpr):
        """acc (BM, BN, BKW) + the products of weight words w (BN, BKW) and activation words a (BM, BKW), eight codes
        a word. ASM: lanes and dp4a in PTX (GPU); else nibble by nibble (the interpreter)."""
        if ASM:  # int32 words of eight nibbles → (even-k lanes, odd-k lanes), four int8 lanes a word
            wlo, whi = _asm_nibbles(w, _ASM_LO_S, _ASM_HI_S, True)
            if ASYM:
                alo, ahi = _asm_nibbles(a, _ASM_LO_U, _ASM_HI_U, True)
            else:
                alo, ahi = _asm_nibbles(a, _ASM_LO_S, _ASM_HI_S, True)
            acc = _dp4a(wlo[None, :, :], alo[:, None, :], acc, ASYM)
            acc = _dp4a(whi[None, :, :], ahi[:, None, :], acc, ASYM)
        else:
            for j in tl.static_range(8):
                wn = (w << (28 - 4 * j)) >> 28
                if ASYM:
                    an = (a >> (4 * j)) & 15
                else:
                    an = (a << (28 - 4 * j)) >> 28
                acc += wn[None, :, :] * an[:, None, :]
        return acc

    @triton.jit
    def _w4a4_gemv_kernel(
        a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, wsum_ptr, bias_ptr, c_ptr,
        M, N, KW, stride_am, stride_wn, stride_cm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
        ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr,
        res_ptr=None, stride_rm=0, HAS_RES: tl.constexpr = False,
    ):
        """C[m, n] = ``_epilogue``(Σ_k A[m, k]·W[n, k]) for the BLOCK_N channels of program_id(0) and all M ≤ BLOCK_M
        tokens; A and W are int32 words (KW a row, strides in words)."""
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = offs_m % M  # rows past the end re-read valid rows; the store is masked
        rn = offs_n % N
        kk = tl.arange(0, BLOCK_KW)
        w_ptrs = w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :]
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + kk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KW), dtype=tl.int32)
        for kb in range(0, tl.cdiv(KW, BLOCK_KW)):
            if EVEN_K:
                w = tl.load(w_ptrs)
                a = tl.load(a_ptrs)
            else:
                km = kk < KW - kb * BLOCK_KW
                w = tl.load(w_ptrs, mask=km[None, :], other=0)
                a = tl.load(a_ptrs, mask=km[None, :], other=0)  # zero words: no products
            acc = _dot_words(w, a, acc, ASYM, ASM)
            w_ptrs += BLOCK_KW
            a_ptrs += BLOCK_KW
        _epilogue(tl.sum(acc, axis=2), sa_ptr, za_ptr, sw_ptr, wsum_ptr, bias_ptr, c_ptr, offs_m, offs_n, rm, rn, M,
                  N, stride_cm, ASYM, HAS_BIAS, False, res_ptr, stride_rm, HAS_RES)


def gemv_config(M: int, N: int, KH: int, sms: int | None = None) -> dict:
    """Launch settings: every token in one block (a power of 2), 16 channels a program (32 for wide layers, so
    that the programs stay a few per SM: 384 for qkv's 6144, 896 for up/gate's 28672), 64 words (256 bytes) of k
    a step, 4 warps. Unmeasured defaults: ``bench --only decode-gemv`` sweeps them."""
    return dict(BLOCK_M=next_pow2(M), BLOCK_N=32 if N >= 16384 else 16, BLOCK_KW=64, num_warps=4, num_stages=3)


def w4a4_gemv(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
              za: torch.Tensor | None = None, wsum: torch.Tensor | None = None, bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float16, residual: torch.Tensor | None = None,
              config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``w4a4_gemm`` for 1–GEMV_MAX_TOKENS tokens on CUDA cores (module docstring), the same arguments and the same
    output bit for bit. qa, qw: contiguous uint8 with k/2 a multiple of 4 bytes; config: ``gemv_config``
    overrides; out: optional preallocated (tokens, out) output (the GPU test poisons it). Falls back to
    ``w4a4_gemm_ref`` where Triton cannot run."""
    if qa.dtype != torch.uint8 or qw.dtype != torch.uint8:
        raise TypeError(f"packed inputs must be uint8, got {qa.dtype}, {qw.dtype}")
    if qa.dim() != 2 or qw.dim() != 2 or qa.shape[1] != qw.shape[1]:
        raise ValueError(f"shape mismatch: qa {tuple(qa.shape)}, qw {tuple(qw.shape)}")
    M, KH = qa.shape
    N = qw.shape[0]
    if not 1 <= M <= GEMV_MAX_TOKENS:
        raise ValueError(f"w4a4_gemv takes 1 to {GEMV_MAX_TOKENS} tokens, got {M}")
    if KH % 4:
        raise ValueError(f"w4a4_gemv reads 32-bit words of codes: k/2 = {KH} bytes must be a multiple of 4")
    if sa.shape != (M,) or sw.shape != (N,) or (za is not None and za.shape != (M,)):
        raise ValueError("scales must be (tokens,) and (out,)")
    _check_residual(residual, M, N)
    if za is not None and wsum is None:
        wsum = weight_sums(qw)
    if not use_triton(qa):
        return w4a4_gemm_ref(qa, sa, qw, sw, za, bias, out_dtype, residual)
    qa, qw = qa.contiguous(), qw.contiguous()
    if qa.data_ptr() % 4 or qw.data_ptr() % 4:
        raise ValueError("w4a4_gemv reads 32-bit words: qa and qw must start 4-byte aligned")
    cfg = {**gemv_config(M, N, KH, _sm_count(qa.device) if qa.is_cuda else None), **(config or {})}
    sa, sw = sa.float().contiguous(), sw.float().contiguous()
    c = torch.empty(M, N, dtype=out_dtype, device=qa.device) if out is None else out
    KW = KH // 4
    _w4a4_gemv_kernel[(cdiv(N, cfg["BLOCK_N"]),)](
        qa.view(torch.int32), qw.view(torch.int32), sa, sa if za is None else za.float().contiguous(), sw,
        sw if wsum is None else wsum.contiguous(), sw if bias is None else bias.contiguous(), c,
        M, N, KW, KW, KW, c.stride(0),
        ASYM=za is not None, HAS_BIAS=bias is not None, EVEN_K=KW % cfg["BLOCK_KW"] == 0, ASM=qa.is_cuda,
        **_residual_args(residual), **cfg,
    )
    return c
