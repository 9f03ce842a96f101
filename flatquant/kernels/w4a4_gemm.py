"""W4A4 GEMM: packed 4-bit activations × packed 4-bit weights on int8 or fp8 tensor cores, dequantized in the epilogue.

Usage::

    from flatquant.kernels.w4a4_gemm import w4a4_gemm
    y = w4a4_gemm(qa, sa, qw, sw, za=None, wsum=None, out_dtype=torch.float16)   # (tokens, out)
    y = w4a4_gemm(qa, sa, qw, sw, path="fp8")                                    # force a path

Hopper has no int4 tensor-core instruction (DESIGN.md, hardware facts), so the kernel loads 4-bit data
(half the bytes of int8, a quarter of fp16), splits each byte into its two nibbles in registers and feeds
both halves to ``tl.dot``. Because a dot product does not care about the order of k, the even-k nibbles of
A meet the even-k nibbles of W in one product and the odd-k nibbles in another: no interleaving shuffle.

Two paths, the same epilogue and, where the sums are exact, bit-identical outputs:

- int8 (``path="int8"``): nibbles sign- or zero-extended to int8, int32 accumulation (exact for values in
  [-8, 15]).
- fp8 e4m3 (``path="fp8"``, Hopper only): a zero-extended nibble byte c in 0..15 *is* the e4m3fn encoding
  of c·2^-9 (exponent field 0: subnormals m·2^-9; field 1: (8+m)·2^-9), and a signed nibble n < 0 becomes
  the sign-magnitude byte 0x80 | |n| (0x88 = −8·2^-9). So the unpack is bit manipulation only, every product
  is an exact multiple of 2^-18, and the epilogue scales the fp32 accumulator by 2^18 (exact). How the sums
  stay exact under Hopper's reduced-precision fp8 accumulation: ``_w4a4_gemm_kernel``'s docstring. Slower
  than int8 on the H200 so far (Triton 3.6 runs unpack and wgmma one after the other), so not the default.

Epilogue (fp32): y = s_a · s_w · (q_a·q_w − z_a · Σ_k q_w) (+ bias); the z_a term only for asymmetric
activations (q_a in [0, 15]); weights are symmetric (q_w in [-8, 7]). The integer sum is exact and
|acc| < 2^24 for k ≤ 2^17, so it is exact in fp32 too.

One kernel serves prefill (128×128 tiles, grouped order for L2 reuse) and decode (1–16 tokens: a 16-row
tile and narrow column blocks, a GEMV-like grid over output channels that streams the 4-bit weights, with k
split over SPLIT_K programs where a tile's weights are many, as down_proj's: see ``pick_config``).
Split-K keeps a zeroed int32 workspace and tile counters per device (``_split_workspace``); calls that share
them must run one after another, on one CUDA stream (or as CUDA graphs replayed on one stream): concurrent
calls on different streams are not supported.
"""
from __future__ import annotations

import functools

import torch

from flatquant.packing import unpack_int4_twos

from .kron_quant import HAS_TRITON, _check_inputs, _check_norm, _sm_count, cdiv, norm_args, padded_factors, use_triton

# Products per partial sum on the fp8 path (see _w4a4_gemm_kernel): |partial| ≤ 128 · 64 = 2^13 units of 2^-18.
FP8_PARTIAL = 128
# path=None takes fp8 from this many tokens on Hopper; None: never. On the H200 the fp8 kernel ran at
# 0.76–0.82× the int8 kernel's speed at 2048–16384 tokens (--only gemm) and an earlier build of it at 0.41–0.66×
# in decode (flatquant/kernels/NOTES.md).
FP8_DEFAULT_MIN_TOKENS: int | None = None

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .kron_quant import _kron_quant_blocks

    # Four bytes per 32-bit register: nibbles → int8 lanes, sign-extended by OR-ing 0xF0 into lanes whose
    # bit 3 is set ((u & 0x08) * 30 = 0xF0 stays inside its byte, so lanes never carry into each other).
    _SEXT = "and.b32 t, u, 0x08080808; mul.lo.u32 t, t, 30; or.b32 $0, u, t;"
    _ASM_LO_S = tl.constexpr("{ .reg .b32 u, t; and.b32 u, $1, 0x0F0F0F0F; " + _SEXT + " }")
    _ASM_HI_S = tl.constexpr("{ .reg .b32 u, t; shr.b32 u, $1, 4; and.b32 u, u, 0x0F0F0F0F; " + _SEXT + " }")
    _ASM_LO_U = tl.constexpr("and.b32 $0, $1, 0x0F0F0F0F;")
    _ASM_HI_U = tl.constexpr("{ .reg .b32 u; shr.b32 u, $1, 4; and.b32 $0, u, 0x0F0F0F0F; }")

    @triton.jit
    def _asm_nibbles(p, LO: tl.constexpr, HI: tl.constexpr, WORDS: tl.constexpr = False):
        """uint8 tile → (LO(p), HI(p)) as uint8: two 32-bit PTX snippets, each on four bytes at once. WORDS: p is
        int32 words (four bytes each, as gemv.py reads them) and so is the output."""
        if WORDS:
            lo = tl.inline_asm_elementwise(LO, "=r,r", [p], dtype=tl.int32, is_pure=True, pack=1)
            hi = tl.inline_asm_elementwise(HI, "=r,r", [p], dtype=tl.int32, is_pure=True, pack=1)
        else:
            lo = tl.inline_asm_elementwise(LO, "=r,r", [p], dtype=tl.uint8, is_pure=True, pack=4)
            hi = tl.inline_asm_elementwise(HI, "=r,r", [p], dtype=tl.uint8, is_pure=True, pack=4)
        return lo, hi

    @triton.jit
    def _unpack(p, SIGNED: tl.constexpr, ASM: tl.constexpr):
        """uint8 tile → (even-k nibbles, odd-k nibbles) as int8, sign-extended when SIGNED.
        ASM: 32-bit PTX on four bytes at once (GPU); else per-element ops (also run by the interpreter)."""
        if ASM:
            if SIGNED:
                lo, hi = _asm_nibbles(p, _ASM_LO_S, _ASM_HI_S)
            else:
                lo, hi = _asm_nibbles(p, _ASM_LO_U, _ASM_HI_U)
            lo, hi = lo.to(tl.int8, bitcast=True), hi.to(tl.int8, bitcast=True)
        elif SIGNED:
            s = p.to(tl.int8, bitcast=True)
            lo = (s << 4) >> 4
            hi = s >> 4
        else:
            lo = (p & 15).to(tl.int8)
            hi = (p >> 4).to(tl.int8)
        return lo, hi

    # Nibbles → e4m3 sign-magnitude bytes, four per register: u = zero-extended nibble per lane;
    # 0x90 − u = 0x80 | (16 − u) = 0x80 | |n| for u in 8..15 (no lane borrows: u ≤ 15); prmt 0xBA98
    # replicates each byte's bit 7 (the nibble's sign; the shift moves it there for the low nibbles) into a
    # lane mask m; lop3 0xCA = m ? (0x90 − u) : u. Centred (unsigned u → u − 8): flip bit 3 of every nibble.
    def _f8_asm(hi: bool, center: bool):
        src = "xor.b32 p, $1, 0x88888888; " if center else "mov.b32 p, $1; "
        nib = ("shr.b32 u, p, 4; and.b32 u, u, 0x0F0F0F0F; prmt.b32 m, p, p, 0xBA98; " if hi else
               "and.b32 u, p, 0x0F0F0F0F; shl.b32 t, p, 4; prmt.b32 m, t, t, 0xBA98; ")
        return tl.constexpr("{ .reg .b32 p, u, x, t, m; " + src + nib
                            + "sub.u32 x, 0x90909090, u; lop3.b32 $0, m, x, u, 0xCA; }")

    _ASM_LO_F8, _ASM_HI_F8 = _f8_asm(False, False), _f8_asm(True, False)
    _ASM_LO_F8C, _ASM_HI_F8C = _f8_asm(False, True), _f8_asm(True, True)
    _PARTIAL = tl.constexpr(FP8_PARTIAL)

    @triton.jit
    def _unpack_e4m3(p, CENTER: tl.constexpr, ASM: tl.constexpr):
        """uint8 tile → (even-k, odd-k) nibbles as float8e4nv holding n·2^-9: n the signed nibble, or with
        CENTER the unsigned nibble minus 8. ASM as in ``_unpack``."""
        if ASM:
            if CENTER:
                lo, hi = _asm_nibbles(p, _ASM_LO_F8C, _ASM_HI_F8C)
            else:
                lo, hi = _asm_nibbles(p, _ASM_LO_F8, _ASM_HI_F8)
        else:
            q = p ^ 0x88 if CENTER else p
            ulo = q & 15
            uhi = (q >> 4) & 15
            lo = tl.where(ulo >= 8, 144 - ulo, ulo).to(tl.uint8)
            hi = tl.where(uhi >= 8, 144 - uhi, uhi).to(tl.uint8)
        return lo.to(tl.float8e4nv, bitcast=True), hi.to(tl.float8e4nv, bitcast=True)

    @triton.jit
    def _epilogue(acc, sa_ptr, za_ptr, sw_ptr, wsum_ptr, bias_ptr, c_ptr, offs_m, offs_n, rm, rn, M, N, stride_cm,
                  ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, FP8: tl.constexpr, res_ptr, stride_rm,
                  HAS_RES: tl.constexpr):
        """The accumulator tile → s_a · s_w · (acc − z_a · Σ_k q_w) (+ bias) (+ the residual tile, HAS_RES), in fp32,
        rounded once and stored masked to m < M, n < N."""
        sa = tl.load(sa_ptr + rm)
        sw = tl.load(sw_ptr + rn)
        accf = acc * 262144.0 if FP8 else acc.to(tl.float32)  # fp8: units of 2^-18 → integers
        if ASYM:
            za = tl.load(za_ptr + rm)
            if FP8:
                za -= 8.0  # the sums were of q_a − 8
            ws = tl.load(wsum_ptr + rn).to(tl.float32)
            accf = accf - za[:, None] * ws[None, :]
        c = accf * sa[:, None] * sw[None, :]
        if HAS_BIAS:
            c = c + tl.load(bias_ptr + rn).to(tl.float32)[None, :]
        cmask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        if HAS_RES:
            r_ptrs = res_ptr + offs_m[:, None].to(tl.int64) * stride_rm + offs_n[None, :]
            c = c + tl.load(r_ptrs, mask=cmask, other=0.0).to(tl.float32)
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, c.to(c_ptr.dtype.element_ty), mask=cmask)

    @triton.jit
    def _w4a4_gemm_kernel(
        a_ptr, w_ptr, sa_ptr, za_ptr, sw_ptr, wsum_ptr, bias_ptr, c_ptr, ws_ptr, cnt_ptr,
        M, N, KH, kb_per_split,
        stride_am, stride_wn, stride_cm,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KH: tl.constexpr, GROUP_M: tl.constexpr,
        ASYM: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, UNPACK_ASM: tl.constexpr,
        FP8: tl.constexpr, SPLIT_K: tl.constexpr,
        x_ptr=None, l_ptr=None, r_ptr=None, N1=0, N2=0, clip=1.0, stride_xm=0,
        KQ: tl.constexpr = False, KQ_N1: tl.constexpr = 16, KQ_N2: tl.constexpr = 32, KQ_J: tl.constexpr = 32,
        KQ_F32: tl.constexpr = False, KQ_R_EYE: tl.constexpr = False, KQ_GLU: tl.constexpr = False,
        nw_ptr=None, norm_eps=0.0, KQ_NORM: tl.constexpr = False,
        res_ptr=None, stride_rm=0, HAS_RES: tl.constexpr = False,
    ):
        """C[m, n] = epilogue(Σ_k A[m, k]·W[n, k]); KH = k/2 bytes per row of A and W.

        KQ (``kq_gemm``, decode): A is made by the program itself first. Each program runs ``_kron_quant_blocks``
        over all M tokens of x (M, N1·N2) with the factors at l_ptr, r_ptr into its own slice of the scratch at
        a_ptr (M·KH codes a program; scales at sa_ptr, zeros at za_ptr, M a program), then, after a CTA barrier
        (its threads' global stores visible to all of them), reads that slice as A. Every program computes the
        same codes as ``kron_quant`` would (the same code on the same inputs), so the output equals kron_quant
        then w4a4_gemm; what it saves is the launch of the one and its wait before the other. KQ_GLU: x's rows are
        [gate | up] (``kron_quant``'s glu); KQ_NORM: x is RMSNorm'd first (``kron_quant``'s norm: weight at nw_ptr,
        norm_eps).

        HAS_RES: the epilogue adds the residual tile at res_ptr (row stride stride_rm, in any float dtype) before
        the one rounding to C's dtype: a decoder layer's residual stream without a kernel of its own.

        SPLIT_K > 1 (int8 only): program (tile, s) sums k-blocks [s·kb_per_split, (s+1)·kb_per_split) ∩ the
        cdiv(KH, BLOCK_KH) blocks (possibly none: a zero partial), atomically adds its int32 tile to the workspace
        ``ws_ptr`` (row stride N, rows m < M) and then increments the tile's counter; the program that finds
        SPLIT_K − 1 there is the last one: it takes the total and zeroes the workspace in one ``atomic_xchg``
        (at L2, so no stale L1 line), zeroes the counter and runs the epilogue; the others store nothing.
        Integer sums are exact, so the output is bit-identical to SPLIT_K = 1 in any arrival order, and the
        workspace and counters are left at zero for the next call (a CUDA graph can replay the launch).

        FP8: e4m3 operands (asymmetric activations centred, q_a − 8, so every product is an integer in
        [-64, 64] units of 2^-18) and an fp32 accumulator. Hopper's fp8 wgmma accumulates with ~14
        significant bits (truncated), not fp32. Triton's ``max_num_imprecise_acc=n`` (fp8 dots on sm_90
        only; n ≤ the dot's K) lets the tensor core sum n products, then adds that partial sum to a separate
        fp32 accumulator; its default there, 2^30, means never, and on the H200 that lost up to 671,488 units
        of a K=14336 sum. Partial sums of at most 128 products are exact: |partial| ≤ 2^13 units, an
        integer 13 significant bits hold, and the fp32 sums stay integers below 2^24 units. n = 64 or 128
        measured exact and, at 8 warps, as fast as the split below (±10 %), but ptxas serializes the wgmma
        (C7514) and at 4 warps the second accumulator spills. The kernel keeps the default and splits the
        sum itself: each ``tl.dot`` starts from zero, covers at most FP8_PARTIAL = 128 products (both
        nibble halves when BLOCK_KH ≤ 64) and is added to ``acc`` in fp32; Triton folds ``acc + dot`` into
        the dot only when max_num_imprecise_acc is 0, which it is not for fp8 on sm_90 (Combine.cpp). The
        GPU tests check exactness against the integer reference at K=14336, extreme codes included."""
        pid = tl.program_id(0)
        if KQ:
            slot = (pid * SPLIT_K + tl.program_id(1)).to(tl.int64)
            a_ptr += slot * M * KH
            sa_ptr += slot * M
            za_ptr += slot * M
            _kron_quant_blocks(0, 1, x_ptr, l_ptr, r_ptr, a_ptr, sa_ptr, za_ptr, M, N1, N2, clip, stride_xm, KH,
                               KQ_N1, KQ_N2, KQ_J, 1, not ASYM, KQ_F32, 1, False, KQ_R_EYE, KQ_GLU, nw_ptr,
                               norm_eps, KQ_NORM)
            tl.debug_barrier()
            stride_am = KH
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
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
        if SPLIT_K > 1:
            kb_lo = tl.program_id(1) * kb_per_split
            kb_hi = tl.minimum(kb_lo + kb_per_split, tl.cdiv(KH, BLOCK_KH))
            a_ptrs += kb_lo * BLOCK_KH
            w_ptrs += kb_lo * BLOCK_KH
        else:
            kb_lo = 0
            kb_hi = tl.cdiv(KH, BLOCK_KH)
        for kb in range(kb_lo, kb_hi):
            if EVEN_K:
                a = tl.load(a_ptrs)
                w = tl.load(w_ptrs)
            else:
                kmask = rk < KH - kb * BLOCK_KH
                a = tl.load(a_ptrs, mask=kmask[None, :], other=0)
                w = tl.load(w_ptrs, mask=kmask[:, None], other=0)
            if FP8:
                a_lo, a_hi = _unpack_e4m3(a, ASYM, UNPACK_ASM)
                w_lo, w_hi = _unpack_e4m3(w, False, UNPACK_ASM)
                if 2 * BLOCK_KH <= _PARTIAL:
                    acc += tl.dot(a_hi, w_hi, tl.dot(a_lo, w_lo))
                else:
                    acc += tl.dot(a_lo, w_lo)
                    acc += tl.dot(a_hi, w_hi)
            else:
                a_lo, a_hi = _unpack(a, not ASYM, UNPACK_ASM)
                w_lo, w_hi = _unpack(w, True, UNPACK_ASM)
                acc = tl.dot(a_lo, w_lo, acc, out_dtype=tl.int32)
                acc = tl.dot(a_hi, w_hi, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_KH
            w_ptrs += BLOCK_KH
        if SPLIT_K > 1:
            mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            ws_ptrs = ws_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            tl.atomic_add(ws_ptrs, acc, mask=mask, sem="relaxed")
            # a CTA barrier: every thread's adds come before the counter's release (one thread does the scalar
            # atomic; a release is cumulative over what the barrier ordered before it)
            tl.debug_barrier()
            if tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel") == SPLIT_K - 1:
                acc = tl.where(mask, tl.atomic_xchg(ws_ptrs, 0, mask=mask), 0)  # masked lanes hold no value
                tl.atomic_xchg(cnt_ptr + pid, 0)
                _epilogue(acc, sa_ptr, za_ptr, sw_ptr, wsum_ptr, bias_ptr, c_ptr, offs_m, offs_n, rm, rn, M, N,
                          stride_cm, ASYM, HAS_BIAS, FP8, res_ptr, stride_rm, HAS_RES)
        else:
            _epilogue(acc, sa_ptr, za_ptr, sw_ptr, wsum_ptr, bias_ptr, c_ptr, offs_m, offs_n, rm, rn, M, N,
                      stride_cm, ASYM, HAS_BIAS, FP8, res_ptr, stride_rm, HAS_RES)


def pick_config(M: int, N: int, KH: int, cuda: bool = True, fp8: bool = False, sms: int | None = None) -> dict:
    """Tile sizes by problem shape, from the sweeps on an H100 (int8) and an H200 (fp8; flatquant/kernels/NOTES.md).
    int8: decode (M ≤ 16) a 16-row tile and 64-column blocks (128 for wide layers), so N/BLOCK_N programs each
    stream a slab of 4-bit weights; prefill 128×128 tiles, 4 warps (one warpgroup), 4 stages. fp8: 128×128
    tiles of 8 warps (at 4 warps the two accumulators spill), BLOCK_KH=128, 3 stages; 64-row tiles up to 64
    tokens. Rows stay multiples of 64 (a wgmma per warpgroup: smaller tiles would lower to mma.sync).

    int8 decode also splits k (SPLIT_K, see ``_w4a4_gemm_kernel``) where a tile's weights are many: a program
    then streams about ``_SPLIT_BYTES`` or more, and no more programs than 2 · ``sms`` need are made (1 when the
    tiles alone reach that, or ``sms`` is None). Other configs have no SPLIT_K (1). At LLaMA-3-8B's shapes on 132
    SMs only down_proj splits (K=14336: 448 KB a tile, 2 splits); qkv, o_proj and up/gate do not (measured on an
    H200: a split was slower there, ``_SPLIT_BYTES``' comment)."""
    if not cuda:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_KH=32, GROUP_M=4, num_warps=4, num_stages=1)
    if fp8:
        if M <= 64:
            return dict(BLOCK_M=64, BLOCK_N=128 if N >= 16384 else 64, BLOCK_KH=128, GROUP_M=8, num_warps=4,
                        num_stages=4)
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_KH=128, GROUP_M=8, num_warps=8, num_stages=3)
    if M <= 16:
        if N >= 16384:
            cfg = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_KH=128, GROUP_M=1, num_warps=4, num_stages=4)
        else:
            cfg = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_KH=256, GROUP_M=1, num_warps=4, num_stages=4)
        cfg["SPLIT_K"] = _split_k(cdiv(M, 16) * cdiv(N, cfg["BLOCK_N"]), cdiv(KH, cfg["BLOCK_KH"]),
                                  cfg["BLOCK_N"] * KH, sms)
        return cfg
    if M <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_KH=128, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_KH=64, GROUP_M=8, num_warps=4, num_stages=4)


# A program streams a tile's BLOCK_N rows of packed weights; split k only past this many bytes a program. H200,
# --only decode-gemm (results/bench/NVIDIA_H200_decode_gemm.md): at 128 KB (qkv, o_proj) and 256 KB (up/gate) a
# tile, any split was slower (the split's atomics and the last program's epilogue are a serial tail of a few µs);
# at 448 KB (down_proj, K=14336) two splits were fastest at 4 and 16 tokens (22.8 → 16.7 µs) and near it at 1.
_SPLIT_BYTES = 192 * 1024
_MIN_SPLIT_KB = 2  # k-blocks per split at least
_MAX_SPLIT_K = 16


def _split_k(tiles: int, kblocks: int, tile_bytes: int, sms: int | None) -> int:
    """pick_config's split of k: tile_bytes // _SPLIT_BYTES splits (a program keeps ≥ _SPLIT_BYTES of weights),
    no more than 2·sms programs need and ≥ _MIN_SPLIT_KB blocks a split allow, ≤ _MAX_SPLIT_K, no split left
    empty (cdiv(kblocks, cdiv(kblocks, s)) splits cover the blocks that s would); 1 without an SM count."""
    if sms is None or tiles >= 2 * sms:
        return 1
    split = max(1, min(tile_bytes // _SPLIT_BYTES, cdiv(2 * sms, tiles), kblocks // _MIN_SPLIT_KB, _MAX_SPLIT_K))
    return cdiv(kblocks, cdiv(kblocks, split))


# Split-K workspaces by device: [(int32 partial sums, int32 tile counters), ...], the last the one in use, all
# zero between calls. Outgrown ones are kept (never freed): a captured CUDA graph holds their addresses.
_WORKSPACES: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _split_workspace(device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The device's zeroed split-K workspace (≥ numel int32) and counters (≥ tiles), grown if smaller; None when
    it would have to be allocated during CUDA graph capture (the caller then runs without the split)."""
    have = _WORKSPACES.get(device)
    if have and have[-1][0].numel() >= numel and have[-1][1].numel() >= tiles:
        return have[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    old_ws, old_cnt = have[-1] if have else (None, None)
    ws = torch.zeros(max(numel, 0 if old_ws is None else old_ws.numel()), dtype=torch.int32, device=device)
    cnt = torch.zeros(max(tiles, 0 if old_cnt is None else old_cnt.numel()), dtype=torch.int32, device=device)
    _WORKSPACES.setdefault(device, []).append((ws, cnt))
    return ws, cnt


@functools.lru_cache(maxsize=None)
def fp8_supported(device: torch.device) -> bool:
    """True on Hopper (sm_90) GPUs where Triton has float8e4nv dots: the one target on which the fp8 path's
    sums are exact as the kernel's docstring says. sm_89 and sm_100+ lower fp8 dots to mma.sync / tcgen05,
    whose accumulation precision is not established here, and Triton folds ``acc + dot`` there."""
    if not (HAS_TRITON and device.type == "cuda"):
        return False
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return False
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    opts = make_backend(GPUTarget("cuda", 10 * major + minor, 32)).parse_options({})
    return "fp8e4nv" in opts.supported_fp8_dtypes


def default_path(M: int, device: torch.device) -> str:
    """The path ``w4a4_gemm(path=None)`` takes for M tokens on ``device``: "fp8" from FP8_DEFAULT_MIN_TOKENS
    tokens where ``fp8_supported``, else "int8" (always, while FP8_DEFAULT_MIN_TOKENS is None)."""
    fp8 = FP8_DEFAULT_MIN_TOKENS is not None and M >= FP8_DEFAULT_MIN_TOKENS and fp8_supported(device)
    return "fp8" if fp8 else "int8"


def weight_sums(qw: torch.Tensor) -> torch.Tensor:
    """Σ_k q_w per output channel. qw: (out, k/2) uint8 packed signed → (out,) int32."""
    return unpack_int4_twos(qw, signed=True).sum(dim=1, dtype=torch.int32)


def w4a4_gemm(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
              za: torch.Tensor | None = None, wsum: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float16,
              out: torch.Tensor | None = None, config: dict | None = None, path: str | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """Quantized linear product.

    qa: (tokens, k/2) uint8 packed activations, signed nibbles, or unsigned when ``za`` is given;
    sa: (tokens,) fp32 per-token scales; za: (tokens,) fp32 zero points (asymmetric) or None;
    qw: (out, k/2) uint8 packed signed weights; sw: (out,) fp32 per-channel scales;
    wsum: (out,) int32 Σ_k q_w (computed if None and za is given); bias: (out,) or None;
    out: optional preallocated (tokens, out) output; config: tile sizes (``pick_config`` if None), with an
    optional "SPLIT_K" (default 1; > 1 on the int8 path only, see ``_w4a4_gemm_kernel``);
    path: "int8", "fp8" (Hopper, or the interpreter) or None (``default_path``);
    residual: optional (tokens, out) float tensor added in the epilogue, before the one rounding to ``out_dtype``.
    Returns (tokens, out) in ``out_dtype`` (fp16/bf16; float32 keeps the exact integer sums for unit scales).
    """
    if qa.dtype != torch.uint8 or qw.dtype != torch.uint8:
        raise TypeError(f"packed inputs must be uint8, got {qa.dtype}, {qw.dtype}")
    if qa.dim() != 2 or qw.dim() != 2 or qa.shape[1] != qw.shape[1]:
        raise ValueError(f"shape mismatch: qa {tuple(qa.shape)}, qw {tuple(qw.shape)}")
    M, KH = qa.shape
    N = qw.shape[0]
    if sa.shape != (M,) or sw.shape != (N,) or (za is not None and za.shape != (M,)):
        raise ValueError("scales must be (tokens,) and (out,)")
    if path not in (None, "int8", "fp8"):
        raise ValueError(f"path must be 'int8', 'fp8' or None, got {path!r}")
    _check_residual(residual, M, N)
    if za is not None and wsum is None:
        wsum = weight_sums(qw)
    if not use_triton(qa):
        return w4a4_gemm_ref(qa, sa, qw, sw, za, bias, out_dtype, residual)
    fp8 = (path or default_path(M, qa.device)) == "fp8"
    cfg = dict(config or pick_config(M, N, KH, qa.is_cuda, fp8, _sm_count(qa.device) if qa.is_cuda else None))
    split = cfg.pop("SPLIT_K", 1)
    if not isinstance(split, int) or split < 1:
        raise ValueError(f"SPLIT_K must be a positive int, got {split!r}")
    if fp8 and split > 1:
        raise ValueError(f"split-K is int8 only (its workspace sums int32), got SPLIT_K={split} on the fp8 path")
    if fp8 and cfg["BLOCK_KH"] > FP8_PARTIAL:
        raise ValueError(f"the fp8 path sums at most {FP8_PARTIAL} products per dot: BLOCK_KH {cfg['BLOCK_KH']}")
    if fp8 and qa.is_cuda and (not fp8_supported(qa.device) or cfg["BLOCK_M"] % 64 or cfg["num_warps"] % 4):
        raise ValueError("the fp8 path needs a Hopper GPU and BLOCK_M a multiple of 64 with whole warpgroups"
                         f" (wgmma), got {torch.cuda.get_device_name(qa.device)} and {cfg}")
    qa, qw = qa.contiguous(), qw.contiguous()
    sa, sw = sa.float().contiguous(), sw.float().contiguous()
    c = torch.empty(M, N, dtype=out_dtype, device=qa.device) if out is None else out
    if M == 0:
        return c
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    kblocks = cdiv(KH, cfg["BLOCK_KH"])
    ws = _split_workspace(qa.device, cdiv(M, cfg["BLOCK_M"]) * cfg["BLOCK_M"] * N, tiles) if split > 1 else None
    if ws is None:  # no split, or a workspace it cannot allocate during graph capture: SPLIT_K = 1 is exact too
        split, ws = 1, (sa, sa)  # the pointers are not used
    cfg = {"UNPACK_ASM": qa.is_cuda, "FP8": fp8, **cfg}
    _w4a4_gemm_kernel[(tiles, split)](
        qa, qw, sa, sa if za is None else za.float().contiguous(), sw,
        sw if wsum is None else wsum.contiguous(), sw if bias is None else bias.contiguous(), c, ws[0], ws[1],
        M, N, KH, cdiv(kblocks, split),
        qa.stride(0), qw.stride(0), c.stride(0),
        ASYM=za is not None, HAS_BIAS=bias is not None, EVEN_K=KH % cfg["BLOCK_KH"] == 0, SPLIT_K=split,
        **_residual_args(residual), **cfg,
    )
    return c


def _check_residual(residual: torch.Tensor | None, M: int, N: int) -> None:
    if residual is not None and (residual.shape != (M, N) or not residual.is_floating_point()):
        raise ValueError(f"residual must be a ({M}, {N}) float tensor, got {tuple(residual.shape)} {residual.dtype}")


def _residual_args(residual: torch.Tensor | None) -> dict:
    """The kernel's residual arguments (``_w4a4_gemm_kernel``'s HAS_RES)."""
    if residual is None:
        return {"HAS_RES": False}
    residual = residual if residual.stride(1) == 1 else residual.contiguous()
    return {"res_ptr": residual, "stride_rm": residual.stride(0), "HAS_RES": True}


def kq_fuses(M: int, n1: int, n2: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``kq_gemm`` runs as one launch: 1–16 tokens of 16-bit activations whose padded factors hold at most
    64 × 128 values (LLaMA-3-8B's 4096-wide inputs: qkv, o_proj, up/gate). Compiled for sm_90 (Triton 3.6) at the
    decode configs (4 warps, 4 stages): 140–144 registers and 54–60 KB of shared memory for those, no spills;
    down_proj's 112 × 128 factors spilled 200 bytes and fp32 activations 1.3 KB, so those run the two kernels."""
    b1, b2 = padded_factors(n1, n2)
    return 0 < M <= 16 and b1 * b2 <= 64 * 128 and (device.type != "cuda" or dtype != torch.float32)


def kq_gemm(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor | None, clip: float, sym: bool, qw: torch.Tensor,
            sw: torch.Tensor, wsum: torch.Tensor | None = None, bias: torch.Tensor | None = None,
            out_dtype: torch.dtype | None = None, config: dict | None = None, glu: bool = False,
            residual: torch.Tensor | None = None, norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``kron_quant(x, L, R, clip, sym)`` then ``w4a4_gemm`` on its codes, in one launch (the int8 path): each GEMM
    program transforms and quantizes the M tokens itself into its own scratch, then streams its weights
    (``_w4a4_gemm_kernel``'s KQ). For decode, where a token's transform is a few µs of one program and the launch
    between the two kernels a few more; the work grows with M in every program (``kq_fuses`` says where it fuses).

    x: (M, n1·n2) fp16/bf16/fp32; L, R (None: identity), clip, sym as ``kron_quant``; qw, sw, wsum, bias as ``w4a4_gemm``;
    out_dtype: x's dtype if None; config: ``pick_config`` overrides; glu, norm: as ``kron_quant``'s (x's rows are
    [gate | up]; x is RMSNorm'd first); residual as ``w4a4_gemm``'s. Returns (M, out), equal to the two calls (the
    same kernel code on the same inputs). Runs the two where Triton cannot run or ``kq_fuses`` is false."""
    from .kron_quant import kron_quant

    n1, n2 = _check_inputs(x, L, R, glu)
    _check_norm(norm, n1 * n2)
    M, KH, N = x.shape[0], n1 * n2 // 2, qw.shape[0]
    if qw.dtype != torch.uint8 or qw.dim() != 2 or qw.shape[1] != KH:
        raise ValueError(f"qw must be ({N}, {KH}) uint8 for {n1 * n2} inputs, got {tuple(qw.shape)} {qw.dtype}")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    out_dtype = out_dtype or x.dtype
    _check_residual(residual, M, N)
    if not sym and wsum is None:
        wsum = weight_sums(qw)
    if not use_triton(x) or not kq_fuses(M, n1, n2, x.dtype, x.device):
        q, s, z = kron_quant(x, L, R, clip, sym, glu=glu, norm=norm)
        return w4a4_gemm(q, s, qw, sw, z, wsum, bias, out_dtype, residual=residual)
    x = x if x.stride(1) == 1 else x.contiguous()
    L = L.to(device=x.device, dtype=x.dtype).contiguous()
    r_eye = R is None
    R = L if r_eye else R.to(device=x.device, dtype=x.dtype).contiguous()  # r_eye: a placeholder, never read
    qw, sw = qw.contiguous(), sw.float().contiguous()
    cfg = dict(pick_config(M, N, KH, x.is_cuda, False, _sm_count(x.device) if x.is_cuda else None), **(config or {}))
    split = cfg.pop("SPLIT_K", 1)
    tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
    ws = _split_workspace(x.device, cdiv(M, cfg["BLOCK_M"]) * cfg["BLOCK_M"] * N, tiles) if split > 1 else None
    if ws is None:
        split, ws = 1, (sw, sw)
    slots = tiles * split
    codes = torch.empty(slots * M * KH, dtype=torch.uint8, device=x.device)
    scale = torch.empty(slots * M, dtype=torch.float32, device=x.device)
    zero = scale if sym else torch.empty(slots * M, dtype=torch.float32, device=x.device)
    c = torch.empty(M, N, dtype=out_dtype, device=x.device)
    b1, b2 = padded_factors(n1, n2)
    _w4a4_gemm_kernel[(tiles, split)](
        codes, qw, scale, zero, sw, sw if wsum is None else wsum.contiguous(),
        sw if bias is None else bias.contiguous(), c, ws[0], ws[1],
        M, N, KH, cdiv(cdiv(KH, cfg["BLOCK_KH"]), split), KH, qw.stride(0), c.stride(0),
        ASYM=not sym, HAS_BIAS=bias is not None, EVEN_K=KH % cfg["BLOCK_KH"] == 0, UNPACK_ASM=x.is_cuda, FP8=False,
        SPLIT_K=split, x_ptr=x, l_ptr=L, r_ptr=R, N1=n1, N2=n2, clip=float(clip), stride_xm=x.stride(0), KQ=True,
        KQ_N1=b1, KQ_N2=b2, KQ_J=b2 if b1 * b2 <= 64 * 128 else 64, KQ_F32=not x.is_cuda or x.dtype == torch.float32,
        KQ_R_EYE=r_eye, KQ_GLU=glu, **norm_args(norm, "KQ_NORM"), **_residual_args(residual), **cfg,
    )
    return c


def w4a4_gemm_ref(qa: torch.Tensor, sa: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                  za: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.float16, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-PyTorch reference: unpack, exact integer product in float64, dequantize, add bias and residual, cast.

    Same arguments as ``w4a4_gemm``; returns (tokens, out) ``out_dtype``.
    """
    a = unpack_int4_twos(qa, signed=za is None).double()
    w = unpack_int4_twos(qw, signed=True).double()
    if za is not None:
        a = a - za.double()[:, None]
    y = (a @ w.T) * sa.double()[:, None] * sw.double()[None, :]
    if bias is not None:
        y = y + bias.double()[None, :]
    if residual is not None:
        y = y + residual.double()
    return y.to(out_dtype)
